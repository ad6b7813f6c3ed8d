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

/// A column-major operand of one product: device address and leading dimension.
type Operand = (u64, u64);

/// # Safety (all methods)
/// Every address must be a live device buffer of the shape the method states, on the
/// device whose context is current, and stay alive until the stream has run the product.
pub struct Blas {
    pub handle: sys::cublasHandle_t,
    pub dtype: Dtype,
}

impl Blas {
    /// C (m x n, column-major, type `c_type`) = op_a(A) . op_b(B) + beta C, with A and B in
    /// the chunk's dtype and float32 accumulation: the one shape of call every product uses.
    ///
    /// # Safety
    /// See [`Blas`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm(
        &self,
        (op_a, op_b): (sys::cublasOperation_t, sys::cublasOperation_t),
        [m, n, k]: [u64; 3],
        (a, lda): Operand,
        (b, ldb): Operand,
        beta: f32,
        (c, ldc): Operand,
        c_type: sys::cudaDataType,
        what: &'static str,
    ) -> Result<()> {
        let one = 1f32;
        unsafe {
            blas::gemm_ex(
                self.handle,
                op_a,
                op_b,
                int(m),
                int(n),
                int(k),
                &one as *const f32 as *const c_void,
                ptr(a),
                self.dtype.cublas(),
                int(lda),
                ptr(b),
                self.dtype.cublas(),
                int(ldb),
                &beta as *const f32 as *const c_void,
                mut_ptr(c),
                c_type,
                int(ldc),
                COMPUTE,
                ALGO,
            )
        }
        .context(what)
    }

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
        unsafe {
            self.gemm(
                (CUBLAS_OP_T, CUBLAS_OP_N),
                [vocab, rows, hidden],
                (w, hidden),
                (h.ptr, h.ld),
                0.0,
                (out.ptr, out.ld),
                F32,
                "computing a chunk of logits",
            )
        }
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
                self.gemm(
                    (CUBLAS_OP_N, CUBLAS_OP_N),
                    [hidden, rows, vocab],
                    (w, hidden),
                    (dlogits, ld_d),
                    0.0,
                    (out, hidden),
                    F32,
                    "computing dh",
                )
            };
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
                self.gemm(
                    (CUBLAS_OP_N, CUBLAS_OP_N),
                    [hidden, rows, rest],
                    (w + per * splits * hidden * es, hidden),
                    (dlogits + per * splits * es, ld_d),
                    1.0,
                    (out, hidden),
                    F32,
                    "computing dh (vocabulary remainder)",
                )
            }?;
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
        let dw_type = if dw_f32 { F32 } else { self.dtype.cublas() };
        unsafe {
            self.gemm(
                (CUBLAS_OP_N, CUBLAS_OP_T),
                [hidden, vocab, rows],
                (h.ptr, h.ld),
                (dlogits.ptr, dlogits.ld),
                if accumulate { 1.0 } else { 0.0 },
                (dw, hidden),
                dw_type,
                "accumulating dW",
            )
        }
    }

    /// db_acc (vocab, f32) += dlogits^T . ones (column sums of the chunk's dlogits).
    ///
    /// # Safety
    /// See [`Blas`].
    pub unsafe fn db(&self, d: Dims, dlogits: Mat, ones: u64, db_acc: u64) -> Result<()> {
        let Dims { rows, vocab, .. } = d;
        unsafe {
            self.gemm(
                (CUBLAS_OP_N, CUBLAS_OP_N),
                [vocab, 1, rows],
                (dlogits.ptr, dlogits.ld),
                (ones, rows),
                1.0,
                (db_acc, vocab),
                F32,
                "accumulating db",
            )
        }
    }
}
