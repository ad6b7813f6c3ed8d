//! The unweighted RMSNorm whose scale is rounded first (DeepSeek-V4's, GLM-5-Next's and
//! Inkling-2's `UnweightedRMSNorm`: `x * torch.rsqrt(x.float().square().mean(-1, keepdim=True)
//! + self.eps).to(x.dtype)`): the twin of the scale-first kernels in `kernels/rms_norm.cu`.
//!
//! ```text
//! r  = 1 / sqrt(mean(x^2) + eps)      (float32; rstd, saved)
//! s  = round_X(r)                     (the stock `.to(x.dtype)` of the scale)
//! y  = round_X(x * s)                 (stock's multiply of two X tensors: one rounding)
//! dx = round_X(s * dy - x * r^3 * sum(dy * x) / hidden)
//! ```
//!
//! The backward is what stock's autograd computes without its intermediate roundings (its
//! `.to` passes the gradient straight to r). No weight, so no cross-row reduction: every row
//! is independent and the result cannot depend on the thread count.

use rayon::prelude::*;

use super::rms_norm::{rstd_of, sum_squares};
use super::{Real, SERIAL_ELEMENTS, Storage, round_to};

/// (((dx row, x row), dy row), rstd): one row of the backward.
type BwdRow<'a, X, A> = (((&'a mut [X], &'a [X]), &'a [X]), &'a A);

#[derive(Clone, Copy, Debug)]
pub struct ScaleFirst {
    pub rows: usize,
    pub hidden: usize,
    pub eps: f64,
}

impl ScaleFirst {
    fn check(&self, x: usize) {
        assert!(self.hidden > 0, "hidden size 0");
        assert_eq!(x, self.rows * self.hidden, "x: wrong length");
    }
}

/// `y` (rows, hidden) and `rstd` (rows,) from `x` (rows, hidden).
pub fn forward<A: Real, X: Storage<A>>(p: &ScaleFirst, x: &[X], y: &mut [X], rstd: &mut [A]) {
    p.check(x.len());
    assert_eq!(y.len(), x.len(), "y: wrong length");
    assert_eq!(rstd.len(), p.rows, "rstd: wrong length");
    let h = p.hidden;
    let eps = A::from_f64(p.eps);
    let row = |((yr, xr), rs): ((&mut [X], &[X]), &mut A)| {
        let r = rstd_of(sum_squares(xr), h, eps);
        *rs = r;
        let s = round_to::<A, X>(r);
        for (o, xv) in yr.iter_mut().zip(xr) {
            *o = X::store(xv.load() * s);
        }
    };
    if x.len() < SERIAL_ELEMENTS {
        y.chunks_mut(h)
            .zip(x.chunks(h))
            .zip(rstd.iter_mut())
            .for_each(row);
    } else {
        y.par_chunks_mut(h)
            .zip(x.par_chunks(h))
            .zip(rstd.par_iter_mut())
            .for_each(row);
    }
}

/// `dx` (rows, hidden) from the output gradient `dy`, the forward's input `x` and its `rstd`.
pub fn backward<A: Real, X: Storage<A>>(
    p: &ScaleFirst,
    dy: &[X],
    x: &[X],
    rstd: &[A],
    dx: &mut [X],
) {
    p.check(x.len());
    assert_eq!(dy.len(), x.len(), "dy: wrong length");
    assert_eq!(dx.len(), x.len(), "dx: wrong length");
    assert_eq!(rstd.len(), p.rows, "rstd: wrong length");
    let h = p.hidden;
    let hf = A::from_f64(h as f64);
    let row = |(((dxr, xr), dyr), &r): BwdRow<'_, X, A>| {
        let mut dot = A::ZERO;
        for (xv, dv) in xr.iter().zip(dyr) {
            dot += dv.load() * xv.load();
        }
        let s = round_to::<A, X>(r);
        // x * r^3 * dot / h, with r^3 * dot / h once per row.
        let c = r * r * r * dot / hf;
        for ((o, xv), dv) in dxr.iter_mut().zip(xr).zip(dyr) {
            *o = X::store(s * dv.load() - xv.load() * c);
        }
    };
    if x.len() < SERIAL_ELEMENTS {
        dx.chunks_mut(h)
            .zip(x.chunks(h))
            .zip(dy.chunks(h))
            .zip(rstd.iter())
            .for_each(row);
    } else {
        dx.par_chunks_mut(h)
            .zip(x.par_chunks(h))
            .zip(dy.par_chunks(h))
            .zip(rstd.par_iter())
            .for_each(row);
    }
}
