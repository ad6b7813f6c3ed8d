//! Gated RMSNorm forward and backward: the twin of the gated norm in `kernels/rms_norm.cu`.
//! Two arrangements of the gate, each ending in one rounding to x's dtype.
//!
//! Gate after the norm (Qwen3-Next's `Qwen3NextRMSNormGated`, Kimi's gated norm):
//!
//! ```text
//! r  = 1 / sqrt(mean(x^2) + eps)                  (rstd, saved)
//! xn = x * r
//! v  = round_W(w * round_X(xn))   (cast_before: Qwen3-Next, `self.weight * h.to(input_dtype)`)
//!    = w * xn                     (Kimi: `self.weight.to(float32) * h`)
//! y  = round_X(v * act(gate))
//! ```
//!
//! and from dy, with `dr = dy * act(gate)` (the gradient reaching v):
//!
//! ```text
//! dx    = round_X(r * (dr * w - xn * sum(dr * w * xn) / hidden))
//! dgate = round_X(dy * v * act'(gate))
//! dw    = round_W(sum over rows of dr * (cast_before ? round_X(xn) : xn))
//! ```
//!
//! Gate first (Mamba-2's `MambaRMSNormGated` and its copies in Bamba, Granite 4, Nemotron-H,
//! Zamba2: `x.float() * silu(gate.float())`, then the norm):
//!
//! ```text
//! u  = x * act(gate);  r = 1 / sqrt(mean(u^2) + eps);  un = u * r
//! y  = round_X(v(un))              (v as above, of un)
//! du = r * (dy * w - un * sum(dy * w * un) / hidden)
//! dx = round_X(du * act(gate));  dgate = round_X(du * x * act'(gate))
//! dw = round_W(sum over rows of dy * (cast_before ? round_X(un) : un))
//! ```
//!
//! Groups (Mamba's `group_size`): a norm row is one group of `hidden` elements, a row of x
//! holds `groups` of them, and the weight has `groups * hidden` elements: norm row i reads
//! the weight's segment `i % groups`.
//!
//! Rows are independent in the forward and for dx and dgate; the weight gradient is summed
//! as [`rms_norm`](super::rms_norm)'s: per task of [`ROWS_PER_TASK`] rows, task partials
//! added in row order and rounded once, so it does not depend on the thread count.

use rayon::prelude::*;

use super::gated::{act_grad, act_value};
use super::rms_norm::{ROWS_PER_TASK, finish_weight_gradient, rstd_of, sum_squares};
use super::{Activation, Real, SERIAL_ELEMENTS, Storage, round_to};

/// (row index, (((y row, x row), gate row), rstd)): one norm row of the forward.
type FwdRow<'a, X, A> = (usize, (((&'a mut [X], &'a [X]), &'a [X]), &'a mut A));

/// (task index, (((((dx rows, dgate rows), x rows), gate rows), dy rows), rstd)): one task of
/// the backward.
type BwdTask<'a, X, A> = (
    usize,
    (
        ((((&'a mut [X], &'a mut [X]), &'a [X]), &'a [X]), &'a [X]),
        &'a [A],
    ),
);

#[derive(Clone, Copy, Debug)]
pub struct GatedRmsNorm {
    /// Norm rows: rows of x times `groups`.
    pub rows: usize,
    /// Elements of a norm row (a group).
    pub hidden: usize,
    pub eps: f64,
    /// `round_W(w * round_X(xn))` (Qwen3-Next) instead of `w * xn` (Kimi).
    pub cast_before: bool,
    /// The gate's activation: silu or sigmoid.
    pub act: Activation,
    /// The gate multiplies x before the norm (Mamba) instead of the weighted norm after it.
    pub gate_first: bool,
    /// Groups per row of x: the weight has `groups * hidden` elements (1: a plain norm row).
    pub groups: usize,
}

impl GatedRmsNorm {
    fn check(&self, x: usize, gate: usize, w: usize) {
        assert!(self.hidden > 0, "hidden size 0");
        assert!(self.groups > 0, "groups 0");
        assert!(
            self.rows.is_multiple_of(self.groups),
            "rows: not whole rows of groups"
        );
        assert!(
            matches!(self.act, Activation::Silu | Activation::Sigmoid),
            "activation {:?}: the gated norm takes silu or sigmoid",
            self.act
        );
        assert_eq!(x, self.rows * self.hidden, "x: wrong length");
        assert_eq!(gate, x, "gate: wrong length");
        assert_eq!(w, self.groups * self.hidden, "weight: wrong length");
    }

    /// The weight segment of norm row `row`.
    #[inline]
    fn segment<'w, A>(&self, we: &'w [A], row: usize) -> &'w [A] {
        let g = row % self.groups;
        &we[g * self.hidden..(g + 1) * self.hidden]
    }

    /// v, the weighted norm the gate multiplies, from `xn = x * r` and the weight `w`.
    #[inline]
    fn weighted<A: Real, X: Storage<A>, W: Storage<A>>(&self, xn: A, w: A) -> A {
        if self.cast_before {
            // `self.weight * h.to(input_dtype)`: of W's dtype, W being X or float32.
            round_to::<A, W>(w * round_to::<A, X>(xn))
        } else {
            w * xn
        }
    }
}

/// `y` (rows, hidden) of x's dtype and `rstd` (rows,) from `x` and `gate` (rows, hidden) and
/// `w` (hidden,).
pub fn forward<A, X, W>(p: &GatedRmsNorm, x: &[X], gate: &[X], w: &[W], y: &mut [X], rstd: &mut [A])
where
    A: Real,
    X: Storage<A>,
    W: Storage<A>,
{
    p.check(x.len(), gate.len(), w.len());
    assert_eq!(y.len(), x.len(), "y: wrong length");
    assert_eq!(rstd.len(), p.rows, "rstd: wrong length");
    let h = p.hidden;
    let eps = A::from_f64(p.eps);
    let we: Vec<A> = w.iter().map(|v| v.load()).collect();
    let row = |(i, (((yr, xr), gr), rs)): FwdRow<'_, X, A>| {
        let wr = p.segment(&we, i);
        if p.gate_first {
            let mut ss = A::ZERO;
            for (xv, gv) in xr.iter().zip(gr) {
                let u = xv.load() * act_value(p.act, gv.load());
                ss += u * u;
            }
            let r = rstd_of(ss, h, eps);
            *rs = r;
            for (((o, xv), gv), wv) in yr.iter_mut().zip(xr).zip(gr).zip(wr) {
                let un = xv.load() * act_value(p.act, gv.load()) * r;
                *o = X::store(p.weighted::<A, X, W>(un, *wv));
            }
        } else {
            let r = rstd_of(sum_squares(xr), h, eps);
            *rs = r;
            for (((o, xv), gv), wv) in yr.iter_mut().zip(xr).zip(gr).zip(wr) {
                let v = p.weighted::<A, X, W>(xv.load() * r, *wv);
                *o = X::store(v * act_value(p.act, gv.load()));
            }
        }
    };
    if x.len() < SERIAL_ELEMENTS {
        y.chunks_mut(h)
            .zip(x.chunks(h))
            .zip(gate.chunks(h))
            .zip(rstd.iter_mut())
            .enumerate()
            .for_each(row);
    } else {
        y.par_chunks_mut(h)
            .zip(x.par_chunks(h))
            .zip(gate.par_chunks(h))
            .zip(rstd.par_iter_mut())
            .enumerate()
            .for_each(row);
    }
}

/// `dx` and `dgate` (rows, hidden) of x's dtype and, when given, `dw` (hidden,) from the
/// output gradient `dy` (x's dtype), the forward's inputs and its `rstd`.
#[allow(clippy::too_many_arguments)]
pub fn backward<A, X, W>(
    p: &GatedRmsNorm,
    dy: &[X],
    x: &[X],
    gate: &[X],
    w: &[W],
    rstd: &[A],
    dx: &mut [X],
    dgate: &mut [X],
    dw: Option<&mut [W]>,
) where
    A: Real,
    X: Storage<A>,
    W: Storage<A>,
{
    p.check(x.len(), gate.len(), w.len());
    assert_eq!(dy.len(), x.len(), "dy: wrong length");
    assert_eq!(dx.len(), x.len(), "dx: wrong length");
    assert_eq!(dgate.len(), x.len(), "dgate: wrong length");
    assert_eq!(rstd.len(), p.rows, "rstd: wrong length");
    let h = p.hidden;
    let we: Vec<A> = w.iter().map(|v| v.load()).collect();
    let want_dw = dw.is_some();
    let hf = A::from_f64(h as f64);
    let block = ROWS_PER_TASK * h;
    let task = |(t, (((((dxb, dgb), xb), gb), dyb), rb)): BwdTask<'_, X, A>| {
        let mut acc = want_dw.then(|| vec![A::ZERO; p.groups * h]);
        // The gradient reaching v (gate after: dy * act(gate)) or un (gate first: dy) of the
        // current row: computed once, read again by dx and dw (act's exponential is the
        // costliest step of the row).
        let mut dr = vec![A::ZERO; h];
        for (j, (((((dxr, dgr), xr), gr), dyr), &r)) in dxb
            .chunks_mut(h)
            .zip(dgb.chunks_mut(h))
            .zip(xb.chunks(h))
            .zip(gb.chunks(h))
            .zip(dyb.chunks(h))
            .zip(rb)
            .enumerate()
        {
            let row = t * ROWS_PER_TASK + j;
            let wr = p.segment(&we, row);
            // The normalised value the weight multiplies.
            let normed = |xv: &X, gv: &X| {
                if p.gate_first {
                    xv.load() * act_value(p.act, gv.load()) * r
                } else {
                    xv.load() * r
                }
            };
            let mut dot = A::ZERO;
            for ((((d, o), xv), gv), (dv, wv)) in dr
                .iter_mut()
                .zip(dgr.iter_mut())
                .zip(xr)
                .zip(gr)
                .zip(dyr.iter().zip(wr))
            {
                let dyv = dv.load();
                let n = normed(xv, gv);
                if p.gate_first {
                    *d = dyv;
                } else {
                    let g = gv.load();
                    *d = dyv * act_value(p.act, g);
                    let v = p.weighted::<A, X, W>(n, *wv);
                    *o = X::store(dyv * v * act_grad(p.act, g));
                }
                dot += (*d * *wv) * n;
            }
            let c = dot / hf;
            for ((((o, og), xv), gv), (d, wv)) in dxr
                .iter_mut()
                .zip(dgr.iter_mut())
                .zip(xr)
                .zip(gr)
                .zip(dr.iter().zip(wr))
            {
                let n = normed(xv, gv);
                let du = r * (*d * *wv - n * c);
                if p.gate_first {
                    let g = gv.load();
                    *o = X::store(du * act_value(p.act, g));
                    *og = X::store(du * xv.load() * act_grad(p.act, g));
                } else {
                    *o = X::store(du);
                }
            }
            if let Some(acc) = acc.as_mut() {
                let g = row % p.groups;
                let seg = &mut acc[g * h..(g + 1) * h];
                for (((a, xv), gv), d) in seg.iter_mut().zip(xr).zip(gr).zip(&dr) {
                    let n = normed(xv, gv);
                    let xs = if p.cast_before {
                        round_to::<A, X>(n)
                    } else {
                        n
                    };
                    *a += *d * xs;
                }
            }
        }
        acc
    };
    // The same tasks (and so the same partial sums) either way.
    let partials: Vec<Option<Vec<A>>> = if x.len() < SERIAL_ELEMENTS {
        dx.chunks_mut(block)
            .zip(dgate.chunks_mut(block))
            .zip(x.chunks(block))
            .zip(gate.chunks(block))
            .zip(dy.chunks(block))
            .zip(rstd.chunks(ROWS_PER_TASK))
            .enumerate()
            .map(task)
            .collect()
    } else {
        dx.par_chunks_mut(block)
            .zip(dgate.par_chunks_mut(block))
            .zip(x.par_chunks(block))
            .zip(gate.par_chunks(block))
            .zip(dy.par_chunks(block))
            .zip(rstd.par_chunks(ROWS_PER_TASK))
            .enumerate()
            .map(task)
            .collect()
    };
    if let Some(dw) = dw {
        assert_eq!(dw.len(), p.groups * h, "dw: wrong length");
        finish_weight_gradient(&partials, dw);
    }
}
