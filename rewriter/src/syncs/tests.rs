//! The graph and the report on a small synthetic transformers: a toy model whose attention
//! dispatches through `ALL_ATTENTION_FUNCTIONS` to an sdpa and a flash integration, with a
//! flash utility module shaped like transformers' (packed-sequence check, position-ids
//! metadata), so that the patch declaration of `patch.rs` applies.

use super::extract::{ModuleFacts, extract};
use super::graph::Program;
use super::report::{ClassSyncs, class_syncs, render_class, resolve_patches};
use crate::backends::table;
use crate::parse::ParsedSource;

const MODELING_UTILS: &str = r#"
from .integrations.sdpa_attention import sdpa_attention_forward
from .integrations.flash_attention import flash_attention_forward

class AttentionInterface(GeneralInterface):
    _global_mapping = {
        "sdpa": sdpa_attention_forward,
        "flash_attention_2": flash_attention_forward,
        "flash_attention_3": flash_attention_forward,
    }

ALL_ATTENTION_FUNCTIONS: AttentionInterface = AttentionInterface()

class PreTrainedModel(nn.Module):
    @property
    def loss_function(self):
        return (self.x > 0).any()
"#;

const SDPA: &str = r#"
def sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs):
    if torch.jit.is_tracing():
        is_causal = query.item()
    return query, None
"#;

const FLASH: &str = r#"
from ..modeling_flash_attention_utils import _flash_attention_forward

def flash_attention_forward(module, query, key, value, attention_mask, **kwargs):
    return _flash_attention_forward(query, key, value, attention_mask, **kwargs), None
"#;

const FLASH_UTILS: &str = r#"
def prepare_fa_kwargs_from_position_ids(position_ids):
    indices_q = (position_ids == position_ids.min()).nonzero().view(-1)
    return indices_q

def _prepare_from_posids(query, position_ids):
    return prepare_fa_kwargs_from_position_ids(position_ids)

def _is_packed_sequence(position_ids, batch_size):
    increasing = torch.arange(position_ids.shape[1]) + position_ids.min()
    return (increasing - position_ids).abs().sum().bool()

def _flash_attention_forward(query, key, value, attention_mask, position_ids=None, cu_seq_lens_q=None, **kwargs):
    if cu_seq_lens_q is not None:
        return query
    if _is_packed_sequence(position_ids, 1):
        metadata = _prepare_from_posids(query, position_ids)
    return query
"#;

const TOY: &str = r#"
from ...modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from ..auto import AutoModel

def eager_attention_forward(module, query, key, value, attention_mask, **kwargs):
    return query, None

class ToyAttention(nn.Module):
    def forward(self, hidden_states: torch.Tensor, **kwargs):
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        return attention_interface(self, hidden_states, hidden_states, hidden_states, None, **kwargs)

class ToyExperts(nn.Module):
    def forward(self, hidden_states, mask: torch.Tensor):
        for expert_idx in mask.nonzero():
            if expert_idx == 3:
                continue
        return hidden_states

class ToyLayer(nn.Module):
    def __init__(self, config):
        self.self_attn = ToyAttention(config)
        self.experts = ToyExperts(config)
        self.norm = nn.LayerNorm(4)

    def forward(self, hidden_states, **kwargs):
        hidden_states = self.norm(hidden_states)
        hidden_states, _ = self.self_attn(hidden_states, **kwargs)
        return self.experts(hidden_states, hidden_states)

class ToyModel(PreTrainedModel):
    def __init__(self, config):
        self.layers = nn.ModuleList([ToyLayer(config) for _ in range(config.n)])
        self.vision_tower = AutoModel.from_config(config.vision_config)

    def forward(self, input_ids, position_ids: torch.Tensor, **kwargs):
        if position_ids.shape[-1] > 1 and (position_ids[:, 0] != 0).any():
            pass
        hidden_states = self.embed(input_ids)
        for layer in self.layers[: self.config.n]:
            hidden_states = layer(hidden_states, position_ids=position_ids, **kwargs)
        features = self.vision_tower(hidden_states)
        return hidden_states

class ToyForCausalLM(PreTrainedModel):
    def __init__(self, config):
        self.model = ToyModel(config)

    def forward(self, input_ids, labels=None, **kwargs):
        hidden_states = self.model(input_ids, **kwargs)
        if labels is not None:
            n = int(labels.ne(-100).sum())
        return hidden_states
"#;

fn program() -> Program {
    let modules: Vec<ModuleFacts> = [
        ("pkg.modeling_utils", "modeling_utils.py", MODELING_UTILS),
        (
            "pkg.integrations.sdpa_attention",
            "integrations/sdpa_attention.py",
            SDPA,
        ),
        (
            "pkg.integrations.flash_attention",
            "integrations/flash_attention.py",
            FLASH,
        ),
        (
            "pkg.modeling_flash_attention_utils",
            "modeling_flash_attention_utils.py",
            FLASH_UTILS,
        ),
        (
            "pkg.models.toy.modeling_toy",
            "models/toy/modeling_toy.py",
            TOY,
        ),
    ]
    .into_iter()
    .map(|(module, path, text)| extract(&ParsedSource::parse(text).unwrap(), module, path))
    .collect();
    Program::build(modules, table())
}

fn syncs(patched: bool) -> ClassSyncs {
    let program = program();
    let patches = resolve_patches(&program, table());
    let class = program
        .find_class("pkg.models.toy.modeling_toy", "ToyForCausalLM")
        .unwrap();
    class_syncs(&program, table(), &patches, class, patched)
}

/// `(kind, path:line, function)` of the sites reached per layer (or per forward) under
/// `backend`, stock or patched.
fn reached(syncs: &ClassSyncs, backend: &str, patched: bool, per_layer: bool) -> Vec<String> {
    syncs
        .sites
        .iter()
        .filter(|row| {
            let reached = if patched { &row.patched } else { &row.stock };
            let list = if per_layer {
                &reached.per_layer
            } else {
                &reached.per_forward
            };
            list.iter().any(|b| b == backend)
        })
        .map(|row| {
            format!(
                "{} {}:{} {}",
                row.site.kind.name(),
                row.site.path,
                row.site.line,
                row.site.function
            )
        })
        .collect()
}

#[test]
fn per_forward_and_per_layer_sites_per_backend() {
    let s = syncs(false);
    assert_eq!(s.forward.as_deref(), Some("ToyForCausalLM.forward"));
    assert_eq!(s.layers, ["ToyLayer"]);
    // Once per forward, whatever the backend: the model's own check and the labels count.
    let forward = [
        "condition models/toy/modeling_toy.py:39 ToyModel.forward",
        "scalar models/toy/modeling_toy.py:54 ToyForCausalLM.forward",
    ];
    for backend in ["eager", "sdpa", "flash_attention_2", "flex_attention"] {
        assert_eq!(reached(&s, backend, false, false), forward, "{backend}");
    }
    // Once per layer: the experts' routing everywhere, then what the backend dispatches to.
    let experts = [
        "nonzero models/toy/modeling_toy.py:17 ToyExperts.forward",
        "condition models/toy/modeling_toy.py:18 ToyExperts.forward",
    ];
    assert_eq!(reached(&s, "eager", false, true), experts);
    assert_eq!(
        reached(&s, "sdpa", false, true),
        [
            "item integrations/sdpa_attention.py:4 sdpa_attention_forward",
            experts[0],
            experts[1]
        ]
    );
    // `paged|eager` goes through get_interface's prefix rule to the eager entry (the other
    // `paged|` spellings are deprecated aliases in transformers 5).
    assert_eq!(
        reached(&s, "paged|eager", false, true),
        reached(&s, "eager", false, true)
    );
    let flash = [
        "nonzero modeling_flash_attention_utils.py:3 prepare_fa_kwargs_from_position_ids",
        "condition modeling_flash_attention_utils.py:16 _flash_attention_forward",
        experts[0],
        experts[1],
    ];
    assert_eq!(reached(&s, "flash_attention_2", false, true), flash);
    // No mapping entry for flash_attention_4 or flex_attention: no attention edge.
    assert_eq!(reached(&s, "flash_attention_4", false, true), experts);
    // The guard of the sdpa site is kept; properties are never called.
    let item = s
        .sites
        .iter()
        .find(|r| r.site.function == "sdpa_attention_forward")
        .unwrap();
    assert_eq!(item.site.guard.as_deref(), Some("torch.jit.is_tracing()"));
    assert!(
        s.sites
            .iter()
            .all(|r| !r.site.function.contains("loss_function"))
    );
    assert_eq!(s.unresolved, ["self.vision_tower: AutoModel (not loaded)"]);
    // Not patched: the patched column is the stock one.
    assert!(s.patches.is_empty());
    assert!(s.sites.iter().all(|r| r.patched == r.stock));
}

#[test]
fn the_declared_patch_moves_the_varlen_metadata_to_the_forward() {
    let s = syncs(true);
    assert_eq!(s.patches, ["packing-varlen-metadata"]);
    // Flash (takes_varlen_kwargs): the packed check is gone, the metadata's nonzero runs
    // once per forward.
    assert_eq!(
        reached(&s, "flash_attention_2", true, true),
        [
            "nonzero models/toy/modeling_toy.py:17 ToyExperts.forward",
            "condition models/toy/modeling_toy.py:18 ToyExperts.forward",
        ]
    );
    assert_eq!(
        reached(&s, "flash_attention_2", true, false),
        [
            "nonzero modeling_flash_attention_utils.py:3 prepare_fa_kwargs_from_position_ids",
            "condition models/toy/modeling_toy.py:39 ToyModel.forward",
            "scalar models/toy/modeling_toy.py:54 ToyForCausalLM.forward",
        ]
    );
    // Backends without the capability are unchanged.
    assert_eq!(
        reached(&s, "sdpa", true, true),
        reached(&s, "sdpa", false, true)
    );
    let fa2 = s
        .totals
        .iter()
        .find(|t| t.backend == "flash_attention_2")
        .unwrap();
    assert_eq!((fa2.stock.per_forward, fa2.stock.per_layer), (2, 4));
    assert_eq!((fa2.patched.per_forward, fa2.patched.per_layer), (3, 2));
    let text = render_class(
        "ToyForCausalLM  models/toy/modeling_toy.py:48  patched",
        &s,
        table(),
    );
    assert!(text.contains("flash_attention_2 2+4 -> 3+2"), "{text}");
    assert!(
        text.contains("not followed: self.vision_tower: AutoModel (not loaded)"),
        "{text}"
    );
}
