//! The command line: exit codes, failed files, filters, and the build cache layout.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_forward-rewrite"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

/// A fresh temporary directory (removed at the end of the test that made it).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "forward-rewrite-cli-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const TOY: &str = r#"import torch
from torch import nn


class ToyForCausalLM(ToyPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @auto_docstring
    def forward(self, input_ids=None, labels=None, **kwargs):
        hidden_states = self.model(input_ids).last_hidden_state
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


class ToyForMaskedLM(ToyPreTrainedModel):
    pass


class ToyBertForCausalLM(ToyPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.cls = ToyMLMHead(config)

    def forward(self, input_ids=None, labels=None, **kwargs):
        logits = self.cls(self.model(input_ids)[0])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return (loss, logits)
"#;

/// A small transformers-like tree: one good modeling file, a syntax error, a file that is
/// not UTF-8, and files the scan must skip.
fn tree() -> TempDir {
    let dir = TempDir::new();
    let pkg = dir.0.join("transformers");
    let toy = pkg.join("models/toy");
    std::fs::create_dir_all(&toy).unwrap();
    std::fs::write(pkg.join("__init__.py"), "__version__ = \"9.8.7\"\n").unwrap();
    std::fs::write(pkg.join("models/__init__.py"), "").unwrap();
    std::fs::write(toy.join("__init__.py"), "").unwrap();
    std::fs::write(toy.join("modeling_toy.py"), TOY).unwrap();
    std::fs::write(
        toy.join("modeling_broken.py"),
        "class BrokenForCausalLM(:\n    pass\n",
    )
    .unwrap();
    std::fs::write(
        toy.join("modeling_latin1.py"),
        b"# caf\xe9\nclass X:\n    pass\n",
    )
    .unwrap();
    std::fs::write(toy.join("modeling_tf_toy.py"), "class TFToyForCausalLM(:\n").unwrap();
    std::fs::write(
        toy.join("modeling_flax_toy.py"),
        "class FlaxToyForCausalLM(:\n",
    )
    .unwrap();
    std::fs::write(toy.join("modular_toy.py"), "class ToyForCausalLM(:\n").unwrap();
    dir
}

fn json(output: &Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

fn path(dir: &Path, rest: &str) -> String {
    dir.join(rest).display().to_string()
}

#[test]
fn scan_reports_failed_files_and_goes_on() {
    let dir = tree();
    let output = run(&["scan", &path(&dir.0, "transformers"), "--json"]);
    let doc = json(&output);
    assert_eq!(doc["schema"], 1);
    assert_eq!(doc["transformers_version"], "9.8.7");
    assert_eq!(doc["loss_mapping"], "builtin");
    // The note goes to stderr whatever the output format (README, "The rewriter CLI").
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("built-in LOSS_MAPPING"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        doc["summary"]["files"], 3,
        "TF, Flax and modular files are skipped"
    );
    assert_eq!(doc["summary"]["failed_files"], 2);
    assert_eq!(doc["summary"]["classes"], 2);
    assert_eq!(doc["summary"]["patched"], 1);
    assert_eq!(doc["summary"]["refused"], 1);
    let files = doc["files"].as_array().unwrap();
    let broken = files
        .iter()
        .find(|f| f["path"] == "models/toy/modeling_broken.py")
        .unwrap();
    assert_eq!(broken["status"], "failed");
    assert!(broken["error"].as_str().unwrap().contains("1:"), "{broken}");
    let latin1 = files
        .iter()
        .find(|f| f["path"] == "models/toy/modeling_latin1.py")
        .unwrap();
    assert!(latin1["error"].as_str().unwrap().starts_with("not UTF-8"));
    let classes = doc["classes"].as_array().unwrap();
    let toy = classes
        .iter()
        .find(|c| c["qualname"] == "ToyForCausalLM")
        .unwrap();
    assert_eq!(toy["module"], "transformers.models.toy.modeling_toy");
    assert_eq!(toy["verdict"], "patched");
    assert_eq!(toy["line"], 5);
    assert!(
        toy.get("patched_forward").is_none(),
        "the audit leaves the patched forwards out"
    );
    let bert = classes
        .iter()
        .find(|c| c["qualname"] == "ToyBertForCausalLM")
        .unwrap();
    assert_eq!(bert["reason"], "non-linear-head");
}

#[test]
fn table_filters_and_single_files() {
    let dir = tree();
    let out = run(&["scan", &path(&dir.0, "transformers"), "--only", "refused"]);
    assert_eq!(out.status.code(), Some(0));
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.starts_with("VERDICT"));
    assert!(
        table.contains("ToyBertForCausalLM") && !table.contains("patched  -"),
        "{table}"
    );
    assert!(table.contains("failed files:") && table.contains("modeling_broken.py"));
    assert!(table.contains(
        "transformers 9.8.7: 3 files (2 failed), 2 classes: 1 patched, 1 refused, 0 failed"
    ));

    let doc = json(&run(&[
        "scan",
        &path(&dir.0, "transformers"),
        "--json",
        "--class",
        "ToyForCausalLM",
    ]));
    assert_eq!(doc["summary"]["classes"], 1);

    // A single file outside any package: the module is its stem.
    let single = dir.0.join("modeling_single.py");
    std::fs::write(&single, TOY).unwrap();
    let out = run(&[
        "scan",
        &single.display().to_string(),
        "--json",
        "--threads",
        "1",
    ]);
    let doc = json(&out);
    assert_eq!(doc["classes"][0]["module"], "modeling_single");
    assert_eq!(doc["transformers_version"], serde_json::Value::Null);

    let out = run(&["scan", &single.display().to_string(), "--compact", "--emit"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("patched  -"));
    assert!(text.contains("forward_rewrite.fused_lm_head_loss("));
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .contains("built-in LOSS_MAPPING")
    );
}

#[test]
fn exit_code_2_for_unusable_arguments() {
    for args in [
        vec!["scan"],
        vec!["scan", "/nonexistent/forward-rewrite/path"],
        vec!["scan", ".", "--only", "maybe"],
        vec!["scan", ".", "--threads", "0"],
        vec!["frobnicate"],
    ] {
        let out = run(&args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.stderr.is_empty());
    }
    let out = run(&["scan", "/nonexistent/forward-rewrite/path"]);
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .contains("/nonexistent/forward-rewrite/path")
    );
    assert_eq!(run(&["--help"]).status.code(), Some(0));
    assert_eq!(run(&["--version"]).status.code(), Some(0));
}

#[test]
fn build_defaults_to_the_cache_the_installer_reads() {
    let dir = tree();
    let cache = dir.0.join("env-cache");
    let out = bin()
        .args(["build", &path(&dir.0, "transformers")])
        .env("FORWARD_REWRITE_CACHE", &cache)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(cache.join("allowlist.json").is_file());
    let xdg = dir.0.join("xdg");
    let out = bin()
        .args(["build", &path(&dir.0, "transformers")])
        .env_remove("FORWARD_REWRITE_CACHE")
        .env("XDG_CACHE_HOME", &xdg)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        xdg.join("forward-rewrite/compiled/allowlist.json")
            .is_file()
    );
}

#[test]
fn build_writes_the_cache() {
    let dir = tree();
    let out_dir = dir.0.join("cache");
    let out = run(&[
        "build",
        &path(&dir.0, "transformers"),
        "--out",
        &out_dir.display().to_string(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let allowlist: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("allowlist.json")).unwrap())
            .unwrap();
    assert_eq!(allowlist["schema"], 2);
    assert_eq!(allowlist["transformers_version"], "9.8.7");
    let entries = allowlist["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1);
    let entry = &entries[0];
    let sha = entry["forward_sha256"].as_str().unwrap();
    assert_eq!(entry["qualname"], "ToyForCausalLM");
    assert_eq!(entry["module"], "transformers.models.toy.modeling_toy");
    assert_eq!(
        entry["forward_module"],
        "transformers.models.toy.modeling_toy"
    );
    assert_eq!(
        entry["patch"],
        format!(
            "patches/transformers.models.toy.modeling_toy.ToyForCausalLM.{}.py",
            &sha[..12]
        )
    );
    let patch = std::fs::read_to_string(out_dir.join(entry["patch"].as_str().unwrap())).unwrap();
    assert_eq!(
        entry["patch_sha256"].as_str().unwrap(),
        forward_rewrite::cache::sha256_hex(patch.as_bytes())
    );
    assert_eq!(entry["verified"], serde_json::Value::Null);
    assert!(
        entry["source_path"]
            .as_str()
            .unwrap()
            .ends_with("models/toy/modeling_toy.py")
    );
    assert!(patch.contains(&format!("# original forward sha256: {sha}\n")));
    assert!(patch.contains("\nimport forward_rewrite\n"));
    assert!(patch.contains("\ndef forward(self, input_ids=None, labels=None, **kwargs):\n"));
    assert!(
        forward_rewrite::parse::ParsedSource::parse(patch).is_ok(),
        "the patch file parses"
    );
    let audit: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("audit.json")).unwrap())
            .unwrap();
    assert_eq!(audit["summary"]["patched"], 1);
    let toy = audit["classes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["qualname"] == "ToyForCausalLM")
        .unwrap();
    assert_eq!(toy["forward_sha256"], sha);

    // An unwritable output is an unusable argument.
    let blocker = dir.0.join("file");
    std::fs::write(&blocker, "").unwrap();
    let out = run(&[
        "build",
        &path(&dir.0, "transformers"),
        "--out",
        &blocker.join("sub").display().to_string(),
    ]);
    assert_eq!(out.status.code(), Some(2));
}

/// Two remote-code files outside any package with the same stem and class name but different
/// forwards get two allowlist entries, each with its own patch file holding its own forward.
#[test]
fn build_never_shares_a_patch_file_between_forwards() {
    let dir = TempDir::new();
    for (sub, scale) in [("a", "2"), ("b", "3")] {
        std::fs::create_dir_all(dir.0.join(sub)).unwrap();
        let text = TOY.replace(
            "        logits = self.lm_head(hidden_states)\n",
            &format!("        logits = self.lm_head(hidden_states) * {scale}\n"),
        );
        std::fs::write(dir.0.join(sub).join("modeling_qwen3.py"), text).unwrap();
    }
    let out_dir = dir.0.join("cache");
    let out = run(&[
        "build",
        &path(&dir.0, "a/modeling_qwen3.py"),
        &path(&dir.0, "b/modeling_qwen3.py"),
        "--out",
        &out_dir.display().to_string(),
        "--class",
        "ToyForCausalLM",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let allowlist: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("allowlist.json")).unwrap())
            .unwrap();
    let entries = allowlist["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    assert_ne!(entries[0]["patch"], entries[1]["patch"]);
    for entry in entries {
        assert_eq!(entry["module"], "modeling_qwen3");
        let patch =
            std::fs::read_to_string(out_dir.join(entry["patch"].as_str().unwrap())).unwrap();
        let sha = entry["forward_sha256"].as_str().unwrap();
        assert!(patch.contains(&format!("# original forward sha256: {sha}\n")));
        let source = std::fs::read_to_string(entry["source_path"].as_str().unwrap()).unwrap();
        let scale = if source.contains("* 2") { "=2," } else { "=3," };
        assert!(patch.contains(scale), "{patch}");
    }
    // A rebuild of one file drops the other's patch file.
    let out = run(&[
        "build",
        &path(&dir.0, "a/modeling_qwen3.py"),
        "--out",
        &out_dir.display().to_string(),
    ]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        std::fs::read_dir(out_dir.join("patches")).unwrap().count(),
        1
    );
}

/// The Hugging Face modules cache: `transformers_modules/<org>/<repo>/<rev>/modeling_x.py`,
/// each directory with an `__init__.py`, the cache directory above too; modules are named as
/// Python imports them (`transformers_modules.org.repo.rev.modeling_x`).
#[test]
fn scan_names_remote_code_modules_as_python_imports_them() {
    let dir = TempDir::new();
    let modules = dir.0.join("huggingface/modules");
    let rev = modules.join("transformers_modules/acme/tiny_lm/0123abcd");
    std::fs::create_dir_all(&rev).unwrap();
    for d in [
        modules.clone(),
        modules.join("transformers_modules"),
        modules.join("transformers_modules/acme"),
        modules.join("transformers_modules/acme/tiny_lm"),
        rev.clone(),
    ] {
        std::fs::write(d.join("__init__.py"), "").unwrap();
    }
    std::fs::write(
        rev.join("modeling_tiny.py"),
        TOY.replace("ToyForCausalLM", "TinyLMHeadModel"),
    )
    .unwrap();
    let doc = json(&run(&["scan", &modules.display().to_string(), "--json"]));
    let classes = doc["classes"].as_array().unwrap();
    let tiny = classes
        .iter()
        .find(|c| c["qualname"] == "TinyLMHeadModel")
        .unwrap();
    assert_eq!(
        tiny["module"],
        "transformers_modules.acme.tiny_lm.0123abcd.modeling_tiny"
    );
    assert_eq!(tiny["verdict"], "patched");
}

/// `build --verify` runs `PYTHON -m forward_rewrite.verify` and records its outcome per entry
/// (here a stand-in interpreter writes the results file the real one would).
#[test]
fn build_verify_records_the_outcome_per_entry() {
    let dir = tree();
    let out_dir = dir.0.join("cache");
    let fake = dir.0.join("fake-python");
    std::fs::write(
        &fake,
        r#"#!/bin/sh
# args: -m forward_rewrite.verify --cache DIR --device cpu --out FILE
out=""
while [ $# -gt 0 ]; do [ "$1" = "--out" ] && out="$2"; shift; done
echo '[{"module": "transformers.models.toy.modeling_toy", "qualname": "ToyForCausalLM", "verified": false, "status": "mismatch", "reason": "gradient error 3.0e-02 (lm_head.weight)"}]' > "$out"
"#,
    )
    .unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let out = run(&[
        "build",
        &path(&dir.0, "transformers"),
        "--out",
        &out_dir.display().to_string(),
        "--verify",
        "--python",
        &fake.display().to_string(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("verified 0 of 1 patches"));
    let allowlist: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("allowlist.json")).unwrap())
            .unwrap();
    let entry = &allowlist["entries"][0];
    assert_eq!(entry["verified"], false);
    assert!(
        entry["verification"]
            .as_str()
            .unwrap()
            .starts_with("mismatch: gradient error")
    );
    let audit: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("audit.json")).unwrap())
            .unwrap();
    let toy = audit["classes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["qualname"] == "ToyForCausalLM")
        .unwrap();
    assert_eq!(toy["verified"], false);
    // An interpreter that cannot run the check is an error (exit 2), the cache stays unverified.
    let out = run(&[
        "build",
        &path(&dir.0, "transformers"),
        "--out",
        &out_dir.display().to_string(),
        "--verify",
        "--python",
        "/nonexistent/python",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--verify: cannot run"));
}

#[test]
fn lint_exit_codes_text_and_json() {
    let dir = TempDir::new();
    let project = dir.0.join("project");
    std::fs::create_dir_all(project.join("pkg/.hidden")).unwrap();
    std::fs::create_dir_all(project.join("clean")).unwrap();
    std::fs::write(
        project.join("pkg/train.py"),
        "model = load(path, use_flash_attention_2=True)\nif cfg.attn_implementation == \"fa2\":\n    pass\n",
    )
    .unwrap();
    std::fs::write(project.join("pkg/broken.py"), "def f(:\n").unwrap();
    std::fs::write(
        project.join("pkg/notes.txt"),
        "use_flash_attention_2=True\n",
    )
    .unwrap();
    std::fs::write(
        project.join("pkg/.hidden/skipped.py"),
        "f(use_flash_attention_2=True)\n",
    )
    .unwrap();
    std::fs::write(
        project.join("clean/ok.py"),
        "model = load(path, attn_implementation=\"flash_attention_2\")\n",
    )
    .unwrap();

    // Findings: exit 1, one line each, the failed file, the summary.
    let out = run(&["lint", &path(&project, "pkg")]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stdout).unwrap();
    let train = path(&project, "pkg/train.py");
    assert!(
        text.contains(&format!("{train}:1:20: FR-A001 "))
            && text.contains("[use: attn_implementation=\"flash_attention_2\"]"),
        "{text}"
    );
    assert!(text.contains(&format!("{train}:2:31: FR-A102 ")), "{text}");
    assert!(
        text.contains("broken.py: not checked: syntax error at 1:"),
        "{text}"
    );
    assert!(
        text.trim_end()
            .ends_with("2 findings in 1 of 2 files (1 not checked): FR-A001 1, FR-A102 1"),
        "{text}"
    );

    // Clean: exit 0.
    let out = run(&["lint", &path(&project, "clean")]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        String::from_utf8(out.stdout)
            .unwrap()
            .contains("0 findings in 0 of 1 files")
    );

    // JSON: the versioned document, same exit status.
    let out = run(&["lint", &path(&project, "pkg/train.py"), "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["schema"], 1);
    assert_eq!(doc["summary"]["findings"], 2);
    assert_eq!(doc["summary"]["rules"]["FR-A001"], 1);
    let first = &doc["findings"][0];
    assert_eq!(first["code"], "FR-A001");
    assert_eq!(first["rule"], "legacy-flag-keyword");
    assert_eq!(
        (first["line"].as_u64(), first["column"].as_u64()),
        (Some(1), Some(20))
    );

    // Unusable arguments: exit 2.
    assert_eq!(
        run(&["lint", &path(&project, "missing")]).status.code(),
        Some(2)
    );
    assert_eq!(run(&["lint"]).status.code(), Some(2));
}

#[test]
fn scan_syncs_text_and_json() {
    let dir = tree();
    let toy = dir.0.join("transformers/models/toy/modeling_syncs.py");
    std::fs::write(
        &toy,
        "class SyncModel(nn.Module):\n    def __init__(self, config):\n        self.layers = nn.ModuleList([SyncLayer(config) for _ in range(2)])\n\n    def forward(self, x):\n        for layer in self.layers:\n            x = layer(x)\n        return x\n\n\nclass SyncLayer(nn.Module):\n    def forward(self, x):\n        n = x.sum().item()\n        return x\n\n\nclass SyncForCausalLM(SyncPreTrainedModel):\n    def __init__(self, config):\n        self.model = SyncModel(config)\n\n    def forward(self, input_ids, labels=None):\n        if (input_ids < 0).any():\n            raise ValueError(\"negative ids\")\n        return self.model(input_ids)\n",
    )
    .unwrap();
    let root = path(&dir.0, "transformers");
    let out = run(&["scan", &root, "--syncs", "--class", "SyncForCausalLM"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("layers: SyncLayer"), "{text}");
    assert!(
        text.contains("item       models/toy/modeling_syncs.py:13  SyncLayer.forward"),
        "{text}"
    );
    assert!(
        text.contains("condition  models/toy/modeling_syncs.py:22"),
        "{text}"
    );
    assert!(
        text.contains("sites per forward + per layer (stock -> patched): eager 1+1"),
        "{text}"
    );

    let doc = json(&run(&["scan", &root, "--syncs", "--json"]));
    // One entry per canonical backend of the attention table (each site reached on each).
    const BACKENDS: usize = 7;
    for class in doc["classes"].as_array().unwrap() {
        assert!(class.get("syncs").is_some(), "{class}");
        assert!(class.get("patched_forward").is_none());
    }
    let sync = doc["classes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["qualname"] == "SyncForCausalLM")
        .unwrap();
    assert_eq!(sync["syncs"]["layers"][0], "SyncLayer");
    let sites = sync["syncs"]["sites"].as_array().unwrap();
    assert_eq!(sites[0]["kind"], "item");
    assert_eq!(
        sites[0]["stock"]["per_layer"].as_array().unwrap().len(),
        BACKENDS
    );
    assert_eq!(sites[1]["kind"], "condition");
    assert_eq!(sites[1]["text"], "(input_ids < 0).any()");
    assert_eq!(
        sites[1]["stock"]["per_forward"].as_array().unwrap().len(),
        BACKENDS
    );

    assert_eq!(
        run(&["scan", &root, "--syncs", "--compact"]).status.code(),
        Some(2)
    );
}

#[test]
fn pass_selection_names_the_known_passes() {
    let dir = tree();
    let root = path(&dir.0, "transformers");
    let out = run(&["scan", &root, "--pass", "bogus"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--pass: unknown pass \"bogus\" (known: fused-loss, none"),
        "{stderr}"
    );
    // The fused loss alone: no `passes` section in the entries.
    let doc = json(&run(&["scan", &root, "--json", "--pass", "none"]));
    assert!(
        doc["classes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c.get("passes").is_none())
    );
}
