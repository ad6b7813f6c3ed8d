//! The rewriter's class analysis (contract 1) for the Python installer: the same Rust code
//! the CLI runs, over JSON so the Python side stays a thin caller. Strings in, strings out;
//! a bad argument is a `ValueError` naming it.

use forward_rewrite::analyze::is_candidate_json;
use forward_rewrite::{analyze_class_in_module_json, analyze_class_json, hash, module_classes};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// Adds the rewriter's functions to `forward_rewrite._native`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(rewrite_module_classes, m)?)?;
    m.add_function(wrap_pyfunction!(rewrite_analyze_class, m)?)?;
    m.add_function(wrap_pyfunction!(rewrite_is_candidate, m)?)?;
    m.add_function(wrap_pyfunction!(rewrite_pass_names, m)?)?;
    m.add_function(wrap_pyfunction!(rewrite_forward_sha256, m)?)?;
    m.add_function(wrap_pyfunction!(rewrite_gate_function_ok, m)?)?;
    m.add_function(wrap_pyfunction!(rewrite_experts_function_ok, m)?)?;
    m.add_function(wrap_pyfunction!(rewrite_attnres_emit, m)?)?;
    m.add_function(wrap_pyfunction!(rewrite_attnres_info, m)?)?;
    m.add_function(wrap_pyfunction!(rewrite_attnres_loops, m)?)?;
    Ok(())
}

/// The top-level classes of a module's source text as a JSON array of class sources
/// (`qualname`, `module`, `path`, `line`, `source`), cut exactly as the CLI cuts them.
#[pyfunction]
#[pyo3(signature = (text, module, path))]
fn rewrite_module_classes(
    py: Python<'_>,
    text: &str,
    module: &str,
    path: &str,
) -> PyResult<String> {
    let classes = py
        .detach(|| module_classes(text, module, path))
        .map_err(|e| PyValueError::new_err(format!("text: {e}")))?;
    serde_json::to_string(&classes).map_err(|e| PyValueError::new_err(e.to_string()))
}

/// `analyze_class` over JSON: `chain` is the class and its bases (most-derived first) as
/// returned by `rewrite_module_classes`, `loss` is `"causal"`, `{"other": NAME}` or
/// `"unknown"`. Returns the class report (with `patched_forward` when patched) as JSON.
/// With `passes` (names of the passes beyond the fused loss), they run too, reading
/// `module`: the text of the module that defines the class.
#[pyfunction]
#[pyo3(signature = (chain, loss, module=None, passes=None))]
fn rewrite_analyze_class(
    py: Python<'_>,
    chain: &str,
    loss: &str,
    module: Option<&str>,
    passes: Option<Vec<String>>,
) -> PyResult<String> {
    py.detach(|| match passes {
        None => analyze_class_json(chain, loss),
        Some(passes) => analyze_class_in_module_json(chain, loss, module, &passes),
    })
    .map_err(PyValueError::new_err)
}

/// The names of the passes beyond the fused loss this build knows.
#[pyfunction]
fn rewrite_pass_names() -> Vec<&'static str> {
    forward_rewrite::passes::names()
}

/// Whether the pass looks at the most-derived class of `chain` at all (the CLI's rule:
/// `candidate.rs`); arguments as for `rewrite_analyze_class`.
#[pyfunction]
#[pyo3(signature = (chain, loss))]
fn rewrite_is_candidate(py: Python<'_>, chain: &str, loss: &str) -> PyResult<bool> {
    py.detach(|| is_candidate_json(chain, loss))
        .map_err(PyValueError::new_err)
}

/// The contract-2 hash of a forward's source text (as `inspect.getsource` returns it).
#[pyfunction]
fn rewrite_forward_sha256(text: &str) -> String {
    hash::forward_sha256(text)
}

/// Whether an MoE experts gate function's source (transformers'
/// `integrations.moe._default_apply_gate`, as `inspect.getsource` returns it) has the form the
/// gated-mlp pass's `experts-gate` sites fall back to: the installer's check before it
/// replaces a class's `_apply_gate`.
#[pyfunction]
fn rewrite_gate_function_ok(text: &str) -> bool {
    forward_rewrite::passes::gated_mlp::experts::gate_function_ok(text)
}

/// Whether one of the functions transformers' `grouped_mm` experts implementation is made of
/// (`grouped_mm_experts_forward`, `_grouped_linear`, `_grouped_mm`; source as
/// `inspect.getsource` returns it) is the one `forward_rewrite.moe_experts` reproduces: None,
/// or what differs. The installer's check before an `experts-forward` site runs.
#[pyfunction]
fn rewrite_experts_function_ok(text: &str) -> Option<String> {
    forward_rewrite::passes::gated_mlp::experts::experts_function_ok(text).err()
}

/// The attnres pass on a base model's forward and its decoder layer's forward (texts as
/// `inspect.getsource` returns them), the layers held under `self.<layers>`: JSON
/// `{"verdict": "patched", "model_forward", "layer_forward", "slots"}` or
/// `{"verdict": "refused" | "failed", "reason", "detail"}`.
#[pyfunction]
#[pyo3(signature = (model_forward, layer_forward, layers = "layers"))]
fn rewrite_attnres_emit(
    py: Python<'_>,
    model_forward: &str,
    layer_forward: &str,
    layers: &str,
) -> String {
    py.detach(|| forward_rewrite::passes::attnres::emit_json(model_forward, layer_forward, layers))
}

/// The attributes `self.<attr>` a base model's forward loops over with `for`, as JSON (a
/// list, or `{"error": ...}`): where the attnres runtime looks for the layer list.
#[pyfunction]
fn rewrite_attnres_loops(py: Python<'_>, model_forward: &str) -> String {
    py.detach(|| forward_rewrite::passes::attnres::loops_json(model_forward))
}

/// The attnres pass's reason codes (`[[code, meaning], ...]`) and the class-name fragments
/// it takes for recurrent mixers, as JSON `{"reasons": [...], "recurrent": [...]}`.
#[pyfunction]
fn rewrite_attnres_info() -> String {
    use forward_rewrite::passes::attnres::{reason::REASONS, resolve::RECURRENT};
    serde_json::json!({"reasons": REASONS, "recurrent": RECURRENT}).to_string()
}
