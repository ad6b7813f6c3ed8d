//! The attnres pass: Block Attention Residuals (arXiv:2603.15031) retrofitted to a decoder.
//!
//! It finds the base model a class builds (`resolve`), the loop over its layer list
//! (`model`: `self.layers`, or the `ModuleList` attribute it loops over, GPT-2's `self.h`) and the residual adds of its decoder layer (`layer`), and emits forwards that
//! carry the AttnRes state as explicit positional tensors between the layers, for
//! `forward_rewrite.attnres.apply` (the runtime's `begin / finish / enter / add / leave`).
//! Anything it does not understand is refused with a code of [`reason::REASONS`].
//!
//! The scan reports per class (`passes.attnres`: verdict, base model and layer classes, adds
//! per layer); the runtime resolves the classes from the model instance and calls
//! [`emit_json`] on their forwards through `_native.rewrite_attnres_emit`.

pub mod layer;
pub mod model;
pub mod reason;
pub mod resolve;
mod splice;
#[cfg(test)]
mod tests;

use ruff_python_ast::{Stmt, StmtFunctionDef};
use serde::Serialize;

use crate::audit::PassReport;
use crate::parse::ParsedSource;
use crate::passes::{Pass, PassInput};
pub use layer::SlotNode;
use reason::Refusal;
use splice::Splicer;

/// The name of the state in emitted code.
pub const STATE: &str = "attnres_sources";

pub static PASS: Pass = Pass {
    name: "attnres",
    summary: "Block Attention Residuals: the decoder-layer loop and each layer's residual adds, rewritten to carry the AttnRes state (opt-in at run time: forward_rewrite.attnres.apply)",
    reasons: reason::REASONS,
    analyze,
};

fn check_super(text: &str, func: &StmtFunctionDef) -> Result<(), Refusal> {
    let mut statements = Vec::new();
    crate::syntax::walk_statements(&func.body, &mut statements);
    for stmt in statements {
        for call in crate::syntax::calls_in_stmt(stmt) {
            if crate::syntax::dotted_name(&call.func).as_deref() == Some("super") {
                let line = text[..Splicer::start(call)].matches('\n').count() + 1;
                return Err(Refusal::new("uses-super", format!("line {line}")));
            }
        }
    }
    Ok(())
}

/// Remove docstring-only decorators (the runtime executes the forward outside its class).
fn drop_doc_decorators(sp: &mut Splicer<'_>, func: &StmtFunctionDef) {
    for dec in &func.decorator_list {
        if crate::syntax::is_docstring_decorator(&dec.expression) {
            let start = Splicer::start(dec);
            let line_start = sp.text[..start].rfind('\n').map_or(0, |i| i + 1);
            sp.replace(line_start, sp.line_end(start), "");
        }
    }
}

/// A forward's text (as `inspect.getsource` gives it, possibly indented), dedented and parsed.
fn parse_function(text: &str) -> Result<ParsedSource, String> {
    let text = crate::hash::dedent(text.replace("\r\n", "\n").trim_start_matches('\n'));
    let parsed = ParsedSource::parse(text).map_err(|e| e.message)?;
    match parsed.suite().first() {
        Some(Stmt::FunctionDef(_)) if parsed.suite().len() == 1 => Ok(parsed),
        _ => Err("the text is not one function definition".to_string()),
    }
}

fn function(parsed: &ParsedSource) -> &StmtFunctionDef {
    match parsed.suite().first() {
        Some(Stmt::FunctionDef(f)) => f,
        _ => unreachable!("checked by parse_function"),
    }
}

/// The pass's result on a base model forward and its layer's forward.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Emitted {
    pub model_forward: String,
    pub layer_forward: String,
    pub slots: Vec<SlotNode>,
}

/// Why emission stopped: a refusal, or a failure of the pass's own checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EmitError {
    Refused(Refusal),
    Failed(String),
}

impl From<Refusal> for EmitError {
    fn from(r: Refusal) -> Self {
        EmitError::Refused(r)
    }
}

/// Rewrite a base model's forward and its decoder layer's forward (texts as `inspect.getsource`
/// returns them); `layers` is the attribute the base model holds its layers under (`"layers"`,
/// GPT-2's `"h"`). The emitted texts re-parse; they are dedented to column 0.
pub fn emit(model_forward: &str, layer_forward: &str, layers: &str) -> Result<Emitted, EmitError> {
    let within = |what: &str| {
        let what = what.to_string();
        move |r: Refusal| {
            EmitError::Refused(Refusal {
                code: r.code,
                detail: format!("{what} forward: {}", r.detail),
            })
        }
    };
    let layer_src = parse_function(layer_forward).map_err(EmitError::Failed)?;
    let layer = layer::emit(&layer_src.text, function(&layer_src)).map_err(within("layer"))?;
    let model_src = parse_function(model_forward).map_err(EmitError::Failed)?;
    let model =
        model::emit(&model_src.text, function(&model_src), layers).map_err(within("model"))?;
    for (what, text) in [("layer", &layer.source), ("model", &model)] {
        ParsedSource::parse(text.as_str()).map_err(|e| {
            EmitError::Failed(format!("the emitted {what} forward does not parse: {e}"))
        })?;
    }
    Ok(Emitted {
        model_forward: model,
        layer_forward: layer.source,
        slots: layer.slots,
    })
}

/// [`emit`] as JSON for the binding: `{"verdict": "patched", "model_forward", "layer_forward",
/// "slots"}` or `{"verdict": "refused" | "failed", "reason", "detail"}`.
pub fn emit_json(model_forward: &str, layer_forward: &str, layers: &str) -> String {
    let value = match emit(model_forward, layer_forward, layers) {
        Ok(e) => serde_json::json!({
            "verdict": "patched",
            "reason": null,
            "detail": "",
            "model_forward": e.model_forward,
            "layer_forward": e.layer_forward,
            "slots": e.slots,
        }),
        Err(EmitError::Refused(r)) => serde_json::json!({
            "verdict": "refused", "reason": r.code, "detail": r.detail,
        }),
        Err(EmitError::Failed(m)) => serde_json::json!({
            "verdict": "failed", "reason": null, "detail": m,
        }),
    };
    value.to_string()
}

/// The attributes `self.<attr>` a base model's forward (text as `inspect.getsource` returns it)
/// loops over with `for`, as a JSON list (the runtime picks the layer list among the
/// instance's `ModuleList`s with it); `{"error": ...}` when the text does not parse.
pub fn loops_json(model_forward: &str) -> String {
    match parse_function(model_forward) {
        Ok(parsed) => serde_json::json!(model::loop_attributes(function(&parsed))).to_string(),
        Err(m) => serde_json::json!({ "error": m }).to_string(),
    }
}

fn analyze(input: &PassInput<'_, '_>) -> PassReport {
    let resolved = match resolve::resolve(input) {
        Ok(r) => r,
        Err(r) => return PassReport::new("refused", Some(r.code), r.detail),
    };
    let mut report = match emit(
        &resolved.model_forward,
        &resolved.layer_forward,
        &resolved.layers,
    ) {
        Ok(e) => {
            let mut report = PassReport::new("patched", None, "");
            report
                .extra
                .insert("adds".into(), layer::describe(&e.slots).into());
            report
        }
        Err(EmitError::Refused(r)) => PassReport::new("refused", Some(r.code), r.detail),
        Err(EmitError::Failed(m)) => PassReport::new("failed", None, m),
    };
    report.extra.insert("base".into(), resolved.base.into());
    report.extra.insert("layer".into(), resolved.layer.into());
    if resolved.layers != "layers" {
        // Only where it is not `self.layers` (GPT-2's `h`).
        report.extra.insert("layers".into(), resolved.layers.into());
    }
    report
}
