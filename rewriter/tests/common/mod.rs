//! What the corpus tests share: where the pinned transformers trees are (`corpus/fetch.sh`
//! puts them under `corpus/cache/`; `scripts/test` runs it before `cargo test`) and the insta
//! settings that keep every snapshot in the repository's `snapshots/`.

// Each test crate includes this module and uses its own subset of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The `transformers` package of a pinned release, or None when it has not been fetched.
pub fn corpus_if_fetched(version: &str) -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../corpus/cache")
        .join(format!("transformers-{version}"))
        .join("transformers");
    root.join("__init__.py").is_file().then_some(root)
}

/// The `transformers` package of a pinned release, which must have been fetched.
pub fn corpus(version: &str) -> PathBuf {
    corpus_if_fetched(version).unwrap_or_else(|| {
        panic!(
            "transformers {version} is missing under corpus/cache: run corpus/fetch.sh first \
             (scripts/test does)"
        )
    })
}

/// Snapshots under the repository's `snapshots/`, named without the test module's prefix.
pub fn snapshot_settings() -> insta::Settings {
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path(Path::new(env!("CARGO_MANIFEST_DIR")).join("../snapshots"));
    settings.set_prepend_module_to_snapshot(false);
    settings
}
