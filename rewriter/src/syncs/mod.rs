//! `scan --syncs`: a static report of the host-sync sites (`kinds.rs`) reachable from each
//! scanned class's forward, once per forward or once per decoder layer, under each attention
//! backend of the shared table, stock and as forward-rewrite's runtime patches it.
//!
//! The pieces: `extract` reads each module into owned facts (functions, calls, sync sites,
//! classes, dispatch tables; `tensor` decides which expressions are tensors), `graph` builds
//! the petgraph call graph over the modeling modules and transformers' attention and masking
//! utilities and resolves calls statically, `patch` declares what the runtime changes, and
//! `report` walks the graph per class and renders it.

pub mod extract;
pub mod graph;
pub mod kinds;
pub mod patch;
pub mod report;
pub mod tensor;

use std::collections::HashMap;
use std::path::PathBuf;

use rayon::prelude::*;

pub use kinds::SyncKind;
pub use report::{ClassSyncs, render_class};

use crate::audit::{AuditDocument, Verdict};
use crate::backends::table;
use crate::parse::ParsedSource;
use crate::scan::{InputError, collect_inputs, describe};

/// The transformers modules loaded besides the modeling files (relative to the package
/// root): the attention and masking utilities a forward calls into, `modeling_utils.py`
/// for `ALL_ATTENTION_FUNCTIONS` and `PreTrainedModel`, and the shared building blocks
/// (`pytorch_utils.py`'s `Conv1D`, `activations.py`). A missing one is skipped.
pub const UTILITY_MODULES: &[&str] = &[
    "modeling_utils.py",
    "modeling_layers.py",
    "pytorch_utils.py",
    "activations.py",
    "masking_utils.py",
    "modeling_flash_attention_utils.py",
    "integrations/sdpa_attention.py",
    "integrations/flash_attention.py",
    "integrations/flex_attention.py",
    "integrations/sdpa_paged.py",
    "integrations/flash_paged.py",
    "integrations/eager_paged.py",
];

/// The syncs section of every class of `document` (by module and qualname), computed over
/// the modeling files under `paths` and their packages' utility modules. Only the modules
/// the classes need are read: theirs, the utilities, and the modeling modules they import
/// from (transitively).
pub fn analyze(
    paths: &[PathBuf],
    document: &AuditDocument,
) -> Result<HashMap<(String, String), ClassSyncs>, InputError> {
    let inputs = collect_inputs(paths)?;
    // Every module that may be loaded: module name → (file, reported path).
    let mut available: HashMap<String, (PathBuf, String)> = inputs
        .iter()
        .map(|i| (i.module.clone(), (i.file.clone(), i.display.clone())))
        .collect();
    let mut roots: Vec<PathBuf> = inputs.iter().filter_map(|i| i.root.clone()).collect();
    roots.sort();
    roots.dedup();
    let mut wanted: Vec<String> = Vec::new();
    for root in &roots {
        for relative in UTILITY_MODULES {
            let file = root.join(relative);
            if file.is_file() {
                let (module, display) = describe(&file, Some(root));
                wanted.push(module.clone());
                available.insert(module, (file, display));
            }
        }
    }
    wanted.extend(document.classes.iter().map(|c| c.module.clone()));
    let mut loaded: HashMap<String, extract::ModuleFacts> = HashMap::new();
    while !wanted.is_empty() {
        wanted.sort();
        wanted.dedup();
        wanted.retain(|m| !loaded.contains_key(m) && available.contains_key(m));
        let wave: Vec<extract::ModuleFacts> = wanted
            .par_iter()
            .filter_map(|module| {
                let (file, display) = &available[module];
                let text = std::fs::read_to_string(file).ok()?;
                let source = ParsedSource::parse(text).ok()?;
                Some(extract::extract(&source, module, display))
            })
            .collect();
        let missing: Vec<String> = std::mem::take(&mut wanted);
        for module in missing {
            // A module that does not read or parse is loaded empty (its calls are leaves).
            loaded
                .entry(module.clone())
                .or_insert_with(|| extract::ModuleFacts {
                    module,
                    ..Default::default()
                });
        }
        for facts in wave {
            wanted.extend(facts.imports.values().map(|(m, _)| m.clone()));
            loaded.insert(facts.module.clone(), facts);
        }
    }
    let mut modules: Vec<extract::ModuleFacts> = loaded.into_values().collect();
    modules.sort_by(|a, b| a.module.cmp(&b.module));
    let table = table();
    let program = graph::Program::build(modules, table);
    let patches = report::resolve_patches(&program, table);
    Ok(document
        .classes
        .par_iter()
        .filter_map(|class| {
            let class_ref = program.find_class(&class.module, &class.qualname)?;
            let syncs = report::class_syncs(
                &program,
                table,
                &patches,
                class_ref,
                class.verdict == Verdict::Patched,
            );
            Some(((class.module.clone(), class.qualname.clone()), syncs))
        })
        .collect())
}

#[cfg(test)]
mod tests;
