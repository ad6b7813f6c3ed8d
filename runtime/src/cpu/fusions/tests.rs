//! The CPU twins against float64 references written from the stock modules' definitions
//! (no shared code): fixed cases for the edges, property tests over shapes, dtypes, layouts
//! and options.

use half::{bf16, f16};
use proptest::prelude::*;

use super::gated::{self, Clamp, Gated, act_grad, act_value};
use super::gated_norm::{self, GatedRmsNorm};
use super::rms_norm::{self, ROWS_PER_TASK, RmsNorm};
use super::rotary::{self, Rotary, View, ViewMut, extent, overlaps};
use super::scale_first::{self, ScaleFirst};
use super::{Activation, Real, Storage, round_to};

/// xorshift64*, so a failing case is reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Roughly normal: the sum of four uniforms, scaled.
    fn normal(&mut self) -> f64 {
        let u = |r: &mut Rng| (r.next() >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
        (u(self) + u(self) + u(self) + u(self)) * 1.7
    }
    fn vec(&mut self, n: usize, scale: f64) -> Vec<f64> {
        (0..n).map(|_| self.normal() * scale).collect()
    }
}

fn stored<A: Real, S: Storage<A>>(v: &[f64]) -> Vec<S> {
    v.iter().map(|x| S::store(A::from_f64(*x))).collect()
}

fn loaded<A: Real, S: Storage<A>>(v: &[S]) -> Vec<f64> {
    v.iter().map(|x| x.load().to_f64()).collect()
}

/// ||a - b|| / ||b|| (the norm of a when b is 0).
fn rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    if den > 0.0 {
        (num / den).sqrt()
    } else {
        num.sqrt()
    }
}

/// The norm-wise error of `got` measured against `scale`, the magnitudes of the terms
/// that sum (or cancel) to `want`, when those exceed `want` itself: a sum that cancels
/// keeps the absolute rounding of its terms, which a relative measure would blame on the
/// kernel (stock torch computes the same sums and rounds the same way).
fn err(got: &[f64], want: &[f64], scale: &[f64]) -> f64 {
    let zero = vec![0.0; want.len()];
    rel(got, want) * rel(want, &zero) / rel(scale, &zero).max(rel(want, &zero)).max(1e-300)
}

// ---- RMSNorm -------------------------------------------------------------------------------

struct RmsRef {
    y: Vec<f64>,
    dx: Vec<f64>,
    dw: Vec<f64>,
    /// The first term of dx alone (dy * (offset + w) * s): the scale of the two terms that
    /// cancel in dx (entirely when hidden is 1), by which its error is measured.
    dx_scale: Vec<f64>,
    /// Sum over rows of |dy * x * s|: the scale of dw's terms (of either sign, they cancel).
    dw_scale: Vec<f64>,
}

/// Stock RMSNorm in float64, no rounding: y = (offset + w) * x / sqrt(mean(x^2) + eps), and
/// its gradients for the upstream gradient dy, by the chain rule through the mean.
fn rms_reference(p: &RmsNorm, x: &[f64], w: &[f64], dy: &[f64]) -> RmsRef {
    let h = p.hidden;
    let mut out = RmsRef {
        y: vec![0.0; x.len()],
        dx: vec![0.0; x.len()],
        dw: vec![0.0; h],
        dx_scale: vec![0.0; x.len()],
        dw_scale: vec![0.0; h],
    };
    for r in 0..p.rows {
        let xr = &x[r * h..(r + 1) * h];
        let dyr = &dy[r * h..(r + 1) * h];
        let ms = xr.iter().map(|v| v * v).sum::<f64>() / h as f64;
        let s = 1.0 / (ms + p.eps).sqrt();
        // d y_j / d x_i = we_j (s delta_ij - x_j s^3 x_i / h)
        let gsum: f64 = (0..h).map(|j| dyr[j] * (p.offset + w[j]) * xr[j]).sum();
        for i in 0..h {
            let we = p.offset + w[i];
            out.y[r * h + i] = we * xr[i] * s;
            out.dx[r * h + i] = dyr[i] * we * s - xr[i] * s * s * s * gsum / h as f64;
            out.dw[i] += dyr[i] * xr[i] * s;
            out.dx_scale[r * h + i] = dyr[i] * we * s;
            out.dw_scale[i] += (dyr[i] * xr[i] * s).abs();
        }
    }
    out
}

struct RmsRun {
    y: Vec<f64>,
    rstd: Vec<f64>,
    dx: Vec<f64>,
    dw: Vec<f64>,
}

fn rms_run<A: Real, X: Storage<A>, W: Storage<A>, O: Storage<A>>(
    p: &RmsNorm,
    x: &[f64],
    w: &[f64],
    dy: &[f64],
) -> RmsRun {
    let (xs, ws, dys) = (stored::<A, X>(x), stored::<A, W>(w), stored::<A, O>(dy));
    let mut y = vec![O::store(A::ZERO); x.len()];
    let mut rstd = vec![A::ZERO; p.rows];
    rms_norm::forward::<A, X, W, O>(p, &xs, &ws, &mut y, &mut rstd);
    let mut dx = vec![X::store(A::ZERO); x.len()];
    let mut dw = vec![W::store(A::ZERO); p.hidden];
    rms_norm::backward::<A, X, W, O>(p, &dys, &xs, &ws, &rstd, &mut dx, Some(&mut dw));
    RmsRun {
        y: loaded::<A, O>(&y),
        rstd: rstd.iter().map(|v| v.to_f64()).collect(),
        dx: loaded::<A, X>(&dx),
        dw: loaded::<A, W>(&dw),
    }
}

/// The inputs as the twin sees them (rounded to their storage), so that the reference
/// measures the computation's error, not the inputs' rounding.
fn rounded<A: Real, S: Storage<A>>(v: &[f64]) -> Vec<f64> {
    loaded::<A, S>(&stored::<A, S>(v))
}

#[allow(clippy::too_many_arguments)]
fn check_rms<A: Real, X: Storage<A>, W: Storage<A>, O: Storage<A>>(
    rows: usize,
    hidden: usize,
    offset: f64,
    cast_before: bool,
    seed: u64,
    tol_y: f64,
    tol_grad: f64,
) {
    let mut rng = Rng::new(seed);
    let p = RmsNorm {
        rows,
        hidden,
        eps: 1e-6,
        offset,
        cast_before,
    };
    let x = rounded::<A, X>(&rng.vec(rows * hidden, 1.5));
    let w = rounded::<A, W>(
        &rng.vec(hidden, 0.3)
            .iter()
            .map(|v| v + 1.0 - offset)
            .collect::<Vec<_>>(),
    );
    let dy = rounded::<A, O>(&rng.vec(rows * hidden, 1.0));
    let got = rms_run::<A, X, W, O>(&p, &x, &w, &dy);
    let want = rms_reference(&p, &x, &w, &dy);
    let ey = rel(&got.y, &want.y);
    let edx = err(&got.dx, &want.dx, &want.dx_scale);
    let edw = err(&got.dw, &want.dw, &want.dw_scale);
    assert!(
        ey <= tol_y && edx <= tol_grad && edw <= tol_grad,
        "rows {rows} hidden {hidden} offset {offset} cast_before {cast_before}: y {ey:.2e} dx {edx:.2e} dw {edw:.2e}"
    );
    for (r, s) in got.rstd.iter().enumerate() {
        let xr = &x[r * hidden..(r + 1) * hidden];
        let exact = 1.0 / (xr.iter().map(|v| v * v).sum::<f64>() / hidden as f64 + 1e-6).sqrt();
        assert!(
            (s - exact).abs() <= 1e-5 * exact,
            "rstd of row {r}: {s} vs {exact}"
        );
    }
}

#[test]
fn rms_norm_float32_is_float32_accurate() {
    for (rows, hidden) in [(1, 1), (3, 7), (5, 64), (70, 128), (2, 4096)] {
        check_rms::<f32, f32, f32, f32>(rows, hidden, 0.0, true, 1, 1e-6, 1e-5);
        check_rms::<f32, f32, f32, f32>(rows, hidden, 1.0, false, 2, 1e-6, 1e-5);
    }
}

#[test]
fn rms_norm_float64_matches_the_reference_to_rounding() {
    check_rms::<f64, f64, f64, f64>(37, 96, 0.0, true, 3, 1e-14, 1e-13);
    check_rms::<f64, f64, f64, f64>(37, 96, 1.0, false, 4, 1e-14, 1e-13);
}

#[test]
fn rms_norm_16_bit_within_their_rounding() {
    // bf16 keeps 8 significant bits: one rounding is 2^-9 relative, the Llama order two.
    check_rms::<f32, bf16, bf16, bf16>(65, 256, 0.0, true, 5, 8e-3, 1.2e-2);
    check_rms::<f32, bf16, bf16, bf16>(65, 256, 1.0, false, 6, 5e-3, 1.2e-2);
    check_rms::<f32, f16, f16, f16>(65, 256, 0.0, true, 7, 1e-3, 2e-3);
    check_rms::<f32, bf16, f32, f32>(40, 100, 0.0, true, 8, 5e-3, 1e-2);
    check_rms::<f32, bf16, f32, bf16>(40, 100, 1.0, false, 9, 5e-3, 1e-2);
    check_rms::<f32, f16, f32, f16>(40, 100, 0.0, false, 10, 1e-3, 2e-3);
}

#[test]
fn rms_norm_llama_order_rounds_before_the_weight() {
    // weight * x.to(bf16) in bf16 is round(w * round(xn)); Gemma's round(xn * w) differs on
    // some elements, and the twin must reproduce the exact stock value of each.
    let p = RmsNorm {
        rows: 1,
        hidden: 64,
        eps: 1e-6,
        offset: 0.0,
        cast_before: true,
    };
    let mut rng = Rng::new(11);
    let x: Vec<bf16> = stored::<f32, bf16>(&rng.vec(64, 1.0));
    let w: Vec<bf16> = stored::<f32, bf16>(&rng.vec(64, 1.0));
    let mut y = vec![bf16::ZERO; 64];
    let mut rstd = [0f32];
    rms_norm::forward::<f32, bf16, bf16, bf16>(&p, &x, &w, &mut y, &mut rstd);
    let ss: f32 = x.iter().map(|v| v.to_f32() * v.to_f32()).sum();
    let r = 1.0 / (ss / 64.0 + 1e-6f32).sqrt();
    let (mut differ, mut exact) = (0, 0);
    for j in 0..64 {
        let xn = x[j].to_f32() * r;
        let llama = bf16::from_f32(w[j].to_f32() * bf16::from_f32(xn).to_f32());
        let gemma = bf16::from_f32(xn * w[j].to_f32());
        differ += (llama != gemma) as usize;
        exact += (y[j] == llama) as usize;
    }
    // This sequential sum may differ from the twin's in its last bit, which can move a value
    // that sits next to a rounding boundary; nearly all must be the stock value exactly.
    assert!(exact >= 62, "{exact} of 64 match the Llama order");
    assert!(
        differ > 0,
        "the two orders should differ somewhere on 64 random values"
    );
}

#[test]
fn rms_norm_weight_gradient_does_not_depend_on_the_cut() {
    // More rows than one task holds, a count that does not divide, and enough elements for
    // the parallel path: the same dw for any thread count.
    let rows = 45 * ROWS_PER_TASK + 5;
    assert!(rows * 24 >= super::SERIAL_ELEMENTS);
    check_rms::<f32, f32, f32, f32>(rows, 24, 0.0, true, 12, 1e-6, 1e-5);
    let p = RmsNorm {
        rows,
        hidden: 24,
        eps: 1e-5,
        offset: 0.0,
        cast_before: false,
    };
    let mut rng = Rng::new(13);
    let x = stored::<f32, f32>(&rng.vec(rows * 24, 1.0));
    let w = stored::<f32, f32>(&rng.vec(24, 1.0));
    let dy = stored::<f32, f32>(&rng.vec(rows * 24, 1.0));
    let mut y = vec![0f32; rows * 24];
    let mut rstd = vec![0f32; rows];
    rms_norm::forward::<f32, f32, f32, f32>(&p, &x, &w, &mut y, &mut rstd);
    let mut first = None;
    for threads in [1, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let mut dx = vec![0f32; rows * 24];
        let mut dw = vec![0f32; 24];
        pool.install(|| {
            rms_norm::backward::<f32, f32, f32, f32>(&p, &dy, &x, &w, &rstd, &mut dx, Some(&mut dw))
        });
        match &first {
            None => first = Some((dx, dw)),
            Some(f) => assert!(f.0 == dx && f.1 == dw, "results depend on the thread count"),
        }
    }
}

#[test]
fn rms_norm_without_weight_gradient_and_empty_rows() {
    let p = RmsNorm {
        rows: 0,
        hidden: 8,
        eps: 1e-6,
        offset: 0.0,
        cast_before: true,
    };
    let w = [1f32; 8];
    let mut dw = [7f32; 8];
    rms_norm::backward::<f32, f32, f32, f32>(&p, &[], &[], &w, &[], &mut [], Some(&mut dw));
    assert_eq!(dw, [0.0; 8], "no rows: a zero weight gradient");
    let p = RmsNorm { rows: 2, ..p };
    let x = [1f32; 16];
    let mut dx = [0f32; 16];
    rms_norm::backward::<f32, f32, f32, f32>(&p, &x, &x, &w, &[1.0, 1.0], &mut dx, None);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn rms_norm_matches_float64(
        rows in 0usize..80,
        hidden in 1usize..300,
        gemma in any::<bool>(),
        combo in 0usize..4,
        seed in any::<u64>(),
    ) {
        let (offset, cast_before) = if gemma { (1.0, false) } else { (0.0, true) };
        match combo {
            0 => check_rms::<f32, f32, f32, f32>(rows, hidden, offset, cast_before, seed, 2e-6, 2e-5),
            1 => check_rms::<f32, bf16, bf16, bf16>(rows, hidden, offset, cast_before, seed, 1e-2, 2e-2),
            2 => check_rms::<f32, f16, f32, f16>(rows, hidden, offset, cast_before, seed, 2e-3, 3e-3),
            _ => check_rms::<f64, f64, f64, f64>(rows, hidden, offset, cast_before, seed, 1e-13, 1e-12),
        }
    }
}

// ---- rotary --------------------------------------------------------------------------------

/// The stock formula in float64 on one row: `x * cos + rotate(x) * sin` over the first
/// rot_dim entries, the rest passed through; `rotate` is rotate_half or rotate_every_two
/// built as the modeling files build it.
fn rope_row_reference(x: &[f64], c: &[f64], s: &[f64], rot: usize, interleaved: bool) -> Vec<f64> {
    let mut rotated = vec![0.0; rot];
    if interleaved {
        for i in 0..rot / 2 {
            rotated[2 * i] = -x[2 * i + 1];
            rotated[2 * i + 1] = x[2 * i];
        }
    } else {
        let half = rot / 2;
        for i in 0..half {
            rotated[i] = -x[half + i];
            rotated[half + i] = x[i];
        }
    }
    let mut out = x.to_vec();
    for j in 0..rot {
        out[j] = x[j] * c[j] + rotated[j] * s[j];
    }
    out
}

#[derive(Clone, Debug)]
struct RopeCase {
    p0: usize,
    p1: usize,
    q_heads: usize,
    k_heads: usize,
    head_dim: usize,
    rot_dim: usize,
    interleaved: bool,
    /// q's memory order: heads outermost-but-one (b, h, s, d) or innermost (b, s, h, d).
    heads_inner: bool,
    /// cos broadcast over P0 (batch 1, as position_ids of shape (1, s) give).
    cos_broadcast: bool,
    /// Extra elements between rows (a strided view).
    pad: usize,
    seed: u64,
}

/// Strides over (P0, P1, head) for a tensor of that shape in the case's memory order.
fn strides_for(c: &RopeCase, heads: usize) -> [usize; 3] {
    let row = c.head_dim + c.pad;
    if c.heads_inner {
        [c.p1 * heads * row, heads * row, row]
    } else {
        [heads * c.p1 * row, row, c.p1 * row]
    }
}

fn check_rope<A: Real, I: Storage<A>, C: Storage<A>, O: Storage<A>>(case: &RopeCase, tol: f64) {
    let mut rng = Rng::new(case.seed);
    let r = Rotary {
        p0: case.p0,
        p1: case.p1,
        q_heads: case.q_heads,
        k_heads: case.k_heads,
        head_dim: case.head_dim,
        rot_dim: case.rot_dim,
        interleaved: case.interleaved,
        transpose: false,
    };
    let qs = strides_for(case, case.q_heads);
    let ks = strides_for(case, case.k_heads);
    let sizes = |h| [case.p0, case.p1, h, case.head_dim];
    let q_len = extent(&sizes(case.q_heads), &[qs[0], qs[1], qs[2], 1]);
    let k_len = extent(&sizes(case.k_heads), &[ks[0], ks[1], ks[2], 1]);
    let q = rounded::<A, I>(&rng.vec(q_len, 1.0));
    let k = rounded::<A, I>(&rng.vec(k_len, 1.0));
    // cos/sin as the models build them: angles t * f_i, duplicated halves (or pairs).
    let cp0 = if case.cos_broadcast { 1 } else { case.p0 };
    let rd = case.rot_dim;
    let mut cosv = vec![0.0; cp0 * case.p1 * rd];
    let mut sinv = vec![0.0; cp0 * case.p1 * rd];
    for a in 0..cp0 {
        for b in 0..case.p1 {
            let t = (b + 3 * a) as f64 + rng.normal();
            for j in 0..rd {
                let f = if case.interleaved {
                    j / 2
                } else {
                    j % (rd / 2).max(1)
                };
                let theta = t / 10000f64.powf(2.0 * f as f64 / rd as f64);
                cosv[(a * case.p1 + b) * rd + j] = theta.cos();
                sinv[(a * case.p1 + b) * rd + j] = theta.sin();
            }
        }
    }
    let cosv = rounded::<A, C>(&cosv);
    let sinv = rounded::<A, C>(&sinv);
    let cstr = [if case.cos_broadcast { 0 } else { case.p1 * rd }, rd, 0];
    let (qi, ki, ci, si) = (
        stored::<A, I>(&q),
        stored::<A, I>(&k),
        stored::<A, C>(&cosv),
        stored::<A, C>(&sinv),
    );
    let mut qo = vec![O::store(A::ZERO); q_len];
    let mut ko = vec![O::store(A::ZERO); k_len];
    rotary::apply::<A, I, C, O>(
        &r,
        View {
            data: &qi,
            strides: qs,
        },
        View {
            data: &ki,
            strides: ks,
        },
        View {
            data: &ci,
            strides: cstr,
        },
        View {
            data: &si,
            strides: cstr,
        },
        ViewMut {
            data: &mut qo,
            strides: qs,
        },
        ViewMut {
            data: &mut ko,
            strides: ks,
        },
    );
    // Forward against the reference, and the backward (transpose) against the adjoint
    // identity <R x, y> = <x, R^T y> computed with the reference.
    let qo = loaded::<A, O>(&qo);
    let ko = loaded::<A, O>(&ko);
    let mut got = Vec::new();
    let mut want = Vec::new();
    for a in 0..case.p0 {
        for b in 0..case.p1 {
            let c0 = a * cstr[0] + b * cstr[1];
            let (c, s) = (&cosv[c0..c0 + rd], &sinv[c0..c0 + rd]);
            for (src, out, st, heads) in [(&q, &qo, qs, case.q_heads), (&k, &ko, ks, case.k_heads)]
            {
                for h in 0..heads {
                    let i0 = a * st[0] + b * st[1] + h * st[2];
                    let x = &src[i0..i0 + case.head_dim];
                    want.extend(rope_row_reference(x, c, s, rd, case.interleaved));
                    got.extend_from_slice(&out[i0..i0 + case.head_dim]);
                }
            }
        }
    }
    let e = rel(&got, &want);
    assert!(e <= tol, "{case:?}: forward error {e:.2e}");

    // Backward: dq = R^T dy. Check <R x, dy> == <x, R^T dy> in the arithmetic of A.
    let dy = rounded::<A, I>(&rng.vec(q_len, 1.0));
    let dyk = rounded::<A, I>(&rng.vec(k_len, 1.0));
    let mut dq = vec![O::store(A::ZERO); q_len];
    let mut dk = vec![O::store(A::ZERO); k_len];
    let (dys, dyks) = (stored::<A, I>(&dy), stored::<A, I>(&dyk));
    rotary::apply::<A, I, C, O>(
        &Rotary {
            transpose: true,
            ..r
        },
        View {
            data: &dys,
            strides: qs,
        },
        View {
            data: &dyks,
            strides: ks,
        },
        View {
            data: &ci,
            strides: cstr,
        },
        View {
            data: &si,
            strides: cstr,
        },
        ViewMut {
            data: &mut dq,
            strides: qs,
        },
        ViewMut {
            data: &mut dk,
            strides: ks,
        },
    );
    let dq = loaded::<A, O>(&dq);
    let dk = loaded::<A, O>(&dk);
    let mut lhs = 0.0;
    let mut rhs = 0.0;
    let mut scale = 0.0;
    let mut idx = 0;
    for a in 0..case.p0 {
        for b in 0..case.p1 {
            for (x, g, d, st, heads) in [
                (&q, &dy, &dq, qs, case.q_heads),
                (&k, &dyk, &dk, ks, case.k_heads),
            ] {
                for h in 0..heads {
                    let i0 = a * st[0] + b * st[1] + h * st[2];
                    for j in 0..case.head_dim {
                        lhs += want[idx] * g[i0 + j];
                        rhs += x[i0 + j] * d[i0 + j];
                        scale += (want[idx] * g[i0 + j]).abs();
                        idx += 1;
                    }
                }
            }
        }
    }
    let e = (lhs - rhs).abs() / scale.max(1e-30);
    assert!(e <= tol, "{case:?}: <Rx, y> - <x, R^T y> relative {e:.2e}");
}

fn rope_case(head_dim: usize, rot_dim: usize, interleaved: bool) -> RopeCase {
    RopeCase {
        p0: 2,
        p1: 5,
        q_heads: 4,
        k_heads: 2,
        head_dim,
        rot_dim,
        interleaved,
        heads_inner: true,
        cos_broadcast: false,
        pad: 0,
        seed: 21,
    }
}

#[test]
fn rotary_full_partial_interleaved() {
    for (hd, rd, il) in [
        (64, 64, false),
        (80, 32, false),
        (128, 64, true),
        (6, 6, true),
        (10, 4, false),
    ] {
        let c = rope_case(hd, rd, il);
        check_rope::<f32, f32, f32, f32>(&c, 1e-6);
        check_rope::<f64, f64, f64, f64>(&c, 1e-14);
        check_rope::<f32, bf16, bf16, bf16>(&c, 6e-3);
        check_rope::<f32, f16, f32, f32>(&c, 1e-3);
        check_rope::<f32, bf16, f32, bf16>(&c, 6e-3);
    }
}

#[test]
fn rotary_layouts_and_broadcast() {
    let mut c = rope_case(64, 64, false);
    c.heads_inner = false;
    check_rope::<f32, f32, f32, f32>(&c, 1e-6);
    c.cos_broadcast = true;
    check_rope::<f32, f32, f32, f32>(&c, 1e-6);
    c.pad = 3;
    c.interleaved = true;
    check_rope::<f32, bf16, bf16, f32>(&c, 6e-3);
}

#[test]
fn rotary_layout_helpers() {
    assert_eq!(extent(&[2, 3, 4], &[12, 4, 1]), 24);
    assert_eq!(extent(&[2, 0, 4], &[12, 4, 1]), 0);
    assert!(!overlaps(&[2, 3, 4], &[12, 4, 1]));
    assert!(!overlaps(&[2, 3, 4], &[4, 8, 1]));
    assert!(overlaps(&[2, 3, 4], &[12, 2, 1]));
    assert!(
        !overlaps(&[1, 3, 4], &[0, 4, 1]),
        "size-1 dimensions do not count"
    );
    assert!(overlaps(&[2, 3], &[0, 1]));
}

#[test]
#[should_panic(expected = "overlaps itself")]
fn rotary_refuses_a_self_overlapping_output() {
    let r = Rotary {
        p0: 1,
        p1: 2,
        q_heads: 1,
        k_heads: 1,
        head_dim: 4,
        rot_dim: 4,
        interleaved: false,
        transpose: false,
    };
    let x = [1f32; 8];
    let c = [1f32; 8];
    let mut qo = [0f32; 8];
    let mut ko = [0f32; 8];
    rotary::apply::<f32, f32, f32, f32>(
        &r,
        View {
            data: &x,
            strides: [8, 4, 4],
        },
        View {
            data: &x,
            strides: [8, 4, 4],
        },
        View {
            data: &c,
            strides: [8, 4, 0],
        },
        View {
            data: &c,
            strides: [8, 4, 0],
        },
        ViewMut {
            data: &mut qo,
            strides: [8, 2, 4],
        },
        ViewMut {
            data: &mut ko,
            strides: [8, 4, 4],
        },
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    #[test]
    fn rotary_matches_float64(
        p0 in 1usize..3,
        p1 in 1usize..6,
        q_heads in 1usize..5,
        k_heads in 1usize..3,
        half_rot in 1usize..20,
        extra in 0usize..9,
        interleaved in any::<bool>(),
        heads_inner in any::<bool>(),
        cos_broadcast in any::<bool>(),
        pad in 0usize..3,
        combo in 0usize..3,
        seed in any::<u64>(),
    ) {
        let case = RopeCase {
            p0, p1, q_heads, k_heads,
            head_dim: 2 * half_rot + extra,
            rot_dim: 2 * half_rot,
            interleaved, heads_inner, cos_broadcast, pad, seed,
        };
        match combo {
            0 => check_rope::<f32, f32, f32, f32>(&case, 2e-6),
            1 => check_rope::<f32, bf16, f32, bf16>(&case, 8e-3),
            _ => check_rope::<f64, f64, f64, f64>(&case, 1e-13),
        }
    }
}

// ---- gated MLP product ---------------------------------------------------------------------

fn act_reference(act: Activation, x: f64) -> f64 {
    match act {
        Activation::Silu => x / (1.0 + (-x).exp()),
        Activation::GeluTanh => {
            0.5 * x
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
        }
        Activation::Sigmoid => 1.0 / (1.0 + (-x).exp()),
        Activation::SwigluOai => unreachable!("takes an alpha: swiglu_oai's own test"),
    }
}

#[test]
fn activation_derivatives_match_finite_differences() {
    for act in [Activation::Silu, Activation::GeluTanh, Activation::Sigmoid] {
        for i in -80..=80 {
            let x = i as f64 * 0.1;
            let h = 1e-6;
            let numeric = (act_reference(act, x + h) - act_reference(act, x - h)) / (2.0 * h);
            let got = act_grad::<f64>(act, x);
            assert!(
                (got - numeric).abs() <= 1e-8,
                "{act:?} at {x}: {got} vs {numeric}"
            );
            assert!(
                (act_value::<f64>(act, x) - act_reference(act, x)).abs() <= 1e-15 * (1.0 + x.abs())
            );
            let f = act_value::<f32>(act, x as f32) as f64;
            assert!(
                (f - act_reference(act, x)).abs() <= 1e-6 * (1.0 + x.abs()),
                "{act:?} float32 at {x}"
            );
        }
    }
}

fn check_gated<A: Real, T: Storage<A>>(
    rows: usize,
    cols: usize,
    pad: usize,
    act: Activation,
    seed: u64,
    tol: f64,
) {
    check_gated_clamped::<A, T>(rows, cols, pad, act, None, seed, tol)
}

/// The clamped SwiGLU against float64: `act(min(x, L)) * clamp(u, -L, L)` (or the activation
/// clamped), gradients zero where a clamp holds. Which side of L a value lies on is decided
/// on the values the kernel compares (rounded to T), so a reference computed in float64 takes
/// the same branch.
fn check_gated_clamped<A: Real, T: Storage<A>>(
    rows: usize,
    cols: usize,
    pad: usize,
    act: Activation,
    clamp: Option<Clamp>,
    seed: u64,
    tol: f64,
) {
    let mut rng = Rng::new(seed);
    let ld = cols + pad;
    let span = if rows == 0 { 0 } else { (rows - 1) * ld + cols };
    let gate = rounded::<A, T>(&rng.vec(span, 2.0));
    let up = rounded::<A, T>(&rng.vec(span, 1.0));
    let dout = rounded::<A, T>(&rng.vec(rows * cols, 1.0));
    let g = Gated {
        rows,
        cols,
        ld_gate: ld,
        ld_up: ld,
        act,
        clamp,
        alpha: 0.0,
        pairs: false,
    };
    let (gs, us, ds) = (
        stored::<A, T>(&gate),
        stored::<A, T>(&up),
        stored::<A, T>(&dout),
    );
    let mut out = vec![T::store(A::ZERO); rows * cols];
    gated::forward::<A, T>(&g, &gs, &us, &mut out);
    let mut dgate = vec![T::store(A::ZERO); rows * cols];
    let mut dup = vec![T::store(A::ZERO); rows * cols];
    gated::backward::<A, T>(&g, &ds, &gs, &us, &mut dgate, &mut dup);
    let (mut w_out, mut w_dg, mut w_du) = (Vec::new(), Vec::new(), Vec::new());
    // The magnitudes of the terms each value is computed from: GELU-tanh's `1 + tanh`
    // cancels for negative inputs (in stock torch too), leaving float rounding of `x`.
    let (mut s_out, mut s_dg, mut s_du) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..rows {
        for c in 0..cols {
            let (x0, u0, d) = (gate[r * ld + c], up[r * ld + c], dout[r * cols + c]);
            let (x, a, u, gate_passes, up_passes) = match clamp {
                None => (x0, act_reference(act, x0), u0, true, true),
                Some(k) => {
                    let l = round_to::<A, T>(A::from_f64(k.limit as f64)).to_f64();
                    let below = |x: f64| x < l || (k.grad_at_bound && x == l);
                    let x = if k.after_activation { x0 } else { x0.min(l) };
                    let a = act_reference(act, x);
                    let a_t = round_to::<A, T>(A::from_f64(a)).to_f64();
                    let (a, passes) = if k.after_activation {
                        (if a_t > l { l } else { a }, below(a_t))
                    } else {
                        (a, below(x0))
                    };
                    (x, a, u0.clamp(-l, l), passes, below(u0) && below(-u0))
                }
            };
            // Five-point central difference: error ~1e-13, independent of the formula under
            // test (a two-point one at h = 1e-6 leaves ~1e-10, too coarse where act' ~ 0).
            let h = 1e-3;
            let f = |t: f64| act_reference(act, x + t * h);
            let da = (f(-2.0) - 8.0 * f(-1.0) + 8.0 * f(1.0) - f(2.0)) / (12.0 * h);
            w_out.push(a * u);
            w_du.push(if up_passes { d * a } else { 0.0 });
            w_dg.push(if gate_passes { d * u * da } else { 0.0 });
            let slope = match act {
                Activation::Silu => 1.0 + x.abs(),
                Activation::GeluTanh => 1.0 + x.abs() * (1.0 + 0.134145 * x * x),
                Activation::Sigmoid | Activation::SwigluOai => {
                    unreachable!("not here: the gated norm's, swiglu_oai's own test")
                }
            };
            s_out.push(x * u);
            s_du.push(d * x);
            s_dg.push(d * u * slope);
        }
    }
    let e = [
        err(&loaded::<A, T>(&out), &w_out, &s_out),
        err(&loaded::<A, T>(&dgate), &w_dg, &s_dg),
        err(&loaded::<A, T>(&dup), &w_du, &s_du),
    ];
    assert!(
        e.iter().all(|v| *v <= tol),
        "{act:?} rows {rows} cols {cols} pad {pad}: out {:.2e} dgate {:.2e} dup {:.2e}",
        e[0],
        e[1],
        e[2]
    );
}

#[test]
fn gated_product_and_its_backward() {
    for act in [Activation::Silu, Activation::GeluTanh] {
        check_gated::<f32, f32>(7, 33, 0, act, 31, 1e-6);
        check_gated::<f32, f32>(7, 33, 33, act, 32, 1e-6);
        check_gated::<f64, f64>(5, 16, 2, act, 33, 1e-9);
        check_gated::<f32, bf16>(9, 64, 64, act, 34, 8e-3);
        check_gated::<f32, f16>(9, 64, 0, act, 35, 1.5e-3);
        check_gated::<f32, f32>(0, 16, 0, act, 36, 0.0);
    }
}

#[test]
fn clamped_swiglu_and_its_backward() {
    // The gate is drawn in [-2, 2) and up in [-1, 1): limits of 0.75 and 1.5 clamp a good
    // share of both; inf clamps nothing but still runs the clamped code.
    for (limit, grad_at_bound) in [(0.75f32, false), (1.5, true), (f32::INFINITY, false)] {
        for after_activation in [false, true] {
            let clamp = Some(Clamp {
                limit,
                after_activation,
                grad_at_bound,
            });
            for act in [Activation::Silu, Activation::GeluTanh] {
                check_gated_clamped::<f32, f32>(7, 33, 3, act, clamp, 61, 1e-6);
                check_gated_clamped::<f64, f64>(5, 16, 2, act, clamp, 62, 1e-9);
                check_gated_clamped::<f32, bf16>(9, 64, 64, act, clamp, 63, 8e-3);
                check_gated_clamped::<f32, f16>(9, 64, 0, act, clamp, 64, 1.5e-3);
            }
        }
    }
}

/// GPT-OSS's experts gate: (gate, up) pairs of one gate_up row, clamped at a limit, then
/// `(up + 1) * gate * sigmoid(alpha * gate)`.
fn oai_case(rows: usize, cols: usize, pad: usize, seed: u64) -> (Gated, Vec<f64>, Vec<f64>) {
    let mut rng = Rng::new(seed);
    let ld = 2 * cols + pad;
    let gate_up = rng.vec(
        if rows == 0 {
            0
        } else {
            (rows - 1) * ld + 2 * cols
        },
        2.0,
    );
    let dout = rng.vec(rows * cols, 1.0);
    let g = Gated {
        rows,
        cols,
        ld_gate: ld,
        ld_up: ld,
        act: Activation::SwigluOai,
        clamp: Some(Clamp {
            limit: 1.5,
            after_activation: false,
            grad_at_bound: true,
        }),
        alpha: 1.702,
        pairs: true,
    };
    (g, gate_up, dout)
}

#[test]
fn swiglu_oai_on_pairs_matches_float64() {
    let (g, gate_up, dout) = oai_case(5, 16, 2, 71);
    let mut out = vec![0.0f64; 5 * 16];
    gated::forward::<f64, f64>(&g, &gate_up, &[], &mut out);
    let mut grad = vec![0.0f64; 5 * 32];
    gated::backward_packed::<f64, f64>(&g, &dout, &gate_up, &[], &mut grad);
    let (l, alpha) = (1.5f64, g.alpha as f64);
    for r in 0..5 {
        for c in 0..16 {
            let (g0, u0, d) = (
                gate_up[r * g.ld_gate + 2 * c],
                gate_up[r * g.ld_gate + 2 * c + 1],
                dout[r * 16 + c],
            );
            let x = g0.min(l);
            let s = 1.0 / (1.0 + (-alpha * x).exp());
            let up = u0.clamp(-l, l) + 1.0;
            let want = [
                x * s * up,
                if g0 <= l {
                    d * up * (s + x * alpha * s * (1.0 - s))
                } else {
                    0.0
                },
                if u0.abs() <= l { d * x * s } else { 0.0 },
            ];
            let got = [
                out[r * 16 + c],
                grad[r * 32 + 2 * c],
                grad[r * 32 + 2 * c + 1],
            ];
            for (k, (a, b)) in got.iter().zip(want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-12 * (1.0 + b.abs()),
                    "({r}, {c}) [{k}]: {a} vs {b}"
                );
            }
        }
    }
}

#[test]
fn swiglu_oai_rounds_like_gpt_oss_statements() {
    // glu = gate * sigmoid(gate * alpha) and (up + 1) * glu, each statement rounded to bf16.
    let (g, gate_up, dout) = oai_case(3, 24, 0, 72);
    let gu = stored::<f32, bf16>(&gate_up);
    let mut out = vec![bf16::ZERO; 3 * 24];
    gated::forward::<f32, bf16>(&g, &gu, &[], &mut out);
    let r16 = |x: f32| bf16::from_f32(x).to_f32();
    let lim = r16(1.5);
    for i in 0..3 * 24 {
        let (gv, uv) = (gu[2 * i].to_f32(), gu[2 * i + 1].to_f32());
        let x = gv.min(lim);
        let s = r16(1.0 / (1.0 + (-r16(x * 1.702)).exp()));
        let glu = r16(x * s);
        let up = r16(uv.clamp(-lim, lim) + 1.0);
        assert_eq!(out[i], bf16::from_f32(up * glu), "element {i}");
    }
    // The packed backward writes (dgate, dup) pairs: the two-tensor backward's numbers.
    let ds = stored::<f32, bf16>(&dout);
    let mut pairs = vec![bf16::ZERO; 3 * 48];
    gated::backward_packed::<f32, bf16>(&g, &ds, &gu, &[], &mut pairs);
    let (gate, up): (Vec<bf16>, Vec<bf16>) = gu.chunks(2).map(|p| (p[0], p[1])).unzip();
    let split = Gated {
        ld_gate: 24,
        ld_up: 24,
        pairs: false,
        ..g
    };
    let (mut dg, mut du) = (vec![bf16::ZERO; 72], vec![bf16::ZERO; 72]);
    gated::backward::<f32, bf16>(&split, &ds, &gate, &up, &mut dg, &mut du);
    for i in 0..72 {
        assert_eq!(
            (pairs[2 * i], pairs[2 * i + 1]),
            (dg[i], du[i]),
            "element {i}"
        );
    }
}

#[test]
fn clamped_swiglu_rounds_the_limit_and_keeps_nan() {
    // A limit between two bf16 values clamps to its bf16 rounding (torch compares a bf16
    // tensor with the scalar cast to bf16); NaN passes through a clamp, its gradient is 0.
    let limit = 1.3f32; // between the bf16 values 1.296875 and 1.3046875: rounds to the first
    let lim = bf16::from_f32(limit);
    let gate = [1.0f32, 1.296875, 1.3046875, f32::NAN, 5.0].map(bf16::from_f32);
    assert_eq!(lim, gate[1]);
    let up = [1.3125f32, -2.0, 0.5, 1.0, f32::NAN].map(bf16::from_f32);
    for grad_at_bound in [false, true] {
        check_limit_rounding_and_nan(limit, lim, &gate, &up, grad_at_bound);
    }
}

fn check_limit_rounding_and_nan(
    limit: f32,
    lim: bf16,
    gate: &[bf16; 5],
    up: &[bf16; 5],
    grad_at_bound: bool,
) {
    let clamp = Some(Clamp {
        limit,
        after_activation: false,
        grad_at_bound,
    });
    let g = Gated {
        rows: 1,
        cols: 5,
        ld_gate: 5,
        ld_up: 5,
        act: Activation::Silu,
        clamp,
        alpha: 0.0,
        pairs: false,
    };
    let mut out = [bf16::ZERO; 5];
    gated::forward::<f32, bf16>(&g, gate, up, &mut out);
    let silu = |x: f32| bf16::from_f32(x / (1.0 + (-x).exp())).to_f32();
    let expect = [
        silu(1.0) * lim.to_f32(),
        silu(lim.to_f32()) * -lim.to_f32(),
        silu(lim.to_f32()) * 0.5,
        f32::NAN,
        f32::NAN,
    ];
    for i in 0..5 {
        let (o, e) = (out[i].to_f32(), bf16::from_f32(expect[i]).to_f32());
        assert!(
            o == e || (o.is_nan() && e.is_nan()),
            "element {i}: {o} vs {e}"
        );
    }
    let dout = [bf16::ONE; 5];
    let (mut dg, mut du) = ([bf16::ZERO; 5], [bf16::ZERO; 5]);
    gated::backward::<f32, bf16>(&g, &dout, gate, up, &mut dg, &mut du);
    // up 1.3125 > lim and -2 < -lim: clamped, no gradient; a gate at lim gets one only where
    // torch's clamp passes it at a bound (2.11, not 2.15); 1.3046875 (above 1.3 too) and 5 get
    // none; NaN's gradient is 0 on either side.
    let passes_up = [false, false, true, true, false];
    let passes_gate = [true, grad_at_bound, false, false, false];
    for i in 0..5 {
        assert_eq!(du[i] != bf16::ZERO, passes_up[i], "dup {i}: {}", du[i]);
        assert_eq!(dg[i] != bf16::ZERO, passes_gate[i], "dgate {i}: {}", dg[i]);
    }
}

#[test]
fn gated_forward_rounds_like_the_stock_module() {
    // act_fn(gate) is a bf16 tensor before the product: out = round(round(act(g)) * u).
    let gate: Vec<bf16> = (0..256)
        .map(|i| bf16::from_f32((i as f32 - 128.0) * 0.037))
        .collect();
    let up: Vec<bf16> = (0..256)
        .map(|i| bf16::from_f32(1.0 + (i % 7) as f32 * 0.13))
        .collect();
    let g = Gated {
        rows: 1,
        cols: 256,
        ld_gate: 256,
        ld_up: 256,
        act: Activation::Silu,
        clamp: None,
        alpha: 0.0,
        pairs: false,
    };
    let mut out = vec![bf16::ZERO; 256];
    gated::forward::<f32, bf16>(&g, &gate, &up, &mut out);
    for i in 0..256 {
        let x = gate[i].to_f32();
        let a = bf16::from_f32(x / (1.0 + (-x).exp()));
        assert_eq!(
            out[i],
            bf16::from_f32(a.to_f32() * up[i].to_f32()),
            "element {i}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn gated_matches_float64(
        rows in 0usize..20,
        cols in 1usize..70,
        pad in 0usize..70,
        gelu in any::<bool>(),
        combo in 0usize..3,
        seed in any::<u64>(),
    ) {
        let act = if gelu { Activation::GeluTanh } else { Activation::Silu };
        match combo {
            0 => check_gated::<f32, f32>(rows, cols, pad, act, seed, 2e-6),
            1 => check_gated::<f32, bf16>(rows, cols, pad, act, seed, 1e-2),
            _ => check_gated::<f64, f64>(rows, cols, pad, act, seed, 1e-8),
        }
    }
}

#[test]
fn gated_packed_backward_is_the_two_gradients_side_by_side() {
    // Phi-3 / MoE experts: gate, up = gate_up.chunk(2, -1); the packed backward writes the
    // gradient of gate_up directly: [dgate | dup] per row.
    let (rows, cols) = (5, 24);
    let mut rng = Rng::new(41);
    let gate_up = stored::<f32, bf16>(&rng.vec(rows * 2 * cols, 2.0));
    let dout = stored::<f32, bf16>(&rng.vec(rows * cols, 1.0));
    for act in [Activation::Silu, Activation::GeluTanh] {
        let g = Gated {
            rows,
            cols,
            ld_gate: 2 * cols,
            ld_up: 2 * cols,
            act,
            clamp: None,
            alpha: 0.0,
            pairs: false,
        };
        let (gate, up) = (&gate_up[..], &gate_up[cols..]);
        let mut dg = vec![bf16::ZERO; rows * cols];
        let mut du = vec![bf16::ZERO; rows * cols];
        gated::backward::<f32, bf16>(&g, &dout, gate, up, &mut dg, &mut du);
        let mut packed = vec![bf16::ZERO; rows * 2 * cols];
        gated::backward_packed::<f32, bf16>(&g, &dout, gate, up, &mut packed);
        for r in 0..rows {
            assert_eq!(
                &packed[r * 2 * cols..r * 2 * cols + cols],
                &dg[r * cols..(r + 1) * cols]
            );
            assert_eq!(
                &packed[r * 2 * cols + cols..(r + 1) * 2 * cols],
                &du[r * cols..(r + 1) * cols]
            );
        }
    }
}

#[test]
fn parallel_paths_match_float64() {
    // Sizes above SERIAL_ELEMENTS, so rayon's workers compute them.
    check_rms::<f32, bf16, bf16, bf16>(300, 128, 0.0, true, 51, 8e-3, 1.2e-2);
    let mut case = rope_case(32, 32, false);
    (case.p0, case.p1, case.q_heads, case.k_heads) = (2, 64, 8, 4);
    let elements = case.p0 * case.p1 * (case.q_heads + case.k_heads) * case.head_dim;
    assert!(elements >= super::SERIAL_ELEMENTS);
    check_rope::<f32, f32, f32, f32>(&case, 1e-6);
    case.interleaved = true;
    check_rope::<f32, bf16, bf16, bf16>(&case, 6e-3);
    check_gated::<f32, f32>(600, 64, 0, Activation::Silu, 52, 1e-6);
    check_gated::<f32, bf16>(600, 64, 64, Activation::GeluTanh, 53, 8e-3);
}

// ---- gated RMSNorm -------------------------------------------------------------------------

struct GatedNormRef {
    y: Vec<f64>,
    dx: Vec<f64>,
    dgate: Vec<f64>,
    dw: Vec<f64>,
    /// The first term of dx alone (dy * act(g) * w * s): the scale of the two terms that
    /// cancel in dx (entirely when hidden is 1).
    dx_scale: Vec<f64>,
    /// dgate's scale: itself after the norm; with the gate first, its first term alone
    /// (dy * w * s * x * act'(g)), the two cancelling as dx's do.
    dgate_scale: Vec<f64>,
    /// Sum over rows of |dy * act(g) * x * s|: the scale of dw's terms.
    dw_scale: Vec<f64>,
}

/// Stock gated RMSNorm in float64, no rounding: y = w * x / sqrt(mean(x^2) + eps) * act(g),
/// and its gradients for dy by the chain rule (act' by a five-point central difference, so
/// that no formula of the twin's is reused).
fn gated_norm_reference(
    p: &GatedRmsNorm,
    x: &[f64],
    g: &[f64],
    w: &[f64],
    dy: &[f64],
) -> GatedNormRef {
    let h = p.hidden;
    let n = x.len();
    let wn = p.groups * h;
    let mut out = GatedNormRef {
        y: vec![0.0; n],
        dx: vec![0.0; n],
        dgate: vec![0.0; n],
        dw: vec![0.0; wn],
        dx_scale: vec![0.0; n],
        dgate_scale: vec![0.0; n],
        dw_scale: vec![0.0; wn],
    };
    for r in 0..p.rows {
        let (xr, gr, dyr) = (
            &x[r * h..(r + 1) * h],
            &g[r * h..(r + 1) * h],
            &dy[r * h..(r + 1) * h],
        );
        let seg = (r % p.groups) * h;
        let w = &w[seg..seg + h];
        let a: Vec<f64> = gr.iter().map(|v| act_reference(p.act, *v)).collect();
        // The normalised input: x, or u = x * a with the gate first.
        let u: Vec<f64> = if p.gate_first {
            xr.iter().zip(&a).map(|(x, a)| x * a).collect()
        } else {
            xr.to_vec()
        };
        let s = 1.0 / (u.iter().map(|v| v * v).sum::<f64>() / h as f64 + p.eps).sqrt();
        // The gradient reaching the weighted norm: dy * a after the gate, dy before it.
        let dr: Vec<f64> = if p.gate_first {
            dyr.to_vec()
        } else {
            dyr.iter().zip(&a).map(|(d, a)| d * a).collect()
        };
        // d (w_j u_j s) / d u_i = w_j (s delta_ij - u_j s^3 u_i / h)
        let gsum: f64 = (0..h).map(|j| dr[j] * w[j] * u[j]).sum();
        for i in 0..h {
            let k = r * h + i;
            let step = 1e-3;
            let f = |t: f64| act_reference(p.act, gr[i] + t * step);
            let da = (f(-2.0) - 8.0 * f(-1.0) + 8.0 * f(1.0) - f(2.0)) / (12.0 * step);
            let du = dr[i] * w[i] * s - u[i] * s * s * s * gsum / h as f64;
            if p.gate_first {
                out.y[k] = w[i] * u[i] * s;
                out.dx[k] = du * a[i];
                out.dgate[k] = du * xr[i] * da;
                out.dx_scale[k] = dr[i] * w[i] * s * a[i];
                out.dgate_scale[k] = dr[i] * w[i] * s * xr[i] * da;
            } else {
                out.y[k] = w[i] * u[i] * s * a[i];
                out.dx[k] = du;
                out.dgate[k] = dyr[i] * w[i] * u[i] * s * da;
                out.dx_scale[k] = dr[i] * w[i] * s;
                out.dgate_scale[k] = out.dgate[k];
            }
            out.dw[seg + i] += dr[i] * u[i] * s;
            out.dw_scale[seg + i] += (dr[i] * u[i] * s).abs();
        }
    }
    out
}

struct GatedNormRun {
    y: Vec<f64>,
    rstd: Vec<f64>,
    dx: Vec<f64>,
    dgate: Vec<f64>,
    dw: Vec<f64>,
}

fn gated_norm_run<A: Real, X: Storage<A>, W: Storage<A>>(
    p: &GatedRmsNorm,
    x: &[f64],
    g: &[f64],
    w: &[f64],
    dy: &[f64],
) -> GatedNormRun {
    let (xs, gs, ws, dys) = (
        stored::<A, X>(x),
        stored::<A, X>(g),
        stored::<A, W>(w),
        stored::<A, X>(dy),
    );
    let n = x.len();
    let mut y = vec![X::store(A::ZERO); n];
    let mut rstd = vec![A::ZERO; p.rows];
    gated_norm::forward::<A, X, W>(p, &xs, &gs, &ws, &mut y, &mut rstd);
    let mut dx = vec![X::store(A::ZERO); n];
    let mut dgate = vec![X::store(A::ZERO); n];
    let mut dw = vec![W::store(A::ZERO); p.groups * p.hidden];
    gated_norm::backward::<A, X, W>(
        p,
        &dys,
        &xs,
        &gs,
        &ws,
        &rstd,
        &mut dx,
        &mut dgate,
        Some(&mut dw),
    );
    // Without dw: the same dx and dgate, dw untouched.
    let mut dx2 = vec![X::store(A::ZERO); n];
    let mut dgate2 = vec![X::store(A::ZERO); n];
    gated_norm::backward::<A, X, W>(p, &dys, &xs, &gs, &ws, &rstd, &mut dx2, &mut dgate2, None);
    assert_eq!(loaded::<A, X>(&dx2), loaded::<A, X>(&dx), "dx without dw");
    assert_eq!(
        loaded::<A, X>(&dgate2),
        loaded::<A, X>(&dgate),
        "dgate without dw"
    );
    GatedNormRun {
        y: loaded::<A, X>(&y),
        rstd: rstd.iter().map(|v| v.to_f64()).collect(),
        dx: loaded::<A, X>(&dx),
        dgate: loaded::<A, X>(&dgate),
        dw: loaded::<A, W>(&dw),
    }
}

/// A gated norm case: the activation, cast_before, norm rows, their length, the arrangement
/// (gate first, groups per row of x) and the seed.
#[derive(Clone, Copy)]
struct GatedNormCase {
    act: Activation,
    cast_before: bool,
    rows: usize,
    hidden: usize,
    gate_first: bool,
    groups: usize,
    seed: u64,
}

fn check_gated_norm<A: Real, X: Storage<A>, W: Storage<A>>(
    c: GatedNormCase,
    seed: u64,
    tol_y: f64,
    tol_grad: f64,
) {
    let GatedNormCase {
        act,
        cast_before,
        rows,
        hidden,
        gate_first,
        groups,
        ..
    } = c;
    let mut rng = Rng::new(seed);
    let p = GatedRmsNorm {
        rows,
        hidden,
        eps: 1e-6,
        cast_before,
        act,
        gate_first,
        groups,
    };
    let n = rows * hidden;
    let x = rounded::<A, X>(&rng.vec(n, 1.5));
    let g = rounded::<A, X>(&rng.vec(n, 2.0));
    let w = rounded::<A, W>(
        &rng.vec(groups * hidden, 0.3)
            .iter()
            .map(|v| v + 1.0)
            .collect::<Vec<_>>(),
    );
    let dy = rounded::<A, X>(&rng.vec(n, 1.0));
    let got = gated_norm_run::<A, X, W>(&p, &x, &g, &w, &dy);
    let want = gated_norm_reference(&p, &x, &g, &w, &dy);
    let ey = rel(&got.y, &want.y);
    let edx = err(&got.dx, &want.dx, &want.dx_scale);
    let edg = err(&got.dgate, &want.dgate, &want.dgate_scale);
    let edw = err(&got.dw, &want.dw, &want.dw_scale);
    assert!(
        ey <= tol_y && edx <= tol_grad && edg <= tol_grad && edw <= tol_grad,
        "{act:?} rows {rows} hidden {hidden} cast_before {cast_before} gate_first {gate_first} \
         groups {groups}: y {ey:.2e} dx {edx:.2e} dgate {edg:.2e} dw {edw:.2e}"
    );
    for (r, s) in got.rstd.iter().enumerate() {
        let (xr, gr) = (
            &x[r * hidden..(r + 1) * hidden],
            &g[r * hidden..(r + 1) * hidden],
        );
        let ss: f64 = xr
            .iter()
            .zip(gr)
            .map(|(x, g)| {
                let u = if gate_first {
                    x * act_reference(act, *g)
                } else {
                    *x
                };
                u * u
            })
            .sum();
        let exact = 1.0 / (ss / hidden as f64 + 1e-6).sqrt();
        assert!(
            (s - exact).abs() <= 1e-5 * exact,
            "rstd of row {r}: {s} vs {exact}"
        );
    }
}

/// Every (activation, cast_before, shape) case: odd sizes (one element; under one 8-lane
/// vector; a remainder past whole vectors) and rows for several tasks of ROWS_PER_TASK, the
/// last partial; each with the gate after the norm, and with the gate first in one group and
/// in groups (3 or 5 per row of x, so a task's rows start in different groups).
fn gated_norm_cases() -> impl Iterator<Item = GatedNormCase> {
    let shapes = [(1, 1), (70, 1), (70, 7), (70, 128), (45, 300)];
    let arrangements = [(false, 1), (true, 1), (true, 5), (true, 3)];
    let mut seed = 0;
    [Activation::Silu, Activation::Sigmoid]
        .into_iter()
        .flat_map(|act| [true, false].map(|cast_before| (act, cast_before)))
        .flat_map(move |(act, cb)| shapes.map(|(rows, hidden)| (act, cb, rows, hidden)))
        .flat_map(move |(act, cb, rows, hidden)| {
            arrangements
                .into_iter()
                .filter(move |(_, groups)| rows % groups == 0)
                .map(move |(gate_first, groups)| (act, cb, rows, hidden, gate_first, groups))
        })
        .map(
            move |(act, cast_before, rows, hidden, gate_first, groups)| {
                seed += 1;
                GatedNormCase {
                    act,
                    cast_before,
                    rows,
                    hidden,
                    gate_first,
                    groups,
                    seed,
                }
            },
        )
}

#[test]
fn gated_rms_norm_float32_is_float32_accurate() {
    for c in gated_norm_cases() {
        check_gated_norm::<f32, f32, f32>(c, 60 + c.seed, 1e-6, 1e-5);
    }
}

#[test]
fn gated_rms_norm_float64_matches_the_reference_to_rounding() {
    // dgate's reference derivative is a finite difference (error ~1e-13).
    for c in gated_norm_cases() {
        check_gated_norm::<f64, f64, f64>(c, 90 + c.seed, 1e-14, 1e-11);
    }
}

#[test]
fn gated_rms_norm_16_bit_within_their_rounding() {
    // bf16 keeps 8 significant bits: one rounding is 2^-9 relative; Qwen3-Next's order rounds
    // xn, v and y (three), Kimi's y only; a float32 weight leaves v unrounded.
    for c in gated_norm_cases() {
        let s = 4 * c.seed + 120;
        check_gated_norm::<f32, bf16, bf16>(c, s, 8e-3, 1.2e-2);
        check_gated_norm::<f32, bf16, f32>(c, s + 1, 8e-3, 1.2e-2);
        check_gated_norm::<f32, f16, f16>(c, s + 2, 1e-3, 2e-3);
        check_gated_norm::<f32, f16, f32>(c, s + 3, 1e-3, 2e-3);
    }
}

#[test]
fn gated_rms_norm_rounds_where_the_stock_modules_do() {
    // From the twin's own rstd (so that no sum order is in question), each output element is
    // exactly the stock expression's: Qwen3-Next bf16(bf16(w * bf16(xn)) * act(g)), Kimi
    // bf16(w * xn * act(g)), dgate bf16(dy * v * act'(g)) with v as rounded in the forward.
    let (rows, hidden) = (3, 64);
    let mut rng = Rng::new(91);
    let x = stored::<f32, bf16>(&rng.vec(rows * hidden, 1.0));
    let g = stored::<f32, bf16>(&rng.vec(rows * hidden, 2.0));
    let w = stored::<f32, bf16>(&rng.vec(hidden, 1.0));
    let dy = stored::<f32, bf16>(&rng.vec(rows * hidden, 1.0));
    // act and act' as torch's CPU kernels write them, in float32.
    let sigmoid = |v: f32| 1.0 / (1.0 + (-v).exp());
    let mut outputs = Vec::new();
    for act in [Activation::Silu, Activation::Sigmoid] {
        let a = |v: f32| match act {
            Activation::Silu => v / (1.0 + (-v).exp()),
            _ => sigmoid(v),
        };
        let da = |v: f32| {
            let s = sigmoid(v);
            match act {
                Activation::Silu => s * (1.0 + v * (1.0 - s)),
                _ => s * (1.0 - s),
            }
        };
        for cast_before in [true, false] {
            let p = GatedRmsNorm {
                rows,
                hidden,
                eps: 1e-6,
                cast_before,
                act,
                gate_first: false,
                groups: 1,
            };
            let mut y = vec![bf16::ZERO; rows * hidden];
            let mut rstd = vec![0f32; rows];
            gated_norm::forward::<f32, bf16, bf16>(&p, &x, &g, &w, &mut y, &mut rstd);
            let mut dx = vec![bf16::ZERO; rows * hidden];
            let mut dgate = vec![bf16::ZERO; rows * hidden];
            gated_norm::backward::<f32, bf16, bf16>(
                &p, &dy, &x, &g, &w, &rstd, &mut dx, &mut dgate, None,
            );
            for k in 0..rows * hidden {
                let (r, j) = (k / hidden, k % hidden);
                let (xv, gv, wv) = (x[k].to_f32(), g[k].to_f32(), w[j].to_f32());
                let xn = xv * rstd[r];
                let v = if cast_before {
                    bf16::from_f32(wv * bf16::from_f32(xn).to_f32()).to_f32()
                } else {
                    wv * xn
                };
                assert_eq!(
                    y[k],
                    bf16::from_f32(v * a(gv)),
                    "y[{k}] {act:?} {cast_before}"
                );
                assert_eq!(
                    dgate[k],
                    bf16::from_f32(dy[k].to_f32() * v * da(gv)),
                    "dgate[{k}] {act:?} {cast_before}"
                );
            }
            outputs.push(y);
        }
    }
    // The two orders differ somewhere on these values, for each activation.
    assert!(outputs[0] != outputs[1] && outputs[2] != outputs[3]);
}

#[test]
fn gated_rms_norm_gradients_do_not_depend_on_the_cut() {
    // Rows for many tasks, a count that does not divide, and enough elements for the
    // parallel path: the same results for any thread count, and the serial path's (below
    // SERIAL_ELEMENTS) for the rows it shares.
    let (rows, hidden) = (45 * ROWS_PER_TASK + 5, 24);
    assert!(rows * hidden >= super::SERIAL_ELEMENTS);
    for (act, cast_before) in [(Activation::Silu, true), (Activation::Sigmoid, false)] {
        let c = GatedNormCase {
            act,
            cast_before,
            rows,
            hidden,
            gate_first: false,
            groups: 1,
            seed: 92,
        };
        check_gated_norm::<f32, bf16, f32>(c, 92, 8e-3, 1.2e-2);
        let p = GatedRmsNorm {
            rows,
            hidden,
            eps: 1e-5,
            cast_before,
            act,
            gate_first: false,
            groups: 1,
        };
        let mut rng = Rng::new(93);
        let x = stored::<f32, bf16>(&rng.vec(rows * hidden, 1.0));
        let g = stored::<f32, bf16>(&rng.vec(rows * hidden, 2.0));
        let w = stored::<f32, f32>(&rng.vec(hidden, 1.0));
        let dy = stored::<f32, bf16>(&rng.vec(rows * hidden, 1.0));
        let mut y = vec![bf16::ZERO; rows * hidden];
        let mut rstd = vec![0f32; rows];
        gated_norm::forward::<f32, bf16, f32>(&p, &x, &g, &w, &mut y, &mut rstd);
        let mut first = None;
        for threads in [1, 3, 8] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut y2 = vec![bf16::ZERO; rows * hidden];
            let mut rstd2 = vec![0f32; rows];
            let mut dx = vec![bf16::ZERO; rows * hidden];
            let mut dgate = vec![bf16::ZERO; rows * hidden];
            let mut dw = vec![0f32; hidden];
            pool.install(|| {
                gated_norm::forward::<f32, bf16, f32>(&p, &x, &g, &w, &mut y2, &mut rstd2);
                gated_norm::backward::<f32, bf16, f32>(
                    &p,
                    &dy,
                    &x,
                    &g,
                    &w,
                    &rstd,
                    &mut dx,
                    &mut dgate,
                    Some(&mut dw),
                )
            });
            assert!(
                y2 == y && rstd2 == rstd,
                "forward depends on the thread count"
            );
            match &first {
                None => first = Some((dx, dgate, dw)),
                Some(f) => assert!(
                    f.0 == dx && f.1 == dgate && f.2 == dw,
                    "results depend on the thread count"
                ),
            }
        }
        // The serial path on the first rows.
        let part = 5 * ROWS_PER_TASK + 3;
        assert!(part * hidden < super::SERIAL_ELEMENTS);
        let sub = GatedRmsNorm { rows: part, ..p };
        let m = part * hidden;
        let mut dx = vec![bf16::ZERO; m];
        let mut dgate = vec![bf16::ZERO; m];
        gated_norm::backward::<f32, bf16, f32>(
            &sub,
            &dy[..m],
            &x[..m],
            &g[..m],
            &w,
            &rstd[..part],
            &mut dx,
            &mut dgate,
            None,
        );
        let f = first.unwrap();
        assert!(dx == f.0[..m] && dgate == f.1[..m]);
    }
}

#[test]
fn gated_rms_norm_without_weight_gradient_and_empty_rows() {
    let p = GatedRmsNorm {
        rows: 0,
        hidden: 8,
        eps: 1e-6,
        cast_before: true,
        act: Activation::Silu,
        gate_first: false,
        groups: 1,
    };
    let w = [1f32; 8];
    let mut dw = [7f32; 8];
    gated_norm::forward::<f32, f32, f32>(&p, &[], &[], &w, &mut [], &mut []);
    gated_norm::backward::<f32, f32, f32>(
        &p,
        &[],
        &[],
        &[],
        &w,
        &[],
        &mut [],
        &mut [],
        Some(&mut dw),
    );
    assert_eq!(dw, [0.0; 8], "no rows: a zero weight gradient");
    let p = GatedRmsNorm {
        rows: 2,
        act: Activation::Sigmoid,
        ..p
    };
    let x = [1f32; 16];
    let (mut dx, mut dgate) = ([9f32; 16], [9f32; 16]);
    gated_norm::backward::<f32, f32, f32>(
        &p,
        &x,
        &x,
        &x,
        &w,
        &[1.0, 1.0],
        &mut dx,
        &mut dgate,
        None,
    );
    // Constant rows: the norm's gradient is zero; dgate = dy * w * x * r * sigmoid'(1).
    let s = 1.0 / (1.0 + (-1f32).exp());
    assert!(dx.iter().all(|v| v.abs() < 1e-6), "{dx:?}");
    assert!(
        dgate.iter().all(|v| (v - s * (1.0 - s)).abs() < 1e-6),
        "{dgate:?}"
    );
}

#[test]
#[should_panic(expected = "the gated norm takes silu or sigmoid")]
fn gated_rms_norm_refuses_gelu() {
    let p = GatedRmsNorm {
        rows: 1,
        hidden: 2,
        eps: 1e-6,
        cast_before: true,
        act: Activation::GeluTanh,
        gate_first: false,
        groups: 1,
    };
    let mut y = [0f32; 2];
    gated_norm::forward::<f32, f32, f32>(&p, &[1.0; 2], &[1.0; 2], &[1.0; 2], &mut y, &mut [0.0]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn gated_rms_norm_matches_float64(
        rows in 0usize..80,
        hidden in 1usize..300,
        cast_before in any::<bool>(),
        sigmoid in any::<bool>(),
        combo in 0usize..4,
        gate_first in any::<bool>(),
        groups in 1usize..5,
        seed in any::<u64>(),
    ) {
        let act = if sigmoid { Activation::Sigmoid } else { Activation::Silu };
        let c = GatedNormCase {
            act,
            cast_before,
            rows: rows * groups,
            hidden,
            gate_first,
            groups,
            seed,
        };
        match combo {
            0 => check_gated_norm::<f32, f32, f32>(c, seed, 2e-6, 2e-5),
            1 => check_gated_norm::<f32, bf16, bf16>(c, seed, 1.2e-2, 2e-2),
            2 => check_gated_norm::<f32, bf16, f32>(c, seed, 1.2e-2, 2e-2),
            _ => check_gated_norm::<f64, f64, f64>(c, seed, 1e-13, 1e-10),
        }
    }
}

// ---- unweighted RMSNorm, scale rounded first -----------------------------------------------

/// DeepSeek-V4's `UnweightedRMSNorm` in float64, no rounding: y = x * r with
/// r = 1 / sqrt(mean(x^2) + eps), and dx = r * dy - x * r^3 * sum(dy * x) / h (the chain rule
/// through the mean). Returns (y, dx, r per row, |r * dy|: the scale of dx's cancelling terms).
fn scale_first_reference(
    rows: usize,
    h: usize,
    eps: f64,
    x: &[f64],
    dy: &[f64],
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut y, mut dx, mut scale) = (vec![0.0; x.len()], vec![0.0; x.len()], vec![0.0; x.len()]);
    let mut rs = vec![0.0; rows];
    for r in 0..rows {
        let (xr, dyr) = (&x[r * h..(r + 1) * h], &dy[r * h..(r + 1) * h]);
        let s = 1.0 / (xr.iter().map(|v| v * v).sum::<f64>() / h as f64 + eps).sqrt();
        let dot: f64 = xr.iter().zip(dyr).map(|(a, b)| a * b).sum();
        rs[r] = s;
        for i in 0..h {
            y[r * h + i] = xr[i] * s;
            dx[r * h + i] = dyr[i] * s - xr[i] * s * s * s * dot / h as f64;
            scale[r * h + i] = (dyr[i] * s).abs();
        }
    }
    (y, dx, rs, scale)
}

/// The twin for storage X against the float64 reference (y to `tol_y`, dx to `tol_dx` measured
/// against its terms' scale, rstd to float32), and, for 16-bit X (`stock_rounding`), y equal to
/// stock's roundings `round_X(x * round_X(r))` on at least 99% of the elements (the float64 and
/// float32 r round to different X values only when r lies near a rounding boundary; in
/// float32 and float64 they differ in the last bits, so there is nothing to compare exactly).
fn check_scale_first<A: Real, X: Storage<A>>(
    rows: usize,
    hidden: usize,
    seed: u64,
    tol_y: f64,
    tol_dx: f64,
    stock_rounding: bool,
) {
    let mut rng = Rng::new(seed);
    let eps = 1e-6;
    let p = ScaleFirst { rows, hidden, eps };
    let x = rounded::<A, X>(&rng.vec(rows * hidden, 1.5));
    let dy = rounded::<A, X>(&rng.vec(rows * hidden, 1.0));
    let (xs, dys) = (stored::<A, X>(&x), stored::<A, X>(&dy));
    let mut y = vec![X::store(A::ZERO); x.len()];
    let mut rstd = vec![A::ZERO; rows];
    scale_first::forward::<A, X>(&p, &xs, &mut y, &mut rstd);
    let mut dx = vec![X::store(A::ZERO); x.len()];
    scale_first::backward::<A, X>(&p, &dys, &xs, &rstd, &mut dx);
    let (y, dx) = (loaded::<A, X>(&y), loaded::<A, X>(&dx));
    let (y_ref, dx_ref, r_ref, scale) = scale_first_reference(rows, hidden, eps, &x, &dy);
    let ey = rel(&y, &y_ref);
    let edx = err(&dx, &dx_ref, &scale);
    assert!(
        ey <= tol_y && edx <= tol_dx,
        "rows {rows} hidden {hidden}: y {ey:.2e} dx {edx:.2e}"
    );
    for (r, (got, want)) in rstd.iter().zip(&r_ref).enumerate() {
        let got = got.to_f64();
        assert!(
            (got - want).abs() <= 1e-6 * want,
            "rstd of row {r}: {got} vs {want}"
        );
    }
    if !stock_rounding {
        return;
    }
    let stock: Vec<f64> = x
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let s = round_to::<A, X>(A::from_f64(r_ref[i / hidden]));
            X::store(A::from_f64(*v) * s).load().to_f64()
        })
        .collect();
    let same = y.iter().zip(&stock).filter(|(a, b)| a == b).count();
    assert!(
        same * 100 >= 99 * y.len(),
        "rows {rows} hidden {hidden}: y equal to stock's roundings on {same} of {}",
        y.len()
    );
}

#[test]
fn rms_scale_first_float64_matches_the_reference_to_rounding() {
    for (rows, hidden) in [(1, 1), (9, 7), (37, 300), (200, 300)] {
        check_scale_first::<f64, f64>(rows, hidden, 21, 1e-14, 1e-13, false);
    }
}

#[test]
fn rms_scale_first_float32_is_float32_accurate() {
    for (rows, hidden) in [(1, 1), (9, 7), (37, 300), (200, 300)] {
        check_scale_first::<f32, f32>(rows, hidden, 22, 1e-6, 1e-5, false);
    }
}

#[test]
fn rms_scale_first_16_bit_within_their_rounding() {
    // Two roundings of y (the scale, then the product): 2 * 2^-9 relative in bf16, 2 * 2^-12
    // in float16; dx's first term carries the scale's rounding.
    for (rows, hidden) in [(1, 1), (9, 7), (37, 300), (200, 300)] {
        check_scale_first::<f32, bf16>(rows, hidden, 23, 8e-3, 1.2e-2, true);
        check_scale_first::<f32, f16>(rows, hidden, 24, 1e-3, 2e-3, true);
    }
}

#[test]
fn rms_scale_first_rounds_the_scale_before_the_product() {
    // One row [3, 4] (r = 1 / sqrt(12.5) = 0.28284...): bf16(r) = 0.283203125, and
    // y = bf16(x * 0.283203125) = [0.8515625, 1.1328125] (what torch gives); rounding x * r
    // once instead gives bf16(0.848528) = 0.84765625 for the first element.
    let p = ScaleFirst {
        rows: 1,
        hidden: 2,
        eps: 0.0,
    };
    let x = [bf16::from_f32(3.0), bf16::from_f32(4.0)];
    let (mut y, mut rstd) = ([bf16::ZERO; 2], [0f32]);
    scale_first::forward::<f32, bf16>(&p, &x, &mut y, &mut rstd);
    let s = bf16::from_f32(rstd[0]).to_f32();
    assert_eq!(s, 0.283_203_125_f64 as f32); // 145 * 2^-9: exact in bf16
    assert_eq!(
        y,
        [bf16::from_f32(0.851_562_5), bf16::from_f32(1.132_812_5)]
    );
    assert_ne!(y[0], bf16::from_f32(3.0 * rstd[0]));
}

#[test]
fn rms_scale_first_empty_rows() {
    let p = ScaleFirst {
        rows: 0,
        hidden: 5,
        eps: 1e-6,
    };
    let (mut y, mut rstd, mut dx) = (Vec::<f32>::new(), Vec::<f32>::new(), Vec::<f32>::new());
    scale_first::forward::<f32, f32>(&p, &[], &mut y, &mut rstd);
    scale_first::backward::<f32, f32>(&p, &[], &[], &rstd, &mut dx);
}
