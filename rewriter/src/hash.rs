//! Contract 2: the forward hash that binds a patch to the exact source it was made from.
//!
//! `forward_sha256(text)` is the lowercase hex sha256 of the forward's source as
//! `inspect.getsource(cls.forward)` returns it, normalised for indentation only:
//! `\r\n` (and a lone `\r`, which Python's universal newlines also turn into `\n`) become
//! `\n`; then `textwrap.dedent` semantics (lines holding only spaces and tabs become empty;
//! the longest common leading whitespace of the other lines is removed); then trailing
//! newlines are replaced by exactly one `\n`.

use sha2::{Digest, Sha256};

/// The hash of contract 2 (see the module docs).
pub fn forward_sha256(text: &str) -> String {
    let normalised = normalise(text);
    let digest = Sha256::digest(normalised.as_bytes());
    let mut hex = String::with_capacity(64);
    for byte in digest {
        hex.push_str(&format!("{byte:02x}"));
    }
    hex
}

/// The exact text that is hashed: newlines unified, dedented, one final newline.
pub fn normalise(text: &str) -> String {
    let unified = text.replace("\r\n", "\n").replace('\r', "\n");
    let mut out = dedent(&unified);
    while out.ends_with('\n') {
        out.pop();
    }
    out.push('\n');
    out
}

/// `textwrap.dedent` of CPython: whitespace-only lines (spaces and tabs) are emptied, the
/// longest common prefix of the leading whitespace of the remaining non-empty lines is
/// removed from every line that starts with it.
pub fn dedent(text: &str) -> String {
    let lines: Vec<&str> = text.split('\n').collect();
    let is_blank = |line: &str| !line.is_empty() && line.bytes().all(|b| b == b' ' || b == b'\t');
    let mut margin: Option<&str> = None;
    for line in &lines {
        if line.is_empty() || is_blank(line) {
            continue;
        }
        let width = line
            .bytes()
            .take_while(|&b| b == b' ' || b == b'\t')
            .count();
        let indent = &line[..width];
        margin = Some(match margin {
            None => indent,
            Some(m) if indent.starts_with(m) => m,
            Some(m) if m.starts_with(indent) => indent,
            Some(m) => {
                let common = m
                    .bytes()
                    .zip(indent.bytes())
                    .take_while(|(a, b)| a == b)
                    .count();
                &m[..common]
            }
        });
    }
    let margin = margin.unwrap_or("");
    let mut out = String::with_capacity(text.len());
    for (i, line) in lines.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        if is_blank(line) {
            continue;
        }
        out.push_str(line.strip_prefix(margin).unwrap_or(line));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedent_matches_textwrap() {
        // Expected values computed with CPython's textwrap.dedent.
        assert_eq!(dedent("    a\n      b\n    c"), "a\n  b\nc");
        assert_eq!(dedent("    a\n   \n    b\n"), "a\n\nb\n");
        assert_eq!(dedent("\ta\n\t\tb"), "a\n\tb");
        assert_eq!(dedent("  \ta\n  b"), "\ta\nb");
        assert_eq!(dedent("    a\n  b"), "  a\nb");
        assert_eq!(dedent("a\n    b"), "a\n    b");
    }

    #[test]
    fn normalise_unifies_newlines_and_ends_with_one() {
        assert_eq!(
            normalise("    def f():\r\n        pass\r\n\r\n"),
            "def f():\n    pass\n"
        );
        assert_eq!(normalise("def f():\n    pass"), "def f():\n    pass\n");
    }

    #[test]
    fn hash_is_lowercase_hex_sha256() {
        // sha256("def f():\n    pass\n")
        let h = forward_sha256("    def f():\n        pass\n");
        assert_eq!(
            h,
            "16797664978a811647328d92f3a3ca9a3b3a4712db9abc1bd63416b30aca4fe0"
        );
        assert!(
            h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
        assert_eq!(h, forward_sha256("def f():\r\n    pass"));
        assert_ne!(h, forward_sha256("def f():\n    return\n"));
    }
}
