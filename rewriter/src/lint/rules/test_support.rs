//! Helpers for the rules' unit tests: lint inline Python and look at the findings.

use crate::lint::lint_source;

/// `(code, "line:col", replacement)` of every finding in `source`.
pub fn findings(source: &str) -> Vec<(&'static str, String, String)> {
    lint_source(source, "test.py")
        .expect("the test source parses")
        .into_iter()
        .map(|f| (f.code, format!("{}:{}", f.line, f.column), f.replacement))
        .collect()
}

/// The codes found in `source`, in order.
pub fn codes(source: &str) -> Vec<&'static str> {
    findings(source)
        .into_iter()
        .map(|(code, _, _)| code)
        .collect()
}

/// The findings of one rule.
pub fn of(source: &str, code: &str) -> Vec<(String, String)> {
    findings(source)
        .into_iter()
        .filter(|(c, _, _)| *c == code)
        .map(|(_, at, replacement)| (at, replacement))
        .collect()
}
