//! The CUDA backend of the fused linear + cross-entropy (ARCHITECTURE.md, contract 4).
//!
//! Rust through cudarc (dynamic loading: no CUDA toolkit at build time): cuBLAS for the
//! products, NVRTC-compiled kernels from `kernels/*.cu` for the rest, all on torch's current
//! stream in torch's primary context, every buffer allocated by torch. The Python side is
//! `forward_rewrite/_cuda.py`; it validates the tensors and passes raw addresses here.

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

pub mod attnres;
pub mod compile;
pub mod device;
pub mod error;
pub mod fused;
pub mod fusions;
pub mod gemm;
pub mod libs;
pub mod plan;

use device::Dtype;
use error::catch_panics;
use fused::{Call, Tuning};

/// Adds this backend's functions to `forward_rewrite._native`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cuda_workspace_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_fused_ce, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_scale_in_place, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_compile, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_kernel_cache_dir, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_device_info, m)?)?;
    fusions::register(m)?;
    attnres::register(m)?;
    Ok(())
}

/// (workspace bytes, rows per chunk) for a call: Python allocates that many bytes with torch.
#[pyfunction]
#[pyo3(signature = (*, rows, hidden, vocab, dtype, has_bias, compute_grads, gathered, chunk_budget_bytes, dh_splits=None, weight_grad=true))]
#[allow(clippy::too_many_arguments)]
fn cuda_workspace_bytes(
    rows: u64,
    hidden: u64,
    vocab: u64,
    dtype: &str,
    has_bias: bool,
    compute_grads: bool,
    gathered: bool,
    chunk_budget_bytes: u64,
    dh_splits: Option<u64>,
    weight_grad: bool,
) -> PyResult<(u64, u64)> {
    let shape = plan::Shape {
        rows,
        hidden,
        vocab,
        elem_bytes: Dtype::parse(dtype)?.bytes(),
        has_bias,
        compute_grads,
        weight_grad,
        gathered,
        dh_splits: dh_splits.unwrap_or(fused::DEFAULT_DH_SPLITS).clamp(1, 16),
    };
    let p = shape.plan(chunk_budget_bytes);
    Ok((p.total_bytes, p.chunk_rows))
}

/// Enqueues the fused loss on `stream` (torch's current stream of `device`). Every pointer
/// is a torch tensor's device address; 0 means absent. See `fused::run`.
#[pyfunction]
#[pyo3(signature = (*, device, stream, dtype, rows, hidden, vocab, hidden_ptr, ld_hidden, weight, bias,
    targets, row_map, order, grad_scale, grad_scale_stride, row_loss, dh, dw, db, workspace,
    workspace_bytes, ignore_index, label_smoothing, scale, softcap, compute_grads, chunk_budget_bytes,
    dh_splits=None, slice_bytes=None, block=None, max_cluster=None, pipelined=None, generic=false))]
#[allow(clippy::too_many_arguments)]
fn cuda_fused_ce(
    py: Python<'_>,
    device: i32,
    stream: u64,
    dtype: &str,
    rows: u64,
    hidden: u64,
    vocab: u64,
    hidden_ptr: u64,
    ld_hidden: u64,
    weight: u64,
    bias: u64,
    targets: u64,
    row_map: u64,
    order: u64,
    grad_scale: u64,
    grad_scale_stride: u64,
    row_loss: u64,
    dh: u64,
    dw: u64,
    db: u64,
    workspace: u64,
    workspace_bytes: u64,
    ignore_index: i64,
    label_smoothing: f32,
    scale: f32,
    softcap: f32,
    compute_grads: bool,
    chunk_budget_bytes: u64,
    dh_splits: Option<u64>,
    slice_bytes: Option<u32>,
    block: Option<u32>,
    max_cluster: Option<u32>,
    pipelined: Option<bool>,
    generic: bool,
) -> PyResult<()> {
    let call = Call {
        device,
        stream,
        dtype: Dtype::parse(dtype)?,
        rows,
        hidden,
        vocab,
        h: hidden_ptr,
        ld_h: ld_hidden,
        w: weight,
        bias,
        targets,
        row_map,
        order,
        grad_scale,
        grad_scale_stride,
        row_loss,
        dh,
        dw,
        db,
        workspace,
        workspace_bytes,
        budget: chunk_budget_bytes,
        ignore_index,
        smoothing: label_smoothing,
        scale,
        softcap,
        compute_grads,
        tuning: Tuning {
            dh_splits,
            slice_bytes,
            block,
            max_cluster,
            pipelined,
            generic,
        },
    };
    py.detach(|| catch_panics(|| fused::run(&call)))?;
    Ok(())
}

/// `data` (`count` elements of `dtype`) multiplied in place by the float32 at `factor`, on
/// torch's stream; untouched when the factor is 1. No host sync.
#[pyfunction]
#[pyo3(signature = (*, device, stream, dtype, data, count, factor))]
fn cuda_scale_in_place(
    py: Python<'_>,
    device: i32,
    stream: u64,
    dtype: &str,
    data: u64,
    count: u64,
    factor: u64,
) -> PyResult<()> {
    let dtype = Dtype::parse(dtype)?;
    py.detach(|| {
        catch_panics(|| fused::scale_in_place(device, stream, dtype, data, count, factor))
    })?;
    Ok(())
}

/// Compiles the embedded kernels of `module` ("fused_ce", the default, or a decoder-fusion
/// module: "rms_norm", "rotary", "gated_act"; or "attnres_mix") for `target` ("sm_80", "sm_90", or
/// "compute_90" for PTX) with the NVRTC found in the process; needs no GPU. Returns
/// (image, NVRTC log).
#[pyfunction]
#[pyo3(signature = (target, module = "fused_ce"))]
fn cuda_compile<'py>(
    py: Python<'py>,
    target: &str,
    module: &str,
) -> PyResult<(Bound<'py, PyBytes>, String)> {
    let (source, name) = match module {
        "fused_ce" => (compile::FUSED_CE_SOURCE, compile::FUSED_CE_NAME),
        "attnres_mix" => (attnres::ATTNRES_MIX.source, attnres::ATTNRES_MIX.name),
        other => match fusions::module_named(other) {
            Some(m) => (m.source, m.name),
            None => {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "module: expected 'fused_ce', 'rms_norm', 'rotary', 'gated_act' or 'attnres_mix', got {other:?}"
                )));
            }
        },
    };
    let target = target.to_string();
    let image = py.detach(|| catch_panics(|| compile::compile(source, name, &target)))?;
    Ok((PyBytes::new(py, &image.bytes), image.log))
}

/// Where compiled kernels are cached (None when no directory can be derived).
#[pyfunction]
fn cuda_kernel_cache_dir() -> Option<String> {
    compile::cache_dir().map(|d| d.display().to_string())
}

/// What the backend found on GPU `device` (compiles or loads the kernels on first use).
#[pyfunction]
fn cuda_device_info<'py>(py: Python<'py>, device: i32) -> PyResult<Bound<'py, PyDict>> {
    let (cc, sms, smem, target, nvrtc) = py.detach(|| {
        catch_panics(|| {
            let mut guard = device::lock(device)?;
            let dev = guard.dev();
            Ok((
                dev.compute_capability,
                dev.sm_count,
                dev.max_smem_optin,
                dev.target.clone(),
                compile::nvrtc_version()?,
            ))
        })
    })?;
    let d = PyDict::new(py);
    d.set_item("compute_capability", cc)?;
    d.set_item("sm_count", sms)?;
    d.set_item("max_shared_memory_per_block", smem)?;
    d.set_item("target", target)?;
    d.set_item("nvrtc_version", format!("{}.{}", nvrtc.0, nvrtc.1))?;
    Ok(d)
}
