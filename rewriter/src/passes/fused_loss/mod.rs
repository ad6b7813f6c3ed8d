//! The fused-loss pass: match the lm_head + loss triplet of a language-model forward, in
//! either of its two shapes (`self.loss_function(...)`, `site.rs`; the classic shift +
//! `CrossEntropyLoss`, `classic.rs`), refuse with a precise reason when the fused op could
//! not compute the same loss, and emit the patched forward.
//!
//! Order of the checks (the first failing one gives the reason): the forward exists and is
//! not already patched; no name conflict; an overridden `loss_function`; the loss site
//! (`site.rs` / `classic.rs`); the loss is transformers' causal loss (`self.loss_function`
//! style only); the region (`region.rs`, `transforms.rs`); the head is a plain `nn.Linear`
//! (`head.rs`); emission and its re-parse (`emit.rs`).

mod classic;
mod emit;
mod head;
mod region;
mod site;
mod transforms;

use ruff_python_ast::{Expr, Stmt, StmtFunctionDef};
use ruff_text_size::Ranged;

use crate::analyze::{LossResolution, ParsedClass};
use crate::audit::{ClassReport, LossStyleKind, Verdict};
use crate::hash::forward_sha256;
use crate::parse::ParsedSource;
use crate::reason::Reason;
use crate::syntax::{attributes_in_stmt, method, names_in_stmt, self_attribute, walk_statements};

pub use emit::MARKER;

/// A refusal: the code and a sentence saying what was seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: Reason,
    pub detail: String,
}

impl Refusal {
    pub fn new(reason: Reason, detail: impl Into<String>) -> Refusal {
        Refusal {
            reason,
            detail: detail.into(),
        }
    }
}

/// The name the patched code uses for the runtime package.
pub const RUNTIME_NAME: &str = "forward_rewrite";

pub(crate) fn analyze(chain: &[ParsedClass<'_>], loss: &LossResolution, report: &mut ClassReport) {
    if let Err(refusal) = run(chain, loss, report) {
        report.refuse(refusal.reason, refusal.detail);
    }
}

/// The class of the chain that defines `forward`, and the def.
fn find_forward<'c, 's>(
    chain: &'c [ParsedClass<'s>],
) -> Result<(&'c ParsedClass<'s>, &'c StmtFunctionDef), Refusal> {
    for class in chain {
        let body = &class.class_def().body;
        if let Some(def) = method(body, "forward") {
            return Ok((class, def));
        }
        let assigned = body.iter().any(|stmt| match stmt {
            Stmt::Assign(a) => a
                .targets
                .iter()
                .any(|t| matches!(t, Expr::Name(n) if n.id.as_str() == "forward")),
            Stmt::AnnAssign(a) => matches!(&*a.target, Expr::Name(n) if n.id.as_str() == "forward"),
            _ => false,
        });
        if assigned {
            return Err(Refusal::new(
                Reason::NoForward,
                format!(
                    "{} assigns `forward` instead of defining it",
                    class.source.qualname
                ),
            ));
        }
    }
    let names: Vec<&str> = chain.iter().map(|c| c.source.qualname.as_str()).collect();
    Err(Refusal::new(
        Reason::NoForward,
        format!(
            "no class of the chain ({}) defines forward",
            names.join(" -> ")
        ),
    ))
}

fn run(
    chain: &[ParsedClass<'_>],
    loss: &LossResolution,
    report: &mut ClassReport,
) -> Result<(), Refusal> {
    let (owner, def) = find_forward(chain)?;
    let src = &owner.parsed;
    let forward = forward_range(src, def);
    report.forward_sha256 = Some(forward_sha256(&src.text[forward.clone()]));
    report.forward_owner = Some(owner.source.qualname.clone());
    report.forward_module = Some(owner.source.module.clone());
    report.forward_path = Some(owner.source.path.clone());
    report.forward_line = Some(owner.file_line(forward.start));

    if is_already_patched(def) {
        return Err(Refusal::new(
            Reason::AlreadyPatched,
            "the forward already calls forward_rewrite",
        ));
    }
    check_name_conflict(chain, def)?;

    // An overridden `loss_function` decides the verdict before the shape of its call does.
    if calls_loss_function(def) {
        check_loss_function(chain)?;
    }
    let site = site::find_loss_site(def, &src.text)?;
    report.loss_style = Some(match site.style {
        site::LossStyle::LossFunction(_) => LossStyleKind::LossFunction,
        site::LossStyle::CrossEntropy(_) => LossStyleKind::CrossEntropy,
    });
    if let site::LossStyle::LossFunction(_) = site.style {
        check_loss_type(chain, loss)?;
    }

    let region = region::match_region(src, def, &site)?;
    report.head = Some(region.head.clone());
    report.transforms = region.transforms.clone();
    report.head_bias = head::check_head(chain, &region.head)?;

    let patched = emit::emit(src, def, forward, &region, &site.target)?;
    verify(&patched)?;
    report.verdict = Verdict::Patched;
    report.reason = None;
    report.detail = String::new();
    report.patched_forward = Some(patched);
    Ok(())
}

/// The text of the forward the chain runs (as in the file, not dedented).
pub(crate) fn forward_text(chain: &[ParsedClass<'_>]) -> Option<String> {
    let (owner, def) = find_forward(chain).ok()?;
    Some(owner.parsed.text[forward_range(&owner.parsed, def)].to_string())
}

/// The forward the chain runs, dedented to column 0 the way emission does it (lines that
/// continue a multi-line string untouched): the unpatched counterpart of `patched_forward`.
pub(crate) fn original_forward(chain: &[ParsedClass<'_>]) -> Option<String> {
    let (owner, def) = find_forward(chain).ok()?;
    Some(emit::original(
        &owner.parsed,
        forward_range(&owner.parsed, def),
    ))
}

/// The forward's text the way `inspect.getsource` returns it: from the line of the first
/// decorator through the last line of the body, plus trailing comments at body depth.
fn forward_range(src: &ParsedSource, def: &StmtFunctionDef) -> std::ops::Range<usize> {
    let start = src.line_start(def.start().to_usize());
    let body_column = def
        .body
        .first()
        .map_or(0, |s| src.column_of(s.start().to_usize()));
    start..src.block_end(def.end(), body_column)
}

/// Whether the forward calls `self.loss_function(...)` anywhere.
fn calls_loss_function(def: &StmtFunctionDef) -> bool {
    def.body.iter().any(|stmt| {
        crate::syntax::calls_in_stmt(stmt)
            .iter()
            .any(|call| self_attribute(&call.func) == Some("loss_function"))
    })
}

/// Whether a forward reads `forward_rewrite.<something>`: this tool's output.
pub fn is_already_patched(def: &StmtFunctionDef) -> bool {
    def.body.iter().any(|stmt| {
        attributes_in_stmt(stmt)
            .iter()
            .any(|attr| matches!(&*attr.value, Expr::Name(n) if n.id.as_str() == RUNTIME_NAME))
    })
}

/// The patched forward reads the global `forward_rewrite`; nothing in the chain or the
/// forward may bind that name locally.
fn check_name_conflict(chain: &[ParsedClass<'_>], def: &StmtFunctionDef) -> Result<(), Refusal> {
    for class in chain {
        for stmt in &class.class_def().body {
            let binds = match stmt {
                Stmt::FunctionDef(f) => f.name.as_str() == RUNTIME_NAME,
                Stmt::Assign(_) | Stmt::AnnAssign(_) => names_in_stmt(stmt)
                    .iter()
                    .any(|n| n.id.as_str() == RUNTIME_NAME && !n.ctx.is_load()),
                _ => false,
            };
            if binds {
                return Err(Refusal::new(
                    Reason::NameConflict,
                    format!(
                        "{} binds the class attribute forward_rewrite",
                        class.source.qualname
                    ),
                ));
            }
        }
    }
    if def
        .parameters
        .iter()
        .any(|p| p.name().as_str() == RUNTIME_NAME)
    {
        return Err(Refusal::new(
            Reason::NameConflict,
            "the forward has a parameter named forward_rewrite",
        ));
    }
    let mut statements = Vec::new();
    walk_statements(&def.body, &mut statements);
    for stmt in statements {
        let binds = names_in_stmt(stmt)
            .iter()
            .any(|n| n.id.as_str() == RUNTIME_NAME && !n.ctx.is_load());
        let imports = match stmt {
            Stmt::Import(i) => i
                .names
                .iter()
                .any(|a| a.asname.as_ref().unwrap_or(&a.name).as_str() == RUNTIME_NAME),
            Stmt::ImportFrom(i) => i
                .names
                .iter()
                .any(|a| a.asname.as_ref().unwrap_or(&a.name).as_str() == RUNTIME_NAME),
            Stmt::FunctionDef(f) => f.name.as_str() == RUNTIME_NAME,
            Stmt::ClassDef(c) => c.name.as_str() == RUNTIME_NAME,
            _ => false,
        };
        if binds || imports {
            return Err(Refusal::new(
                Reason::NameConflict,
                "the forward binds the name forward_rewrite locally",
            ));
        }
    }
    Ok(())
}

/// `loss_function` replaced anywhere in the chain (method, property, class attribute,
/// `self.loss_function = ...` / `self._loss_function = ...`).
fn check_loss_function(chain: &[ParsedClass<'_>]) -> Result<(), Refusal> {
    const NAMES: [&str; 2] = ["loss_function", "_loss_function"];
    for class in chain {
        let owner = &class.source.qualname;
        for stmt in &class.class_def().body {
            let defines = match stmt {
                Stmt::FunctionDef(f) => NAMES.contains(&f.name.as_str()),
                Stmt::Assign(a) => a
                    .targets
                    .iter()
                    .any(|t| matches!(t, Expr::Name(n) if NAMES.contains(&n.id.as_str()))),
                Stmt::AnnAssign(a) => {
                    matches!(&*a.target, Expr::Name(n) if NAMES.contains(&n.id.as_str()))
                }
                _ => false,
            };
            if defines {
                return Err(Refusal::new(
                    Reason::LossFunctionOverridden,
                    format!("{owner} defines loss_function"),
                ));
            }
            if let Stmt::FunctionDef(f) = stmt {
                let mut statements = Vec::new();
                walk_statements(&f.body, &mut statements);
                for s in statements {
                    let targets: Vec<&Expr> = match s {
                        Stmt::Assign(a) => a.targets.iter().collect(),
                        Stmt::AnnAssign(a) => vec![&*a.target],
                        _ => continue,
                    };
                    if targets
                        .iter()
                        .any(|t| self_attribute(t).is_some_and(|a| NAMES.contains(&a)))
                    {
                        return Err(Refusal::new(
                            Reason::LossFunctionOverridden,
                            format!("{owner}.{} assigns self.loss_function", f.name.as_str()),
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Keys of `LOSS_MAPPING` that map to `ForCausalLMLoss` in every supported transformers.
const CAUSAL_LOSS_TYPES: [&str; 2] = ["ForCausalLM", "ForConditionalGeneration"];

/// The resolution given by the caller, overridden by a `self.loss_type = "..."` in the
/// most-derived `__init__` of the chain that assigns it (it runs after
/// `PreTrainedModel.__init__` computed the default).
fn check_loss_type(chain: &[ParsedClass<'_>], given: &LossResolution) -> Result<(), Refusal> {
    let mut resolution = given.clone();
    let mut origin = "LOSS_MAPPING".to_string();
    'chain: for class in chain {
        let Some(init) = method(&class.class_def().body, "__init__") else {
            continue;
        };
        let mut statements = Vec::new();
        walk_statements(&init.body, &mut statements);
        for stmt in statements.iter().rev() {
            let Stmt::Assign(a) = stmt else { continue };
            if !a
                .targets
                .iter()
                .any(|t| self_attribute(t) == Some("loss_type"))
            {
                continue;
            }
            origin = format!("{}.__init__", class.source.qualname);
            resolution = match &*a.value {
                Expr::StringLiteral(s) if CAUSAL_LOSS_TYPES.contains(&s.value.to_str()) => {
                    LossResolution::Causal
                }
                Expr::StringLiteral(s) => LossResolution::Other(s.value.to_str().to_string()),
                _ => LossResolution::Unknown,
            };
            break 'chain;
        }
    }
    match resolution {
        LossResolution::Causal => Ok(()),
        LossResolution::Other(name) => Err(Refusal::new(
            Reason::LossNotCausal,
            format!("loss_type resolves to {name} (from {origin}), not ForCausalLMLoss"),
        )),
        LossResolution::Unknown => Err(Refusal::new(
            Reason::LossUnresolved,
            format!("loss_type cannot be resolved statically (from {origin})"),
        )),
    }
}

/// Every emitted forward must re-parse as one `def forward` at column 0 and be recognised
/// as already patched; anything else is a bug of this tool and a `failed` verdict.
pub(crate) fn verify(patched: &str) -> Result<(), Refusal> {
    let parsed = ParsedSource::parse(patched).map_err(|e| {
        Refusal::new(
            Reason::EmitInvalid,
            format!("the emitted forward does not parse: {e}"),
        )
    })?;
    let [Stmt::FunctionDef(def)] = parsed.suite().as_slice() else {
        return Err(Refusal::new(
            Reason::EmitInvalid,
            "the emitted text is not a single def",
        ));
    };
    if def.name.as_str() != "forward" || !is_already_patched(def) {
        return Err(Refusal::new(
            Reason::EmitInvalid,
            "the emitted forward is not recognised as patched",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_classic;
