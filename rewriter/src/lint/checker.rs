//! The walk over one file: every statement and expression is offered to the rules that care
//! about its kind (as ruff's checker does), and the rules report through [`Checker::report`].

use ruff_python_ast::visitor::{self, Visitor};
use ruff_python_ast::{Expr, Stmt};
use ruff_text_size::{Ranged, TextRange};

use super::context::Context;
use super::rules::{self, Rule};
use crate::backends::{Backends, table};
use crate::parse::ParsedSource;

/// A finding before it is placed in a file: the rule, where, what, and the replacement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFinding {
    pub rule: Rule,
    pub range: TextRange,
    pub message: String,
    pub replacement: String,
}

pub struct Checker<'a> {
    pub source: &'a ParsedSource,
    pub context: Context,
    pub table: &'static Backends,
    findings: Vec<RawFinding>,
}

impl<'a> Checker<'a> {
    pub fn new(source: &'a ParsedSource) -> Checker<'a> {
        Checker {
            source,
            context: Context::build(source.suite()),
            table: table(),
            findings: Vec::new(),
        }
    }

    /// Run every rule over the file; findings in source order.
    pub fn run(mut self) -> Vec<RawFinding> {
        let source = self.source;
        self.visit_body(source.suite());
        let mut findings = self.findings;
        findings.sort_by_key(|f| (f.range.start(), f.rule));
        findings.dedup();
        findings
    }

    pub fn report(
        &mut self,
        rule: Rule,
        range: TextRange,
        message: impl Into<String>,
        replacement: impl Into<String>,
    ) {
        self.findings.push(RawFinding {
            rule,
            range,
            message: message.into(),
            replacement: replacement.into(),
        });
    }

    /// The source text of a node, on one line (runs of whitespace and newlines collapsed).
    pub fn text(&self, node: &impl Ranged) -> String {
        let text = self.source.slice(node.range());
        if text.contains('\n') {
            text.split_whitespace().collect::<Vec<_>>().join(" ")
        } else {
            text.to_string()
        }
    }
}

impl<'a> Visitor<'a> for Checker<'_> {
    fn visit_stmt(&mut self, stmt: &'a Stmt) {
        match stmt {
            Stmt::FunctionDef(def) => {
                rules::legacy_definition::check_function(self, def);
                rules::short_name_argument::check_function(self, def);
            }
            Stmt::ClassDef(class) => rules::legacy_definition::check_class_body(self, class),
            Stmt::Assign(_) | Stmt::AnnAssign(_) => {
                rules::short_name_argument::check_assignment(self, stmt);
            }
            _ => {}
        }
        visitor::walk_stmt(self, stmt);
    }

    fn visit_expr(&mut self, expr: &'a Expr) {
        match expr {
            Expr::Call(call) => {
                rules::legacy_keyword::check_call(self, call);
                rules::legacy_key::check_call(self, call);
                rules::short_name_argument::check_call(self, call);
                rules::implementation_comparison::check_call(self, call);
            }
            Expr::Attribute(attr) => rules::legacy_attribute::check(self, attr, expr),
            Expr::Subscript(sub) => rules::legacy_key::check_subscript(self, sub, expr),
            Expr::Dict(dict) => {
                rules::legacy_key::check_dict(self, dict);
                rules::short_name_argument::check_dict(self, dict);
            }
            Expr::Compare(compare) => {
                rules::legacy_key::check_compare(self, compare);
                rules::short_name_comparison::check(self, compare);
                rules::implementation_comparison::check_compare(self, compare);
            }
            _ => {}
        }
        visitor::walk_expr(self, expr);
    }
}

/// The attribute that holds the implementation's name, next to a legacy switch: private
/// switches (`_flash_attn_2_enabled`, `_use_sdpa`) lived on transformers' config, whose field
/// is `_attn_implementation`; public ones belong to user configs (`attn_implementation`).
pub fn implementation_field(flag: &str) -> &'static str {
    if flag.starts_with('_') {
        "_attn_implementation"
    } else {
        "attn_implementation"
    }
}

/// The capability expression that replaces reading a legacy switch for `canonical`.
pub fn capability_for(checker: &Checker<'_>, canonical: &str, subject: &str) -> String {
    match checker.table.capability_question(&[canonical]) {
        Some(question) => question.render(subject, false),
        None => format!("forward_rewrite.attention.capabilities({subject})"),
    }
}
