//! `_native.cpu_rms_norm_forward`, `cpu_rms_norm_backward`, `cpu_gated_rms_norm_forward`,
//! `cpu_gated_rms_norm_backward`, `cpu_rms_scale_first_forward`, `cpu_rms_scale_first_backward`,
//! `cpu_rotary`, `cpu_gated_act` and `cpu_gated_act_backward`:
//! the CPU twins on raw tensor pointers.
//!
//! The Python side (`forward_rewrite/_fusions_cpu.py`) checks shapes, dtypes, devices and
//! layouts and allocates the outputs; this checks again what is cheap to check (null,
//! misaligned, self-overlapping or overlapping pointers, dtype combinations), computes with
//! the GIL released, and turns a panic into a RuntimeError.

use half::{bf16, f16};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use std::panic::{AssertUnwindSafe, catch_unwind};

use super::gated::{self, Clamp, Gated};
use super::gated_norm::{self, GatedRmsNorm};
use super::rms_norm::{self, Residual, RmsNorm};
use super::rotary::{self, Rotary, View, ViewMut, extent, overlaps};
use super::scale_first::{self, ScaleFirst};
use super::{Activation, FDtype, GATE_ACTIVATIONS, PRODUCT_ACTIVATIONS, Real, Storage};
use crate::cpu::regions::{Region, check as check_regions, slice, slice_mut};

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cpu_rms_norm_forward, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_rms_norm_backward, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_gated_rms_norm_forward, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_gated_rms_norm_backward, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_rms_scale_first_forward, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_rms_scale_first_backward, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_rotary, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_gated_act, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_gated_act_backward, m)?)?;
    Ok(())
}

fn value_error<T>(msg: String) -> PyResult<T> {
    Err(PyValueError::new_err(msg))
}

fn dtype(name: &str, value: &str) -> PyResult<FDtype> {
    FDtype::parse(value).ok_or_else(|| {
        PyValueError::new_err(format!(
            "{name}: expected 'bfloat16', 'float16', 'float32' or 'float64', got {value:?}"
        ))
    })
}

/// The region of `elems` elements of `dt` at `start`.
fn region(name: &'static str, start: usize, elems: usize, dt: FDtype, output: bool) -> Region {
    Region::new(name, start, elems, dt.size(), output)
}

/// Runs `f` without the GIL; a panic becomes a RuntimeError.
fn run(py: Python<'_>, what: &str, f: impl FnOnce() + Send) -> PyResult<()> {
    match py.detach(move || catch_unwind(AssertUnwindSafe(f))) {
        Ok(()) => Ok(()),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            Err(PyRuntimeError::new_err(format!(
                "{what}: internal error: {msg}"
            )))
        }
    }
}

// ---- RMSNorm -------------------------------------------------------------------------------

/// Plain numbers only, so the computation can move to a GIL-free closure.
#[derive(Clone, Copy)]
struct RmsCall {
    p: RmsNorm,
    x: usize,
    w: usize,
    y: usize,
    rstd: usize,
    dy: usize,
    dx: usize,
    dw: Option<usize>,
    /// The forward's residual add: (residual, sum_out).
    add: Option<(usize, usize)>,
    /// The backward's gradient added to dx.
    dres: Option<usize>,
}

/// The (x, weight, output) dtype combinations the kernels are built for (weight: x's dtype
/// or float32; output: x's dtype or float32), and float64 throughout on the CPU.
macro_rules! rms_dispatch {
    ($x:expr, $w:expr, $o:expr, $f:ident, $call:expr) => {{
        use FDtype::*;
        match ($x, $w, $o) {
            (Bf16, Bf16, Bf16) => $f::<f32, bf16, bf16, bf16>($call),
            (F16, F16, F16) => $f::<f32, f16, f16, f16>($call),
            (F32, F32, F32) => $f::<f32, f32, f32, f32>($call),
            (Bf16, F32, F32) => $f::<f32, bf16, f32, f32>($call),
            (Bf16, F32, Bf16) => $f::<f32, bf16, f32, bf16>($call),
            (F16, F32, F32) => $f::<f32, f16, f32, f32>($call),
            (F16, F32, F16) => $f::<f32, f16, f32, f16>($call),
            (F64, F64, F64) => $f::<f64, f64, f64, f64>($call),
            (x, w, o) => {
                return value_error(format!(
                    "weight: dtypes (x {x:?}, weight {w:?}, output {o:?}) are not a supported \
                     combination (weight and output: x's dtype or float32; float64 only alone)"
                ));
            }
        }
    }};
}

fn rms_forward_typed<A: Real, X: Storage<A>, W: Storage<A>, O: Storage<A>>(c: RmsCall) {
    let n = c.p.rows * c.p.hidden;
    // SAFETY: regions checked by the caller (non-null, aligned, outputs disjoint).
    unsafe {
        rms_norm::forward_add::<A, X, W, O>(
            &c.p,
            slice::<X>(c.x, n),
            c.add.map(|(residual, sum)| Residual {
                residual: slice::<X>(residual, n),
                sum: slice_mut::<X>(sum, n),
            }),
            slice::<W>(c.w, c.p.hidden),
            slice_mut::<O>(c.y, n),
            slice_mut::<A>(c.rstd, c.p.rows),
        )
    }
}

fn rms_backward_typed<A: Real, X: Storage<A>, W: Storage<A>, O: Storage<A>>(c: RmsCall) {
    let n = c.p.rows * c.p.hidden;
    // SAFETY: as above.
    unsafe {
        rms_norm::backward_dres::<A, X, W, O>(
            &c.p,
            slice::<O>(c.dy, n),
            slice::<X>(c.x, n),
            slice::<W>(c.w, c.p.hidden),
            slice::<A>(c.rstd, c.p.rows),
            slice_mut::<X>(c.dx, n),
            c.dw.map(|p| slice_mut::<W>(p, c.p.hidden)),
            c.dres.map(|p| slice::<X>(p, n)),
        )
    }
}

fn rstd_dtype(x: FDtype) -> FDtype {
    if x == FDtype::F64 {
        FDtype::F64
    } else {
        FDtype::F32
    }
}

fn rms_problem(
    rows: usize,
    hidden: usize,
    eps: f64,
    offset: f64,
    cast_before: bool,
) -> PyResult<RmsNorm> {
    if hidden == 0 {
        return value_error("x: the normalised dimension is empty".into());
    }
    if rows.checked_mul(hidden).is_none() {
        return value_error(format!("x: shape ({rows}, {hidden}) overflows"));
    }
    if !(eps.is_finite() && eps >= 0.0) {
        return value_error(format!("eps: expected a finite number >= 0, got {eps}"));
    }
    if !offset.is_finite() {
        return value_error(format!("offset: expected a finite number, got {offset}"));
    }
    Ok(RmsNorm {
        rows,
        hidden,
        eps,
        offset,
        cast_before,
    })
}

/// RMSNorm forward: `y` (rows, hidden) of `y_dtype` and `rstd` (rows,) float32 (float64
/// for float64 inputs) from contiguous `x` (rows, hidden) and `weight` (hidden,). With
/// `residual` and `sum_out` (both or neither; x's dtype and shape) the residual add runs in
/// front: `sum_out` receives `round_X(x + residual)`, which is normalised in place of x.
#[pyfunction]
#[pyo3(signature = (*, x, weight, y, rstd, rows, hidden, x_dtype, w_dtype, y_dtype, eps, offset, cast_before,
    residual=None, sum_out=None))]
#[allow(clippy::too_many_arguments)]
fn cpu_rms_norm_forward(
    py: Python<'_>,
    x: usize,
    weight: usize,
    y: usize,
    rstd: usize,
    rows: usize,
    hidden: usize,
    x_dtype: &str,
    w_dtype: &str,
    y_dtype: &str,
    eps: f64,
    offset: f64,
    cast_before: bool,
    residual: Option<usize>,
    sum_out: Option<usize>,
) -> PyResult<()> {
    let (xd, wd, yd) = (
        dtype("x", x_dtype)?,
        dtype("weight", w_dtype)?,
        dtype("y", y_dtype)?,
    );
    let p = rms_problem(rows, hidden, eps, offset, cast_before)?;
    let n = rows * hidden;
    let add = match (residual, sum_out) {
        (None, None) => None,
        (Some(r), Some(s)) => Some((r, s)),
        _ => {
            return value_error(
                "residual, sum_out: both or neither must be given (the sum is written to sum_out)"
                    .into(),
            );
        }
    };
    let mut regions = vec![
        region("x", x, n, xd, false),
        region("weight", weight, hidden, wd, false),
        region("y", y, n, yd, true),
        region("rstd", rstd, rows, rstd_dtype(xd), true),
    ];
    if let Some((r, s)) = add {
        regions.push(region("residual", r, n, xd, false));
        regions.push(region("sum_out", s, n, xd, true));
    }
    check_regions(&regions)?;
    let call = RmsCall {
        p,
        x,
        w: weight,
        y,
        rstd,
        dy: 0,
        dx: 0,
        dw: None,
        add,
        dres: None,
    };
    let job = rms_dispatch!(xd, wd, yd, rms_forward_job, call);
    run(py, "cpu_rms_norm_forward", job)
}

fn rms_forward_job<A: Real, X: Storage<A>, W: Storage<A>, O: Storage<A>>(
    c: RmsCall,
) -> Box<dyn FnOnce() + Send> {
    Box::new(move || rms_forward_typed::<A, X, W, O>(c))
}

fn rms_backward_job<A: Real, X: Storage<A>, W: Storage<A>, O: Storage<A>>(
    c: RmsCall,
) -> Box<dyn FnOnce() + Send> {
    Box::new(move || rms_backward_typed::<A, X, W, O>(c))
}

/// RMSNorm backward: `dx` (x's dtype) and, when given, `dw` (weight's dtype) from `dy`
/// (y_dtype), `x`, `weight` and the forward's `rstd`; `dres` (x's dtype and shape), when
/// given, is added to dx before its rounding.
#[pyfunction]
#[pyo3(signature = (*, dy, x, weight, rstd, dx, dw, rows, hidden, x_dtype, w_dtype, y_dtype, offset, cast_before,
    dres=None))]
#[allow(clippy::too_many_arguments)]
fn cpu_rms_norm_backward(
    py: Python<'_>,
    dy: usize,
    x: usize,
    weight: usize,
    rstd: usize,
    dx: usize,
    dw: Option<usize>,
    rows: usize,
    hidden: usize,
    x_dtype: &str,
    w_dtype: &str,
    y_dtype: &str,
    offset: f64,
    cast_before: bool,
    dres: Option<usize>,
) -> PyResult<()> {
    let (xd, wd, yd) = (
        dtype("x", x_dtype)?,
        dtype("weight", w_dtype)?,
        dtype("dy", y_dtype)?,
    );
    let p = rms_problem(rows, hidden, 0.0, offset, cast_before)?;
    let n = rows * hidden;
    let mut regions = vec![
        region("dy", dy, n, yd, false),
        region("x", x, n, xd, false),
        region("weight", weight, hidden, wd, false),
        region("rstd", rstd, rows, rstd_dtype(xd), false),
        region("dx", dx, n, xd, true),
    ];
    if let Some(dw) = dw {
        regions.push(region("dw", dw, hidden, wd, true));
    }
    if let Some(dres) = dres {
        regions.push(region("dres", dres, n, xd, false));
    }
    check_regions(&regions)?;
    let call = RmsCall {
        p,
        x,
        w: weight,
        y: 0,
        rstd,
        dy,
        dx,
        dw,
        add: None,
        dres,
    };
    let job = rms_dispatch!(xd, wd, yd, rms_backward_job, call);
    run(py, "cpu_rms_norm_backward", job)
}

// ---- unweighted RMSNorm, scale rounded first ------------------------------------------------

/// Plain numbers only, as [`RmsCall`]; `a` is x (forward) or dy (backward), `b` y or x.
#[derive(Clone, Copy)]
struct ScaleFirstCall {
    p: ScaleFirst,
    a: usize,
    b: usize,
    rstd: usize,
    dx: usize,
}

macro_rules! scale_first_dispatch {
    ($x:expr, $f:ident, $call:expr) => {{
        use FDtype::*;
        match $x {
            Bf16 => $f::<f32, bf16>($call),
            F16 => $f::<f32, f16>($call),
            F32 => $f::<f32, f32>($call),
            F64 => $f::<f64, f64>($call),
        }
    }};
}

fn scale_first_forward_job<A: Real, X: Storage<A>>(c: ScaleFirstCall) -> Box<dyn FnOnce() + Send> {
    Box::new(move || {
        let n = c.p.rows * c.p.hidden;
        // SAFETY: regions checked by the caller (non-null, aligned, outputs disjoint).
        unsafe {
            scale_first::forward::<A, X>(
                &c.p,
                slice::<X>(c.a, n),
                slice_mut::<X>(c.b, n),
                slice_mut::<A>(c.rstd, c.p.rows),
            )
        }
    })
}

fn scale_first_backward_job<A: Real, X: Storage<A>>(c: ScaleFirstCall) -> Box<dyn FnOnce() + Send> {
    Box::new(move || {
        let n = c.p.rows * c.p.hidden;
        // SAFETY: as above.
        unsafe {
            scale_first::backward::<A, X>(
                &c.p,
                slice::<X>(c.a, n),
                slice::<X>(c.b, n),
                slice::<A>(c.rstd, c.p.rows),
                slice_mut::<X>(c.dx, n),
            )
        }
    })
}

fn scale_first_problem(rows: usize, hidden: usize, eps: f64) -> PyResult<ScaleFirst> {
    // The same checks as the weighted norm's (no offset here).
    let p = rms_problem(rows, hidden, eps, 0.0, false)?;
    Ok(ScaleFirst {
        rows,
        hidden,
        eps: p.eps,
    })
}

/// Unweighted RMSNorm with the scale rounded first (DeepSeek-V4's `UnweightedRMSNorm`):
/// `y` (rows, hidden, x's dtype) and `rstd` (rows,) float32 (float64 for float64 x) from
/// contiguous `x` (rows, hidden).
#[pyfunction]
#[pyo3(signature = (*, x, y, rstd, rows, hidden, x_dtype, eps))]
#[allow(clippy::too_many_arguments)]
fn cpu_rms_scale_first_forward(
    py: Python<'_>,
    x: usize,
    y: usize,
    rstd: usize,
    rows: usize,
    hidden: usize,
    x_dtype: &str,
    eps: f64,
) -> PyResult<()> {
    let xd = dtype("x", x_dtype)?;
    let p = scale_first_problem(rows, hidden, eps)?;
    let n = rows * hidden;
    check_regions(&[
        region("x", x, n, xd, false),
        region("y", y, n, xd, true),
        region("rstd", rstd, rows, rstd_dtype(xd), true),
    ])?;
    let call = ScaleFirstCall {
        p,
        a: x,
        b: y,
        rstd,
        dx: 0,
    };
    let job = scale_first_dispatch!(xd, scale_first_forward_job, call);
    run(py, "cpu_rms_scale_first_forward", job)
}

/// Its backward: `dx` (x's dtype) from `dy` (x's dtype), `x` and the forward's `rstd`.
#[pyfunction]
#[pyo3(signature = (*, dy, x, rstd, dx, rows, hidden, x_dtype))]
#[allow(clippy::too_many_arguments)]
fn cpu_rms_scale_first_backward(
    py: Python<'_>,
    dy: usize,
    x: usize,
    rstd: usize,
    dx: usize,
    rows: usize,
    hidden: usize,
    x_dtype: &str,
) -> PyResult<()> {
    let xd = dtype("x", x_dtype)?;
    let p = scale_first_problem(rows, hidden, 0.0)?;
    let n = rows * hidden;
    check_regions(&[
        region("dy", dy, n, xd, false),
        region("x", x, n, xd, false),
        region("rstd", rstd, rows, rstd_dtype(xd), false),
        region("dx", dx, n, xd, true),
    ])?;
    let call = ScaleFirstCall {
        p,
        a: dy,
        b: x,
        rstd,
        dx,
    };
    let job = scale_first_dispatch!(xd, scale_first_backward_job, call);
    run(py, "cpu_rms_scale_first_backward", job)
}

// ---- gated RMSNorm -------------------------------------------------------------------------

/// Plain numbers only, as [`RmsCall`].
#[derive(Clone, Copy)]
struct GatedRmsCall {
    p: GatedRmsNorm,
    x: usize,
    gate: usize,
    w: usize,
    y: usize,
    rstd: usize,
    dy: usize,
    dx: usize,
    dgate: usize,
    dw: Option<usize>,
}

/// The (x, weight) dtype combinations: weight of x's dtype or float32 (what the stock
/// `self.weight * h.to(input_dtype)` promotes to, so v is of the weight's dtype), float64
/// only alone. y, dy, dx and dgate are of x's dtype: the gated forms end in
/// `.to(input_dtype)`.
macro_rules! gated_rms_dispatch {
    ($x:expr, $w:expr, $f:ident, $call:expr) => {{
        use FDtype::*;
        match ($x, $w) {
            (Bf16, Bf16) => $f::<f32, bf16, bf16>($call),
            (F16, F16) => $f::<f32, f16, f16>($call),
            (F32, F32) => $f::<f32, f32, f32>($call),
            (Bf16, F32) => $f::<f32, bf16, f32>($call),
            (F16, F32) => $f::<f32, f16, f32>($call),
            (F64, F64) => $f::<f64, f64, f64>($call),
            (x, w) => {
                return value_error(format!(
                    "weight: dtypes (x {x:?}, weight {w:?}) are not a supported combination \
                     (weight: x's dtype or float32; float64 only with float64)"
                ));
            }
        }
    }};
}

fn gated_rms_forward_job<A: Real, X: Storage<A>, W: Storage<A>>(
    c: GatedRmsCall,
) -> Box<dyn FnOnce() + Send> {
    Box::new(move || {
        let n = c.p.rows * c.p.hidden;
        // SAFETY: regions checked by the caller (non-null, aligned, outputs disjoint).
        unsafe {
            gated_norm::forward::<A, X, W>(
                &c.p,
                slice::<X>(c.x, n),
                slice::<X>(c.gate, n),
                slice::<W>(c.w, c.p.groups * c.p.hidden),
                slice_mut::<X>(c.y, n),
                slice_mut::<A>(c.rstd, c.p.rows),
            )
        }
    })
}

fn gated_rms_backward_job<A: Real, X: Storage<A>, W: Storage<A>>(
    c: GatedRmsCall,
) -> Box<dyn FnOnce() + Send> {
    Box::new(move || {
        let n = c.p.rows * c.p.hidden;
        // SAFETY: as above.
        unsafe {
            gated_norm::backward::<A, X, W>(
                &c.p,
                slice::<X>(c.dy, n),
                slice::<X>(c.x, n),
                slice::<X>(c.gate, n),
                slice::<W>(c.w, c.p.groups * c.p.hidden),
                slice::<A>(c.rstd, c.p.rows),
                slice_mut::<X>(c.dx, n),
                slice_mut::<X>(c.dgate, n),
                c.dw.map(|p| slice_mut::<W>(p, c.p.groups * c.p.hidden)),
            )
        }
    })
}

/// The gate's activations: silu (Qwen3-Next) and sigmoid (Kimi).
fn gated_norm_activation(name: &str) -> PyResult<Activation> {
    Activation::parse_one_of(name, GATE_ACTIVATIONS).or_else(value_error)
}

#[allow(clippy::too_many_arguments)]
fn gated_rms_problem(
    rows: usize,
    hidden: usize,
    eps: f64,
    cast_before: bool,
    activation: &str,
    gate_first: bool,
    groups: usize,
) -> PyResult<GatedRmsNorm> {
    let act = gated_norm_activation(activation)?;
    let p = rms_problem(rows, hidden, eps, 0.0, cast_before)?;
    if groups == 0 || !rows.is_multiple_of(groups) {
        return value_error(format!(
            "groups: {groups} does not divide the {rows} norm rows"
        ));
    }
    Ok(GatedRmsNorm {
        rows,
        hidden,
        eps: p.eps,
        cast_before,
        act,
        gate_first,
        groups,
    })
}

/// Gated RMSNorm forward: `y` (rows, hidden) of x's dtype and `rstd` (rows,) float32
/// (float64 for float64 inputs) from contiguous `x` and `gate` (rows, hidden, x's dtype)
/// and `weight` (groups * hidden,): rows are norm rows (groups of a row of x), row i
/// weighted by the weight's segment i % groups.
#[pyfunction]
#[pyo3(signature = (*, x, gate, weight, y, rstd, rows, hidden, x_dtype, w_dtype, eps, cast_before,
    activation, gate_first=false, groups=1))]
#[allow(clippy::too_many_arguments)]
fn cpu_gated_rms_norm_forward(
    py: Python<'_>,
    x: usize,
    gate: usize,
    weight: usize,
    y: usize,
    rstd: usize,
    rows: usize,
    hidden: usize,
    x_dtype: &str,
    w_dtype: &str,
    eps: f64,
    cast_before: bool,
    activation: &str,
    gate_first: bool,
    groups: usize,
) -> PyResult<()> {
    let (xd, wd) = (dtype("x", x_dtype)?, dtype("weight", w_dtype)?);
    let p = gated_rms_problem(
        rows,
        hidden,
        eps,
        cast_before,
        activation,
        gate_first,
        groups,
    )?;
    let n = rows * hidden;
    check_regions(&[
        region("x", x, n, xd, false),
        region("gate", gate, n, xd, false),
        region("weight", weight, groups * hidden, wd, false),
        region("y", y, n, xd, true),
        region("rstd", rstd, rows, rstd_dtype(xd), true),
    ])?;
    let call = GatedRmsCall {
        p,
        x,
        gate,
        w: weight,
        y,
        rstd,
        dy: 0,
        dx: 0,
        dgate: 0,
        dw: None,
    };
    let job = gated_rms_dispatch!(xd, wd, gated_rms_forward_job, call);
    run(py, "cpu_gated_rms_norm_forward", job)
}

/// Gated RMSNorm backward: `dx` and `dgate` (x's dtype) and, when given, `dw` (weight's
/// dtype) from `dy` (x's dtype), `x`, `gate`, `weight` and the forward's `rstd`.
#[pyfunction]
#[pyo3(signature = (*, dy, x, gate, weight, rstd, dx, dgate, dw, rows, hidden, x_dtype, w_dtype,
    cast_before, activation, gate_first=false, groups=1))]
#[allow(clippy::too_many_arguments)]
fn cpu_gated_rms_norm_backward(
    py: Python<'_>,
    dy: usize,
    x: usize,
    gate: usize,
    weight: usize,
    rstd: usize,
    dx: usize,
    dgate: usize,
    dw: Option<usize>,
    rows: usize,
    hidden: usize,
    x_dtype: &str,
    w_dtype: &str,
    cast_before: bool,
    activation: &str,
    gate_first: bool,
    groups: usize,
) -> PyResult<()> {
    let (xd, wd) = (dtype("x", x_dtype)?, dtype("weight", w_dtype)?);
    let p = gated_rms_problem(
        rows,
        hidden,
        0.0,
        cast_before,
        activation,
        gate_first,
        groups,
    )?;
    let n = rows * hidden;
    let mut regions = vec![
        region("dy", dy, n, xd, false),
        region("x", x, n, xd, false),
        region("gate", gate, n, xd, false),
        region("weight", weight, groups * hidden, wd, false),
        region("rstd", rstd, rows, rstd_dtype(xd), false),
        region("dx", dx, n, xd, true),
        region("dgate", dgate, n, xd, true),
    ];
    if let Some(dw) = dw {
        regions.push(region("dw", dw, groups * hidden, wd, true));
    }
    check_regions(&regions)?;
    let call = GatedRmsCall {
        p,
        x,
        gate,
        w: weight,
        y: 0,
        rstd,
        dy,
        dx,
        dgate,
        dw,
    };
    let job = gated_rms_dispatch!(xd, wd, gated_rms_backward_job, call);
    run(py, "cpu_gated_rms_norm_backward", job)
}

// ---- rotary --------------------------------------------------------------------------------

#[derive(Clone, Copy)]
struct RopeCall {
    r: Rotary,
    q: (usize, [usize; 3]),
    k: (usize, [usize; 3]),
    cos: (usize, [usize; 2]),
    sin: (usize, [usize; 2]),
    q_out: (usize, [usize; 3]),
    k_out: (usize, [usize; 3]),
}

/// (input, cos/sin, output) dtypes: each of them x's 16-bit dtype or float32, or float64
/// throughout.
macro_rules! rope_dispatch {
    ($i:expr, $c:expr, $o:expr, $f:ident, $call:expr) => {{
        use FDtype::*;
        match ($i, $c, $o) {
            (F32, F32, F32) => $f::<f32, f32, f32, f32>($call),
            (F64, F64, F64) => $f::<f64, f64, f64, f64>($call),
            (Bf16, Bf16, Bf16) => $f::<f32, bf16, bf16, bf16>($call),
            (Bf16, Bf16, F32) => $f::<f32, bf16, bf16, f32>($call),
            (Bf16, F32, Bf16) => $f::<f32, bf16, f32, bf16>($call),
            (Bf16, F32, F32) => $f::<f32, bf16, f32, f32>($call),
            (F32, Bf16, Bf16) => $f::<f32, f32, bf16, bf16>($call),
            (F32, Bf16, F32) => $f::<f32, f32, bf16, f32>($call),
            (F32, F32, Bf16) => $f::<f32, f32, f32, bf16>($call),
            (F16, F16, F16) => $f::<f32, f16, f16, f16>($call),
            (F16, F16, F32) => $f::<f32, f16, f16, f32>($call),
            (F16, F32, F16) => $f::<f32, f16, f32, f16>($call),
            (F16, F32, F32) => $f::<f32, f16, f32, f32>($call),
            (F32, F16, F16) => $f::<f32, f32, f16, f16>($call),
            (F32, F16, F32) => $f::<f32, f32, f16, f32>($call),
            (F32, F32, F16) => $f::<f32, f32, f32, f16>($call),
            (i, c, o) => {
                return value_error(format!(
                    "cos: dtypes (input {i:?}, cos/sin {c:?}, output {o:?}) are not a supported \
                     combination (bfloat16 and float16 do not mix; float64 only alone)"
                ));
            }
        }
    }};
}

fn rope_job<A: Real, I: Storage<A>, C: Storage<A>, O: Storage<A>>(
    c: RopeCall,
) -> Box<dyn FnOnce() + Send> {
    Box::new(move || {
        let r = c.r;
        let qs = [r.p0, r.p1, r.q_heads, r.head_dim];
        let ks = [r.p0, r.p1, r.k_heads, r.head_dim];
        let cs = [r.p0, r.p1, r.rot_dim];
        let e4 = |s: [usize; 3], sizes: &[usize; 4]| extent(sizes, &[s[0], s[1], s[2], 1]);
        let e3 = |s: [usize; 2]| extent(&cs, &[s[0], s[1], 1]);
        // SAFETY: regions checked by the caller: each covers its layout's extent, inputs are
        // read only, outputs overlap nothing (and, checked in rotary::apply, not themselves).
        unsafe {
            rotary::apply::<A, I, C, O>(
                &r,
                View {
                    data: slice::<I>(c.q.0, e4(c.q.1, &qs)),
                    strides: c.q.1,
                },
                View {
                    data: slice::<I>(c.k.0, e4(c.k.1, &ks)),
                    strides: c.k.1,
                },
                View {
                    data: slice::<C>(c.cos.0, e3(c.cos.1)),
                    strides: [c.cos.1[0], c.cos.1[1], 0],
                },
                View {
                    data: slice::<C>(c.sin.0, e3(c.sin.1)),
                    strides: [c.sin.1[0], c.sin.1[1], 0],
                },
                ViewMut {
                    data: slice_mut::<O>(c.q_out.0, e4(c.q_out.1, &qs)),
                    strides: c.q_out.1,
                },
                ViewMut {
                    data: slice_mut::<O>(c.k_out.0, e4(c.k_out.1, &ks)),
                    strides: c.k_out.1,
                },
            )
        }
    })
}

/// Rotary embedding of q and k (or its transpose, the backward) into `q_out` and `k_out`.
/// Layouts as in `rotary::apply`: element strides over (P0, P1, head) for the four
/// tensors, over (P0, P1) for cos and sin (0 where broadcast).
#[pyfunction]
#[pyo3(signature = (*, q, k, cos, sin, q_out, k_out, q_strides, k_strides, cos_strides, sin_strides,
    q_out_strides, k_out_strides, p0, p1, q_heads, k_heads, head_dim, rot_dim, interleaved, transpose,
    in_dtype, cs_dtype, out_dtype))]
#[allow(clippy::too_many_arguments)]
fn cpu_rotary(
    py: Python<'_>,
    q: usize,
    k: usize,
    cos: usize,
    sin: usize,
    q_out: usize,
    k_out: usize,
    q_strides: [usize; 3],
    k_strides: [usize; 3],
    cos_strides: [usize; 2],
    sin_strides: [usize; 2],
    q_out_strides: [usize; 3],
    k_out_strides: [usize; 3],
    p0: usize,
    p1: usize,
    q_heads: usize,
    k_heads: usize,
    head_dim: usize,
    rot_dim: usize,
    interleaved: bool,
    transpose: bool,
    in_dtype: &str,
    cs_dtype: &str,
    out_dtype: &str,
) -> PyResult<()> {
    let (id, cd, od) = (
        dtype("q", in_dtype)?,
        dtype("cos", cs_dtype)?,
        dtype("q_out", out_dtype)?,
    );
    if !rot_dim.is_multiple_of(2) || rot_dim > head_dim {
        return value_error(format!(
            "rotary_dim: expected an even number at most head_dim {head_dim}, got {rot_dim}"
        ));
    }
    let qs = [p0, p1, q_heads, head_dim];
    let ks = [p0, p1, k_heads, head_dim];
    let cs = [p0, p1, rot_dim];
    let four = |s: [usize; 3]| [s[0], s[1], s[2], 1];
    let three = |s: [usize; 2]| [s[0], s[1], 1];
    for (name, sizes, strides) in [
        ("q_out", qs, four(q_out_strides)),
        ("k_out", ks, four(k_out_strides)),
    ] {
        if overlaps(&sizes, &strides) {
            return value_error(format!("{name}: its strides make elements overlap"));
        }
    }
    check_regions(&[
        region("q", q, extent(&qs, &four(q_strides)), id, false),
        region("k", k, extent(&ks, &four(k_strides)), id, false),
        region("cos", cos, extent(&cs, &three(cos_strides)), cd, false),
        region("sin", sin, extent(&cs, &three(sin_strides)), cd, false),
        region("q_out", q_out, extent(&qs, &four(q_out_strides)), od, true),
        region("k_out", k_out, extent(&ks, &four(k_out_strides)), od, true),
    ])?;
    let call = RopeCall {
        r: Rotary {
            p0,
            p1,
            q_heads,
            k_heads,
            head_dim,
            rot_dim,
            interleaved,
            transpose,
        },
        q: (q, q_strides),
        k: (k, k_strides),
        cos: (cos, cos_strides),
        sin: (sin, sin_strides),
        q_out: (q_out, q_out_strides),
        k_out: (k_out, k_out_strides),
    };
    let job = rope_dispatch!(id, cd, od, rope_job, call);
    run(py, "cpu_rotary", job)
}

// ---- gated MLP product ---------------------------------------------------------------------

#[derive(Clone, Copy)]
struct GatedCall {
    g: Gated,
    gate: usize,
    up: usize,
    dout: usize,
    out: usize,
    dup: usize,
    backward: bool,
    /// Backward into one (rows, 2 * cols) buffer at `out` (`[dgate | dup]` per row).
    packed: bool,
}

fn gated_job<A: Real, T: Storage<A>>(c: GatedCall) -> Box<dyn FnOnce() + Send> {
    Box::new(move || {
        let g = c.g;
        let n = g.rows * g.cols;
        let span = |ld: usize, cols: usize| {
            if n == 0 { 0 } else { (g.rows - 1) * ld + cols }
        };
        let width = if g.pairs { 2 } else { 1 };
        // SAFETY: regions checked by the caller.
        unsafe {
            let gate = slice::<T>(c.gate, span(g.ld_gate, width * g.cols));
            // with pairs, up is read from gate
            let up: &[T] = if g.pairs {
                &[]
            } else {
                slice::<T>(c.up, span(g.ld_up, g.cols))
            };
            if c.backward && c.packed {
                gated::backward_packed::<A, T>(
                    &g,
                    slice::<T>(c.dout, n),
                    gate,
                    up,
                    slice_mut::<T>(c.out, 2 * n),
                )
            } else if c.backward {
                gated::backward::<A, T>(
                    &g,
                    slice::<T>(c.dout, n),
                    gate,
                    up,
                    slice_mut::<T>(c.out, n),
                    slice_mut::<T>(c.dup, n),
                )
            } else {
                gated::forward::<A, T>(&g, gate, up, slice_mut::<T>(c.out, n))
            }
        }
    })
}

fn gated_call(py: Python<'_>, c: GatedCall, dtype_name: &str, what: &str) -> PyResult<()> {
    let dt = dtype("gate", dtype_name)?;
    let g = c.g;
    let width = if g.pairs { 2 } else { 1 };
    if g.ld_gate < width * g.cols || (!g.pairs && g.ld_up < g.cols) {
        return value_error(format!(
            "gate: row strides ({}, {}) below the row length {}",
            g.ld_gate, g.ld_up, g.cols
        ));
    }
    let Some(n) = g.rows.checked_mul(g.cols) else {
        return value_error(format!("gate: shape ({}, {}) overflows", g.rows, g.cols));
    };
    let span = |ld: usize, cols: usize| {
        if n == 0 {
            0
        } else {
            (g.rows - 1).saturating_mul(ld).saturating_add(cols)
        }
    };
    let mut regions = vec![region(
        "gate",
        c.gate,
        span(g.ld_gate, width * g.cols),
        dt,
        false,
    )];
    if !g.pairs {
        regions.push(region("up", c.up, span(g.ld_up, g.cols), dt, false));
    } else if c.backward && !c.packed {
        return value_error("dgate: pairs need the packed backward".into());
    }
    if c.backward && c.packed {
        if c.dup != 0 {
            return value_error("dup: must be None with packed (dgate holds both)".into());
        }
        regions.push(region("dout", c.dout, n, dt, false));
        regions.push(region("dgate", c.out, 2 * n, dt, true));
    } else if c.backward {
        regions.push(region("dout", c.dout, n, dt, false));
        regions.push(region("dgate", c.out, n, dt, true));
        regions.push(region("dup", c.dup, n, dt, true));
    } else {
        regions.push(region("out", c.out, n, dt, true));
    }
    check_regions(&regions)?;
    let job = match dt {
        FDtype::Bf16 => gated_job::<f32, bf16>(c),
        FDtype::F16 => gated_job::<f32, f16>(c),
        FDtype::F32 => gated_job::<f32, f32>(c),
        FDtype::F64 => gated_job::<f64, f64>(c),
    };
    run(py, what, job)
}

/// The gated MLP product's activations: silu and gelu_tanh (`kernels/gated_act.cu` has no
/// others: sigmoid is the gated norm's only).
fn activation(name: &str) -> PyResult<Activation> {
    Activation::parse_one_of(name, PRODUCT_ACTIVATIONS).or_else(value_error)
}

/// `out = act(gate) * up` (contiguous (rows, cols)) from gate and up with row strides
/// `ld_gate` and `ld_up` (elements).
#[pyfunction]
#[pyo3(signature = (*, gate, up, out, rows, cols, ld_gate, ld_up, dtype, activation, limit=None, clamp_after_activation=false, grad_at_bound=false, alpha=None, interleaved=false))]
#[allow(clippy::too_many_arguments)]
fn cpu_gated_act(
    py: Python<'_>,
    gate: usize,
    up: usize,
    out: usize,
    rows: usize,
    cols: usize,
    ld_gate: usize,
    ld_up: usize,
    dtype: &str,
    activation: &str,
    limit: Option<f64>,
    clamp_after_activation: bool,
    grad_at_bound: bool,
    alpha: Option<f64>,
    interleaved: bool,
) -> PyResult<()> {
    let act = self::activation(activation)?;
    let call = GatedCall {
        g: Gated {
            rows,
            cols,
            ld_gate,
            ld_up,
            act,
            clamp: Clamp::of(limit, clamp_after_activation, grad_at_bound).or_else(value_error)?,
            alpha: gated::alpha_of(act, alpha).or_else(value_error)?,
            pairs: interleaved,
        },
        gate,
        up,
        dout: 0,
        out,
        dup: 0,
        backward: false,
        packed: false,
    };
    gated_call(py, call, dtype, "cpu_gated_act")
}

/// `dgate` and `dup` (contiguous (rows, cols)) from `dout` and the forward's inputs; with
/// `packed`, `dgate` is one (rows, 2 * cols) buffer receiving `[dgate | dup]` per row and
/// `dup` is None.
#[pyfunction]
#[pyo3(signature = (*, dout, gate, up, dgate, dup, rows, cols, ld_gate, ld_up, dtype, activation, packed=false, limit=None, clamp_after_activation=false, grad_at_bound=false, alpha=None, interleaved=false))]
#[allow(clippy::too_many_arguments)]
fn cpu_gated_act_backward(
    py: Python<'_>,
    dout: usize,
    gate: usize,
    up: usize,
    dgate: usize,
    dup: Option<usize>,
    rows: usize,
    cols: usize,
    ld_gate: usize,
    ld_up: usize,
    dtype: &str,
    activation: &str,
    packed: bool,
    limit: Option<f64>,
    clamp_after_activation: bool,
    grad_at_bound: bool,
    alpha: Option<f64>,
    interleaved: bool,
) -> PyResult<()> {
    let act = self::activation(activation)?;
    let call = GatedCall {
        g: Gated {
            rows,
            cols,
            ld_gate,
            ld_up,
            act,
            clamp: Clamp::of(limit, clamp_after_activation, grad_at_bound).or_else(value_error)?,
            alpha: gated::alpha_of(act, alpha).or_else(value_error)?,
            pairs: interleaved,
        },
        gate,
        up,
        dout,
        out: dgate,
        dup: dup.unwrap_or(0),
        backward: true,
        packed,
    };
    gated_call(py, call, dtype, "cpu_gated_act_backward")
}
