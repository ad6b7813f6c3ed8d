//! Unit tests of the packing pass: a small Llama-shaped module that is `guaranteed`, and for
//! every reason code a change that fails it (negative) and a nearby shape that still holds
//! (positive).

use std::collections::HashMap;

use super::{Code, PASS, REASONS};
use crate::analyze::{LossResolution, analyze_class_with, module_classes};
use crate::audit::PassReport;
use crate::parse::ParsedSource;
use crate::passes::Modules;

const MODULE: &str = "transformers.models.toy.modeling_toy";

/// A module the pass guarantees: `ToyForCausalLM` > `ToyModel` > `ToyDecoderLayer` >
/// `ToyAttention`.
const TOY: &str = r#"
import torch
from torch import nn

from ...masking_utils import create_causal_mask, create_sliding_window_causal_mask
from ...modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel


def eager_attention_forward(module, query, key, value, attention_mask, **kwargs):
    return query, None


class ToyRotaryEmbedding(nn.Module):
    def forward(self, x, position_ids):
        return x, x


class ToyMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.up = nn.Linear(4, 4)


class ToyAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config = config
        self.q_proj = nn.Linear(4, 4)

    def forward(self, hidden_states, position_embeddings, attention_mask, **kwargs):
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self, hidden_states, hidden_states, hidden_states, attention_mask, **kwargs
        )
        return attn_output, attn_weights


class ToyDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.self_attn = ToyAttention(config, layer_idx)
        self.mlp = ToyMLP(config)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, position_embeddings=None, **kwargs):
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        return self.mlp(hidden_states)


class ToyModel(PreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(10, 4)
        self.layers = nn.ModuleList([ToyDecoderLayer(config, i) for i in range(2)])
        self.rotary_emb = ToyRotaryEmbedding(config)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = torch.arange(inputs_embeds.shape[1]).unsqueeze(0)
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for decoder_layer in self.layers:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        return hidden_states


class ToyForCausalLM(PreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.model = ToyModel(config)
        self.lm_head = nn.Linear(4, 10, bias=False)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None, labels=None, **kwargs):
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits)
"#;

/// The program's other modules, by name (the scan's role in tests).
struct TestModules {
    modules: HashMap<String, ParsedSource>,
    classes: HashMap<String, String>,
}

impl TestModules {
    fn new(modules: &[(&str, &str)]) -> TestModules {
        let mut out = TestModules {
            modules: HashMap::new(),
            classes: HashMap::new(),
        };
        for (name, text) in modules {
            let parsed = ParsedSource::parse(*text).unwrap();
            for stmt in parsed.suite() {
                if let ruff_python_ast::Stmt::ClassDef(class) = stmt {
                    out.classes
                        .entry(class.name.to_string())
                        .or_insert_with(|| name.to_string());
                }
            }
            out.modules.insert(name.to_string(), parsed);
        }
        out
    }
}

impl Modules for TestModules {
    fn module(&self, name: &str) -> Option<&ParsedSource> {
        self.modules.get(name)
    }

    fn class_module(&self, class: &str) -> Option<&str> {
        self.classes.get(class).map(String::as_str)
    }
}

/// The packing report of `ToyForCausalLM` in `text`, with `others` as the program's other
/// modules (None: the caller gives no other modules, as the installer's binding).
fn run(text: &str, others: Option<&[(&str, &str)]>) -> PassReport {
    let classes = module_classes(text, MODULE, "models/toy/modeling_toy.py").unwrap();
    let chain: Vec<_> = classes
        .into_iter()
        .filter(|c| c.qualname == "ToyForCausalLM")
        .collect();
    let parsed = ParsedSource::parse(text).unwrap();
    let modules = others.map(|others| {
        let mut all = vec![(MODULE, text)];
        all.extend_from_slice(others);
        TestModules::new(&all)
    });
    let report = analyze_class_with(
        &chain,
        &LossResolution::Causal,
        Some(&parsed),
        modules.as_ref().map(|m| m as &dyn Modules),
        &[&PASS],
    );
    report.passes["packing"].clone()
}

fn packing(text: &str) -> PassReport {
    run(text, Some(&[]))
}

/// The module with each `(old, new)` replaced (each `old` must occur).
fn edit(text: &str, edits: &[(&str, &str)]) -> String {
    let mut out = text.to_string();
    for (old, new) in edits {
        assert!(out.contains(old), "the template lacks {old:?}");
        out = out.replacen(old, new, 1);
    }
    out
}

fn paths(report: &PassReport) -> Vec<String> {
    report.extra["paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect()
}

#[track_caller]
fn assert_guaranteed(report: &PassReport) {
    assert_eq!(
        (report.verdict.as_str(), report.reason.as_deref()),
        ("guaranteed", None),
        "{}",
        report.detail
    );
    assert_eq!(paths(report), ["mask", "varlen"]);
}

#[track_caller]
fn assert_refused(report: &PassReport, code: Code) {
    assert_eq!(
        (report.verdict.as_str(), report.reason.as_deref()),
        ("refused", Some(code.code())),
        "{}",
        report.detail
    );
    assert!(paths(report).is_empty());
}

/// Guaranteed on the mask path only, the varlen path refused for `code`.
#[track_caller]
fn assert_mask_only(report: &PassReport, code: Code) {
    assert_eq!(
        (report.verdict.as_str(), report.reason.as_deref()),
        ("guaranteed", Some(code.code())),
        "{}",
        report.detail
    );
    assert_eq!(paths(report), ["mask"]);
}

#[test]
fn the_toy_model_is_guaranteed_on_both_paths() {
    let report = packing(TOY);
    assert_guaranteed(&report);
    assert_eq!(report.detail, "ToyModel > ToyDecoderLayer > ToyAttention");
    // The installer's binding gives only the module: the same verdict.
    assert_guaranteed(&run(TOY, None));
}

#[test]
fn reasons_table_follows_the_codes() {
    assert_eq!(REASONS.len(), Code::ALL.len());
    for (i, code) in Code::ALL.iter().enumerate() {
        assert_eq!(*code as usize, i);
        assert!(code.code().starts_with("packing-"));
    }
}

#[test]
fn a_class_the_fused_loss_pass_refuses_is_not_applicable() {
    let text = edit(
        TOY,
        &[(
            "loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)",
            "loss = my_loss(logits, labels)",
        )],
    );
    let report = packing(&text);
    assert_eq!(report.verdict, "not-applicable");
    assert_eq!(report.reason, None);
    assert!(paths(&report).is_empty());
}

// packing-no-position-ids

#[test]
fn no_position_ids_parameter_or_not_passed_is_refused() {
    let no_param = edit(
        TOY,
        &[(
            "position_ids=None, past_key_values=None, inputs_embeds=None, labels=None",
            "past_key_values=None, inputs_embeds=None, labels=None",
        )],
    );
    assert_refused(&packing(&no_param), Code::NoPositionIds);
    let not_passed = edit(
        TOY,
        &[(
            "            position_ids=position_ids,\n            past_key_values=past_key_values,\n            inputs_embeds",
            "            past_key_values=past_key_values,\n            inputs_embeds",
        )],
    );
    assert_refused(&packing(&not_passed), Code::NoPositionIds);
    let changed = edit(
        TOY,
        &[(
            "        outputs = self.model(\n",
            "        position_ids = position_ids + 1\n        outputs = self.model(\n",
        )],
    );
    assert_refused(&packing(&changed), Code::NoPositionIds);
}

#[test]
fn a_default_for_missing_position_ids_is_fine() {
    let text = edit(
        TOY,
        &[(
            "        outputs = self.model(\n",
            "        if position_ids is None:\n            position_ids = torch.arange(4)[None]\n        outputs = self.model(\n",
        )],
    );
    assert_guaranteed(&packing(&text));
}

// packing-kwargs-not-forwarded

#[test]
fn kwargs_not_passed_to_the_base_model_leaves_the_mask_path() {
    let text = edit(
        TOY,
        &[(
            "            inputs_embeds=inputs_embeds,\n            **kwargs,\n        )\n        hidden_states = outputs",
            "            inputs_embeds=inputs_embeds,\n        )\n        hidden_states = outputs",
        )],
    );
    assert_mask_only(&packing(&text), Code::KwargsNotForwarded);
}

#[test]
fn kwargs_passed_to_the_base_model_hold() {
    // The same call with its keywords in another order.
    let text = edit(
        TOY,
        &[(
            "            input_ids=input_ids,\n            attention_mask=attention_mask,\n",
            "            attention_mask=attention_mask,\n            input_ids=input_ids,\n",
        )],
    );
    assert_guaranteed(&packing(&text));
}

// packing-base-model-dynamic

/// A vision-language shaped module: `ToyForCausalLM.model` is `ToyWrapper`, whose
/// `language_model` comes from `build`.
fn wrapper(build: &str) -> String {
    let wrapper = format!(
        r#"
from ..auto import AutoModel
from .configuration_toy import ToyConfig


class ToyWrapper(PreTrainedModel):
    def __init__(self, config: ToyConfig):
        super().__init__(config)
        self.language_model = {build}

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None, **kwargs):
        return self.language_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
"#
    );
    edit(
        TOY,
        &[
            (
                "class ToyForCausalLM(",
                &format!("{wrapper}\n\nclass ToyForCausalLM("),
            ),
            (
                "self.model = ToyModel(config)",
                "self.model = ToyWrapper(config)",
            ),
        ],
    )
}

const CONFIG: &str = r#"
class ToyConfig(PreTrainedConfig):
    model_type = "toy"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="texty"),
    }
"#;

const AUTO: &str = r#"
MODEL_MAPPING_NAMES = OrderedDict(
    [
        ("llama", "LlamaModel"),
        ("texty", ("ToyModel", "ToyOtherModel")),
    ]
)
"#;

#[test]
fn an_auto_built_base_model_is_dynamic() {
    let text = wrapper("AutoModel.from_config(config.text_config)");
    // Without the configuration: known only at run time.
    let report = run(&text, None);
    assert_eq!(report.verdict, "dynamic", "{}", report.detail);
    assert_eq!(
        report.reason.as_deref(),
        Some(Code::BaseModelDynamic.code())
    );
    assert_eq!(paths(&report), ["mask", "varlen"]);
    // With it: the default text model (ToyModel) is checked, and holds: still dynamic.
    let others = [
        ("transformers.models.toy.configuration_toy", CONFIG),
        ("transformers.models.auto.modeling_auto", AUTO),
    ];
    let report = run(&text, Some(&others));
    assert_eq!(report.verdict, "dynamic", "{}", report.detail);
    assert!(
        report.detail.contains("by default texty: ToyModel"),
        "{}",
        report.detail
    );
}

#[test]
fn an_auto_built_base_model_whose_default_fails_is_refused() {
    let text = wrapper("AutoModel.from_config(config.text_config)");
    let text = edit(
        &text,
        &[(
            "        self.mlp = ToyMLP(config)",
            "        self.mixer = ToyMambaMixer(config)",
        )],
    );
    let others = [
        ("transformers.models.toy.configuration_toy", CONFIG),
        ("transformers.models.auto.modeling_auto", AUTO),
    ];
    let report = run(&text, Some(&others));
    assert_refused(&report, Code::RecurrentLayers);
    assert!(
        report
            .detail
            .starts_with("the default text_config model ToyModel (texty): "),
        "{}",
        report.detail
    );
}

#[test]
fn a_statically_built_wrapped_model_is_guaranteed() {
    let report = packing(&wrapper("ToyModel(config)"));
    assert_guaranteed(&report);
    assert_eq!(
        report.detail,
        "ToyWrapper > ToyModel > ToyDecoderLayer > ToyAttention"
    );
    // `language_model = ToyModel._from_config(config)` then `self.language_model = language_model`.
    let text = wrapper("language_model").replacen(
        "        self.language_model = language_model",
        "        language_model = ToyModel._from_config(config)\n        self.language_model = language_model",
        1,
    );
    assert_guaranteed(&packing(&text));
}

// packing-mask-not-from-masking-utils

#[test]
fn a_legacy_or_missing_mask_is_refused() {
    let legacy = edit(
        TOY,
        &[(
            "        causal_mask = create_causal_mask(",
            "        causal_mask = _prepare_4d_causal_attention_mask(attention_mask)\n        unused = create_causal_mask(",
        )],
    );
    assert_refused(&packing(&legacy), Code::MaskNotFromMaskingUtils);
    let raw = edit(
        TOY,
        &[(
            "attention_mask=causal_mask,",
            "attention_mask=attention_mask,",
        )],
    );
    let report = packing(&raw);
    assert_refused(&report, Code::MaskNotFromMaskingUtils);
    assert!(
        report.detail.contains("the caller's attention_mask"),
        "{}",
        report.detail
    );
    let none = edit(
        TOY,
        &[("attention_mask=causal_mask,", "attention_mask=None,")],
    );
    assert_refused(&packing(&none), Code::MaskNotFromMaskingUtils);
}

#[test]
fn masks_by_layer_type_and_prepared_dicts_hold() {
    let mapping = edit(
        TOY,
        &[
            (
                "        causal_mask = create_causal_mask(",
                "        if not isinstance(causal_mask_mapping := attention_mask, dict):\n            mask_kwargs = {\"config\": self.config, \"position_ids\": position_ids}\n            causal_mask_mapping = {\n                \"full_attention\": create_causal_mask(**mask_kwargs),\n                \"sliding_attention\": create_sliding_window_causal_mask(**mask_kwargs),\n            }\n        causal_mask = create_causal_mask(",
            ),
            (
                "attention_mask=causal_mask,",
                "attention_mask=causal_mask_mapping[decoder_layer.attention_type],",
            ),
        ],
    );
    assert_guaranteed(&packing(&mapping));
    // A local alias of the builders, and a prepared dict read under isinstance.
    let alias = edit(
        TOY,
        &[
            (
                "        causal_mask = create_causal_mask(",
                "        mask_function = create_causal_mask if self.config.sliding_window is None else create_sliding_window_causal_mask\n        causal_mask = mask_function(",
            ),
            (
                "        hidden_states = inputs_embeds\n",
                "        if isinstance(attention_mask, dict):\n            causal_mask = attention_mask[\"full_attention\"]\n        hidden_states = inputs_embeds\n",
            ),
        ],
    );
    assert_guaranteed(&packing(&alias));
}

// packing-mask-without-position-ids

#[test]
fn a_mask_built_without_position_ids_is_refused() {
    let text = edit(
        TOY,
        &[(
            "            past_key_values=past_key_values,\n            position_ids=position_ids,\n        )",
            "            past_key_values=past_key_values,\n        )",
        )],
    );
    assert_refused(&packing(&text), Code::MaskWithoutPositionIds);
    let other = edit(
        TOY,
        &[(
            "            past_key_values=past_key_values,\n            position_ids=position_ids,\n        )",
            "            past_key_values=past_key_values,\n            position_ids=text_position_ids,\n        )",
        )],
    );
    assert_refused(&packing(&other), Code::MaskWithoutPositionIds);
}

#[test]
fn position_ids_in_the_mask_kwargs_dict_hold() {
    let text = edit(
        TOY,
        &[(
            "        causal_mask = create_causal_mask(\n            config=self.config,\n            inputs_embeds=inputs_embeds,\n            attention_mask=attention_mask,\n            past_key_values=past_key_values,\n            position_ids=position_ids,\n        )",
            "        mask_kwargs = {\"config\": self.config, \"inputs_embeds\": inputs_embeds}\n        mask_kwargs[\"position_ids\"] = position_ids\n        sliding_kwargs = mask_kwargs.copy()\n        causal_mask = create_causal_mask(**mask_kwargs)\n        other = create_sliding_window_causal_mask(**sliding_kwargs)",
        )],
    );
    assert_guaranteed(&packing(&text));
}

// packing-default-mask

#[test]
fn a_default_mask_is_refused() {
    let text = edit(
        TOY,
        &[(
            "        causal_mask = create_causal_mask(",
            "        if attention_mask is None:\n            attention_mask = torch.ones(inputs_embeds.shape[:2])\n        causal_mask = create_causal_mask(",
        )],
    );
    assert_refused(&packing(&text), Code::DefaultMask);
}

#[test]
fn a_ones_tensor_under_another_name_is_fine() {
    let text = edit(
        TOY,
        &[(
            "        causal_mask = create_causal_mask(",
            "        position_attention_mask = torch.ones(inputs_embeds.shape[:2])\n        causal_mask = create_causal_mask(",
        )],
    );
    assert_guaranteed(&packing(&text));
}

// packing-mask-modified

#[test]
fn a_changed_mask_or_a_block_overlay_is_refused() {
    let alibi = edit(
        TOY,
        &[(
            "        hidden_states = inputs_embeds\n",
            "        causal_mask = causal_mask + self.bias\n        hidden_states = inputs_embeds\n",
        )],
    );
    assert_refused(&packing(&alibi), Code::MaskModified);
    let sliced = edit(
        TOY,
        &[(
            "            hidden_states = decoder_layer(",
            "            hidden_states, causal_mask = self._slice(hidden_states, causal_mask)\n            hidden_states = decoder_layer(",
        )],
    );
    assert_refused(&packing(&sliced), Code::MaskModified);
    let blocks = edit(
        TOY,
        &[(
            "            position_ids=position_ids,\n        )\n        hidden_states",
            "            position_ids=position_ids,\n            block_sequence_ids=torch.where(token_type_ids == 0, 0, -1),\n        )\n        hidden_states",
        )],
    );
    assert_refused(&packing(&blocks), Code::MaskModified);
}

#[test]
fn an_or_mask_function_and_a_dict_lookup_are_fine() {
    let text = edit(
        TOY,
        &[
            (
                "            position_ids=position_ids,\n        )\n        hidden_states",
                "            position_ids=position_ids,\n            or_mask_function=bidirectional_images(token_type_ids),\n        )\n        masks = {\"full_attention\": causal_mask}\n        hidden_states",
            ),
            (
                "attention_mask=causal_mask,",
                "attention_mask=masks.get(decoder_layer.attention_type),",
            ),
        ],
    );
    assert_guaranteed(&packing(&text));
}

// packing-kwargs-not-to-attention

#[test]
fn kwargs_not_reaching_the_attention_leave_the_mask_path() {
    let layer = edit(
        TOY,
        &[(
            "                position_embeddings=position_embeddings,\n                **kwargs,\n",
            "                position_embeddings=position_embeddings,\n",
        )],
    );
    assert_mask_only(&packing(&layer), Code::KwargsNotToAttention);
    let attention = edit(
        TOY,
        &[(
            "            position_embeddings=position_embeddings,\n            **kwargs,\n        )\n        return self.mlp",
            "            position_embeddings=position_embeddings,\n        )\n        return self.mlp",
        )],
    );
    assert_mask_only(&packing(&attention), Code::KwargsNotToAttention);
    let function = edit(
        TOY,
        &[(
            "hidden_states, attention_mask, **kwargs\n        )",
            "hidden_states, attention_mask\n        )",
        )],
    );
    assert_mask_only(&packing(&function), Code::KwargsNotToAttention);
}

#[test]
fn kwargs_through_a_gradient_checkpointing_call_hold() {
    let text = edit(
        TOY,
        &[(
            "            hidden_states = decoder_layer(\n",
            "            if self.gradient_checkpointing:\n                hidden_states = self._gradient_checkpointing_func(decoder_layer.__call__, hidden_states, causal_mask, position_ids, position_embeddings, **kwargs)\n            hidden_states = decoder_layer(\n",
        )],
    );
    assert_guaranteed(&packing(&text));
}

// packing-attention-not-dispatched

#[test]
fn an_attention_calling_sdpa_itself_leaves_the_mask_path() {
    let text = edit(
        TOY,
        &[(
            "        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(\n            self.config._attn_implementation, eager_attention_forward\n        )",
            "        attention_interface = torch.nn.functional.scaled_dot_product_attention",
        )],
    );
    assert_mask_only(&packing(&text), Code::AttentionNotDispatched);
}

#[test]
fn the_older_dispatch_by_subscript_holds() {
    let text = edit(
        TOY,
        &[(
            "        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(\n            self.config._attn_implementation, eager_attention_forward\n        )",
            "        attention_interface = eager_attention_forward\n        if self.config._attn_implementation != \"eager\":\n            attention_interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]",
        )],
    );
    assert_guaranteed(&packing(&text));
}

// packing-recurrent-layers

#[test]
fn a_recurrent_mixer_is_refused() {
    let mixer = edit(
        TOY,
        &[(
            "        self.mlp = ToyMLP(config)",
            "        self.linear_attn = ToyGatedDeltaNet(config)",
        )],
    );
    assert_refused(&packing(&mixer), Code::RecurrentLayers);
    // Two levels down: the MLP holds a causal convolution.
    let conv = edit(
        TOY,
        &[(
            "        self.up = nn.Linear(4, 4)",
            "        self.conv = nn.Conv1d(4, 4, 3)",
        )],
    );
    assert_refused(&packing(&conv), Code::RecurrentLayers);
    let layer_type = edit(
        TOY,
        &[(
            "        hidden_states, _ = self.self_attn(",
            "        if self.layer_type == \"linear_attention\":\n            hidden_states = self.recurrence(hidden_states)\n        hidden_states, _ = self.self_attn(",
        )],
    );
    assert_refused(&packing(&layer_type), Code::RecurrentLayers);
    let kernel = edit(
        TOY,
        &[(
            "def eager_attention_forward(",
            "@use_kernel_func_from_hub_with_fallback(\"causal_conv1d_fn\", \"causal_conv1d\")\ndef conv_fn(x):\n    return x\n\n\ndef eager_attention_forward(",
        )],
    );
    assert_refused(&packing(&kernel), Code::RecurrentLayers);
}

#[test]
fn attention_layer_types_and_a_docstring_mention_are_fine() {
    let text = edit(
        TOY,
        &[
            (
                "        hidden_states, _ = self.self_attn(",
                "        if self.layer_type == \"sliding_attention\":\n            hidden_states = hidden_states * 1\n        hidden_states, _ = self.self_attn(",
            ),
            (
                "class ToyMLP(nn.Module):\n",
                "class ToyMLP(nn.Module):\n    \"\"\"No causal_conv1d kernel here, nor a Conv1D linear.\"\"\"\n",
            ),
        ],
    );
    assert_guaranteed(&packing(&text));
}

// packing-positions-not-from-position-ids

#[test]
fn positions_not_from_position_ids_are_refused() {
    let cache = edit(
        TOY,
        &[(
            "self.rotary_emb(hidden_states, position_ids)",
            "self.rotary_emb(hidden_states, cache_position)",
        )],
    );
    assert_refused(&packing(&cache), Code::PositionsNotFromPositionIds);
    let alibi = edit(
        TOY,
        &[(
            "        hidden_states = inputs_embeds\n",
            "        alibi = build_alibi_tensor(attention_mask, 4)\n        hidden_states = inputs_embeds\n",
        )],
    );
    assert_refused(&packing(&alibi), Code::PositionsNotFromPositionIds);
}

#[test]
fn learned_positions_from_position_ids_hold() {
    let text = edit(
        TOY,
        &[
            (
                "        self.rotary_emb = ToyRotaryEmbedding(config)",
                "        self.wpe = nn.Embedding(16, 4)",
            ),
            (
                "        position_embeddings = self.rotary_emb(hidden_states, position_ids)",
                "        position_embeddings = self.wpe(position_ids)",
            ),
        ],
    );
    assert_guaranteed(&packing(&text));
}

// packing-multimodal-positions

#[test]
fn multimodal_positions_are_refused() {
    let text = edit(
        TOY,
        &[(
            "        outputs = self.model(\n",
            "        if pixel_values is not None:\n            position_ids, rope_deltas = self.model.get_rope_index(input_ids, image_grid_thw)\n        outputs = self.model(\n",
        )],
    );
    // The class's forward changes position_ids too: both codes, the first one leads.
    let report = packing(&text);
    assert_refused(&report, Code::NoPositionIds);
    assert!(
        report.detail.contains(Code::MultimodalPositions.code()),
        "{}",
        report.detail
    );
    let rotary = edit(
        TOY,
        &[(
            "class ToyRotaryEmbedding(nn.Module):\n",
            "class ToyRotaryEmbedding(nn.Module):\n    mrope_section = [16, 24, 24]\n",
        )],
    );
    assert_refused(&packing(&rotary), Code::MultimodalPositions);
}

#[test]
fn a_rotary_embedding_by_layer_type_holds() {
    let text = edit(
        TOY,
        &[(
            "self.rotary_emb(hidden_states, position_ids)",
            "self.rotary_emb(hidden_states, position_ids, \"full_attention\")",
        )],
    );
    assert_guaranteed(&packing(&text));
}

// packing-cross-attention

#[test]
fn encoder_states_reaching_the_layers_are_refused() {
    let text = edit(
        TOY,
        &[(
            "                position_ids=position_ids,\n                position_embeddings",
            "                position_ids=position_ids,\n                encoder_hidden_states=encoder_hidden_states,\n                position_embeddings",
        )],
    );
    assert_refused(&packing(&text), Code::CrossAttention);
}

#[test]
fn the_forwards_own_encoder_states_passed_down_hold() {
    // GPT-2 / GPT-BigCode: None in a decoder-only call; the run time refuses a packed call
    // that passes them.
    let text = edit(
        TOY,
        &[
            (
                "position_ids=None, past_key_values=None, inputs_embeds=None, **kwargs):",
                "position_ids=None, past_key_values=None, inputs_embeds=None, encoder_hidden_states=None, **kwargs):",
            ),
            (
                "                position_ids=position_ids,\n                position_embeddings",
                "                position_ids=position_ids,\n                encoder_hidden_states=encoder_hidden_states,\n                position_embeddings",
            ),
        ],
    );
    assert_guaranteed(&packing(&text));
    let computed = edit(
        &text,
        &[(
            "encoder_hidden_states=encoder_hidden_states,\n",
            "encoder_hidden_states=self.embed_tokens(input_ids),\n",
        )],
    );
    assert_refused(&packing(&computed), Code::CrossAttention);
}

#[test]
fn no_encoder_states_is_fine() {
    let text = edit(
        TOY,
        &[(
            "                position_ids=position_ids,\n                position_embeddings",
            "                position_ids=position_ids,\n                encoder_hidden_states=None,\n                position_embeddings",
        )],
    );
    assert_guaranteed(&packing(&text));
}

#[test]
fn a_linear_layer_list_is_not_a_decoder_layer_loop() {
    let text = edit(
        TOY,
        &[
            (
                "        self.rotary_emb = ToyRotaryEmbedding(config)",
                "        self.rotary_emb = ToyRotaryEmbedding(config)\n        self.projections = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])",
            ),
            (
                "        hidden_states = inputs_embeds\n",
                "        hidden_states = inputs_embeds\n        for projection in self.projections:\n            hidden_states = projection(hidden_states)\n",
            ),
        ],
    );
    assert_guaranteed(&packing(&text));
}
