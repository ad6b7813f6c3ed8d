//! The scan: walk the given paths, parse and index the PyTorch modeling files in parallel,
//! resolve the chain of each candidate class (`candidate.rs`) and run
//! [`crate::analyze_class`] on it (the same entry point as the Python installer).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::analyze::{ClassSource, analyze_class_with};
use crate::audit::{AuditDocument, ClassReport, FileEntry, FileStatus, Summary};
use crate::candidate::is_candidate;
use crate::chain::Tree;
use crate::index::FileIndex;
use crate::loss_mapping::LossMapping;
use crate::parse::ParsedSource;
use crate::passes::Pass;

/// Unusable arguments or unreadable inputs (the CLI exits with 2).
#[derive(Debug)]
pub struct InputError(pub String);

impl std::fmt::Display for InputError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InputError {}

#[derive(Clone, Default)]
pub struct ScanOptions {
    /// Only analyse classes with this exact name (files are still all parsed and indexed).
    pub class: Option<String>,
    /// The passes to run beyond the fused loss (`passes::PASSES`; the CLI defaults to all).
    pub passes: Vec<&'static Pass>,
}

/// The scan's result: the audit document, with the patched forwards kept in the reports.
pub struct Scan {
    pub document: AuditDocument,
    /// Each scanned file's reported path → its path on disk.
    pub sources: HashMap<String, PathBuf>,
}

/// A PyTorch modeling file: `modeling_*.py`, not TF, Flax (or `modular_*`, which does not match).
pub fn is_modeling_file(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    name.starts_with("modeling_")
        && name.ends_with(".py")
        && !name.starts_with("modeling_tf_")
        && !name.starts_with("modeling_flax_")
}

/// A file that parsed: its index, and its parse when a pass needs the whole module.
type IndexedFile = (FileIndex, Option<ParsedSource>);

/// A file to scan, with its module name and reported path.
pub(crate) struct Input {
    pub(crate) file: PathBuf,
    pub(crate) module: String,
    pub(crate) display: String,
    /// The package root (the topmost directory that still holds `__init__.py`).
    pub(crate) root: Option<PathBuf>,
}

/// The top package of remote code: transformers copies it under `HF_MODULES_CACHE`, puts
/// that directory on `sys.path` and imports `transformers_modules.<org>.<repo>.<rev>.modeling_x`.
const REMOTE_CODE_PACKAGE: &str = "transformers_modules";

/// The package root of a file: the topmost ancestor directory that still holds `__init__.py`
/// (a `transformers_modules` directory is always a root: the modules cache above it holds an
/// `__init__.py` too but is a `sys.path` entry, not a package).
fn package_root(dir: &Path) -> Option<PathBuf> {
    let mut root = None;
    let mut current = Some(dir);
    while let Some(d) = current {
        if d.join("__init__.py").is_file() {
            root = Some(d.to_path_buf());
            if d.file_name().is_some_and(|n| n == REMOTE_CODE_PACKAGE) {
                break;
            }
            current = d.parent();
        } else {
            break;
        }
    }
    root
}

/// A file's module name and reported path (relative to its package root).
pub(crate) fn describe(file: &Path, root: Option<&Path>) -> (String, String) {
    let Some(root) = root else {
        let stem = file
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("module")
            .to_string();
        return (stem, file.display().to_string());
    };
    let package = root
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("package");
    let relative = file.strip_prefix(root).unwrap_or(file);
    let display = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/");
    let mut module = vec![package.to_string()];
    let parts: Vec<String> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    for (i, part) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            let stem = part.strip_suffix(".py").unwrap_or(part);
            if stem != "__init__" {
                module.push(stem.to_string());
            }
        } else {
            module.push(part.clone());
        }
    }
    (module.join("."), display)
}

/// The modeling files under `paths` (the scan's selection), with modules and roots.
pub(crate) fn collect_inputs(paths: &[PathBuf]) -> Result<Vec<Input>, InputError> {
    let mut inputs = Vec::new();
    let mut roots: HashMap<PathBuf, Option<PathBuf>> = HashMap::new();
    let mut root_of = |dir: &Path| {
        roots
            .entry(dir.to_path_buf())
            .or_insert_with(|| package_root(dir))
            .clone()
    };
    for path in paths {
        let metadata = std::fs::metadata(path)
            .map_err(|e| InputError(format!("cannot read {}: {e}", path.display())))?;
        if metadata.is_file() {
            std::fs::File::open(path)
                .map_err(|e| InputError(format!("cannot read {}: {e}", path.display())))?;
            let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
            let dir = if dir.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                dir
            };
            let root = root_of(&dir);
            let (module, display) = describe(path, root.as_deref());
            inputs.push(Input {
                file: path.clone(),
                module,
                display,
                root,
            });
            continue;
        }
        // A transformers tree: its model files live under models/.
        let walk_root = if path.join("models").is_dir() {
            path.join("models")
        } else {
            path.clone()
        };
        let mut files = Vec::new();
        for entry in walkdir::WalkDir::new(&walk_root).sort_by_file_name() {
            let entry = entry
                .map_err(|e| InputError(format!("cannot walk {}: {e}", walk_root.display())))?;
            if entry.file_type().is_file() && is_modeling_file(entry.path()) {
                files.push(entry.into_path());
            }
        }
        for file in files {
            let root = root_of(file.parent().unwrap_or(Path::new(".")));
            let (module, display) = describe(&file, root.as_deref());
            inputs.push(Input {
                file,
                module,
                display,
                root,
            });
        }
    }
    Ok(inputs)
}

/// `__version__ = "..."` of a package's `__init__.py`.
pub fn read_version(root: &Path) -> Option<String> {
    let text = std::fs::read_to_string(root.join("__init__.py")).ok()?;
    text.lines().find_map(|line| {
        let rest = line
            .strip_prefix("__version__")?
            .trim_start()
            .strip_prefix('=')?
            .trim();
        let quote = rest.chars().next().filter(|c| *c == '"' || *c == '\'')?;
        let inner = &rest[1..];
        Some(inner[..inner.find(quote)?].to_string())
    })
}

fn read_mapping(root: &Path) -> Option<LossMapping> {
    let text = std::fs::read_to_string(root.join("loss").join("loss_utils.py")).ok()?;
    LossMapping::from_source(&ParsedSource::parse(text).ok()?)
}

/// Scan `paths` (directories or files).
pub fn scan(paths: &[PathBuf], options: &ScanOptions) -> Result<Scan, InputError> {
    if paths.is_empty() {
        return Err(InputError("no PATH given".to_string()));
    }
    let inputs = collect_inputs(paths)?;

    // Parse and index every file in parallel.
    let parsed: Vec<(FileEntry, Option<IndexedFile>)> = inputs
        .par_iter()
        .map(|input| {
            let failed = |error: String| {
                (
                    FileEntry {
                        path: input.display.clone(),
                        status: FileStatus::Failed,
                        error: Some(error),
                    },
                    None,
                )
            };
            let bytes = match std::fs::read(&input.file) {
                Ok(bytes) => bytes,
                Err(e) => return failed(format!("cannot read: {e}")),
            };
            let text = match String::from_utf8(bytes) {
                Ok(text) => text,
                Err(e) => {
                    return failed(format!(
                        "not UTF-8: invalid byte at offset {}",
                        e.utf8_error().valid_up_to()
                    ));
                }
            };
            match ParsedSource::parse(text) {
                Ok(source) => {
                    let index = FileIndex::build(&source, &input.module);
                    // The module's parse is kept only for the passes that read it.
                    let keep = (!options.passes.is_empty()).then_some(source);
                    (
                        FileEntry {
                            path: input.display.clone(),
                            status: FileStatus::Ok,
                            error: None,
                        },
                        Some((index, keep)),
                    )
                }
                Err(e) => failed(format!("syntax error at {e}")),
            }
        })
        .collect();

    // Loss mappings and versions per package root.
    let mut mappings: HashMap<PathBuf, LossMapping> = HashMap::new();
    let mut version = None;
    let mut mapping_origin = "builtin";
    for root in inputs.iter().filter_map(|i| i.root.as_ref()) {
        if !mappings.contains_key(root) {
            let mapping = read_mapping(root).unwrap_or_else(LossMapping::builtin);
            if mapping.origin == "tree" {
                mapping_origin = "tree";
            }
            if version.is_none() {
                version = read_version(root);
            }
            mappings.insert(root.clone(), mapping);
        }
    }
    let builtin = LossMapping::builtin();

    let mut files = Vec::with_capacity(parsed.len());
    let mut indexes = Vec::new();
    let mut sources = Vec::new();
    let mut index_roots = Vec::new();
    let mut index_paths = Vec::new();
    for ((entry, index), input) in parsed.into_iter().zip(&inputs) {
        if let Some((index, source)) = index {
            indexes.push(index);
            sources.push(source);
            index_roots.push(input.root.clone());
            index_paths.push(entry.path.clone());
        }
        files.push(entry);
    }
    let tree = Tree::new(&indexes);
    let mapping_of = |file: usize| {
        index_roots[file]
            .as_ref()
            .and_then(|r| mappings.get(r))
            .unwrap_or(&builtin)
    };
    let mut targets = Vec::new();
    for (file, index) in indexes.iter().enumerate() {
        for (class, entry) in index.classes.iter().enumerate() {
            let wanted = options
                .class
                .as_ref()
                .is_none_or(|name| *name == entry.name);
            if !wanted {
                continue;
            }
            let chain: Vec<_> = tree
                .chain((file, class))
                .into_iter()
                .map(|id| &tree.class(id).facts)
                .collect();
            if is_candidate(&chain, &mapping_of(file).resolve(&entry.name)) {
                targets.push((file, class));
            }
        }
    }

    let mut classes: Vec<ClassReport> = targets
        .par_iter()
        .map(|&id| {
            let chain: Vec<ClassSource> = tree
                .chain(id)
                .into_iter()
                .map(|cid| {
                    let entry = tree.class(cid);
                    ClassSource {
                        qualname: entry.name.clone(),
                        module: tree.file(cid).module.clone(),
                        path: index_paths[cid.0].clone(),
                        line: entry.line,
                        source: entry.source.clone(),
                    }
                })
                .collect();
            let loss = mapping_of(id.0).resolve(&tree.class(id).name);
            let mut report =
                analyze_class_with(&chain, &loss, sources[id.0].as_ref(), &options.passes);
            if let Some(forward_module) = report.forward_module.clone() {
                let binds = indexes
                    .iter()
                    .find(|i| i.module == forward_module)
                    .is_some_and(|i| i.binds_forward_rewrite);
                if binds {
                    report.refuse_module_name_conflict(&forward_module);
                }
            }
            report
        })
        .collect();
    classes.sort_by(|a, b| (&a.path, a.line, &a.qualname).cmp(&(&b.path, b.line, &b.qualname)));
    files.sort_by(|a, b| a.path.cmp(&b.path));
    let summary = Summary::compute(&files, &classes);
    let sources = inputs
        .iter()
        .map(|i| (i.display.clone(), i.file.clone()))
        .collect();
    Ok(Scan {
        sources,
        document: AuditDocument {
            schema: 1,
            tool_version: crate::version().to_string(),
            transformers_version: version,
            loss_mapping: mapping_origin.to_string(),
            summary,
            files,
            classes,
        },
    })
}
