//! The `rotary` pass: the module-level `apply_rotary_pos_emb` rewritten to
//! `forward_rewrite.rotary` (q and k in one fused call).
//!
//! Site: the function `apply_rotary_pos_emb` of the module, when a class the model reaches
//! calls it by that name (the attention classes; the call resolves the module global at run
//! time, so replacing the global patches every caller of the module). It is patched only when
//! its statements are one of [`FORMS`] and the module's `rotate_half` is the one the form
//! needs (halves, or every two for the interleaved form): full or partial rotary
//! (`rotary_dim = cos.shape[-1]`, the tail passing through; Phi-3's with the rotation inside
//! the concatenation), the cast back to q's dtype (OLMo 3), the interleaved float32 form
//! (Cohere), the interleaved partial form of GLM (the first half of each table repeated per
//! pair, which the emitted call repeats the same way). Everything else is refused.

use std::sync::OnceLock;

use ruff_python_ast::StmtFunctionDef;

use crate::audit::PassReport;
use crate::parse::ParsedSource;
use crate::passes::fusion_common::{
    self, ModuleDefs, Site, body_without_docstring, emit_guarded, function_sha256,
    is_already_patched, plain_parameters, same_statements,
};
use crate::passes::{Pass, PassInput};

pub const PASS: Pass = Pass {
    name: "rotary",
    summary: "apply_rotary_pos_emb of the model's module -> forward_rewrite.rotary (guarded)",
    reasons: REASONS,
    analyze,
};

/// The function name the pass looks for.
pub const FUNCTION: &str = "apply_rotary_pos_emb";

pub const REASONS: &[(&str, &str)] = &[
    (
        "no-rotary-call",
        "No class the model reaches in its module calls `apply_rotary_pos_emb` (or the module is not known).",
    ),
    (
        "rotary-function-elsewhere",
        "`apply_rotary_pos_emb` is not defined in the module (imported): its own module is where it would be patched.",
    ),
    (
        "rotary-already-patched",
        "`apply_rotary_pos_emb` already calls `forward_rewrite`.",
    ),
    (
        "rotary-signature",
        "The parameters are not `(q, k, cos, sin, unsqueeze_dim=1)` (one tensor, extra position ids, `**kwargs`).",
    ),
    (
        "rotate-half-unknown",
        "The module's `rotate_half` is missing or is not the halves / every-two rotation the form needs.",
    ),
    (
        "rotary-form-unknown",
        "The statements are not one of the known forms (multimodal sections, repeat-interleaved halves of cos, complex products, prefix tokens, ...): matched in part, never approximated.",
    ),
    (
        "rotary-emit-invalid",
        "The emitted function does not re-parse as one patched function (a bug in this tool).",
    ),
];

struct Form {
    name: &'static str,
    body: &'static str,
    /// The module's `rotate_half` must be one of these.
    rotate_half: &'static [&'static str],
    /// The tables `forward_rewrite.rotary` is given, from the function's `cos` and `sin`.
    tables: &'static str,
    /// Keywords of `forward_rewrite.rotary` beyond `unsqueeze_dim`.
    keywords: &'static str,
}

/// The tables as transformers passes them.
const PLAIN_TABLES: &str = "cos, sin";

const HALVES: &[&str] = &["x1 = x[..., : x.shape[-1] // 2]
x2 = x[..., x.shape[-1] // 2 :]
return torch.cat((-x2, x1), dim=-1)
"];

const EVERY_TWO: &[&str] = &[
    // Cohere
    "x1 = x[..., ::2]
x2 = x[..., 1::2]
rot_x = torch.stack([-x2, x1], dim=-1).flatten(-2)
return rot_x
",
    // GLM
    "x1 = x[..., 0::2]
x2 = x[..., 1::2]
return torch.stack((-x2, x1), dim=-1).flatten(-2)
",
];

/// The partial forms' split and concatenation: the head's tail past `rotary_dim` passes
/// through, as `forward_rewrite.rotary` does when the tables are narrower than the head.
/// (A macro so that `concat!` can splice it into the forms' literals.)
macro_rules! partial_split {
    () => {
        "rotary_dim = cos.shape[-1]
q_rot, q_pass = q[..., :rotary_dim], q[..., rotary_dim:]
k_rot, k_pass = k[..., :rotary_dim], k[..., rotary_dim:]
"
    };
}

const FORMS: &[Form] = &[
    Form {
        name: "full",
        body: "cos = cos.unsqueeze(unsqueeze_dim)
sin = sin.unsqueeze(unsqueeze_dim)
q_embed = (q * cos) + (rotate_half(q) * sin)
k_embed = (k * cos) + (rotate_half(k) * sin)
return q_embed, k_embed
",
        rotate_half: HALVES,
        tables: PLAIN_TABLES,
        keywords: "",
    },
    Form {
        name: "partial",
        body: concat!(
            "cos = cos.unsqueeze(unsqueeze_dim)
sin = sin.unsqueeze(unsqueeze_dim)
",
            partial_split!(),
            "q_embed = (q_rot * cos) + (rotate_half(q_rot) * sin)
k_embed = (k_rot * cos) + (rotate_half(k_rot) * sin)
q_embed = torch.cat([q_embed, q_pass], dim=-1)
k_embed = torch.cat([k_embed, k_pass], dim=-1)
return q_embed, k_embed
"
        ),
        rotate_half: HALVES,
        tables: PLAIN_TABLES,
        keywords: "",
    },
    Form {
        name: "cast-back",
        body: "q_type, k_type = q.dtype, k.dtype
cos = cos.unsqueeze(unsqueeze_dim)
sin = sin.unsqueeze(unsqueeze_dim)
q_embed = (q * cos) + (rotate_half(q) * sin)
k_embed = (k * cos) + (rotate_half(k) * sin)
return q_embed.to(q_type), k_embed.to(k_type)
",
        rotate_half: HALVES,
        tables: PLAIN_TABLES,
        keywords: ", out_dtype=q.dtype",
    },
    Form {
        name: "interleaved-float32",
        body: "dtype = q.dtype
q = q.float()
k = k.float()
cos = cos.unsqueeze(unsqueeze_dim)
sin = sin.unsqueeze(unsqueeze_dim)
q_embed = (q * cos) + (rotate_half(q) * sin)
k_embed = (k * cos) + (rotate_half(k) * sin)
return q_embed.to(dtype=dtype), k_embed.to(dtype=dtype)
",
        rotate_half: EVERY_TWO,
        tables: PLAIN_TABLES,
        keywords: ", interleaved=True, out_dtype=q.dtype",
    },
    Form {
        // Phi-3: the partial form with the rotation inside the concatenation.
        name: "partial-inline",
        body: concat!(
            "cos = cos.unsqueeze(unsqueeze_dim)
sin = sin.unsqueeze(unsqueeze_dim)
",
            partial_split!(),
            "q_embed = torch.cat([(q_rot * cos) + (rotate_half(q_rot) * sin), q_pass], dim=-1)
k_embed = torch.cat([(k_rot * cos) + (rotate_half(k_rot) * sin), k_pass], dim=-1)
return q_embed, k_embed
"
        ),
        rotate_half: HALVES,
        tables: PLAIN_TABLES,
        keywords: "",
    },
    Form {
        // GLM, GLM-4: the first half of each table repeated per pair, rotated every two
        // entries, the tail passing through.
        name: "interleaved-partial",
        body: concat!(
            "cos = cos.unsqueeze(unsqueeze_dim)
sin = sin.unsqueeze(unsqueeze_dim)
cos = cos[..., : cos.shape[-1] // 2].repeat_interleave(2, dim=-1)
sin = sin[..., : sin.shape[-1] // 2].repeat_interleave(2, dim=-1)
",
            partial_split!(),
            "q_embed = (q_rot * cos) + (rotate_half(q_rot) * sin)
k_embed = (k_rot * cos) + (rotate_half(k_rot) * sin)
q_embed = torch.cat([q_embed, q_pass], dim=-1)
k_embed = torch.cat([k_embed, k_pass], dim=-1)
return q_embed, k_embed
"
        ),
        rotate_half: EVERY_TWO,
        tables: "cos[..., : cos.shape[-1] // 2].repeat_interleave(2, dim=-1), sin[..., : sin.shape[-1] // 2].repeat_interleave(2, dim=-1)",
        keywords: ", interleaved=True",
    },
];

type Templates = Vec<(ParsedSource, Vec<ParsedSource>)>;

fn templates() -> &'static Templates {
    static T: OnceLock<Templates> = OnceLock::new();
    T.get_or_init(|| {
        FORMS
            .iter()
            .map(|f| {
                (
                    fusion_common::template(f.body),
                    f.rotate_half
                        .iter()
                        .map(|r| fusion_common::template(r))
                        .collect(),
                )
            })
            .collect()
    })
}

fn analyze(input: &PassInput<'_, '_>) -> PassReport {
    let none = |detail| fusion_common::report(vec![], "no-rotary-call", detail);
    let Some(module) = input.module else {
        return none("the module is not known");
    };
    let defs = ModuleDefs::of(module);
    let Some(start) = fusion_common::start(input, &defs) else {
        return none("the class is not defined in the module");
    };
    let calls = defs
        .reachable(start.name.as_str())
        .into_iter()
        .any(|class| {
            class.body.iter().any(|stmt| {
                crate::syntax::calls_in_stmt(stmt).iter().any(|call| {
                matches!(&*call.func, ruff_python_ast::Expr::Name(n) if n.id.as_str() == FUNCTION)
            })
            })
        });
    if !calls {
        return none("no class the model reaches calls apply_rotary_pos_emb");
    }
    fusion_common::report(vec![rotary_site(&defs)], "no-rotary-call", "")
}

/// The verdict on the module's `apply_rotary_pos_emb`.
pub(crate) fn rotary_site(defs: &ModuleDefs<'_>) -> Site {
    let Some(function) = defs.functions.get(FUNCTION).copied() else {
        return Site::refused(
            "function",
            FUNCTION,
            0,
            "rotary-function-elsewhere",
            "apply_rotary_pos_emb is not defined in the module",
        );
    };
    let line = defs.line(function);
    let refuse = |reason, detail: &str| Site::refused("function", FUNCTION, line, reason, detail);
    if is_already_patched(function) {
        return refuse("rotary-already-patched", "it calls forward_rewrite");
    }
    let params = plain_parameters(function, false);
    let names: Option<Vec<(&str, bool)>> = params
        .as_ref()
        .map(|p| p.iter().map(|(n, d)| (n.as_str(), *d)).collect());
    if names.as_deref()
        != Some(&[
            ("q", false),
            ("k", false),
            ("cos", false),
            ("sin", false),
            ("unsqueeze_dim", true),
        ])
    {
        return refuse(
            "rotary-signature",
            "the parameters are not (q, k, cos, sin, unsqueeze_dim=...)",
        );
    }
    let body = body_without_docstring(function);
    let Some(index) = templates()
        .iter()
        .position(|(t, _)| same_statements(body, t))
    else {
        return refuse(
            "rotary-form-unknown",
            "apply_rotary_pos_emb is not one of the known forms",
        );
    };
    let form = &FORMS[index];
    let rotate_ok = defs
        .functions
        .get("rotate_half")
        .is_some_and(|f: &&StmtFunctionDef| {
            matches!(plain_parameters(f, false).as_deref(), Some([(p, false)]) if p == "x")
                && templates()[index]
                    .1
                    .iter()
                    .any(|t| same_statements(body_without_docstring(f), t))
        });
    if !rotate_ok {
        return refuse(
            "rotate-half-unknown",
            "rotate_half is missing or not the rotation this form needs",
        );
    }
    let lines = [
        "if forward_rewrite.fusion_guard.rotary(q, k, cos, sin, unsqueeze_dim):".to_string(),
        format!(
            "    # forward-rewrite: fused rotary embedding of q and k ({} form)",
            form.name
        ),
        format!(
            "    return forward_rewrite.rotary(q, k, {}, unsqueeze_dim=unsqueeze_dim{})",
            form.tables, form.keywords
        ),
    ];
    match emit_guarded(defs.source, function, &lines) {
        Ok(patch) => {
            let mut site = refuse("rotary-emit-invalid", "");
            site.verdict = "patched";
            site.reason = None;
            site.detail = String::new();
            site.original_sha256 = Some(function_sha256(defs.source, function));
            site.patch = Some(patch);
            site.lowered.insert("form".into(), form.name.into());
            site
        }
        Err(e) => refuse("rotary-emit-invalid", &e),
    }
}

#[cfg(test)]
mod tests;
