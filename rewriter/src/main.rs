//! The `forward-rewrite` command line: a thin layer over the library.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use forward_rewrite::audit::{self, ClassReport, Verdict};
use forward_rewrite::lint;
use forward_rewrite::scan::{ScanOptions, scan};

/// Find the lm_head + loss triplet in transformers modeling files and rewrite it to a fused,
/// chunked linear + cross-entropy that never materialises the logits.
#[derive(Parser)]
#[command(
    name = "forward-rewrite",
    version,
    after_help = "Exit status: 0 when the scan ran (refusals and files that do not parse are results), \
                  2 for unusable arguments or unreadable inputs; `lint` exits 1 when it finds something.\n\
                  Reason codes, rule codes and the document schemas: README.md."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Scan transformers modeling files and report, per `*ForCausalLM` /
    /// `*ForConditionalGeneration` class, whether it is patched, refused (with a reason code)
    /// or failed.
    ///
    /// PATH is a transformers source tree or an installed `site-packages/transformers`
    /// (its `models/` is walked for `modeling_*.py`, TF / Flax / `modular_*` skipped), any
    /// directory, or single Python files.
    Scan {
        /// Directories or files to scan.
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
        #[command(flatten)]
        common: Common,
        /// Print the audit document (JSON, schema 1) instead of the table.
        #[arg(long)]
        json: bool,
        /// Print one compact line per class (verdict, reason, module.class, head, transforms).
        #[arg(long, conflicts_with = "json")]
        compact: bool,
        /// Also print each patched forward (after the table).
        #[arg(long, conflicts_with = "json")]
        emit: bool,
        /// Only list classes with this verdict (the summary still counts every class).
        #[arg(long, value_enum)]
        only: Option<OnlyVerdict>,
        /// Report the host-sync sites each class's forward reaches, per forward and per
        /// decoder layer, per attention backend, stock and patched (instead of the table;
        /// with --json, a `syncs` section in each class entry).
        #[arg(long, conflicts_with_all = ["compact", "emit"])]
        syncs: bool,
    },
    /// Scan like `scan`, then write the compiled cache to DIR: `audit.json`,
    /// `allowlist.json` (forward sha256 -> patch) and `patches/<module>.<Class>.py`.
    Build {
        /// Directories or files to scan.
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
        #[command(flatten)]
        common: Common,
        /// The cache directory to write (created if missing; files in it are overwritten).
        /// Default: where `forward_rewrite.install()` looks: $FORWARD_REWRITE_CACHE, else
        /// $XDG_CACHE_HOME/forward-rewrite/compiled, else ~/.cache/forward-rewrite/compiled.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// After writing, check every patch against the stock forward (a tiny model of each
        /// class from its own config: loss and every gradient) through the Python package,
        /// and record `verified` per allowlist entry and in audit.json.
        #[arg(long)]
        verify: bool,
        /// The Python interpreter with forward_rewrite, torch and transformers installed that
        /// runs the check (default: $FORWARD_REWRITE_PYTHON, else python3).
        #[arg(long, value_name = "PATH", requires = "verify")]
        python: Option<String>,
        /// Where the check runs (default: cpu).
        #[arg(long, value_enum, default_value_t = VerifyDevice::Cpu, requires = "verify")]
        device: VerifyDevice,
    },
    /// Find legacy attention switches and non-canonical attention names in any Python code
    /// (training scripts, frameworks): `use_flash_attention_2=True`, `cfg.flash_attention`,
    /// `attn_implementation="fa2"`, `impl == "flash_attention_2"` where a capability should be
    /// asked. One line per finding (path:line:col, rule code, message, replacement) and a
    /// summary. Exit status: 1 when something is found, 0 when clean.
    Lint {
        /// Python files, or directories walked for `*.py` (hidden directories skipped).
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
        /// Print the lint document (JSON, schema 1) instead of text.
        #[arg(long)]
        json: bool,
        /// Worker threads (default: one per core).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
        threads: Option<u16>,
    },
}

#[derive(clap::Args)]
struct Common {
    /// Only analyse classes with this exact name (e.g. LlamaForCausalLM).
    #[arg(long = "class", value_name = "NAME")]
    class: Option<String>,
    /// Passes to run beyond the fused loss (which always runs: its verdict is the class's),
    /// repeatable or comma-separated; `none` for the fused loss only. Default: every
    /// registered pass. Each reports under `passes.<name>` of the class's audit entry.
    #[arg(long = "pass", value_name = "NAME", value_delimiter = ',')]
    passes: Vec<String>,
    /// Worker threads for parsing and analysis (default: one per core).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,
}

#[derive(Clone, Copy, ValueEnum)]
enum VerifyDevice {
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, ValueEnum)]
enum OnlyVerdict {
    Patched,
    Refused,
    Failed,
}

impl OnlyVerdict {
    fn matches(self, verdict: Verdict) -> bool {
        matches!(
            (self, verdict),
            (OnlyVerdict::Patched, Verdict::Patched)
                | (OnlyVerdict::Refused, Verdict::Refused)
                | (OnlyVerdict::Failed, Verdict::Failed)
        )
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match run(cli) {
        Ok(Outcome::Clean) => ExitCode::SUCCESS,
        Ok(Outcome::Found) => ExitCode::from(1),
        Err(message) => {
            eprintln!("forward-rewrite: error: {message}");
            ExitCode::from(2)
        }
    }
}

/// What a command that ran says through the exit status.
enum Outcome {
    Clean,
    /// `lint` found something (exit 1).
    Found,
}

/// The passes `--pass` selects (`Common::passes`).
fn selected_passes(
    names: &[String],
) -> Result<Vec<&'static forward_rewrite::passes::Pass>, String> {
    use forward_rewrite::passes;
    if names.is_empty() {
        return Ok(passes::PASSES.to_vec());
    }
    let mut selected = Vec::new();
    for name in names {
        match name.as_str() {
            "none" | "fused-loss" => {}
            other => selected.push(passes::find(other).ok_or_else(|| {
                let mut known = vec!["fused-loss", "none"];
                known.extend(passes::names());
                format!(
                    "--pass: unknown pass {other:?} (known: {})",
                    known.join(", ")
                )
            })?),
        }
    }
    Ok(selected)
}

fn set_threads(threads: Option<u16>) -> Result<(), String> {
    if let Some(threads) = threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads.into())
            .build_global()
            .map_err(|e| format!("--threads: {e}"))?;
    }
    Ok(())
}

fn run(cli: Cli) -> Result<Outcome, String> {
    match cli.command {
        Command::Scan {
            paths,
            common,
            json,
            compact,
            emit,
            only,
            syncs,
        } => {
            set_threads(common.threads)?;
            let options = ScanOptions {
                class: common.class,
                passes: selected_passes(&common.passes)?,
            };
            let options_passes = options.passes.clone();
            let mut document = scan(&paths, &options).map_err(|e| e.to_string())?.document;
            note_builtin_mapping(&document);
            let keep = |c: &ClassReport| only.is_none_or(|o| o.matches(c.verdict));
            let mut out = std::io::stdout().lock();
            if syncs {
                document.classes.retain(keep);
                let reports = forward_rewrite::syncs::analyze(&paths, &document)
                    .map_err(|e| e.to_string())?;
                if json {
                    for class in &mut document.classes {
                        class.patched_forward = None;
                    }
                    let classes = document
                        .classes
                        .iter()
                        .map(|class| ClassWithSyncs {
                            class,
                            syncs: reports.get(&(class.module.clone(), class.qualname.clone())),
                        })
                        .collect();
                    let with_syncs = DocumentWithSyncs {
                        schema: document.schema,
                        tool_version: &document.tool_version,
                        transformers_version: document.transformers_version.as_deref(),
                        loss_mapping: &document.loss_mapping,
                        summary: &document.summary,
                        files: &document.files,
                        classes,
                    };
                    let text =
                        serde_json::to_string_pretty(&with_syncs).map_err(|e| e.to_string())?;
                    let _ = writeln!(out, "{text}");
                } else {
                    let table = forward_rewrite::backends::table();
                    for class in &document.classes {
                        let header = format!(
                            "{}  {}:{}  {}{}",
                            class.qualname,
                            class.path,
                            class.line,
                            verdict_name(class.verdict),
                            class
                                .reason
                                .map(|r| format!(" ({})", r.code()))
                                .unwrap_or_default()
                        );
                        let key = (class.module.clone(), class.qualname.clone());
                        if let Some(report) = reports.get(&key) {
                            let _ = writeln!(
                                out,
                                "{}",
                                forward_rewrite::syncs::render_class(&header, report, table)
                            );
                        }
                    }
                    let _ = write!(out, "{}", audit::render_summary(&document));
                }
                return Ok(Outcome::Clean);
            }
            if json {
                let patched: Vec<_> = document
                    .classes
                    .iter()
                    .map(|c| c.patched_forward.clone())
                    .collect();
                document.classes.retain(keep);
                for class in &mut document.classes {
                    class.patched_forward = None;
                }
                drop(patched);
                let text = serde_json::to_string_pretty(&document).map_err(|e| e.to_string())?;
                let _ = writeln!(out, "{text}");
                return Ok(Outcome::Clean);
            }
            let classes: Vec<&ClassReport> = document.classes.iter().filter(|c| keep(c)).collect();
            if compact {
                let owned: Vec<ClassReport> = classes.iter().map(|c| (*c).clone()).collect();
                let _ = write!(out, "{}", audit::render_compact(&owned));
                for pass in &options_passes {
                    let _ = write!(
                        out,
                        "\n# pass {}\n{}",
                        pass.name,
                        audit::render_pass_compact(&owned, pass.name)
                    );
                }
                let _ = write!(out, "\n{}", audit::render_summary(&document));
            } else {
                let files: Vec<_> = document.files.iter().collect();
                let _ = write!(out, "{}", audit::render_table(&document, &files, &classes));
            }
            if emit {
                for class in classes.iter().filter(|c| c.verdict == Verdict::Patched) {
                    let _ = writeln!(out, "\n# {}.{}", class.module, class.qualname);
                    let _ = write!(out, "{}", class.patched_forward.as_deref().unwrap_or(""));
                }
            }
            Ok(Outcome::Clean)
        }
        Command::Build {
            paths,
            common,
            out,
            verify,
            python,
            device,
        } => {
            set_threads(common.threads)?;
            let out = match out {
                Some(out) => out,
                None => default_cache_dir().ok_or(
                    "no --out given and no cache directory known: set FORWARD_REWRITE_CACHE or HOME",
                )?,
            };
            let options = ScanOptions {
                class: common.class,
                passes: selected_passes(&common.passes)?,
            };
            let result = scan(&paths, &options).map_err(|e| e.to_string())?;
            let document = &result.document;
            note_builtin_mapping(document);
            let allowlist = forward_rewrite::cache::write(&out, document, &result.sources)
                .map_err(|e| format!("cannot write the cache to {}: {e}", out.display()))?;
            println!(
                "wrote {} patches, allowlist.json and audit.json to {}",
                allowlist.entries.len(),
                out.display()
            );
            print!("{}", audit::render_summary(document));
            if verify {
                let python = python
                    .or_else(|| std::env::var("FORWARD_REWRITE_PYTHON").ok())
                    .unwrap_or_else(|| "python3".to_string());
                let device = match device {
                    VerifyDevice::Cpu => "cpu",
                    VerifyDevice::Cuda => "cuda",
                };
                let counts = forward_rewrite::verify::run(&out, document, &python, device)?;
                println!(
                    "verified {} of {} patches ({} not verified: see `verification` in {})",
                    counts.verified,
                    counts.verified + counts.not_verified,
                    counts.not_verified,
                    out.join("allowlist.json").display()
                );
            }
            Ok(Outcome::Clean)
        }
        Command::Lint {
            paths,
            json,
            threads,
        } => {
            set_threads(threads)?;
            let document = lint::lint_paths(&paths).map_err(|e| e.to_string())?;
            let mut out = std::io::stdout().lock();
            if json {
                let text = serde_json::to_string_pretty(&document).map_err(|e| e.to_string())?;
                let _ = writeln!(out, "{text}");
            } else {
                let _ = write!(out, "{}", lint::render_text(&document));
            }
            Ok(if document.findings.is_empty() {
                Outcome::Clean
            } else {
                Outcome::Found
            })
        }
    }
}

/// The audit document with a `syncs` section in each class entry (`scan --syncs --json`):
/// the audit's fields in the audit's order.
#[derive(serde::Serialize)]
struct DocumentWithSyncs<'a> {
    schema: u32,
    tool_version: &'a str,
    transformers_version: Option<&'a str>,
    loss_mapping: &'a str,
    summary: &'a audit::Summary,
    files: &'a [audit::FileEntry],
    classes: Vec<ClassWithSyncs<'a>>,
}

#[derive(serde::Serialize)]
struct ClassWithSyncs<'a> {
    #[serde(flatten)]
    class: &'a ClassReport,
    /// Null when the class is not in the loaded sources.
    syncs: Option<&'a forward_rewrite::syncs::ClassSyncs>,
}

fn verdict_name(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Patched => "patched",
        Verdict::Refused => "refused",
        Verdict::Failed => "failed",
    }
}

/// Say on stderr (whatever the output format) that loss types came from the built-in mapping.
fn note_builtin_mapping(document: &audit::AuditDocument) {
    if document.loss_mapping == "builtin" {
        eprintln!(
            "forward-rewrite: note: no loss/loss_utils.py in the scanned paths; loss types resolved with the built-in LOSS_MAPPING of transformers 5.23.0"
        );
    }
}

/// The compiled cache the Python installer reads when not told otherwise (README,
/// "Compiled cache"); keep in step with `_resolve_cache_dir` in `_installer.py`.
fn default_cache_dir() -> Option<PathBuf> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("FORWARD_REWRITE_CACHE") {
        return Some(PathBuf::from(dir));
    }
    let base = var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    Some(base.join("forward-rewrite").join("compiled"))
}
