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
mod regions;
#[cfg(test)]
mod tests;

pub use element::{DType, Element};
pub use fused::{FusedCeError, GradScale, Gradients, Options, Problem, fused_ce};
pub use plan::{MIN_ROWS, Plan, Shape};

use pyo3::prelude::*;

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
