//! `build`: the compiled cache the Python runtime reads.
//!
//! ```text
//! DIR/audit.json                      the audit document (schema 1)
//! DIR/allowlist.json                  {"schema": 1, "tool_version", "transformers_version",
//!                                      "entries": [{"forward_sha256", "qualname", "module",
//!                                                   "forward_module", "patch"}]}
//! DIR/patches/<module>.<Class>.py     header comment (class, original forward's sha256),
//!                                     `import forward_rewrite`, the patched `def forward`
//! ```
//!
//! A patch must be executed in the namespace of `forward_module` (the module that defines
//! the original forward; it differs from `module` for an inherited forward), and only for a
//! forward whose contract-2 hash equals `forward_sha256`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::audit::{AuditDocument, Verdict};

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
}

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
         # original forward sha256: {sha256}\n\
         # execute in the namespace of: {forward_module}\n\
         import forward_rewrite\n\n\n{forward}",
        crate::version()
    )
}

/// Write the cache for a finished scan. Returns the allowlist written.
pub fn write(out: &Path, document: &AuditDocument) -> std::io::Result<Allowlist> {
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
        let name = format!("{}.{}.py", class.module, class.qualname);
        let relative = format!("patches/{name}");
        std::fs::write(
            patches.join(&name),
            patch_file(&class.qualname, &class.module, forward_module, sha, forward),
        )?;
        entries.push(AllowlistEntry {
            forward_sha256: sha.clone(),
            qualname: class.qualname.clone(),
            module: class.module.clone(),
            forward_module: forward_module.clone(),
            patch: relative,
        });
    }
    let allowlist = Allowlist {
        schema: 1,
        tool_version: crate::version().to_string(),
        transformers_version: document.transformers_version.clone(),
        entries,
    };
    let mut audit = document.clone();
    for class in &mut audit.classes {
        class.patched_forward = None;
    }
    write_json(&out.join("audit.json"), &audit)?;
    write_json(&out.join("allowlist.json"), &allowlist)?;
    Ok(allowlist)
}

fn write_json(path: &PathBuf, value: &impl Serialize) -> std::io::Result<()> {
    let mut text = serde_json::to_string_pretty(value).map_err(std::io::Error::other)?;
    text.push('\n');
    std::fs::write(path, text)
}
