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
    pad: i32,
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
        pad: 0,
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
    let name = format!(
        "attnres_{}_{}{}",
        if backward { "bwd" } else { "fwd" },
        c.dtype.suffix(),
        register_suffix(c, n)
    );
    let mut guard = device::lock(c.device)?;
    let dev = guard.dev();
    let f = dev.function(&ATTNRES_MIX, &name)?;
    // The forward's blocks loop over rows, each prefetching its next row into L2 while it
    // works on the current one: as many blocks as are resident, no more (a block of a later
    // wave would start on a row nobody prefetched).
    let grid = if backward {
        c.parts as u32 // one float32 du partial row per block
    } else {
        // SAFETY: `f` comes from ATTNRES_MIX.
        let resident =
            unsafe { dev.blocks_per_sm(&ATTNRES_MIX, f, BLOCK, 0)? } * dev.sm_count.max(1) as u32;
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
    let mut ptrs = c.sources.clone();
    ptrs.extend([c.u, c.out, c.grad, c.du_partial]);
    ptrs.extend(&c.dsources);
    let aligned = ptrs.iter().all(|p| p % 16 == 0);
    if c.dtype == Dtype::F32 || !c.hidden.is_multiple_of(8) || n > max_sources || !aligned {
        return "";
    }
    suffix
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
        // 64 pointers, 4 pointers, 2 i64, 2 f32, 2 i32 (8-byte aligned C struct).
        assert_eq!(
            std::mem::size_of::<AttnresParams>(),
            64 * 8 + 4 * 8 + 16 + 8 + 8
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
}
