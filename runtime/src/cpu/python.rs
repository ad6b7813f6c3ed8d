//! `_native.cpu_fused_ce`: the CPU backend on raw tensor pointers.
//!
//! The Python wrapper (`forward_rewrite/_cpu.py`) validates shapes, dtypes, devices and
//! contiguity and allocates the outputs; this checks again what is cheap to check (null,
//! misaligned or overlapping pointers, sizes, options) so that a wrong call is a Python
//! exception, computes with the GIL released, and turns any panic into a RuntimeError.

use half::{bf16, f16};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use std::panic::{AssertUnwindSafe, catch_unwind};

use super::element::{DType, Element};
use super::fused::{GradScale, Gradients, Options, Problem, fused_ce};
use super::regions::{Region, check, slice, slice_mut};

/// Plain numbers only, so the computation can move to a GIL-free closure.
#[derive(Clone, Copy)]
struct Call {
    hidden: usize,
    weight: usize,
    bias: Option<usize>,
    targets: usize,
    n: usize,
    h: usize,
    v: usize,
    dtype: DType,
    options: Options,
    row_loss: usize,
    grads: Option<GradPtrs>,
}

#[derive(Clone, Copy)]
struct GradPtrs {
    grad_scale: usize,
    grad_scale_len: usize,
    dh: usize,
    dw: Option<usize>,
    db: Option<usize>,
}

/// Computes per-row losses (and, when `grad_scale` and `dh` are given, the gradients of
/// `sum_i grad_scale[i] * row_loss[i]`; the weight's only when `dw` is given too) for
/// `z = softcap(scale * (hidden @ weight.T + bias))`.
///
/// Pointers are `Tensor.data_ptr()` values of contiguous CPU tensors: `hidden` (n, h),
/// `weight` (v, h), `bias` (v,) of dtype `dtype` ("float32", "float16" or "bfloat16");
/// `targets` (n,) int64; outputs `row_loss` (n,) float32, `dh` (n, h), `dw` (v, h),
/// `db` (v,) of dtype `dtype`; `grad_scale` float32 with `grad_scale_len` 1 or n.
#[pyfunction]
#[pyo3(signature = (
    *, hidden, weight, bias, targets, n, h, v, dtype, ignore_index, label_smoothing,
    scale, softcap, row_loss, grad_scale, grad_scale_len, dh, dw, db, chunk_budget_bytes
))]
#[allow(clippy::too_many_arguments)]
pub fn cpu_fused_ce(
    py: Python<'_>,
    hidden: usize,
    weight: usize,
    bias: Option<usize>,
    targets: usize,
    n: usize,
    h: usize,
    v: usize,
    dtype: &str,
    ignore_index: i64,
    label_smoothing: f64,
    scale: f64,
    softcap: Option<f64>,
    row_loss: usize,
    grad_scale: Option<usize>,
    grad_scale_len: usize,
    dh: Option<usize>,
    dw: Option<usize>,
    db: Option<usize>,
    chunk_budget_bytes: usize,
) -> PyResult<()> {
    let dtype = DType::parse(dtype).ok_or_else(|| {
        PyValueError::new_err(format!(
            "dtype: expected 'float32', 'float16' or 'bfloat16', got {dtype:?}"
        ))
    })?;
    let grads = match (grad_scale, dh) {
        (Some(grad_scale), Some(dh)) => {
            if grad_scale_len != 1 && grad_scale_len != n {
                return Err(PyValueError::new_err(format!(
                    "grad_scale: expected 1 or n = {n} elements, got {grad_scale_len}"
                )));
            }
            Some(GradPtrs {
                grad_scale,
                grad_scale_len,
                dh,
                dw,
                db,
            })
        }
        (None, None) if dw.is_none() && db.is_none() => None,
        _ => {
            return Err(PyValueError::new_err(
                "grad_scale, dh: give both (gradients; dw optional) or none of grad_scale, \
                 dh, dw, db (loss only)",
            ));
        }
    };
    let call = Call {
        hidden,
        weight,
        bias,
        targets,
        n,
        h,
        v,
        dtype,
        options: Options {
            ignore_index,
            label_smoothing: label_smoothing as f32,
            scale: scale as f32,
            softcap: softcap.map(|c| c as f32),
            chunk_budget_bytes,
        },
        row_loss,
        grads,
    };
    check_regions(&call)?;
    let outcome = py.detach(move || {
        catch_unwind(AssertUnwindSafe(|| match call.dtype {
            DType::F32 => run::<f32>(&call),
            DType::F16 => run::<f16>(&call),
            DType::BF16 => run::<bf16>(&call),
        }))
    });
    match outcome {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(PyValueError::new_err(e.to_string())),
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            Err(PyRuntimeError::new_err(format!(
                "cpu_fused_ce: internal error: {what}"
            )))
        }
    }
}

/// Null, misaligned, overflowing and overlapping pointers are errors (an output may not
/// overlap anything else).
fn check_regions(c: &Call) -> PyResult<()> {
    let err = |msg: String| Err(PyValueError::new_err(msg));
    let el = c.dtype.size();
    let (Some(nh), Some(vh)) = (c.n.checked_mul(c.h), c.v.checked_mul(c.h)) else {
        return err(format!("hidden: shape ({}, {}) overflows", c.n, c.h));
    };
    let mut regions = vec![
        Region::new("hidden", c.hidden, nh, el, false),
        Region::new("weight", c.weight, vh, el, false),
        Region::new("targets", c.targets, c.n, 8, false),
        Region::new("row_loss", c.row_loss, c.n, 4, true),
    ];
    if let Some(b) = c.bias {
        regions.push(Region::new("bias", b, c.v, el, false));
    }
    if let Some(g) = c.grads {
        regions.push(Region::new(
            "grad_scale",
            g.grad_scale,
            g.grad_scale_len,
            4,
            false,
        ));
        regions.push(Region::new("dh", g.dh, nh, el, true));
        if let Some(dw) = g.dw {
            regions.push(Region::new("dw", dw, vh, el, true));
        }
        match (g.db, c.bias) {
            (Some(db), Some(_)) => regions.push(Region::new("db", db, c.v, el, true)),
            (None, None) => {}
            _ => return err("db: must be given exactly when bias is (with gradients)".into()),
        }
    }
    check(&regions)
}

fn run<T: Element>(c: &Call) -> Result<(), super::fused::FusedCeError> {
    // SAFETY: see `slice`: regions were checked (non-null, aligned, outputs disjoint) and
    // the Python caller keeps the tensors alive and unchanged for the call.
    unsafe {
        let problem = Problem {
            hidden: slice::<T>(c.hidden, c.n * c.h),
            weight: slice::<T>(c.weight, c.v * c.h),
            bias: c.bias.map(|b| slice::<T>(b, c.v)),
            targets: slice::<i64>(c.targets, c.n),
            n: c.n,
            h: c.h,
            v: c.v,
        };
        let row_loss = slice_mut::<f32>(c.row_loss, c.n);
        let grads = c.grads.map(|g| Gradients {
            grad_scale: if g.grad_scale_len == c.n && c.n != 1 {
                GradScale::PerRow(slice::<f32>(g.grad_scale, c.n))
            } else {
                GradScale::Uniform(slice::<f32>(g.grad_scale, 1)[0])
            },
            dh: slice_mut::<T>(g.dh, c.n * c.h),
            dw: g.dw.map(|dw| slice_mut::<T>(dw, c.v * c.h)),
            db: g.db.map(|db| slice_mut::<T>(db, c.v)),
        });
        fused_ce(&problem, &c.options, row_loss, grads)
    }
}
