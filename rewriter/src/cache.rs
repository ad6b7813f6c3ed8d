//! `build`: the compiled cache the Python runtime reads.
//!
//! ```text
//! DIR/audit.json                      the audit document (schema 1), classes with `verified`
//! DIR/allowlist.json                  {"schema": 2, "tool_version", "transformers_version",
//!                                      "entries": [{"forward_sha256", "qualname", "module",
//!                                                   "forward_module", "patch", "patch_sha256",
//!                                                   "source_path", "verified", "verification"}]}
//! DIR/patches/<module>.<Class>.<sha12>.py
//!                                     header comment (class, original forward's sha256),
//!                                     `import forward_rewrite`, the patched `def forward`
//! ```
//!
//! A patch must be executed in the namespace of `forward_module` (the module that defines
//! the original forward; it differs from `module` for an inherited forward), and only for a
//! forward whose contract-2 hash equals `forward_sha256`. The runtime checks, before a patch
//! runs, that the file hashes to `patch_sha256` and that its header names the same forward
//! hash; an entry that fails either is ignored with a warning (the in-process rewrite runs).
//!
//! Patch file names carry the forward hash, so two classes of the same module name and
//! qualname (two remote-code `modeling_qwen3.py` outside any package) never share a file.
//! Every file is written to a temporary name and renamed into place, the allowlist last: a
//! reader sees the old cache or the new one, never half of one. Patch files no entry names
//! any more are removed after the allowlist is in place.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::audit::{AuditDocument, Verdict};

/// The allowlist schema this tool writes (the runtime reads exactly this one).
pub const ALLOWLIST_SCHEMA: u32 = 2;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allowlist {
    pub schema: u32,
    pub tool_version: String,
    pub transformers_version: Option<String>,
    pub entries: Vec<AllowlistEntry>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowlistEntry {
    pub forward_sha256: String,
    pub qualname: String,
    pub module: String,
    pub forward_module: String,
    /// Path of the patch file, relative to the cache directory (`patches/...`).
    pub patch: String,
    /// sha256 of the patch file's bytes.
    pub patch_sha256: String,
    /// Absolute path of the scanned file that defines the class (for `verify`).
    pub source_path: Option<String>,
    /// Whether the differential check (`build --verify`) passed: null when not run.
    pub verified: Option<bool>,
    /// What the check found (a skip or mismatch reason, or the errors).
    pub verification: Option<String>,
}

/// The first line of a patch file after the tool line; the runtime reads the hash back.
pub const HEADER_SHA_PREFIX: &str = "# original forward sha256: ";

/// The text of one patch file.
pub fn patch_file(
    qualname: &str,
    module: &str,
    forward_module: &str,
    sha256: &str,
    forward: &str,
) -> String {
    format!(
        "# forward-rewrite {} patch for {module}.{qualname}\n\
         {HEADER_SHA_PREFIX}{sha256}\n\
         # execute in the namespace of: {forward_module}\n\
         import forward_rewrite\n\n\n{forward}",
        crate::version()
    )
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The patch file name of a class: module, class and the first 12 hex digits of the forward
/// hash (unique per forward text).
pub fn patch_name(module: &str, qualname: &str, forward_sha256: &str) -> String {
    let short = &forward_sha256[..forward_sha256.len().min(12)];
    format!("{module}.{qualname}.{short}.py")
}

/// Write the cache for a finished scan; `sources` maps each file's reported path to the file
/// on disk (for `source_path`). Returns the allowlist written.
pub fn write(
    out: &Path,
    document: &AuditDocument,
    sources: &HashMap<String, PathBuf>,
) -> std::io::Result<Allowlist> {
    let patches = out.join("patches");
    std::fs::create_dir_all(&patches)?;
    let mut entries = Vec::new();
    for class in &document.classes {
        if class.verdict != Verdict::Patched {
            continue;
        }
        let (Some(forward), Some(sha), Some(forward_module)) = (
            &class.patched_forward,
            &class.forward_sha256,
            &class.forward_module,
        ) else {
            continue;
        };
        let name = patch_name(&class.module, &class.qualname, sha);
        let text = patch_file(&class.qualname, &class.module, forward_module, sha, forward);
        write_atomic(&patches.join(&name), text.as_bytes())?;
        entries.push(AllowlistEntry {
            forward_sha256: sha.clone(),
            qualname: class.qualname.clone(),
            module: class.module.clone(),
            forward_module: forward_module.clone(),
            patch: format!("patches/{name}"),
            patch_sha256: sha256_hex(text.as_bytes()),
            source_path: sources
                .get(&class.path)
                .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()))
                .map(|p| p.display().to_string()),
            verified: None,
            verification: None,
        });
    }
    let allowlist = Allowlist {
        schema: ALLOWLIST_SCHEMA,
        tool_version: crate::version().to_string(),
        transformers_version: document.transformers_version.clone(),
        entries,
    };
    commit(out, document, &allowlist)?;
    Ok(allowlist)
}

/// Write `audit.json` (classes carry the allowlist's verification) and then `allowlist.json`,
/// each atomically, and remove the patch files no entry names.
pub fn commit(out: &Path, document: &AuditDocument, allowlist: &Allowlist) -> std::io::Result<()> {
    let mut audit = document.clone();
    for class in &mut audit.classes {
        class.patched_forward = None;
        if let Some(entry) = allowlist.entries.iter().find(|e| {
            e.module == class.module
                && e.qualname == class.qualname
                && Some(&e.forward_sha256) == class.forward_sha256.as_ref()
        }) {
            class.verified = entry.verified;
            class.verification = entry.verification.clone();
        }
    }
    write_json(&out.join("audit.json"), &audit)?;
    write_json(&out.join("allowlist.json"), allowlist)?;
    let named: BTreeSet<&str> = allowlist
        .entries
        .iter()
        .filter_map(|e| e.patch.strip_prefix("patches/"))
        .collect();
    for file in std::fs::read_dir(out.join("patches"))? {
        let file = file?;
        let name = file.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".py") && !named.contains(name.as_ref()) {
            let _ = std::fs::remove_file(file.path());
        }
    }
    Ok(())
}

/// Read back an allowlist written by [`write`].
pub fn read_allowlist(out: &Path) -> std::io::Result<Allowlist> {
    let text = std::fs::read_to_string(out.join("allowlist.json"))?;
    serde_json::from_str(&text).map_err(std::io::Error::other)
}

fn write_json(path: &Path, value: &impl Serialize) -> std::io::Result<()> {
    let mut text = serde_json::to_string_pretty(value).map_err(std::io::Error::other)?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// Write to a temporary file beside `path`, then rename it into place.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_names_are_unique_per_forward() {
        let a = patch_name("modeling_qwen3", "Qwen3ForCausalLM", &"a".repeat(64));
        let b = patch_name("modeling_qwen3", "Qwen3ForCausalLM", &"b".repeat(64));
        assert_ne!(a, b);
        assert_eq!(a, "modeling_qwen3.Qwen3ForCausalLM.aaaaaaaaaaaa.py");
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
