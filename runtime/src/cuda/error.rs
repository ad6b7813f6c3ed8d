//! One error type for the CUDA backend: every failure (driver, cuBLAS, NVRTC, a bad
//! argument) becomes a Python `RuntimeError` or `ValueError` with a message that says which
//! step failed, never a panic across the FFI boundary.

use cudarc::cublas::result::CublasError;
use cudarc::driver::result::DriverError;
use cudarc::nvrtc::result::NvrtcError;
use pyo3::PyErr;
use pyo3::exceptions::{PyRuntimeError, PyValueError};

#[derive(Debug)]
pub enum CudaError {
    /// The caller passed something the backend cannot run (a Python `ValueError`).
    Argument(String),
    /// The machine cannot run it: missing library, driver error, compile error.
    Runtime(String),
}

pub type Result<T> = std::result::Result<T, CudaError>;

impl CudaError {
    pub fn runtime(msg: impl Into<String>) -> Self {
        CudaError::Runtime(msg.into())
    }
    pub fn argument(msg: impl Into<String>) -> Self {
        CudaError::Argument(msg.into())
    }
}

impl std::fmt::Display for CudaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CudaError::Argument(m) | CudaError::Runtime(m) => f.write_str(m),
        }
    }
}

/// Adds "while <step>" to driver, cuBLAS and NVRTC errors.
pub trait Context<T> {
    fn context(self, step: &str) -> Result<T>;
}

impl<T> Context<T> for std::result::Result<T, DriverError> {
    fn context(self, step: &str) -> Result<T> {
        self.map_err(|e| CudaError::runtime(format!("CUDA driver error while {step}: {e:?}")))
    }
}

impl<T> Context<T> for std::result::Result<T, CublasError> {
    fn context(self, step: &str) -> Result<T> {
        self.map_err(|e| CudaError::runtime(format!("cuBLAS error while {step}: {e:?}")))
    }
}

impl<T> Context<T> for std::result::Result<T, NvrtcError> {
    fn context(self, step: &str) -> Result<T> {
        self.map_err(|e| CudaError::runtime(format!("NVRTC error while {step}: {e:?}")))
    }
}

impl From<CudaError> for PyErr {
    fn from(e: CudaError) -> PyErr {
        match e {
            CudaError::Argument(m) => PyValueError::new_err(m),
            CudaError::Runtime(m) => {
                PyRuntimeError::new_err(format!("forward_rewrite CUDA backend: {m}"))
            }
        }
    }
}

/// Runs `f`, turning a panic (cudarc panics when a library or symbol cannot be loaded) into
/// an error instead of unwinding into Python.
pub fn catch_panics<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".to_string());
            Err(CudaError::runtime(format!("internal failure: {msg}")))
        }
    }
}
