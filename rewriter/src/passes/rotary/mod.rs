//! The `rotary` pass: the module-level `apply_rotary_pos_emb` rewritten to
//! `forward_rewrite.rotary` (q and k in one fused call), or for a function of one tensor
//! to `forward_rewrite.rotary_single`.
//!
//! Site: the function `apply_rotary_pos_emb` of the module, when a class the model reaches
//! calls it by that name (the attention classes; the call resolves the module global at run
//! time, so replacing the global patches every caller of the module). Its signature picks a
//! family ([`operands`]: q and k; one tensor (Gemma 3n, Gemma 4, DeepSeek-V4); Qwen4-Exp's
//! optional k; GPT-J's `(tensor, sin, cos)`; CLVP's q, k and v), and it is patched only when
//! its statements are one of that family's forms ([`FORMS`] for q and k) and the helper the
//! form calls (`rotate_half`, GLM-4V's `rotate_half_llm`, Ernie 4.5-VL's `rotate_half_text`,
//! GPT-J's `rotate_every_two`) is one of [`ROTATIONS`]: the halves rotation (Llama), every two
//! entries (GPT-J, GLM, Cohere: `interleaved=True`) or minus the halves (NanoChat: `-sin`).
//! The forms of q and k: full or partial rotary (`rotary_dim = cos.shape[-1]`, the tail
//! passing through; Phi-3's with the rotation inside the concatenation), the cast back to q's
//! dtype (OLMo 3), the float32 forms that cast back (Cohere, ModernBERT decoder, HunYuan-VL,
//! Ernie 4.5-VL), the first half of each table repeated per pair (GLM, Helium, Ernie 4.5; the
//! emitted call repeats them the same way). The op is element-wise in its tables, so every
//! rotation goes with every form.
//! GPT-OSS computes the whole product in a helper, `_apply_rotary_emb(x, cos, sin)`, on the
//! halves of the head with tables of half its width ([`halves`]): Llama's product with each
//! table concatenated to itself, which the emitted code builds once (bound to `_fr_cos` /
//! `_fr_sin` in the guard's call) and fuses only when they are exactly as wide as q.
//! GPT-J's and DeepSeek-V4's tables hold one entry per pair, repeated per pair by the body;
//! the emitted code repeats them alike, once ([`Tables::RepeatedPairs`]); DeepSeek-V4 rotates
//! the trailing slice of its heads, which the op gets sliced and the emitted code
//! concatenates back behind the rest.
//! Everything else is refused.

use std::sync::OnceLock;

use crate::audit::PassReport;
use crate::parse::ParsedSource;
use crate::passes::fusion_common::{
    self, ImportBinding, ModuleDefs, Site, body_without_docstring, bound_only_by, emit_guarded,
    function_sha256, is_already_patched, plain_parameters, same_statements,
};
use crate::passes::{Pass, PassInput};
use operands::Operands;

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
        "The parameters are not `(q, k, cos, sin, unsqueeze_dim=1)`, transformers 4.x's `(q, k, cos, sin, position_ids=None, unsqueeze_dim=1)`, one tensor's `(x, cos, sin, unsqueeze_dim=1)` (Gemma 4, DeepSeek-V4), Qwen4-Exp's optional k `(q, k=None, cos=None, sin=None, unsqueeze_dim=1)`, GPT-J's `(tensor, sin, cos)` nor CLVP's `(q, k, v, cos, sin, position_ids, unsqueeze_dim=1)` (`**kwargs`, other names, optional positions, ...).",
    ),
    (
        "rotate-half-unknown",
        "The module's `rotate_half` (the helper the form calls; GPT-J's `rotate_every_two`) is missing or is not the halves, every-two or negated-halves rotation; GPT-OSS's `_apply_rotary_emb` is not exactly the product on halves (`torch.chunk(x, 2, dim=-1)`, `x1 * cos - x2 * sin`, `x2 * cos + x1 * sin`, concatenated in that order); or `torch` is not bound by `import torch` alone where the form or its lowering calls it (GPT-OSS, GPT-J, DeepSeek-V4).",
    ),
    (
        "rotary-form-unknown",
        "The statements are not one of the known forms of the signature's family (multimodal sections, repeat-interleaved halves of cos, complex products, prefix tokens, ...): matched in part, never approximated.",
    ),
    (
        "rotary-emit-invalid",
        "The emitted function does not re-parse as one patched function (a bug in this tool).",
    ),
];

/// A rotation helper of the module (`rotate_half`, or GLM-4V's `rotate_half_llm`): the
/// `forward_rewrite.rotary` layout it is. The op is element-wise in its tables for either
/// layout, so any rotation goes with any [`Form`].
struct Rotation {
    name: &'static str,
    /// Textual variants of the helper's body.
    bodies: &'static [&'static str],
    /// Pairs (2i, 2i + 1) (`interleaved=True`) instead of (i, i + rot_dim / 2).
    interleaved: bool,
    /// The helper is minus the halves rotation (NanoChat's `cat((x2, -x1))`):
    /// `x * cos + (-rotate_half(x)) * sin` is `x * cos + rotate_half(x) * (-sin)` exactly
    /// (a negation is exact), so the op gets `-sin`.
    negated: bool,
}

const ROTATIONS: &[Rotation] = &[
    Rotation {
        name: "halves",
        bodies: &["x1 = x[..., : x.shape[-1] // 2]
x2 = x[..., x.shape[-1] // 2 :]
return torch.cat((-x2, x1), dim=-1)
"],
        interleaved: false,
        negated: false,
    },
    Rotation {
        name: "every-two",
        bodies: &[
            // Cohere, BLT
            "x1 = x[..., ::2]
x2 = x[..., 1::2]
rot_x = torch.stack([-x2, x1], dim=-1).flatten(-2)
return rot_x
",
            // GLM, Ernie 4.5, Helium
            "x1 = x[..., 0::2]
x2 = x[..., 1::2]
return torch.stack((-x2, x1), dim=-1).flatten(-2)
",
            // GPT-J, CodeGen (`rotate_every_two`): the last dimension of 4-D x, as the guard
            // admits only (x[:, :, :, ::2] is x[..., ::2] there).
            "x1 = x[:, :, :, ::2]
x2 = x[:, :, :, 1::2]
x = torch.stack((-x2, x1), dim=-1)
return x.flatten(-2)
",
        ],
        interleaved: true,
        negated: false,
    },
    Rotation {
        name: "negated-halves",
        bodies: &["x1 = x[..., : x.shape[-1] // 2]
x2 = x[..., x.shape[-1] // 2 :]
return torch.cat((x2, -x1), dim=-1)
"],
        interleaved: false,
        negated: true,
    },
];

/// The tables `forward_rewrite.rotary` is given, from the function's `cos` and `sin`.
#[derive(Clone, Copy)]
enum Tables {
    /// As transformers passes them.
    Plain,
    /// The first half of each table repeated per pair, as the body builds them (GLM, Ernie
    /// 4.5, Helium); the emitted call repeats them the same way.
    RepeatedHalves,
    /// Each table concatenated to itself, `torch.cat((cos, cos), dim=-1)` (GPT-OSS: tables of
    /// half the head's width, applied to each half by [`halves`]'s helper). The emitted code
    /// builds them once, bound in the guard's call (`_fr_cos`, `_fr_sin`), and only when they
    /// are exactly as wide as the head: a narrower pair would be a partial rotary to the op,
    /// where stock broadcasts a width-1 table over each half, or fails.
    Concatenated,
    /// Tables of one entry per pair repeated per pair by the body (GPT-J, CodeGen:
    /// `torch.repeat_interleave(sin[:, :, None, :], 2, 3)`, unsqueezed at 2 on the way). The
    /// emitted code repeats them alike once, `cos.repeat_interleave(2, dim=-1)` (the same
    /// values for the 3-D tables the guard admits), bound in the guard's call (`_fr_cos`,
    /// `_fr_sin`), and only when the tensor is exactly as wide as the repeated tables: a wider
    /// one would be a partial rotary to the op, where stock fails to broadcast.
    RepeatedPairs,
    /// The tables indexed by the positions, `cos[position_ids]` (CLVP), bound once in the
    /// guard's call (`_fr_cos`, `_fr_sin`).
    Indexed,
}

impl Tables {
    fn of(self, table: &str) -> String {
        match self {
            Tables::Plain => table.to_string(),
            Tables::RepeatedHalves => {
                format!("{table}[..., : {table}.shape[-1] // 2].repeat_interleave(2, dim=-1)")
            }
            Tables::Concatenated | Tables::RepeatedPairs | Tables::Indexed => {
                format!("_fr_{table}")
            }
        }
    }

    /// The guard's `cos, sin` arguments, and what the `if` tests before the guard.
    fn guarded(self, first: &str) -> (String, String) {
        let bound = |of: fn(&str) -> String| {
            format!("(_fr_cos := {}), (_fr_sin := {})", of("cos"), of("sin"))
        };
        let exactly_twice = format!("{first}.shape[-1] == 2 * cos.shape[-1] and ");
        match self {
            Tables::Plain | Tables::RepeatedHalves => ("cos, sin".to_string(), String::new()),
            Tables::Concatenated => (
                bound(|t| format!("torch.cat(({t}, {t}), dim=-1)")),
                exactly_twice,
            ),
            Tables::RepeatedPairs => (
                bound(|t| format!("{t}.repeat_interleave(2, dim=-1)")),
                exactly_twice,
            ),
            Tables::Indexed => (bound(|t| format!("{t}[position_ids]")), String::new()),
        }
    }
}

/// The helper a form calls, by its name in the module.
#[derive(Clone, Copy)]
enum Helper {
    /// One of [`ROTATIONS`] (`rotate_half(x)`).
    Rotation(&'static str),
    /// GPT-OSS's product on halves (`_apply_rotary_emb(x, cos, sin)`, [`halves`]): the halves
    /// rotation, with `torch` bound by `import torch` alone (the helper and the emitted tables
    /// call it).
    HalvesProduct(&'static str),
}

impl Helper {
    fn name(self) -> &'static str {
        match self {
            Helper::Rotation(name) | Helper::HalvesProduct(name) => name,
        }
    }
}

/// One computation `apply_rotary_pos_emb` may hold, lowered to one `forward_rewrite.rotary`
/// call.
struct Form {
    name: &'static str,
    /// Textual variants of the body (statements after the docstring; comments aside).
    bodies: &'static [&'static str],
    /// The helper the body calls.
    helper: Helper,
    tables: Tables,
    /// The body computes in float32 and casts the results back to q's dtype
    /// (`out_dtype=q.dtype`).
    cast_back: bool,
    /// The rotated part is the head's last `2 * cos.shape[-1]` entries (DeepSeek-V4's
    /// `[nope | rope]` heads, with [`Tables::RepeatedPairs`]), the rest passing through in
    /// front of it: the op gets that slice, and the emitted code concatenates it back.
    trailing: bool,
}

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

/// `cos` and `sin` unsqueezed to broadcast against the heads, as every form starts.
macro_rules! unsqueeze {
    () => {
        "cos = cos.unsqueeze(unsqueeze_dim)
sin = sin.unsqueeze(unsqueeze_dim)
"
    };
}

/// The first half of each table repeated per pair (GLM, Ernie 4.5, Helium).
macro_rules! repeat_halves {
    () => {
        "cos = cos[..., : cos.shape[-1] // 2].repeat_interleave(2, dim=-1)
sin = sin[..., : sin.shape[-1] // 2].repeat_interleave(2, dim=-1)
"
    };
}

/// The plain product of the full form, q and k rotated whole.
macro_rules! full_product {
    () => {
        "q_embed = (q * cos) + (rotate_half(q) * sin)
k_embed = (k * cos) + (rotate_half(k) * sin)
"
    };
}

/// The partial forms' product on the rotated slices and the concatenation back.
macro_rules! partial_product {
    ($rotate:literal) => {
        concat!(
            "q_embed = (q_rot * cos) + (",
            $rotate,
            "(q_rot) * sin)
k_embed = (k_rot * cos) + (",
            $rotate,
            "(k_rot) * sin)
q_embed = torch.cat([q_embed, q_pass], dim=-1)
k_embed = torch.cat([k_embed, k_pass], dim=-1)
return q_embed, k_embed
"
        )
    };
}

const FORMS: &[Form] = &[
    Form {
        name: "full",
        bodies: &[concat!(
            unsqueeze!(),
            full_product!(),
            "return q_embed, k_embed\n"
        )],
        helper: Helper::Rotation("rotate_half"),
        tables: Tables::Plain,
        cast_back: false,
        trailing: false,
    },
    Form {
        name: "partial",
        bodies: &[
            concat!(
                unsqueeze!(),
                partial_split!(),
                partial_product!("rotate_half")
            ),
            // Nemotron, dots.llm3: q and k rebound to their rotated slices.
            concat!(
                unsqueeze!(),
                "rot_dim = cos.shape[-1]
q, q_pass = q[..., :rot_dim], q[..., rot_dim:]
k, k_pass = k[..., :rot_dim], k[..., rot_dim:]
",
                full_product!(),
                "return torch.cat((q_embed, q_pass), dim=-1), torch.cat((k_embed, k_pass), dim=-1)\n"
            ),
        ],
        helper: Helper::Rotation("rotate_half"),
        tables: Tables::Plain,
        cast_back: false,
        trailing: false,
    },
    Form {
        // Phi-3: the partial form with the rotation inside the concatenation.
        name: "partial-inline",
        bodies: &[concat!(
            unsqueeze!(),
            partial_split!(),
            "q_embed = torch.cat([(q_rot * cos) + (rotate_half(q_rot) * sin), q_pass], dim=-1)
k_embed = torch.cat([(k_rot * cos) + (rotate_half(k_rot) * sin), k_pass], dim=-1)
return q_embed, k_embed
"
        )],
        helper: Helper::Rotation("rotate_half"),
        tables: Tables::Plain,
        cast_back: false,
        trailing: false,
    },
    Form {
        // GLM-4V, GLM-OCR: the partial form rotating with their every-two helper.
        name: "partial-llm-helper",
        bodies: &[concat!(
            unsqueeze!(),
            partial_split!(),
            partial_product!("rotate_half_llm")
        )],
        helper: Helper::Rotation("rotate_half_llm"),
        tables: Tables::Plain,
        cast_back: false,
        trailing: false,
    },
    Form {
        // OLMo 3: the product in the promoted dtype, cast back per tensor.
        name: "cast-back",
        bodies: &[concat!(
            "q_type, k_type = q.dtype, k.dtype\n",
            unsqueeze!(),
            full_product!(),
            "return q_embed.to(q_type), k_embed.to(k_type)\n"
        )],
        helper: Helper::Rotation("rotate_half"),
        tables: Tables::Plain,
        cast_back: true,
        trailing: false,
    },
    Form {
        // Upcast to float32, rotated, cast back to q's dtype.
        name: "float32",
        bodies: &[
            // Cohere
            concat!(
                "dtype = q.dtype
q = q.float()
k = k.float()
",
                unsqueeze!(),
                full_product!(),
                "return q_embed.to(dtype=dtype), k_embed.to(dtype=dtype)\n"
            ),
            // ModernBERT decoder, Evolla
            concat!(
                "original_dtype = q.dtype\n",
                unsqueeze!(),
                "q_embed = (q.float() * cos) + (rotate_half(q.float()) * sin)
k_embed = (k.float() * cos) + (rotate_half(k.float()) * sin)
return q_embed.to(original_dtype), k_embed.to(original_dtype)
"
            ),
            // HunYuan-VL: the tables upcast too (exactly: the op computes in float32).
            "origin_dtype = q.dtype
q, k = q.float(), k.float()
cos = cos.unsqueeze(unsqueeze_dim).float()
sin = sin.unsqueeze(unsqueeze_dim).float()
q_embed = (q * cos) + (rotate_half(q) * sin)
k_embed = (k * cos) + (rotate_half(k) * sin)
return q_embed.to(origin_dtype), k_embed.to(origin_dtype)
",
        ],
        helper: Helper::Rotation("rotate_half"),
        tables: Tables::Plain,
        cast_back: true,
        trailing: false,
    },
    Form {
        // Helium
        name: "repeated-tables",
        bodies: &[concat!(
            unsqueeze!(),
            repeat_halves!(),
            full_product!(),
            "return q_embed, k_embed\n"
        )],
        helper: Helper::Rotation("rotate_half"),
        tables: Tables::RepeatedHalves,
        cast_back: false,
        trailing: false,
    },
    Form {
        // GLM, GLM-4: the repeated tables, the tail passing through.
        name: "repeated-tables-partial",
        bodies: &[concat!(
            unsqueeze!(),
            repeat_halves!(),
            partial_split!(),
            partial_product!("rotate_half")
        )],
        helper: Helper::Rotation("rotate_half"),
        tables: Tables::RepeatedHalves,
        cast_back: false,
        trailing: false,
    },
    Form {
        // Ernie 4.5: the repeated tables in float32, cast back to q's dtype.
        name: "repeated-tables-float32",
        bodies: &[concat!(
            "original_dtype = q.dtype\n",
            unsqueeze!(),
            repeat_halves!(),
            "q_embed = (q.float() * cos) + (rotate_half(q).float() * sin)
k_embed = (k.float() * cos) + (rotate_half(k).float() * sin)
return q_embed.to(original_dtype), k_embed.to(original_dtype)
"
        )],
        helper: Helper::Rotation("rotate_half"),
        tables: Tables::RepeatedHalves,
        cast_back: true,
        trailing: false,
    },
    Form {
        // Ernie 4.5-VL: Ernie 4.5's float32 form on the tables as passed (its rotary embedding
        // repeats them per pair itself), rotating with its every-two `rotate_half_text`.
        name: "float32-text-helper",
        bodies: &[concat!(
            "original_dtype = q.dtype\n",
            unsqueeze!(),
            "q_embed = (q.float() * cos) + (rotate_half_text(q).float() * sin)
k_embed = (k.float() * cos) + (rotate_half_text(k).float() * sin)
return q_embed.to(original_dtype), k_embed.to(original_dtype)
"
        )],
        helper: Helper::Rotation("rotate_half_text"),
        tables: Tables::Plain,
        cast_back: true,
        trailing: false,
    },
    Form {
        // GPT-OSS: the product in a helper, on the halves of the head with tables of half
        // its width.
        name: "half-tables",
        bodies: &[concat!(
            unsqueeze!(),
            "q_embed = _apply_rotary_emb(q, cos, sin)
k_embed = _apply_rotary_emb(k, cos, sin)
return q_embed, k_embed
"
        )],
        helper: Helper::HalvesProduct("_apply_rotary_emb"),
        tables: Tables::Concatenated,
        cast_back: false,
        trailing: false,
    },
];

/// The parsed bodies of each family's forms ([`Operands::forms`], in [`Operands::ALL`]'s
/// order) and of [`ROTATIONS`], index for index.
struct Templates {
    families: Vec<Vec<Vec<ParsedSource>>>,
    rotations: Vec<Vec<ParsedSource>>,
}

fn templates() -> &'static Templates {
    static T: OnceLock<Templates> = OnceLock::new();
    let parse = |bodies: &[&str]| bodies.iter().map(|b| fusion_common::template(b)).collect();
    T.get_or_init(|| Templates {
        families: Operands::ALL
            .iter()
            .map(|o| o.forms().iter().map(|f| parse(f.bodies)).collect())
            .collect(),
        rotations: ROTATIONS.iter().map(|r| parse(r.bodies)).collect(),
    })
}

/// The first of `items` one of whose parsed bodies (`bodies`, index for index) `stmts` is.
fn first_match<'t, T>(
    items: &'t [T],
    bodies: &[Vec<ParsedSource>],
    stmts: &[ruff_python_ast::Stmt],
) -> Option<&'t T> {
    items.iter().zip(bodies).find_map(|(item, bodies)| {
        bodies
            .iter()
            .any(|t| same_statements(stmts, t))
            .then_some(item)
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
    let Some(operands) = Operands::of(function) else {
        return refuse("rotary-signature", operands::SIGNATURE_DETAIL);
    };
    let body = body_without_docstring(function);
    let family = Operands::ALL.iter().position(|o| *o == operands);
    let bodies = &templates().families[family.expect("every family is in ALL")];
    let Some(form) = first_match(operands.forms(), bodies, body) else {
        return refuse(
            "rotary-form-unknown",
            "apply_rotary_pos_emb is not one of the known forms",
        );
    };
    let helper = defs.functions.get(form.helper.name()).copied();
    let rotation = match form.helper {
        Helper::Rotation(_) => helper.and_then(|f| {
            if !matches!(plain_parameters(f, false).as_deref(), Some([(p, false)]) if p == "x") {
                return None;
            }
            first_match(ROTATIONS, &templates().rotations, body_without_docstring(f))
        }),
        Helper::HalvesProduct(name) => {
            if !helper.is_some_and(halves::is_halves_product) {
                return refuse(
                    "rotate-half-unknown",
                    &format!(
                        "{name} is missing or not exactly the product on halves (chunk(2, dim=-1), x1 * cos - x2 * sin, x2 * cos + x1 * sin, concatenated in that order)"
                    ),
                );
            }
            if !torch_bound(defs) {
                return refuse(
                    "rotate-half-unknown",
                    &format!("{name} calls torch, which is not bound by `import torch` alone"),
                );
            }
            ROTATIONS.iter().find(|r| r.name == "halves")
        }
    };
    let Some(rotation) = rotation else {
        return refuse(
            "rotate-half-unknown",
            &format!(
                "{} is missing or not the halves / every-two rotation (or its negation)",
                form.helper.name()
            ),
        );
    };
    // GPT-J's body calls torch.repeat_interleave, DeepSeek-V4's emitted code torch.cat.
    if (matches!(form.tables, Tables::RepeatedPairs) || form.trailing) && !torch_bound(defs) {
        return refuse(
            "rotate-half-unknown",
            "the form or its lowering calls torch, which is not bound by `import torch` alone",
        );
    }
    let lines = operands.lower(form, rotation);
    match emit_guarded(defs.source, function, &lines) {
        Ok(patch) => {
            let mut site = refuse("rotary-emit-invalid", "");
            site.verdict = "patched";
            site.reason = None;
            site.detail = String::new();
            site.original_sha256 = Some(function_sha256(defs.source, function));
            site.patch = Some(patch);
            site.lowered.insert("form".into(), form.name.into());
            site.lowered.insert("rotation".into(), rotation.name.into());
            site
        }
        Err(e) => refuse("rotary-emit-invalid", &e),
    }
}

/// Whether the module's `torch` is torch: bound by one `import torch` and nothing else.
fn torch_bound(defs: &ModuleDefs<'_>) -> bool {
    bound_only_by(defs, "torch", |b| {
        matches!(
            b,
            ImportBinding::Import {
                module: "torch",
                aliased: false
            }
        )
    })
}

mod halves;
mod operands;
#[cfg(test)]
mod tests;
