//! Resolve a class's base chain across the files of a tree: the class, then its bases in
//! MRO order (C3 linearisation over the classes whose source is known), stopping at
//! transformers' own base classes and wherever the source is unknown.

use std::collections::HashMap;

use crate::index::{ClassEntry, FileIndex};

/// transformers / torch base classes: their forward and `__init__` are not the model's.
const STOP_BASES: [&str; 8] = [
    "PreTrainedModel",
    "GenerationMixin",
    "nn.Module",
    "torch.nn.Module",
    "Module",
    "object",
    "PushToHubMixin",
    "ModuleUtilsMixin",
];

/// A class in the tree: (file index, class index).
pub type ClassId = (usize, usize);

pub struct Tree<'t> {
    files: &'t [FileIndex],
    by_module: HashMap<&'t str, usize>,
}

impl<'t> Tree<'t> {
    pub fn new(files: &'t [FileIndex]) -> Tree<'t> {
        let by_module = files
            .iter()
            .enumerate()
            .map(|(i, f)| (f.module.as_str(), i))
            .collect();
        Tree { files, by_module }
    }

    pub fn class(&self, id: ClassId) -> &'t ClassEntry {
        &self.files[id.0].classes[id.1]
    }

    pub fn file(&self, id: ClassId) -> &'t FileIndex {
        &self.files[id.0]
    }

    fn find(&self, file: usize, name: &str) -> Option<ClassId> {
        self.files[file]
            .classes
            .iter()
            .rposition(|c| c.name == name)
            .map(|i| (file, i))
    }

    /// The class a base expression of `id`'s class statement refers to, if its source is known.
    fn resolve_base(&self, id: ClassId, base: &str) -> Option<ClassId> {
        if STOP_BASES.contains(&base) {
            return None;
        }
        let file = &self.files[id.0];
        if base.contains('.') {
            return None;
        }
        if let Some((module, name)) = file.imports.get(base) {
            let target = *self.by_module.get(module.as_str())?;
            return self.find(target, name);
        }
        // A class defined earlier in the same file.
        file.classes[..id.1]
            .iter()
            .rposition(|c| c.name == base)
            .map(|i| (id.0, i))
    }

    fn bases(&self, id: ClassId) -> Vec<ClassId> {
        self.class(id)
            .bases
            .iter()
            .filter_map(|b| self.resolve_base(id, b))
            .collect()
    }

    /// The chain of `id`: itself first, then its known bases in MRO order.
    pub fn chain(&self, id: ClassId) -> Vec<ClassId> {
        let mut memo = HashMap::new();
        self.linearize(id, &mut memo, 0)
            .unwrap_or_else(|| self.depth_first(id))
    }

    fn linearize(
        &self,
        id: ClassId,
        memo: &mut HashMap<ClassId, Option<Vec<ClassId>>>,
        depth: usize,
    ) -> Option<Vec<ClassId>> {
        if depth > 64 {
            return None;
        }
        if let Some(done) = memo.get(&id) {
            return done.clone();
        }
        let bases = self.bases(id);
        let mut sequences: Vec<Vec<ClassId>> = Vec::new();
        for &base in &bases {
            sequences.push(self.linearize(base, memo, depth + 1)?);
        }
        sequences.push(bases);
        let mut result = vec![id];
        loop {
            sequences.retain(|s| !s.is_empty());
            if sequences.is_empty() {
                break;
            }
            let head = sequences
                .iter()
                .map(|s| s[0])
                .find(|candidate| !sequences.iter().any(|s| s[1..].contains(candidate)));
            let Some(head) = head else {
                memo.insert(id, None);
                return None;
            };
            result.push(head);
            for s in &mut sequences {
                if s[0] == head {
                    s.remove(0);
                }
            }
        }
        memo.insert(id, Some(result.clone()));
        Some(result)
    }

    fn depth_first(&self, id: ClassId) -> Vec<ClassId> {
        let mut out = Vec::new();
        let mut stack = vec![id];
        while let Some(next) = stack.pop() {
            if out.contains(&next) || out.len() > 64 {
                continue;
            }
            out.push(next);
            stack.extend(self.bases(next).into_iter().rev());
        }
        out
    }
}
