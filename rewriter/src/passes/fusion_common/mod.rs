//! What the decoder-fusion passes (`rms_norm`, `rotary`, `gated_mlp`) share: which classes of
//! the defining module a model class reaches, the sites they patch (a class's `forward` or a
//! module-level function, both outside the model class), the per-class report that lists
//! them, and the emission of a guarded fused path in front of the untouched stock body.
//!
//! A site's patch is the complete function, dedented to column 0, ready to `exec` in the
//! namespace of the module that defines it: the decorators and the stock body byte for byte,
//! with `if <guard>: return <fused>` inserted before the first statement after the docstring.
//! The guard (`forward_rewrite.fusion_guard.*`) is checked on every call; when it fails the
//! stock body runs (invariant 3). `original_sha256` is the contract-2 hash of the stock
//! function's source: the installer replaces a function only when the running one hashes to it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ruff_python_ast::comparable::ComparableStmt;
use ruff_python_ast::{Expr, Stmt, StmtClassDef, StmtFunctionDef};
use ruff_text_size::{Ranged, TextRange};
use serde::Serialize;

use crate::audit::PassReport;
use crate::parse::ParsedSource;
use crate::passes::PassInput;
use crate::passes::fused_loss::RUNTIME_NAME;

/// One patch site of a decoder-fusion pass.
#[derive(Clone, Debug, Serialize)]
pub struct Site {
    /// `class` (the class's `forward` is replaced) or `function` (a module-level function).
    pub kind: &'static str,
    /// The class or function name in the defining module.
    pub name: String,
    /// 1-based line of the class / function statement in the module.
    pub line: u32,
    /// `patched` or `refused`.
    pub verdict: &'static str,
    /// The pass's reason code, null exactly when patched.
    pub reason: Option<&'static str>,
    pub detail: String,
    /// Contract-2 hash of the stock function (the forward, or the module-level function).
    pub original_sha256: Option<String>,
    /// The patched function (dedented to column 0), present only when patched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch: Option<String>,
    /// What the fused call was lowered with (eps attribute, offset, activation, ...).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub lowered: BTreeMap<String, String>,
}

impl Site {
    pub fn refused(
        kind: &'static str,
        name: &str,
        line: u32,
        reason: &'static str,
        detail: impl Into<String>,
    ) -> Site {
        Site {
            kind,
            name: name.to_string(),
            line,
            verdict: "refused",
            reason: Some(reason),
            detail: detail.into(),
            original_sha256: None,
            patch: None,
            lowered: BTreeMap::new(),
        }
    }
}

/// The per-class report: `patched` when at least one site is patched (the others are listed
/// with their reasons), else `refused` with the first site's reason, or `no_site` when the
/// class reaches no site in its module.
pub fn report(mut sites: Vec<Site>, no_site: &'static str, no_site_detail: &str) -> PassReport {
    sites.sort_by(|a, b| (a.line, &a.name).cmp(&(b.line, &b.name)));
    sites.dedup_by(|a, b| a.name == b.name && a.kind == b.kind);
    let mut out = if sites.iter().any(|s| s.verdict == "patched") {
        let refused = sites.iter().filter(|s| s.verdict != "patched").count();
        let detail = if refused == 0 {
            String::new()
        } else {
            format!("{refused} of {} sites refused", sites.len())
        };
        PassReport::new("patched", None, detail)
    } else if let Some(first) = sites.first() {
        PassReport::new("refused", first.reason, first.detail.clone())
    } else {
        PassReport::new("refused", Some(no_site), no_site_detail)
    };
    out.extra.insert(
        "sites".to_string(),
        serde_json::to_value(&sites).unwrap_or_default(),
    );
    out
}

/// The module's top-level classes and functions (also those under a top-level `if` / `try`,
/// as the index finds classes). Later definitions of a name win, as in Python.
pub struct ModuleDefs<'m> {
    pub source: &'m ParsedSource,
    pub classes: HashMap<&'m str, &'m StmtClassDef>,
    pub functions: HashMap<&'m str, &'m StmtFunctionDef>,
}

impl<'m> ModuleDefs<'m> {
    pub fn of(source: &'m ParsedSource) -> ModuleDefs<'m> {
        let mut defs = ModuleDefs {
            source,
            classes: HashMap::new(),
            functions: HashMap::new(),
        };
        defs.visit(source.suite(), 0);
        defs
    }

    fn visit(&mut self, body: &'m [Stmt], depth: usize) {
        for stmt in body {
            match stmt {
                Stmt::ClassDef(c) => {
                    self.classes.insert(c.name.as_str(), c);
                }
                Stmt::FunctionDef(f) => {
                    self.functions.insert(f.name.as_str(), f);
                }
                Stmt::If(_) | Stmt::Try(_) if depth == 0 => {
                    for block in crate::syntax::child_blocks(stmt) {
                        self.visit(block, depth + 1);
                    }
                }
                _ => {}
            }
        }
    }

    /// 1-based line of a statement of the module (its first decorator).
    pub fn line(&self, node: &impl Ranged) -> u32 {
        self.source.line_of(node.start().to_usize())
    }

    /// The module classes a class reaches: itself, its written bases and every module class
    /// its body names (what `__init__` builds, tables of layer classes, ...), transitively.
    /// A superset of what the model runs is harmless: each site is patched on its own merits.
    pub fn reachable(&self, start: &str) -> Vec<&'m StmtClassDef> {
        let mut seen: BTreeSet<&str> = BTreeSet::new();
        let mut queue = vec![start.to_string()];
        let mut out = Vec::new();
        while let Some(name) = queue.pop() {
            let Some((&key, &class)) = self.classes.get_key_value(name.as_str()) else {
                continue;
            };
            if !seen.insert(key) {
                continue;
            }
            out.push(class);
            let mut names = Vec::new();
            if let Some(arguments) = &class.arguments {
                for base in arguments.args.iter() {
                    names.extend(crate::syntax::names_in_expr(base));
                }
            }
            for stmt in class.body.iter() {
                names.extend(crate::syntax::names_in_stmt(stmt));
            }
            for n in names {
                if self.classes.contains_key(n.id.as_str()) && !seen.contains(n.id.as_str()) {
                    queue.push(n.id.to_string());
                }
            }
        }
        out.sort_by_key(|c| c.start());
        out
    }

    /// The class of `class`'s chain inside this module that defines `method` (the class
    /// itself, then its written bases depth-first), with the method.
    pub fn method_owner(
        &self,
        class: &'m StmtClassDef,
        method: &str,
    ) -> Option<(&'m StmtClassDef, &'m StmtFunctionDef)> {
        self.method_owner_depth(class, method, 0)
    }

    fn method_owner_depth(
        &self,
        class: &'m StmtClassDef,
        method: &str,
        depth: usize,
    ) -> Option<(&'m StmtClassDef, &'m StmtFunctionDef)> {
        if let Some(def) = crate::syntax::method(&class.body, method) {
            return Some((class, def));
        }
        if depth > 8 {
            return None;
        }
        for base in class.arguments.as_ref()?.args.iter() {
            if let Expr::Name(n) = base
                && let Some(base) = self.classes.get(n.id.as_str())
                && let Some(found) = self.method_owner_depth(base, method, depth + 1)
            {
                return Some(found);
            }
        }
        None
    }
}

/// The model class a pass starts from: the most-derived class of the chain, looked up in the
/// module. None when the module is not known or does not define it.
pub fn start<'m>(input: &PassInput<'_, '_>, defs: &ModuleDefs<'m>) -> Option<&'m StmtClassDef> {
    defs.classes.get(input.fused.qualname.as_str()).copied()
}

/// The text of a function as `inspect.getsource` returns it (first decorator line through
/// the body, plus trailing comments at body depth).
pub fn function_range(src: &ParsedSource, def: &StmtFunctionDef) -> std::ops::Range<usize> {
    let start = src.line_start(def.start().to_usize());
    let body_column = def
        .body
        .first()
        .map_or(0, |s| src.column_of(s.start().to_usize()));
    start..src.block_end(def.end(), body_column)
}

/// Contract-2 hash of a function's source.
pub fn function_sha256(src: &ParsedSource, def: &StmtFunctionDef) -> String {
    crate::hash::forward_sha256(&src.text[function_range(src, def)])
}

/// The body without a leading docstring.
pub fn body_without_docstring(def: &StmtFunctionDef) -> &[Stmt] {
    match def.body.first() {
        Some(Stmt::Expr(e)) if e.value.is_string_literal_expr() => &def.body[1..],
        _ => &def.body[..],
    }
}

/// Whether the function already reads `forward_rewrite.<something>` (this tool's output).
pub fn is_already_patched(def: &StmtFunctionDef) -> bool {
    def.body.iter().any(|stmt| {
        crate::syntax::attributes_in_stmt(stmt)
            .iter()
            .any(|attr| matches!(&*attr.value, Expr::Name(n) if n.id.as_str() == RUNTIME_NAME))
    })
}

/// The function dedented to column 0 with `lines` (relative to the body's indentation)
/// inserted before the first statement after the docstring. Lines that continue a
/// multi-line string are kept as they are. Errors when the body shares a line with the
/// signature, or an indentation mixes tabs.
pub fn emit_guarded(
    src: &ParsedSource,
    def: &StmtFunctionDef,
    lines: &[String],
) -> Result<String, String> {
    let Some(first) = body_without_docstring(def).first() else {
        return Err("the function has no body besides its docstring".to_string());
    };
    emit_edited(src, def, first.start().to_usize(), |at| {
        (at == src.line_start(first.start().to_usize())).then(|| Edit {
            lines: lines.to_vec(),
            indent_until: None,
        })
    })
}

/// A run of a function body's top-level statements to put behind a guard.
pub struct Branch {
    /// The run's first and last statement (the range from the one's start to the other's
    /// end; the run must own its lines: nothing else starts on its first line).
    pub range: TextRange,
    /// `if <guard>:` and the fused statements, relative to the run's indentation.
    pub fused: Vec<String>,
}

/// The function dedented to column 0 with each branch's statements moved under `else:`
/// behind its fused lines (`if <guard>:` / the fused statements / `else:` / the stock
/// statements, one level in, byte for byte otherwise). Errors as [`emit_guarded`], and when a
/// run shares its first line with another statement.
pub fn emit_branched(
    src: &ParsedSource,
    def: &StmtFunctionDef,
    branches: &[Branch],
) -> Result<String, String> {
    let Some(first) = body_without_docstring(def).first() else {
        return Err("the function has no body besides its docstring".to_string());
    };
    for b in branches {
        let start = b.range.start().to_usize();
        if src.text[src.line_start(start)..start].trim() != "" {
            return Err("a guarded statement shares its line".to_string());
        }
    }
    emit_edited(src, def, first.start().to_usize(), |at| {
        let b = branches
            .iter()
            .find(|b| src.line_start(b.range.start().to_usize()) == at)?;
        let mut lines = b.fused.clone();
        lines.push("else:".to_string());
        Some(Edit {
            lines,
            indent_until: Some(b.range.end().to_usize()),
        })
    })
}

/// What [`emit_edited`] puts at a line of the function.
struct Edit {
    /// Lines inserted before it, relative to the body's indentation.
    lines: Vec<String>,
    /// Indent it and the following lines one level more, through the one holding this offset.
    indent_until: Option<usize>,
}

/// The function dedented to column 0, with `edit(line start)`'s lines inserted before a line
/// and runs of lines indented one more level, its docstring-only decorators dropped;
/// re-parsed to check it is one patched function.
/// `body_start` is the offset of a body statement (its indentation is the body's).
fn emit_edited(
    src: &ParsedSource,
    def: &StmtFunctionDef,
    body_start: usize,
    edit: impl Fn(usize) -> Option<Edit>,
) -> Result<String, String> {
    let range = function_range(src, def);
    let body_indent = src.indentation_at(body_start).to_string();
    let margin = src.indentation_at(range.start).to_string();
    if src.text[src.line_start(body_start)..body_start].trim() != ""
        || body_indent.contains('\t')
        || margin.contains('\t')
        || !body_indent.starts_with(&margin)
    {
        return Err("the body cannot be indented safely".to_string());
    }
    let inner = &body_indent[margin.len()..];
    // Docstring-only decorators are dropped (`syntax::DOCSTRING_DECORATORS` says why): the
    // lines from each one's `@` through its expression's end.
    let dropped: Vec<(usize, usize)> = def
        .decorator_list
        .iter()
        .filter(|d| crate::syntax::is_docstring_decorator(&d.expression))
        .map(|d| {
            (
                src.line_start(d.start().to_usize()),
                src.line_end(d.end().to_usize()),
            )
        })
        .collect();
    let mut out = String::with_capacity(range.len() + 512);
    let mut offset = range.start;
    let mut indent_until = None;
    while offset < range.end {
        if let Some(&(_, end)) = dropped.iter().find(|(start, _)| *start == offset) {
            offset = end + 1;
            continue;
        }
        if let Some(e) = edit(offset) {
            for line in &e.lines {
                if !line.is_empty() {
                    out.push_str(inner);
                    out.push_str(line);
                }
                out.push('\n');
            }
            indent_until = e.indent_until;
        }
        let line_end = src.line_end(offset).min(range.end);
        let line = &src.text[offset..line_end];
        let extra = match indent_until {
            Some(until) if offset <= until => inner,
            _ => "",
        };
        if src.in_string(offset) {
            out.push_str(line);
        } else if line.trim().is_empty() {
        } else if let Some(rest) = line.strip_prefix(margin.as_str()) {
            out.push_str(extra);
            out.push_str(rest);
        } else {
            out.push_str(extra);
            out.push_str(line.trim_start());
        }
        out.push('\n');
        offset = line_end + 1;
    }
    let reparsed = ParsedSource::parse(out.clone()).map_err(|e| e.message)?;
    match &reparsed.suite()[..] {
        [Stmt::FunctionDef(f)] if is_already_patched(f) => Ok(out),
        _ => Err("the emitted function does not re-parse as one patched function".to_string()),
    }
}

/// One import that binds a module-level name: `import <module> [as name]`, or `from <module>
/// import <name> [as ...]` at `level` dots.
pub enum ImportBinding<'a> {
    Import {
        module: &'a str,
        aliased: bool,
    },
    From {
        level: u32,
        module: Option<&'a str>,
        name: &'a str,
    },
}

/// `import torch.nn.functional as <name>` or `from torch.nn import functional [as <name>]`:
/// the binding under which `<name>.silu` is torch's functional SiLU.
pub fn is_torch_functional(b: ImportBinding<'_>) -> bool {
    match b {
        ImportBinding::Import { module, aliased } => module == "torch.nn.functional" && aliased,
        ImportBinding::From {
            level,
            module,
            name,
        } => level == 0 && module == Some("torch.nn") && name == "functional",
    }
}

/// `from torch import nn [as nn]` or `import torch.nn as nn`: the binding under which
/// `nn.functional.silu` is torch's functional SiLU (the name looked up is `nn`, so an alias
/// is `nn` itself).
pub fn is_torch_nn(b: ImportBinding<'_>) -> bool {
    match b {
        ImportBinding::Import { module, aliased } => module == "torch.nn" && aliased,
        ImportBinding::From {
            level,
            module,
            name,
        } => level == 0 && module == Some("torch") && name == "nn",
    }
}

/// Whether `name` is bound at the module's top level (compound statements walked, function and
/// class bodies being scopes of their own) exactly once, by an import `wanted` accepts, and by
/// nothing else: another import, a `def` / `class`, or an assignment to it. What the runtime
/// then finds under the name is what the import gave, as the rewriter read it.
pub fn bound_only_by(
    defs: &ModuleDefs<'_>,
    name: &str,
    wanted: impl Fn(ImportBinding<'_>) -> bool,
) -> bool {
    let (mut good, mut other) = (0, 0);
    let mut tally = |ok: bool| {
        if ok {
            good += 1;
        } else {
            other += 1;
        }
    };
    let mut statements = Vec::new();
    crate::syntax::walk_statements(defs.source.suite(), &mut statements);
    for stmt in statements {
        match stmt {
            Stmt::Import(import) => {
                for a in &import.names {
                    if a.asname.as_ref().unwrap_or(&a.name).as_str() == name {
                        tally(wanted(ImportBinding::Import {
                            module: a.name.as_str(),
                            aliased: a.asname.is_some(),
                        }));
                    }
                }
            }
            Stmt::ImportFrom(import) => {
                for a in &import.names {
                    if a.asname.as_ref().unwrap_or(&a.name).as_str() == name {
                        tally(wanted(ImportBinding::From {
                            level: import.level,
                            module: import.module.as_ref().map(|m| m.as_str()),
                            name: a.name.as_str(),
                        }));
                    }
                }
            }
            Stmt::FunctionDef(f) if f.name.as_str() == name => tally(false),
            Stmt::ClassDef(c) if c.name.as_str() == name => tally(false),
            // their bodies are scopes of their own
            Stmt::FunctionDef(_) | Stmt::ClassDef(_) => {}
            _ => {
                for n in crate::syntax::stores_in_stmt(stmt) {
                    if n.id.as_str() == name {
                        tally(false);
                    }
                }
            }
        }
    }
    good == 1 && other == 0
}

/// The statements of a template (Python source) for structural comparison (ranges and
/// formatting ignored).
pub fn template(text: &str) -> ParsedSource {
    ParsedSource::parse(text).expect("templates parse")
}

/// Whether `body` equals the template's top-level statements structurally.
pub fn same_statements(body: &[Stmt], template: &ParsedSource) -> bool {
    let expected = template.suite();
    body.len() == expected.len()
        && body
            .iter()
            .zip(expected.iter())
            .all(|(a, b)| ComparableStmt::from(a) == ComparableStmt::from(b))
}

/// The names of the plain positional parameters besides `self` (None when the signature
/// has keyword-only, `*args`, `**kwargs` or positional-only parameters).
pub fn plain_parameters(def: &StmtFunctionDef, method: bool) -> Option<Vec<(String, bool)>> {
    let p = &def.parameters;
    if !p.posonlyargs.is_empty()
        || p.vararg.is_some()
        || !p.kwonlyargs.is_empty()
        || p.kwarg.is_some()
    {
        return None;
    }
    let skip = usize::from(method);
    if method
        && p.args
            .first()
            .is_none_or(|a| a.parameter.name.as_str() != "self")
    {
        return None;
    }
    Some(
        p.args
            .iter()
            .skip(skip)
            .map(|a| (a.parameter.name.to_string(), a.default.is_some()))
            .collect(),
    )
}

/// Test helpers shared by the decoder-fusion passes' unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use crate::analyze::{ClassSource, LossResolution, analyze_class_with};
    use crate::audit::PassReport;
    use crate::parse::ParsedSource;
    use crate::passes::Pass;

    /// A module with `extra` (norm / MLP / rotary definitions) and a toy model whose decoder
    /// layer builds `ToyRMSNorm`, `ToyMLP` and `ToyAttention`.
    pub fn module(extra: &str) -> String {
        format!(
            "import torch
from torch import nn
from ...activations import ACT2FN


{extra}

class ToyAttention(nn.Module):
    def forward(self, q, k, cos, sin):
        return apply_rotary_pos_emb(q, k, cos, sin)


class ToyDecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self_attn = ToyAttention(config)
        self.mlp = ToyMLP(config)
        self.input_layernorm = ToyRMSNorm(config.hidden_size)


class ToyModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList([ToyDecoderLayer(config) for _ in range(2)])


class ToyForCausalLM(ToyPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.model = ToyModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids=None, labels=None, **kwargs):
        hidden_states = self.model(input_ids)
        logits = self.lm_head(hidden_states)
        return logits
"
        )
    }

    /// The pass's report on `ToyForCausalLM` in `module(extra)`.
    pub fn run(pass: &Pass, extra: &str) -> PassReport {
        run_module(pass, &module(extra))
    }

    /// The pass's report on `ToyForCausalLM` in a module of this text.
    pub fn run_module(pass: &Pass, text: &str) -> PassReport {
        let text = text.to_string();
        let parsed = ParsedSource::parse(text.clone()).unwrap();
        let classes = crate::analyze::module_classes(&text, "m", "m.py").unwrap();
        let chain: Vec<ClassSource> = classes
            .into_iter()
            .filter(|c| c.qualname == "ToyForCausalLM")
            .collect();
        let report = analyze_class_with(
            &chain,
            &LossResolution::Causal,
            Some(&parsed),
            None,
            &[pass],
        );
        report.passes[pass.name].clone()
    }

    /// The sites of a report.
    pub fn sites(report: &PassReport) -> Vec<serde_json::Value> {
        report.extra["sites"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The reason of the site named `name`.
    #[track_caller]
    pub fn site_reason(report: &PassReport, name: &str) -> Option<String> {
        let sites = sites(report);
        let site = sites
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no site {name}: {report:?}"));
        site["reason"].as_str().map(str::to_string)
    }

    /// The patch of the site named `name`.
    #[track_caller]
    pub fn site_patch(report: &PassReport, name: &str) -> String {
        let sites = sites(report);
        let site = sites.iter().find(|s| s["name"] == name).unwrap();
        site["patch"]
            .as_str()
            .unwrap_or_else(|| panic!("{name} not patched: {site}"))
            .to_string()
    }
}
