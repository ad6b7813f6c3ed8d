//! The CPU backend of the fused linear + cross-entropy (ARCHITECTURE.md, contract 4):
//! chunked over tokens (and over the vocabulary when needed) within a memory budget,
//! float32 arithmetic on bf16/fp16/fp32 inputs, rayon for parallelism, never a
//! tokens x vocabulary buffer. `fusions` holds the decoder-fusion ops (RMSNorm, rotary
//! embedding, the gated MLP product): the CPU twins of the CUDA kernels.

mod element;
mod fused;
pub mod fusions;
mod gemm;
mod plan;
mod python;
#[cfg(test)]
mod reference;
#[cfg(test)]
mod tests;

pub use element::{DType, Element};
pub use fused::{FusedCeError, GradScale, Gradients, Options, Problem, fused_ce};
pub use plan::{MIN_ROWS, Plan, Shape};

use pyo3::prelude::*;

/// A tensor's memory as a slice, for the Python entry points (`python.rs`,
/// `fusions/python.rs`), which receive raw `data_ptr()` addresses.
///
/// # Safety
/// `ptr` is null only when `len == 0`, else points to `len` initialised, aligned elements
/// that live for the call and that nothing else of this call writes (the Python wrappers
/// and the entry points' region checks uphold it).
unsafe fn slice<'a, T>(ptr: usize, len: usize) -> &'a [T] {
    if len == 0 {
        return &[];
    }
    unsafe { std::slice::from_raw_parts(ptr as *const T, len) }
}

/// # Safety
/// As [`slice`], and nothing else of this call reads or writes the region.
unsafe fn slice_mut<'a, T>(ptr: usize, len: usize) -> &'a mut [T] {
    if len == 0 {
        return &mut [];
    }
    unsafe { std::slice::from_raw_parts_mut(ptr as *mut T, len) }
}

/// Adds this backend's functions to `forward_rewrite._native`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(python::cpu_fused_ce, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_threads, m)?)?;
    fusions::register(m)?;
    Ok(())
}

/// Worker threads the CPU backend computes with (rayon's global pool; set
/// `RAYON_NUM_THREADS` before the first call to change it).
#[pyfunction]
fn cpu_threads() -> usize {
    rayon::current_num_threads()
}
