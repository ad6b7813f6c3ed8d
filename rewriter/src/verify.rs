//! `build --verify`: run the differential check of every patch in a freshly written cache
//! through the Python package (`python -m forward_rewrite.verify`, which builds a tiny model
//! of each class from its own config and compares the loss and every gradient of the patch
//! from this cache with the stock forward), and record the outcome per allowlist entry and in
//! the cache's `audit.json`.

use std::path::Path;
use std::process::Command;

use serde::Deserialize;

use crate::audit::AuditDocument;
use crate::cache::{self, Allowlist};

/// One line of the Python side's result list.
#[derive(Debug, Deserialize)]
struct Outcome {
    module: String,
    qualname: String,
    forward_sha256: Option<String>,
    verified: bool,
    #[serde(default)]
    status: String,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    loss_err: Option<f64>,
    #[serde(default)]
    grad_err: Option<f64>,
}

impl Outcome {
    fn describe(&self) -> String {
        let mut text = self.status.clone();
        if let Some(reason) = self.reason.as_deref().filter(|r| !r.is_empty()) {
            text.push_str(": ");
            text.push_str(reason);
        }
        if let (Some(loss), Some(grad)) = (self.loss_err, self.grad_err) {
            text.push_str(&format!(" (loss err {loss:.1e}, grad err {grad:.1e})"));
        }
        text
    }
}

/// How many entries the check verified, and how many it did not.
pub struct Counts {
    pub verified: usize,
    pub not_verified: usize,
}

/// Run the check on the cache in `out` with `python` on `device`, then rewrite the allowlist
/// and audit with the outcomes. The Python side prints its progress on stderr.
pub fn run(
    out: &Path,
    document: &AuditDocument,
    python: &str,
    device: &str,
) -> Result<Counts, String> {
    let results = out.join(".verification.json");
    let status = Command::new(python)
        .args(["-m", "forward_rewrite.verify", "--cache"])
        .arg(out)
        .args(["--device", device, "--out"])
        .arg(&results)
        .status()
        .map_err(|e| format!("--verify: cannot run {python}: {e}"))?;
    if !status.success() {
        return Err(format!(
            "--verify: `{python} -m forward_rewrite.verify` failed ({status}); is the forward_rewrite package installed for that interpreter? (--python chooses it)"
        ));
    }
    let text = std::fs::read_to_string(&results)
        .map_err(|e| format!("--verify: no results in {}: {e}", results.display()))?;
    let _ = std::fs::remove_file(&results);
    let outcomes: Vec<Outcome> =
        serde_json::from_str(&text).map_err(|e| format!("--verify: unreadable results: {e}"))?;
    let mut allowlist: Allowlist =
        cache::read_allowlist(out).map_err(|e| format!("--verify: {e}"))?;
    let mut counts = Counts {
        verified: 0,
        not_verified: 0,
    };
    for entry in &mut allowlist.entries {
        let outcome = outcomes.iter().find(|o| {
            o.module == entry.module
                && o.qualname == entry.qualname
                && o.forward_sha256
                    .as_ref()
                    .is_none_or(|s| *s == entry.forward_sha256)
        });
        let (verified, why) = match outcome {
            Some(o) => (o.verified, o.describe()),
            None => (
                false,
                "not checked: the verifier returned no result".to_string(),
            ),
        };
        if verified {
            counts.verified += 1;
        } else {
            counts.not_verified += 1;
        }
        entry.verified = Some(verified);
        entry.verification = Some(why);
    }
    cache::commit(out, document, &allowlist).map_err(|e| format!("--verify: {e}"))?;
    Ok(counts)
}
