//! Launchers of the decoder-fusion kernels (`kernels/rms_norm.cu`, `kernels/rotary.cu`,
//! `kernels/gated_act.cu`) and their Python functions: one typed parameter block per kernel,
//! mirrored field for field by the struct of the same name in the `.cu` file, and one
//! function per operation that picks the instance (dtypes, vectorised or not), the launch
//! shape, and enqueues on torch's stream. Every buffer is a torch allocation made by
//! `forward_rewrite/_fusions_cuda.py`, which also checks the tensors; this checks again what
//! would make a kernel read or write out of bounds.

use std::ffi::c_void;

use cudarc::driver::sys as drv_sys;
use pyo3::prelude::*;

use super::compile;
use super::device::{self, Device, Dims, Dtype, ModuleSource, launch};
use super::error::{CudaError, Result, catch_panics};
use crate::cpu::fusions::gated::{Clamp, alpha_of};
use crate::cpu::fusions::{Activation, GATE_ACTIVATIONS, PRODUCT_ACTIVATIONS};

pub const RMS_NORM: ModuleSource = ModuleSource {
    name: "rms_norm.cu",
    source: compile::RMS_NORM_SOURCE,
};
pub const ROTARY: ModuleSource = ModuleSource {
    name: "rotary.cu",
    source: compile::ROTARY_SOURCE,
};
pub const GATED_ACT: ModuleSource = ModuleSource {
    name: "gated_act.cu",
    source: compile::GATED_ACT_SOURCE,
};

/// The module of a name `_native.cuda_compile` accepts.
pub fn module_named(name: &str) -> Option<ModuleSource> {
    match name {
        "rms_norm" => Some(RMS_NORM),
        "rotary" => Some(ROTARY),
        "gated_act" => Some(GATED_ACT),
        _ => None,
    }
}

fn arg<T>(v: &mut T) -> *mut c_void {
    v as *mut T as *mut c_void
}

fn aligned16(ptrs: &[u64]) -> bool {
    ptrs.iter().all(|p| p % 16 == 0)
}

fn i32_arg(name: &str, v: u64) -> Result<i32> {
    i32::try_from(v).map_err(|_| CudaError::argument(format!("{name}: {v} is beyond 2^31 - 1")))
}

fn nonzero(name: &str, p: u64) -> Result<()> {
    if p == 0 {
        Err(CudaError::argument(format!("{name}: null pointer")))
    } else {
        Ok(())
    }
}

// ---- RMSNorm -------------------------------------------------------------------------------

#[repr(C)]
struct RmsFwdParams {
    x: u64,
    w: u64,
    y: u64,
    rstd: u64,
    rows: i64,
    hidden: i32,
    team: i32,
    eps: f32,
    offset: f32,
    cast_before: i32,
    pad: i32,
    residual: u64,
    sum_out: u64,
}

#[repr(C)]
struct RmsBwdParams {
    dy: u64,
    x: u64,
    w: u64,
    rstd: u64,
    dx: u64,
    dw_partial: u64,
    rows: i64,
    hidden: i32,
    team: i32,
    offset: f32,
    cast_before: i32,
    dres: u64,
}

/// Dtypes of an RMSNorm call: input x, weight w, output y (the backward: dy of y's dtype,
/// dx of x's, dw of w's). The kernels exist for w and y each x's dtype or float32.
#[derive(Clone, Copy, Debug)]
pub struct RmsDtypes {
    pub x: Dtype,
    pub w: Dtype,
    pub y: Dtype,
}

impl RmsDtypes {
    fn name(self) -> Result<String> {
        let ok = |d: Dtype| d == self.x || d == Dtype::F32;
        if !(ok(self.w) && ok(self.y)) {
            return Err(CudaError::argument(format!(
                "weight: dtypes (x {:?}, weight {:?}, output {:?}) are not a supported \
                 combination (weight and output: x's dtype or float32)",
                self.x, self.w, self.y
            )));
        }
        Ok(format!(
            "{}_{}_{}",
            self.x.suffix(),
            self.w.suffix(),
            self.y.suffix()
        ))
    }
}

/// How an RMSNorm kernel covers a row: `team` threads per row, `nv` vectors of 8 elements
/// per thread kept in registers (0: the `_any` kernel), `block` threads per block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RmsLayout {
    pub team: u32,
    pub nv: u32,
    pub block: u32,
}

impl RmsLayout {
    pub fn rows_per_block(self) -> u32 {
        self.block / self.team
    }

    fn suffix(self) -> String {
        if self.nv == 0 {
            "any".into()
        } else {
            format!("v{}", self.nv)
        }
    }
}

/// The layout for rows of `hidden` elements; `vector_ok`: hidden % 8 == 0 and every row
/// pointer 16-byte aligned.
pub fn rms_layout(hidden: u64, vector_ok: bool) -> RmsLayout {
    let any = RmsLayout {
        team: (hidden.div_ceil(32) * 32).clamp(32, 512) as u32,
        nv: 0,
        block: 0,
    };
    let any = RmsLayout {
        block: any.team,
        ..any
    };
    if !vector_ok || !hidden.is_multiple_of(8) || hidden == 0 {
        return any;
    }
    let vpr = hidden / 8;
    if vpr <= 32 {
        return RmsLayout {
            team: vpr.next_power_of_two() as u32,
            nv: 1,
            block: 256,
        };
    }
    if vpr <= 128 {
        return RmsLayout {
            team: 32,
            nv: if vpr <= 64 { 2 } else { 4 },
            block: 256,
        };
    }
    // Blocks of at most 512 threads: the kernels are built for 128 registers per thread
    // (`__launch_bounds__(512)`), which the backward's 4 x 8 x 4 floats per thread need.
    for nv in [1, 2, 4] {
        let t = vpr.div_ceil(nv);
        if t <= 512 {
            let team = (t.div_ceil(32) * 32) as u32;
            return RmsLayout {
                team,
                nv: nv as u32,
                block: team,
            };
        }
    }
    any
}

/// The forward's layout: rows of more than 32 vectors one per block (the backward gives rows
/// of 33 to 128 vectors, 264 to 1024 16-bit elements, to one warp with 2 or 4 vectors per
/// thread; one per block measured faster, H200, 32768 x 1024 bf16: 45.9 -> 36.0 us), one
/// vector per thread up to 256 vectors, two from 257 to 1024: the kernel is bound by
/// instruction issue, and two vectors a thread halve the threads of a row and so its
/// per-thread prologue, reduction and rstd (hidden 4096: 256 threads, not 512). Longer rows
/// and the `_any` fallback: the backward's.
pub fn rms_forward_layout(hidden: u64, vector_ok: bool) -> RmsLayout {
    let backward = rms_layout(hidden, vector_ok);
    let vpr = hidden / 8;
    let nv = match vpr {
        _ if backward.nv == 0 => return backward,
        33..=256 => 1,
        257..=1024 => 2,
        _ => return backward,
    };
    let team = (vpr.div_ceil(nv).div_ceil(32) * 32) as u32;
    RmsLayout {
        team,
        nv: nv as u32,
        block: team,
    }
}

/// One RMSNorm forward, as `_fusions_cuda.py` passes it (raw device addresses). With
/// `residual` and `sum_out` (both 0: none) the residual add runs in front: `sum_out` (x's
/// dtype and shape) receives `round_X(x + residual)`, which is normalised in place of x.
#[derive(Clone, Copy, Debug)]
pub struct RmsForward {
    pub device: i32,
    pub stream: u64,
    pub dtypes: RmsDtypes,
    pub rows: u64,
    pub hidden: u64,
    pub x: u64,
    pub w: u64,
    pub y: u64,
    pub rstd: u64,
    pub residual: u64,
    pub sum_out: u64,
    pub eps: f32,
    pub offset: f32,
    pub cast_before: bool,
}

impl RmsForward {
    /// Whether the residual add runs: `residual` and `sum_out` both set (both 0: no add).
    fn adds(&self) -> Result<bool> {
        match (self.residual, self.sum_out) {
            (0, 0) => Ok(false),
            (r, s) if r != 0 && s != 0 => Ok(true),
            _ => Err(CudaError::argument(format!(
                "residual, sum_out: both or neither must be given (residual {:#x}, sum_out {:#x})",
                self.residual, self.sum_out
            ))),
        }
    }

    /// The forward kernel's name: `rms_fwd_[add_]<dtypes>_<layout>`.
    fn kernel(&self, layout: RmsLayout) -> Result<String> {
        let kind = if self.adds()? { "fwd_add" } else { "fwd" };
        Ok(format!(
            "rms_{kind}_{}_{}",
            self.dtypes.name()?,
            layout.suffix()
        ))
    }

    /// The layout: the vector kernels need every row pointer 16-byte aligned (those of the
    /// residual add's too).
    fn layout(&self) -> RmsLayout {
        rms_forward_layout(
            self.hidden,
            aligned16(&[self.x, self.w, self.y, self.residual, self.sum_out]),
        )
    }
}

pub fn rms_norm_forward(c: &RmsForward) -> Result<()> {
    c.dtypes.name()?; // a dtype error before any other
    let hidden = i32_arg("x: hidden size", c.hidden)?;
    if hidden == 0 {
        return Err(CudaError::argument("x: the normalised dimension is empty"));
    }
    if c.rows == 0 {
        // Nothing to write (an empty tensor's address may be 0, so the residual pair is
        // not checked either).
        return Ok(());
    }
    for (n, p) in [("x", c.x), ("weight", c.w), ("y", c.y), ("rstd", c.rstd)] {
        nonzero(n, p)?;
    }
    let layout = c.layout();
    let kernel = c.kernel(layout)?;
    let blocks = c.rows.div_ceil(layout.rows_per_block() as u64);
    let grid = u32::try_from(blocks).map_err(|_| CudaError::argument("x: too many rows"))?;
    let mut guard = device::lock(c.device)?;
    let dev = guard.dev();
    let f = dev.function(&RMS_NORM, &kernel)?;
    let mut p = RmsFwdParams {
        x: c.x,
        w: c.w,
        y: c.y,
        rstd: c.rstd,
        rows: c.rows as i64,
        hidden,
        team: layout.team as i32,
        eps: c.eps,
        offset: c.offset,
        cast_before: c.cast_before as i32,
        pad: 0,
        residual: c.residual,
        sum_out: c.sum_out,
    };
    // SAFETY: the parameter block matches RmsFwdParams; the addresses are torch tensors of
    // the sizes the caller checked.
    unsafe {
        launch(
            f,
            Dims::new((grid, 1, 1), layout.block),
            c.stream as drv_sys::CUstream,
            &mut [arg(&mut p)],
            "rms_fwd",
        )
    }
}

/// One RMSNorm backward. `dw_partial` holds `partial_rows` float32 rows of `hidden` (at
/// least [`rms_norm_backward_parts`]); with `dw` = 0 no weight gradient is computed. `dres`
/// (x's dtype and shape, 0: none) is added to dx before its rounding: the gradient that
/// reaches the residual add's sum from elsewhere.
#[derive(Clone, Copy, Debug)]
pub struct RmsBackward {
    pub device: i32,
    pub stream: u64,
    pub dtypes: RmsDtypes,
    pub rows: u64,
    pub hidden: u64,
    pub dy: u64,
    pub x: u64,
    pub w: u64,
    pub rstd: u64,
    pub dx: u64,
    pub dw: u64,
    pub dw_partial: u64,
    pub partial_rows: u64,
    pub dres: u64,
    pub offset: f32,
    pub cast_before: bool,
}

impl RmsBackward {
    /// The layout: the vector kernels need every row pointer 16-byte aligned (dres's too).
    fn layout(&self) -> RmsLayout {
        rms_layout(
            self.hidden,
            aligned16(&[self.dy, self.x, self.w, self.dx, self.dres]),
        )
    }
}

struct BwdPlan {
    layout: RmsLayout,
    grid: u32,
    smem: u32,
    kernel: drv_sys::CUfunction,
}

/// A persistent backward of RMS_NORM's kernel `name` in `layout` over `rows` rows: as many
/// blocks as fit on the device at once (`smem` bytes of shared memory each), or as the rows
/// need if fewer.
fn persistent_plan(
    dev: &mut Device,
    name: &str,
    layout: RmsLayout,
    smem: u32,
    rows: u64,
) -> Result<BwdPlan> {
    let kernel = dev.function(&RMS_NORM, name)?;
    // SAFETY: `kernel` comes from RMS_NORM.
    let resident = unsafe { dev.blocks_per_sm(&RMS_NORM, kernel, layout.block, smem)? } * dev.sms();
    let needed = rows.div_ceil(layout.rows_per_block() as u64).max(1);
    Ok(BwdPlan {
        layout,
        grid: needed.min(resident.max(1) as u64) as u32,
        smem,
        kernel,
    })
}

fn rms_backward_plan(dev: &mut Device, c: &RmsBackward) -> Result<BwdPlan> {
    let name = c.dtypes.name()?;
    let layout = c.layout();
    let teams = layout.rows_per_block();
    let smem = if c.dw != 0 && layout.nv > 0 && teams > 1 {
        (teams as u64 * c.hidden * 4) as u32
    } else {
        0
    };
    let kernel = format!("rms_bwd_{name}_{}", layout.suffix());
    persistent_plan(dev, &kernel, layout, smem, c.rows)
}

/// Where a backward's weight gradient goes: `dw` (W, 0: none) through `partial`, a float32
/// buffer of `partial_rows` rows of hidden (at least the plan's grid).
#[derive(Clone, Copy)]
struct DwOut {
    dw: u64,
    partial: u64,
    partial_rows: u64,
    w: Dtype,
}

impl DwOut {
    /// The partial buffer's address for the kernel's parameter block (0: no weight gradient).
    fn kernel_partial(self) -> u64 {
        if self.dw != 0 { self.partial } else { 0 }
    }

    /// No rows: dw is 0, which the finish kernel over zero partial rows writes.
    fn zero(self, dev: &mut Device, stream: drv_sys::CUstream, hidden: i32) -> Result<()> {
        if self.dw == 0 {
            return Ok(());
        }
        let f = dev.function(&RMS_NORM, &format!("rms_dw_finish_{}", self.w.suffix()))?;
        finish(f, stream, 0, 0, hidden, self.dw)
    }

    fn check(self, plan: &BwdPlan) -> Result<()> {
        if self.dw != 0 && (self.partial == 0 || self.partial_rows < plan.grid as u64) {
            return Err(CudaError::argument(format!(
                "dw_partial: {} rows given, the launch needs {}",
                self.partial_rows, plan.grid
            )));
        }
        Ok(())
    }
}

/// Launches the planned backward with its parameter block, then adds the partial rows of dw
/// in order (when `dw` is set).
///
/// # Safety
/// `params` points to the parameter block of `plan.kernel`, whose addresses are torch
/// tensors of the sizes the caller checked, and `dw.check(plan)` passed.
unsafe fn launch_backward(
    dev: &mut Device,
    stream: drv_sys::CUstream,
    plan: &BwdPlan,
    params: *mut c_void,
    what: &str,
    hidden: i32,
    dw: DwOut,
) -> Result<()> {
    // SAFETY: the caller's contract.
    unsafe {
        launch(
            plan.kernel,
            Dims {
                grid: (plan.grid, 1, 1),
                block: plan.layout.block,
                smem: plan.smem,
                cluster: None,
            },
            stream,
            &mut [params],
            what,
        )?;
    }
    if dw.dw != 0 {
        let f = dev.function(&RMS_NORM, &format!("rms_dw_finish_{}", dw.w.suffix()))?;
        finish(f, stream, dw.partial, plan.grid as i32, hidden, dw.dw)?;
    }
    Ok(())
}

/// Rows of the float32 partial buffer the backward needs (its persistent grid).
pub fn rms_norm_backward_parts(c: &RmsBackward) -> Result<u64> {
    if c.rows == 0 {
        return Ok(0);
    }
    let mut guard = device::lock(c.device)?;
    Ok(rms_backward_plan(guard.dev(), c)?.grid as u64)
}

pub fn rms_norm_backward(c: &RmsBackward) -> Result<()> {
    let hidden = i32_arg("x: hidden size", c.hidden)?;
    if hidden == 0 {
        return Err(CudaError::argument("x: the normalised dimension is empty"));
    }
    let mut guard = device::lock(c.device)?;
    let dev = guard.dev();
    let stream = c.stream as drv_sys::CUstream;
    let dw = DwOut {
        dw: c.dw,
        partial: c.dw_partial,
        partial_rows: c.partial_rows,
        w: c.dtypes.w,
    };
    if c.rows == 0 {
        return dw.zero(dev, stream, hidden);
    }
    for (n, p) in [
        ("dy", c.dy),
        ("x", c.x),
        ("weight", c.w),
        ("rstd", c.rstd),
        ("dx", c.dx),
    ] {
        nonzero(n, p)?;
    }
    let plan = rms_backward_plan(dev, c)?;
    dw.check(&plan)?;
    let mut p = RmsBwdParams {
        dy: c.dy,
        x: c.x,
        w: c.w,
        rstd: c.rstd,
        dx: c.dx,
        dw_partial: dw.kernel_partial(),
        rows: c.rows as i64,
        hidden,
        team: plan.layout.team as i32,
        offset: c.offset,
        cast_before: c.cast_before as i32,
        dres: c.dres,
    };
    // SAFETY: the block is RmsBwdParams; the addresses as in the forward, dw checked above.
    unsafe { launch_backward(dev, stream, &plan, arg(&mut p), "rms_bwd", hidden, dw) }
}

fn finish(
    f: drv_sys::CUfunction,
    stream: drv_sys::CUstream,
    partial: u64,
    parts: i32,
    hidden: i32,
    dw: u64,
) -> Result<()> {
    let (mut partial, mut parts, mut hidden_arg, mut dw) = (partial, parts, hidden, dw);
    let grid = (hidden as u32).div_ceil(32);
    // SAFETY: the parameters match rms_dw_finish's; `parts` rows of `hidden` floats.
    unsafe {
        launch(
            f,
            Dims::new((grid, 1, 1), 256),
            stream,
            &mut [
                arg(&mut partial),
                arg(&mut parts),
                arg(&mut hidden_arg),
                arg(&mut dw),
            ],
            "rms_dw_finish",
        )
    }
}

// ---- gated RMSNorm -------------------------------------------------------------------------

#[repr(C)]
struct GatedRmsParams {
    x: u64,
    gate: u64,
    w: u64,
    dy: u64,
    y: u64,
    dgate: u64,
    rstd: u64,
    dw_partial: u64,
    rows: i64,
    hidden: i32,
    team: i32,
    eps: f32,
    cast_before: i32,
    act: i32,
    groups: i32,
}

/// The gated norm's backward keeps a float32 row of dw per team in shared memory (at most
/// 32 KiB a block with rows this long, under the 48 KiB a launch may take without opting in);
/// every model with the form normalises a head, 128 or 256 elements.
pub const GATED_RMS_MAX_HIDDEN: u64 = 8192;

/// One gated RMSNorm call (`kernels/rms_norm.cu`, "gated RMSNorm"), forward or backward, as
/// `_fusions_cuda.py` passes it: x, gate, y / dy / dx / dgate of x's dtype, the weight of x's
/// dtype or float32. Forward: `y`, `rstd` written. Backward: `dy`, `rstd` read, `dx`, `dgate`
/// written and, when `dw` is set, the weight gradient through `dw_partial` (at least
/// [`gated_rms_norm_backward_parts`] rows).
#[derive(Clone, Copy, Debug)]
pub struct GatedRmsCall {
    pub device: i32,
    pub stream: u64,
    pub x_dtype: Dtype,
    pub w_dtype: Dtype,
    pub rows: u64,
    pub hidden: u64,
    pub x: u64,
    pub gate: u64,
    pub w: u64,
    pub y: u64,
    pub rstd: u64,
    pub dy: u64,
    pub dgate: u64,
    pub dw: u64,
    pub dw_partial: u64,
    pub partial_rows: u64,
    pub eps: f32,
    pub cast_before: bool,
    /// 0: SiLU, 2: sigmoid (the codes of `gated_act.cu`'s activations).
    pub act: i32,
    /// The gate multiplies x before the norm (Mamba's form).
    pub gate_first: bool,
    /// Groups (rows of `hidden`) per row of x: the weight has `groups * hidden` elements and
    /// row i reads its segment i % groups; `rows` is a multiple of it.
    pub groups: u64,
}

impl GatedRmsCall {
    fn check(&self) -> Result<i32> {
        if !(self.w_dtype == self.x_dtype || self.w_dtype == Dtype::F32) {
            return Err(CudaError::argument(format!(
                "weight: dtype {:?} must be x's ({:?}) or float32",
                self.w_dtype, self.x_dtype
            )));
        }
        if !matches!(self.act, 0 | 2) {
            return Err(CudaError::argument(format!(
                "activation: code {} is neither SiLU (0) nor sigmoid (2)",
                self.act
            )));
        }
        if self.hidden == 0 {
            return Err(CudaError::argument("x: the normalised dimension is empty"));
        }
        if self.hidden > GATED_RMS_MAX_HIDDEN {
            return Err(CudaError::argument(format!(
                "x: rows of {} elements, the gated norm takes at most {GATED_RMS_MAX_HIDDEN}",
                self.hidden
            )));
        }
        if self.groups == 0 || !self.rows.is_multiple_of(self.groups) {
            return Err(CudaError::argument(format!(
                "groups: {} does not divide the {} rows",
                self.groups, self.rows
            )));
        }
        i32_arg("groups", self.groups)?;
        i32_arg("weight: size", self.groups * self.hidden)?;
        i32_arg("x: hidden size", self.hidden)
    }

    /// rms_layout's team and block; its vectors (nv > 0) say the `_v8` kernels apply.
    fn layout(&self, backward: bool) -> RmsLayout {
        let rows = [self.x, self.gate, self.w, self.y];
        let grads = [self.dy, self.dgate];
        let ptrs: Vec<u64> = rows
            .into_iter()
            .chain(if backward { grads.to_vec() } else { vec![] })
            .collect();
        rms_layout(self.hidden, aligned16(&ptrs))
    }

    fn kernel(&self, kind: &str, layout: RmsLayout) -> String {
        let shape = if layout.nv == 0 { "any" } else { "v8" };
        // The gate's place is compiled in: `_first` kernels take it before the norm.
        let place = if self.gate_first { "_first" } else { "" };
        format!(
            "gated_rms_{kind}{place}_{}_{}_{shape}",
            self.x_dtype.suffix(),
            self.w_dtype.suffix()
        )
    }

    fn params(&self, hidden: i32, layout: RmsLayout, dw_partial: u64) -> GatedRmsParams {
        GatedRmsParams {
            x: self.x,
            gate: self.gate,
            w: self.w,
            dy: self.dy,
            y: self.y,
            dgate: self.dgate,
            rstd: self.rstd,
            dw_partial,
            rows: self.rows as i64,
            hidden,
            team: layout.team as i32,
            eps: self.eps,
            cast_before: self.cast_before as i32,
            act: self.act,
            groups: self.groups as i32,
        }
    }
}

pub fn gated_rms_norm_forward(c: &GatedRmsCall) -> Result<()> {
    let hidden = c.check()?;
    if c.rows == 0 {
        return Ok(());
    }
    for (n, p) in [
        ("x", c.x),
        ("gate", c.gate),
        ("weight", c.w),
        ("y", c.y),
        ("rstd", c.rstd),
    ] {
        nonzero(n, p)?;
    }
    let layout = c.layout(false);
    let blocks = c.rows.div_ceil(layout.rows_per_block() as u64);
    let grid = u32::try_from(blocks).map_err(|_| CudaError::argument("x: too many rows"))?;
    let mut guard = device::lock(c.device)?;
    let dev = guard.dev();
    let f = dev.function(&RMS_NORM, &c.kernel("fwd", layout))?;
    let mut p = c.params(hidden, layout, 0);
    // SAFETY: the parameter block matches GatedRmsParams; the addresses are torch tensors of
    // the sizes the caller checked.
    unsafe {
        launch(
            f,
            Dims::new((grid, 1, 1), layout.block),
            c.stream as drv_sys::CUstream,
            &mut [arg(&mut p)],
            "gated_rms_fwd",
        )
    }
}

fn gated_backward_plan(dev: &mut Device, c: &GatedRmsCall) -> Result<BwdPlan> {
    let layout = c.layout(true);
    let smem = if c.dw != 0 {
        (layout.rows_per_block() as u64 * c.hidden * 4) as u32
    } else {
        0
    };
    let mut plan = persistent_plan(dev, &c.kernel("bwd", layout), layout, smem, c.rows)?;
    plan.grid = grid_for_groups(plan.grid, layout.rows_per_block(), c.groups)?;
    Ok(plan)
}

/// The persistent grid made a multiple of the blocks whose teams cover whole rounds of the
/// groups (team t walks rows t, t + teams, ...: all of one group when the team count is a
/// multiple of `groups`, so its dw row is of that group alone). Rounded down, at least one
/// round: more blocks than are resident only queue.
fn grid_for_groups(grid: u32, teams: u32, groups: u64) -> Result<u32> {
    let groups = u32::try_from(groups).map_err(|_| CudaError::argument("groups: too many"))?;
    let round = groups / gcd(teams, groups);
    Ok((grid / round).max(1) * round)
}

fn gcd(mut a: u32, mut b: u32) -> u32 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Rows of the float32 partial buffer the gated backward needs (its persistent grid).
pub fn gated_rms_norm_backward_parts(c: &GatedRmsCall) -> Result<u64> {
    c.check()?;
    if c.rows == 0 {
        return Ok(0);
    }
    let mut guard = device::lock(c.device)?;
    Ok(gated_backward_plan(guard.dev(), c)?.grid as u64)
}

pub fn gated_rms_norm_backward(c: &GatedRmsCall) -> Result<()> {
    let hidden = c.check()?;
    let mut guard = device::lock(c.device)?;
    let dev = guard.dev();
    let stream = c.stream as drv_sys::CUstream;
    let dw = DwOut {
        dw: c.dw,
        partial: c.dw_partial,
        partial_rows: c.partial_rows,
        w: c.w_dtype,
    };
    // The weight gradient spans every group.
    let width = (c.groups * c.hidden) as i32;
    if c.rows == 0 {
        return dw.zero(dev, stream, width);
    }
    for (n, p) in [
        ("dy", c.dy),
        ("x", c.x),
        ("gate", c.gate),
        ("weight", c.w),
        ("rstd", c.rstd),
        ("dx", c.y),
        ("dgate", c.dgate),
    ] {
        nonzero(n, p)?;
    }
    let plan = gated_backward_plan(dev, c)?;
    dw.check(&plan)?;
    let mut p = c.params(hidden, plan.layout, dw.kernel_partial());
    // SAFETY: the block is GatedRmsParams; the addresses are torch tensors of the sizes the
    // caller checked, dw checked above; the shared memory holds teams rows of hidden floats.
    unsafe { launch_backward(dev, stream, &plan, arg(&mut p), "gated_rms_bwd", width, dw) }
}

// ---- rotary --------------------------------------------------------------------------------

#[repr(C)]
struct RopeParams {
    q: u64,
    k: u64,
    cos: u64,
    sin: u64,
    q_out: u64,
    k_out: u64,
    q_stride: [i64; 3],
    k_stride: [i64; 3],
    qo_stride: [i64; 3],
    ko_stride: [i64; 3],
    cos_stride: [i64; 2],
    sin_stride: [i64; 2],
    p0: i32,
    p1: i32,
    q_heads: i32,
    k_heads: i32,
    head_dim: i32,
    rot_dim: i32,
    transpose: i32,
    pad: i32,
}

/// One rotary call (forward, or with `transpose` the backward): element strides over
/// (P0, P1, head) for q, k and the outputs, over (P0, P1) for cos and sin.
#[derive(Clone, Copy, Debug)]
pub struct RopeCall {
    pub device: i32,
    pub stream: u64,
    /// input, cos/sin, output
    pub dtypes: (Dtype, Dtype, Dtype),
    pub q: u64,
    pub k: u64,
    pub cos: u64,
    pub sin: u64,
    pub q_out: u64,
    pub k_out: u64,
    pub q_strides: [u64; 3],
    pub k_strides: [u64; 3],
    pub q_out_strides: [u64; 3],
    pub k_out_strides: [u64; 3],
    pub cos_strides: [u64; 2],
    pub sin_strides: [u64; 2],
    pub p0: u64,
    pub p1: u64,
    pub q_heads: u64,
    pub k_heads: u64,
    pub head_dim: u64,
    pub rot_dim: u64,
    pub interleaved: bool,
    pub transpose: bool,
}

impl RopeCall {
    /// Whether the `_v8` kernel applies: 8-entry chunks that start 16-byte aligned everywhere.
    fn vector_ok(&self) -> bool {
        let rot_ok = if self.interleaved {
            self.rot_dim.is_multiple_of(8)
        } else {
            self.rot_dim.is_multiple_of(16)
        };
        let strides = self
            .q_strides
            .iter()
            .chain(&self.k_strides)
            .chain(&self.q_out_strides)
            .chain(&self.k_out_strides)
            .chain(&self.cos_strides)
            .chain(&self.sin_strides);
        rot_ok
            && (self.head_dim - self.rot_dim).is_multiple_of(8)
            && strides.into_iter().all(|s| s.is_multiple_of(8))
            && aligned16(&[self.q, self.k, self.cos, self.sin, self.q_out, self.k_out])
    }
}

pub fn rotary(c: &RopeCall) -> Result<()> {
    // Instances exist for every combination of one 16-bit dtype and float32.
    let (i, cs, o) = c.dtypes;
    if [i, cs, o].contains(&Dtype::Bf16) && [i, cs, o].contains(&Dtype::F16) {
        return Err(CudaError::argument(
            "cos: bfloat16 and float16 do not mix in one call",
        ));
    }
    if !c.rot_dim.is_multiple_of(2) || c.rot_dim > c.head_dim {
        return Err(CudaError::argument(format!(
            "rotary_dim: expected an even number at most head_dim {}, got {}",
            c.head_dim, c.rot_dim
        )));
    }
    let positions = c.p0 * c.p1;
    if positions == 0 || c.head_dim == 0 || c.q_heads + c.k_heads == 0 {
        return Ok(());
    }
    // k may have no heads (`rotary_single`): its pointers are then never read, and an
    // empty output's address may be 0; likewise q.
    for (n, p, heads) in [
        ("q", c.q, c.q_heads),
        ("k", c.k, c.k_heads),
        ("cos", c.cos, 1),
        ("sin", c.sin, 1),
        ("q_out", c.q_out, c.q_heads),
        ("k_out", c.k_out, c.k_heads),
    ] {
        if heads > 0 {
            nonzero(n, p)?;
        }
    }
    let grid =
        u32::try_from(positions).map_err(|_| CudaError::argument("q: too many positions"))?;
    let vector = c.vector_ok();
    let (re, pe) = match (vector, c.interleaved) {
        (true, _) => (8, 8),
        (false, true) => (2, 1),
        (false, false) => (1, 1),
    };
    let rot_chunks = if c.interleaved {
        c.rot_dim / re
    } else {
        c.rot_dim / 2 / re
    };
    let items = (rot_chunks + (c.head_dim - c.rot_dim) / pe) * (c.q_heads + c.k_heads);
    let block = (items.div_ceil(32) * 32).clamp(32, 256) as u32;
    let name = format!(
        "rope_{}_{}_{}_{}_{}",
        i.suffix(),
        cs.suffix(),
        o.suffix(),
        if vector { "v8" } else { "s" },
        if c.interleaved { "pairs" } else { "half" }
    );
    let s3 = |s: [u64; 3]| s.map(|v| v as i64);
    let s2 = |s: [u64; 2]| s.map(|v| v as i64);
    let mut p = RopeParams {
        q: c.q,
        k: c.k,
        cos: c.cos,
        sin: c.sin,
        q_out: c.q_out,
        k_out: c.k_out,
        q_stride: s3(c.q_strides),
        k_stride: s3(c.k_strides),
        qo_stride: s3(c.q_out_strides),
        ko_stride: s3(c.k_out_strides),
        cos_stride: s2(c.cos_strides),
        sin_stride: s2(c.sin_strides),
        p0: i32_arg("q: size", c.p0)?,
        p1: i32_arg("q: size", c.p1)?,
        q_heads: i32_arg("q: heads", c.q_heads)?,
        k_heads: i32_arg("k: heads", c.k_heads)?,
        head_dim: i32_arg("q: head_dim", c.head_dim)?,
        rot_dim: i32_arg("rotary_dim", c.rot_dim)?,
        transpose: c.transpose as i32,
        pad: 0,
    };
    let mut guard = device::lock(c.device)?;
    let f = guard.dev().function(&ROTARY, &name)?;
    // SAFETY: the parameter block matches RopeParams; the strided layouts lie inside torch
    // tensors (checked by the caller).
    unsafe {
        launch(
            f,
            Dims::new((grid, 1, 1), block),
            c.stream as drv_sys::CUstream,
            &mut [arg(&mut p)],
            "rope",
        )
    }
}

// ---- gated MLP product ---------------------------------------------------------------------

#[repr(C)]
struct GatedParams {
    gate: u64,
    up: u64,
    dout: u64,
    out: u64,
    dup: u64,
    rows: i64,
    cols: i64,
    ld_gate: i64,
    ld_up: i64,
    ld_grad: i64,
    act: i32,
    clamp: i32,
    limit: f32,
    at_bound: i32,
    alpha: f32,
    interleaved: i32,
}

/// One gated-product call: forward (`out` = act(gate) * up) or backward (`out` = dgate,
/// plus `dout` and `dup`). gate and up have row strides `ld_gate`, `ld_up` (elements);
/// dgate and dup `ld_grad` (`cols`, or `2 * cols` with `dup = dgate + cols` for the packed
/// gradient of one gate_up tensor).
#[derive(Clone, Copy, Debug)]
pub struct GatedCall {
    pub device: i32,
    pub stream: u64,
    pub dtype: Dtype,
    pub rows: u64,
    pub cols: u64,
    pub ld_gate: u64,
    pub ld_up: u64,
    pub ld_grad: u64,
    pub gate: u64,
    pub up: u64,
    pub dout: u64,
    pub out: u64,
    pub dup: u64,
    pub act: i32,
    /// The clamped SwiGLU's limit and where the gate is clamped, or None.
    pub clamp: Option<Clamp>,
    /// swiglu_oai's alpha (act 3).
    pub alpha: f32,
    /// `gate` holds (gate, up) pairs, row stride `ld_gate`; `up` and `dup` are not used, the
    /// backward writes (dgate, dup) pairs at `out` (row stride `ld_grad`).
    pub pairs: bool,
    pub backward: bool,
}

/// The kernel's clamp code (`kernels/gated_act.cu`): 0 none, 1 before the activation, 2
/// after it.
fn clamp_code(clamp: Option<Clamp>) -> i32 {
    match clamp {
        None => 0,
        Some(c) if c.after_activation => 2,
        Some(_) => 1,
    }
}

pub fn gated_act(c: &GatedCall) -> Result<()> {
    let width = if c.pairs { 2 } else { 1 };
    if c.ld_gate < width * c.cols
        || (!c.pairs && c.ld_up < c.cols)
        || (c.backward && c.ld_grad < width * c.cols)
    {
        return Err(CudaError::argument(format!(
            "gate: row strides (gate {}, up {}, gradients {}) below the row length {}",
            c.ld_gate, c.ld_up, c.ld_grad, c.cols
        )));
    }
    if ![0, 1, 3].contains(&c.act) {
        return Err(CudaError::argument(format!(
            "activation: unknown code {}",
            c.act
        )));
    }
    let total = c.rows * c.cols;
    if total == 0 {
        return Ok(());
    }
    // With pairs, up and dup live in gate's and dgate's pairs.
    let mut need = vec![("gate", c.gate), ("out", c.out)];
    if !c.pairs {
        need.push(("up", c.up));
    }
    if c.backward {
        need.push(("dout", c.dout));
        if !c.pairs {
            need.push(("dup", c.dup));
        }
    }
    for &(n, p) in &need {
        nonzero(n, p)?;
    }
    // Contiguous operands: one long row (no division per element in the kernel).
    let ld_grad = if c.backward {
        c.ld_grad
    } else {
        width * c.cols
    };
    let ld_up = if c.pairs { c.ld_gate } else { c.ld_up };
    let (rows, cols, ld_gate, ld_up, ld_grad) =
        if c.ld_gate == width * c.cols && (c.pairs || ld_up == c.cols) && ld_grad == width * c.cols
        {
            (1, total, width * total, total, width * total)
        } else {
            (c.rows, c.cols, c.ld_gate, ld_up, ld_grad)
        };
    let ptrs: Vec<u64> = need.iter().map(|&(_, p)| p).collect();
    let vector = [cols, ld_gate, ld_up, ld_grad]
        .iter()
        .all(|v| v.is_multiple_of(8))
        && aligned16(&ptrs);
    let per_thread = if vector { 8 } else { 1 };
    let name = format!(
        "gated_{}_{}_{}",
        if c.backward { "bwd" } else { "fwd" },
        c.dtype.suffix(),
        if vector { "v8" } else { "s" }
    );
    let mut p = GatedParams {
        gate: c.gate,
        up: c.up,
        dout: c.dout,
        out: c.out,
        dup: c.dup,
        rows: rows as i64,
        cols: cols as i64,
        ld_gate: ld_gate as i64,
        ld_up: ld_up as i64,
        ld_grad: ld_grad as i64,
        act: c.act,
        clamp: clamp_code(c.clamp),
        limit: c.clamp.map_or(0.0, |k| k.limit),
        at_bound: c.clamp.is_some_and(|k| k.grad_at_bound) as i32,
        alpha: c.alpha,
        interleaved: c.pairs as i32,
    };
    let mut guard = device::lock(c.device)?;
    let dev = guard.dev();
    let f = dev.function(&GATED_ACT, &name)?;
    let block = 256u32;
    // One vector per thread over the whole tensor (the kernel's grid-stride loop then runs
    // once). Measured on the H200 at Llama-3.2-1B's MLP (32768 x 8192 bf16): forward 371
    // against 419 us and backward 622 against 681 us with a resident grid looping over the
    // tensor, and slower still (448 / 786 us) with 4 vectors in flight per thread at 128
    // registers: many short-lived blocks keep more loads in flight than fewer long ones.
    let grid = u32::try_from((total / per_thread).div_ceil(block as u64))
        .map_err(|_| CudaError::argument("gate: too many elements"))?;
    // SAFETY: the parameter block matches GatedParams; rows x cols within each buffer.
    unsafe {
        launch(
            f,
            Dims::new((grid.max(1), 1, 1), block),
            c.stream as drv_sys::CUstream,
            &mut [arg(&mut p)],
            "gated",
        )
    }
}

// ---- Python functions ----------------------------------------------------------------------

// ---- unweighted RMSNorm, scale rounded first ------------------------------------------------

#[repr(C)]
struct RmsScaleFirstParams {
    x: u64,
    dy: u64,
    out: u64,
    rstd: u64,
    rows: i64,
    hidden: i32,
    eps: f32,
}

/// One call of DeepSeek-V4's unweighted scale-first RMSNorm (`kernels/rms_norm.cu`, "scale
/// rounded first"): the forward writes `out` = y and `rstd` from `x`; the backward (`dy` set)
/// writes `out` = dx from `dy`, `x` and `rstd`. Every tensor but rstd (float32) is of `dtype`.
#[derive(Clone, Copy, Debug)]
pub struct RmsScaleFirstCall {
    pub device: i32,
    pub stream: u64,
    pub dtype: Dtype,
    pub rows: u64,
    pub hidden: u64,
    pub x: u64,
    pub dy: u64,
    pub out: u64,
    pub rstd: u64,
    pub eps: f32,
}

/// Threads per block: one row per block, the row rounded up to whole warps (`team_sum` over
/// the block needs a multiple of 32), at most 512 (the kernels' launch bounds).
pub fn rms_scale_first_block(hidden: u64) -> u32 {
    hidden.div_ceil(32).clamp(1, 16) as u32 * 32
}

fn rms_scale_first_launch(c: &RmsScaleFirstCall, backward: bool) -> Result<()> {
    let hidden = i32_arg("x: hidden size", c.hidden)?;
    if hidden == 0 {
        return Err(CudaError::argument("x: the normalised dimension is empty"));
    }
    if c.rows == 0 {
        return Ok(()); // nothing to write; an empty tensor's address may be 0
    }
    // One block per row: the grid's x extent is at most 2^31 - 1.
    let grid = i32_arg("x: rows", c.rows)? as u32;
    let mut named = vec![("x", c.x), ("rstd", c.rstd)];
    named.push((if backward { "dx" } else { "y" }, c.out));
    if backward {
        named.push(("dy", c.dy));
    }
    for (n, p) in named {
        nonzero(n, p)?;
    }
    let kind = if backward { "bwd" } else { "fwd" };
    let kernel = format!("rms_scale_first_{kind}_{}", c.dtype.suffix());
    let mut guard = device::lock(c.device)?;
    let dev = guard.dev();
    let f = dev.function(&RMS_NORM, &kernel)?;
    let mut p = RmsScaleFirstParams {
        x: c.x,
        dy: if backward { c.dy } else { 0 },
        out: c.out,
        rstd: c.rstd,
        rows: c.rows as i64,
        hidden,
        eps: c.eps,
    };
    // SAFETY: the parameter block matches RmsScaleFirstParams; the addresses are torch
    // tensors of the sizes the caller checked.
    unsafe {
        launch(
            f,
            Dims::new((grid, 1, 1), rms_scale_first_block(c.hidden)),
            c.stream as drv_sys::CUstream,
            &mut [arg(&mut p)],
            if backward {
                "rms_scale_first_bwd"
            } else {
                "rms_scale_first_fwd"
            },
        )
    }
}

pub fn rms_scale_first_forward(c: &RmsScaleFirstCall) -> Result<()> {
    rms_scale_first_launch(c, false)
}

pub fn rms_scale_first_backward(c: &RmsScaleFirstCall) -> Result<()> {
    rms_scale_first_launch(c, true)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cuda_rms_norm_forward, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_rms_norm_backward_parts, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_rms_norm_backward, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_gated_rms_norm, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_gated_rms_norm_backward_parts, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_rms_scale_first, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_rotary, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_gated_act, m)?)?;
    Ok(())
}

fn dtypes(x: &str, w: &str, y: &str) -> Result<RmsDtypes> {
    Ok(RmsDtypes {
        x: Dtype::parse(x)?,
        w: Dtype::parse(w)?,
        y: Dtype::parse(y)?,
    })
}

/// RMSNorm forward on torch's stream `stream` of GPU `device`; see [`RmsForward`].
#[pyfunction]
#[pyo3(signature = (*, device, stream, x, weight, y, rstd, rows, hidden, x_dtype, w_dtype, y_dtype, eps, offset, cast_before,
    residual=0, sum_out=0))]
#[allow(clippy::too_many_arguments)]
fn cuda_rms_norm_forward(
    py: Python<'_>,
    device: i32,
    stream: u64,
    x: u64,
    weight: u64,
    y: u64,
    rstd: u64,
    rows: u64,
    hidden: u64,
    x_dtype: &str,
    w_dtype: &str,
    y_dtype: &str,
    eps: f32,
    offset: f32,
    cast_before: bool,
    residual: u64,
    sum_out: u64,
) -> PyResult<()> {
    let call = RmsForward {
        device,
        stream,
        dtypes: dtypes(x_dtype, w_dtype, y_dtype)?,
        rows,
        hidden,
        x,
        w: weight,
        y,
        rstd,
        residual,
        sum_out,
        eps,
        offset,
        cast_before,
    };
    py.detach(|| catch_panics(|| rms_norm_forward(&call)))?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn backward_call(
    device: i32,
    stream: u64,
    dy: u64,
    x: u64,
    weight: u64,
    rstd: u64,
    dx: u64,
    dw: u64,
    dw_partial: u64,
    partial_rows: u64,
    dres: u64,
    rows: u64,
    hidden: u64,
    x_dtype: &str,
    w_dtype: &str,
    y_dtype: &str,
    offset: f32,
    cast_before: bool,
) -> Result<RmsBackward> {
    Ok(RmsBackward {
        device,
        stream,
        dtypes: dtypes(x_dtype, w_dtype, y_dtype)?,
        rows,
        hidden,
        dy,
        x,
        w: weight,
        rstd,
        dx,
        dw,
        dw_partial,
        partial_rows,
        dres,
        offset,
        cast_before,
    })
}

/// Rows of the float32 (rows, hidden) buffer `cuda_rms_norm_backward` needs as `dw_partial`
/// for these tensors (the alignment of their addresses picks the kernel: pass the same `dres`).
#[pyfunction]
#[pyo3(signature = (*, device, dy, x, weight, dx, rows, hidden, x_dtype, w_dtype, y_dtype, dres=0))]
#[allow(clippy::too_many_arguments)]
fn cuda_rms_norm_backward_parts(
    py: Python<'_>,
    device: i32,
    dy: u64,
    x: u64,
    weight: u64,
    dx: u64,
    rows: u64,
    hidden: u64,
    x_dtype: &str,
    w_dtype: &str,
    y_dtype: &str,
    dres: u64,
) -> PyResult<u64> {
    let call = backward_call(
        device, 0, dy, x, weight, 0, dx, 1, 0, 0, dres, rows, hidden, x_dtype, w_dtype, y_dtype,
        0.0, true,
    )?;
    Ok(py.detach(|| catch_panics(|| rms_norm_backward_parts(&call)))?)
}

/// RMSNorm backward; `dw` = 0: no weight gradient (then `dw_partial` may be 0); `dres` (0:
/// none) is added to dx before its rounding.
#[pyfunction]
#[pyo3(signature = (*, device, stream, dy, x, weight, rstd, dx, dw, dw_partial, partial_rows, rows, hidden,
    x_dtype, w_dtype, y_dtype, offset, cast_before, dres=0))]
#[allow(clippy::too_many_arguments)]
fn cuda_rms_norm_backward(
    py: Python<'_>,
    device: i32,
    stream: u64,
    dy: u64,
    x: u64,
    weight: u64,
    rstd: u64,
    dx: u64,
    dw: u64,
    dw_partial: u64,
    partial_rows: u64,
    rows: u64,
    hidden: u64,
    x_dtype: &str,
    w_dtype: &str,
    y_dtype: &str,
    offset: f32,
    cast_before: bool,
    dres: u64,
) -> PyResult<()> {
    let call = backward_call(
        device,
        stream,
        dy,
        x,
        weight,
        rstd,
        dx,
        dw,
        dw_partial,
        partial_rows,
        dres,
        rows,
        hidden,
        x_dtype,
        w_dtype,
        y_dtype,
        offset,
        cast_before,
    )?;
    py.detach(|| catch_panics(|| rms_norm_backward(&call)))?;
    Ok(())
}

/// The kernel code of a gated norm's activation: SiLU (Qwen3-Next) or sigmoid (Kimi).
fn gate_activation(name: &str) -> Result<i32> {
    Activation::parse_one_of(name, GATE_ACTIVATIONS)
        .map(Activation::code)
        .map_err(CudaError::argument)
}

/// Gated RMSNorm on torch's stream `stream` of GPU `device`; see [`GatedRmsCall`]. Forward
/// when `dy` is 0 (writes y and rstd), else the backward (writes dx into `y`, dgate, and dw
/// when it is not 0, through `dw_partial`).
#[pyfunction]
#[pyo3(signature = (*, device, stream, x, gate, weight, y, rstd, rows, hidden, x_dtype, w_dtype, eps, cast_before,
    activation, gate_first=false, groups=1, dy=0, dgate=0, dw=0, dw_partial=0, partial_rows=0))]
#[allow(clippy::too_many_arguments)]
fn cuda_gated_rms_norm(
    py: Python<'_>,
    device: i32,
    stream: u64,
    x: u64,
    gate: u64,
    weight: u64,
    y: u64,
    rstd: u64,
    rows: u64,
    hidden: u64,
    x_dtype: &str,
    w_dtype: &str,
    eps: f32,
    cast_before: bool,
    activation: &str,
    gate_first: bool,
    groups: u64,
    dy: u64,
    dgate: u64,
    dw: u64,
    dw_partial: u64,
    partial_rows: u64,
) -> PyResult<()> {
    let call = GatedRmsCall {
        device,
        stream,
        x_dtype: Dtype::parse(x_dtype)?,
        w_dtype: Dtype::parse(w_dtype)?,
        rows,
        hidden,
        x,
        gate,
        w: weight,
        y,
        rstd,
        dy,
        dgate,
        dw,
        dw_partial,
        partial_rows,
        eps,
        cast_before,
        act: gate_activation(activation)?,
        gate_first,
        groups,
    };
    py.detach(|| {
        catch_panics(|| {
            if dy == 0 {
                gated_rms_norm_forward(&call)
            } else {
                gated_rms_norm_backward(&call)
            }
        })
    })?;
    Ok(())
}

/// Rows of the float32 (rows, hidden) buffer the gated backward needs as `dw_partial` for
/// these tensors (their alignment picks the kernel: pass the backward's addresses).
#[pyfunction]
#[pyo3(signature = (*, device, x, gate, weight, dy, dx, dgate, rows, hidden, x_dtype, w_dtype, gate_first=false,
    groups=1))]
#[allow(clippy::too_many_arguments)]
fn cuda_gated_rms_norm_backward_parts(
    py: Python<'_>,
    device: i32,
    x: u64,
    gate: u64,
    weight: u64,
    dy: u64,
    dx: u64,
    dgate: u64,
    rows: u64,
    hidden: u64,
    x_dtype: &str,
    w_dtype: &str,
    gate_first: bool,
    groups: u64,
) -> PyResult<u64> {
    let call = GatedRmsCall {
        device,
        stream: 0,
        x_dtype: Dtype::parse(x_dtype)?,
        w_dtype: Dtype::parse(w_dtype)?,
        rows,
        hidden,
        x,
        gate,
        w: weight,
        y: dx,
        rstd: 0,
        dy,
        dgate,
        dw: 1,
        dw_partial: 0,
        partial_rows: 0,
        eps: 0.0,
        cast_before: true,
        act: 0,
        gate_first,
        groups,
    };
    Ok(py.detach(|| catch_panics(|| gated_rms_norm_backward_parts(&call)))?)
}

/// Rotary embedding of q and k (or, with `transpose`, its backward); see [`RopeCall`].
#[pyfunction]
#[pyo3(signature = (*, device, stream, q, k, cos, sin, q_out, k_out, q_strides, k_strides, cos_strides,
    sin_strides, q_out_strides, k_out_strides, p0, p1, q_heads, k_heads, head_dim, rot_dim, interleaved,
    transpose, in_dtype, cs_dtype, out_dtype))]
#[allow(clippy::too_many_arguments)]
fn cuda_rotary(
    py: Python<'_>,
    device: i32,
    stream: u64,
    q: u64,
    k: u64,
    cos: u64,
    sin: u64,
    q_out: u64,
    k_out: u64,
    q_strides: [u64; 3],
    k_strides: [u64; 3],
    cos_strides: [u64; 2],
    sin_strides: [u64; 2],
    q_out_strides: [u64; 3],
    k_out_strides: [u64; 3],
    p0: u64,
    p1: u64,
    q_heads: u64,
    k_heads: u64,
    head_dim: u64,
    rot_dim: u64,
    interleaved: bool,
    transpose: bool,
    in_dtype: &str,
    cs_dtype: &str,
    out_dtype: &str,
) -> PyResult<()> {
    let call = RopeCall {
        device,
        stream,
        dtypes: (
            Dtype::parse(in_dtype)?,
            Dtype::parse(cs_dtype)?,
            Dtype::parse(out_dtype)?,
        ),
        q,
        k,
        cos,
        sin,
        q_out,
        k_out,
        q_strides,
        k_strides,
        q_out_strides,
        k_out_strides,
        cos_strides,
        sin_strides,
        p0,
        p1,
        q_heads,
        k_heads,
        head_dim,
        rot_dim,
        interleaved,
        transpose,
    };
    py.detach(|| catch_panics(|| rotary(&call)))?;
    Ok(())
}

/// The gated product (forward: `dout` and `dup` 0; backward: `out` is dgate, with dgate
/// and dup of row stride `ld_grad`, default `cols`); see [`GatedCall`]. `activation`:
/// "silu" or "gelu_tanh".
#[pyfunction]
#[pyo3(signature = (*, device, stream, gate, up, dout, out, dup, rows, cols, ld_gate, ld_up, dtype, activation, backward, ld_grad=None, limit=None, clamp_after_activation=false, grad_at_bound=false, alpha=None, interleaved=false))]
#[allow(clippy::too_many_arguments)]
fn cuda_gated_act(
    py: Python<'_>,
    device: i32,
    stream: u64,
    gate: u64,
    up: u64,
    dout: u64,
    out: u64,
    dup: u64,
    rows: u64,
    cols: u64,
    ld_gate: u64,
    ld_up: u64,
    dtype: &str,
    activation: &str,
    backward: bool,
    ld_grad: Option<u64>,
    limit: Option<f64>,
    clamp_after_activation: bool,
    grad_at_bound: bool,
    alpha: Option<f64>,
    interleaved: bool,
) -> PyResult<()> {
    let act =
        Activation::parse_one_of(activation, PRODUCT_ACTIVATIONS).map_err(CudaError::argument)?;
    let clamp =
        Clamp::of(limit, clamp_after_activation, grad_at_bound).map_err(CudaError::argument)?;
    let alpha = alpha_of(act, alpha).map_err(CudaError::argument)?;
    let call = GatedCall {
        device,
        stream,
        dtype: Dtype::parse(dtype)?,
        rows,
        cols,
        ld_gate,
        ld_up,
        ld_grad: ld_grad.unwrap_or(cols),
        gate,
        up,
        dout,
        out,
        dup,
        act: act.code(),
        clamp,
        alpha,
        pairs: interleaved,
        backward,
    };
    py.detach(|| catch_panics(|| gated_act(&call)))?;
    Ok(())
}

/// DeepSeek-V4's unweighted scale-first RMSNorm on torch's stream: with `dy` = 0 the forward
/// (`out` = y, `rstd` written), else the backward (`out` = dx, `rstd` read).
#[pyfunction]
#[pyo3(signature = (*, device, stream, x, out, rstd, rows, hidden, dtype, eps=0.0, dy=0))]
#[allow(clippy::too_many_arguments)]
fn cuda_rms_scale_first(
    py: Python<'_>,
    device: i32,
    stream: u64,
    x: u64,
    out: u64,
    rstd: u64,
    rows: u64,
    hidden: u64,
    dtype: &str,
    eps: f32,
    dy: u64,
) -> PyResult<()> {
    let call = RmsScaleFirstCall {
        device,
        stream,
        dtype: Dtype::parse(dtype)?,
        rows,
        hidden,
        x,
        dy,
        out,
        rstd,
        eps,
    };
    py.detach(|| {
        catch_panics(|| {
            if dy == 0 {
                rms_scale_first_forward(&call)
            } else {
                rms_scale_first_backward(&call)
            }
        })
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_blocks_have_the_kernels_layout() {
        // The sizes of the C structs (8-byte aligned, fields in declaration order).
        assert_eq!(std::mem::size_of::<RmsFwdParams>(), 80);
        assert_eq!(std::mem::size_of::<RmsBwdParams>(), 80);
        // The residual add's pointers follow the old fields, where rms_norm.cu has them.
        assert_eq!(std::mem::offset_of!(RmsFwdParams, pad), 60);
        assert_eq!(std::mem::offset_of!(RmsFwdParams, residual), 64);
        assert_eq!(std::mem::offset_of!(RmsFwdParams, sum_out), 72);
        assert_eq!(std::mem::offset_of!(RmsBwdParams, cast_before), 68);
        assert_eq!(std::mem::offset_of!(RmsBwdParams, dres), 72);
        assert_eq!(std::mem::size_of::<RopeParams>(), 208);
        assert_eq!(std::mem::size_of::<GatedParams>(), 104);
        assert_eq!(std::mem::offset_of!(GatedParams, interleaved), 100);
        assert_eq!(std::mem::offset_of!(GatedParams, limit), 88);
        // gated RMSNorm: eight pointers, rows, then six ints (groups last)
        assert_eq!(std::mem::size_of::<GatedRmsParams>(), 96);
        assert_eq!(std::mem::offset_of!(GatedRmsParams, groups), 92);
        // scale-first RMSNorm: four pointers, rows, hidden, eps
        assert_eq!(std::mem::size_of::<RmsScaleFirstParams>(), 48);
        assert_eq!(std::mem::offset_of!(RmsScaleFirstParams, rows), 32);
        assert_eq!(std::mem::offset_of!(RmsScaleFirstParams, eps), 44);
    }

    #[test]
    fn rms_scale_first_blocks_are_whole_warps_up_to_512() {
        for (hidden, block) in [(1, 32), (8, 32), (32, 32), (33, 64), (300, 320), (512, 512)] {
            assert_eq!(rms_scale_first_block(hidden), block, "hidden {hidden}");
        }
        assert_eq!(rms_scale_first_block(7168), 512);
    }

    #[test]
    fn gated_grids_cover_whole_rounds_of_groups() {
        for (grid, teams, groups) in [
            (132, 8, 1),
            (132, 8, 8),
            (132, 8, 3),
            (132, 4, 8),
            (264, 16, 48),
            (1, 1, 5),
            (7, 2, 6),
        ] {
            let g = grid_for_groups(grid, teams, groups).unwrap();
            assert_eq!(
                (g as u64 * teams as u64) % groups,
                0,
                "grid {grid} teams {teams} groups {groups}: {g}"
            );
            assert!(
                g >= 1 && (g <= grid || g as u64 <= groups),
                "{g} from {grid}"
            );
        }
        assert_eq!(grid_for_groups(132, 8, 1).unwrap(), 132);
        assert_eq!(grid_for_groups(132, 8, 3).unwrap(), 132);
        assert_eq!(grid_for_groups(132, 4, 8).unwrap(), 132);
        assert_eq!(grid_for_groups(7, 2, 6).unwrap(), 6);
    }

    #[test]
    fn rms_layouts_cover_the_row() {
        for hidden in (8..=40_000u64).step_by(8) {
            let l = rms_layout(hidden, true);
            if l.nv == 0 {
                assert!(
                    hidden > 4 * 512 * 8,
                    "hidden {hidden} fell back to the any kernel"
                );
                continue;
            }
            assert!([1, 2, 4].contains(&l.nv));
            assert!(
                l.team as u64 * l.nv as u64 * 8 >= hidden,
                "hidden {hidden}: {l:?}"
            );
            assert!(l.block.is_multiple_of(32) && l.block <= 512 && l.block.is_multiple_of(l.team));
            assert!(l.team <= 32 && l.team.is_power_of_two() || l.team == l.block);
            // The backward's shared memory for several teams per block: at most 32 KiB.
            assert!(l.rows_per_block() == 1 || l.rows_per_block() as u64 * hidden * 4 <= 32768);
        }
        let q_norm = rms_layout(128, true);
        assert_eq!(
            (q_norm.team, q_norm.nv, q_norm.rows_per_block()),
            (16, 1, 16)
        );
        assert_eq!(rms_layout(2048, true).block, 256);
        assert_eq!(
            rms_layout(100, true).nv,
            0,
            "hidden % 8 != 0: the any kernel"
        );
        assert_eq!(rms_layout(2048, false).nv, 0, "misaligned: the any kernel");
        let any = rms_layout(3, true);
        assert_eq!((any.team, any.block), (32, 32));
    }

    #[test]
    fn rms_forward_layouts_cover_the_row() {
        for hidden in (8..=40_000u64).step_by(8) {
            let (f, b) = (rms_forward_layout(hidden, true), rms_layout(hidden, true));
            if f.nv == 0 {
                assert_eq!(f, b, "hidden {hidden}");
                continue;
            }
            assert!(
                f.team as u64 * f.nv as u64 * 8 >= hidden,
                "hidden {hidden}: {f:?}"
            );
            assert!(f.block.is_multiple_of(32) && f.block <= 512 && f.block.is_multiple_of(f.team));
            assert!(f.team <= 32 && f.team.is_power_of_two() || f.team == f.block);
        }
        let shape = |h| {
            let l = rms_forward_layout(h, true);
            (l.team, l.nv, l.rows_per_block())
        };
        assert_eq!(
            shape(128),
            (16, 1, 16),
            "Qwen3's q/k norms: as the backward"
        );
        assert_eq!(shape(1024), (128, 1, 1));
        assert_eq!(shape(2048), (256, 1, 1));
        assert_eq!(shape(3072), (192, 2, 1));
        assert_eq!(shape(4096), (256, 2, 1));
        assert_eq!(shape(5120), (320, 2, 1));
        assert_eq!(shape(8192), (512, 2, 1));
        assert_eq!(shape(16384), (512, 4, 1));
        assert_eq!(
            rms_forward_layout(2048, false).nv,
            0,
            "misaligned: the any kernel"
        );
    }

    fn forward_call(hidden: u64, residual: u64, sum_out: u64) -> RmsForward {
        RmsForward {
            device: 0,
            stream: 0,
            dtypes: RmsDtypes {
                x: Dtype::Bf16,
                w: Dtype::Bf16,
                y: Dtype::Bf16,
            },
            rows: 4,
            hidden,
            x: 0x1000,
            w: 0x2000,
            y: 0x3000,
            rstd: 0x4000,
            residual,
            sum_out,
            eps: 1e-6,
            offset: 0.0,
            cast_before: true,
        }
    }

    #[test]
    fn rms_forward_residual_add_picks_its_kernels() {
        let plain = forward_call(4096, 0, 0);
        assert_eq!(
            plain.kernel(plain.layout()).unwrap(),
            "rms_fwd_bf16_bf16_bf16_v2"
        );
        let add = forward_call(4096, 0x5000, 0x6000);
        assert_eq!(add.layout(), plain.layout());
        assert_eq!(
            add.kernel(add.layout()).unwrap(),
            "rms_fwd_add_bf16_bf16_bf16_v2"
        );
        // A misaligned residual or sum: the any kernel, as for a misaligned x.
        for (r, s) in [(0x5002, 0x6000), (0x5000, 0x6008)] {
            let c = forward_call(4096, r, s);
            assert_eq!(c.layout().nv, 0);
            assert_eq!(
                c.kernel(c.layout()).unwrap(),
                "rms_fwd_add_bf16_bf16_bf16_any"
            );
        }
        for (r, s) in [(0x5000, 0), (0, 0x6000)] {
            let c = forward_call(4096, r, s);
            let e = c.kernel(c.layout()).unwrap_err().to_string();
            assert!(e.contains("residual") && e.contains("sum_out"), "{e}");
        }
    }

    #[test]
    fn rms_backward_layout_takes_dres_alignment() {
        let call = |dres| RmsBackward {
            device: 0,
            stream: 0,
            dtypes: RmsDtypes {
                x: Dtype::F16,
                w: Dtype::F32,
                y: Dtype::F16,
            },
            rows: 4,
            hidden: 2048,
            dy: 0x1000,
            x: 0x2000,
            w: 0x3000,
            rstd: 0x4000,
            dx: 0x5000,
            dw: 0x6000,
            dw_partial: 0x7000,
            partial_rows: 1,
            dres,
            offset: 0.0,
            cast_before: true,
        };
        assert_eq!(call(0).layout(), rms_layout(2048, true), "no dres");
        assert_eq!(call(0x8000).layout(), rms_layout(2048, true));
        assert_eq!(
            call(0x8004).layout().nv,
            0,
            "misaligned dres: the any kernel"
        );
    }

    #[test]
    fn dtype_combinations() {
        let d = |x, w, y| RmsDtypes { x, w, y }.name();
        assert_eq!(
            d(Dtype::Bf16, Dtype::F32, Dtype::Bf16).unwrap(),
            "bf16_f32_bf16"
        );
        assert!(d(Dtype::Bf16, Dtype::F16, Dtype::Bf16).is_err());
        assert!(d(Dtype::F16, Dtype::F16, Dtype::Bf16).is_err());
    }
}
