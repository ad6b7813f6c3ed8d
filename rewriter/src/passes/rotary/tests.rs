//! Unit tests of the rotary pass: every known form, every reason code.

use crate::passes::fusion_common::testing::{run, site_patch, site_reason};

const HALVES: &str = "def rotate_half(x):
    \"\"\"Rotates half the hidden dims of the input.\"\"\"
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)
";

const FULL: &str = "@use_kernel_forward_from_hub(\"rotary_pos_emb\")
def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    \"\"\"Applies Rotary Position Embedding.

    Args:
        q: the query.
    \"\"\"
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed
";

const PARTIAL: &str = "def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)

    # Keep half or full tensor for later concatenation
    rotary_dim = cos.shape[-1]
    q_rot, q_pass = q[..., :rotary_dim], q[..., rotary_dim:]
    k_rot, k_pass = k[..., :rotary_dim], k[..., rotary_dim:]

    # Apply rotary embeddings on the first half or full tensor
    q_embed = (q_rot * cos) + (rotate_half(q_rot) * sin)
    k_embed = (k_rot * cos) + (rotate_half(k_rot) * sin)

    # Concatenate back to full shape
    q_embed = torch.cat([q_embed, q_pass], dim=-1)
    k_embed = torch.cat([k_embed, k_pass], dim=-1)
    return q_embed, k_embed
";

fn report(extra: &str) -> crate::audit::PassReport {
    run(&super::PASS, extra)
}

#[test]
fn full_form_is_patched_decorators_and_docstring_kept() {
    // Docstring-only decorators are dropped (one spanning lines among them), the rest kept.
    let decorated = format!("@auto_docstring\n@add_start_docstrings(\n    \"Rotary.\",\n)\n{FULL}");
    let r = report(&format!("{HALVES}\n\n{decorated}"));
    assert_eq!(r.verdict, "patched", "{r:?}");
    let patch = site_patch(&r, "apply_rotary_pos_emb");
    insta::assert_snapshot!(patch);
    assert!(patch.starts_with("@use_kernel_forward_from_hub"));
}

#[test]
fn partial_form_is_patched() {
    let r = report(&format!("{HALVES}\n\n{PARTIAL}"));
    let patch = site_patch(&r, "apply_rotary_pos_emb");
    assert!(
        patch
            .contains("return forward_rewrite.rotary(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)")
    );
}

#[test]
fn phi3_partial_form_with_the_rotation_inside_the_concatenation_is_patched() {
    let phi3 = PARTIAL
        .replace(
            "    q_embed = (q_rot * cos) + (rotate_half(q_rot) * sin)\n    k_embed = (k_rot * cos) + (rotate_half(k_rot) * sin)\n",
            "",
        )
        .replace(
            "torch.cat([q_embed, q_pass], dim=-1)",
            "torch.cat([(q_rot * cos) + (rotate_half(q_rot) * sin), q_pass], dim=-1)",
        )
        .replace(
            "torch.cat([k_embed, k_pass], dim=-1)",
            "torch.cat([(k_rot * cos) + (rotate_half(k_rot) * sin), k_pass], dim=-1)",
        );
    let r = report(&format!("{HALVES}\n\n{phi3}"));
    assert_eq!(r.verdict, "patched", "{r:?}");
    let patch = site_patch(&r, "apply_rotary_pos_emb");
    assert!(
        patch.contains(
            "return forward_rewrite.rotary(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)\n"
        ),
        "{patch}"
    );
    // q's rotation applied to k's slice is not the form.
    let wrong = phi3.replace(
        "torch.cat([(k_rot * cos) + (rotate_half(k_rot) * sin), k_pass]",
        "torch.cat([(k_rot * cos) + (rotate_half(q_rot) * sin), k_pass]",
    );
    assert_eq!(
        reason(HALVES, &wrong).as_deref(),
        Some("rotary-form-unknown")
    );
}

const GLM_ROTATE: &str = "def rotate_half(x):
    \"\"\"Rotates half the hidden dims of the input.\"\"\"
    x1 = x[..., 0::2]
    x2 = x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)
";

#[test]
fn glm_interleaved_partial_form_is_patched_with_the_tables_repeated_alike() {
    let glm = PARTIAL.replace(
        "    # Keep half",
        "    # Interleave them instead of usual shape\n    cos = cos[..., : cos.shape[-1] // 2].repeat_interleave(2, dim=-1)\n    sin = sin[..., : sin.shape[-1] // 2].repeat_interleave(2, dim=-1)\n\n    # Keep half",
    );
    let r = report(&format!("{GLM_ROTATE}\n\n{glm}"));
    assert_eq!(r.verdict, "patched", "{r:?}");
    insta::assert_snapshot!(site_patch(&r, "apply_rotary_pos_emb"));
    // The halves rotation on the same repeated tables: the op is element-wise in its tables,
    // so it is the same form without `interleaved=True`.
    let r = report(&format!("{HALVES}\n\n{glm}"));
    let patch = site_patch(&r, "apply_rotary_pos_emb");
    assert!(
        patch.contains(".repeat_interleave(2, dim=-1), unsqueeze_dim=unsqueeze_dim)\n"),
        "{patch}"
    );
    // The GLM rotation on the tables as passed: the partial form, interleaved.
    let r = report(&format!("{GLM_ROTATE}\n\n{PARTIAL}"));
    assert!(
        site_patch(&r, "apply_rotary_pos_emb")
            .contains("rotary(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim, interleaved=True)\n")
    );
}

#[test]
fn interleaved_float32_form_is_patched() {
    let every_two = "def rotate_half(x):
    x1 = x[..., ::2]
    x2 = x[..., 1::2]
    rot_x = torch.stack([-x2, x1], dim=-1).flatten(-2)
    return rot_x
";
    let cohere = "def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    dtype = q.dtype
    q = q.float()
    k = k.float()
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed.to(dtype=dtype), k_embed.to(dtype=dtype)
";
    let r = report(&format!("{every_two}\n\n{cohere}"));
    let patch = site_patch(&r, "apply_rotary_pos_emb");
    assert!(
        patch.contains("interleaved=True, out_dtype=q.dtype"),
        "{patch}"
    );
    // The same body with the halves rotation: cast back, not interleaved.
    let r = report(&format!("{HALVES}\n\n{cohere}"));
    assert!(
        site_patch(&r, "apply_rotary_pos_emb")
            .contains("unsqueeze_dim=unsqueeze_dim, out_dtype=q.dtype)\n")
    );
}

/// The site's reason code for `body` (an `apply_rotary_pos_emb`) beside `helper`.
fn reason(helper: &str, body: &str) -> Option<String> {
    site_reason(
        &report(&format!("{helper}\n\n{body}")),
        "apply_rotary_pos_emb",
    )
}

/// The call `body` (an `apply_rotary_pos_emb`) is lowered to, beside `helper`; panics with
/// the report when the site is not patched.
fn lowered_call(helper: &str, body: &str) -> String {
    let r = report(&format!("{helper}\n\n{body}"));
    let patch = site_patch(&r, "apply_rotary_pos_emb");
    patch
        .lines()
        .find(|l| l.trim_start().starts_with("return forward_rewrite.rotary("))
        .unwrap_or_else(|| panic!("{patch}"))
        .trim()
        .to_string()
}

#[test]
fn partial_form_with_q_and_k_rebound_to_their_slices_is_patched() {
    // Nemotron, dots.llm3
    let nemotron = "def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    rot_dim = cos.shape[-1]
    # If q_pass/k_pass is empty, rotary pos embedding is applied to all tensor q/k
    q, q_pass = q[..., :rot_dim], q[..., rot_dim:]
    k, k_pass = k[..., :rot_dim], k[..., rot_dim:]
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return torch.cat((q_embed, q_pass), dim=-1), torch.cat((k_embed, k_pass), dim=-1)
";
    assert_eq!(
        lowered_call(HALVES, nemotron),
        "return forward_rewrite.rotary(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)"
    );
    // The pass-through slices swapped in the concatenation: not the form.
    let swapped = nemotron.replace("torch.cat((k_embed, k_pass)", "torch.cat((k_embed, q_pass)");
    assert_eq!(
        reason(HALVES, &swapped).as_deref(),
        Some("rotary-form-unknown")
    );
}

#[test]
fn float32_forms_cast_back_to_q_dtype() {
    // ModernBERT decoder, Evolla
    let modernbert = "def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    original_dtype = q.dtype
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q.float() * cos) + (rotate_half(q.float()) * sin)
    k_embed = (k.float() * cos) + (rotate_half(k.float()) * sin)
    return q_embed.to(original_dtype), k_embed.to(original_dtype)
";
    // HunYuan-VL
    let hunyuan = "def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    origin_dtype = q.dtype
    q, k = q.float(), k.float()
    cos = cos.unsqueeze(unsqueeze_dim).float()
    sin = sin.unsqueeze(unsqueeze_dim).float()
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed.to(origin_dtype), k_embed.to(origin_dtype)
";
    for body in [modernbert, hunyuan] {
        assert_eq!(
            lowered_call(HALVES, body),
            "return forward_rewrite.rotary(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim, out_dtype=q.dtype)"
        );
    }
    // k cast back to k's own dtype is a different computation: not the form.
    assert_eq!(
        reason(
            HALVES,
            &modernbert.replace("k_embed.to(original_dtype)", "k_embed.to(k.dtype)")
        )
        .as_deref(),
        Some("rotary-form-unknown")
    );
}

const REPEATED_TABLES: &str = "cos[..., : cos.shape[-1] // 2].repeat_interleave(2, dim=-1), sin[..., : sin.shape[-1] // 2].repeat_interleave(2, dim=-1)";

#[test]
fn repeated_tables_forms_repeat_them_in_the_call() {
    // Helium
    let helium = "def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)

    # Interleave them instead of usual shape
    cos = cos[..., : cos.shape[-1] // 2].repeat_interleave(2, dim=-1)
    sin = sin[..., : sin.shape[-1] // 2].repeat_interleave(2, dim=-1)

    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed
";
    assert_eq!(
        lowered_call(GLM_ROTATE, helium),
        format!(
            "return forward_rewrite.rotary(q, k, {REPEATED_TABLES}, unsqueeze_dim=unsqueeze_dim, interleaved=True)"
        )
    );
    // Ernie 4.5: the same in float32, cast back.
    let ernie = "def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    # glm rope style (with full dim) and full precision
    original_dtype = q.dtype

    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)

    # Interleave them instead of usual shape
    cos = cos[..., : cos.shape[-1] // 2].repeat_interleave(2, dim=-1)
    sin = sin[..., : sin.shape[-1] // 2].repeat_interleave(2, dim=-1)

    q_embed = (q.float() * cos) + (rotate_half(q).float() * sin)
    k_embed = (k.float() * cos) + (rotate_half(k).float() * sin)

    return q_embed.to(original_dtype), k_embed.to(original_dtype)
";
    assert_eq!(
        lowered_call(GLM_ROTATE, ernie),
        format!(
            "return forward_rewrite.rotary(q, k, {REPEATED_TABLES}, unsqueeze_dim=unsqueeze_dim, interleaved=True, out_dtype=q.dtype)"
        )
    );
    // cos repeated but sin not: no form.
    assert_eq!(
        reason(
            GLM_ROTATE,
            &helium.replace(
                "    sin = sin[..., : sin.shape[-1] // 2].repeat_interleave(2, dim=-1)\n",
                ""
            )
        )
        .as_deref(),
        Some("rotary-form-unknown")
    );
}

#[test]
fn glm4v_partial_form_reads_its_rotate_half_llm_helper() {
    let glm4v = PARTIAL.replace("rotate_half(", "rotate_half_llm(");
    let llm_helper = GLM_ROTATE.replace("def rotate_half(", "def rotate_half_llm(");
    // The module's rotate_half (halves, for its vision tower) is not the one called.
    let module = format!("{HALVES}\n\n{llm_helper}");
    assert_eq!(
        lowered_call(&module, &glm4v),
        "return forward_rewrite.rotary(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim, interleaved=True)"
    );
    // Without rotate_half_llm the helper is unknown, whatever rotate_half is.
    assert_eq!(
        reason(HALVES, &glm4v).as_deref(),
        Some("rotate-half-unknown")
    );
}

#[test]
fn negated_halves_rotation_negates_sin_in_the_call() {
    // NanoChat
    let negated = HALVES.replace("torch.cat((-x2, x1)", "torch.cat((x2, -x1)");
    assert_eq!(
        lowered_call(&negated, FULL),
        "return forward_rewrite.rotary(q, k, cos, -sin, unsqueeze_dim=unsqueeze_dim)"
    );
    // Neither sign flipped is a swap, no rotation: refused.
    let swap = HALVES.replace("torch.cat((-x2, x1)", "torch.cat((x2, x1)");
    assert_eq!(reason(&swap, FULL).as_deref(), Some("rotate-half-unknown"));
}

#[test]
fn reason_no_rotary_call() {
    let r = report(&FULL.replace("apply_rotary_pos_emb", "other_rope"));
    // The attention still calls apply_rotary_pos_emb, defined nowhere: elsewhere.
    assert_eq!(
        site_reason(&r, "apply_rotary_pos_emb").as_deref(),
        Some("rotary-function-elsewhere")
    );
    let text = crate::passes::fusion_common::testing::module("")
        .replace("return apply_rotary_pos_emb(q, k, cos, sin)", "return q, k");
    let parsed = crate::parse::ParsedSource::parse(text.clone()).unwrap();
    let chain: Vec<_> = crate::analyze::module_classes(&text, "m", "m.py")
        .unwrap()
        .into_iter()
        .filter(|c| c.qualname == "ToyForCausalLM")
        .collect();
    let report = crate::analyze::analyze_class_with(
        &chain,
        &crate::analyze::LossResolution::Causal,
        Some(&parsed),
        None,
        &[&super::PASS],
    );
    assert_eq!(
        report.passes["rotary"].reason.as_deref(),
        Some("no-rotary-call")
    );
}

#[test]
fn reason_rotary_function_elsewhere() {
    let r = report("from ..llama.modeling_llama import apply_rotary_pos_emb\n");
    assert_eq!(r.reason.as_deref(), Some("rotary-function-elsewhere"));
}

#[test]
fn reason_rotary_already_patched() {
    assert_eq!(
        reason(
            HALVES,
            &FULL.replace(
                "    cos = cos.unsqueeze(unsqueeze_dim)\n",
                "    forward_rewrite.x\n    cos = cos.unsqueeze(unsqueeze_dim)\n"
            )
        )
        .as_deref(),
        Some("rotary-already-patched")
    );
}

#[test]
fn transformers_4_signature_with_unused_position_ids_is_patched() {
    let four = FULL.replace(
        "sin, unsqueeze_dim=1)",
        "sin, position_ids=None, unsqueeze_dim=1)",
    );
    assert_eq!(
        lowered_call(HALVES, &four),
        "return forward_rewrite.rotary(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)"
    );
}

#[test]
fn reason_rotary_signature() {
    for signature in [
        // Qwen4-Exp's optional k without unsqueeze_dim
        "(q, k=None, cos=None, sin=None)",
        // GPT-J's one tensor with the tables in Llama's order, or an unsqueeze_dim
        "(tensor, cos, sin)",
        "(tensor, sin, cos, unsqueeze_dim=2)",
        // CLVP's q, k and v with optional positions
        "(q, k, v, cos, sin, position_ids=None, unsqueeze_dim=1)",
        // position ids without a default, or after unsqueeze_dim
        "(q, k, cos, sin, position_ids, unsqueeze_dim=1)",
        "(q, k, cos, sin, unsqueeze_dim=1, position_ids=None)",
        "(q, k, cos, sin, unsqueeze_dim=1, **kwargs)",
    ] {
        assert_eq!(
            reason(
                HALVES,
                &FULL.replace("(q, k, cos, sin, unsqueeze_dim=1)", signature)
            )
            .as_deref(),
            Some("rotary-signature"),
            "{signature}"
        );
    }
}

const SINGLE: &str = "def apply_rotary_pos_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1):
    \"\"\"Applies Rotary Position Embedding to the query and key tensors.\"\"\"
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (x * cos) + (rotate_half(x) * sin)
";

#[test]
fn gemma4_single_tensor_form_is_patched_to_rotary_single() {
    let r = report(&format!("{HALVES}\n\n{SINGLE}"));
    assert_eq!(r.verdict, "patched", "{r:?}");
    let patch = site_patch(&r, "apply_rotary_pos_emb");
    insta::assert_snapshot!(patch);
    assert!(patch.contains(
        "return forward_rewrite.rotary_single(x, cos, sin, unsqueeze_dim=unsqueeze_dim)"
    ));
    // The pair's body under the single signature, and the single body with another name or
    // another product, are not forms of one tensor.
    let pair_body = FULL.replace(
        "(q, k, cos, sin, unsqueeze_dim=1)",
        "(x, cos, sin, unsqueeze_dim=1)",
    );
    for body in [
        pair_body,
        SINGLE.replace(
            "(x * cos) + (rotate_half(x) * sin)",
            "(x * cos) - (rotate_half(x) * sin)",
        ),
        SINGLE.replace("(x * cos)", "(x.float() * cos)"),
    ] {
        assert_eq!(
            reason(HALVES, &body).as_deref(),
            Some("rotary-form-unknown"),
            "{body}"
        );
    }
}

#[test]
fn reason_rotate_half_unknown() {
    let r = report(FULL);
    assert_eq!(
        site_reason(&r, "apply_rotary_pos_emb").as_deref(),
        Some("rotate-half-unknown")
    );
}

#[test]
fn reason_rotary_form_unknown() {
    // The repeat-interleaved halves of cos without the partial split: not a known form.
    assert_eq!(
        reason(HALVES, &FULL.replace(
            "    q_embed = (q * cos)",
            "    cos = cos[..., : cos.shape[-1] // 2].repeat_interleave(2, dim=-1)\n    q_embed = (q * cos)"
        )).as_deref(),
        Some("rotary-form-unknown")
    );
    assert!(
        super::REASONS
            .iter()
            .any(|(c, _)| *c == "rotary-emit-invalid")
    );
}

const GPT_OSS_HELPER: &str = "def _apply_rotary_emb(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> torch.Tensor:
    first_half, second_half = torch.chunk(x, 2, dim=-1)
    first_ = first_half * cos - second_half * sin
    second_ = second_half * cos + first_half * sin
    return torch.cat((first_, second_), dim=-1)
";

const GPT_OSS: &str = "@use_kernel_forward_from_hub(\"rotary_pos_emb\")
def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = _apply_rotary_emb(q, cos, sin)
    k_embed = _apply_rotary_emb(k, cos, sin)
    return q_embed, k_embed
";

#[test]
fn gpt_oss_half_tables_form_is_patched_with_the_tables_concatenated_once() {
    let r = report(&format!("{GPT_OSS_HELPER}\n\n{GPT_OSS}"));
    assert_eq!(r.verdict, "patched", "{r:?}");
    let patch = site_patch(&r, "apply_rotary_pos_emb");
    insta::assert_snapshot!(patch);
    // The tables are built once, in the guard's call, and only for tables half q's width.
    assert_eq!(patch.matches("torch.cat((cos, cos), dim=-1)").count(), 1);
    assert!(patch.contains(
        "if q.shape[-1] == 2 * cos.shape[-1] and forward_rewrite.fusion_guard.rotary(q, k, (_fr_cos := torch.cat((cos, cos), dim=-1)), (_fr_sin := torch.cat((sin, sin), dim=-1)), unsqueeze_dim):"
    ), "{patch}");
    assert_eq!(
        lowered_call(GPT_OSS_HELPER, GPT_OSS),
        "return forward_rewrite.rotary(q, k, _fr_cos, _fr_sin, unsqueeze_dim=unsqueeze_dim)"
    );
    let sites = crate::passes::fusion_common::testing::sites(&r);
    assert_eq!(sites[0]["lowered"]["form"], "half-tables");
    assert_eq!(sites[0]["lowered"]["rotation"], "halves");
}

#[test]
fn gpt_oss_helper_names_are_free_and_its_split_written_either_way() {
    for helper in [
        // other names, the parameters' too, and a docstring
        GPT_OSS_HELPER
            .replace("first_half", "a")
            .replace("second_half", "b")
            .replace("first_", "lo")
            .replace("second_", "hi")
            .replace("x:", "t:")
            .replace("chunk(x,", "chunk(t,")
            .replace(") -> torch.Tensor:\n", ") -> torch.Tensor:\n    \"\"\"Halves.\"\"\"\n"),
        // the method, dim positional, the halves in a list, a list concatenated
        GPT_OSS_HELPER
            .replace("torch.chunk(x, 2, dim=-1)", "x.chunk(2, -1)")
            .replace("first_half, second_half =", "[first_half, second_half] =")
            .replace("torch.cat((first_, second_), dim=-1)", "torch.cat([first_, second_], -1)"),
        // keywords for every argument
        GPT_OSS_HELPER
            .replace("torch.chunk(x, 2, dim=-1)", "torch.chunk(x, chunks=2, dim=-1)")
            .replace(
                "torch.cat((first_, second_), dim=-1)",
                "torch.cat(dim=-1, tensors=(first_, second_))",
            ),
        // the products inline
        GPT_OSS_HELPER
            .replace("    first_ = first_half * cos - second_half * sin\n", "")
            .replace("    second_ = second_half * cos + first_half * sin\n", "")
            .replace(
                "torch.cat((first_, second_), dim=-1)",
                "torch.cat((first_half * cos - second_half * sin, second_half * cos + first_half * sin), dim=-1)",
            ),
    ] {
        assert_eq!(
            lowered_call(&helper, GPT_OSS),
            "return forward_rewrite.rotary(q, k, _fr_cos, _fr_sin, unsqueeze_dim=unsqueeze_dim)",
            "{helper}"
        );
    }
}

#[test]
fn gpt_oss_near_misses_are_refused() {
    // The helper matched in part: its code.
    for helper in [
        // the concatenation's order swapped
        GPT_OSS_HELPER.replace("torch.cat((first_, second_)", "torch.cat((second_, first_)"),
        // a sign flipped, in either half
        GPT_OSS_HELPER.replace(
            "first_half * cos - second_half",
            "first_half * cos + second_half",
        ),
        GPT_OSS_HELPER.replace(
            "second_half * cos + first_half",
            "second_half * cos - first_half",
        ),
        // the split on another dimension, or into another count
        GPT_OSS_HELPER.replace("torch.chunk(x, 2, dim=-1)", "torch.chunk(x, 2, dim=1)"),
        GPT_OSS_HELPER.replace("torch.chunk(x, 2, dim=-1)", "torch.chunk(x, 2)"),
        GPT_OSS_HELPER.replace("torch.chunk(x, 2, dim=-1)", "torch.chunk(x, 4, dim=-1)"),
        // concatenated along another dimension
        GPT_OSS_HELPER.replace("(first_, second_), dim=-1)", "(first_, second_), dim=1)"),
        // the halves swapped in the split, or one table for the other
        GPT_OSS_HELPER.replace("first_half, second_half =", "second_half, first_half ="),
        GPT_OSS_HELPER.replace(
            "second_half * cos + first_half * sin",
            "second_half * sin + first_half * cos",
        ),
        // the operands of a product swapped (not the form, though it is exact)
        GPT_OSS_HELPER.replace("first_half * cos -", "cos * first_half -"),
        // the split of a table, or a statement on the way
        GPT_OSS_HELPER.replace("torch.chunk(x, 2", "torch.chunk(cos, 2"),
        GPT_OSS_HELPER.replace(
            "    return torch.cat",
            "    first_ = first_.float()\n    return torch.cat",
        ),
        // another torch function, a default, a decorator
        GPT_OSS_HELPER.replace("torch.cat(", "torch.stack("),
        GPT_OSS_HELPER.replace("sin: torch.Tensor,\n", "sin: torch.Tensor = None,\n"),
        format!("@torch.compile\n{GPT_OSS_HELPER}"),
        // missing
        String::new(),
    ] {
        assert_eq!(
            reason(&helper, GPT_OSS).as_deref(),
            Some("rotate-half-unknown"),
            "{helper}"
        );
    }
    // The body matched in part: the form is unknown.
    for body in [
        GPT_OSS.replace(
            "_apply_rotary_emb(k, cos, sin)",
            "_apply_rotary_emb(k, sin, cos)",
        ),
        GPT_OSS.replace(
            "_apply_rotary_emb(k, cos, sin)",
            "_apply_rotary_emb(q, cos, sin)",
        ),
        GPT_OSS.replace("    sin = sin.unsqueeze(unsqueeze_dim)\n", ""),
    ] {
        assert_eq!(
            reason(GPT_OSS_HELPER, &body).as_deref(),
            Some("rotary-form-unknown"),
            "{body}"
        );
    }
}

#[test]
fn gpt_oss_helper_needs_torch_bound_by_import_torch_alone() {
    let module =
        crate::passes::fusion_common::testing::module(&format!("{GPT_OSS_HELPER}\n\n{GPT_OSS}"));
    let r = crate::passes::fusion_common::testing::run_module(&super::PASS, &module);
    assert_eq!(r.verdict, "patched", "{r:?}");
    for other in [
        module.replace("import torch\n", "import numpy as torch\n"),
        module.replace("import torch\n", "import torch\ntorch = None\n"),
        module.replace("import torch\n", ""),
    ] {
        let r = crate::passes::fusion_common::testing::run_module(&super::PASS, &other);
        assert_eq!(
            site_reason(&r, "apply_rotary_pos_emb").as_deref(),
            Some("rotate-half-unknown"),
            "{other}"
        );
    }
}

#[test]
fn ernie_vl_float32_form_rotates_with_its_text_helper() {
    // Ernie 4.5-VL: its rotary embedding repeats the tables per pair itself.
    let ernie_vl = "def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    original_dtype = q.dtype

    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)

    q_embed = (q.float() * cos) + (rotate_half_text(q).float() * sin)
    k_embed = (k.float() * cos) + (rotate_half_text(k).float() * sin)

    return q_embed.to(original_dtype), k_embed.to(original_dtype)
";
    let text_helper = GLM_ROTATE.replace("def rotate_half(", "def rotate_half_text(");
    // The module's rotate_half (halves, for its vision tower) is not the one called.
    let module = format!("{HALVES}\n\n{text_helper}");
    assert_eq!(
        lowered_call(&module, ernie_vl),
        "return forward_rewrite.rotary(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim, interleaved=True, out_dtype=q.dtype)"
    );
    assert_eq!(
        reason(HALVES, ernie_vl).as_deref(),
        Some("rotate-half-unknown")
    );
}

/// Whether `module` (a whole module's text) has its `apply_rotary_pos_emb` patched, else the
/// site's reason.
fn module_verdict(module: &str) -> Result<String, String> {
    let r = crate::passes::fusion_common::testing::run_module(&super::PASS, module);
    match site_reason(&r, "apply_rotary_pos_emb") {
        Some(reason) => Err(reason),
        None => Ok(site_patch(&r, "apply_rotary_pos_emb")),
    }
}

const QWEN4_EXP: &str = "def apply_rotary_pos_emb(q, k=None, cos=None, sin=None, unsqueeze_dim=1):
    \"\"\"Applies Rotary Position Embedding to the query and key tensors, or only the queries.\"\"\"
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    rotary_dim = cos.shape[-1]

    # Keep half or full tensor for later concatenation
    q_rope, q_nope = q[..., :rotary_dim], q[..., rotary_dim:]
    # Apply rotary embeddings on the first half or full tensor
    q_rope = (q_rope * cos) + (rotate_half(q_rope) * sin)
    # Concatenate back to full shape
    q_rotated = torch.cat([q_rope, q_nope], dim=-1)

    if k is not None:
        k_rope, k_nope = k[..., :rotary_dim], k[..., rotary_dim:]
        k_rope = (k_rope * cos) + (rotate_half(k_rope) * sin)
        k_rotated = torch.cat([k_rope, k_nope], dim=-1)
        return q_rotated, k_rotated
    else:
        return q_rotated
";

#[test]
fn qwen4_exp_optional_k_form_is_patched_to_rotary_or_rotary_single() {
    let r = report(&format!("{HALVES}\n\n{QWEN4_EXP}"));
    assert_eq!(r.verdict, "patched", "{r:?}");
    let patch = site_patch(&r, "apply_rotary_pos_emb");
    insta::assert_snapshot!(patch);
    // k given: q and k in one call; k None: q alone; the stock body after both
    assert!(patch.contains(
        "    if k is not None and forward_rewrite.fusion_guard.rotary(q, k, cos, sin, unsqueeze_dim):\n"
    ));
    assert!(patch.contains(
        "    if k is None and forward_rewrite.fusion_guard.rotary_single(q, cos, sin, unsqueeze_dim):\n"
    ));
    assert!(patch.contains(
        "return forward_rewrite.rotary_single(q, cos, sin, unsqueeze_dim=unsqueeze_dim)\n"
    ));
    let sites = crate::passes::fusion_common::testing::sites(&r);
    assert_eq!(sites[0]["lowered"]["form"], "optional-k-partial");
    // The every-two helper: interleaved in both calls.
    let r = report(&format!("{GLM_ROTATE}\n\n{QWEN4_EXP}"));
    assert_eq!(
        site_patch(&r, "apply_rotary_pos_emb")
            .matches("unsqueeze_dim=unsqueeze_dim, interleaved=True)\n")
            .count(),
        2
    );
}

#[test]
fn qwen4_exp_near_misses_are_refused() {
    for body in [
        // k rotated with q's pass-through, or its rotation on q's slice
        QWEN4_EXP.replace("torch.cat([k_rope, k_nope]", "torch.cat([k_rope, q_nope]"),
        QWEN4_EXP.replace("rotate_half(k_rope)", "rotate_half(q_rope)"),
        // the outputs swapped, or q returned whatever k
        QWEN4_EXP.replace("return q_rotated, k_rotated", "return k_rotated, q_rotated"),
        QWEN4_EXP.replace("    if k is not None:", "    if k is None:"),
        // the pair's full body under the optional signature
        FULL.replace(
            "(q, k, cos, sin, unsqueeze_dim=1)",
            "(q, k=None, cos=None, sin=None, unsqueeze_dim=1)",
        ),
    ] {
        assert_eq!(
            reason(HALVES, &body).as_deref(),
            Some("rotary-form-unknown"),
            "{body}"
        );
    }
}

const EVERY_TWO_4D: &str = "def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    x1 = x[:, :, :, ::2]
    x2 = x[:, :, :, 1::2]
    x = torch.stack((-x2, x1), dim=-1)
    return x.flatten(-2)  # in einsum notation: rearrange(x, '... d j -> ... (d j)')
";

const GPTJ: &str = "def apply_rotary_pos_emb(tensor: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    sin = torch.repeat_interleave(sin[:, :, None, :], 2, 3)
    cos = torch.repeat_interleave(cos[:, :, None, :], 2, 3)
    return (tensor * cos) + (rotate_every_two(tensor) * sin)
";

#[test]
fn gptj_sin_cos_form_is_patched_with_the_pair_tables_repeated_once() {
    let patch = module_verdict(&crate::passes::fusion_common::testing::module(&format!(
        "{EVERY_TWO_4D}\n\n{GPTJ}"
    )))
    .unwrap();
    insta::assert_snapshot!(patch);
    // unsqueezed at 2 as the body's `[:, :, None, :]`, fused only for a tensor exactly as
    // wide as the repeated tables
    assert!(patch.contains(
        "if tensor.shape[-1] == 2 * cos.shape[-1] and forward_rewrite.fusion_guard.rotary_single(tensor, (_fr_cos := cos.repeat_interleave(2, dim=-1)), (_fr_sin := sin.repeat_interleave(2, dim=-1)), 2):"
    ), "{patch}");
    assert!(patch.contains(
        "return forward_rewrite.rotary_single(tensor, _fr_cos, _fr_sin, unsqueeze_dim=2, interleaved=True)\n"
    ));
}

#[test]
fn gptj_near_misses_are_refused() {
    let module = |helper: &str, body: &str| {
        module_verdict(&crate::passes::fusion_common::testing::module(&format!(
            "{helper}\n\n{body}"
        )))
        .err()
    };
    for body in [
        // another dimension unsqueezed or repeated, another count
        GPTJ.replace("sin[:, :, None, :], 2, 3)", "sin[:, None, :, :], 2, 3)"),
        GPTJ.replace("cos[:, :, None, :], 2, 3)", "cos[:, :, None, :], 2, 2)"),
        GPTJ.replace("sin[:, :, None, :], 2, 3)", "sin[:, :, None, :], 3, 3)"),
        // the tables swapped in the product
        GPTJ.replace(
            "(tensor * cos) + (rotate_every_two(tensor) * sin)",
            "(tensor * sin) + (rotate_every_two(tensor) * cos)",
        ),
        // cos repeated, sin not
        GPTJ.replace(
            "    sin = torch.repeat_interleave(sin[:, :, None, :], 2, 3)\n",
            "    sin = sin[:, :, None, :]\n",
        ),
    ] {
        assert_eq!(
            module(EVERY_TWO_4D, &body).as_deref(),
            Some("rotary-form-unknown"),
            "{body}"
        );
    }
    // the helper missing or another rotation (a swap), or the every-two rotation of another
    // dimension
    for helper in [
        String::new(),
        EVERY_TWO_4D.replace("torch.stack((-x2, x1)", "torch.stack((x2, x1)"),
        EVERY_TWO_4D.replace("x[:, :, :, ::2]", "x[:, :, ::2]"),
    ] {
        assert_eq!(
            module(&helper, GPTJ).as_deref(),
            Some("rotate-half-unknown"),
            "{helper}"
        );
    }
    // torch.repeat_interleave of another torch
    let text = crate::passes::fusion_common::testing::module(&format!("{EVERY_TWO_4D}\n\n{GPTJ}"))
        .replace("import torch\n", "import torch\ntorch = None\n");
    assert_eq!(
        module_verdict(&text).err().as_deref(),
        Some("rotate-half-unknown")
    );
}

const CLVP: &str = "def apply_rotary_pos_emb(q, k, v, cos, sin, position_ids, unsqueeze_dim=1):
    \"\"\"Applies Rotary Position Embedding to the query and key tensors.\"\"\"
    cos = cos[position_ids].unsqueeze(unsqueeze_dim)
    sin = sin[position_ids].unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    v_embed = (v * cos) + (rotate_half(v) * sin)
    return q_embed, k_embed, v_embed
";

#[test]
fn clvp_indexed_qkv_form_is_patched_with_the_tables_indexed_once() {
    let r = report(&format!("{HALVES}\n\n{CLVP}"));
    assert_eq!(r.verdict, "patched", "{r:?}");
    let patch = site_patch(&r, "apply_rotary_pos_emb");
    insta::assert_snapshot!(patch);
    assert_eq!(patch.matches("cos[position_ids]").count(), 2, "{patch}");
    for body in [
        // v rotated with k's rotation, the outputs' order, the positions of one table only
        CLVP.replace("rotate_half(v)", "rotate_half(k)"),
        CLVP.replace(
            "return q_embed, k_embed, v_embed",
            "return q_embed, v_embed, k_embed",
        ),
        CLVP.replace("sin = sin[position_ids]", "sin = sin"),
    ] {
        assert_eq!(
            reason(HALVES, &body).as_deref(),
            Some("rotary-form-unknown"),
            "{body}"
        );
    }
}

const DEEPSEEK_V4: &str = "def apply_rotary_pos_emb(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> torch.Tensor:
    \"\"\"V4 interleaved RoPE applied to the *trailing* rope slice of `x`.\"\"\"
    cos = cos.repeat_interleave(2, dim=-1).unsqueeze(unsqueeze_dim)
    sin = sin.repeat_interleave(2, dim=-1).unsqueeze(unsqueeze_dim)
    rope_dim = cos.shape[-1]
    nope, rope = x[..., :-rope_dim], x[..., -rope_dim:]
    rotated = ((rope.float() * cos) + (rotate_half(rope).float() * sin)).to(x.dtype)
    return torch.cat([nope, rotated], dim=-1)
";

#[test]
fn deepseek_v4_trailing_slice_form_is_patched_and_concatenated_back() {
    let patch = module_verdict(&crate::passes::fusion_common::testing::module(&format!(
        "{GLM_ROTATE}\n\n{DEEPSEEK_V4}"
    )))
    .unwrap();
    insta::assert_snapshot!(patch);
    assert!(patch.contains(
        "if x.shape[-1] >= 2 * cos.shape[-1] and forward_rewrite.fusion_guard.rotary_single((_fr_x := x[..., x.shape[-1] - 2 * cos.shape[-1] :]), "
    ), "{patch}");
    assert!(patch.contains(
        "return torch.cat([x[..., : x.shape[-1] - 2 * cos.shape[-1]], forward_rewrite.rotary_single(_fr_x, _fr_cos, _fr_sin, unsqueeze_dim=unsqueeze_dim, interleaved=True, out_dtype=x.dtype)], dim=-1)\n"
    ), "{patch}");
    for body in [
        // the leading slice rotated, or the parts concatenated the other way round
        DEEPSEEK_V4.replace(
            "nope, rope = x[..., :-rope_dim], x[..., -rope_dim:]",
            "rope, nope = x[..., :rope_dim], x[..., rope_dim:]",
        ),
        DEEPSEEK_V4.replace("torch.cat([nope, rotated]", "torch.cat([rotated, nope]"),
        // not cast back, or not in float32
        DEEPSEEK_V4.replace(").to(x.dtype)", ")"),
        DEEPSEEK_V4.replace("rope.float() * cos", "rope * cos"),
        // the tables unsqueezed before they are repeated
        DEEPSEEK_V4.replace(
            "cos.repeat_interleave(2, dim=-1).unsqueeze(unsqueeze_dim)",
            "cos.unsqueeze(unsqueeze_dim).repeat_interleave(2, dim=-1)",
        ),
    ] {
        assert_eq!(
            reason(GLM_ROTATE, &body).as_deref(),
            Some("rotary-form-unknown"),
            "{body}"
        );
    }
    // The emitted torch.cat needs torch.
    let text =
        crate::passes::fusion_common::testing::module(&format!("{GLM_ROTATE}\n\n{DEEPSEEK_V4}"))
            .replace("import torch\n", "import numpy as torch\n");
    assert_eq!(
        module_verdict(&text).err().as_deref(),
        Some("rotate-half-unknown")
    );
}
