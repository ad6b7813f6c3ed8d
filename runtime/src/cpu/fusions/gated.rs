//! The activation product of a gated MLP, `act(gate) * up`, and its backward from the saved
//! inputs: the twin of `kernels/gated_act.cu` (the formulas and rounding points are written
//! there). `gate` and `up` are (rows, cols) with their own row strides, or (`pairs`, GPT-OSS's
//! interleaved `gate_up[..., ::2]`, `gate_up[..., 1::2]`) one (rows, 2 * cols) tensor of
//! (gate, up) pairs passed as `gate`; outputs are contiguous (rows, cols). With a [`Clamp`],
//! the clamped SwiGLU of DeepSeek-V4 / Step-3.7 / GPT-OSS.

use rayon::prelude::*;

use super::{Activation, Real, SERIAL_ELEMENTS, Storage, round_to};

#[derive(Clone, Copy, Debug)]
pub struct Gated {
    pub rows: usize,
    pub cols: usize,
    /// Row strides of gate and up, in elements (at least `cols`).
    pub ld_gate: usize,
    pub ld_up: usize,
    pub act: Activation,
    pub clamp: Option<Clamp>,
    /// [`Activation::SwigluOai`]'s `alpha` (`gate * sigmoid(gate * alpha)`).
    pub alpha: f32,
    /// gate holds (gate, up) pairs (row stride `ld_gate` >= 2 * cols); up is not read.
    pub pairs: bool,
}

/// A clamped SwiGLU: the gate clamped at max `limit` before the activation
/// (`act(gate.clamp(max=L)) * up.clamp(-L, L)`: DeepSeek-V4, GLM-5-Next) or, with
/// `after_activation`, the activation's output (`act(gate).clamp(max=L) * up.clamp(-L, L)`:
/// Step-3.7). The limit is compared in the storage type (rounded to it), as torch compares a
/// tensor with a scalar; a gradient passes inside the bounds as torch's clamp backward passes
/// it: `lo <= x <= hi` with `grad_at_bound` (torch 2.11), `lo < x < hi` without (torch 2.15).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Clamp {
    pub limit: f32,
    pub after_activation: bool,
    pub grad_at_bound: bool,
}

impl Clamp {
    /// The clamp of the Python arguments `limit`, `clamp_after_activation`, `grad_at_bound`: a
    /// limit above 0 (inf allowed), and no position without a limit.
    pub fn of(
        limit: Option<f64>,
        after_activation: bool,
        grad_at_bound: bool,
    ) -> Result<Option<Clamp>, String> {
        match limit {
            None if after_activation => {
                Err("clamp_after_activation: there is no limit to clamp at".to_string())
            }
            None => Ok(None),
            Some(l) if l.is_nan() || l <= 0.0 => {
                Err(format!("limit: expected a number above 0, got {l}"))
            }
            Some(l) => Ok(Some(Clamp {
                limit: l as f32,
                after_activation,
                grad_at_bound,
            })),
        }
    }
}

/// The `alpha` argument of an activation: [`Activation::SwigluOai`] needs a finite one, the
/// others take none (0 stands for it).
pub fn alpha_of(act: Activation, alpha: Option<f64>) -> Result<f32, String> {
    match (act, alpha) {
        (Activation::SwigluOai, Some(a)) if a.is_finite() => Ok(a as f32),
        (Activation::SwigluOai, Some(a)) => {
            Err(format!("alpha: expected a finite number, got {a}"))
        }
        (Activation::SwigluOai, None) => Err("alpha: swiglu_oai needs its alpha".to_string()),
        (_, None) => Ok(0.0),
        (act, Some(_)) => Err(format!(
            "alpha: only swiglu_oai takes one, not {}",
            act.name()
        )),
    }
}

/// `min(x, hi)` as torch's `clamp(max=hi)` computes it: NaN stays NaN.
fn clamp_max<A: Real>(x: A, hi: A) -> A {
    if x > hi { hi } else { x }
}

/// Whether torch's clamp backward passes the gradient of `x` clamped at max `hi`.
fn below<A: Real>(x: A, hi: A, at_bound: bool) -> bool {
    x < hi || (at_bound && x == hi)
}

/// `x.clamp(-hi, hi)`, NaN kept.
fn clamp_sym<A: Real>(x: A, hi: A) -> A {
    clamp_max(if x < -hi { -hi } else { x }, hi)
}

/// One element's (gate value the activation sees, activation output as the product uses it,
/// up as the product uses it, whether the gate's gradient passes, whether up's does).
struct Element<A> {
    x: A,
    a: A,
    u: A,
    gate_passes: bool,
    up_passes: bool,
}

/// Row index, (dgate row, dup row), dout row: one item of the backward's iteration.
type GradRows<'a, T> = (usize, ((&'a mut [T], &'a mut [T]), &'a [T]));

/// sqrt(2 / pi), the constant of torch's tanh-approximated GELU.
const GELU_BETA: f64 = std::f64::consts::SQRT_2 * std::f64::consts::FRAC_2_SQRT_PI * 0.5;
const GELU_KAPPA: f64 = 0.044715;

/// act(x), as torch computes it ([`Activation::SwigluOai`] takes its alpha:
/// [`Gated::activation`]).
pub fn act_value<A: Real>(act: Activation, x: A) -> A {
    match act {
        Activation::Silu => x / (A::ONE + (-x).exp()),
        Activation::GeluTanh => {
            let beta = A::from_f64(GELU_BETA);
            let kappa = A::from_f64(GELU_KAPPA);
            let half = A::from_f64(0.5);
            let inner = beta * (x + kappa * (x * x * x));
            half * x * (A::ONE + inner.tanh())
        }
        Activation::Sigmoid => A::ONE / (A::ONE + (-x).exp()),
        Activation::SwigluOai => unreachable!("swiglu_oai takes its alpha: Gated::activation"),
    }
}

/// act'(x).
pub fn act_grad<A: Real>(act: Activation, x: A) -> A {
    match act {
        Activation::Silu => {
            let s = A::ONE / (A::ONE + (-x).exp());
            s * (A::ONE + x * (A::ONE - s))
        }
        Activation::GeluTanh => {
            let beta = A::from_f64(GELU_BETA);
            let kappa = A::from_f64(GELU_KAPPA);
            let half = A::from_f64(0.5);
            let x_sq = x * x;
            let t = (beta * (x + kappa * x_sq * x)).tanh();
            let left = half * x;
            let right = A::ONE + t;
            let left_derivative = half * right;
            let right_derivative = left * (A::ONE - t * t);
            let inner_derivative = beta * (A::ONE + A::from_f64(3.0) * kappa * x_sq);
            left_derivative + right_derivative * inner_derivative
        }
        Activation::Sigmoid => {
            let s = A::ONE / (A::ONE + (-x).exp());
            s * (A::ONE - s)
        }
        Activation::SwigluOai => unreachable!("swiglu_oai takes its alpha: Gated::slope"),
    }
}

impl Gated {
    /// The activation of `x` as the product uses it: rounded to T, GPT-OSS's at each of its
    /// statements (`round(x * round(sigmoid(round(x * alpha))))`).
    fn activation<A: Real, T: Storage<A>>(&self, x: A) -> A {
        match self.act {
            Activation::SwigluOai => {
                let alpha = A::from_f64(self.alpha as f64);
                let t = round_to::<A, T>(x * alpha);
                let s = round_to::<A, T>(A::ONE / (A::ONE + (-t).exp()));
                round_to::<A, T>(x * s)
            }
            act => round_to::<A, T>(act_value(act, x)),
        }
    }

    /// The activation's derivative at `x`, in A.
    fn slope<A: Real>(&self, x: A) -> A {
        match self.act {
            Activation::SwigluOai => {
                let alpha = A::from_f64(self.alpha as f64);
                let s = A::ONE / (A::ONE + (-(alpha * x)).exp());
                s + x * alpha * s * (A::ONE - s)
            }
            act => act_grad(act, x),
        }
    }

    fn element<A: Real, T: Storage<A>>(&self, g: A, u: A) -> Element<A> {
        // GPT-OSS's up enters as round(up + 1), after its clamp
        let shift = |u: A| {
            if self.act == Activation::SwigluOai {
                round_to::<A, T>(u + A::ONE)
            } else {
                u
            }
        };
        let Some(c) = self.clamp else {
            return Element {
                x: g,
                a: self.activation::<A, T>(g),
                u: shift(u),
                gate_passes: true,
                up_passes: true,
            };
        };
        let lim = round_to::<A, T>(A::from_f64(c.limit as f64));
        let x = if c.after_activation {
            g
        } else {
            clamp_max(g, lim)
        };
        let a = self.activation::<A, T>(x);
        Element {
            x,
            a: if c.after_activation {
                clamp_max(a, lim)
            } else {
                a
            },
            u: shift(clamp_sym(u, lim)),
            gate_passes: below(if c.after_activation { a } else { g }, lim, c.grad_at_bound),
            up_passes: below(u, lim, c.grad_at_bound) && below(-u, lim, c.grad_at_bound),
        }
    }

    /// Elements per column in `gate` (2 with pairs).
    fn width(&self) -> usize {
        if self.pairs { 2 } else { 1 }
    }

    /// Row `r`'s (gate, up) at column `c`.
    fn operands<A: Real, T: Storage<A>>(&self, gate: &[T], up: &[T], r: usize, c: usize) -> (A, A) {
        if self.pairs {
            let i = r * self.ld_gate + 2 * c;
            (gate[i].load(), gate[i + 1].load())
        } else {
            (
                gate[r * self.ld_gate + c].load(),
                up[r * self.ld_up + c].load(),
            )
        }
    }

    fn check(&self, gate: usize, up: usize) {
        let w = self.width();
        assert!(
            self.ld_gate >= w * self.cols && (self.pairs || self.ld_up >= self.cols),
            "row strides below cols"
        );
        let need = |ld: usize, cols: usize| {
            if self.rows == 0 || self.cols == 0 {
                0
            } else {
                (self.rows - 1) * ld + cols
            }
        };
        assert!(need(self.ld_gate, w * self.cols) <= gate, "gate: too short");
        if !self.pairs {
            assert!(need(self.ld_up, self.cols) <= up, "up: too short");
        }
    }
}

/// `out = round_T(round_T(act(gate)) * up)`.
pub fn forward<A: Real, T: Storage<A>>(g: &Gated, gate: &[T], up: &[T], out: &mut [T]) {
    g.check(gate.len(), up.len());
    assert_eq!(out.len(), g.rows * g.cols, "out: wrong length");
    if g.cols == 0 {
        return;
    }
    let row = |(r, o): (usize, &mut [T])| {
        for (c, o) in o.iter_mut().enumerate() {
            let (gv, uv) = g.operands::<A, T>(gate, up, r, c);
            let e = g.element::<A, T>(gv, uv);
            *o = T::store(e.a * e.u);
        }
    };
    if out.len() < SERIAL_ELEMENTS {
        out.chunks_mut(g.cols).enumerate().for_each(row);
    } else {
        out.par_chunks_mut(g.cols).enumerate().for_each(row);
    }
}

/// Row `r`'s gradients at column `c`: `dgate = round_T(dout * up * act'(gate))`,
/// `dup = round_T(dout * round_T(act(gate)))` (zero where a clamp stops the gradient).
fn gradients<A: Real, T: Storage<A>>(
    g: &Gated,
    r: usize,
    c: usize,
    d: A,
    gate: &[T],
    up: &[T],
) -> (T, T) {
    let (gv, uv) = g.operands::<A, T>(gate, up, r, c);
    let e = g.element::<A, T>(gv, uv);
    let dup = if e.up_passes { d * e.a } else { A::ZERO };
    let dgate = if e.gate_passes {
        d * e.u * g.slope(e.x)
    } else {
        A::ZERO
    };
    (T::store(dgate), T::store(dup))
}

/// The backward into two contiguous (rows, cols) tensors.
pub fn backward<A: Real, T: Storage<A>>(
    g: &Gated,
    dout: &[T],
    gate: &[T],
    up: &[T],
    dgate: &mut [T],
    dup: &mut [T],
) {
    g.check(gate.len(), up.len());
    let n = g.rows * g.cols;
    assert_eq!(dout.len(), n, "dout: wrong length");
    assert_eq!(dgate.len(), n, "dgate: wrong length");
    assert_eq!(dup.len(), n, "dup: wrong length");
    if g.cols == 0 {
        return;
    }
    let row = |(r, ((dg, du), d)): GradRows<'_, T>| {
        for (c, ((dg, du), d)) in dg.iter_mut().zip(du).zip(d).enumerate() {
            (*dg, *du) = gradients::<A, T>(g, r, c, d.load(), gate, up);
        }
    };
    if n < SERIAL_ELEMENTS {
        dgate
            .chunks_mut(g.cols)
            .zip(dup.chunks_mut(g.cols))
            .zip(dout.chunks(g.cols))
            .enumerate()
            .for_each(row);
    } else {
        dgate
            .par_chunks_mut(g.cols)
            .zip(dup.par_chunks_mut(g.cols))
            .zip(dout.par_chunks(g.cols))
            .enumerate()
            .for_each(row);
    }
}

/// The backward into one (rows, 2 * cols) tensor: the gradient of a gate_up tensor, written
/// as its layout holds gate and up (no concatenation afterwards): `[dgate | dup]` per row
/// for two halves, `(dgate, dup)` pairs with `pairs`.
pub fn backward_packed<A: Real, T: Storage<A>>(
    g: &Gated,
    dout: &[T],
    gate: &[T],
    up: &[T],
    dgate_up: &mut [T],
) {
    g.check(gate.len(), up.len());
    assert_eq!(dout.len(), g.rows * g.cols, "dout: wrong length");
    assert_eq!(
        dgate_up.len(),
        2 * g.rows * g.cols,
        "dgate_up: wrong length"
    );
    if g.cols == 0 {
        return;
    }
    let row = |(r, (both, d)): (usize, (&mut [T], &[T]))| {
        for (c, d) in d.iter().enumerate() {
            let (dg, du) = gradients::<A, T>(g, r, c, d.load(), gate, up);
            if g.pairs {
                (both[2 * c], both[2 * c + 1]) = (dg, du);
            } else {
                (both[c], both[g.cols + c]) = (dg, du);
            }
        }
    };
    if dout.len() < SERIAL_ELEMENTS {
        dgate_up
            .chunks_mut(2 * g.cols)
            .zip(dout.chunks(g.cols))
            .enumerate()
            .for_each(row);
    } else {
        dgate_up
            .par_chunks_mut(2 * g.cols)
            .zip(dout.par_chunks(g.cols))
            .enumerate()
            .for_each(row);
    }
}
