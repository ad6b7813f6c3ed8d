//! Unit tests of the fused-loss pass on small inline sources: every reason code and every
//! lowered transform, positive and negative.

use crate::analyze::{ClassSource, LossResolution, analyze_class};
use crate::audit::{ClassReport, TransformKind, Verdict};
use crate::reason::Reason;

pub(super) const INIT: &str = "    def __init__(self, config):
        super().__init__(config)
        self.model = ToyModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
";

pub(super) const TAIL: &str = "        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
";

/// A toy class whose forward ends with `tail` (indented 8) then returns loss and logits.
pub(super) fn toy(init: &str, tail: &str) -> String {
    format!(
        "class ToyForCausalLM(ToyPreTrainedModel, GenerationMixin):
{init}
    @can_return_tuple
    @auto_docstring
    def forward(self, input_ids=None, labels=None, logits_to_keep=0, **kwargs):
        outputs = self.model(input_ids, **kwargs)
        hidden_states = outputs.last_hidden_state
{tail}
        return CausalLMOutputWithPast(loss=loss, logits=logits)
"
    )
}

pub(super) fn source(text: &str) -> ClassSource {
    ClassSource {
        qualname: "ToyForCausalLM".into(),
        module: "transformers.models.toy.modeling_toy".into(),
        path: "models/toy/modeling_toy.py".into(),
        line: 10,
        source: text.to_string(),
    }
}

pub(super) fn analyze(text: &str) -> ClassReport {
    analyze_class(&[source(text)], &LossResolution::Causal)
}

pub(super) fn with_tail(tail: &str) -> ClassReport {
    analyze(&toy(INIT, tail))
}

#[track_caller]
pub(super) fn assert_refused(report: &ClassReport, reason: Reason) {
    assert_eq!(
        report.reason,
        Some(reason),
        "detail: {}\n{:?}",
        report.detail,
        report.patched_forward
    );
    assert_eq!(
        report.verdict,
        if reason.is_failure() {
            Verdict::Failed
        } else {
            Verdict::Refused
        }
    );
    assert!(report.patched_forward.is_none());
}

#[track_caller]
pub(super) fn assert_patched(report: &ClassReport) -> String {
    assert_eq!(
        report.verdict,
        Verdict::Patched,
        "{:?}: {}",
        report.reason,
        report.detail
    );
    assert_eq!(report.reason, None);
    let patched = report.patched_forward.clone().expect("patched forward");
    assert_idempotent(&patched);
    patched
}

/// Put a patched forward back into a class (re-indented) and analyse it again.
#[track_caller]
pub(super) fn assert_idempotent(patched: &str) {
    let body: String = patched
        .lines()
        .map(|l| {
            if l.is_empty() {
                "\n".to_string()
            } else {
                format!("    {l}\n")
            }
        })
        .collect();
    let class = format!("class ToyForCausalLM(ToyPreTrainedModel):\n{INIT}\n{body}");
    let again = analyze(&class);
    assert_eq!(
        again.reason,
        Some(Reason::AlreadyPatched),
        "{}",
        again.detail
    );
}

pub(super) fn kinds(report: &ClassReport) -> Vec<(TransformKind, String)> {
    report
        .transforms
        .iter()
        .map(|t| (t.kind, t.expr.clone()))
        .collect()
}

// ---- positive cases ------------------------------------------------------------------

#[test]
fn canonical_keyword_form_is_patched_exactly() {
    let report = with_tail(TAIL);
    let patched = assert_patched(&report);
    assert_eq!(report.head.as_deref(), Some("lm_head"));
    assert_eq!(report.head_bias, Some(false));
    assert!(report.transforms.is_empty());
    assert_eq!(report.forward_owner.as_deref(), Some("ToyForCausalLM"));
    assert_eq!(report.forward_line, Some(10 + 6));
    assert_eq!(
        patched,
        "@forward_rewrite.tuple_guard
@can_return_tuple
def forward(self, input_ids=None, labels=None, logits_to_keep=0, **kwargs):
    outputs = self.model(input_ids, **kwargs)
    hidden_states = outputs.last_hidden_state
    if labels is not None and forward_rewrite.fuses(self, self.lm_head, self.config.vocab_size):
        # forward-rewrite: fused lm_head + ForCausalLMLoss; logits are not materialised
        loss = forward_rewrite.fused_lm_head_loss(
            hidden_states,
            self.lm_head,
            labels,
            vocab_size=self.config.vocab_size,
            **forward_rewrite.loss_kwargs(kwargs),
        )
        logits = None
    else:
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

    return CausalLMOutputWithPast(loss=loss, logits=logits)
"
    );
}

#[test]
fn positional_arguments_and_4_57_slice() {
    let report = with_tail(
        "        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, kwargs.get(\"num_items_in_batch\"), -100, **kwargs)
",
    );
    let patched = assert_patched(&report);
    assert!(
        patched.contains("            hidden_states[:, slice_indices, :],\n"),
        "{patched}"
    );
    assert!(patched.contains("vocab_size=self.vocab_size,\n"));
    assert!(patched.contains("num_items_in_batch=kwargs.get(\"num_items_in_batch\"),\n"));
    assert!(patched.contains("ignore_index=-100,\n"));
}

#[test]
fn explicit_loss_keywords_without_splat() {
    let report = with_tail(
        "        logits = self.lm_head(hidden_states).float()
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits,
                labels,
                vocab_size=self.config.vocab_size,
                num_items_in_batch=kwargs.get(\"num_items_in_batch\"),
                shift_labels=labels,
            )
",
    );
    let patched = assert_patched(&report);
    assert!(patched.contains("shift_labels=labels,\n"));
    assert!(
        !patched.contains("loss_kwargs"),
        "no splat in the source, none emitted"
    );
}

#[test]
fn casts_around_the_head_call() {
    for head in [
        "self.lm_head(hidden_states).float()",
        "self.lm_head(hidden_states).contiguous()",
        "self.lm_head(hidden_states.to(self.lm_head.weight.dtype)).float()",
    ] {
        let report = with_tail(&TAIL.replace("self.lm_head(hidden_states)", head));
        assert_patched(&report);
    }
}

#[test]
fn gemma_conditional_softcap() {
    let report = with_tail(
        "        logits = self.lm_head(hidden_states)
        if self.config.final_logit_softcapping is not None:
            logits = logits / self.config.final_logit_softcapping
            logits = torch.tanh(logits)
            logits = logits * self.config.final_logit_softcapping

        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
",
    );
    let patched = assert_patched(&report);
    assert_eq!(
        kinds(&report),
        [(
            TransformKind::Softcap,
            "self.config.final_logit_softcapping".to_string()
        )]
    );
    assert!(patched.contains("logit_softcapping=self.config.final_logit_softcapping,\n"));
}

#[test]
fn walrus_softcap_passes_the_value() {
    let report = with_tail(
        "        logits = self.lm_head(hidden_states)
        if (final_logit_softcapping := self.config.get_text_config().final_logit_softcapping) is not None:
            logits = logits / final_logit_softcapping
            logits = torch.tanh(logits)
            logits = logits * final_logit_softcapping
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
",
    );
    assert_patched(&report);
    assert_eq!(
        kinds(&report),
        [(
            TransformKind::Softcap,
            "self.config.get_text_config().final_logit_softcapping".to_string()
        )]
    );
}

#[test]
fn one_line_softcap_with_a_helper_binding() {
    let report = with_tail(
        "        logits = self.lm_head(hidden_states)
        cap = self.config.logits_soft_cap
        logits = nn.functional.tanh(logits / cap) * cap
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
",
    );
    assert_patched(&report);
    assert_eq!(
        kinds(&report),
        [(
            TransformKind::Softcap,
            "self.config.logits_soft_cap".to_string()
        )]
    );
}

#[test]
fn cohere_multiply_and_granite_divide() {
    let report = with_tail(&TAIL.replace(
        "        loss = None\n",
        "        logits = logits * self.logit_scale  # main diff from Llama\n        loss = None\n",
    ));
    assert_patched(&report);
    assert_eq!(
        kinds(&report),
        [(TransformKind::ScaleMultiply, "self.logit_scale".to_string())]
    );

    let report = with_tail(&TAIL.replace(
        "        loss = None\n",
        "        logits = logits / self.config.logits_scaling\n        loss = None\n",
    ));
    let patched = assert_patched(&report);
    assert_eq!(
        kinds(&report),
        [(
            TransformKind::ScaleDivide,
            "self.config.logits_scaling".to_string()
        )]
    );
    assert!(patched.contains("logit_scale_divide=self.config.logits_scaling,\n"));
}

#[test]
fn augmented_scales_and_inline_head_scale() {
    let report = with_tail(&TAIL.replace(
        "        loss = None\n",
        "        logits *= self.logit_scale\n        loss = None\n",
    ));
    assert_patched(&report);
    assert_eq!(
        kinds(&report),
        [(TransformKind::ScaleMultiply, "self.logit_scale".to_string())]
    );
    let report = with_tail(&TAIL.replace(
        "        loss = None\n",
        "        logits /= self.config.logits_scaling\n        loss = None\n",
    ));
    assert_patched(&report);
    assert_eq!(
        kinds(&report),
        [(
            TransformKind::ScaleDivide,
            "self.config.logits_scaling".to_string()
        )]
    );
    let report = with_tail(&TAIL.replace(
        "self.lm_head(hidden_states)",
        "self.lm_head(hidden_states) * self.model.lm_head_multiplier",
    ));
    assert_patched(&report);
    assert_eq!(
        kinds(&report),
        [(
            TransformKind::ScaleMultiply,
            "self.model.lm_head_multiplier".to_string()
        )]
    );
}

#[test]
fn multiply_then_unconditional_softcap_in_op_order() {
    let report = with_tail(&TAIL.replace(
        "        loss = None\n",
        "        logits = logits * self.config.m\n        logits = logits / self.config.c\n        logits = torch.tanh(logits)\n        logits = logits * self.config.c\n        loss = None\n",
    ));
    let patched = assert_patched(&report);
    assert_eq!(
        kinds(&report),
        [
            (TransformKind::ScaleMultiply, "self.config.m".to_string()),
            (TransformKind::Softcap, "self.config.c".to_string())
        ]
    );
    let m = patched.find("logit_scale_multiply=").unwrap();
    let c = patched.find("logit_softcapping=").unwrap();
    assert!(m < c);
}

#[test]
fn labels_branch_preludes_of_4_57() {
    let report = with_tail(
        "        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            # move labels to correct device to enable model parallelism
            labels = labels.to(logits.device)
            logits = logits.float()
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
",
    );
    assert_patched(&report);
}

#[test]
fn tuple_outputs_are_returned_logits() {
    let report = analyze(&toy(INIT, TAIL).replace(
        "        return CausalLMOutputWithPast(loss=loss, logits=logits)\n",
        "        if not return_dict:\n            output = (logits,) + outputs[1:]\n            output = (aux,) + output\n            return ((loss,) + output) if loss is not None else output\n        return CausalLMOutputWithPast(loss=loss, logits=logits)\n",
    ));
    assert_patched(&report);
}

#[test]
fn composite_hidden_states_and_linear_decoder_head() {
    // ModernBertDecoder: `self.decoder` is the Linear, `self.lm_head` a prediction head.
    let init = INIT.replace(
        "self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)",
        "self.lm_head = PredictionHead(config)\n        self.decoder = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=config.decoder_bias)",
    );
    let report = analyze(&toy(
        &init,
        &TAIL.replace(
            "self.lm_head(hidden_states)",
            "self.decoder(self.lm_head(hidden_states))",
        ),
    ));
    let patched = assert_patched(&report);
    assert_eq!(report.head.as_deref(), Some("decoder"));
    assert_eq!(report.head_bias, None);
    assert!(
        patched.contains("            self.lm_head(hidden_states),\n            self.decoder,\n")
    );
}

#[test]
fn head_bias_forms() {
    for (linear, bias) in [
        ("nn.Linear(8, 16)", Some(true)),
        ("nn.Linear(8, 16, bias=True)", Some(true)),
        ("nn.Linear(8, 16, False)", Some(false)),
        ("nn.Linear(8, 16, bias=config.bias)", None),
    ] {
        let init = INIT.replace(
            "nn.Linear(config.hidden_size, config.vocab_size, bias=False)",
            linear,
        );
        let report = analyze(&toy(&init, TAIL));
        assert_patched(&report);
        assert_eq!(report.head_bias, bias, "{linear}");
    }
}

#[test]
fn decorators_strings_and_comments_survive() {
    let text = toy(INIT, TAIL)
        .replace("    @auto_docstring\n", "    @auto_docstring\n    @deprecate_kwarg(\"num_logits_to_keep\", version=\"4.50\", new_name=\"logits_to_keep\")\n    @add_start_docstrings_to_model_forward(\n        DOC\n    )\n    @check_model_inputs\n")
        .replace(
            "        loss = None\n",
            "        note = \"\"\"two\n  lines\"\"\"\n        loss = None  # reset\n",
        );
    let report = analyze(&text);
    let patched = assert_patched(&report);
    assert!(patched.starts_with("@forward_rewrite.tuple_guard\n@can_return_tuple\n@deprecate_kwarg(\"num_logits_to_keep\", version=\"4.50\", new_name=\"logits_to_keep\")\n@check_model_inputs\ndef forward("), "{patched}");
    assert!(!patched.contains("auto_docstring") && !patched.contains("add_start_docstrings"));
    // The continuation line of the string is not re-indented; the comment stays.
    assert!(
        patched.contains("        note = \"\"\"two\n  lines\"\"\"\n        loss = None  # reset\n"),
        "{patched}"
    );
}

#[test]
fn indented_class_source_and_forward_hash() {
    let text = toy(INIT, TAIL);
    let indented: String = text
        .lines()
        .map(|l| {
            if l.is_empty() {
                "\n".to_string()
            } else {
                format!("    {l}\n")
            }
        })
        .collect();
    let top = analyze(&text);
    let nested = analyze(&indented);
    assert_patched(&nested);
    assert_eq!(
        top.forward_sha256, nested.forward_sha256,
        "the hash ignores indentation"
    );
    assert_eq!(top.patched_forward, nested.patched_forward);
    let source = crate::analyze::forward_source(&[source(&text)]).unwrap();
    assert!(source.starts_with("@can_return_tuple\n@auto_docstring\ndef forward("));
    assert_eq!(
        top.forward_sha256.as_deref(),
        Some(crate::hash::forward_sha256(&source).as_str())
    );
}

#[test]
fn inherited_forward_reports_its_owner() {
    let base = source(&toy(INIT, TAIL).replace("ToyForCausalLM(", "ToyBaseForCausalLM("));
    let base = ClassSource {
        qualname: "ToyBaseForCausalLM".into(),
        module: "transformers.models.base.modeling_base".into(),
        ..base
    };
    let derived = source("class ToyForCausalLM(ToyBaseForCausalLM):\n    pass\n");
    let report = analyze_class(&[derived, base], &LossResolution::Causal);
    assert_patched(&report);
    assert_eq!(report.forward_owner.as_deref(), Some("ToyBaseForCausalLM"));
    assert_eq!(
        report.forward_module.as_deref(),
        Some("transformers.models.base.modeling_base")
    );
}

// ---- one refusal per reason code ------------------------------------------------------

#[test]
fn already_patched() {
    let patched = with_tail(TAIL).patched_forward.unwrap();
    assert_idempotent(&patched);
    let report = with_tail(
        "        loss = forward_rewrite.fused_lm_head_loss(hidden_states, self.lm_head, labels)\n        logits = None\n",
    );
    assert_refused(&report, Reason::AlreadyPatched);
}

#[test]
fn no_forward() {
    assert_refused(
        &analyze("class ToyForCausalLM(Base):\n    x = 1\n"),
        Reason::NoForward,
    );
    assert_refused(
        &analyze("class ToyForCausalLM(Base):\n    forward = Other.forward\n"),
        Reason::NoForward,
    );
}

#[test]
fn loss_function_overridden() {
    let text = toy(INIT, TAIL).replace(
        "    @can_return_tuple\n",
        "    def loss_function(self, *args):\n        return 0\n\n    @can_return_tuple\n",
    );
    assert_refused(&analyze(&text), Reason::LossFunctionOverridden);
    let init = format!("{INIT}        self.loss_function = my_loss\n");
    assert_refused(&analyze(&toy(&init, TAIL)), Reason::LossFunctionOverridden);
}

#[test]
fn loss_not_causal_and_unresolved() {
    let report = analyze_class(
        &[source(&toy(INIT, TAIL))],
        &LossResolution::Other("ForMaskedLM".into()),
    );
    assert_refused(&report, Reason::LossNotCausal);
    let init = format!("{INIT}        self.loss_type = \"ForMaskedLM\"\n");
    assert_refused(&analyze(&toy(&init, TAIL)), Reason::LossNotCausal);
    let init = format!("{INIT}        self.loss_type = \"ForCausalLM\"\n");
    let report = analyze_class(
        &[source(&toy(&init, TAIL))],
        &LossResolution::Other("ForMaskedLM".into()),
    );
    assert_patched(&report);
    let init = format!("{INIT}        self.loss_type = config.loss_type\n");
    assert_refused(&analyze(&toy(&init, TAIL)), Reason::LossUnresolved);
    assert_refused(
        &analyze_class(&[source(&toy(INIT, TAIL))], &LossResolution::Unknown),
        Reason::LossUnresolved,
    );
}

#[test]
fn seq2seq_and_custom_losses() {
    let seq2seq = "        lm_logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss_fct = CrossEntropyLoss()
            loss = loss_fct(lm_logits.view(-1, self.config.vocab_size), labels.view(-1))
        logits = lm_logits
";
    assert_refused(&with_tail(seq2seq), Reason::Seq2seqLoss);
    // The logits are shifted, the labels are not.
    let half_shifted = "        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            shift_logits = logits[..., :-1, :].contiguous()
            loss = nn.functional.cross_entropy(shift_logits.view(-1, shift_logits.size(-1)), labels.view(-1))
";
    assert_refused(&with_tail(half_shifted), Reason::CustomLoss);
    let twice = format!("{TAIL}            loss = loss + self.loss_function(logits, labels, 3)\n");
    assert_refused(&with_tail(&twice), Reason::CustomLoss);
    let in_expression = TAIL.replace(
        "loss = self.loss_function(",
        "loss = 2 * self.loss_function(",
    );
    assert_refused(&with_tail(&in_expression), Reason::CustomLoss);
}

#[test]
fn no_loss_call() {
    assert_refused(
        &with_tail("        logits = self.lm_head(hidden_states)\n        loss = None\n"),
        Reason::NoLossCall,
    );
}

#[test]
fn no_head_call() {
    assert_refused(
        &with_tail(&TAIL.replace("self.lm_head(hidden_states)", "outputs.logits")),
        Reason::NoHeadCall,
    );
    let branches = "        if self.config.flag:
            logits = self.lm_head(hidden_states)
        else:
            logits = self.other(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
";
    // A branch around the head call is the `pretraining_tp` shape: its else branch decides.
    assert_refused(&with_tail(branches), Reason::NonLinearHead);
}

#[test]
fn head_call_unsupported() {
    for head in [
        "self.lm_head(hidden_states, codebook_indices)",
        "self.lm_head(input=hidden_states)",
        "self.lm_head[generation_steps](hidden_states)",
        "self.lm_head(hidden_states).view(2, -1)",
        "self.lm_head(hidden_states) + self.final_logits_bias",
    ] {
        assert_refused(
            &with_tail(&TAIL.replace("self.lm_head(hidden_states)", head)),
            Reason::HeadCallUnsupported,
        );
    }
}

#[test]
fn non_linear_head() {
    for init in [
        INIT.replace(
            "nn.Linear(config.hidden_size, config.vocab_size, bias=False)",
            "nn.Sequential(nn.Linear(8, 8), nn.Tanh())",
        ),
        INIT.replace(
            "nn.Linear(config.hidden_size, config.vocab_size, bias=False)",
            "ToyLMHead(config)",
        ),
        INIT.replace(
            "        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)\n",
            "",
        ),
        format!("{INIT}        self.lm_head = ToyLMHead(config)\n"),
        INIT.replace(
            "        self.lm_head = nn.Linear",
            "        if config.x:\n            self.lm_head = nn.Linear",
        ),
    ] {
        assert_refused(&analyze(&toy(&init, TAIL)), Reason::NonLinearHead);
    }
    // BigBird: `self.cls` is an MLM head module.
    let init = INIT.replace(
        "self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)",
        "self.cls = BigBirdOnlyMLMHead(config)",
    );
    assert_refused(
        &analyze(&toy(&init, &TAIL.replace("self.lm_head(", "self.cls("))),
        Reason::NonLinearHead,
    );
}

#[test]
fn logits_rebound_mutated_aliased_read() {
    let between = |stmt: &str| {
        with_tail(&TAIL.replace(
            "        loss = None\n",
            &format!("{stmt}        loss = None\n"),
        ))
    };
    assert_refused(
        &between("        logits = logits[..., : self.config.unpadded_vocab_size]\n"),
        Reason::LogitsRebound,
    );
    assert_refused(
        &between("        logits = logits + self.bias\n"),
        Reason::LogitsRebound,
    );
    assert_refused(
        &between("        logits = soft_cap(logits, self.config.cap)\n"),
        Reason::LogitsRebound,
    );
    assert_refused(
        &between(
            "        if self.config.n is not None and self.config.n < logits.shape[-1]:\n            logits = logits[..., : self.config.n]\n",
        ),
        Reason::LogitsRebound,
    );
    assert_refused(
        &between("        logits[:, :, image_tokens] = torch.finfo(logits.dtype).min\n"),
        Reason::LogitsMutated,
    );
    assert_refused(&between("        logits.mul_(2)\n"), Reason::LogitsMutated);
    assert_refused(
        &between("        logits += self.bias\n"),
        Reason::LogitsMutated,
    );
    assert_refused(
        &between("        logits *= logits\n"),
        Reason::LogitsMutated,
    );
    assert_refused(&between("        other = logits\n"), Reason::LogitsAliased);
    assert_refused(
        &between("        n = logits.shape[-1]\n"),
        Reason::LogitsReadBeforeLoss,
    );
    assert_refused(
        &between("        print(logits)\n"),
        Reason::LogitsReadBeforeLoss,
    );
}

#[test]
fn logits_read_after_loss() {
    let after = |stmt: &str| analyze(&toy(INIT, &format!("{TAIL}{stmt}")));
    assert_refused(
        &after("        probs = logits.softmax(-1)\n"),
        Reason::LogitsReadAfterLoss,
    );
    assert_refused(
        &after("        if logits is not None:\n            pass\n"),
        Reason::LogitsReadAfterLoss,
    );
    let returns = toy(INIT, TAIL).replace(
        "return CausalLMOutputWithPast(loss=loss, logits=logits)",
        "return logits.float()",
    );
    assert_refused(&analyze(&returns), Reason::LogitsReadAfterLoss);
    let alias = format!("{TAIL}        output = (logits,)\n        self.cache = output\n");
    assert_refused(&analyze(&toy(INIT, &alias)), Reason::LogitsReadAfterLoss);
}

#[test]
fn transform_unsupported_and_order() {
    let between = |stmt: &str| {
        with_tail(&TAIL.replace(
            "        loss = None\n",
            &format!("{stmt}        loss = None\n"),
        ))
    };
    assert_refused(
        &between("        logits = torch.tanh(logits)\n"),
        Reason::TransformUnsupported,
    );
    assert_refused(
        &between("        logits = torch.tanh(logits / a.x) * a.y\n"),
        Reason::TransformUnsupported,
    );
    assert_refused(
        &between(
            "        if self.config.use_cap:\n            logits = logits / self.c\n            logits = torch.tanh(logits)\n            logits = logits * self.c\n",
        ),
        Reason::TransformUnsupported,
    );
    assert_refused(
        &between(
            "        if self.config.cap is not None:\n            logits = logits * self.config.other\n",
        ),
        Reason::TransformUnsupported,
    );
    assert_refused(
        &between("        logits = logits / self.d\n        logits = logits * self.m\n"),
        Reason::TransformOrder,
    );
    assert_refused(
        &between(
            "        logits = torch.tanh(logits / self.c) * self.c\n        logits = logits * self.m\n",
        ),
        Reason::TransformOrder,
    );
    assert_refused(
        &between("        logits = logits * self.a\n        logits = logits * self.b\n"),
        Reason::TransformOrder,
    );
}

#[test]
fn labels_not_plain() {
    assert_refused(
        &with_tail(&TAIL.replace("labels=labels,", "labels=labels[:, 1:],")),
        Reason::LabelsNotPlain,
    );
    assert_refused(
        &with_tail(&TAIL.replace("labels=labels,", "labels=None, shift_labels=labels,")),
        Reason::LabelsNotPlain,
    );
    assert_refused(
        &with_tail(&format!("        labels = labels.clone()\n{TAIL}")),
        Reason::LabelsNotPlain,
    );
    assert_refused(
        &with_tail(&TAIL.replace("if labels is not None:", "if audio_labels is not None:")),
        Reason::LabelsNotPlain,
    );
    let moved_then_read = format!(
        "{}        n = labels.shape[0]\n",
        TAIL.replace(
            "        if labels is not None:\n",
            "        if labels is not None:\n            labels = labels.to(logits.device)\n"
        )
    );
    assert_refused(&with_tail(&moved_then_read), Reason::LabelsNotPlain);
}

#[test]
fn else_branch_and_extra_statements() {
    assert_refused(
        &with_tail(&format!("{TAIL}        else:\n            loss = 0\n")),
        Reason::ElseBranch,
    );
    let extra = TAIL.replace(
        "            loss = self.loss_function(",
        "            z = 1\n            loss = self.loss_function(",
    );
    assert_refused(&with_tail(&extra), Reason::LabelsBranchExtra);
    assert_refused(
        &with_tail(&format!(
            "{TAIL}            loss = loss + self.z * logits.logsumexp(-1).mean()\n"
        )),
        Reason::LabelsBranchExtra,
    );
}

#[test]
fn loss_call_arguments() {
    assert_refused(
        &with_tail(&TAIL.replace(
            "**kwargs)",
            "pad_token_id=self.config.pad_token_id, **kwargs)",
        )),
        Reason::LossKwargUnsupported,
    );
    assert_refused(
        &with_tail(&TAIL.replace("**kwargs)", "label_smoothing=0.1)")),
        Reason::LossKwargUnsupported,
    );
    assert_refused(
        &with_tail(&TAIL.replace("vocab_size=self.config.vocab_size, ", "")),
        Reason::LossCallUnsupported,
    );
    assert_refused(
        &with_tail(&TAIL.replace(
            "vocab_size=self.config.vocab_size",
            "vocab_size=logits.shape[-1]",
        )),
        Reason::LossCallUnsupported,
    );
    assert_refused(
        &with_tail(&TAIL.replace("**kwargs)", "*extra)")),
        Reason::LossCallUnsupported,
    );
    assert_refused(
        &with_tail(&TAIL.replace("logits=logits,", "logits=logits.float(),")),
        Reason::LossCallUnsupported,
    );
}

#[test]
fn region_statements() {
    let between = |stmt: &str| {
        with_tail(&TAIL.replace(
            "        loss = None\n",
            &format!("{stmt}        loss = None\n"),
        ))
    };
    assert_refused(
        &between("        self.counter += 1\n"),
        Reason::RegionStatementUnsupported,
    );
    assert_refused(
        &between("        cap = compute_cap()\n"),
        Reason::RegionStatementUnsupported,
    );
    let used_later = format!(
        "{}        print(cap)\n",
        TAIL.replace(
            "        loss = None\n",
            "        cap = self.config.cap\n        loss = None\n"
        )
    );
    assert_refused(&with_tail(&used_later), Reason::RegionStatementUnsupported);
}

#[test]
fn reindent_unsafe() {
    let shared = TAIL.replace(
        "        logits = self.lm_head(hidden_states)\n",
        "        x = 1; logits = self.lm_head(hidden_states)\n",
    );
    assert_refused(&with_tail(&shared), Reason::ReindentUnsafe);
}

#[test]
fn name_conflict() {
    let text = toy(INIT, TAIL).replace(
        "def forward(self, ",
        "def forward(self, forward_rewrite=None, ",
    );
    assert_refused(&analyze(&text), Reason::NameConflict);
    let text = toy(INIT, &format!("        forward_rewrite = 3\n{TAIL}"));
    assert_refused(&analyze(&text), Reason::NameConflict);
    let mut report = with_tail(TAIL);
    report.refuse_module_name_conflict("transformers.models.toy.modeling_toy");
    assert_refused(&report, Reason::NameConflict);
}

#[test]
fn parse_error_and_emit_invalid_are_failures() {
    let report = analyze("class ToyForCausalLM(:\n    pass\n");
    assert_refused(&report, Reason::ParseError);
    assert_eq!(report.verdict, Verdict::Failed);
    let err = super::verify("def forward(self):\n    return (\n").unwrap_err();
    assert_eq!(err.reason, Reason::EmitInvalid);
    let err = super::verify("def forward(self):\n    return 1\n").unwrap_err();
    assert_eq!(err.reason, Reason::EmitInvalid, "not recognised as patched");
    assert!(Reason::EmitInvalid.is_failure());
}
