//! Checks that the shared libraries cudarc loads at run time are there, before cudarc is
//! asked for a symbol (it panics when a library is missing). In a torch process they are
//! found because `import torch` loaded them (the CUDA driver, cuBLAS) or because the Python
//! side loaded NVRTC from the `nvidia` wheels (`forward_rewrite._cuda`).

use super::error::{CudaError, Result};

pub fn require_driver() -> Result<()> {
    // SAFETY: only tries to dlopen the library under its usual names.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(CudaError::runtime(
            "the CUDA driver library (libcuda.so) was not found: is there an NVIDIA GPU and driver?",
        ))
    }
}

pub fn require_cublas() -> Result<()> {
    // SAFETY: as above.
    if unsafe { cudarc::cublas::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(CudaError::runtime(
            "cuBLAS (libcublas.so.13) was not found: import torch (a CUDA 13 build) before forward_rewrite",
        ))
    }
}

pub fn require_nvrtc() -> Result<()> {
    // SAFETY: as above.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(CudaError::runtime(
            "NVRTC (libnvrtc.so.13) was not found: install torch's CUDA 13 wheels (nvidia-cuda-nvrtc) or a CUDA 13 toolkit",
        ))
    }
}
