//! How one call splits into token chunks, and where each scratch buffer lives in the one
//! workspace that Python allocates with torch (so torch's allocator accounts for it).
//!
//! Pure arithmetic: the same inputs give the same plan in `cuda_workspace_bytes` (asked by
//! Python before it allocates) and in `cuda_fused_ce` (which carves the workspace).

/// Bytes handed to cuBLAS as its workspace (split-K reductions, etc.).
pub const CUBLAS_WORKSPACE_BYTES: u64 = 32 << 20;
/// Every buffer starts on this boundary.
const ALIGN: u64 = 256;
/// Chunks are a multiple of this many rows, unless the call has fewer rows. (128 was
/// measured slower on the H100 at (16384, 4096, 128256): one chunk more than 64 allows, and
/// every chunk re-reads W and re-writes dW.)
const ROW_QUANTUM: u64 = 64;
/// Preferred multiple of rows per chunk (see `plan`).
const TILE_ROWS: u64 = 192;
/// Upper bound on rows per chunk (kernel grids put rows on the y dimension).
const MAX_CHUNK_ROWS: u64 = 32768;

/// What a call needs; `elem_bytes` is 2 (bf16, fp16) or 4 (fp32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub rows: u64,
    pub hidden: u64,
    pub vocab: u64,
    pub elem_bytes: u64,
    pub has_bias: bool,
    pub compute_grads: bool,
    /// With `compute_grads`: dW too (false for a frozen weight: no dW product, no
    /// float32 accumulator).
    pub weight_grad: bool,
    /// Rows are gathered through a row map (ignored rows skipped): needs a staging copy of h.
    pub gathered: bool,
    /// Split-K factor of the dh product (float32 partials, summed by `dh_finish`).
    pub dh_splits: u64,
}

/// A float32 dW accumulator is used when it takes at most this share of the budget.
const DW_ACC_SHARE: u64 = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Rows per chunk (the last chunk may have fewer).
    pub chunk_rows: u64,
    pub chunks: u64,
    /// Row stride of the float32 logits chunk, in floats.
    pub ld_logits: u64,
    /// Row stride of dlogits written in place over the logits, in input-dtype elements.
    pub ld_dlogits: u64,
    // Byte offsets into the workspace.
    pub logits: u64,
    pub dh_partials: u64,
    pub hidden_stage: u64,
    pub target_grad: u64,
    pub db_acc: u64,
    pub ones: u64,
    pub cublas: u64,
    /// Float32 accumulator of dW (16-bit inputs, when it fits a quarter of the budget),
    /// so dW is rounded to its dtype once instead of once per chunk; None: accumulate in dW.
    pub dw_acc: Option<u64>,
    pub total_bytes: u64,
}

fn round_up(x: u64, to: u64) -> u64 {
    x.div_ceil(to) * to
}

/// Row stride of the logits chunk: a multiple of 32 floats (128-byte rows), nudged off
/// strides that are multiples of 8 KiB, which make rows alias in memory partitions.
pub fn ld_logits(vocab: u64) -> u64 {
    let ld = round_up(vocab.max(1), 32);
    if (ld * 4).is_multiple_of(8192) {
        ld + 32
    } else {
        ld
    }
}

impl Shape {
    fn per_row_bytes(&self, ld: u64) -> u64 {
        let mut b = ld * 4;
        if self.compute_grads {
            b += self.dh_splits * self.hidden * 4;
            if self.has_bias {
                b += self.elem_bytes; // ones vector of the db product
            }
        }
        if self.gathered {
            b += self.hidden * self.elem_bytes;
        }
        b
    }

    fn dw_acc_bytes(&self, budget: u64) -> Option<u64> {
        let bytes = self.vocab * self.hidden * 4;
        (self.compute_grads
            && self.weight_grad
            && self.elem_bytes < 4
            && bytes <= budget / DW_ACC_SHARE)
            .then_some(bytes)
    }

    fn fixed_bytes(&self, budget: u64) -> u64 {
        let mut b = CUBLAS_WORKSPACE_BYTES + 9 * ALIGN;
        if self.compute_grads {
            b += self.rows * 4;
            if self.has_bias {
                b += self.vocab * 4;
            }
        }
        b + self.dw_acc_bytes(budget).unwrap_or(0)
    }

    /// The plan for a scratch budget of `budget` bytes. Chunks are as large as the budget
    /// allows (large GEMMs, few roundings of dW), then balanced so that the last one is not
    /// a sliver. A budget too small for `ROW_QUANTUM` rows still gets that many.
    pub fn plan(&self, budget: u64) -> Plan {
        let ld = ld_logits(self.vocab);
        let per_row = self.per_row_bytes(ld);
        // Rows per chunk are sized as if dW were wanted, so a frozen weight gets the same
        // chunks (cuBLAS picks its algorithms by shape, db sums chunk by chunk): loss, dh
        // and db bit for bit those of the run with dW; it saves only dW and its accumulator.
        let as_if_dw = Shape {
            weight_grad: true,
            ..*self
        };
        let room = budget.saturating_sub(as_if_dw.fixed_bytes(budget));
        let mut max_rows = (room / per_row) / ROW_QUANTUM * ROW_QUANTUM;
        max_rows = max_rows.clamp(ROW_QUANTUM, MAX_CHUNK_ROWS);
        let rows = self.rows.max(1);
        let chunks = rows.div_ceil(max_rows);
        // Balanced chunks; a multiple of 192 rows when that adds no chunk (cuBLAS's H100
        // kernels tile this dimension by 192 or 128: at (8192, 2304, 256000), 960-row chunks
        // ran the logits product 20% faster than 832-row ones).
        let even = rows.div_ceil(chunks);
        let chunk_rows = if round_up(even, TILE_ROWS) <= max_rows {
            round_up(even, TILE_ROWS)
        } else {
            round_up(even, ROW_QUANTUM).min(max_rows)
        }
        .min(rows);
        let chunks = rows.div_ceil(chunk_rows);

        let mut at = 0u64;
        let mut take = |bytes: u64| {
            let start = at;
            at = round_up(at + bytes, ALIGN);
            start
        };
        let logits = take(chunk_rows * ld * 4);
        let cublas = take(CUBLAS_WORKSPACE_BYTES);
        let (dh_partials, target_grad) = if self.compute_grads {
            (
                take(self.dh_splits * chunk_rows * self.hidden * 4),
                take(self.rows * 4),
            )
        } else {
            (0, 0)
        };
        let (db_acc, ones) = if self.compute_grads && self.has_bias {
            (take(self.vocab * 4), take(chunk_rows * self.elem_bytes))
        } else {
            (0, 0)
        };
        let hidden_stage = if self.gathered {
            take(chunk_rows * self.hidden * self.elem_bytes)
        } else {
            0
        };
        let dw_acc = self.dw_acc_bytes(budget).map(&mut take);
        Plan {
            chunk_rows,
            chunks,
            ld_logits: ld,
            ld_dlogits: if self.elem_bytes == 4 { ld } else { 2 * ld },
            logits,
            dh_partials,
            hidden_stage,
            target_grad,
            db_acc,
            ones,
            cublas,
            dw_acc,
            total_bytes: at.max(ALIGN),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(rows: u64, hidden: u64, vocab: u64) -> Shape {
        Shape {
            rows,
            hidden,
            vocab,
            elem_bytes: 2,
            has_bias: false,
            compute_grads: true,
            weight_grad: true,
            gathered: false,
            dh_splits: 1,
        }
    }

    #[test]
    fn benchmark_shapes_fit_one_gib() {
        let gib = 1u64 << 30;
        for (n, h, v) in [
            (16384, 4096, 128256),
            (8192, 2304, 256000),
            (16384, 2048, 151936),
        ] {
            let p = shape(n, h, v).plan(gib);
            assert!(p.total_bytes <= gib, "{n}x{h}x{v}: {} bytes", p.total_bytes);
            assert!(p.chunk_rows * p.chunks >= n);
            assert!(p.chunk_rows * (p.chunks - 1) < n, "no empty chunk");
            assert_eq!(p.chunk_rows % ROW_QUANTUM, 0);
        }
    }

    #[test]
    fn chunks_are_balanced() {
        // 10000 rows in chunks of at most 2048: five chunks of 2048 would leave a sliver of
        // 1808; balanced they are 2048 x 4 + 1808, i.e. ceil(10000 / 5) rounded to 64 = 2048.
        let p = shape(10000, 4096, 128256).plan(1 << 30);
        assert_eq!(p.chunks, 10000u64.div_ceil(p.chunk_rows));
        assert!(p.chunk_rows * p.chunks - 10000 < ROW_QUANTUM * p.chunks);
    }

    #[test]
    fn tiny_budget_still_plans_one_quantum() {
        let p = shape(1000, 64, 50000).plan(1);
        assert_eq!(p.chunk_rows, ROW_QUANTUM);
        assert_eq!(p.chunks, 1000u64.div_ceil(ROW_QUANTUM));
    }

    #[test]
    fn few_rows_one_chunk() {
        let p = shape(5, 64, 1000).plan(1 << 30);
        assert_eq!((p.chunk_rows, p.chunks), (5, 1));
    }

    #[test]
    fn buffers_do_not_overlap() {
        let s = Shape {
            has_bias: true,
            gathered: true,
            dh_splits: 3,
            ..shape(3000, 512, 32000)
        };
        let p = s.plan(1 << 28);
        let mut spans = vec![
            (p.logits, p.chunk_rows * p.ld_logits * 4),
            (p.cublas, CUBLAS_WORKSPACE_BYTES),
            (p.dh_partials, 3 * p.chunk_rows * 512 * 4),
            (p.target_grad, 3000 * 4),
            (p.db_acc, 32000 * 4),
            (p.ones, p.chunk_rows * 2),
            (p.hidden_stage, p.chunk_rows * 512 * 2),
            (
                p.dw_acc.expect("fits a quarter of the budget"),
                32000 * 512 * 4,
            ),
        ];
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "{spans:?}");
        }
        assert!(spans.last().map(|(a, b)| a + b).unwrap() <= p.total_bytes);
        assert!(spans.iter().all(|(a, _)| a % ALIGN == 0));
    }

    #[test]
    fn float32_dw_accumulator_only_when_small() {
        let gib = 1u64 << 30;
        for (n, h, v) in [
            (16384, 4096, 128256),
            (8192, 2304, 256000),
            (16384, 2048, 151936),
        ] {
            assert_eq!(shape(n, h, v).plan(gib).dw_acc, None);
        }
        assert!(shape(100, 64, 1000).plan(gib).dw_acc.is_some());
        let f32_shape = Shape {
            elem_bytes: 4,
            ..shape(100, 64, 1000)
        };
        assert_eq!(
            f32_shape.plan(gib).dw_acc,
            None,
            "float32 dW accumulates in place"
        );
        let no_grads = Shape {
            compute_grads: false,
            ..shape(100, 64, 1000)
        };
        assert_eq!(no_grads.plan(gib).dw_acc, None);
        let frozen = Shape {
            weight_grad: false,
            ..shape(100, 64, 1000)
        };
        assert_eq!(frozen.plan(gib).dw_acc, None, "a frozen weight has no dW");
        assert!(frozen.plan(gib).total_bytes < shape(100, 64, 1000).plan(gib).total_bytes);
    }

    #[test]
    fn frozen_weight_chunks_like_the_dw_run() {
        // A budget where the float32 dW accumulator is reserved: without the reservation the
        // frozen plan would take larger chunks and round differently (seen on the H200).
        let with_dw = shape(16384, 1024, 4096);
        let frozen = Shape {
            weight_grad: false,
            ..with_dw
        };
        for budget in [128u64 << 20, 512 << 20, 1 << 30] {
            let (a, b) = (with_dw.plan(budget), frozen.plan(budget));
            assert_eq!(
                (a.chunk_rows, a.chunks),
                (b.chunk_rows, b.chunks),
                "{budget}"
            );
            assert!(b.total_bytes <= a.total_bytes);
        }
        assert!(with_dw.plan(512 << 20).dw_acc.is_some());
    }

    #[test]
    fn ld_avoids_8k_multiples() {
        assert_eq!(ld_logits(128256), 128256);
        assert_eq!(ld_logits(262144), 262144 + 32);
        assert_eq!(ld_logits(256000), 256032);
        assert_eq!(ld_logits(5), 32);
        for v in [1u64, 31, 32000, 151936, 262144] {
            assert_eq!(ld_logits(v) % 32, 0);
            assert!(ld_logits(v) >= v);
        }
    }
}
