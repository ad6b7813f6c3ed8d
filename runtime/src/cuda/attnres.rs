//! Launcher of the AttnRes mix kernels (`kernels/attnres_mix.cu`) and their Python functions
//! `_native.cuda_attnres_mix_forward` / `cuda_attnres_mix_backward`. The parameter block
//! [`AttnresParams`] mirrors the `.cu` struct field for field. Every buffer is a torch
//! allocation made by `forward_rewrite/_attnres_op.py` (contiguous `tokens x hidden` sources,
//! output and gradients of one dtype; `u` float32; `du_partial` float32 `parts x hidden`).

use std::ffi::c_void;

use cudarc::driver::sys as drv_sys;
use pyo3::prelude::*;

use super::device::{self, Dims, Dtype, ModuleSource, launch};
use super::error::{CudaError, Result, catch_panics};

pub const MAX_SOURCES: usize = 32;
const BLOCK: u32 = 256;

pub const ATTNRES_MIX: ModuleSource = ModuleSource {
    name: "attnres_mix.cu",
    source: concat!(
        include_str!("../../../kernels/fusion_common.cuh"),
        include_str!("../../../kernels/attnres_mix.cu")
    ),
};

#[repr(C)]
struct AttnresParams {
    src: [u64; MAX_SOURCES],
    dsrc: [u64; MAX_SOURCES],
    u: u64,
    grad: u64,
    out: u64,
    du_partial: u64,
    tokens: i64,
    hidden: i64,
    eps: f32,
    scale: f32,
    n: i32,
    /// Staged kernels: stages of the shared-memory ring.
    stages: i32,
    /// Staged kernels: token groups (forward: the grid; backward: the du partial rows).
    parts: i64,
}

/// One forward (`grad == 0`) or backward call.
#[derive(Clone, Debug)]
pub struct MixCall {
    pub device: i32,
    pub stream: u64,
    pub dtype: Dtype,
    pub tokens: u64,
    pub hidden: u64,
    pub sources: Vec<u64>,
    pub u: u64,
    pub eps: f32,
    pub scale: f32,
    /// Forward: the output.
    pub out: u64,
    /// Backward: the output's gradient, the sources' gradients, the partials of `du` and
    /// their count (the grid).
    pub grad: u64,
    pub dsources: Vec<u64>,
    pub du_partial: u64,
    pub parts: u64,
}

fn nonzero(name: &str, p: u64) -> Result<()> {
    if p == 0 {
        Err(CudaError::argument(format!("{name}: null pointer")))
    } else {
        Ok(())
    }
}

pub fn mix(c: &MixCall) -> Result<()> {
    let n = c.sources.len();
    if n == 0 || n > MAX_SOURCES {
        return Err(CudaError::argument(format!(
            "sources: {n} given, 1 to {MAX_SOURCES} supported"
        )));
    }
    let backward = c.grad != 0;
    if backward && c.dsources.len() != n {
        return Err(CudaError::argument("dsources: one per source".to_string()));
    }
    if c.tokens == 0 || c.hidden == 0 {
        return Ok(());
    }
    for (i, s) in c.sources.iter().enumerate() {
        nonzero(&format!("sources[{i}]"), *s)?;
    }
    nonzero("u", c.u)?;
    let mut params = AttnresParams {
        src: [0; MAX_SOURCES],
        dsrc: [0; MAX_SOURCES],
        u: c.u,
        grad: c.grad,
        out: c.out,
        du_partial: c.du_partial,
        tokens: c.tokens as i64,
        hidden: c.hidden as i64,
        eps: c.eps,
        scale: c.scale,
        n: n as i32,
        stages: 0,
        parts: 0,
    };
    params.src[..n].copy_from_slice(&c.sources);
    if backward {
        for (i, d) in c.dsources.iter().enumerate() {
            nonzero(&format!("dsources[{i}]"), *d)?;
        }
        nonzero("du_partial", c.du_partial)?;
        if c.parts == 0 || c.parts > c.tokens.max(1) || c.parts > i32::MAX as u64 {
            return Err(CudaError::argument(format!(
                "parts: {} for {} tokens",
                c.parts, c.tokens
            )));
        }
        params.dsrc[..n].copy_from_slice(&c.dsources);
    } else {
        nonzero("out", c.out)?;
    }
    let direction = if backward { "bwd" } else { "fwd" };
    let mut guard = device::lock(c.device)?;
    let dev = guard.dev();
    if let Some(plan) = staged_plan(
        c,
        n,
        target_arch(&dev.target),
        dev.max_smem_optin.max(0) as u32,
    ) {
        let name = format!("attnres_{direction}_{}{}", c.dtype.suffix(), plan.suffix);
        let f = dev.function_with_max_smem(&ATTNRES_MIX, &name)?;
        // SAFETY: `f` comes from ATTNRES_MIX.
        let resident =
            unsafe { dev.blocks_per_sm(&ATTNRES_MIX, f, plan.block, plan.smem)? } * dev.sms();
        // Persistent blocks, as many as are resident (one per SM where the ring fills the
        // shared memory). The backward's blocks share out the caller's `parts` token groups, each
        // writing the du partial rows of its groups, so the partials do not depend on the grid.
        let (grid, parts) = if backward {
            let grid = c.parts.min(resident as u64);
            (grid, c.parts)
        } else {
            let grid = c.tokens.min(resident as u64);
            (grid, grid)
        };
        params.stages = plan.stages as i32;
        params.parts = parts as i64;
        let dims = Dims {
            smem: plan.smem,
            ..Dims::new((grid.max(1) as u32, 1, 1), plan.block)
        };
        // SAFETY: as below; the kernel's shared memory is `plan.smem` bytes (staged_plan).
        return unsafe {
            launch(
                f,
                dims,
                c.stream as drv_sys::CUstream,
                &mut [&mut params as *mut AttnresParams as *mut c_void],
                "attnres_mix",
            )
        };
    }
    let name = format!(
        "attnres_{direction}_{}{}",
        c.dtype.suffix(),
        register_suffix(c, n)
    );
    let f = dev.function(&ATTNRES_MIX, &name)?;
    // The forward's blocks loop over rows, each prefetching its next row into L2 while it
    // works on the current one: as many blocks as are resident, no more (a block of a later
    // wave would start on a row nobody prefetched).
    let grid = if backward {
        c.parts as u32 // one float32 du partial row per block
    } else {
        // SAFETY: `f` comes from ATTNRES_MIX.
        let resident = unsafe { dev.blocks_per_sm(&ATTNRES_MIX, f, BLOCK, 0)? } * dev.sms();
        c.tokens.min(resident as u64) as u32
    };
    // SAFETY: the parameter block matches AttnresParams; every buffer holds tokens x hidden
    // elements (du_partial: parts x hidden floats), checked by the Python caller.
    unsafe {
        launch(
            f,
            Dims::new((grid.max(1), 1, 1), BLOCK),
            c.stream as drv_sys::CUstream,
            &mut [&mut params as *mut AttnresParams as *mut c_void],
            "attnres_mix",
        )
    }
}

/// `_r{VPT}` when the register-cached kernels take the call (kernels/attnres_mix.cu): 16-bit
/// sources, `hidden % 8 == 0` and at most 4096, 16-byte aligned buffers, and no more sources
/// than the instance caches (16 up to 2048 columns, 12 up to 4096); "" (the two-read kernels)
/// otherwise. Wider rows (a VPT-4 instance caching 6 sources would fit) stay on the two-read
/// kernels until such an instance has been checked on a GPU.
fn register_suffix(c: &MixCall, n: usize) -> &'static str {
    let (suffix, max_sources) = match c.hidden.div_ceil(8 * BLOCK as u64) {
        1 => ("_r1", 16),
        2 => ("_r2", 12),
        _ => return "",
    };
    if c.dtype == Dtype::F32 || !c.hidden.is_multiple_of(8) || n > max_sources || !aligned(c) {
        return "";
    }
    suffix
}

/// How the staged kernels (kernels/attnres_mix.cu, `_s{1,2,4}`) take a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Staged {
    suffix: &'static str,
    block: u32,
    /// Stages of the ring (tokens whose rows are in shared memory or on their way).
    stages: u32,
    /// Dynamic shared memory: the ring, the reduction and one mbarrier per stage.
    smem: u32,
}

/// Sources the staged kernels take (ATTNRES_STAGED_NMAX).
const STAGED_MAX_SOURCES: usize = 16;
/// Stages the ring never exceeds: three tokens in flight while one is worked on are, by the
/// bytes-in-flight estimate, already more than an SM needs (H200: 3 stages at n = 9, 4096
/// columns, forward 1.48x the bytes floor; 4 was not compared); more stages would only take
/// shared memory that smaller rows could give to a second block.
const STAGED_MAX_STAGES: u64 = 4;

/// The staged kernels' plan for a call, or None where they do not apply: they need sm_90
/// (bulk copies and mbarrier transaction counts; `arch` is the architecture the module is
/// compiled for), 16-bit sources, `hidden % 8 == 0` between 1024 and 8192 columns (narrower
/// rows stay on the register kernels, where a token's barriers weigh more against its bytes:
/// not measured below 1024, while at 2048 (n = 5) the staged forward took 0.19 ms against
/// the register kernel's 0.60; wider: no instance), 16-byte aligned
/// buffers (every row is then 16-byte aligned, as a bulk copy needs), at most 16 sources and
/// at least two stages (n source rows, plus the output gradient's in the backward) in the
/// `smem_optin` bytes a block may opt into.
fn staged_plan(c: &MixCall, n: usize, arch: i32, smem_optin: u32) -> Option<Staged> {
    let (suffix, block) = match c.hidden {
        1024..=2048 => ("_s1", 256),
        2049..=4096 => ("_s2", 512),
        4097..=8192 => ("_s4", 512),
        _ => return None,
    };
    if arch < 90
        || c.dtype == Dtype::F32
        || !c.hidden.is_multiple_of(8)
        || n > STAGED_MAX_SOURCES
        || !aligned(c)
    {
        return None;
    }
    let backward = c.grad != 0;
    let rows = n as u64 + u64::from(backward);
    let stage = rows * c.hidden * 2;
    // The reduction: 32 (forward) or 64 (backward) floats per warp.
    let reduction = if backward { 64 } else { 32 } * (block as u64 / 32) * 4;
    let stages =
        (u64::from(smem_optin).saturating_sub(reduction) / (stage + 8)).min(STAGED_MAX_STAGES);
    if stages < 2 {
        return None;
    }
    Some(Staged {
        suffix,
        block,
        stages: stages as u32,
        smem: (stages * (stage + 8) + reduction) as u32,
    })
}

/// The architecture a device target names ("sm_90" or "compute_90": 90).
fn target_arch(target: &str) -> i32 {
    let digits: String = target
        .rsplit('_')
        .next()
        .unwrap_or("")
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().unwrap_or(0)
}

/// Every buffer of the call 16-byte aligned.
fn aligned(c: &MixCall) -> bool {
    let mut ptrs = c.sources.clone();
    ptrs.extend([c.u, c.out, c.grad, c.du_partial]);
    ptrs.extend(&c.dsources);
    ptrs.iter().all(|p| p % 16 == 0)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cuda_attnres_mix_forward, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_attnres_mix_backward, m)?)?;
    Ok(())
}

/// The mix forward on torch's stream `stream` of GPU `device`.
#[pyfunction]
#[pyo3(signature = (*, device, stream, sources, u, out, tokens, hidden, dtype, eps, scale))]
#[allow(clippy::too_many_arguments)]
fn cuda_attnres_mix_forward(
    py: Python<'_>,
    device: i32,
    stream: u64,
    sources: Vec<u64>,
    u: u64,
    out: u64,
    tokens: u64,
    hidden: u64,
    dtype: &str,
    eps: f32,
    scale: f32,
) -> PyResult<()> {
    let call = MixCall {
        device,
        stream,
        dtype: Dtype::parse(dtype)?,
        tokens,
        hidden,
        sources,
        u,
        eps,
        scale,
        out,
        grad: 0,
        dsources: Vec::new(),
        du_partial: 0,
        parts: 0,
    };
    py.detach(|| catch_panics(|| mix(&call)))?;
    Ok(())
}

/// The mix backward: the sources' gradients and `parts` partial rows of `du`.
#[pyfunction]
#[pyo3(signature = (*, device, stream, sources, u, grad, dsources, du_partial, parts, tokens, hidden, dtype, eps, scale))]
#[allow(clippy::too_many_arguments)]
fn cuda_attnres_mix_backward(
    py: Python<'_>,
    device: i32,
    stream: u64,
    sources: Vec<u64>,
    u: u64,
    grad: u64,
    dsources: Vec<u64>,
    du_partial: u64,
    parts: u64,
    tokens: u64,
    hidden: u64,
    dtype: &str,
    eps: f32,
    scale: f32,
) -> PyResult<()> {
    nonzero("grad", grad)?;
    let call = MixCall {
        device,
        stream,
        dtype: Dtype::parse(dtype)?,
        tokens,
        hidden,
        sources,
        u,
        eps,
        scale,
        out: 0,
        grad,
        dsources,
        du_partial,
        parts,
    };
    py.detach(|| catch_panics(|| mix(&call)))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_block_has_the_kernels_layout() {
        // 64 pointers, 4 pointers, 2 i64, 2 f32, 2 i32, 1 i64 (8-byte aligned C struct).
        assert_eq!(
            std::mem::size_of::<AttnresParams>(),
            64 * 8 + 4 * 8 + 16 + 8 + 8 + 8
        );
    }

    fn call(dtype: Dtype, hidden: u64, n: usize, base: u64) -> MixCall {
        MixCall {
            device: 0,
            stream: 0,
            dtype,
            tokens: 16,
            hidden,
            sources: (0..n as u64).map(|i| base + i * (1 << 20)).collect(),
            u: 1 << 30,
            eps: 1e-6,
            scale: 1.0,
            out: 1 << 31,
            grad: 0,
            dsources: vec![],
            du_partial: 0,
            parts: 0,
        }
    }

    #[test]
    fn register_kernels_take_the_shapes_they_cache() {
        let base = 1 << 32;
        assert_eq!(
            register_suffix(&call(Dtype::Bf16, 2048, 16, base), 16),
            "_r1"
        );
        assert_eq!(register_suffix(&call(Dtype::Bf16, 4096, 9, base), 9), "_r2");
        assert_eq!(
            register_suffix(&call(Dtype::F16, 3072, 12, base), 12),
            "_r2"
        );
        assert_eq!(register_suffix(&call(Dtype::Bf16, 8192, 6, base), 6), "");
        // more sources than the instance caches, float32, ragged or too wide rows, misaligned
        assert_eq!(register_suffix(&call(Dtype::Bf16, 4096, 13, base), 13), "");
        assert_eq!(register_suffix(&call(Dtype::Bf16, 8192, 9, base), 9), "");
        assert_eq!(register_suffix(&call(Dtype::F32, 4096, 9, base), 9), "");
        assert_eq!(register_suffix(&call(Dtype::Bf16, 4100, 9, base), 9), "");
        assert_eq!(register_suffix(&call(Dtype::Bf16, 16384, 2, base), 2), "");
        assert_eq!(
            register_suffix(&call(Dtype::Bf16, 4096, 9, base + 8), 9),
            ""
        );
    }

    fn backward(mut c: MixCall) -> MixCall {
        c.grad = 1 << 33;
        c.dsources = c.sources.iter().map(|s| s + (1 << 34)).collect();
        c.du_partial = 1 << 35;
        c.parts = 16;
        c.out = 0;
        c
    }

    /// The H100's and H200's opt-in shared memory per block.
    const SM90_SMEM: u32 = 232_448;

    #[test]
    fn staged_kernels_take_sm90_rows_whose_ring_fits() {
        let base = 1 << 32;
        let plan = |c: &MixCall, arch| staged_plan(c, c.sources.len(), arch, SM90_SMEM);
        // The benchmark's shape: three forward stages of 9 rows, two backward stages of 10.
        let fwd = call(Dtype::Bf16, 4096, 9, base);
        assert_eq!(
            plan(&fwd, 90),
            Some(Staged {
                suffix: "_s2",
                block: 512,
                stages: 3,
                smem: 3 * (9 * 8192 + 8) + 32 * 16 * 4,
            })
        );
        assert_eq!(
            plan(&backward(fwd.clone()), 90),
            Some(Staged {
                suffix: "_s2",
                block: 512,
                stages: 2,
                smem: 2 * (10 * 8192 + 8) + 64 * 16 * 4,
            })
        );
        for (hidden, n, suffix, block, stages) in [
            (1024, 1, "_s1", 256, 4),
            (2048, 16, "_s1", 256, 3),
            (3072, 5, "_s2", 512, 4),
            (8192, 6, "_s4", 512, 2),
        ] {
            let p = plan(&call(Dtype::F16, hidden, n, base), 90).expect("staged");
            assert_eq!((p.suffix, p.block, p.stages), (suffix, block, stages));
            assert!(p.smem <= SM90_SMEM);
        }
        // Not before sm_90 (nor on PTX for an older architecture), not float32, ragged,
        // narrow or too wide rows, more than 16 sources, misaligned buffers, or fewer than
        // two stages in shared memory (8192 columns: 7 sources forward, 5 backward).
        assert_eq!(plan(&fwd, 89), None);
        assert_eq!(plan(&fwd, 80), None);
        assert_eq!(plan(&call(Dtype::F32, 4096, 9, base), 90), None);
        assert_eq!(plan(&call(Dtype::Bf16, 4100, 9, base), 90), None);
        assert_eq!(plan(&call(Dtype::Bf16, 512, 9, base), 90), None);
        assert_eq!(plan(&call(Dtype::Bf16, 16384, 2, base), 90), None);
        assert_eq!(plan(&call(Dtype::Bf16, 4096, 17, base), 90), None);
        assert_eq!(plan(&call(Dtype::Bf16, 4096, 9, base + 8), 90), None);
        assert!(plan(&call(Dtype::Bf16, 8192, 7, base), 90).is_some());
        assert_eq!(plan(&call(Dtype::Bf16, 8192, 8, base), 90), None);
        assert!(plan(&backward(call(Dtype::Bf16, 8192, 5, base)), 90).is_some());
        assert_eq!(plan(&backward(call(Dtype::Bf16, 8192, 6, base)), 90), None);
        // A device with less shared memory (sm_120: 99 KiB) keeps the other kernels.
        assert_eq!(staged_plan(&fwd, 9, 120, 101_376), None);
    }

    #[test]
    fn target_names_give_their_architecture() {
        assert_eq!(target_arch("sm_90"), 90);
        assert_eq!(target_arch("compute_90"), 90);
        assert_eq!(target_arch("sm_100"), 100);
        assert_eq!(target_arch("sm_90a"), 90);
        assert_eq!(target_arch("compute_80"), 80);
        assert_eq!(target_arch("odd"), 0);
    }
}
