//! The matrix products of one chunk, through cuBLAS with float32 accumulation.
//!
//! cuBLAS is column-major; a row-major (rows x cols) matrix with row stride ld is the
//! column-major (cols x rows) matrix with leading dimension ld, so each product below is
//! written for the transposes. Pointers are raw device addresses owned by torch.

use std::ffi::{c_int, c_longlong, c_void};

use cudarc::cublas::{result as blas, sys};

use super::device::Dtype;
use super::error::{Context, Result};

use sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};

const F32: sys::cudaDataType = sys::cudaDataType::CUDA_R_32F;
const COMPUTE: sys::cublasComputeType_t = sys::cublasComputeType_t::CUBLAS_COMPUTE_32F;
const ALGO: sys::cublasGemmAlgo_t = sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT;

fn ptr(p: u64) -> *const c_void {
    p as *const c_void
}
fn mut_ptr(p: u64) -> *mut c_void {
    p as *mut c_void
}
fn int(x: u64) -> c_int {
    x as c_int
}

/// A row-major matrix operand: device address and row stride in elements.
#[derive(Clone, Copy, Debug)]
pub struct Mat {
    pub ptr: u64,
    pub ld: u64,
}

/// The sizes of one chunk's products.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub rows: u64,
    pub hidden: u64,
    pub vocab: u64,
}

/// # Safety (all methods)
/// Every address must be a live device buffer of the shape the method states, on the
/// device whose context is current, and stay alive until the stream has run the product.
pub struct Blas {
    pub handle: sys::cublasHandle_t,
    pub dtype: Dtype,
}

impl Blas {
    /// logits (rows x vocab, f32) = h (rows x hidden) . W^T.
    ///
    /// # Safety
    /// See [`Blas`].
    pub unsafe fn logits(&self, d: Dims, w: u64, h: Mat, out: Mat) -> Result<()> {
        let Dims {
            rows,
            hidden,
            vocab,
        } = d;
        let (h, ld_h, out, ld_out) = (h.ptr, h.ld, out.ptr, out.ld);
        let (one, zero) = (1f32, 0f32);
        unsafe {
            blas::gemm_ex(
                self.handle,
                CUBLAS_OP_T,
                CUBLAS_OP_N,
                int(vocab),
                int(rows),
                int(hidden),
                &one as *const f32 as *const c_void,
                ptr(w),
                self.dtype.cublas(),
                int(hidden),
                ptr(h),
                self.dtype.cublas(),
                int(ld_h),
                &zero as *const f32 as *const c_void,
                mut_ptr(out),
                F32,
                int(ld_out),
                COMPUTE,
                ALGO,
            )
        }
        .context("computing a chunk of logits")
    }

    /// dh partials (splits x rows x hidden, f32): partial s = dlogits[:, Vs*s..] . W[Vs*s..],
    /// with Vs = vocab / splits; the remainder of the vocabulary goes into partial 0.
    ///
    /// # Safety
    /// See [`Blas`].
    pub unsafe fn dh_partials(
        &self,
        d: Dims,
        splits: u64,
        dlogits: Mat,
        w: u64,
        out: u64,
    ) -> Result<()> {
        let Dims {
            rows,
            hidden,
            vocab,
        } = d;
        let (dlogits, ld_d) = (dlogits.ptr, dlogits.ld);
        let es = self.dtype.bytes();
        let (one, zero) = (1f32, 0f32);
        let per = vocab / splits;
        if splits == 1 {
            return unsafe {
                blas::gemm_ex(
                    self.handle,
                    CUBLAS_OP_N,
                    CUBLAS_OP_N,
                    int(hidden),
                    int(rows),
                    int(vocab),
                    &one as *const f32 as *const c_void,
                    ptr(w),
                    self.dtype.cublas(),
                    int(hidden),
                    ptr(dlogits),
                    self.dtype.cublas(),
                    int(ld_d),
                    &zero as *const f32 as *const c_void,
                    mut_ptr(out),
                    F32,
                    int(hidden),
                    COMPUTE,
                    ALGO,
                )
            }
            .context("computing dh");
        }
        unsafe {
            blas::gemm_strided_batched_ex(
                self.handle,
                CUBLAS_OP_N,
                CUBLAS_OP_N,
                int(hidden),
                int(rows),
                int(per),
                &one as *const f32 as *const c_void,
                ptr(w),
                self.dtype.cublas(),
                int(hidden),
                (per * hidden) as c_longlong,
                ptr(dlogits),
                self.dtype.cublas(),
                int(ld_d),
                per as c_longlong,
                &zero as *const f32 as *const c_void,
                mut_ptr(out),
                F32,
                int(hidden),
                (rows * hidden) as c_longlong,
                int(splits),
                COMPUTE,
                ALGO,
            )
        }
        .context("computing dh")?;
        let rest = vocab - per * splits;
        if rest > 0 {
            unsafe {
                blas::gemm_ex(
                    self.handle,
                    CUBLAS_OP_N,
                    CUBLAS_OP_N,
                    int(hidden),
                    int(rows),
                    int(rest),
                    &one as *const f32 as *const c_void,
                    ptr(w + per * splits * hidden * es),
                    self.dtype.cublas(),
                    int(hidden),
                    ptr(dlogits + per * splits * es),
                    self.dtype.cublas(),
                    int(ld_d),
                    &one as *const f32 as *const c_void,
                    mut_ptr(out),
                    F32,
                    int(hidden),
                    COMPUTE,
                    ALGO,
                )
            }
            .context("computing dh (vocabulary remainder)")?;
        }
        Ok(())
    }

    /// dW (vocab x hidden; input dtype, or float32 with `dw_f32`) (+)= dlogits^T . h;
    /// `accumulate` false overwrites.
    ///
    /// # Safety
    /// See [`Blas`].
    pub unsafe fn dw(
        &self,
        d: Dims,
        h: Mat,
        dlogits: Mat,
        dw: u64,
        dw_f32: bool,
        accumulate: bool,
    ) -> Result<()> {
        let Dims {
            rows,
            hidden,
            vocab,
        } = d;
        let (h, ld_h, dlogits, ld_d) = (h.ptr, h.ld, dlogits.ptr, dlogits.ld);
        let one = 1f32;
        let beta = if accumulate { 1f32 } else { 0f32 };
        unsafe {
            blas::gemm_ex(
                self.handle,
                CUBLAS_OP_N,
                CUBLAS_OP_T,
                int(hidden),
                int(vocab),
                int(rows),
                &one as *const f32 as *const c_void,
                ptr(h),
                self.dtype.cublas(),
                int(ld_h),
                ptr(dlogits),
                self.dtype.cublas(),
                int(ld_d),
                &beta as *const f32 as *const c_void,
                mut_ptr(dw),
                if dw_f32 { F32 } else { self.dtype.cublas() },
                int(hidden),
                COMPUTE,
                ALGO,
            )
        }
        .context("accumulating dW")
    }

    /// db_acc (vocab, f32) += dlogits^T . ones (column sums of the chunk's dlogits).
    ///
    /// # Safety
    /// See [`Blas`].
    pub unsafe fn db(&self, d: Dims, dlogits: Mat, ones: u64, db_acc: u64) -> Result<()> {
        let Dims { rows, vocab, .. } = d;
        let (dlogits, ld_d) = (dlogits.ptr, dlogits.ld);
        let one = 1f32;
        unsafe {
            blas::gemm_ex(
                self.handle,
                CUBLAS_OP_N,
                CUBLAS_OP_N,
                int(vocab),
                1,
                int(rows),
                &one as *const f32 as *const c_void,
                ptr(dlogits),
                self.dtype.cublas(),
                int(ld_d),
                ptr(ones),
                self.dtype.cublas(),
                int(rows),
                &one as *const f32 as *const c_void,
                mut_ptr(db_acc),
                F32,
                int(vocab),
                COMPUTE,
                ALGO,
            )
        }
        .context("accumulating db")
    }
}
