//! Contract 1: the library entry point shared by the CLI and the Python installer.

use ruff_python_ast::{Stmt, StmtClassDef};
use serde::{Deserialize, Serialize};

use crate::audit::{ClassReport, Verdict};
use crate::candidate::{ClassFacts, written_bases};
use crate::parse::ParsedSource;
use crate::passes::{Pass, PassInput, fused_loss};
use crate::reason::Reason;

/// One class of the chain, most-derived first: the class itself, then its bases in MRO
/// order, stopping before transformers' own base classes (PreTrainedModel,
/// GenerationMixin, nn.Module) or where the source is unknown.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassSource {
    /// `LlamaForCausalLM`
    pub qualname: String,
    /// `transformers.models.llama.modeling_llama`
    pub module: String,
    /// `models/llama/modeling_llama.py` (as reported)
    pub path: String,
    /// 1-based line of the `class` statement (decorators included) in that file.
    pub line: u32,
    /// The full class block, exactly as in the file (may be indented).
    pub source: String,
}

/// What the class's `loss_type` resolves to (transformers computes it from the class name
/// and `LOSS_MAPPING`; see `loss_mapping.rs`). Serialised as `"causal"`, `{"other": "..."}`
/// or `"unknown"`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossResolution {
    /// `ForCausalLMLoss`.
    Causal,
    /// Another loss; the string names it (`ForMaskedLM`).
    Other(String),
    /// Not known.
    Unknown,
}

/// Analyse the most-derived class of `chain` (see [`ClassSource`]): find the forward it
/// runs, match the lm_head + loss triplet, refuse or emit the patched forward. Never panics
/// on bad input: an unparsable class source is a `failed` report. Only the fused-loss pass;
/// [`analyze_class_with`] runs the others too.
pub fn analyze_class(chain: &[ClassSource], loss: &LossResolution) -> ClassReport {
    analyze_class_with(chain, loss, None, &[])
}

/// [`analyze_class`], then each of `passes` (`passes/mod.rs`) with the module that defines
/// the class (`module`: its parsed source, when the caller has it), into `report.passes`.
pub fn analyze_class_with(
    chain: &[ClassSource],
    loss: &LossResolution,
    module: Option<&ParsedSource>,
    passes: &[&Pass],
) -> ClassReport {
    let Some(first) = chain.first() else {
        let mut report = ClassReport::empty(&ClassSource::default());
        report.refuse(Reason::ParseError, "empty class chain");
        return report;
    };
    let mut report = ClassReport::empty(first);
    let mut parsed = Vec::with_capacity(chain.len());
    for class in chain {
        match ParsedClass::parse(class) {
            Ok(p) => parsed.push(p),
            Err(message) => {
                report.verdict = Verdict::Failed;
                report.reason = Some(Reason::ParseError);
                report.detail = format!(
                    "class {} ({}) does not parse: {message}",
                    class.qualname, class.path
                );
                return report;
            }
        }
    }
    fused_loss::analyze(&parsed, loss, &mut report);
    for pass in passes {
        let input = PassInput {
            chain: &parsed,
            module,
            fused: &report,
        };
        let verdict = (pass.analyze)(&input);
        report.passes.insert(pass.name.to_string(), verdict);
    }
    report
}

impl ClassReport {
    fn empty(class: &ClassSource) -> ClassReport {
        ClassReport {
            qualname: class.qualname.clone(),
            module: class.module.clone(),
            path: class.path.clone(),
            line: class.line,
            verdict: Verdict::Refused,
            reason: None,
            detail: String::new(),
            forward_sha256: None,
            forward_owner: None,
            forward_module: None,
            forward_path: None,
            forward_line: None,
            head: None,
            head_bias: None,
            transforms: Vec::new(),
            loss_style: None,
            verified: None,
            passes: Default::default(),
            verification: None,
            patched_forward: None,
        }
    }

    /// Record a refusal (or, for the failure codes, a failure).
    pub fn refuse(&mut self, reason: Reason, detail: impl Into<String>) {
        self.verdict = if reason.is_failure() {
            Verdict::Failed
        } else {
            Verdict::Refused
        };
        self.reason = Some(reason);
        self.detail = detail.into();
        self.patched_forward = None;
    }

    /// Turn a patched report into a `name-conflict` refusal because the module that would run
    /// the patch binds `forward_rewrite` to something else (see
    /// [`crate::index::module_binds_forward_rewrite`]).
    pub fn refuse_module_name_conflict(&mut self, module: &str) {
        if self.verdict == Verdict::Patched {
            self.refuse(
                Reason::NameConflict,
                format!("module {module} binds the name `forward_rewrite` to something else"),
            );
        }
    }
}

/// Whether the most-derived class of `chain` is one the pass looks at (`candidate.rs`): the
/// installer asks this before [`analyze_class`], the scan answers it from its index, with the
/// same facts. False when a class source does not parse.
pub fn is_candidate(chain: &[ClassSource], loss: &LossResolution) -> bool {
    let Ok(parsed) = chain
        .iter()
        .map(ParsedClass::parse)
        .collect::<Result<Vec<_>, _>>()
    else {
        return false;
    };
    let facts: Vec<ClassFacts> = parsed
        .iter()
        .map(|p| {
            let class = p.class_def();
            ClassFacts::of(
                class,
                written_bases(class, |b| p.parsed.slice(b).to_string()),
            )
        })
        .collect();
    crate::candidate::is_candidate(&facts.iter().collect::<Vec<_>>(), loss)
}

/// [`is_candidate`] over JSON, for bindings (arguments as [`analyze_class_json`]).
pub fn is_candidate_json(chain: &str, loss: &str) -> Result<bool, String> {
    let chain: Vec<ClassSource> = serde_json::from_str(chain).map_err(|e| format!("chain: {e}"))?;
    let loss: LossResolution = serde_json::from_str(loss).map_err(|e| format!("loss: {e}"))?;
    Ok(is_candidate(&chain, &loss))
}

/// The source of the forward the most-derived class of `chain` runs, as contract 2 hashes
/// it (dedented, one final newline); None when no class of the chain defines one or a
/// source does not parse.
pub fn forward_source(chain: &[ClassSource]) -> Option<String> {
    let parsed: Vec<ParsedClass> = chain
        .iter()
        .map(ParsedClass::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    fused_loss::forward_text(&parsed).map(|text| crate::hash::normalise(&text))
}

/// The forward the most-derived class of `chain` runs, dedented to column 0 the way
/// `patched_forward` is (lines continuing a multi-line string are left as they are): what a
/// patch is compared with in diffs.
pub fn original_forward(chain: &[ClassSource]) -> Option<String> {
    let parsed: Vec<ParsedClass> = chain
        .iter()
        .map(ParsedClass::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    fused_loss::original_forward(&parsed)
}

/// The top-level classes of a module's source as [`ClassSource`]s, each block exactly as the
/// scan cuts it (first decorator line through the last line, plus trailing comments at body
/// depth, as `inspect.BlockFinder` keeps them). For callers that hold module texts (the
/// Python installer): the same class blocks, hence the same hashes, as the CLI.
pub fn module_classes(text: &str, module: &str, path: &str) -> Result<Vec<ClassSource>, String> {
    let parsed = ParsedSource::parse(text).map_err(|e| format!("{path}: {e}"))?;
    let index = crate::index::FileIndex::build(&parsed, module);
    Ok(index
        .classes
        .into_iter()
        .map(|c| ClassSource {
            qualname: c.name,
            module: module.to_string(),
            path: path.to_string(),
            line: c.line,
            source: c.source,
        })
        .collect())
}

/// [`analyze_class`] over JSON, for bindings: `chain` is a JSON array of [`ClassSource`],
/// `loss` a JSON [`LossResolution`]; returns the [`ClassReport`] as JSON. Errors name the
/// argument that is not valid.
pub fn analyze_class_json(chain: &str, loss: &str) -> Result<String, String> {
    let chain: Vec<ClassSource> = serde_json::from_str(chain).map_err(|e| format!("chain: {e}"))?;
    let loss: LossResolution = serde_json::from_str(loss).map_err(|e| format!("loss: {e}"))?;
    if chain.is_empty() {
        return Err("chain: empty, expected the class and its bases".to_string());
    }
    serde_json::to_string(&analyze_class(&chain, &loss)).map_err(|e| e.to_string())
}

/// [`analyze_class_with`] over JSON, for bindings: `chain` and `loss` as for
/// [`analyze_class_json`], `module` the text of the module that defines the class (or None),
/// `passes` the names of the passes to run beyond the fused loss. Errors name the argument.
pub fn analyze_class_in_module_json(
    chain: &str,
    loss: &str,
    module: Option<&str>,
    passes: &[String],
) -> Result<String, String> {
    let chain: Vec<ClassSource> = serde_json::from_str(chain).map_err(|e| format!("chain: {e}"))?;
    let loss: LossResolution = serde_json::from_str(loss).map_err(|e| format!("loss: {e}"))?;
    if chain.is_empty() {
        return Err("chain: empty, expected the class and its bases".to_string());
    }
    let passes = passes
        .iter()
        .map(|name| {
            crate::passes::find(name).ok_or_else(|| {
                format!(
                    "passes: unknown pass {name:?} (known: {})",
                    crate::passes::names().join(", ")
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let module = module
        .map(ParsedSource::parse)
        .transpose()
        .map_err(|e| format!("module: {e}"))?;
    serde_json::to_string(&analyze_class_with(&chain, &loss, module.as_ref(), &passes))
        .map_err(|e| e.to_string())
}

/// A class source parsed on its own. An indented class block is parsed inside an
/// `if True:` prefix so that byte offsets stay simple to map back.
pub(crate) struct ParsedClass<'s> {
    pub source: &'s ClassSource,
    pub parsed: ParsedSource,
    /// Bytes prepended to `source.source` before parsing.
    pub prefix: usize,
}

const INDENTED_PREFIX: &str = "if True:\n";

impl<'s> ParsedClass<'s> {
    fn parse(source: &'s ClassSource) -> Result<Self, String> {
        let indented = source.source.starts_with([' ', '\t']);
        let (text, prefix) = if indented {
            (
                format!("{INDENTED_PREFIX}{}", source.source),
                INDENTED_PREFIX.len(),
            )
        } else {
            (source.source.clone(), 0)
        };
        let parsed = ParsedSource::parse(text).map_err(|e| e.message)?;
        let this = ParsedClass {
            source,
            parsed,
            prefix,
        };
        if this.try_class_def().is_none() {
            return Err("the source is not a single class statement".to_string());
        }
        Ok(this)
    }

    fn try_class_def(&self) -> Option<&StmtClassDef> {
        let suite = self.parsed.suite();
        let stmt = if self.prefix > 0 {
            match suite.first()? {
                Stmt::If(s) => s.body.first()?,
                _ => return None,
            }
        } else {
            suite.first()?
        };
        match stmt {
            Stmt::ClassDef(class) => Some(class),
            _ => None,
        }
    }

    pub fn class_def(&self) -> &StmtClassDef {
        self.try_class_def().expect("checked at parse time")
    }

    /// 1-based line in the original file of a byte offset of the parsed text.
    pub fn file_line(&self, offset: usize) -> u32 {
        let first = self.parsed.line_of(self.prefix);
        self.source.line + self.parsed.line_of(offset) - first
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_entry_point_and_module_classes() {
        let text = "import torch\n\n\nclass AForCausalLM(Base):\n    def forward(self):\n        return 1\n    # tail\n";
        let classes = module_classes(text, "m", "m.py").unwrap();
        assert_eq!(classes.len(), 1);
        assert_eq!(classes[0].line, 4);
        assert!(classes[0].source.ends_with("    # tail\n"));
        let chain = serde_json::to_string(&classes).unwrap();
        let report: ClassReport =
            serde_json::from_str(&analyze_class_json(&chain, "\"causal\"").unwrap()).unwrap();
        assert_eq!(report.reason, Some(Reason::NoLossCall));
        assert!(report.forward_sha256.is_some());
        assert!(
            analyze_class_json("[]", "\"causal\"")
                .unwrap_err()
                .starts_with("chain:")
        );
        assert!(
            analyze_class_json(&chain, "\"sideways\"")
                .unwrap_err()
                .starts_with("loss:")
        );
        let other = serde_json::to_string(&LossResolution::Other("ForMaskedLM".into())).unwrap();
        assert_eq!(other, "{\"other\":\"ForMaskedLM\"}");
        assert!(
            module_classes("class (:", "m", "m.py")
                .unwrap_err()
                .starts_with("m.py: 1:")
        );
    }
}
