//! Per-file index: the classes of a modeling file (name, bases, line, exact source block),
//! the names it imports from other modules, and whether it binds `forward_rewrite`.

use std::collections::HashMap;

use ruff_python_ast::{Stmt, StmtClassDef};
use ruff_text_size::Ranged;

use crate::candidate::{ClassFacts, written_bases};
use crate::parse::ParsedSource;
use crate::passes::fused_loss::RUNTIME_NAME;
use crate::syntax::names_in_stmt;

#[derive(Clone, Debug)]
pub struct ClassEntry {
    pub name: String,
    /// Base class expressions as dotted names (`LlamaPreTrainedModel`, `nn.Module`).
    pub bases: Vec<String>,
    pub line: u32,
    /// The class block as `inspect.getsource` sees it (may be indented).
    pub source: String,
    /// What the class statement says about itself (for the candidate rule).
    pub facts: ClassFacts,
}

#[derive(Clone, Debug)]
pub struct FileIndex {
    pub module: String,
    pub classes: Vec<ClassEntry>,
    /// Local name → (absolute module, name in that module), from `from X import Y as Z`.
    pub imports: HashMap<String, (String, String)>,
    /// A module-level binding of `forward_rewrite` other than `import forward_rewrite`.
    pub binds_forward_rewrite: bool,
}

impl FileIndex {
    pub fn build(source: &ParsedSource, module: &str) -> FileIndex {
        let mut index = FileIndex {
            module: module.to_string(),
            classes: Vec::new(),
            imports: HashMap::new(),
            binds_forward_rewrite: module_binds_forward_rewrite(source.suite()),
        };
        index.visit(source, source.suite(), 0);
        index
    }

    fn visit(&mut self, source: &ParsedSource, body: &[Stmt], depth: usize) {
        for stmt in body {
            match stmt {
                Stmt::ClassDef(class) => self.classes.push(class_entry(source, class)),
                Stmt::ImportFrom(import) => {
                    let Some(base) = absolute_module(
                        &self.module,
                        import.module.as_ref().map(|m| m.as_str()),
                        import.level,
                    ) else {
                        continue;
                    };
                    for alias in &import.names {
                        let local = alias.asname.as_ref().unwrap_or(&alias.name).to_string();
                        self.imports
                            .insert(local, (base.clone(), alias.name.to_string()));
                    }
                }
                // Classes and imports guarded by `if is_torch_available():` or `try:`.
                Stmt::If(_) | Stmt::Try(_) if depth == 0 => {
                    for block in crate::syntax::child_blocks(stmt) {
                        self.visit(source, block, depth + 1);
                    }
                }
                _ => {}
            }
        }
    }

    pub fn class(&self, name: &str) -> Option<&ClassEntry> {
        self.classes.iter().rev().find(|c| c.name == name)
    }
}

fn class_entry(source: &ParsedSource, class: &StmtClassDef) -> ClassEntry {
    let start = source.line_start(class.start().to_usize());
    let body_column = class
        .body
        .first()
        .map_or(0, |s| source.column_of(s.start().to_usize()));
    let end = source.block_end(class.end(), body_column);
    let bases = written_bases(class, |b| source.slice(b).to_string());
    ClassEntry {
        name: class.name.to_string(),
        facts: ClassFacts::of(class, bases.clone()),
        bases,
        line: source.line_of(start),
        source: source.text[start..end].to_string(),
    }
}

/// `from ..llama.modeling_llama import X` inside `transformers.models.gemma.modeling_gemma`
/// → `transformers.models.llama.modeling_llama`.
pub fn absolute_module(current: &str, module: Option<&str>, level: u32) -> Option<String> {
    if level == 0 {
        return module.map(str::to_string);
    }
    let mut parts: Vec<&str> = current.split('.').collect();
    for _ in 0..level {
        parts.pop()?;
    }
    let mut base = parts.join(".");
    if let Some(module) = module {
        if !base.is_empty() {
            base.push('.');
        }
        base.push_str(module);
    }
    Some(base)
}

/// Whether a module binds `forward_rewrite` at module level to anything but the package
/// (`import forward_rewrite` and `import forward_rewrite.x` are fine). The patched forward
/// reads that global, so such a module cannot run a patch.
pub fn module_binds_forward_rewrite(body: &[Stmt]) -> bool {
    body.iter().any(|stmt| match stmt {
        Stmt::Import(import) => import.names.iter().any(|a| match &a.asname {
            Some(asname) => asname.as_str() == RUNTIME_NAME && a.name.as_str() != RUNTIME_NAME,
            None => false,
        }),
        Stmt::ImportFrom(import) => import
            .names
            .iter()
            .any(|a| a.asname.as_ref().unwrap_or(&a.name).as_str() == RUNTIME_NAME),
        Stmt::FunctionDef(f) => f.name.as_str() == RUNTIME_NAME,
        Stmt::ClassDef(c) => c.name.as_str() == RUNTIME_NAME,
        Stmt::If(_) | Stmt::Try(_) | Stmt::With(_) | Stmt::For(_) | Stmt::While(_) => {
            crate::syntax::child_blocks(stmt)
                .into_iter()
                .any(module_binds_forward_rewrite)
        }
        _ => names_in_stmt(stmt)
            .iter()
            .any(|n| n.id.as_str() == RUNTIME_NAME && !n.ctx.is_load()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_imports_resolve() {
        let m = "transformers.models.gemma.modeling_gemma";
        assert_eq!(
            absolute_module(m, Some("llama.modeling_llama"), 2).unwrap(),
            "transformers.models.llama.modeling_llama"
        );
        assert_eq!(
            absolute_module(m, Some("modeling_utils"), 3).unwrap(),
            "transformers.modeling_utils"
        );
        assert_eq!(absolute_module(m, Some("torch"), 0).unwrap(), "torch");
        assert_eq!(absolute_module("single", Some("x"), 2), None);
    }

    #[test]
    fn indexes_classes_imports_and_name_bindings() {
        let src = ParsedSource::parse(
            "from ..llama.modeling_llama import LlamaForCausalLM as Base\n\n\nclass A(Base, nn.Module):\n    x = 1\n    # tail\n\nif True:\n    class B:\n        pass\n",
        )
        .unwrap();
        let index = FileIndex::build(&src, "transformers.models.a.modeling_a");
        assert_eq!(index.classes.len(), 2);
        let a = index.class("A").unwrap();
        assert_eq!(a.bases, ["Base", "nn.Module"]);
        assert_eq!(a.line, 4);
        assert_eq!(
            a.source,
            "class A(Base, nn.Module):\n    x = 1\n    # tail\n"
        );
        assert_eq!(
            index.class("B").unwrap().source,
            "    class B:\n        pass\n"
        );
        assert_eq!(
            index.imports["Base"],
            (
                "transformers.models.llama.modeling_llama".to_string(),
                "LlamaForCausalLM".to_string()
            )
        );
        assert!(!index.binds_forward_rewrite);
        for (text, binds) in [
            ("import forward_rewrite\n", false),
            ("import forward_rewrite.ops\n", false),
            ("import other as forward_rewrite\n", true),
            ("from x import forward_rewrite\n", true),
            ("forward_rewrite = 1\n", true),
            ("def forward_rewrite(): pass\n", true),
            (
                "try:\n    forward_rewrite = 1\nexcept ImportError:\n    pass\n",
                true,
            ),
        ] {
            let src = ParsedSource::parse(text).unwrap();
            assert_eq!(module_binds_forward_rewrite(src.suite()), binds, "{text}");
        }
    }
}
