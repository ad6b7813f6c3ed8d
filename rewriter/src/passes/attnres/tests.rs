//! Unit tests of the attnres pass: one per reason code, on inline Python, and the emitted
//! shape of the layer and the loop.

use super::layer::SlotNode;
use super::reason::REASONS;
use super::{EmitError, PASS, emit};
use crate::analyze::{LossResolution, analyze_class_with, module_classes};
use crate::parse::ParsedSource;

const MODEL: &str = r#"
    @merge_with_config_defaults
    @capture_outputs
    @auto_docstring
    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        hidden_states = self.embed_tokens(input_ids)
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=attention_mask,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states)
"#;

const LAYER: &str = r#"
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        # Self Attention
        hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask, **kwargs)
        hidden_states = residual + hidden_states

        # Fully Connected
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states
        return hidden_states
"#;

fn refused(model: &str, layer: &str) -> (&'static str, String) {
    match emit(model, layer, "layers") {
        Err(EmitError::Refused(r)) => (r.code, r.detail),
        Ok(e) => panic!("emitted:\n{}\n{}", e.model_forward, e.layer_forward),
        Err(EmitError::Failed(m)) => panic!("failed: {m}"),
    }
}

#[test]
fn llama_shape_is_emitted() {
    let e = emit(MODEL, LAYER, "layers").unwrap();
    assert_eq!(e.slots, vec![SlotNode::Add(0), SlotNode::Add(1)]);
    let m = &e.model_forward;
    assert!(
        m.starts_with("@merge_with_config_defaults\n@capture_outputs\ndef forward("),
        "{m}"
    );
    assert!(m.contains(
        "    attnres_sources = forward_rewrite.attnres.begin(self, hidden_states)\n    for decoder_layer in self.layers"
    ));
    assert!(m.contains("        hidden_states, *attnres_sources = decoder_layer(\n            hidden_states, *attnres_sources,\n"));
    assert!(m.contains(
        "        )\n    hidden_states = forward_rewrite.attnres.finish(self, hidden_states, attnres_sources)\n    hidden_states = self.norm(hidden_states)"
    ));
    let l = &e.layer_forward;
    assert!(
        l.contains("hidden_states: torch.Tensor, *attnres_sources,\n"),
        "{l}"
    );
    assert!(l.contains(
        "    hidden_states, attnres_sources = forward_rewrite.attnres.enter(self, hidden_states, attnres_sources)\n    residual = hidden_states\n"
    ));
    assert!(l.contains("    hidden_states, attnres_sources = forward_rewrite.attnres.add(self, 0, residual, hidden_states, attnres_sources)\n"));
    assert!(l.contains("    hidden_states, attnres_sources = forward_rewrite.attnres.add(self, 1, residual, hidden_states, attnres_sources)\n"));
    assert!(l.contains(
        "    return forward_rewrite.attnres.leave(self, hidden_states, attnres_sources)\n"
    ));
    // Comments stay where they were.
    assert!(l.contains("    # Self Attention\n") && l.contains("\n\n    # Fully Connected\n"));
    // The emitted layer is not rewritten twice.
    assert_eq!(refused(MODEL, l).0, "layer-signature");
}

#[test]
fn enumerate_loop_and_parallel_residual() {
    let model = MODEL.replace(
        "for decoder_layer in self.layers[: self.config.num_hidden_layers]:",
        "for i, decoder_layer in enumerate(self.layers):",
    );
    let layer = r#"
def forward(self, hidden_states, attention_mask=None, **kwargs):
    attn_output, _ = self.attention(self.input_layernorm(hidden_states), attention_mask=attention_mask)
    attn_output = self.post_attention_dropout(attn_output)
    if self.use_parallel_residual:
        mlp_output = self.mlp(self.post_attention_layernorm(hidden_states))
        hidden_states = mlp_output + attn_output + hidden_states
    else:
        attn_output = attn_output + hidden_states
        mlp_output = self.mlp(self.post_attention_layernorm(attn_output))
        hidden_states = mlp_output + attn_output
    return hidden_states
"#;
    let e = emit(&model, layer, "layers").unwrap();
    assert_eq!(
        e.slots,
        vec![SlotNode::If {
            test: Some("self.use_parallel_residual".into()),
            then: vec![SlotNode::Add(0)],
            orelse: vec![SlotNode::Add(0), SlotNode::Add(1)],
        }]
    );
    let l = &e.layer_forward;
    assert!(l.contains("hidden_states, attnres_sources = forward_rewrite.attnres.add(self, 0, hidden_states, (mlp_output) + (attn_output), attnres_sources)"), "{l}");
    assert!(l.contains("attn_output, attnres_sources = forward_rewrite.attnres.add(self, 0, hidden_states, attn_output, attnres_sources)"));
    assert!(l.contains("hidden_states, attnres_sources = forward_rewrite.attnres.add(self, 1, attn_output, mlp_output, attnres_sources)"));
    assert_eq!(
        super::layer::describe(&e.slots),
        "if self.use_parallel_residual: 1 else 2"
    );
}

#[test]
fn sandwich_norms_and_three_term_adds() {
    let layer = r#"
def forward(self, hidden_states, **kwargs):
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    attn, _ = self.self_attn(hidden_states)
    mlp = self.mlp(hidden_states)
    hidden_states = residual + attn + mlp
    return hidden_states
"#;
    let e = emit(MODEL, layer, "layers").unwrap();
    assert_eq!(e.slots, vec![SlotNode::Add(0)]);
    assert!(
        e.layer_forward
            .contains("add(self, 0, residual, (attn) + (mlp), attnres_sources)")
    );
}

#[test]
fn reason_cross_attention() {
    let layer = LAYER.replace(
        "attention_mask: torch.Tensor | None = None,",
        "attention_mask=None, encoder_hidden_states=None,",
    );
    assert_eq!(refused(MODEL, &layer).0, "cross-attention");
}

#[test]
fn reason_layer_signature() {
    let layer = LAYER.replace("**kwargs,\n    ) ->", "*args, **kwargs,\n    ) ->");
    assert_eq!(refused(MODEL, &layer).0, "layer-signature");
    let layer = LAYER.replace("attention_mask: torch", "*, attention_mask: torch");
    assert_eq!(refused(MODEL, &layer).0, "layer-signature");
}

#[test]
fn reason_no_residual() {
    let layer = "def forward(self, hidden_states):\n    hidden_states = self.mixer(self.norm(hidden_states))\n    return hidden_states\n";
    assert_eq!(refused(MODEL, layer).0, "no-residual");
}

#[test]
fn reason_residual_not_seen() {
    let layer = LAYER.replace(
        "        hidden_states = residual + hidden_states\n        return",
        "        residual += hidden_states\n        return",
    );
    assert_eq!(refused(MODEL, &layer).0, "residual-not-seen");
    let layer = LAYER.replace(
        "        hidden_states = residual + hidden_states\n        return",
        "        hidden_states += residual\n        return",
    );
    assert_eq!(refused(MODEL, &layer).0, "residual-not-seen");
    let layer = LAYER.replace(
        "        residual = hidden_states\n        hidden_states = self.input_layernorm",
        "        for block in self.blocks:\n            hidden_states = hidden_states + block(hidden_states)\n        residual = hidden_states\n        hidden_states = self.input_layernorm",
    );
    assert_eq!(refused(MODEL, &layer).0, "residual-not-seen");
}

#[test]
fn reason_stale_residual() {
    let layer = LAYER.replace(
        "        return hidden_states",
        "        hidden_states = hidden_states * residual.sigmoid()\n        return hidden_states",
    );
    let (code, detail) = refused(MODEL, &layer);
    assert_eq!(code, "stale-residual");
    assert!(detail.contains("`residual`"), "{detail}");
}

#[test]
fn stream_on_some_branches_only() {
    // Bloom's block: `residual` is the stream or the normed stream, then handed to a sublayer
    // that adds it inside: not a residual add the pass sees.
    let layer = r#"
def forward(self, hidden_states, alibi, attention_mask, **kwargs):
    layernorm_output = self.input_layernorm(hidden_states)
    if self.apply_residual_connection_post_layernorm:
        residual = layernorm_output
    else:
        residual = hidden_states
    attention_output, attn_weights = self.self_attention(layernorm_output, residual, alibi=alibi)
    return attention_output
"#;
    let (code, detail) = refused(MODEL, layer);
    assert_eq!(code, "residual-not-seen");
    assert!(
        detail.contains("`residual` holds the stream on some branches of an `if` only"),
        "{detail}"
    );
    // After a residual add it is an old stream value like any other.
    let layer = r#"
def forward(self, hidden_states, **kwargs):
    if self.flag:
        residual = hidden_states
    else:
        residual = self.norm(hidden_states)
    hidden_states = hidden_states + self.attn(hidden_states)
    hidden_states = self.mlp(residual)
    return hidden_states
"#;
    assert_eq!(refused(MODEL, layer).0, "stale-residual");
}

#[test]
fn reason_dynamic_sublayers() {
    let layer = r#"
def forward(self, hidden_states, mask=None):
    residual = hidden_states
    out = self.attn(self.norm(hidden_states))
    if mask is None:
        hidden_states = residual + out
    else:
        hidden_states = residual
    return hidden_states
"#;
    assert_eq!(refused(MODEL, layer).0, "dynamic-sublayers");
}

#[test]
fn reason_layer_return() {
    let layer = LAYER.replace("return hidden_states\n", "return hidden_states, None\n");
    assert_eq!(refused(MODEL, &layer).0, "layer-return");
}

#[test]
fn reason_uses_super() {
    let layer = LAYER.replace(
        "        residual = hidden_states\n        hidden_states = self.input_layernorm",
        "        super().check()\n        residual = hidden_states\n        hidden_states = self.input_layernorm",
    );
    assert_eq!(refused(MODEL, &layer).0, "uses-super");
}

#[test]
fn reason_no_layer_loop() {
    // Two loops over the layers.
    let model = MODEL.replace(
        "        hidden_states = self.norm(hidden_states)\n",
        "        for layer in self.layers:\n            layer.reset()\n        hidden_states = self.norm(hidden_states)\n",
    );
    assert_eq!(refused(&model, LAYER).0, "no-layer-loop");
    // More than the stream positionally.
    let model = MODEL.replace(
        "                hidden_states,\n",
        "                hidden_states,\n                attention_mask,\n",
    );
    assert_eq!(refused(&model, LAYER).0, "no-layer-loop");
    // Older style: the layer's outputs are a tuple.
    let model = MODEL.replace(
        "            hidden_states = decoder_layer(",
        "            layer_outputs = decoder_layer(",
    );
    assert_eq!(refused(&model, LAYER).0, "no-layer-loop");
}

// ---------------------------------------------------------------------------------------
// The scan's side: what the class builds, from the module.

const MODULE: &str = r#"
class ToyDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.self_attn = ToyAttention(config)
        self.mlp = ToyMLP(config)

LAYER_FORWARD

class ToyModel(ToyPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.layers = nn.ModuleList([ToyDecoderLayer(config, i) for i in range(config.num_hidden_layers)])

MODEL_FORWARD

class ToyForCausalLM(ToyPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.model = ToyModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids=None, labels=None, **kwargs):
        outputs = self.model(input_ids, **kwargs)
        logits = self.lm_head(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits)
"#;

fn scan_module(text: &str) -> crate::audit::PassReport {
    scan_text(&module_text(text))
}

/// The module with the forwards in place.
fn module_text(text: &str) -> String {
    text.replace("LAYER_FORWARD", &indent(LAYER.trim_start_matches('\n')))
        .replace("MODEL_FORWARD", &indent(MODEL.trim_start_matches('\n')))
}

fn scan_text(text: &str) -> crate::audit::PassReport {
    let classes = module_classes(text, "toy", "toy.py").unwrap();
    let chain: Vec<_> = classes
        .into_iter()
        .filter(|c| c.qualname == "ToyForCausalLM")
        .collect();
    let parsed = ParsedSource::parse(text).unwrap();
    let report = analyze_class_with(
        &chain,
        &LossResolution::Causal,
        Some(&parsed),
        None,
        &[&PASS],
    );
    report.passes["attnres"].clone()
}

/// The forwards in the constants are indented by four; class bodies need exactly that.
fn indent(text: &str) -> String {
    crate::hash::dedent(text)
        .lines()
        .map(|l| {
            if l.is_empty() {
                String::new()
            } else {
                format!("    {l}")
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn scan_reports_base_layer_and_adds() {
    let report = scan_module(MODULE);
    assert_eq!(report.verdict, "patched", "{report:?}");
    assert_eq!(report.extra["base"], "ToyModel");
    assert_eq!(report.extra["layer"], "ToyDecoderLayer");
    assert_eq!(report.extra["adds"], "2");
    assert!(!report.extra.contains_key("layers"), "{report:?}");
}

/// The toy module with its layers under `self.h` (GPT-2's name), looped over as GPT-2 does.
fn module_h() -> String {
    let text = module_text(MODULE)
        .replace(
            "        self.layers = nn.ModuleList(",
            "        self.h = nn.ModuleList(",
        )
        .replace(
            "for decoder_layer in self.layers[: self.config.num_hidden_layers]:",
            "for i, decoder_layer in enumerate(self.h):",
        );
    assert!(text.contains("self.h = nn.ModuleList(") && text.contains("enumerate(self.h)"));
    assert!(!text.contains("self.layers"));
    text
}

const MODEL_H: &str = r#"
    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        hidden_states = self.wte(input_ids)
        for i, block in enumerate(self.h):
            hidden_states = block(hidden_states, attention_mask=attention_mask, **kwargs)
        hidden_states = self.ln_f(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states)
"#;

#[test]
fn layers_under_another_name() {
    let report = scan_text(&module_h());
    assert_eq!(report.verdict, "patched", "{report:?}");
    assert_eq!(report.extra["base"], "ToyModel");
    assert_eq!(report.extra["layer"], "ToyDecoderLayer");
    assert_eq!(report.extra["layers"], "h");
    assert_eq!(report.extra["adds"], "2");
    let e = emit(MODEL_H, LAYER, "h").unwrap();
    assert!(
        e.model_forward.contains(
            "    attnres_sources = forward_rewrite.attnres.begin(self, hidden_states)\n    for i, block in enumerate(self.h):\n        hidden_states, *attnres_sources = block(hidden_states, *attnres_sources, attention_mask=attention_mask, **kwargs)\n    hidden_states = forward_rewrite.attnres.finish(self, hidden_states, attnres_sources)\n    hidden_states = self.ln_f(hidden_states)\n"
        ),
        "{}",
        e.model_forward
    );
    // The layer is emitted as it is under `self.layers`.
    assert_eq!(
        e.layer_forward,
        emit(MODEL, LAYER, "layers").unwrap().layer_forward
    );
    // The emitter follows the name it is given, not any loop over `self.<attr>`.
    let detail = match emit(MODEL_H, LAYER, "layers") {
        Err(EmitError::Refused(r)) if r.code == "no-layer-loop" => r.detail,
        other => panic!("{other:?}"),
    };
    assert!(detail.contains("0 loops over `self.layers`"), "{detail}");
    assert!(matches!(
        emit(MODEL, LAYER, "h"),
        Err(EmitError::Refused(r)) if r.code == "no-layer-loop"
    ));
}

#[test]
fn loop_attributes_of_a_forward() {
    let parsed =
        ParsedSource::parse(crate::hash::dedent(MODEL_H.trim_start_matches('\n'))).unwrap();
    let Some(ruff_python_ast::Stmt::FunctionDef(f)) = parsed.suite().first() else {
        panic!("not a function")
    };
    let attrs: Vec<String> = super::model::loop_attributes(f).into_iter().collect();
    assert_eq!(attrs, vec!["h".to_string()]);
    assert_eq!(super::loops_json(MODEL), r#"["layers"]"#);
    assert!(super::loops_json("x = 1").contains("error"));
}

#[test]
fn layer_list_rules_under_another_name() {
    // A ModuleList the forward does not loop over is no layer list.
    let text = module_h().replace(
        "for i, decoder_layer in enumerate(self.h):",
        "for i, decoder_layer in enumerate(self.blocks):",
    );
    assert_eq!(scan_text(&text).reason.as_deref(), Some("no-base-model"));
    // Two ModuleLists the forward loops over: which one holds the layers is not decided.
    let text = module_h()
        .replace(
            "        self.h = nn.ModuleList(",
            "        self.extra = nn.ModuleList([ToyDecoderLayer(config, 0)])\n        self.h = nn.ModuleList(",
        )
        .replace(
            "        hidden_states = self.norm(hidden_states)\n",
            "        for e in self.extra:\n            hidden_states = e(hidden_states)\n        hidden_states = self.norm(hidden_states)\n",
        );
    let report = scan_text(&text);
    assert_eq!(
        report.reason.as_deref(),
        Some("no-base-model"),
        "{report:?}"
    );
    // Assigned twice (in two branches): not one list.
    let text = module_h().replace(
        "        self.h = nn.ModuleList([ToyDecoderLayer(config, i) for i in range(config.num_hidden_layers)])\n",
        "        if config.flag:\n            self.h = nn.ModuleList([ToyDecoderLayer(config, i) for i in range(2)])\n        else:\n            self.h = nn.ModuleList([ToyOtherLayer(config, i) for i in range(2)])\n",
    );
    assert_eq!(scan_text(&text).reason.as_deref(), Some("no-base-model"));
    // Not a ModuleList call: not followed under another name.
    let text = module_h().replace(
        "        self.h = nn.ModuleList(",
        "        self.h = make_list(",
    );
    assert_eq!(scan_text(&text).reason.as_deref(), Some("no-base-model"));
    // Every refusal still applies under another name: two loops over `self.h`.
    let text = module_h().replace(
        "        hidden_states = self.norm(hidden_states)\n",
        "        for block in self.h:\n            block.reset()\n        hidden_states = self.norm(hidden_states)\n",
    );
    assert_eq!(scan_text(&text).reason.as_deref(), Some("no-layer-loop"));
    // ... and several layer classes.
    let text = module_h().replace(
        "[ToyDecoderLayer(config, i) for i in range(config.num_hidden_layers)]",
        "[ToyDecoderLayer(config, i) if i % 2 else ToyMambaLayer(config, i) for i in range(4)]",
    ) + "\nclass ToyMambaLayer:\n    pass\n";
    assert_eq!(scan_text(&text).reason.as_deref(), Some("hybrid-layers"));
    // ... and cross-attention (GPT-2's block).
    let text = module_h().replace(
        "attention_mask: torch.Tensor | None = None,\n",
        "attention_mask: torch.Tensor | None = None,\n        encoder_hidden_states=None,\n",
    );
    assert_eq!(scan_text(&text).reason.as_deref(), Some("cross-attention"));
}

#[test]
fn reason_encoder_decoder() {
    let text = MODULE.replace(
        "        self.model = ToyModel(config)\n",
        "        self.model = ToySeq2Seq(config)\n",
    ) + "\nclass ToySeq2Seq(ToyPreTrainedModel):\n    def __init__(self, config):\n        self.encoder = ToyModel(config)\n        self.decoder = ToyModel(config)\n";
    assert_eq!(
        scan_module(&text).reason.as_deref(),
        Some("encoder-decoder")
    );
}

#[test]
fn reason_no_base_model() {
    let text = MODULE.replace(
        "        self.model = ToyModel(config)\n",
        "        self.model = AutoModel.from_config(config)\n",
    );
    assert_eq!(scan_module(&text).reason.as_deref(), Some("no-base-model"));
}

#[test]
fn reason_hybrid_layers() {
    let two = MODULE.replace(
        "[ToyDecoderLayer(config, i) for i in range(config.num_hidden_layers)]",
        "[ToyDecoderLayer(config, i) if i % 2 else ToyMambaLayer(config, i) for i in range(4)]",
    ) + "\nclass ToyMambaLayer:\n    pass\n";
    assert_eq!(scan_module(&two).reason.as_deref(), Some("hybrid-layers"));
    let table = MODULE.replace(
        "[ToyDecoderLayer(config, i) for i in range(config.num_hidden_layers)]",
        "[LAYER_TYPES[t](config, i) for i, t in enumerate(config.layer_types)]",
    );
    assert_eq!(scan_module(&table).reason.as_deref(), Some("hybrid-layers"));
    let appended = MODULE.replace(
        "        self.layers = nn.ModuleList([ToyDecoderLayer(config, i) for i in range(config.num_hidden_layers)])\n",
        "        layers = []\n        for i in range(4):\n            layer_class = pick(i)\n            layers.append(layer_class(config, i))\n        self.layers = nn.ModuleList(layers)\n",
    );
    assert_eq!(
        scan_module(&appended).reason.as_deref(),
        Some("hybrid-layers")
    );
}

#[test]
fn layer_lists_are_not_vision_towers_and_layers_come_first() {
    // A vision tower's `self.layer` is not the decoder.
    let text = module_h()
        .replace("class ToyModel(", "class ToyVisionModel(")
        .replace(
            "self.model = ToyModel(config)",
            "self.model = ToyVisionModel(config)",
        );
    assert_eq!(scan_text(&text).reason.as_deref(), Some("no-base-model"));
    // A class with `self.layers` is followed as before, another's list notwithstanding.
    let text = module_text(MODULE).replace(
        "        self.lm_head = nn.Linear(",
        "        self.extra = ToyExtra(config)\n        self.lm_head = nn.Linear(",
    ) + "\nclass ToyExtra:\n    def __init__(self, config):\n        self.blocks = nn.ModuleList([ToyDecoderLayer(config, 0)])\n\n    def forward(self, x):\n        for b in self.blocks:\n            x = b(x)\n        return x\n";
    let report = scan_text(&text);
    assert_eq!(report.verdict, "patched", "{report:?}");
    assert_eq!(report.extra["base"], "ToyModel");
    // Nor a vision tower's `self.layers` when it is the only list found (HunYuanVL: its text
    // model is built where the search does not see it).
    let text = module_text(MODULE)
        .replace("class ToyModel(", "class ToyVisionTransformer(")
        .replace(
            "self.model = ToyModel(config)",
            "self.model = ToyVisionTransformer(config)",
        );
    assert_eq!(scan_text(&text).reason.as_deref(), Some("no-base-model"));
}

#[test]
fn reason_recurrent_layer() {
    let text = MODULE.replace(
        "        self.self_attn = ToyAttention(config)\n",
        "        self.mixer = ToyMambaMixer(config)\n        self.norm = ToyMambaRMSNorm(config)\n",
    );
    let report = scan_module(&text);
    assert_eq!(report.reason.as_deref(), Some("recurrent-layer"));
    assert!(report.detail.contains("ToyMambaMixer"), "{}", report.detail);
    // xLSTM: the block class is defined under `if is_xlstm_available():`, out of the
    // module's top-level classes; its name says what it is.
    let text = module_h().replace(
        "[ToyDecoderLayer(config, i) for i in range(config.num_hidden_layers)]",
        "[xLSTMBlock(config) for _ in range(config.num_blocks)]",
    );
    let report = scan_text(&text);
    assert_eq!(
        report.reason.as_deref(),
        Some("recurrent-layer"),
        "{report:?}"
    );
    assert!(
        report.detail.contains("ToyModel.h holds a xLSTMBlock"),
        "{}",
        report.detail
    );
}

#[test]
fn every_code_is_tested_here() {
    let this = include_str!("tests.rs");
    for (code, meaning) in REASONS {
        assert!(!meaning.is_empty());
        if *code == "name-conflict" {
            continue; // decided at run time (tests/test_attnres.py)
        }
        let test = format!("fn reason_{}()", code.replace('-', "_"));
        assert!(this.contains(&test), "no unit test `{test}`");
    }
}
