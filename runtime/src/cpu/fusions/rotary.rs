//! Rotary embedding of q and k, out of place: the twin of `kernels/rotary.cu` (the formulas
//! are written there). Tensors are addressed through element strides over
//! (P0, P1, head) with unit stride along head_dim, cos and sin over (P0, P1) with stride 0
//! where broadcast; one parallel task per position (p0, p1).

use rayon::prelude::*;

use super::{Real, SERIAL_ELEMENTS, SendPtr, Storage};

#[derive(Clone, Copy, Debug)]
pub struct Rotary {
    pub p0: usize,
    pub p1: usize,
    pub q_heads: usize,
    pub k_heads: usize,
    pub head_dim: usize,
    /// Rotated entries at the start of each head (even, at most head_dim).
    pub rot_dim: usize,
    /// Pairs (2i, 2i + 1) (`rotate_every_two`) instead of (i, i + rot_dim / 2).
    pub interleaved: bool,
    /// The transposed map (the backward).
    pub transpose: bool,
}

/// A read-only strided tensor: element (a, b, h, j) at `a * s[0] + b * s[1] + h * s[2] + j`.
#[derive(Clone, Copy)]
pub struct View<'a, T> {
    pub data: &'a [T],
    pub strides: [usize; 3],
}

/// A strided output; its layout must not overlap itself (checked by [`overlaps`]).
pub struct ViewMut<'a, T> {
    pub data: &'a mut [T],
    pub strides: [usize; 3],
}

/// One past the largest element offset of a layout (0 when a size is 0).
pub fn extent(sizes: &[usize], strides: &[usize]) -> usize {
    if sizes.contains(&0) {
        return 0;
    }
    1 + sizes
        .iter()
        .zip(strides)
        .map(|(n, s)| (n - 1) * s)
        .sum::<usize>()
}

/// Whether two different indices of a layout could share an element (a conservative test:
/// sorted by stride, each stride must exceed the span of the dimensions below it).
pub fn overlaps(sizes: &[usize], strides: &[usize]) -> bool {
    let mut dims: Vec<(usize, usize)> = sizes
        .iter()
        .zip(strides)
        .filter(|(n, _)| **n > 1)
        .map(|(n, s)| (*s, *n))
        .collect();
    dims.sort_unstable();
    let mut span = 1usize;
    for (s, n) in dims {
        if s < span {
            return true;
        }
        span += s * (n - 1);
    }
    false
}

impl Rotary {
    fn sizes(&self, heads: usize) -> [usize; 4] {
        [self.p0, self.p1, heads, self.head_dim]
    }

    fn check(&self) {
        assert!(
            self.rot_dim.is_multiple_of(2) && self.rot_dim <= self.head_dim,
            "rot_dim must be even and at most head_dim"
        );
    }
}

fn check_view(name: &str, data_len: usize, sizes: &[usize], strides: &[usize]) {
    assert!(
        extent(sizes, strides) <= data_len,
        "{name}: the layout reaches past the buffer"
    );
}

/// Rotates `q` and `k` into `q_out` and `k_out` (or applies the transposed map).
#[allow(clippy::too_many_arguments)]
pub fn apply<A, I, C, O>(
    r: &Rotary,
    q: View<'_, I>,
    k: View<'_, I>,
    cos: View<'_, C>,
    sin: View<'_, C>,
    q_out: ViewMut<'_, O>,
    k_out: ViewMut<'_, O>,
) where
    A: Real,
    I: Storage<A>,
    C: Storage<A>,
    O: Storage<A>,
{
    r.check();
    let (qs, ks) = (r.sizes(r.q_heads), r.sizes(r.k_heads));
    let one = |s: [usize; 3]| [s[0], s[1], s[2], 1];
    check_view("q", q.data.len(), &qs, &one(q.strides));
    check_view("k", k.data.len(), &ks, &one(k.strides));
    let cs_sizes = [r.p0, r.p1, r.rot_dim];
    let cs_strides = |s: [usize; 3]| [s[0], s[1], 1];
    check_view("cos", cos.data.len(), &cs_sizes, &cs_strides(cos.strides));
    check_view("sin", sin.data.len(), &cs_sizes, &cs_strides(sin.strides));
    check_view("q_out", q_out.data.len(), &qs, &one(q_out.strides));
    check_view("k_out", k_out.data.len(), &ks, &one(k_out.strides));
    assert!(!overlaps(&qs, &one(q_out.strides)), "q_out overlaps itself");
    assert!(!overlaps(&ks, &one(k_out.strides)), "k_out overlaps itself");
    let qo = (SendPtr(q_out.data.as_mut_ptr()), q_out.strides);
    let ko = (SendPtr(k_out.data.as_mut_ptr()), k_out.strides);
    let position = |pos: usize| {
        let (a, b) = (pos / r.p1, pos % r.p1);
        let c0 = a * cos.strides[0] + b * cos.strides[1];
        let s0 = a * sin.strides[0] + b * sin.strides[1];
        let c = &cos.data[c0..c0 + r.rot_dim];
        let s = &sin.data[s0..s0 + r.rot_dim];
        for (src, dst, heads) in [(q, qo, r.q_heads), (k, ko, r.k_heads)] {
            for h in 0..heads {
                let i0 = a * src.strides[0] + b * src.strides[1] + h * src.strides[2];
                let o0 = a * dst.1[0] + b * dst.1[1] + h * dst.1[2];
                let x = &src.data[i0..i0 + r.head_dim];
                // SAFETY: o0..o0 + head_dim lies inside q_out / k_out (checked extent), and
                // since the layout does not overlap itself, no other (position, head) writes
                // these elements.
                let out = unsafe { std::slice::from_raw_parts_mut(dst.0.0.add(o0), r.head_dim) };
                row(r, x, c, s, out);
            }
        }
    };
    let positions = r.p0 * r.p1;
    if positions * (r.q_heads + r.k_heads) * r.head_dim < SERIAL_ELEMENTS {
        (0..positions).for_each(position);
    } else {
        (0..positions).into_par_iter().for_each(position);
    }
}

fn row<A: Real, I: Storage<A>, C: Storage<A>, O: Storage<A>>(
    r: &Rotary,
    x: &[I],
    c: &[C],
    s: &[C],
    out: &mut [O],
) {
    let pair = |ia: usize, ib: usize, out: &mut [O]| {
        let (xa, xb) = (x[ia].load(), x[ib].load());
        let (ca, cb) = (c[ia].load(), c[ib].load());
        let (sa, sb) = (s[ia].load(), s[ib].load());
        let (oa, ob) = if r.transpose {
            (xa * ca + xb * sb, xb * cb - xa * sa)
        } else {
            (xa * ca - xb * sa, xb * cb + xa * sb)
        };
        out[ia] = O::store(oa);
        out[ib] = O::store(ob);
    };
    if r.interleaved {
        for ia in (0..r.rot_dim).step_by(2) {
            pair(ia, ia + 1, out);
        }
    } else {
        let half = r.rot_dim / 2;
        for ia in 0..half {
            pair(ia, ia + half, out);
        }
    }
    for j in r.rot_dim..r.head_dim {
        out[j] = O::store(x[j].load());
    }
}
