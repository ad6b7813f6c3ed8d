//! What `apply_rotary_pos_emb` rotates, read from its parameters ([`Operands`]): each
//! signature's family of forms and how its sites are lowered.
//!
//! - q and k, `(q, k, cos, sin, unsqueeze_dim=1)` ([`FORMS`]): one `forward_rewrite.rotary`.
//! - One tensor, `(x, cos, sin, unsqueeze_dim=1)` (Gemma 3n, Gemma 4; DeepSeek-V4 on the
//!   trailing slice of its heads): `rotary_single`.
//! - q and an optional k, `(q, k=None, cos=None, sin=None, unsqueeze_dim=1)` (Qwen4-Exp):
//!   `rotary` when k is given, `rotary_single` of q when it is None, as the body branches.
//! - One tensor with the tables first sin then cos, `(tensor, sin, cos)` (GPT-J, CodeGen:
//!   tables of one entry per pair, heads in `(batch, seq, heads, head_dim)`): `rotary_single`
//!   at `unsqueeze_dim=2` on the tables repeated per pair.
//! - q, k and v, `(q, k, v, cos, sin, position_ids, unsqueeze_dim=1)` (CLVP: the tables
//!   indexed by the positions): `rotary` of q and k and `rotary_single` of v, on the indexed
//!   tables bound once.

use ruff_python_ast::StmtFunctionDef;

use super::{FORMS, Form, Helper, Rotation, Tables};
use crate::passes::fusion_common::plain_parameters;

/// The `rotary-signature` detail: the signatures read.
pub(super) const SIGNATURE_DETAIL: &str = "the parameters are not (q, k, cos, sin[, position_ids=None], unsqueeze_dim=1), (x, cos, sin, unsqueeze_dim=1), (q, k=None, cos=None, sin=None, unsqueeze_dim=1), (tensor, sin, cos) nor (q, k, v, cos, sin, position_ids, unsqueeze_dim=1)";

/// What the function rotates, by its parameters (names, and which have defaults; the
/// defaults' values do not matter: the emitted code tests what the call bound, as the body
/// does).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Operands {
    /// `(q, k, cos, sin, unsqueeze_dim=1)`, or transformers 4.x's with `position_ids=None`
    /// before `unsqueeze_dim` (deprecated and unused: no form reads it, nor does the emitted
    /// call).
    Pair,
    /// `(x, cos, sin, unsqueeze_dim=1)`.
    Single,
    /// `(q, k=None, cos=None, sin=None, unsqueeze_dim=1)`.
    OptionalK,
    /// `(tensor, sin, cos)`: no `unsqueeze_dim` (the body unsqueezes at 2).
    SinCos,
    /// `(q, k, v, cos, sin, position_ids, unsqueeze_dim=1)`.
    Values,
}

impl Operands {
    pub(super) const ALL: [Operands; 5] = [
        Operands::Pair,
        Operands::Single,
        Operands::OptionalK,
        Operands::SinCos,
        Operands::Values,
    ];

    /// The family of `function`'s signature, or None (`rotary-signature`).
    pub(super) fn of(function: &StmtFunctionDef) -> Option<Operands> {
        let params = plain_parameters(function, false)?;
        let names: Vec<(&str, bool)> = params.iter().map(|(n, d)| (n.as_str(), *d)).collect();
        Some(match names[..] {
            [
                ("q", false),
                ("k", false),
                ("cos", false),
                ("sin", false),
                ("unsqueeze_dim", true),
            ]
            | [
                ("q", false),
                ("k", false),
                ("cos", false),
                ("sin", false),
                ("position_ids", true),
                ("unsqueeze_dim", true),
            ] => Operands::Pair,
            [
                ("x", false),
                ("cos", false),
                ("sin", false),
                ("unsqueeze_dim", true),
            ] => Operands::Single,
            [
                ("q", false),
                ("k", true),
                ("cos", true),
                ("sin", true),
                ("unsqueeze_dim", true),
            ] => Operands::OptionalK,
            [("tensor", false), ("sin", false), ("cos", false)] => Operands::SinCos,
            [
                ("q", false),
                ("k", false),
                ("v", false),
                ("cos", false),
                ("sin", false),
                ("position_ids", false),
                ("unsqueeze_dim", true),
            ] => Operands::Values,
            _ => return None,
        })
    }

    /// The forms a body of this signature may hold.
    pub(super) fn forms(self) -> &'static [Form] {
        match self {
            Operands::Pair => FORMS,
            Operands::Single => SINGLE_FORMS,
            Operands::OptionalK => OPTIONAL_K_FORMS,
            Operands::SinCos => SIN_COS_FORMS,
            Operands::Values => VALUES_FORMS,
        }
    }

    /// The lines `emit_guarded` puts before the stock body: each `if <guard>:` with its
    /// comment and `return` of the fused call.
    pub(super) fn lower(self, form: &Form, rotation: &Rotation) -> Vec<String> {
        let unsqueeze = match self {
            Operands::SinCos => "2",
            _ => "unsqueeze_dim",
        };
        // The tables the op gets (sin negated for the negated rotation), and the guard's
        // (a guard only reads shapes and dtypes).
        let (cos, sin) = (form.tables.of("cos"), form.tables.of("sin"));
        let op_sin = if rotation.negated {
            format!("-{sin}")
        } else {
            sin.clone()
        };
        let guard = |call: &str, tensors: &str, tables: &str| {
            format!("forward_rewrite.fusion_guard.{call}({tensors}, {tables}, {unsqueeze})")
        };
        let fused = |call: &str, tensors: &str, first: &str| {
            format!(
                "forward_rewrite.{call}({tensors}, {cos}, {op_sin}, unsqueeze_dim={unsqueeze}{}{})",
                if rotation.interleaved {
                    ", interleaved=True"
                } else {
                    ""
                },
                if form.cast_back {
                    format!(", out_dtype={first}.dtype")
                } else {
                    String::new()
                },
            )
        };
        let comment = |what: &str| {
            format!(
                "    # forward-rewrite: fused rotary embedding of {what} ({} form, {} rotation)",
                form.name, rotation.name
            )
        };
        let first = match self {
            Operands::Single => "x",
            Operands::SinCos => "tensor",
            Operands::Pair | Operands::OptionalK | Operands::Values => "q",
        };
        let (tables, before) = form.tables.guarded(first);
        match self {
            Operands::Pair => vec![
                format!("if {before}{}:", guard("rotary", "q, k", &tables)),
                comment("q and k"),
                format!("    return {}", fused("rotary", "q, k", "q")),
            ],
            Operands::Single | Operands::SinCos if form.trailing => {
                // The rotated slice bound in the guard's call; the width test is the
                // trailing one (the slice is as wide as the tables by construction).
                let front = format!("{first}.shape[-1] - 2 * cos.shape[-1]");
                vec![
                    format!(
                        "if {first}.shape[-1] >= 2 * cos.shape[-1] and {}:",
                        guard(
                            "rotary_single",
                            &format!("(_fr_x := {first}[..., {front} :])"),
                            &tables
                        )
                    ),
                    comment("the trailing slice of one tensor"),
                    format!(
                        "    return torch.cat([{first}[..., : {front}], {}], dim=-1)",
                        fused("rotary_single", "_fr_x", first)
                    ),
                ]
            }
            Operands::Single | Operands::SinCos => vec![
                format!("if {before}{}:", guard("rotary_single", first, &tables)),
                comment("one tensor"),
                format!("    return {}", fused("rotary_single", first, first)),
            ],
            Operands::OptionalK => vec![
                format!(
                    "if k is not None and {before}{}:",
                    guard("rotary", "q, k", &tables)
                ),
                comment("q and k"),
                format!("    return {}", fused("rotary", "q, k", "q")),
                format!(
                    "if k is None and {before}{}:",
                    guard("rotary_single", "q", &tables)
                ),
                comment("q alone"),
                format!("    return {}", fused("rotary_single", "q", "q")),
            ],
            Operands::Values => vec![
                format!(
                    "if {before}{} and {}:",
                    guard("rotary", "q, k", &tables),
                    guard("rotary_single", "v", &format!("{cos}, {sin}"))
                ),
                comment("q and k, and of v"),
                format!(
                    "    return (*{}, {})",
                    fused("rotary", "q, k", "q"),
                    fused("rotary_single", "v", "v")
                ),
            ],
        }
    }
}

/// `(x, cos, sin, unsqueeze_dim=1)`.
const SINGLE_FORMS: &[Form] = &[
    Form {
        // Gemma 3n, Gemma 4: q and k rotated by separate calls.
        name: "single",
        bodies: &[concat!(
            unsqueeze!(),
            "return (x * cos) + (rotate_half(x) * sin)\n"
        )],
        helper: Helper::Rotation("rotate_half"),
        tables: Tables::Plain,
        cast_back: false,
        trailing: false,
    },
    Form {
        // DeepSeek-V4: `[nope | rope]` heads, the rope slice rotated in float32 with the
        // tables of one entry per pair repeated, cast back to x's dtype.
        name: "trailing-pairs",
        bodies: &[
            "cos = cos.repeat_interleave(2, dim=-1).unsqueeze(unsqueeze_dim)
sin = sin.repeat_interleave(2, dim=-1).unsqueeze(unsqueeze_dim)
rope_dim = cos.shape[-1]
nope, rope = x[..., :-rope_dim], x[..., -rope_dim:]
rotated = ((rope.float() * cos) + (rotate_half(rope).float() * sin)).to(x.dtype)
return torch.cat([nope, rotated], dim=-1)
",
        ],
        helper: Helper::Rotation("rotate_half"),
        tables: Tables::RepeatedPairs,
        cast_back: true,
        trailing: true,
    },
];

/// `(q, k=None, cos=None, sin=None, unsqueeze_dim=1)`.
const OPTIONAL_K_FORMS: &[Form] = &[Form {
    // Qwen4-Exp: the partial form, k rotated only when given.
    name: "optional-k-partial",
    bodies: &[concat!(
        unsqueeze!(),
        "rotary_dim = cos.shape[-1]
q_rope, q_nope = q[..., :rotary_dim], q[..., rotary_dim:]
q_rope = (q_rope * cos) + (rotate_half(q_rope) * sin)
q_rotated = torch.cat([q_rope, q_nope], dim=-1)
if k is not None:
    k_rope, k_nope = k[..., :rotary_dim], k[..., rotary_dim:]
    k_rope = (k_rope * cos) + (rotate_half(k_rope) * sin)
    k_rotated = torch.cat([k_rope, k_nope], dim=-1)
    return q_rotated, k_rotated
else:
    return q_rotated
"
    )],
    helper: Helper::Rotation("rotate_half"),
    tables: Tables::Plain,
    cast_back: false,
    trailing: false,
}];

/// `(tensor, sin, cos)`.
const SIN_COS_FORMS: &[Form] = &[Form {
    // GPT-J, CodeGen: the tables of one entry per pair unsqueezed at 2 and repeated per pair
    // (the partial rotary is the attention's: it passes the rotated slice).
    name: "sin-cos-pairs",
    bodies: &["sin = torch.repeat_interleave(sin[:, :, None, :], 2, 3)
cos = torch.repeat_interleave(cos[:, :, None, :], 2, 3)
return (tensor * cos) + (rotate_every_two(tensor) * sin)
"],
    helper: Helper::Rotation("rotate_every_two"),
    tables: Tables::RepeatedPairs,
    cast_back: false,
    trailing: false,
}];

/// `(q, k, v, cos, sin, position_ids, unsqueeze_dim=1)`.
const VALUES_FORMS: &[Form] = &[Form {
    // CLVP: the full form of q, k and v on the tables indexed by the positions.
    name: "indexed-qkv",
    bodies: &["cos = cos[position_ids].unsqueeze(unsqueeze_dim)
sin = sin[position_ids].unsqueeze(unsqueeze_dim)
q_embed = (q * cos) + (rotate_half(q) * sin)
k_embed = (k * cos) + (rotate_half(k) * sin)
v_embed = (v * cos) + (rotate_half(v) * sin)
return q_embed, k_embed, v_embed
"],
    helper: Helper::Rotation("rotate_half"),
    tables: Tables::Indexed,
    cast_back: false,
    trailing: false,
}];
