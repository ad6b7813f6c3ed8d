//! The AttnRes mix, forward and backward: the twin of `kernels/attnres_mix.cu`.
//!
//! For each token (row) `t` and sources `v_0 .. v_{n-1}` (each `tokens x hidden`), with
//! `u = query * key_norm` (float32, `hidden`):
//!
//! ```text
//! r_i  = 1 / sqrt(mean_j v_ij^2 + eps)        dot_i = sum_j v_ij u_j       s_i = r_i dot_i
//! p    = softmax(s)                           w_i   = scale * p_i
//! out_j = sum_i w_i v_ij                      (sources added in order)
//! ```
//!
//! Backward, from `g = d out`: `dp_i = scale * (g . v_i)`, `ds_i = p_i (dp_i - sum_k p_k dp_k)`,
//! `dv_ij = w_i g_j + ds_i (r_i u_j - dot_i r_i^3 v_ij / hidden)` and
//! `du_j = sum_t sum_i ds_i r_i v_ij` (per task of [`ROWS_PER_TASK`] rows, then the task
//! partials added in row order: the result does not depend on the thread count).
//! Each source row is read once per pass (the row is in cache for its second use).

use half::{bf16, f16};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use rayon::prelude::*;
use std::panic::{AssertUnwindSafe, catch_unwind};

use super::{FDtype, Real, SERIAL_ELEMENTS, Storage};

pub const ROWS_PER_TASK: usize = 16;

#[derive(Clone, Copy, Debug)]
pub struct Mix {
    pub tokens: usize,
    pub hidden: usize,
    pub eps: f64,
    pub scale: f64,
}

/// Per row: `(p_i, r_i, dot_i)` for each source.
fn row_stats<A: Real, X: Storage<A>>(
    rows: &[&[X]],
    u: &[A],
    eps: A,
    hidden: usize,
) -> Vec<(A, A, A)> {
    let mut out: Vec<(A, A, A)> = rows
        .iter()
        .map(|row| {
            let mut ss = A::ZERO;
            let mut dot = A::ZERO;
            for (v, uj) in row.iter().zip(u) {
                let v = v.load();
                ss += v * v;
                dot += v * *uj;
            }
            let r = A::ONE / (ss / A::from_f64(hidden as f64) + eps).sqrt();
            (r * dot, r, dot)
        })
        .collect();
    let mut max = out[0].0;
    for s in &out {
        if s.0 > max {
            max = s.0;
        }
    }
    let mut sum = A::ZERO;
    for s in out.iter_mut() {
        s.0 = (s.0 - max).exp();
        sum += s.0;
    }
    for s in out.iter_mut() {
        s.0 = s.0 / sum;
    }
    out
}

fn check<X>(p: &Mix, sources: &[&[X]], u: usize) {
    assert!(p.hidden > 0, "hidden size 0");
    assert!(!sources.is_empty(), "no sources");
    for s in sources {
        assert_eq!(s.len(), p.tokens * p.hidden, "source: wrong length");
    }
    assert_eq!(u, p.hidden, "u: wrong length");
}

/// `out` (tokens, hidden) from the sources and `u`.
pub fn forward<A: Real, X: Storage<A>>(p: &Mix, sources: &[&[X]], u: &[A], out: &mut [X]) {
    check(p, sources, u.len());
    assert_eq!(out.len(), p.tokens * p.hidden, "out: wrong length");
    let h = p.hidden;
    let eps = A::from_f64(p.eps);
    let scale = A::from_f64(p.scale);
    let task = |(k, chunk): (usize, &mut [X])| {
        let mut acc = vec![A::ZERO; h];
        for (r, orow) in chunk.chunks_mut(h).enumerate() {
            let t = k * ROWS_PER_TASK + r;
            let rows: Vec<&[X]> = sources.iter().map(|s| &s[t * h..(t + 1) * h]).collect();
            let stats = row_stats(&rows, u, eps, h);
            acc.iter_mut().for_each(|a| *a = A::ZERO);
            for (row, st) in rows.iter().zip(&stats) {
                let w = scale * st.0;
                for (a, v) in acc.iter_mut().zip(row.iter()) {
                    *a += w * v.load();
                }
            }
            for (o, a) in orow.iter_mut().zip(&acc) {
                *o = X::store(*a);
            }
        }
    };
    let chunks = out.chunks_mut(ROWS_PER_TASK * h).enumerate();
    if p.tokens * h * sources.len() < SERIAL_ELEMENTS {
        chunks.for_each(task);
    } else {
        chunks.collect::<Vec<_>>().into_par_iter().for_each(task);
    }
}

/// `dsources[i]` (tokens, hidden) and `du` (hidden) from `g = d out`.
pub fn backward<A: Real, X: Storage<A>>(
    p: &Mix,
    sources: &[&[X]],
    u: &[A],
    g: &[X],
    dsources: &mut [&mut [X]],
    du: &mut [A],
) {
    check(p, sources, u.len());
    assert_eq!(g.len(), p.tokens * p.hidden, "grad: wrong length");
    assert_eq!(dsources.len(), sources.len(), "dsources: wrong count");
    assert_eq!(du.len(), p.hidden, "du: wrong length");
    let h = p.hidden;
    let n = sources.len();
    let eps = A::from_f64(p.eps);
    let scale = A::from_f64(p.scale);
    let inv_h = A::ONE / A::from_f64(h as f64);
    let tasks = p.tokens.div_ceil(ROWS_PER_TASK);
    let mut per_task: Vec<Vec<&mut [X]>> = (0..tasks).map(|_| Vec::with_capacity(n)).collect();
    for d in dsources.iter_mut() {
        assert_eq!(d.len(), p.tokens * h, "dsource: wrong length");
        for (k, c) in d.chunks_mut(ROWS_PER_TASK * h).enumerate() {
            per_task[k].push(c);
        }
    }
    let task = |(k, mut outs): (usize, Vec<&mut [X]>)| -> Vec<A> {
        let mut dup = vec![A::ZERO; h];
        let rows_here = outs.first().map_or(0, |c| c.len() / h);
        for r in 0..rows_here {
            let t = k * ROWS_PER_TASK + r;
            let rows: Vec<&[X]> = sources.iter().map(|s| &s[t * h..(t + 1) * h]).collect();
            let grow = &g[t * h..(t + 1) * h];
            let stats = row_stats(&rows, u, eps, h);
            let dp: Vec<A> = rows
                .iter()
                .map(|row| {
                    let mut d = A::ZERO;
                    for (v, gj) in row.iter().zip(grow) {
                        d += v.load() * gj.load();
                    }
                    scale * d
                })
                .collect();
            let mut pdp = A::ZERO;
            for (st, d) in stats.iter().zip(&dp) {
                pdp += st.0 * *d;
            }
            for (i, row) in rows.iter().enumerate() {
                let (pi, ri, doti) = stats[i];
                let w = scale * pi;
                let ds = pi * (dp[i] - pdp);
                let c1 = ds * ri;
                let c2 = ds * doti * ri * ri * ri * inv_h;
                let orow = &mut outs[i][r * h..(r + 1) * h];
                for j in 0..h {
                    let v = row[j].load();
                    orow[j] = X::store(w * grow[j].load() + c1 * u[j] - c2 * v);
                    dup[j] += c1 * v;
                }
            }
        }
        dup
    };
    let items: Vec<(usize, Vec<&mut [X]>)> = per_task.into_iter().enumerate().collect();
    let partials: Vec<Vec<A>> = if p.tokens * h * n < SERIAL_ELEMENTS {
        items.into_iter().map(task).collect()
    } else {
        items.into_par_iter().map(task).collect()
    };
    du.iter_mut().for_each(|d| *d = A::ZERO);
    for part in partials {
        for (d, v) in du.iter_mut().zip(part) {
            *d += v;
        }
    }
}

// ---------------------------------------------------------------------------------------
// `_native.cpu_attnres_mix_forward` / `cpu_attnres_mix_backward` on raw pointers.

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cpu_attnres_mix_forward, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_attnres_mix_backward, m)?)?;
    Ok(())
}

fn parse(dtype: &str) -> PyResult<FDtype> {
    FDtype::parse(dtype)
        .ok_or_else(|| PyValueError::new_err(format!("dtype: unsupported {dtype:?}")))
}

fn check_ptr(name: &str, ptr: u64, align: usize) -> PyResult<()> {
    if ptr == 0 {
        return Err(PyValueError::new_err(format!("{name}: null pointer")));
    }
    if !(ptr as usize).is_multiple_of(align) {
        return Err(PyValueError::new_err(format!("{name}: misaligned pointer")));
    }
    Ok(())
}

/// # Safety
/// The caller (``_attnres_op.py``) passes contiguous tensors of `tokens * hidden` elements
/// of `dtype` for every source and output, and `hidden` float32 (float64 for float64) for `u`
/// and `du`; outputs overlap nothing.
unsafe fn run<A: Real, X: Storage<A>>(
    p: &Mix,
    sources: &[u64],
    u: u64,
    out: u64,
    grad: Option<(u64, &[u64], u64)>,
) {
    let len = p.tokens * p.hidden;
    let srcs: Vec<&[X]> = sources
        .iter()
        // SAFETY: see the function's contract.
        .map(|&s| unsafe { std::slice::from_raw_parts(s as *const X, len) })
        .collect();
    // SAFETY: as above.
    let u = unsafe { std::slice::from_raw_parts(u as *const A, p.hidden) };
    match grad {
        None => {
            // SAFETY: as above.
            let out = unsafe { std::slice::from_raw_parts_mut(out as *mut X, len) };
            forward(p, &srcs, u, out);
        }
        Some((g, dsrc, du)) => {
            // SAFETY: as above.
            let g = unsafe { std::slice::from_raw_parts(g as *const X, len) };
            let mut ds: Vec<&mut [X]> = dsrc
                .iter()
                // SAFETY: as above.
                .map(|&d| unsafe { std::slice::from_raw_parts_mut(d as *mut X, len) })
                .collect();
            // SAFETY: as above.
            let du = unsafe { std::slice::from_raw_parts_mut(du as *mut A, p.hidden) };
            backward(p, &srcs, u, g, &mut ds, du);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn dispatch(
    py: Python<'_>,
    sources: Vec<u64>,
    u: u64,
    out: u64,
    grad: Option<(u64, Vec<u64>, u64)>,
    tokens: usize,
    hidden: usize,
    dtype: &str,
    eps: f64,
    scale: f64,
) -> PyResult<()> {
    let dt = parse(dtype)?;
    if sources.is_empty() {
        return Err(PyValueError::new_err("sources: empty"));
    }
    if tokens * hidden > 0 {
        for (i, &s) in sources.iter().enumerate() {
            check_ptr(&format!("sources[{i}]"), s, dt.size())?;
        }
        check_ptr("u", u, 4)?;
        if let Some((g, ds, du)) = &grad {
            check_ptr("grad", *g, dt.size())?;
            check_ptr("du", *du, 4)?;
            if ds.len() != sources.len() {
                return Err(PyValueError::new_err("dsources: one per source"));
            }
            for &d in ds {
                check_ptr("dsources", d, dt.size())?;
            }
        } else {
            check_ptr("out", out, dt.size())?;
        }
    }
    let p = Mix {
        tokens,
        hidden,
        eps,
        scale,
    };
    let result = py.detach(|| {
        catch_unwind(AssertUnwindSafe(|| {
            let grad = grad.as_ref().map(|(g, d, du)| (*g, d.as_slice(), *du));
            // SAFETY: the contract of `run`, checked by the Python caller.
            unsafe {
                match dt {
                    FDtype::F32 => run::<f32, f32>(&p, &sources, u, out, grad),
                    FDtype::Bf16 => run::<f32, bf16>(&p, &sources, u, out, grad),
                    FDtype::F16 => run::<f32, f16>(&p, &sources, u, out, grad),
                    FDtype::F64 => run::<f64, f64>(&p, &sources, u, out, grad),
                }
            }
        }))
    });
    result.map_err(|e| {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".to_string());
        PyRuntimeError::new_err(format!("attnres mix: {msg}"))
    })
}

/// `out = scale * sum_i softmax_i(u . RMSNorm(v_i)) v_i` per row (see the module docs).
#[pyfunction]
#[pyo3(signature = (*, sources, u, out, tokens, hidden, dtype, eps, scale))]
#[allow(clippy::too_many_arguments)]
fn cpu_attnres_mix_forward(
    py: Python<'_>,
    sources: Vec<u64>,
    u: u64,
    out: u64,
    tokens: usize,
    hidden: usize,
    dtype: &str,
    eps: f64,
    scale: f64,
) -> PyResult<()> {
    dispatch(py, sources, u, out, None, tokens, hidden, dtype, eps, scale)
}

/// The gradients of every source and of `u` from the output's gradient.
#[pyfunction]
#[pyo3(signature = (*, sources, u, grad, dsources, du, tokens, hidden, dtype, eps, scale))]
#[allow(clippy::too_many_arguments)]
fn cpu_attnres_mix_backward(
    py: Python<'_>,
    sources: Vec<u64>,
    u: u64,
    grad: u64,
    dsources: Vec<u64>,
    du: u64,
    tokens: usize,
    hidden: usize,
    dtype: &str,
    eps: f64,
    scale: f64,
) -> PyResult<()> {
    dispatch(
        py,
        sources,
        u,
        0,
        Some((grad, dsources, du)),
        tokens,
        hidden,
        dtype,
        eps,
        scale,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }

    /// The formula in float64, straight from the definition.
    fn reference(p: &Mix, src: &[Vec<f64>], u: &[f64]) -> Vec<f64> {
        let h = p.hidden;
        let mut out = vec![0.0; p.tokens * h];
        for t in 0..p.tokens {
            let s: Vec<f64> = src
                .iter()
                .map(|v| {
                    let row = &v[t * h..(t + 1) * h];
                    let ms = row.iter().map(|x| x * x).sum::<f64>() / h as f64;
                    let r = 1.0 / (ms + p.eps).sqrt();
                    row.iter().zip(u).map(|(x, y)| x * r * y).sum::<f64>()
                })
                .collect();
            let m = s.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for (i, v) in src.iter().enumerate() {
                for j in 0..h {
                    out[t * h + j] += p.scale * e[i] / z * v[t * h + j];
                }
            }
        }
        out
    }

    fn case(tokens: usize, hidden: usize, n: usize, seed: u64) -> (Mix, Vec<Vec<f64>>, Vec<f64>) {
        let mut s = seed;
        let p = Mix {
            tokens,
            hidden,
            eps: 1e-6,
            scale: n as f64,
        };
        let src = (0..n)
            .map(|_| (0..tokens * hidden).map(|_| lcg(&mut s) * 2.0).collect())
            .collect();
        let u = (0..hidden).map(|_| lcg(&mut s)).collect();
        (p, src, u)
    }

    #[test]
    fn forward_matches_float64_reference() {
        for (t, h, n) in [(1, 1, 1), (3, 8, 2), (40, 24, 5), (33, 64, 9)] {
            let (p, src, u) = case(t, h, n, 7 + t as u64);
            let want = reference(&p, &src, &u);
            let refs: Vec<&[f64]> = src.iter().map(|v| v.as_slice()).collect();
            let mut out = vec![0.0f64; t * h];
            forward(&p, &refs, &u, &mut out);
            for (a, b) in out.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-12 * (1.0 + b.abs()), "{a} vs {b}");
            }
            let s32: Vec<Vec<f32>> = src
                .iter()
                .map(|v| v.iter().map(|x| *x as f32).collect())
                .collect();
            let r32: Vec<&[f32]> = s32.iter().map(|v| v.as_slice()).collect();
            let u32: Vec<f32> = u.iter().map(|x| *x as f32).collect();
            let mut o32 = vec![0.0f32; t * h];
            forward(&p, &r32, &u32, &mut o32);
            for (a, b) in o32.iter().zip(&want) {
                assert!(
                    (*a as f64 - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "{a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (p, src, u) = case(5, 16, 4, 3);
        let refs: Vec<&[f64]> = src.iter().map(|v| v.as_slice()).collect();
        let mut s = 99;
        let g: Vec<f64> = (0..p.tokens * p.hidden).map(|_| lcg(&mut s)).collect();
        let mut ds: Vec<Vec<f64>> = src.iter().map(|v| vec![0.0; v.len()]).collect();
        let mut dsr: Vec<&mut [f64]> = ds.iter_mut().map(|v| v.as_mut_slice()).collect();
        let mut du = vec![0.0; p.hidden];
        backward(&p, &refs, &u, &g, &mut dsr, &mut du);
        let loss = |src: &[Vec<f64>], u: &[f64]| -> f64 {
            reference(&p, src, u)
                .iter()
                .zip(&g)
                .map(|(a, b)| a * b)
                .sum()
        };
        let e = 1e-6;
        for i in 0..src.len() {
            for k in [0, 7, 33, 79] {
                let mut plus = src.clone();
                plus[i][k] += e;
                let mut minus = src.clone();
                minus[i][k] -= e;
                let fd = (loss(&plus, &u) - loss(&minus, &u)) / (2.0 * e);
                assert!(
                    (fd - ds[i][k]).abs() < 1e-6 * (1.0 + fd.abs()),
                    "d src {i}[{k}]: {fd} vs {}",
                    ds[i][k]
                );
            }
        }
        for j in 0..p.hidden {
            let mut plus = u.clone();
            plus[j] += e;
            let mut minus = u.clone();
            minus[j] -= e;
            let fd = (loss(&src, &plus) - loss(&src, &minus)) / (2.0 * e);
            assert!(
                (fd - du[j]).abs() < 1e-6 * (1.0 + fd.abs()),
                "du[{j}]: {fd} vs {}",
                du[j]
            );
        }
    }
}
