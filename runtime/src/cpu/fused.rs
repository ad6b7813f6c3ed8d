//! The chunked fused linear + cross-entropy on the CPU (ARCHITECTURE.md, contract 4).
//!
//! For each chunk of non-ignored rows (size from [`Plan`]):
//!
//! 1. gather the chunk's hidden rows into float32;
//! 2. logits, one vocabulary tile per parallel task, stored transposed (`vocab x rows`) so
//!    a tile is contiguous: `z = transform(W_t h^T + b_t)`, and per-tile softmax partials
//!    (max, sum of exponentials, sum of logits) for every row;
//! 3. merge the partials (in float64) into each row's log-sum-exp and loss;
//! 4. with gradients: turn the logits into `dlogits` in place, then
//!    `dW_t += dlogits_t h` (unless the weight gradient is not asked for: a frozen head)
//!    and `db_t += sum dlogits_t` per tile, and `dh = dlogits^T W` per block of rows;
//!    scatter `dh` to its rows.
//!
//! When the vocabulary is cut into several blocks, step 2 runs once per block for the
//! statistics and again in step 4 (the logits are recomputed rather than kept).

use rayon::prelude::*;
use std::fmt;

use super::element::Element;
use super::gemm::{View, gemm};
use super::plan::{Plan, Shape};

/// The inputs, all row-major and contiguous.
pub struct Problem<'a, T> {
    /// `(n, h)`
    pub hidden: &'a [T],
    /// `(v, h)`
    pub weight: &'a [T],
    /// `(v,)`
    pub bias: Option<&'a [T]>,
    /// `(n,)`, already shifted; `ignore_index` marks ignored rows.
    pub targets: &'a [i64],
    pub n: usize,
    pub h: usize,
    pub v: usize,
}

#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub ignore_index: i64,
    /// In `[0, 1]`; `F.cross_entropy`'s `label_smoothing`.
    pub label_smoothing: f32,
    /// Multiplies the logits (after the bias, before the soft-cap).
    pub scale: f32,
    /// `z = cap * tanh(z / cap)` when given.
    pub softcap: Option<f32>,
    pub chunk_budget_bytes: usize,
}

/// The derivative of the caller's objective with respect to each row's loss.
#[derive(Clone, Copy)]
pub enum GradScale<'a> {
    Uniform(f32),
    PerRow(&'a [f32]),
}

impl GradScale<'_> {
    fn get(&self, row: usize) -> f32 {
        match self {
            GradScale::Uniform(g) => *g,
            GradScale::PerRow(g) => g[row],
        }
    }
}

/// Where the gradients of `sum_i grad_scale_i * row_loss_i` go.
pub struct Gradients<'a, T> {
    pub grad_scale: GradScale<'a>,
    /// `(n, h)`
    pub dh: &'a mut [T],
    /// `(v, h)`; None: the weight gradient is not computed (a frozen head).
    pub dw: Option<&'a mut [T]>,
    /// `(v,)`, present exactly when the bias is.
    pub db: Option<&'a mut [T]>,
}

#[derive(Debug, PartialEq)]
pub enum FusedCeError {
    /// An argument that does not fit the others (name, what is wrong).
    Argument(&'static str, String),
    /// A target outside `[0, v)` that is not `ignore_index`.
    TargetOutOfRange { row: usize, target: i64, v: usize },
}

impl fmt::Display for FusedCeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FusedCeError::Argument(name, what) => write!(f, "{name}: {what}"),
            FusedCeError::TargetOutOfRange { row, target, v } => write!(
                f,
                "targets: row {row} has target {target}, outside [0, {v}) and not ignore_index"
            ),
        }
    }
}

impl std::error::Error for FusedCeError {}

fn argument(name: &'static str, what: String) -> FusedCeError {
    FusedCeError::Argument(name, what)
}

fn check_len(name: &'static str, len: usize, want: usize) -> Result<(), FusedCeError> {
    if len == want {
        Ok(())
    } else {
        Err(argument(
            name,
            format!("has {len} elements, expected {want}"),
        ))
    }
}

/// The logit transforms after the bias: `scale`, then the optional soft-cap.
#[derive(Clone, Copy)]
struct Transform {
    scale: f32,
    softcap: Option<f32>,
}

impl Transform {
    #[inline]
    fn apply(self, a: f32) -> f32 {
        let u = a * self.scale;
        match self.softcap {
            // Divide (not multiply by the reciprocal), as the stock forwards do.
            Some(cap) => cap * (u / cap).tanh(),
            None => u,
        }
    }

    /// dz/da at the transformed logit z: `scale * (1 - tanh^2)`, with tanh = z / cap.
    #[inline]
    fn derivative(self, z: f32) -> f32 {
        match self.softcap {
            Some(cap) => {
                let t = z / cap;
                self.scale * ((1.0 - t) * (1.0 + t))
            }
            None => self.scale,
        }
    }
}

/// Computes `row_loss` (and the gradients when asked). See the module docs.
pub fn fused_ce<T: Element>(
    p: &Problem<'_, T>,
    o: &Options,
    row_loss: &mut [f32],
    grads: Option<Gradients<'_, T>>,
) -> Result<(), FusedCeError> {
    validate(p, o, row_loss, grads.as_ref())?;
    let active = active_rows(p.targets, o.ignore_index, p.v)?;
    let plan = Plan::new(Shape {
        active_rows: active.len(),
        h: p.h,
        v: p.v,
        weight_is_f32: T::as_f32(p.weight).is_some(),
        grads: grads.is_some(),
        budget: o.chunk_budget_bytes,
        threads: rayon::current_num_threads(),
    });
    compute(p, o, &plan, &active, row_loss, grads);
    Ok(())
}

/// [`fused_ce`] with a given plan (tests drive every way of cutting the work through this).
#[cfg(test)]
pub(crate) fn fused_ce_with_plan<T: Element>(
    p: &Problem<'_, T>,
    o: &Options,
    plan: &Plan,
    row_loss: &mut [f32],
    grads: Option<Gradients<'_, T>>,
) -> Result<(), FusedCeError> {
    validate(p, o, row_loss, grads.as_ref())?;
    assert!(plan.rows >= 1 && plan.row_block >= 1, "{plan:?}");
    assert!((1..=p.v).contains(&plan.block) && (1..=plan.block).contains(&plan.tile));
    let active = active_rows(p.targets, o.ignore_index, p.v)?;
    compute(p, o, plan, &active, row_loss, grads);
    Ok(())
}

fn compute<T: Element>(
    p: &Problem<'_, T>,
    o: &Options,
    plan: &Plan,
    active: &[usize],
    row_loss: &mut [f32],
    grads: Option<Gradients<'_, T>>,
) {
    let plan = *plan;
    row_loss.par_iter_mut().for_each(|x| *x = 0.0);
    // W in float32: the input itself, a one-time copy, or (None) converted per tile.
    let weight_copy: Vec<f32> = if plan.weight_copy && T::as_f32(p.weight).is_none() {
        to_f32_parallel(p.weight, p.h)
    } else {
        Vec::new()
    };
    let weight_f32 = T::as_f32(p.weight).or((!weight_copy.is_empty()).then_some(&weight_copy[..]));
    let ctx = Ctx {
        weight: p.weight,
        weight_f32,
        bias: p.bias,
        h: p.h,
        v: p.v,
        transform: Transform {
            scale: o.scale,
            softcap: o.softcap,
        },
        eps: o.label_smoothing,
        plan,
    };

    let mut grads = grads;
    // dW accumulates over chunks in float32: in the output itself for float32 inputs.
    let mut dw_owned: Vec<f32> = Vec::new();
    let mut db_acc: Vec<f32> = Vec::new();
    if let Some(g) = grads.as_mut() {
        g.dh.par_chunks_mut(p.h.max(1))
            .for_each(|r| r.fill(T::from_f32(0.0)));
        match g.dw.as_deref_mut().map(T::as_f32_mut) {
            Some(Some(dw)) => dw.par_iter_mut().for_each(|x| *x = 0.0),
            Some(None) => dw_owned = vec![0.0; p.v * p.h],
            None => {}
        }
        if g.db.is_some() {
            db_acc = vec![0.0; p.v];
        }
    }

    let mut scratch = Scratch::new(&plan, p.h, grads.is_some());
    for chunk in active.chunks(plan.rows) {
        let grad_step = grads.as_mut().map(|g| GradStep {
            grad_scale: g.grad_scale,
            dh: &mut *g.dh,
            dw: match g.dw.as_deref_mut().map(T::as_f32_mut) {
                Some(Some(dw)) => Some(dw),
                Some(None) => Some(&mut dw_owned[..]),
                None => None,
            },
            db: if db_acc.is_empty() {
                None
            } else {
                Some(&mut db_acc[..])
            },
        });
        process_chunk(&ctx, p, chunk, &mut scratch, row_loss, grad_step);
    }

    if let Some(g) = grads {
        if let Some(dw) = g.dw
            && T::as_f32(dw).is_none()
        {
            dw.par_chunks_mut(p.h)
                .zip(dw_owned.par_chunks(p.h))
                .for_each(|(out, acc)| T::store(acc, out));
        }
        if let Some(db) = g.db {
            T::store(&db_acc, db);
        }
    }
}

fn validate<T: Element>(
    p: &Problem<'_, T>,
    o: &Options,
    row_loss: &[f32],
    grads: Option<&Gradients<'_, T>>,
) -> Result<(), FusedCeError> {
    if p.h == 0 {
        return Err(argument("hidden", "hidden size must be positive".into()));
    }
    if p.v == 0 {
        return Err(argument(
            "weight",
            "vocabulary size must be positive".into(),
        ));
    }
    let nh = p.n.checked_mul(p.h);
    let vh = p.v.checked_mul(p.h);
    let (Some(nh), Some(vh)) = (nh, vh) else {
        return Err(argument("hidden", "shape overflows".into()));
    };
    check_len("hidden", p.hidden.len(), nh)?;
    check_len("weight", p.weight.len(), vh)?;
    if let Some(b) = p.bias {
        check_len("bias", b.len(), p.v)?;
    }
    check_len("targets", p.targets.len(), p.n)?;
    check_len("row_loss", row_loss.len(), p.n)?;
    if !(0.0..=1.0).contains(&o.label_smoothing) {
        return Err(argument(
            "label_smoothing",
            format!("must lie in [0, 1], got {}", o.label_smoothing),
        ));
    }
    if !o.scale.is_finite() || o.scale == 0.0 {
        return Err(argument(
            "scale",
            format!("must be finite and non-zero, got {}", o.scale),
        ));
    }
    if let Some(cap) = o.softcap
        && (!cap.is_finite() || cap == 0.0)
    {
        return Err(argument(
            "softcap",
            format!("must be finite and non-zero, got {cap}"),
        ));
    }
    if o.chunk_budget_bytes == 0 {
        return Err(argument("chunk_budget_bytes", "must be positive".into()));
    }
    if let Some(g) = grads {
        check_len("dh", g.dh.len(), nh)?;
        if let Some(dw) = &g.dw {
            check_len("dw", dw.len(), vh)?;
        }
        match (&g.db, p.bias) {
            (Some(db), Some(_)) => check_len("db", db.len(), p.v)?,
            (None, None) => {}
            _ => return Err(argument("db", "must be given exactly when bias is".into())),
        }
        if let GradScale::PerRow(s) = g.grad_scale {
            check_len("grad_scale", s.len(), p.n)?;
        }
    }
    Ok(())
}

/// Indices of the rows to compute, in order; an out-of-range target is an error.
fn active_rows(targets: &[i64], ignore_index: i64, v: usize) -> Result<Vec<usize>, FusedCeError> {
    let mut rows = Vec::with_capacity(targets.len());
    for (row, &t) in targets.iter().enumerate() {
        if t == ignore_index {
            continue;
        }
        if t < 0 || t as u64 >= v as u64 {
            return Err(FusedCeError::TargetOutOfRange { row, target: t, v });
        }
        rows.push(row);
    }
    Ok(rows)
}

fn to_f32_parallel<T: Element>(src: &[T], row: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; src.len()];
    out.par_chunks_mut(row * 256)
        .zip(src.par_chunks(row * 256))
        .for_each(|(d, s)| T::load(s, d));
    out
}

struct Ctx<'a, T> {
    weight: &'a [T],
    weight_f32: Option<&'a [f32]>,
    bias: Option<&'a [T]>,
    h: usize,
    v: usize,
    transform: Transform,
    eps: f32,
    plan: Plan,
}

impl<T: Element> Ctx<'_, T> {
    /// Rows `[start, start + len)` of W in float32: borrowed when W is available in float32,
    /// else converted into `buf`.
    fn weight_rows<'b>(&'b self, start: usize, len: usize, buf: &'b mut Vec<f32>) -> &'b [f32] {
        let range = start * self.h..(start + len) * self.h;
        match self.weight_f32 {
            Some(w) => &w[range],
            None => {
                buf.resize(range.len(), 0.0);
                T::load(&self.weight[range], buf);
                buf
            }
        }
    }
}

/// Per-chunk buffers, allocated once for the largest chunk.
struct Scratch {
    /// The chunk's hidden rows, `(rows, h)`.
    hidden: Vec<f32>,
    /// Logits, then dlogits, of one vocabulary block, transposed: `(block, rows)`.
    logits_t: Vec<f32>,
    /// Softmax partials per tile: `[tile][max | sum exp | sum z][row]`.
    partials: Vec<f32>,
    /// `(rows, h)`
    dh: Vec<f32>,
    /// Per row: running max, sum of exp(z - max), sum of z, target logit, lse, grad scale.
    max: Vec<f32>,
    sum_exp: Vec<f64>,
    sum_z: Vec<f64>,
    z_target: Vec<f32>,
    lse: Vec<f32>,
    grad_scale: Vec<f32>,
}

impl Scratch {
    fn new(plan: &Plan, h: usize, grads: bool) -> Scratch {
        let rows = plan.rows;
        let tiles = plan.block.div_ceil(plan.tile);
        Scratch {
            hidden: vec![0.0; rows * h],
            logits_t: vec![0.0; rows * plan.block],
            partials: vec![0.0; 3 * rows * tiles],
            dh: if grads {
                vec![0.0; rows * h]
            } else {
                Vec::new()
            },
            max: vec![0.0; rows],
            sum_exp: vec![0.0; rows],
            sum_z: vec![0.0; rows],
            z_target: vec![0.0; rows],
            lse: vec![0.0; rows],
            grad_scale: vec![0.0; rows],
        }
    }
}

/// The gradient outputs as one chunk sees them (dW and db are float32 accumulators).
struct GradStep<'a, T> {
    grad_scale: GradScale<'a>,
    dh: &'a mut [T],
    dw: Option<&'a mut [f32]>,
    db: Option<&'a mut [f32]>,
}

fn process_chunk<T: Element>(
    ctx: &Ctx<'_, T>,
    p: &Problem<'_, T>,
    chunk: &[usize],
    s: &mut Scratch,
    row_loss: &mut [f32],
    grads: Option<GradStep<'_, T>>,
) {
    let rows = chunk.len();
    let h = ctx.h;
    let hidden = &mut s.hidden[..rows * h];
    hidden
        .par_chunks_mut(h)
        .zip(chunk.par_iter())
        .for_each(|(dst, &r)| T::load(&p.hidden[r * h..(r + 1) * h], dst));
    let hidden: &[f32] = hidden;
    let targets: Vec<usize> = chunk.iter().map(|&r| p.targets[r] as usize).collect();

    s.max[..rows].fill(f32::NEG_INFINITY);
    s.sum_exp[..rows].fill(0.0);
    s.sum_z[..rows].fill(0.0);
    let blocks: Vec<(usize, usize)> = (0..ctx.v)
        .step_by(ctx.plan.block)
        .map(|v0| (v0, ctx.plan.block.min(ctx.v - v0)))
        .collect();

    // Pass 1: softmax statistics, block by block.
    for &(v0, vb) in &blocks {
        let logits_t = &mut s.logits_t[..vb * rows];
        let partials = &mut s.partials[..3 * rows * vb.div_ceil(ctx.plan.tile)];
        logits_block(ctx, hidden, rows, v0, vb, logits_t, Some(partials));
        merge_partials(partials, rows, &mut s.max, &mut s.sum_exp, &mut s.sum_z);
        for (i, &y) in targets.iter().enumerate() {
            if (v0..v0 + vb).contains(&y) {
                s.z_target[i] = logits_t[(y - v0) * rows + i];
            }
        }
    }

    let eps = ctx.eps as f64;
    let inv_v = 1.0 / ctx.v as f64;
    for i in 0..rows {
        let lse = s.max[i] as f64 + s.sum_exp[i].ln();
        let nll = lse - s.z_target[i] as f64;
        let loss = if eps == 0.0 {
            nll
        } else {
            (1.0 - eps) * nll + eps * (lse - s.sum_z[i] * inv_v)
        };
        row_loss[chunk[i]] = loss as f32;
        s.lse[i] = lse as f32;
    }

    let Some(mut g) = grads else { return };
    for (i, &r) in chunk.iter().enumerate() {
        s.grad_scale[i] = g.grad_scale.get(r);
    }
    let dh = &mut s.dh[..rows * h];
    dh.fill(0.0);
    let mut db = g.db;
    // Pass 2: gradients, block by block (recomputing the logits if there are several).
    for &(v0, vb) in &blocks {
        let logits_t = &mut s.logits_t[..vb * rows];
        if blocks.len() > 1 {
            logits_block(ctx, hidden, rows, v0, vb, logits_t, None);
        }
        let rowstats = RowStats {
            lse: &s.lse[..rows],
            z_target: &s.z_target[..rows],
            grad_scale: &s.grad_scale[..rows],
            targets: &targets,
        };
        grad_block(
            ctx,
            hidden,
            rows,
            v0,
            vb,
            logits_t,
            &rowstats,
            g.dw.as_deref_mut().map(|d| &mut d[v0 * h..(v0 + vb) * h]),
            db.as_deref_mut().map(|d| &mut d[v0..v0 + vb]),
        );
        dh_block(ctx, rows, v0, vb, logits_t, dh);
    }

    // Scatter dh to the chunk's rows (distinct rows of the output, in increasing order).
    let out = SharedRows {
        ptr: g.dh.as_mut_ptr(),
        len: g.dh.len(),
    };
    dh.par_chunks(h)
        .zip(chunk.par_iter())
        .for_each(|(src, &r)| T::store(src, out.row(r, h)));
}

/// Output rows written from several tasks, each to different rows.
struct SharedRows<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: used only to write distinct rows from different tasks (see `row`).
unsafe impl<T: Send> Sync for SharedRows<T> {}

impl<T> SharedRows<T> {
    /// Row `r` of width `h`. Callers guarantee that no two live calls name the same row.
    #[allow(clippy::mut_from_ref)]
    fn row(&self, r: usize, h: usize) -> &mut [T] {
        assert!((r + 1) * h <= self.len, "row out of bounds");
        // SAFETY: in bounds (checked); rows handed out concurrently are distinct because the
        // chunk's row indices are strictly increasing.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(r * h), h) }
    }
}

/// Logits of vocabulary `[v0, v0 + vb)` for the chunk, transposed into `logits_t`
/// (`vb x rows`), with the per-tile softmax partials when `partials` is given.
fn logits_block<T: Element>(
    ctx: &Ctx<'_, T>,
    hidden: &[f32],
    rows: usize,
    v0: usize,
    vb: usize,
    logits_t: &mut [f32],
    partials: Option<&mut [f32]>,
) {
    debug_assert_eq!(logits_t.len(), vb * rows);
    let tile = ctx.plan.tile;
    let h = ctx.h;
    let hidden_t = View::rows(hidden, rows, h).t();
    let work = |(ti, z): (usize, &mut [f32]), part: Option<&mut [f32]>, buf: &mut Vec<f32>| {
        let t0 = v0 + ti * tile;
        let tl = z.len() / rows;
        let w = ctx.weight_rows(t0, tl, buf);
        gemm(View::rows(w, tl, h), hidden_t, 0.0, z, rows);
        for (j, zrow) in z.chunks_mut(rows).enumerate() {
            let b = ctx.bias.map_or(0.0, |b| b[t0 + j].to_f32());
            for x in zrow.iter_mut() {
                *x = ctx.transform.apply(*x + b);
            }
        }
        if let Some(part) = part {
            tile_partials(z, rows, part);
        }
    };
    let tiles = logits_t.par_chunks_mut(tile * rows).enumerate();
    match partials {
        Some(partials) => tiles
            .zip(partials.par_chunks_mut(3 * rows))
            .for_each_init(Vec::new, |buf, (t, part)| work(t, Some(part), buf)),
        None => tiles.for_each_init(Vec::new, |buf, t| work(t, None, buf)),
    }
}

/// Max, sum of exp(z - max) and sum of z over a tile (`tl x rows`), per row.
fn tile_partials(z: &[f32], rows: usize, part: &mut [f32]) {
    let (max, rest) = part.split_at_mut(rows);
    let (sum_exp, sum_z) = rest.split_at_mut(rows);
    max.fill(f32::NEG_INFINITY);
    sum_exp.fill(0.0);
    sum_z.fill(0.0);
    for zrow in z.chunks(rows) {
        for ((m, sz), &x) in max.iter_mut().zip(sum_z.iter_mut()).zip(zrow) {
            *m = m.max(x);
            *sz += x;
        }
    }
    for zrow in z.chunks(rows) {
        for ((se, &m), &x) in sum_exp.iter_mut().zip(max.iter()).zip(zrow) {
            *se += (x - m).exp();
        }
    }
}

/// Folds the tiles' partials into the running per-row statistics (float64 sums).
fn merge_partials(
    partials: &[f32],
    rows: usize,
    max: &mut [f32],
    sum_exp: &mut [f64],
    sum_z: &mut [f64],
) {
    for part in partials.chunks(3 * rows) {
        let (tmax, rest) = part.split_at(rows);
        let (tsum, tz) = rest.split_at(rows);
        for i in 0..rows {
            let m = max[i].max(tmax[i]);
            if m == f32::NEG_INFINITY {
                continue;
            }
            sum_exp[i] = sum_exp[i] * ((max[i] - m) as f64).exp()
                + tsum[i] as f64 * ((tmax[i] - m) as f64).exp();
            max[i] = m;
            sum_z[i] += tz[i] as f64;
        }
    }
}

struct RowStats<'a> {
    lse: &'a [f32],
    z_target: &'a [f32],
    grad_scale: &'a [f32],
    targets: &'a [usize],
}

/// Turns the block's logits into dlogits in place (gradient of
/// `sum_i grad_scale_i * loss_i` with respect to the pre-transform logits), then
/// accumulates `dw` (`vb x h`, when asked for) and `db` (`vb`) tile by tile.
#[allow(clippy::too_many_arguments)]
fn grad_block<T: Element>(
    ctx: &Ctx<'_, T>,
    hidden: &[f32],
    rows: usize,
    v0: usize,
    vb: usize,
    logits_t: &mut [f32],
    st: &RowStats<'_>,
    dw: Option<&mut [f32]>,
    db: Option<&mut [f32]>,
) {
    let tile = ctx.plan.tile;
    let h = ctx.h;
    let smooth = ctx.eps / ctx.v as f32;
    let hit = 1.0 - ctx.eps;
    let tf = ctx.transform;
    let hidden_view = View::rows(hidden, rows, h);
    let work = |ti: usize, z: &mut [f32], dw_t: Option<&mut [f32]>, db_t: Option<&mut [f32]>| {
        let t0 = v0 + ti * tile;
        let tl = z.len() / rows;
        for zrow in z.chunks_mut(rows) {
            for (i, x) in zrow.iter_mut().enumerate() {
                let prob = (*x - st.lse[i]).exp();
                *x = st.grad_scale[i] * (prob - smooth) * tf.derivative(*x);
            }
        }
        // The target's one-hot term, for rows whose target falls in this tile.
        for (i, &y) in st.targets.iter().enumerate() {
            if (t0..t0 + tl).contains(&y) {
                z[(y - t0) * rows + i] -= st.grad_scale[i] * hit * tf.derivative(st.z_target[i]);
            }
        }
        if let Some(dw_t) = dw_t {
            gemm(View::rows(z, tl, rows), hidden_view, 1.0, dw_t, h);
        }
        if let Some(db_t) = db_t {
            for (d, zrow) in db_t.iter_mut().zip(z.chunks(rows)) {
                *d += zrow.iter().sum::<f32>();
            }
        }
    };
    // Tiles of dW and db alongside the logits' tiles; an absent output is a run of Nones.
    let tiles = logits_t.len().div_ceil(tile * rows);
    let dw_tiles: Vec<Option<&mut [f32]>> = match dw {
        Some(dw) => {
            debug_assert_eq!(dw.len(), vb * h);
            dw.chunks_mut(tile * h).map(Some).collect()
        }
        None => (0..tiles).map(|_| None).collect(),
    };
    let db_tiles: Vec<Option<&mut [f32]>> = match db {
        Some(db) => db.chunks_mut(tile).map(Some).collect(),
        None => (0..tiles).map(|_| None).collect(),
    };
    logits_t
        .par_chunks_mut(tile * rows)
        .zip(dw_tiles)
        .zip(db_tiles)
        .enumerate()
        .for_each(|(ti, ((z, dw_t), db_t))| work(ti, z, dw_t, db_t));
}

/// `dh += dlogits^T W[v0 .. v0 + vb]` for the chunk, in blocks of rows.
fn dh_block<T: Element>(
    ctx: &Ctx<'_, T>,
    rows: usize,
    v0: usize,
    vb: usize,
    dlogits_t: &[f32],
    dh: &mut [f32],
) {
    let h = ctx.h;
    let rb = ctx.plan.row_block;
    // Whole block at once when W is available in float32; else tile by tile.
    let step = if ctx.weight_f32.is_some() {
        vb
    } else {
        ctx.plan.tile
    };
    dh.par_chunks_mut(rb * h)
        .enumerate()
        .for_each_init(Vec::new, |buf, (bi, dh_rows)| {
            let r0 = bi * rb;
            let nr = dh_rows.len() / h;
            for k0 in (0..vb).step_by(step) {
                let kl = step.min(vb - k0);
                let w = ctx.weight_rows(v0 + k0, kl, buf);
                // Columns r0.. of rows k0.. of dlogits_t, read as an (nr x kl) matrix.
                let a = View {
                    data: &dlogits_t[k0 * rows + r0..],
                    rows: nr,
                    cols: kl,
                    rs: 1,
                    cs: rows,
                };
                gemm(a, View::rows(w, kl, h), 1.0, dh_rows, h);
            }
        });
}
