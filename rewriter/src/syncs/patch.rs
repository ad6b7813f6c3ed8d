//! What forward-rewrite's runtime changes in the stock call graph, declared here and only
//! here: the "patched" column of `scan --syncs` is the stock reachability recomputed with
//! these effects. A patch is described by the calls it stops (edges cut) and the work it
//! does once per forward instead, for the backends a capability of the shared table selects.
//! It applies to classes the audit marks `patched` (the runtime only touches those).
//!
//! To describe another patch, add an entry to [`PATCHES`]; functions are named by module
//! (relative to the transformers package, without `.py`) and function name, and a name the
//! scanned tree does not have makes the entry a no-op (listed by `scan --syncs` in its notes).

/// One declared effect of the runtime on the stock code.
#[derive(Debug)]
pub struct PatchEffect {
    /// A stable name, shown in the report.
    pub name: &'static str,
    /// What the runtime does, in one sentence.
    pub summary: &'static str,
    /// The effect applies under the backends whose boolean capability of this name is true
    /// in `attention_backends.json`.
    pub capability: &'static str,
    /// The function whose calls change: (module, function).
    pub caller: (&'static str, &'static str),
    /// Functions `caller` no longer calls (and whose result it no longer truth-tests).
    pub cut: &'static [&'static str],
    /// Functions whose work the runtime does once per forward instead: their syncs move from
    /// the layers' call trees to the forward (when `caller` was reached at all).
    pub per_forward: &'static [(&'static str, &'static str)],
}

/// The packing runtime's varlen case: it computes `cu_seq_lens_q/k` and `max_length_q/k`
/// from the packed `position_ids` once per forward and passes them to every layer, so
/// `_flash_attention_forward` takes its `is_fa_with_varlen_kwargs` branch and never reaches
/// `_is_packed_sequence` (a sync per layer) or `_prepare_from_posids` (which calls
/// `prepare_fa_kwargs_from_position_ids`: a `nonzero` per layer).
pub const PATCHES: &[PatchEffect] = &[PatchEffect {
    name: "packing-varlen-metadata",
    summary: "varlen metadata (cu_seq_lens_q/k, max_length_q/k) computed once per forward and passed to every layer",
    capability: "takes_varlen_kwargs",
    caller: ("modeling_flash_attention_utils", "_flash_attention_forward"),
    cut: &["_is_packed_sequence", "_prepare_from_posids"],
    per_forward: &[(
        "modeling_flash_attention_utils",
        "prepare_fa_kwargs_from_position_ids",
    )],
}];
