//! The CPU backend against the float64 reference: fixed cases for the edges, and property
//! tests over shapes, options and every way of cutting the work (rows per chunk that do not
//! divide n, vocabulary blocks, tiles, weight copies).

use half::{bf16, f16};
use proptest::prelude::*;

use super::element::Element;
use super::fused::{
    FusedCeError, GradScale, Gradients, Options, Problem, fused_ce, fused_ce_with_plan,
};
use super::plan::{MIN_ROWS, Plan, Shape};
use super::reference::{RefInputs, reference};

/// A small deterministic generator (xorshift64*), so a failing case is reproducible from
/// its seed.
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
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[derive(Clone, Debug)]
struct Case {
    n: usize,
    h: usize,
    v: usize,
    bias: bool,
    scale: f32,
    softcap: Option<f32>,
    label_smoothing: f32,
    /// Percent of rows ignored.
    ignored: usize,
    ignore_index: i64,
    /// None: loss only; Some(false): one grad scale; Some(true): one per row.
    grads: Option<bool>,
    /// Spread of the inputs (large values give large logits).
    magnitude: f64,
    seed: u64,
}

impl Case {
    fn basic(n: usize, h: usize, v: usize) -> Case {
        Case {
            n,
            h,
            v,
            bias: false,
            scale: 1.0,
            softcap: None,
            label_smoothing: 0.0,
            ignored: 20,
            ignore_index: -100,
            grads: Some(false),
            magnitude: 1.0,
            seed: 7,
        }
    }
}

struct Data {
    hidden: Vec<f64>,
    weight: Vec<f64>,
    bias: Option<Vec<f64>>,
    targets: Vec<i64>,
    grad_scale: Vec<f64>,
}

/// Random inputs, already rounded to `T` so the reference sees exactly what the backend sees.
fn data<T: Element>(c: &Case) -> Data {
    let mut rng = Rng::new(c.seed);
    let round = |x: f64| T::from_f32(x as f32).to_f32() as f64;
    let mut fill =
        |len: usize, mag: f64| -> Vec<f64> { (0..len).map(|_| round(rng.unit() * mag)).collect() };
    let hidden = fill(c.n * c.h, c.magnitude);
    let weight = fill(c.v * c.h, c.magnitude);
    let bias = c.bias.then(|| fill(c.v, c.magnitude));
    let mut rng = Rng::new(c.seed ^ 0xABCD);
    let targets = (0..c.n)
        .map(|_| {
            if rng.below(100) < c.ignored {
                c.ignore_index
            } else {
                rng.below(c.v) as i64
            }
        })
        .collect();
    let grad_scale = match c.grads {
        Some(true) => (0..c.n).map(|_| rng.unit() as f32 as f64).collect(),
        _ => vec![0.37f32 as f64; c.n],
    };
    Data {
        hidden,
        weight,
        bias,
        targets,
        grad_scale,
    }
}

struct Got<T> {
    row_loss: Vec<f32>,
    dh: Vec<T>,
    dw: Vec<T>,
    db: Vec<T>,
}

fn options(c: &Case, budget: usize) -> Options {
    Options {
        ignore_index: c.ignore_index,
        label_smoothing: c.label_smoothing,
        scale: c.scale,
        softcap: c.softcap,
        chunk_budget_bytes: budget,
    }
}

/// Runs the backend with `plan` (or the budget's own plan when None).
fn run<T: Element>(
    c: &Case,
    d: &Data,
    plan: Option<Plan>,
    budget: usize,
) -> Result<Got<T>, FusedCeError> {
    let to_t = |x: &[f64]| x.iter().map(|&v| T::from_f32(v as f32)).collect::<Vec<T>>();
    let hidden = to_t(&d.hidden);
    let weight = to_t(&d.weight);
    let bias = d.bias.as_deref().map(to_t);
    let problem = Problem {
        hidden: &hidden,
        weight: &weight,
        bias: bias.as_deref(),
        targets: &d.targets,
        n: c.n,
        h: c.h,
        v: c.v,
    };
    let zero = T::from_f32(0.0);
    let poison = T::from_f32(f32::NAN);
    let mut got = Got {
        row_loss: vec![f32::NAN; c.n],
        dh: vec![poison; c.n * c.h],
        dw: vec![poison; c.v * c.h],
        db: vec![poison; if c.bias { c.v } else { 0 }],
    };
    let gs32: Vec<f32> = d.grad_scale.iter().map(|&g| g as f32).collect();
    let grads = c.grads.map(|per_row| Gradients {
        grad_scale: if per_row {
            GradScale::PerRow(&gs32)
        } else {
            GradScale::Uniform(gs32.first().copied().unwrap_or(0.37))
        },
        dh: &mut got.dh,
        dw: Some(&mut got.dw),
        db: if c.bias { Some(&mut got.db) } else { None },
    });
    let o = options(c, budget);
    match plan {
        Some(plan) => fused_ce_with_plan(&problem, &o, &plan, &mut got.row_loss, grads)?,
        None => fused_ce(&problem, &o, &mut got.row_loss, grads)?,
    }
    if c.grads.is_none() {
        got.dh = vec![zero; 0];
    }
    Ok(got)
}

fn expected(c: &Case, d: &Data) -> super::reference::Reference {
    reference(&RefInputs {
        hidden: &d.hidden,
        weight: &d.weight,
        bias: d.bias.as_deref(),
        targets: &d.targets,
        n: c.n,
        h: c.h,
        v: c.v,
        ignore_index: c.ignore_index,
        label_smoothing: c.label_smoothing as f64,
        scale: c.scale as f64,
        softcap: c.softcap.map(|x| x as f64),
        grad_scale: &d.grad_scale,
    })
}

/// `|got - want| <= rel * |want| + abs * max|want| + floor`, element by element.
fn assert_close(what: &str, got: &[f64], want: &[f64], rel: f64, abs: f64, floor: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let peak = want.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = rel * w.abs() + abs * peak + floor + 1e-30;
        assert!(
            (g - w).abs() <= tol,
            "{what}[{i}]: got {g}, want {w} (tolerance {tol}, peak {peak})"
        );
    }
}

/// Checks the backend against the reference; `rel` is the per-element tolerance of the
/// 16-bit gradient outputs (their rounding), float32 ones get 1e-4.
fn check<T: Element>(c: &Case, plan: Option<Plan>, budget: usize) {
    let d = data::<T>(c);
    let got = run::<T>(c, &d, plan, budget).expect("valid call");
    let want = expected(c, &d);
    let f = |x: &[T]| x.iter().map(|v| v.to_f32() as f64).collect::<Vec<f64>>();
    let loss: Vec<f64> = got.row_loss.iter().map(|&x| x as f64).collect();
    // The loss is computed in float32 from exact inputs: only float32 rounding, of which
    // `logsumexp - target logit` keeps an absolute part (a few epsilons of the largest
    // logit) that stands out when a saturated softmax makes the loss itself tiny.
    let max_abs = |x: &[f64]| x.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let max_logit = c.scale as f64
        * (c.h as f64 * max_abs(&d.hidden) * max_abs(&d.weight)
            + d.bias.as_deref().map_or(0.0, max_abs));
    let floor_loss = 4.0 * f32::EPSILON as f64 * max_logit;
    assert_close("row_loss", &loss, &want.row_loss, 2e-5, 2e-6, floor_loss);
    if c.grads.is_some() {
        let rel = if T::as_f32(&[] as &[T]).is_some() {
            1e-4
        } else {
            // One rounding to 8 (bf16) or 11 (fp16) bits, plus float32 accumulation.
            2f64.powi(-7)
        };
        // Absolute floors. Each dlogit is `exp(z - lse) - onehot` in float32 (as in torch):
        // `z - lse` keeps a few epsilons of the largest logit, which a saturated softmax
        // (`p - 1` near 0) turns into an absolute error of the dlogit, times its grad
        // scale; a gradient sums `v` (dh) or `n` (dW, db) of them. When every dlogit is that
        // small, `abs * peak` alone would ask for more than float32 can give. Outputs also
        // round to the output type's subnormal spacing (fp16 below 6e-5).
        let dlogit = 4.0 * f32::EPSILON as f64 * max_logit.max(1.0) * max_abs(&d.grad_scale);
        let subnormal = 2f64.powi(-24); // fp16's subnormal spacing, the coarsest of the three
        let floor_dh = dlogit * c.v as f64 * max_abs(&d.weight) + subnormal;
        let floor_dw = dlogit * c.n as f64 * max_abs(&d.hidden) + subnormal;
        let floor_db = dlogit * c.n as f64 + subnormal;
        assert_close("dh", &f(&got.dh), &want.dh, rel, 2e-4, floor_dh);
        assert_close("dw", &f(&got.dw), &want.dw, rel, 2e-4, floor_dw);
        if c.bias {
            assert_close("db", &f(&got.db), &want.db, rel, 2e-4, floor_db);
        }
    }
}

const BIG_BUDGET: usize = 1 << 30;

#[test]
fn plain_f32_matches_reference() {
    check::<f32>(&Case::basic(37, 16, 50), None, BIG_BUDGET);
}

#[test]
fn every_transform_and_smoothing_together() {
    let c = Case {
        bias: true,
        scale: 0.37,
        softcap: Some(2.5),
        label_smoothing: 0.1,
        magnitude: 2.0,
        grads: Some(true),
        ..Case::basic(29, 12, 41)
    };
    check::<f32>(&c, None, BIG_BUDGET);
    check::<bf16>(&c, None, BIG_BUDGET);
    check::<f16>(&c, None, BIG_BUDGET);
}

#[test]
fn saturated_softcap_and_large_logits_stay_finite() {
    let c = Case {
        scale: 50.0,
        softcap: Some(3.0),
        magnitude: 3.0,
        ..Case::basic(20, 8, 30)
    };
    check::<f32>(&c, None, BIG_BUDGET);
    let c = Case {
        scale: 40.0,
        softcap: None,
        magnitude: 3.0,
        ..c
    };
    check::<f32>(&c, None, BIG_BUDGET);
}

#[test]
fn full_smoothing_is_the_uniform_target() {
    let c = Case {
        label_smoothing: 1.0,
        ..Case::basic(10, 5, 9)
    };
    check::<f32>(&c, None, BIG_BUDGET);
}

#[test]
fn budget_chunks_that_do_not_divide_n() {
    let c = Case {
        ignored: 0,
        bias: true,
        ..Case::basic(201, 8, 40)
    };
    let shape = Shape {
        active_rows: 201,
        h: 8,
        v: 40,
        weight_is_f32: true,
        grads: true,
        budget: 25_000,
        threads: rayon::current_num_threads(),
    };
    let plan = Plan::new(shape);
    assert!(plan.rows >= MIN_ROWS && plan.rows < 201 && 201 % plan.rows != 0);
    assert_eq!(plan.block, 40);
    check::<f32>(&c, None, shape.budget);
    check::<bf16>(&c, None, shape.budget);
}

#[test]
fn budget_forces_vocabulary_blocks() {
    let c = Case {
        softcap: Some(5.0),
        label_smoothing: 0.2,
        bias: true,
        ..Case::basic(70, 6, 300)
    };
    let shape = Shape {
        active_rows: 60,
        h: 6,
        v: 300,
        weight_is_f32: false,
        grads: true,
        budget: 60_000,
        threads: rayon::current_num_threads(),
    };
    let plan = Plan::new(shape);
    assert!(plan.block < 300, "{plan:?}");
    check::<f32>(&c, None, shape.budget);
    check::<bf16>(&c, None, shape.budget);
}

#[test]
fn all_rows_ignored_gives_zero_loss_and_zero_gradients() {
    let c = Case {
        ignored: 100,
        bias: true,
        ..Case::basic(13, 4, 11)
    };
    let d = data::<f32>(&c);
    assert!(d.targets.iter().all(|&t| t == -100));
    let got = run::<bf16>(&c, &d, None, BIG_BUDGET).unwrap();
    assert!(got.row_loss.iter().all(|&x| x == 0.0));
    for g in [&got.dh, &got.dw, &got.db] {
        assert!(g.iter().all(|x| x.to_f32() == 0.0));
    }
}

/// A frozen head: without `dw` the call computes no weight gradient, and everything else
/// (losses, dh, db) is bit for bit what the call with `dw` gives, through several vocabulary
/// blocks and chunks, in float32 and bfloat16.
fn frozen_weight_case<T: Element + PartialEq + std::fmt::Debug>() {
    let c = Case {
        softcap: Some(4.0),
        bias: true,
        grads: Some(true),
        ..Case::basic(90, 6, 200)
    };
    let d = data::<T>(&c);
    let with_dw = run::<T>(&c, &d, None, 40_000).unwrap();
    let to_t = |x: &[f64]| x.iter().map(|&v| T::from_f32(v as f32)).collect::<Vec<T>>();
    let (hidden, weight, bias) = (
        to_t(&d.hidden),
        to_t(&d.weight),
        to_t(d.bias.as_ref().unwrap()),
    );
    let problem = Problem {
        hidden: &hidden,
        weight: &weight,
        bias: Some(&bias),
        targets: &d.targets,
        n: c.n,
        h: c.h,
        v: c.v,
    };
    let gs: Vec<f32> = d.grad_scale.iter().map(|&g| g as f32).collect();
    let mut row_loss = vec![f32::NAN; c.n];
    let mut dh = vec![T::from_f32(f32::NAN); c.n * c.h];
    let mut db = vec![T::from_f32(f32::NAN); c.v];
    let grads = Gradients {
        grad_scale: GradScale::PerRow(&gs),
        dh: &mut dh,
        dw: None,
        db: Some(&mut db),
    };
    fused_ce(&problem, &options(&c, 40_000), &mut row_loss, Some(grads)).unwrap();
    assert_eq!(row_loss, with_dw.row_loss);
    assert_eq!(dh, with_dw.dh);
    assert_eq!(db, with_dw.db);
}

#[test]
fn frozen_weight_skips_dw_and_changes_nothing_else() {
    frozen_weight_case::<f32>();
    frozen_weight_case::<bf16>();
}

#[test]
fn no_rows_at_all() {
    let c = Case {
        bias: true,
        ..Case::basic(0, 4, 11)
    };
    let d = data::<f32>(&c);
    let got = run::<f32>(&c, &d, None, BIG_BUDGET).unwrap();
    assert!(got.row_loss.is_empty());
    assert!(got.dw.iter().chain(&got.db).all(|&x| x == 0.0));
}

#[test]
fn custom_ignore_index_and_negative_targets() {
    let c = Case {
        ignore_index: 3,
        ..Case::basic(25, 6, 10)
    };
    // Target 3 is ignored here, so rows whose target is 3 must give zero loss.
    let d = data::<f32>(&c);
    let got = run::<f32>(&c, &d, None, BIG_BUDGET).unwrap();
    for (t, l) in d.targets.iter().zip(&got.row_loss) {
        assert_eq!(*t == 3, *l == 0.0);
    }
    check::<f32>(&c, None, BIG_BUDGET);

    let mut d = data::<f32>(&Case::basic(5, 2, 4));
    d.targets[2] = -1;
    let err = run::<f32>(&Case::basic(5, 2, 4), &d, None, BIG_BUDGET).err();
    assert_eq!(
        err,
        Some(FusedCeError::TargetOutOfRange {
            row: 2,
            target: -1,
            v: 4
        })
    );
    d.targets[2] = 4;
    let err = run::<f32>(&Case::basic(5, 2, 4), &d, None, BIG_BUDGET)
        .err()
        .unwrap();
    assert!(err.to_string().contains("row 2 has target 4"), "{err}");
}

#[test]
fn loss_only_equals_the_loss_of_a_gradient_call() {
    let c = Case {
        softcap: Some(4.0),
        ..Case::basic(40, 8, 33)
    };
    let d = data::<bf16>(&c);
    let with = run::<bf16>(&c, &d, None, BIG_BUDGET).unwrap();
    let without = run::<bf16>(
        &Case {
            grads: None,
            ..c.clone()
        },
        &d,
        None,
        BIG_BUDGET,
    )
    .unwrap();
    assert_eq!(with.row_loss, without.row_loss);
}

#[test]
fn wrong_arguments_are_errors_naming_them() {
    let c = Case::basic(4, 3, 5);
    let d = data::<f32>(&c);
    let hidden: Vec<f32> = d.hidden.iter().map(|&x| x as f32).collect();
    let weight: Vec<f32> = d.weight.iter().map(|&x| x as f32).collect();
    let mut loss = vec![0.0f32; 4];
    let problem = |n| Problem {
        hidden: &hidden,
        weight: &weight,
        bias: None,
        targets: &d.targets,
        n,
        h: 3,
        v: 5,
    };
    let o = options(&c, BIG_BUDGET);
    let msg = |r: Result<(), FusedCeError>| r.unwrap_err().to_string();
    assert!(msg(fused_ce(&problem(5), &o, &mut loss, None)).starts_with("hidden:"));
    let bad = Options {
        label_smoothing: 1.5,
        ..o
    };
    assert!(msg(fused_ce(&problem(4), &bad, &mut loss, None)).starts_with("label_smoothing:"));
    let bad = Options { scale: 0.0, ..o };
    assert!(msg(fused_ce(&problem(4), &bad, &mut loss, None)).starts_with("scale:"));
    let bad = Options {
        softcap: Some(f32::INFINITY),
        ..o
    };
    assert!(msg(fused_ce(&problem(4), &bad, &mut loss, None)).starts_with("softcap:"));
    let mut dh = vec![0.0f32; 11];
    let mut dw = vec![0.0f32; 15];
    let gs = [1.0f32; 3];
    let grads = Gradients {
        grad_scale: GradScale::PerRow(&gs),
        dh: &mut dh,
        dw: Some(&mut dw),
        db: None,
    };
    assert!(msg(fused_ce(&problem(4), &o, &mut loss, Some(grads))).starts_with("dh:"));
}

fn arbitrary_case() -> impl Strategy<Value = (Case, Plan)> {
    (
        0usize..40,
        1usize..10,
        1usize..24,
        any::<bool>(),
        prop_oneof![Just(1.0f32), Just(0.37), Just(3.0)],
        prop_oneof![Just(None), (0.5f32..20.0).prop_map(Some)],
        prop_oneof![Just(0.0f32), 0.0f32..=1.0],
        prop_oneof![Just(0usize), Just(100), 0usize..100],
        prop_oneof![Just(None), Just(Some(false)), Just(Some(true))],
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<bool>()),
    )
        .prop_map(
            |(n, h, v, bias, scale, softcap, eps, ignored, grads, (seed, s1, s2, copy))| {
                let case = Case {
                    n,
                    h,
                    v,
                    bias,
                    scale,
                    softcap,
                    label_smoothing: eps,
                    ignored,
                    ignore_index: -100,
                    grads,
                    magnitude: 1.5,
                    seed,
                };
                let rows = 1 + (s1 % n.max(1) as u64) as usize;
                let block = 1 + (s2 % v as u64) as usize;
                let tile = 1 + ((s1 >> 32) % block as u64) as usize;
                let row_block = 1 + ((s2 >> 32) % rows as u64) as usize;
                let plan = Plan {
                    rows,
                    block,
                    tile,
                    row_block,
                    weight_copy: copy,
                };
                (case, plan)
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn f32_matches_reference_for_any_cut((case, plan) in arbitrary_case()) {
        check::<f32>(&case, Some(plan), BIG_BUDGET);
    }

    #[test]
    fn bf16_matches_reference_for_any_cut((case, plan) in arbitrary_case()) {
        check::<bf16>(&case, Some(plan), BIG_BUDGET);
    }

    #[test]
    fn f16_matches_reference_for_any_cut((case, plan) in arbitrary_case()) {
        check::<f16>(&case, Some(plan), BIG_BUDGET);
    }

    #[test]
    fn budget_plans_match_reference(
        (case, _) in arbitrary_case(),
        budget in prop_oneof![Just(1usize), 64usize..4096, Just(BIG_BUDGET)],
    ) {
        check::<bf16>(&case, None, budget);
    }
}
