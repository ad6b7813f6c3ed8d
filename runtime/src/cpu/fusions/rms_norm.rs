//! RMSNorm forward and backward: the twin of `kernels/rms_norm.cu` (the formulas are written
//! there). Rows are independent in the forward and for dx; the weight gradient is summed in
//! float32 (float64 for float64 storage) per task of [`ROWS_PER_TASK`] rows, then the task
//! partials are added in row order and rounded once.
//!
//! The residual add in front ([`forward_add`], [`backward_dres`]): the norm of
//! `s = round_X(x + residual)`, s written out, and in the backward the gradient reaching s from
//! elsewhere (`dres`) added to dx before its one rounding.

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

pub(crate) fn sum_squares<A: Real, X: Storage<A>>(row: &[X]) -> A {
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

pub(crate) fn rstd_of<A: Real>(sum_sq: A, hidden: usize, eps: A) -> A {
    A::ONE / (sum_sq / A::from_f64(hidden as f64) + eps).sqrt()
}

/// The residual add in front of the norm: `sum` (rows, hidden) receives
/// `round_X(x + residual)` (torch's add of two X tensors: the sum in the arithmetic type, one
/// rounding), and the norm is that of `sum`.
pub struct Residual<'a, X> {
    pub residual: &'a [X],
    pub sum: &'a mut [X],
}

/// [`forward`] with, when `add` is given, the residual add in front: y and rstd are those of
/// `round_X(x + residual)`, which is written to `add.sum`.
pub fn forward_add<A, X, W, O>(
    p: &RmsNorm,
    x: &[X],
    add: Option<Residual<'_, X>>,
    w: &[W],
    y: &mut [O],
    rstd: &mut [A],
) where
    A: Real,
    X: Storage<A>,
    W: Storage<A>,
    O: Storage<A>,
{
    let Some(Residual { residual, sum }) = add else {
        return forward(p, x, w, y, rstd);
    };
    p.check(x.len(), w.len());
    assert_eq!(residual.len(), x.len(), "residual: wrong length");
    assert_eq!(sum.len(), x.len(), "sum: wrong length");
    let add = |((s, a), b): ((&mut X, &X), &X)| *s = X::store(a.load() + b.load());
    if x.len() < SERIAL_ELEMENTS {
        sum.iter_mut().zip(x).zip(residual).for_each(add);
    } else {
        sum.par_iter_mut()
            .zip(x.par_iter())
            .zip(residual.par_iter())
            .for_each(add);
    }
    forward(p, sum, w, y, rstd)
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
    backward_dres(p, dy, x, w, rstd, dx, dw, None)
}

/// [`backward`] with, when given, `dres` (rows, hidden) added to dx before its rounding:
/// `dx = round_X(r * (g - xn * c) + dres)`, the gradient of the residual add's sum (x is then
/// the saved sum).
#[allow(clippy::too_many_arguments)]
pub fn backward_dres<A, X, W, O>(
    p: &RmsNorm,
    dy: &[O],
    x: &[X],
    w: &[W],
    rstd: &[A],
    dx: &mut [X],
    dw: Option<&mut [W]>,
    dres: Option<&[X]>,
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
    if let Some(d) = dres {
        assert_eq!(d.len(), x.len(), "dres: wrong length");
    }
    let h = p.hidden;
    let offset = A::from_f64(p.offset);
    let we: Vec<A> = w.iter().map(|v| offset + v.load()).collect();
    let want_dw = dw.is_some();
    let hf = A::from_f64(h as f64);
    let block = ROWS_PER_TASK * h;
    let task = |(t, (((dxb, xb), dyb), rb)): (usize, BwdTask<'_, X, O, A>)| {
        let mut acc = want_dw.then(|| vec![A::ZERO; h]);
        for (i, (((dxr, xr), dyr), &r)) in dxb
            .chunks_mut(h)
            .zip(xb.chunks(h))
            .zip(dyb.chunks(h))
            .zip(rb)
            .enumerate()
        {
            let mut dot = A::ZERO;
            for ((xv, dv), wv) in xr.iter().zip(dyr).zip(&we) {
                dot += (dv.load() * *wv) * (xv.load() * r);
            }
            let c = dot / hf;
            let start = t * block + i * h;
            let dres_row = dres.map(|d| &d[start..start + h]);
            for (j, (((o, xv), dv), wv)) in dxr.iter_mut().zip(xr).zip(dyr).zip(&we).enumerate() {
                let xn = xv.load() * r;
                let d = dv.load();
                let v = r * (d * *wv - xn * c);
                *o = X::store(match dres_row {
                    Some(dr) => v + dr[j].load(),
                    None => v,
                });
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
            .enumerate()
            .map(task)
            .collect()
    } else {
        dx.par_chunks_mut(block)
            .zip(x.par_chunks(block))
            .zip(dy.par_chunks(block))
            .zip(rstd.par_chunks(ROWS_PER_TASK))
            .enumerate()
            .map(task)
            .collect()
    };
    if let Some(dw) = dw {
        assert_eq!(dw.len(), h, "dw: wrong length");
        finish_weight_gradient(&partials, dw);
    }
}

/// dw = the tasks' partial rows (`None`: no weight gradient was kept) added in task order,
/// rounded once to W: the same sum whatever the thread count.
pub(crate) fn finish_weight_gradient<A: Real, W: Storage<A>>(
    partials: &[Option<Vec<A>>],
    dw: &mut [W],
) {
    let mut total = vec![A::ZERO; dw.len()];
    for part in partials.iter().flatten() {
        for (t, v) in total.iter_mut().zip(part) {
            *t += *v;
        }
    }
    for (o, t) in dw.iter_mut().zip(total) {
        *o = W::store(t);
    }
}

#[cfg(test)]
mod residual_tests {
    //! The residual add in front of the norm against float64 references written from torch's
    //! definitions (`residual + x` in X, then the stock norm; dx of the sum = the norm's dx +
    //! dres), and against the plain twin on the same values for the single rounding.

    use half::{bf16, f16};

    use super::{Residual, RmsNorm, backward, backward_dres, forward, forward_add};
    use crate::cpu::fusions::{Real, Storage};

    /// xorshift64*, so a failing case is reproducible from its seed.
    struct Rng(u64);

    impl Rng {
        fn new(seed: u64) -> Rng {
            Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }
        /// Uniform in [-scale, scale).
        fn next(&mut self, scale: f64) -> f64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let u = (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64;
            (2.0 * u - 1.0) * scale
        }
        fn vec<A: Real, S: Storage<A>>(&mut self, n: usize, scale: f64) -> Vec<S> {
            (0..n)
                .map(|_| S::store(A::from_f64(self.next(scale))))
                .collect()
        }
    }

    fn f64s<A: Real, S: Storage<A>>(v: &[S]) -> Vec<f64> {
        v.iter().map(|x| x.load().to_f64()).collect()
    }

    /// `v` rounded to nearest even with `bits` significant bits (24: float32, 8: bf16, 11:
    /// float16; normal range only, which the test values keep to): torch's `.to(dtype)`. The
    /// float64 sums it rounds are exact, or (float32 terms far apart) rounded with more than
    /// 2 * bits + 2 bits, which rounds the same.
    fn round_bits(v: f64, bits: i32) -> f64 {
        if v == 0.0 || bits >= 53 {
            return v;
        }
        let e = ((v.to_bits() >> 52) & 0x7ff) as i32 - 1023; // v in [2^e, 2^(e+1))
        let ulp = (2f64).powi(e - bits + 1);
        let q = v / ulp; // exact: a power of two
        let mut r = q.round();
        if (q - q.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
            r -= q.signum(); // ties to even
        }
        r * ulp
    }

    fn problem(rows: usize, hidden: usize) -> RmsNorm {
        RmsNorm {
            rows,
            hidden,
            eps: 1e-6,
            offset: 0.0,
            cast_before: true,
        }
    }

    /// The stock norm of `s` in float64 (Llama order, no rounding) and its dx for `dy`.
    fn reference(p: &RmsNorm, s: &[f64], w: &[f64], dy: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let h = p.hidden;
        let (mut y, mut dx, mut scale) =
            (vec![0.0; s.len()], vec![0.0; s.len()], vec![0.0; s.len()]);
        for r in 0..p.rows {
            let (sr, dyr) = (&s[r * h..(r + 1) * h], &dy[r * h..(r + 1) * h]);
            let rs = 1.0 / (sr.iter().map(|v| v * v).sum::<f64>() / h as f64 + p.eps).sqrt();
            let g: f64 = (0..h).map(|j| dyr[j] * w[j] * sr[j]).sum();
            for i in 0..h {
                y[r * h + i] = w[i] * sr[i] * rs;
                dx[r * h + i] = dyr[i] * w[i] * rs - sr[i] * rs * rs * rs * g / h as f64;
                scale[r * h + i] = (dyr[i] * w[i] * rs).abs();
            }
        }
        (y, dx, scale)
    }

    /// Forward with the add, then backward with dres, for storage X (weight and output X
    /// too); checks s exactly, y, dx against float64, and the add path against the plain one.
    fn check<A: Real, X: Storage<A> + PartialEq + std::fmt::Debug>(
        rows: usize,
        hidden: usize,
        bits: i32,
        seed: u64,
        tol: f64,
    ) {
        let p = problem(rows, hidden);
        let n = rows * hidden;
        let mut rng = Rng::new(seed);
        let x: Vec<X> = rng.vec::<A, X>(n, 2.0);
        let res: Vec<X> = rng.vec::<A, X>(n, 2.0);
        let w: Vec<X> = rng.vec::<A, X>(hidden, 1.0);
        let dy: Vec<X> = rng.vec::<A, X>(n, 1.0);
        let dres: Vec<X> = rng.vec::<A, X>(n, 1.0);

        let mut sum = vec![X::store(A::ZERO); n];
        let mut y = vec![X::store(A::ZERO); n];
        let mut rstd = vec![A::ZERO; rows];
        let add = Residual {
            residual: &res,
            sum: &mut sum,
        };
        forward_add::<A, X, X, X>(&p, &x, Some(add), &w, &mut y, &mut rstd);

        // s: the float64 sum (exact for these inputs) rounded once to X.
        let (xf, rf) = (f64s::<A, X>(&x), f64s::<A, X>(&res));
        let s_ref: Vec<f64> = xf
            .iter()
            .zip(&rf)
            .map(|(a, b)| round_bits(a + b, bits))
            .collect();
        assert_eq!(
            f64s::<A, X>(&sum),
            s_ref,
            "sum of rows {rows} hidden {hidden}"
        );

        // y and rstd: exactly the plain forward of s.
        let mut y_plain = vec![X::store(A::ZERO); n];
        let mut rstd_plain = vec![A::ZERO; rows];
        forward::<A, X, X, X>(&p, &sum, &w, &mut y_plain, &mut rstd_plain);
        assert_eq!(y, y_plain);
        assert_eq!(
            rstd.iter().map(|v| v.to_f64()).collect::<Vec<_>>(),
            rstd_plain.iter().map(|v| v.to_f64()).collect::<Vec<_>>()
        );

        // Backward on the saved sum, dres added before the rounding.
        let mut dx = vec![X::store(A::ZERO); n];
        let mut dw = vec![X::store(A::ZERO); hidden];
        backward_dres::<A, X, X, X>(
            &p,
            &dy,
            &sum,
            &w,
            &rstd,
            &mut dx,
            Some(&mut dw),
            Some(&dres),
        );
        let mut dx_plain = vec![X::store(A::ZERO); n];
        let mut dw_plain = vec![X::store(A::ZERO); hidden];
        backward::<A, X, X, X>(&p, &dy, &sum, &w, &rstd, &mut dx_plain, Some(&mut dw_plain));
        assert_eq!(dw, dw_plain, "dres leaves dw alone");

        // Against float64: y and dx + dres, norm-wise, dx's error measured against the scale
        // of its terms (they cancel).
        let (wf, dyf, df) = (f64s::<A, X>(&w), f64s::<A, X>(&dy), f64s::<A, X>(&dres));
        let (y_ref, dx_ref, scale) = reference(&p, &s_ref, &wf, &dyf);
        let want: Vec<f64> = dx_ref.iter().zip(&df).map(|(a, b)| a + b).collect();
        let err = |got: &[f64], want: &[f64], scale: &[f64]| {
            let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum();
            let den: f64 = want.iter().zip(scale).map(|(a, b)| a * a + b * b).sum();
            (num / den.max(1e-300)).sqrt()
        };
        let ey = err(&f64s::<A, X>(&y), &y_ref, &vec![0.0; n]);
        let edx = err(&f64s::<A, X>(&dx), &want, &scale);
        assert!(
            ey <= tol && edx <= tol,
            "rows {rows} hidden {hidden}: y {ey:.2e} dx {edx:.2e}"
        );
    }

    #[test]
    fn residual_add_rounds_the_sum_once_and_normalises_it() {
        for (rows, hidden) in [(1, 1), (3, 7), (5, 64), (40, 100), (2, 4096)] {
            check::<f32, bf16>(rows, hidden, 8, 1, 1.5e-2);
            check::<f32, f16>(rows, hidden, 11, 2, 2e-3);
            check::<f32, f32>(rows, hidden, 24, 3, 2e-6);
            check::<f64, f64>(rows, hidden, 53, 4, 1e-13);
        }
        // Past SERIAL_ELEMENTS: the parallel add and tasks.
        check::<f32, bf16>(70, 512, 8, 5, 1.5e-2);
    }

    #[test]
    fn residual_add_of_halfway_sums_rounds_to_even() {
        // 1 + 2^-8 is halfway between bf16's 1 and 1 + 2^-7: even (1); 1 + 2^-7 + 2^-8: up.
        let p = problem(1, 2);
        let x = [bf16::from_f32(1.0), bf16::from_f32(1.0 + 1.0 / 128.0)];
        let r = [bf16::from_f32(1.0 / 256.0); 2];
        let mut sum = [bf16::ZERO; 2];
        let (mut y, mut rstd) = ([bf16::ZERO; 2], [0f32]);
        let add = Residual {
            residual: &r,
            sum: &mut sum,
        };
        forward_add::<f32, bf16, bf16, bf16>(&p, &x, Some(add), &[bf16::ONE; 2], &mut y, &mut rstd);
        assert_eq!(
            sum,
            [bf16::from_f32(1.0), bf16::from_f32(1.0 + 2.0 / 128.0)]
        );
        // float16: 2048 + 1 is halfway between 2048 and 2050: even (2048).
        let x = [f16::from_f32(2048.0), f16::from_f32(2050.0)];
        let r = [f16::from_f32(1.0); 2];
        let mut sum = [f16::ZERO; 2];
        let (mut y, mut rstd) = ([f16::ZERO; 2], [0f32]);
        let add = Residual {
            residual: &r,
            sum: &mut sum,
        };
        forward_add::<f32, f16, f16, f16>(&p, &x, Some(add), &[f16::ONE; 2], &mut y, &mut rstd);
        assert_eq!(sum, [f16::from_f32(2048.0), f16::from_f32(2052.0)]);
    }

    #[test]
    fn dres_is_added_before_the_one_rounding() {
        // The bf16 twin computes dx in float32 and rounds once; the float32 twin on the same
        // (bf16-exact) values returns that float32 value, so dx with dres must be exactly
        // bf16(dx_f32 + dres), and dx without it bf16(dx_f32).
        let (rows, hidden) = (33, 40);
        let p = problem(rows, hidden);
        let n = rows * hidden;
        let mut rng = Rng::new(9);
        let s: Vec<bf16> = rng.vec::<f32, bf16>(n, 2.0);
        let w: Vec<bf16> = rng.vec::<f32, bf16>(hidden, 1.0);
        let dy: Vec<bf16> = rng.vec::<f32, bf16>(n, 1.0);
        let dres: Vec<bf16> = rng.vec::<f32, bf16>(n, 1.0);
        let wide = |v: &[bf16]| v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
        let (s32, w32, dy32) = (wide(&s), wide(&w), wide(&dy));
        let mut y32 = vec![0f32; n];
        let mut rstd = vec![0f32; rows];
        forward::<f32, f32, f32, f32>(&p, &s32, &w32, &mut y32, &mut rstd);
        let mut dx32 = vec![0f32; n];
        backward::<f32, f32, f32, f32>(&p, &dy32, &s32, &w32, &rstd, &mut dx32, None);

        let mut dx = vec![bf16::ZERO; n];
        backward_dres::<f32, bf16, bf16, bf16>(&p, &dy, &s, &w, &rstd, &mut dx, None, Some(&dres));
        let want: Vec<bf16> = dx32
            .iter()
            .zip(&dres)
            .map(|(v, d)| bf16::from_f32(v + d.to_f32()))
            .collect();
        assert_eq!(dx, want);
        let mut dx_plain = vec![bf16::ZERO; n];
        backward_dres::<f32, bf16, bf16, bf16>(&p, &dy, &s, &w, &rstd, &mut dx_plain, None, None);
        let plain: Vec<bf16> = dx32.iter().map(|v| bf16::from_f32(*v)).collect();
        assert_eq!(dx_plain, plain);
        // Rounding twice (bf16(bf16(dx) + dres), stock's order) differs somewhere.
        let twice = dx_plain
            .iter()
            .zip(&dres)
            .zip(&want)
            .filter(|((v, d), once)| bf16::from_f32(v.to_f32() + d.to_f32()) != **once)
            .count();
        assert!(twice > 0);
    }
}
