//! RMSNorm forward and backward: the twin of `kernels/rms_norm.cu` (the formulas are written
//! there). Rows are independent in the forward and for dx; the weight gradient is summed in
//! float32 (float64 for float64 storage) per task of [`ROWS_PER_TASK`] rows, then the task
//! partials are added in row order and rounded once.

use rayon::prelude::*;

use super::{Real, SERIAL_ELEMENTS, Storage, round_to};

/// Rows per parallel task, and so the grain of the weight gradient's partial sums (fixed:
/// the result does not depend on the thread count).
pub const ROWS_PER_TASK: usize = 32;

/// ((dx rows, x rows), dy rows), rstd: one task of the backward.
type BwdTask<'a, X, O, A> = (((&'a mut [X], &'a [X]), &'a [O]), &'a [A]);

#[derive(Clone, Copy, Debug)]
pub struct RmsNorm {
    pub rows: usize,
    pub hidden: usize,
    pub eps: f64,
    /// Added to the weight in the arithmetic type (Gemma: 1).
    pub offset: f64,
    /// `(offset + w) * round_X(xn)` (Llama) instead of `xn * (offset + w)` (Gemma, OLMo 2).
    pub cast_before: bool,
}

impl RmsNorm {
    fn check(&self, x: usize, w: usize) {
        assert!(self.hidden > 0, "hidden size 0");
        assert_eq!(x, self.rows * self.hidden, "x: wrong length");
        assert_eq!(w, self.hidden, "weight: wrong length");
    }
}

fn sum_squares<A: Real, X: Storage<A>>(row: &[X]) -> A {
    // Eight running sums, added pairwise at the end: the shape of the kernels' vectors.
    let mut lanes = [A::ZERO; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            let v = v.load();
            *l += v * v;
        }
    }
    for (l, v) in lanes.iter_mut().zip(chunks.remainder()) {
        let v = v.load();
        *l += v * v;
    }
    ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6]))
        + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]))
}

fn rstd_of<A: Real>(sum_sq: A, hidden: usize, eps: A) -> A {
    A::ONE / (sum_sq / A::from_f64(hidden as f64) + eps).sqrt()
}

/// `y` (rows, hidden) and `rstd` (rows,) from `x` (rows, hidden) and `w` (hidden,).
pub fn forward<A, X, W, O>(p: &RmsNorm, x: &[X], w: &[W], y: &mut [O], rstd: &mut [A])
where
    A: Real,
    X: Storage<A>,
    W: Storage<A>,
    O: Storage<A>,
{
    p.check(x.len(), w.len());
    assert_eq!(y.len(), x.len(), "y: wrong length");
    assert_eq!(rstd.len(), p.rows, "rstd: wrong length");
    let h = p.hidden;
    let eps = A::from_f64(p.eps);
    let offset = A::from_f64(p.offset);
    let we: Vec<A> = w.iter().map(|v| offset + v.load()).collect();
    let row = |((yr, xr), rs): ((&mut [O], &[X]), &mut A)| {
        let r = rstd_of(sum_squares(xr), h, eps);
        *rs = r;
        for ((o, xv), wv) in yr.iter_mut().zip(xr).zip(&we) {
            let xn = xv.load() * r;
            let out = if p.cast_before {
                *wv * round_to::<A, X>(xn)
            } else {
                xn * *wv
            };
            *o = O::store(out);
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

/// `dx` (rows, hidden) and, when given, `dw` (hidden,) from the output gradient `dy`, the
/// forward's inputs and its `rstd`.
#[allow(clippy::too_many_arguments)]
pub fn backward<A, X, W, O>(
    p: &RmsNorm,
    dy: &[O],
    x: &[X],
    w: &[W],
    rstd: &[A],
    dx: &mut [X],
    dw: Option<&mut [W]>,
) where
    A: Real,
    X: Storage<A>,
    W: Storage<A>,
    O: Storage<A>,
{
    p.check(x.len(), w.len());
    assert_eq!(dy.len(), x.len(), "dy: wrong length");
    assert_eq!(dx.len(), x.len(), "dx: wrong length");
    assert_eq!(rstd.len(), p.rows, "rstd: wrong length");
    let h = p.hidden;
    let offset = A::from_f64(p.offset);
    let we: Vec<A> = w.iter().map(|v| offset + v.load()).collect();
    let want_dw = dw.is_some();
    let hf = A::from_f64(h as f64);
    let block = ROWS_PER_TASK * h;
    let task = |(((dxb, xb), dyb), rb): BwdTask<'_, X, O, A>| {
        let mut acc = want_dw.then(|| vec![A::ZERO; h]);
        for (((dxr, xr), dyr), &r) in dxb
            .chunks_mut(h)
            .zip(xb.chunks(h))
            .zip(dyb.chunks(h))
            .zip(rb)
        {
            let mut dot = A::ZERO;
            for ((xv, dv), wv) in xr.iter().zip(dyr).zip(&we) {
                dot += (dv.load() * *wv) * (xv.load() * r);
            }
            let c = dot / hf;
            for (((o, xv), dv), wv) in dxr.iter_mut().zip(xr).zip(dyr).zip(&we) {
                let xn = xv.load() * r;
                let d = dv.load();
                *o = X::store(r * (d * *wv - xn * c));
            }
            if let Some(acc) = acc.as_mut() {
                for ((a, xv), dv) in acc.iter_mut().zip(xr).zip(dyr) {
                    let xn = xv.load() * r;
                    let xs = if p.cast_before {
                        round_to::<A, X>(xn)
                    } else {
                        xn
                    };
                    *a += dv.load() * xs;
                }
            }
        }
        acc
    };
    // The same tasks (and so the same partial sums) either way.
    let partials: Vec<Option<Vec<A>>> = if x.len() < SERIAL_ELEMENTS {
        dx.chunks_mut(block)
            .zip(x.chunks(block))
            .zip(dy.chunks(block))
            .zip(rstd.chunks(ROWS_PER_TASK))
            .map(task)
            .collect()
    } else {
        dx.par_chunks_mut(block)
            .zip(x.par_chunks(block))
            .zip(dy.par_chunks(block))
            .zip(rstd.par_chunks(ROWS_PER_TASK))
            .map(task)
            .collect()
    };
    if let Some(dw) = dw {
        assert_eq!(dw.len(), h, "dw: wrong length");
        let mut total = vec![A::ZERO; h];
        for part in partials.iter().flatten() {
            for (t, v) in total.iter_mut().zip(part) {
                *t += *v;
            }
        }
        for (o, t) in dw.iter_mut().zip(total) {
            *o = W::store(t);
        }
    }
}
