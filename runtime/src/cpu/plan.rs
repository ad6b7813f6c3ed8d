//! How the work is cut to fit the memory budget: rows per token chunk, columns per
//! vocabulary block, rows of W per tile, and whether a float32 copy of W is kept.
//!
//! Scratch memory of one call (everything the backend allocates besides its outputs):
//!
//! * per chunk: the chunk's hidden rows in float32 (`rows x H`), its logits block
//!   (`rows x block`, stored transposed), its `dh` accumulator (`rows x H`, with gradients),
//!   per-tile softmax partials (`3 x rows` per tile) and per-row statistics;
//! * for 16-bit inputs either one float32 copy of W (`V x H`, only when it takes at most
//!   half the budget) or one float32 tile of W per worker thread, converted on the fly;
//! * for 16-bit inputs with gradients, one float32 `dW` accumulator (`V x H`). This one is
//!   not counted against the budget: it is the size of the weight's own gradient in float32,
//!   independent of the number of tokens, and rounding `dW` to 16 bits after every chunk would
//!   make the gradient depend on the chunking (ARCHITECTURE.md, contract 4).
//!
//! Nothing scales with tokens x vocabulary: the chunk shrinks as the vocabulary grows, and
//! when not even `MIN_ROWS` rows of full-vocabulary logits fit, the vocabulary is cut into
//! blocks (two passes: softmax statistics first, then gradients, recomputing the logits).

/// Fewest rows per chunk before the vocabulary is cut into blocks instead: GEMMs with fewer
/// rows than this are mostly memory traffic.
pub const MIN_ROWS: usize = 64;

/// Target size of one float32 tile of W (rows of W converted and multiplied together).
const TILE_BYTES: usize = 1 << 20;

/// Bytes of per-row bookkeeping besides the float32 rows themselves (statistics, indices).
const ROW_OVERHEAD: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Active (non-ignored) rows per token chunk.
    pub rows: usize,
    /// Vocabulary entries per block; `block == v` means one pass per chunk.
    pub block: usize,
    /// Rows of W per tile (the unit of parallel work over the vocabulary).
    pub tile: usize,
    /// Rows of a chunk per parallel task of the `dh` GEMM.
    pub row_block: usize,
    /// 16-bit inputs only: convert W to float32 once instead of per tile.
    pub weight_copy: bool,
}

/// What the plan depends on.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Rows that are not ignored (only these are computed).
    pub active_rows: usize,
    pub h: usize,
    pub v: usize,
    pub weight_is_f32: bool,
    pub grads: bool,
    pub budget: usize,
    pub threads: usize,
}

impl Plan {
    pub fn new(s: Shape) -> Plan {
        let threads = s.threads.max(1);
        let grad_h = if s.grads { s.h } else { 0 };
        let weight_copy = !s.weight_is_f32 && 4 * s.v * s.h <= s.budget / 2;
        let mut tile = (TILE_BYTES / (4 * s.h)).clamp(64, 512).min(s.v);
        let fixed = if weight_copy {
            4 * s.v * s.h
        } else if s.weight_is_f32 {
            0
        } else {
            threads * 4 * tile * s.h
        };
        let avail = s.budget.saturating_sub(fixed);
        let per_row = |block: usize, tile: usize| {
            4 * (s.h + block + grad_h) + 12 * block.div_ceil(tile) + ROW_OVERHEAD
        };
        let wanted_rows = s.active_rows.max(1);
        let full_rows = avail / per_row(s.v, tile);
        let (rows, block) = if full_rows >= wanted_rows.min(MIN_ROWS) {
            (full_rows.min(wanted_rows), s.v)
        } else {
            let rows = wanted_rows.min(MIN_ROWS);
            let per_row_fixed = 4 * (s.h + grad_h) + ROW_OVERHEAD;
            let per_row_left = (avail / rows).saturating_sub(per_row_fixed);
            // 4 bytes of logits per vocabulary entry, plus 12 per tile of partials.
            let block = (per_row_left * tile / (4 * tile + 12)).clamp(1, s.v);
            (rows, block)
        };
        // Enough tiles per block to keep every thread busy, but not tiny ones.
        tile = tile
            .min(block.div_ceil(4 * threads).max(16))
            .min(block)
            .max(1);
        let row_block = rows.div_ceil(threads).max(1);
        Plan {
            rows,
            block,
            tile,
            row_block,
            weight_copy,
        }
    }

    /// Scratch bytes this plan allocates, the float32 dW accumulator excepted (see above).
    pub fn scratch_bytes(&self, s: Shape) -> usize {
        let grad_h = if s.grads { s.h } else { 0 };
        let weight = if self.weight_copy {
            4 * s.v * s.h
        } else if s.weight_is_f32 {
            0
        } else {
            s.threads.max(1) * 4 * self.tile * s.h
        };
        let per_row =
            4 * (s.h + self.block + grad_h) + 12 * self.block.div_ceil(self.tile) + ROW_OVERHEAD;
        weight + self.rows * per_row
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(active_rows: usize, h: usize, v: usize, f32_: bool, budget: usize) -> Shape {
        Shape {
            active_rows,
            h,
            v,
            weight_is_f32: f32_,
            grads: true,
            budget,
            threads: 4,
        }
    }

    #[test]
    fn large_budget_takes_every_row_in_one_chunk() {
        let s = shape(1000, 64, 500, true, 1 << 30);
        let p = Plan::new(s);
        assert_eq!((p.rows, p.block), (1000, 500));
        assert!(p.scratch_bytes(s) <= s.budget);
    }

    #[test]
    fn budget_bounds_scratch_not_tokens() {
        for &n in &[1_000usize, 100_000, 10_000_000] {
            for f32_ in [true, false] {
                let s = shape(n, 4096, 128_256, f32_, 256 << 20);
                let p = Plan::new(s);
                assert!(p.scratch_bytes(s) <= s.budget, "{p:?}");
                assert_eq!(p.block, s.v);
                assert!(p.rows >= MIN_ROWS);
                assert!(
                    !p.weight_copy,
                    "W in float32 is 2 GiB, more than half the budget"
                );
            }
        }
    }

    #[test]
    fn huge_vocabulary_is_cut_into_blocks() {
        // 64 rows of 4M-entry logits would take 1 GiB; the budget is 64 MiB.
        let s = shape(10_000, 512, 4 << 20, true, 64 << 20);
        let p = Plan::new(s);
        assert_eq!(p.rows, MIN_ROWS);
        assert!(p.block < s.v && p.block > 1000, "{p:?}");
        assert!(p.scratch_bytes(s) <= s.budget, "{p:?}");
    }

    #[test]
    fn small_weight_is_converted_once() {
        let s = shape(100, 64, 1000, false, 64 << 20);
        assert!(Plan::new(s).weight_copy);
        let s = shape(100, 64, 1000, true, 64 << 20);
        assert!(!Plan::new(s).weight_copy);
    }

    #[test]
    fn tiny_budget_degrades_to_the_minimum_working_set() {
        let s = shape(7, 3, 5, true, 1);
        let p = Plan::new(s);
        assert!(p.rows >= 1 && p.block >= 1 && p.tile >= 1 && p.tile <= p.block);
        assert!(p.block <= 5 && p.rows <= 7);
    }
}
