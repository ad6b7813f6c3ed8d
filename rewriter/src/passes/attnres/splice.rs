//! Byte-range edits of one source text, applied back to front.

use ruff_text_size::Ranged;

pub struct Splicer<'t> {
    pub text: &'t str,
    edits: Vec<(usize, usize, String)>,
}

impl<'t> Splicer<'t> {
    pub fn new(text: &'t str) -> Splicer<'t> {
        Splicer {
            text,
            edits: Vec::new(),
        }
    }

    pub fn slice(&self, node: impl Ranged) -> &'t str {
        &self.text[node.range().to_std_range()]
    }

    pub fn start(node: impl Ranged) -> usize {
        node.range().start().to_usize()
    }

    pub fn end(node: impl Ranged) -> usize {
        node.range().end().to_usize()
    }

    pub fn replace(&mut self, start: usize, end: usize, new: impl Into<String>) {
        self.edits.push((start, end, new.into()));
    }

    pub fn insert(&mut self, at: usize, new: impl Into<String>) {
        self.replace(at, at, new);
    }

    /// Column (in bytes) of an offset.
    pub fn column(&self, offset: usize) -> usize {
        offset - self.text[..offset].rfind('\n').map_or(0, |i| i + 1)
    }

    /// The end of the line holding `offset`, past its newline.
    pub fn line_end(&self, offset: usize) -> usize {
        self.text[offset..]
            .find('\n')
            .map_or(self.text.len(), |i| offset + i + 1)
    }

    pub fn finish(mut self) -> String {
        // Stable: inserts at one offset keep their order.
        let mut order: Vec<usize> = (0..self.edits.len()).collect();
        order.sort_by_key(|&i| (self.edits[i].0, self.edits[i].1, i));
        let mut out = String::with_capacity(self.text.len() + 256);
        let mut at = 0;
        for i in order {
            let (start, end, new) = std::mem::take(&mut self.edits[i]);
            if start < at {
                continue;
            }
            out.push_str(&self.text[at..start]);
            out.push_str(&new);
            at = end;
        }
        out.push_str(&self.text[at..]);
        out
    }
}
