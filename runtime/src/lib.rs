//! The forward-rewrite runtime: the fused linear + cross-entropy backends (CPU and CUDA)
//! and the Python module `forward_rewrite._native` that exposes them, together with the
//! rewriter's class analysis, to the Python package in `python/forward_rewrite/`.

use pyo3::prelude::*;

pub mod cpu;
pub mod cuda;
pub mod rewrite;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", forward_rewrite::version())?;
    cpu::register(m)?;
    cuda::register(m)?;
    rewrite::register(m)?;
    Ok(())
}
