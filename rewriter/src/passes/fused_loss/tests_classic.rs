//! Unit tests of the classic loss style (`classic.rs`): the shapes transformers 4.45 and
//! remote code write, each variant patched, and each near-miss refused with its code.

use super::tests::{INIT, analyze, assert_patched, assert_refused, toy, with_tail};
use crate::reason::Reason;

/// transformers 4.45's LlamaForCausalLM tail, verbatim: the `pretraining_tp` branch, the
/// warning under `labels is None`, the upcasts, the shift, the device move.
const LLAMA_445: &str = "        if self.config.pretraining_tp > 1:
            lm_head_slices = self.lm_head.weight.split(self.vocab_size // self.config.pretraining_tp, dim=0)
            logits = [F.linear(hidden_states, lm_head_slices[i]) for i in range(self.config.pretraining_tp)]
            logits = torch.cat(logits, dim=-1)
        else:
            if labels is None and not is_torchdynamo_compiling():
                logger.warning_once(
                    \"Starting from v4.46, the `logits` model output will have the same type as the model\"
                )
            # Only compute necessary logits
            logits = self.lm_head(hidden_states[:, -num_logits_to_keep:, :]).float()

        loss = None
        if labels is not None:
            # Upcast to float if we need to compute the loss to avoid potential precision issues
            logits = logits.float()
            # Shift so that tokens < n predict n
            shift_logits = logits[..., :-1, :].contiguous()
            shift_labels = labels[..., 1:].contiguous()
            # Flatten the tokens
            loss_fct = CrossEntropyLoss()
            shift_logits = shift_logits.view(-1, self.config.vocab_size)
            shift_labels = shift_labels.view(-1)
            # Enable model parallelism
            shift_labels = shift_labels.to(shift_logits.device)
            loss = loss_fct(shift_logits, shift_labels)
";

#[test]
fn llama_4_45_with_the_pretraining_tp_branch() {
    let report = with_tail(LLAMA_445);
    let patched = assert_patched(&report);
    assert_eq!(report.head.as_deref(), Some("lm_head"));
    let fused = "    if labels is not None and not (self.config.pretraining_tp > 1) and forward_rewrite.fuses(self, self.lm_head, self.config.vocab_size, loss=\"cross_entropy\"):
        # forward-rewrite: fused lm_head + CrossEntropyLoss on shifted logits; logits are not materialised
        loss = forward_rewrite.fused_lm_head_loss(
            hidden_states[:, -num_logits_to_keep:, :],
            self.lm_head,
            labels,
            vocab_size=self.config.vocab_size,
        )
        logits = None
    else:
        if self.config.pretraining_tp > 1:
";
    assert!(patched.contains(fused), "{patched}");
    // No num_items_in_batch: the original never divides by it.
    assert!(!patched.contains("loss_kwargs"), "{patched}");
    assert!(patched.starts_with("@forward_rewrite.tuple_guard\n"));
}

#[test]
fn gpt2_shape_with_the_logits_own_vocabulary() {
    let tail = "        lm_logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            labels = labels.to(lm_logits.device)
            shift_logits = lm_logits[..., :-1, :].contiguous()
            shift_labels = labels[..., 1:].contiguous()
            loss_fct = CrossEntropyLoss()
            loss = loss_fct(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))
        logits = lm_logits
";
    // `logits = lm_logits` reads the logits after the loss to return them: fine for the
    // region, but here the returned name is `logits`, an alias.
    let report = with_tail(tail);
    assert_eq!(
        report.reason,
        Some(Reason::LogitsReadAfterLoss),
        "{}",
        report.detail
    );
    let report =
        with_tail(&tail.replace("        logits = lm_logits\n", "        logits = None\n"));
    let patched = assert_patched(&report);
    assert!(
        patched.contains("forward_rewrite.fuses(self, self.lm_head, self.lm_head.out_features, loss=\"cross_entropy\")"),
        "{patched}"
    );
    assert!(patched.contains("            vocab_size=self.lm_head.out_features,\n"));
}

#[test]
fn epilogue_casts_of_the_loss_are_repeated_and_logits_casts_dropped() {
    let tail = "        lm_logits = self.lm_head(hidden_states).to(torch.float32)
        loss = None
        if labels is not None:
            labels = labels.to(lm_logits.device)
            shift_logits = lm_logits[..., :-1, :].contiguous()
            shift_labels = labels[..., 1:].contiguous()
            loss_fct = CrossEntropyLoss(ignore_index=-100)
            loss = loss_fct(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))
            lm_logits = lm_logits.to(hidden_states.dtype)
            loss = loss.to(hidden_states.dtype)
        logits = None
";
    let report = with_tail(tail);
    let patched = assert_patched(&report);
    assert!(
        patched.contains(
            "            ignore_index=-100,\n        )\n        loss = loss.to(hidden_states.dtype)\n        lm_logits = None\n"
        ),
        "{patched}"
    );
}

#[test]
fn bloom_shape_unpack_and_gpt_neox_label_rebinding() {
    let bloom = "        lm_logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            labels = labels.to(lm_logits.device)
            shift_logits = lm_logits[..., :-1, :].contiguous()
            shift_labels = labels[..., 1:].contiguous()
            batch_size, seq_length, vocab_size = shift_logits.shape
            loss_fct = CrossEntropyLoss()
            loss = loss_fct(
                shift_logits.view(batch_size * seq_length, vocab_size), shift_labels.view(batch_size * seq_length)
            )
        logits = None
";
    assert_patched(&with_tail(bloom));
    let neox = "        lm_logits = self.embed_out(hidden_states)
        lm_loss = None
        if labels is not None:
            labels = labels.to(lm_logits.device)
            shift_logits = lm_logits[:, :-1, :].contiguous()
            labels = labels[:, 1:].contiguous()
            loss_fct = CrossEntropyLoss()
            lm_loss = loss_fct(shift_logits.view(-1, shift_logits.size(-1)), labels.view(-1))
        loss = lm_loss
        logits = None
";
    let init = INIT.replace("self.lm_head", "self.embed_out");
    let report = analyze(&toy(&init, neox));
    let patched = assert_patched(&report);
    assert_eq!(report.head.as_deref(), Some("embed_out"));
    assert!(patched.contains("        lm_loss = forward_rewrite.fused_lm_head_loss("));
    // A shifted `labels` read after the region would see the unshifted labels in the fused step.
    let reads_labels = neox.replace(
        "        loss = lm_loss\n",
        "        loss = lm_loss\n        n = labels.numel()\n",
    );
    assert_refused(&analyze(&toy(&init, &reads_labels)), Reason::LabelsNotPlain);
}

#[test]
fn functional_cross_entropy_with_lowered_options() {
    let tail = "        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            shift_logits = logits[..., :-1, :].contiguous()
            shift_labels = labels[..., 1:].contiguous()
            loss = F.cross_entropy(
                shift_logits.view(-1, shift_logits.size(-1)),
                shift_labels.view(-1),
                ignore_index=self.config.pad_token_id,
                label_smoothing=0.1,
                reduction=\"mean\",
            )
";
    let patched = assert_patched(&with_tail(tail));
    assert!(
        patched.contains(
            "            ignore_index=self.config.pad_token_id,\n            label_smoothing=0.1,\n"
        ),
        "{patched}"
    );
}

#[test]
fn mpt_roll_of_the_labels_is_a_causal_shift() {
    let tail = "        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            _labels = torch.roll(labels, shifts=-1)
            _labels[:, -1] = -100
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), _labels.to(logits.device).view(-1))
";
    assert_patched(&with_tail(tail));
    // The padding must be the ignore_index, or the last column is a real (wrong) label.
    assert_refused(
        &with_tail(&tail.replace("_labels[:, -1] = -100", "_labels[:, -1] = 0")),
        Reason::CustomLoss,
    );
    assert_refused(
        &with_tail(&tail.replace("            _labels[:, -1] = -100\n", "")),
        Reason::CustomLoss,
    );
}

#[test]
fn aux_loss_added_after_the_region_and_internlm_tp_head() {
    let tail = "        if self.config.pretraining_tp > 1:
            output_slices = self.output.weight.split(self.vocab_size // self.config.pretraining_tp, dim=0)
            logits = [F.linear(hidden_states, output_slices[i]) for i in range(self.config.pretraining_tp)]
            logits = torch.cat(logits, dim=-1)
        else:
            logits = self.output(hidden_states)
        logits = logits.float()

        loss = None
        if labels is not None:
            shift_logits = logits[..., :-1, :].contiguous()
            shift_labels = labels[..., 1:].contiguous()
            loss_fct = CrossEntropyLoss()
            shift_logits = shift_logits.view(-1, self.config.vocab_size)
            shift_labels = shift_labels.view(-1)
            shift_labels = shift_labels.to(shift_logits.device)
            loss = loss_fct(shift_logits, shift_labels)
        aux_loss = None
        if output_router_logits:
            aux_loss = load_balancing_loss_func(outputs.router_logits, self.num_experts)
            if labels is not None:
                loss += self.router_aux_loss_coef * aux_loss.to(loss.device)
";
    let init = INIT.replace("self.lm_head", "self.output");
    let report = analyze(&toy(&init, tail).replace(
        "logits_to_keep=0,",
        "logits_to_keep=0, output_router_logits=False,",
    ));
    let patched = assert_patched(&report);
    assert_eq!(report.head.as_deref(), Some("output"));
    assert!(
        patched.contains("not (self.config.pretraining_tp > 1) and"),
        "{patched}"
    );
    // The slices bound in the tp branch may not be read later.
    let reads = tail.replace(
        "        aux_loss = None\n",
        "        aux_loss = output_slices\n",
    );
    assert_refused(
        &analyze(&toy(&init, &reads)),
        Reason::RegionStatementUnsupported,
    );
}

#[test]
fn pretraining_tp_branch_near_misses() {
    let impure = LLAMA_445.replace(
        "if self.config.pretraining_tp > 1:",
        "if self.use_slices():",
    );
    assert_refused(&with_tail(&impure), Reason::RegionStatementUnsupported);
    let live = LLAMA_445.replace("if labels is None and not", "if not");
    assert_refused(&with_tail(&live), Reason::RegionStatementUnsupported);
}

#[test]
fn reductions_weights_and_positional_arguments_are_refused() {
    let base = "        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            shift_logits = logits[..., :-1, :].contiguous()
            shift_labels = labels[..., 1:].contiguous()
            loss_fct = CrossEntropyLoss(ARGS)
            loss = loss_fct(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))
";
    let with = |args: &str| with_tail(&base.replace("ARGS", args));
    assert_refused(&with("reduction=\"sum\""), Reason::LossReductionUnsupported);
    assert_refused(
        &with("reduction=\"none\""),
        Reason::LossReductionUnsupported,
    );
    assert_refused(
        &with("weight=self.class_weights"),
        Reason::LossKwargUnsupported,
    );
    assert_refused(&with("self.class_weights"), Reason::LossKwargUnsupported);
    assert_refused(
        &with("ignore_index=self.next_id()"),
        Reason::LossCallUnsupported,
    );
    // Per-sample losses: reduction none then a custom mean.
    let per_sample = base.replace("ARGS", "reduction=\"none\"").replace(
        "shift_labels.view(-1))\n",
        "shift_labels.view(-1))\n            loss = loss.view(labels.size(0), -1).mean(1).mean()\n",
    );
    assert_refused(&with_tail(&per_sample), Reason::LossReductionUnsupported);
}

#[test]
fn masks_and_reads_of_the_logits_are_refused() {
    let llava = "        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            if attention_mask is not None:
                shift_attention_mask = attention_mask[..., 1:]
                shift_logits = logits[..., :-1, :][shift_attention_mask.to(logits.device) != 0].contiguous()
                shift_labels = labels[..., 1:][shift_attention_mask.to(labels.device) != 0].contiguous()
            else:
                shift_logits = logits[..., :-1, :].contiguous()
                shift_labels = labels[..., 1:].contiguous()
            loss_fct = nn.CrossEntropyLoss()
            loss = loss_fct(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1).to(shift_logits.device))
";
    assert_refused(&with_tail(llava), Reason::LogitsMasked);
    let inline_mask = "        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            shift_logits = logits[..., :-1, :][keep]
            shift_labels = labels[..., 1:][keep]
            loss = F.cross_entropy(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))
";
    assert_refused(&with_tail(inline_mask), Reason::LogitsMasked);
    let z_loss = "        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            shift_logits = logits[..., :-1, :].contiguous()
            shift_labels = labels[..., 1:].contiguous()
            loss_fct = CrossEntropyLoss()
            shift_logits = shift_logits.view(-1, self.config.vocab_size)
            shift_labels = shift_labels.view(-1)
            softmax_normalizer = shift_logits.max(-1).values ** 2
            z_loss = self.config.z_loss_weight * softmax_normalizer.mean()
            loss = loss_fct(shift_logits, shift_labels) + z_loss
";
    assert_refused(&with_tail(z_loss), Reason::LogitsReadBeforeLoss);
    let after = "        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            shift_logits = logits[..., :-1, :].contiguous()
            shift_labels = labels[..., 1:].contiguous()
            loss = F.cross_entropy(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))
        extra = shift_logits
";
    assert_refused(&with_tail(after), Reason::RegionStatementUnsupported);
    let epilogue_reads = "        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            shift_logits = logits[..., :-1, :].contiguous()
            shift_labels = labels[..., 1:].contiguous()
            loss = F.cross_entropy(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))
            loss = loss + logits.mean()
";
    assert_refused(&with_tail(epilogue_reads), Reason::LogitsReadAfterLoss);
}

#[test]
fn a_cross_entropy_assigned_to_loss_function_is_an_override() {
    let init = format!("{INIT}        self.loss_function = nn.CrossEntropyLoss()\n");
    let tail = "        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            shift_logits = logits[..., :-1, :].contiguous()
            shift_labels = labels[..., 1:].contiguous()
            loss = self.loss_function(shift_logits.view(-1, self.config.vocab_size), shift_labels.view(-1))
";
    assert_refused(&analyze(&toy(&init, tail)), Reason::LossFunctionOverridden);
}

#[test]
fn a_head_call_on_the_logits_name_is_the_origin() {
    // Kimi-Linear's remote code: the hidden states arrive under the logits' name.
    let tail = "        logits = outputs[0]
        logits = self.lm_head(logits)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
";
    let patched = assert_patched(&with_tail(tail));
    assert!(
        patched
            .contains("        loss = forward_rewrite.fused_lm_head_loss(\n            logits,\n"),
        "{patched}"
    );
    // A transform of the logits is not a head call: still the region's business.
    let scaled = tail.replace(
        "        loss = None\n",
        "        logits = logits * self.logit_scale.exp()\n        loss = None\n",
    );
    assert_patched(&with_tail(&scaled));
}

#[test]
fn mpt_remote_code_is_refused_for_its_head_not_as_seq2seq() {
    // MosaicML's remote MPT: tied unembedding through the embedding module, then the roll.
    let tail = "        logits = self.transformer.wte(outputs.last_hidden_state.to(self.transformer.wte.weight.device), True)
        if self.logit_scale is not None:
            if self.logit_scale == 0:
                warnings.warn(f'Multiplying logits by self.logit_scale={self.logit_scale!r}.')
            logits *= self.logit_scale
        loss = None
        if labels is not None:
            _labels = torch.roll(labels, shifts=-1)
            _labels[:, -1] = -100
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), _labels.to(logits.device).view(-1))
";
    let report = with_tail(tail);
    assert_refused(&report, Reason::HeadCallUnsupported);
    assert_eq!(
        report.loss_style,
        Some(crate::audit::LossStyleKind::CrossEntropy)
    );
}
