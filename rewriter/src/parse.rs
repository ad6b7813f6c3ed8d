//! A parsed Python source: its text, ruff's AST with exact byte ranges, the token stream
//! (comments included), and line lookups. Everything downstream works on byte offsets into
//! `text`, so emitted code can splice the original text instead of regenerating it.

use ruff_python_ast::token::{TokenKind, Tokens};
use ruff_python_ast::{ModModule, Suite};
use ruff_python_parser::Parsed;
use ruff_text_size::{Ranged, TextRange, TextSize};

/// A source that parsed without syntax errors.
pub struct ParsedSource {
    pub text: String,
    parsed: Parsed<ModModule>,
    line_starts: Vec<usize>,
    /// Byte spans of string literals (f/t-strings included) that may contain newlines.
    string_spans: Vec<(usize, usize)>,
}

/// Why a source could not be parsed: a message with the 1-based line and column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseFailure {
    pub message: String,
}

impl std::fmt::Display for ParseFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl ParsedSource {
    /// Parse `text` as a module. A leading UTF-8 BOM is dropped (as Python's reader does).
    pub fn parse(text: impl Into<String>) -> Result<Self, ParseFailure> {
        let mut text: String = text.into();
        if text.starts_with('\u{feff}') {
            text.drain(..'\u{feff}'.len_utf8());
        }
        let line_starts = line_starts(&text);
        match ruff_python_parser::parse_module(&text) {
            Ok(parsed) => {
                let string_spans = string_spans(parsed.tokens());
                Ok(ParsedSource {
                    text,
                    parsed,
                    line_starts,
                    string_spans,
                })
            }
            Err(error) => {
                let offset = error.location.start().to_usize();
                let (line, column) = line_column(&line_starts, &text, offset);
                Err(ParseFailure {
                    message: format!("{line}:{column}: {}", error.error),
                })
            }
        }
    }

    pub fn suite(&self) -> &Suite {
        self.parsed.suite()
    }

    pub fn tokens(&self) -> &Tokens {
        self.parsed.tokens()
    }

    pub fn slice(&self, range: impl Ranged) -> &str {
        &self.text[range.range().to_std_range()]
    }

    /// 1-based line of a byte offset.
    pub fn line_of(&self, offset: usize) -> u32 {
        (self.line_starts.partition_point(|&start| start <= offset)) as u32
    }

    /// Byte offset of the start of the line holding `offset`.
    pub fn line_start(&self, offset: usize) -> usize {
        let index = self.line_starts.partition_point(|&start| start <= offset);
        self.line_starts[index.saturating_sub(1)]
    }

    /// Byte offset of the end of the line holding `offset` (its `\n`, or the end of the text).
    pub fn line_end(&self, offset: usize) -> usize {
        self.text[offset..]
            .find('\n')
            .map_or(self.text.len(), |i| offset + i)
    }

    /// Byte offset just past the line holding `offset` (after its `\n`).
    pub fn next_line_start(&self, offset: usize) -> usize {
        self.text[offset..]
            .find('\n')
            .map_or(self.text.len(), |i| offset + i + 1)
    }

    /// The leading whitespace of the line holding `offset`.
    pub fn indentation_at(&self, offset: usize) -> &str {
        let start = self.line_start(offset);
        let line = &self.text[start..self.line_end(start)];
        let width = line
            .bytes()
            .take_while(|&b| b == b' ' || b == b'\t')
            .count();
        &line[..width]
    }

    /// Whether a line starting at `offset` continues a multi-line string literal: such a
    /// line belongs to the string's value and must not be re-indented.
    pub fn in_string(&self, offset: usize) -> bool {
        let index = self
            .string_spans
            .partition_point(|&(start, _)| start < offset);
        index > 0 && self.string_spans[index - 1].1 > offset
    }

    /// The end of a `def` / `class` block the way `inspect.getsource` finds it
    /// (`inspect.BlockFinder`): after the last line of the statement, comment lines indented
    /// at least as deep as the block's body still belong to it. Returns the offset just past
    /// the last line (after its `\n`).
    pub fn block_end(&self, statement_end: TextSize, body_column: usize) -> usize {
        let mut last_line_end = self.next_line_start(statement_end.to_usize().saturating_sub(1));
        for token in self.tokens().after(statement_end) {
            match token.kind() {
                TokenKind::Comment => {
                    let start = token.start().to_usize();
                    let column = start - self.line_start(start);
                    if column >= body_column {
                        last_line_end = self.next_line_start(start);
                    }
                }
                TokenKind::NonLogicalNewline
                | TokenKind::Newline
                | TokenKind::Dedent
                | TokenKind::Indent => {}
                _ => break,
            }
        }
        last_line_end
    }

    /// Column (in bytes) of the first statement of a body.
    pub fn column_of(&self, offset: usize) -> usize {
        offset - self.line_start(offset)
    }
}

fn line_starts(text: &str) -> Vec<usize> {
    let mut starts = vec![0];
    starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
    starts
}

fn line_column(line_starts: &[usize], text: &str, offset: usize) -> (usize, usize) {
    let line = line_starts.partition_point(|&start| start <= offset).max(1);
    let start = line_starts[line - 1];
    let column = text
        .get(start..offset.min(text.len()))
        .map_or(0, |s| s.chars().count())
        + 1;
    (line, column)
}

fn string_spans(tokens: &Tokens) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut open: Vec<usize> = Vec::new();
    for token in tokens.iter() {
        match token.kind() {
            TokenKind::String if open.is_empty() => {
                spans.push((token.start().to_usize(), token.end().to_usize()));
            }
            TokenKind::FStringStart | TokenKind::TStringStart => {
                open.push(token.start().to_usize())
            }
            TokenKind::FStringEnd | TokenKind::TStringEnd => {
                if let Some(start) = open.pop()
                    && open.is_empty()
                {
                    spans.push((start, token.end().to_usize()));
                }
            }
            _ => {}
        }
    }
    spans.sort_unstable();
    spans
}

/// The range of a node as a std range.
pub fn span(node: &impl Ranged) -> std::ops::Range<usize> {
    node.range().to_std_range()
}

/// A range from offsets.
pub fn range(start: usize, end: usize) -> TextRange {
    TextRange::new(TextSize::new(start as u32), TextSize::new(end as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_line_and_column_of_syntax_errors() {
        let err = ParsedSource::parse("x = 1\ndef f(:\n").err().unwrap();
        assert!(err.message.starts_with("2:"), "{}", err.message);
    }

    #[test]
    fn lines_and_strings() {
        let src = ParsedSource::parse("a = 1\ns = \"\"\"x\ny\"\"\"\nb = 2\n").unwrap();
        assert_eq!(src.line_of(0), 1);
        assert_eq!(src.line_of(6), 2);
        let y_line = src.text.find("y\"").unwrap();
        assert!(src.in_string(y_line));
        let b_line = src.text.find("b =").unwrap();
        assert!(!src.in_string(b_line));
        assert_eq!(src.line_of(b_line), 4);
    }

    #[test]
    fn block_end_keeps_trailing_comments_at_body_depth() {
        let text = "class A:\n    def f(self):\n        return 1\n        # tail\n# col0\n        # tail2\n    def g(self):\n        pass\n";
        let src = ParsedSource::parse(text).unwrap();
        let ruff_python_ast::Stmt::ClassDef(class) = &src.suite()[0] else {
            panic!()
        };
        let f = &class.body[0];
        let end = src.block_end(f.end(), 8);
        assert_eq!(
            &src.text[..end],
            "class A:\n    def f(self):\n        return 1\n        # tail\n# col0\n        # tail2\n"
        );
    }
}
