//! Emission (contract 3): splice the original forward's text. Docstring-only decorators are
//! dropped, the region becomes `if labels is not None and forward_rewrite.fuses(...): <fused
//! loss> else: <original region, re-indented>`, and the whole forward is dedented to column
//! 0. Lines that continue a multi-line string are never re-indented (they are part of the
//! string's value).

use std::fmt::Write as _;

use ruff_python_ast::{Stmt, StmtFunctionDef};
use ruff_text_size::Ranged;

use crate::parse::ParsedSource;
use crate::reason::Reason;

use super::Refusal;
use super::region::Region;
use crate::syntax::is_docstring_decorator;

/// The first comment line of the fused branch (also how a reader spots a patched forward).
pub const MARKER: &str = "# forward-rewrite: fused";

/// The decorator every patched forward gets first: a call that will return a tuple takes the
/// stock path, because `ModelOutput.to_tuple()` drops the `None` logits of a fused step and
/// would move every later element one position up.
pub const TUPLE_GUARD: &str = "@forward_rewrite.tuple_guard";

pub fn emit(
    src: &ParsedSource,
    def: &StmtFunctionDef,
    forward: std::ops::Range<usize>,
    region: &Region<'_>,
    loss_target: &str,
) -> Result<String, Refusal> {
    let unsafe_ = |why: String| Refusal::new(Reason::ReindentUnsafe, why);
    let text = &src.text;
    let margin = src.indentation_at(forward.start).to_string();
    let block_indent = src.indentation_at(region.start).to_string();
    if !block_indent.starts_with(&margin) {
        return Err(unsafe_(
            "the region is indented less than the def".to_string(),
        ));
    }
    if block_indent.contains(' ') && block_indent.contains('\t') {
        return Err(unsafe_(
            "the region's indentation mixes tabs and spaces".to_string(),
        ));
    }
    let unit = if block_indent.contains('\t') {
        "\t"
    } else {
        "    "
    };
    let region_line_start = src.line_start(region.start);
    if !text[region_line_start..region.start].trim().is_empty() {
        return Err(unsafe_(
            "the head statement shares its line with other code".to_string(),
        ));
    }
    let region_line_end = src.line_end(region.end);
    let tail = text[region.end..region_line_end].trim_start();
    if !(tail.is_empty() || tail.starts_with('#')) {
        return Err(unsafe_(
            "the labels branch shares its last line with other code".to_string(),
        ));
    }
    for expr in &region.pasted {
        let r = expr.range().to_std_range();
        let mut offset = r.start;
        while let Some(i) = text[offset..r.end].find('\n') {
            offset += i + 1;
            if src.in_string(offset) {
                return Err(unsafe_(
                    "an expression moved into the fused call holds a multi-line string".to_string(),
                ));
            }
        }
    }

    // Decorators that only build docstrings are dropped (whole lines).
    let mut dropped: Vec<std::ops::Range<usize>> = Vec::new();
    for decorator in &def.decorator_list {
        if !is_docstring_decorator(&decorator.expression) {
            continue;
        }
        let start = src.line_start(decorator.start().to_usize());
        let end = decorator.end().to_usize();
        let rest = text[end..src.line_end(end)].trim_start();
        if !text[start..decorator.start().to_usize()].trim().is_empty()
            || !(rest.is_empty() || rest.starts_with('#'))
        {
            return Err(unsafe_(
                "a docstring decorator shares its line with other code".to_string(),
            ));
        }
        dropped.push(start..src.next_line_start(end));
    }

    let fused = Fused {
        region,
        loss_target,
        region_line_start,
        region_line_end,
        block_indent: &block_indent,
        unit,
    };
    Ok(render(src, forward, &margin, &dropped, Some(&fused)))
}

/// What replaces the region.
struct Fused<'r, 'a> {
    region: &'r Region<'a>,
    loss_target: &'r str,
    region_line_start: usize,
    region_line_end: usize,
    block_indent: &'r str,
    unit: &'r str,
}

/// The forward dedented to column 0 without any change: what `patched_forward` is compared
/// with (lines that continue a multi-line string are kept as they are in both).
pub fn original(src: &ParsedSource, forward: std::ops::Range<usize>) -> String {
    let margin = src.indentation_at(forward.start).to_string();
    render(src, forward, &margin, &[], None)
}

fn render(
    src: &ParsedSource,
    forward: std::ops::Range<usize>,
    margin: &str,
    dropped: &[std::ops::Range<usize>],
    fused: Option<&Fused<'_, '_>>,
) -> String {
    let text = &src.text;
    let strip = |line: &str| -> String {
        if line.trim().is_empty() {
            String::new()
        } else if let Some(rest) = line.strip_prefix(margin) {
            rest.to_string()
        } else {
            line.trim_start().to_string()
        }
    };
    let mut out = String::with_capacity(forward.len() + 1024);
    if fused.is_some() {
        // Outermost, so it sees `return_dict` before `@can_return_tuple` pops it (contract 3).
        let _ = writeln!(out, "{TUPLE_GUARD}");
    }
    let mut offset = forward.start;
    while offset < forward.end {
        let line_end = src.line_end(offset).min(forward.end);
        let next = line_end + 1;
        if let Some(range) = dropped.iter().find(|r| r.start == offset) {
            offset = range.end;
            continue;
        }
        if let Some(f) = fused.filter(|f| f.region_line_start == offset) {
            let indent = &f.block_indent[margin.len()..];
            fused_branch(&mut out, src, indent, f.unit, f.region, f.loss_target);
            let _ = writeln!(out, "{indent}else:");
            let mut o = f.region_line_start;
            while o <= f.region_line_end && o < text.len() {
                let e = src.line_end(o);
                let line = &text[o..e];
                if src.in_string(o) {
                    out.push_str(line);
                } else if !line.trim().is_empty() {
                    out.push_str(f.unit);
                    out.push_str(&strip(line));
                }
                out.push('\n');
                o = e + 1;
            }
            offset = o;
            continue;
        }
        let line = &text[offset..line_end];
        if src.in_string(offset) {
            out.push_str(line);
        } else {
            out.push_str(&strip(line));
        }
        out.push('\n');
        offset = next;
    }
    while out.ends_with("\n\n") {
        out.pop();
    }
    out
}

fn fused_branch(
    out: &mut String,
    src: &ParsedSource,
    indent: &str,
    unit: &str,
    region: &Region<'_>,
    loss_target: &str,
) {
    let head = &region.head;
    let inner = format!("{indent}{unit}");
    let arg = format!("{indent}{unit}{unit}");
    let condition = region
        .condition
        .as_ref()
        .map(|test| format!("not ({test}) and "))
        .unwrap_or_default();
    let (style, what) = match region.epilogue {
        None => ("", "ForCausalLMLoss"),
        Some(_) => (
            ", loss=\"cross_entropy\"",
            "CrossEntropyLoss on shifted logits",
        ),
    };
    let _ = writeln!(
        out,
        "{indent}if labels is not None and {condition}forward_rewrite.fuses(self, self.{head}, {}{style}):",
        region.vocab_size
    );
    let _ = writeln!(
        out,
        "{inner}{MARKER} {head} + {what}; logits are not materialised"
    );
    let _ = writeln!(
        out,
        "{inner}{loss_target} = forward_rewrite.fused_lm_head_loss("
    );
    let hidden = region.hidden_text.as_str();
    let _ = writeln!(out, "{arg}{hidden},");
    let _ = writeln!(out, "{arg}self.{head},");
    let _ = writeln!(out, "{arg}labels,");
    let _ = writeln!(out, "{arg}vocab_size={},", region.vocab_size);
    for transform in &region.transforms {
        let _ = writeln!(out, "{arg}{}={},", transform.kind.keyword(), transform.expr);
    }
    for (keyword, value) in &region.explicit {
        let _ = writeln!(out, "{arg}{keyword}={value},");
    }
    for splat in &region.splats {
        let _ = writeln!(out, "{arg}**forward_rewrite.loss_kwargs({splat}),");
    }
    let _ = writeln!(out, "{inner})");
    for stmt in region.epilogue.iter().flatten() {
        reindent_statement(out, src, stmt, &inner);
    }
    let _ = writeln!(out, "{inner}{} = None", region.logits);
}

/// Copy a statement's lines at a new indentation (lines inside a multi-line string as they
/// are: they belong to the string's value).
fn reindent_statement(out: &mut String, src: &ParsedSource, stmt: &Stmt, indent: &str) {
    let start = src.line_start(stmt.start().to_usize());
    let own = src.indentation_at(start).to_string();
    let end = src.line_end(stmt.end().to_usize());
    let mut offset = start;
    while offset <= end && offset < src.text.len() {
        let line_end = src.line_end(offset);
        let line = &src.text[offset..line_end];
        if src.in_string(offset) {
            out.push_str(line);
        } else if !line.trim().is_empty() {
            out.push_str(indent);
            out.push_str(line.strip_prefix(own.as_str()).unwrap_or(line.trim_start()));
        }
        out.push('\n');
        offset = line_end + 1;
    }
}
