//! Which classes the fused-loss pass looks at: classes by what they do, not by their name.
//!
//! A class is a *candidate* when it is a model class (a `PreTrainedModel` or
//! `GenerationMixin` subclass as far as the sources show: some class of its chain names such
//! a base) and either
//!
//! * its name ends with one of transformers' language-model suffixes (`ForCausalLM`,
//!   `ForConditionalGeneration`, `LMHeadModel`), so a class of that kind is always reported,
//!   even when it computes no loss; or
//! * the forward it runs takes `labels`, computes a language-model loss (calls
//!   `self.loss_function`, a cross-entropy or another `*loss*` callable, over the vocabulary
//!   or on shifted tokens) and its `loss_type` does not resolve to a non-causal task loss
//!   (`ForSequenceClassification`, `ForMaskedLM`, ...). This brings in `GPT2LMHeadModel`,
//!   remote code's `QWenLMHeadModel` and any other name.
//!
//! The facts are read once per class ([`ClassFacts::of`]); the scan keeps them in its index and
//! the installer gets the same answer through [`crate::analyze::is_candidate`], so both list the
//! same classes.

use ruff_python_ast::{Expr, StmtClassDef, StmtFunctionDef};

use crate::analyze::LossResolution;
use crate::syntax::{callee_last_name, calls_in_stmt, dotted_name, method, walk_statements};

/// Class-name suffixes of transformers' language-model heads.
pub const LM_SUFFIXES: [&str; 3] = ["ForCausalLM", "ForConditionalGeneration", "LMHeadModel"];

/// What one class statement says about itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClassFacts {
    pub name: String,
    /// Base class expressions as written (dotted names).
    pub bases: Vec<String>,
    /// The class's own `forward`, if it defines one.
    pub forward: Option<ForwardFacts>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ForwardFacts {
    pub takes_labels: bool,
    /// Calls `self.loss_function`, a cross-entropy or a `*loss*` callable, over the
    /// vocabulary (it names `vocab_size`) or on shifted / rolled tokens.
    pub computes_lm_loss: bool,
}

impl ClassFacts {
    pub fn of(class: &StmtClassDef, bases: Vec<String>) -> ClassFacts {
        let forward = method(&class.body, "forward").map(|def| {
            let mut statements = Vec::new();
            walk_statements(&def.body, &mut statements);
            let computes_loss = statements.iter().any(|stmt| {
                calls_in_stmt(stmt).iter().any(|call| {
                    let callee = callee_last_name(&call.func).unwrap_or_default();
                    callee.to_ascii_lowercase().contains("loss")
                        || callee == "cross_entropy"
                        || dotted_name(&call.func).is_some_and(|d| d == "loss_fct")
                })
            });
            // A language-model loss is taken over the vocabulary or on shifted tokens (a
            // multiple-choice or next-sentence loss is neither).
            let over_tokens = mentions_vocab_size(def) || shifts_labels(def) || rolls_labels(def);
            ForwardFacts {
                takes_labels: def.parameters.iter().any(|p| p.name().as_str() == "labels"),
                computes_lm_loss: computes_loss && over_tokens,
            }
        });
        ClassFacts {
            name: class.name.to_string(),
            bases,
            forward,
        }
    }
}

/// The base class expressions of a class statement, as dotted names (or their source text).
pub fn written_bases(class: &StmtClassDef, text_of: impl Fn(&Expr) -> String) -> Vec<String> {
    class
        .arguments
        .as_ref()
        .map(|args| {
            args.args
                .iter()
                .map(|b| dotted_name(b).unwrap_or_else(|| text_of(b)))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a base class name (its last dotted component) marks a model class.
fn is_model_base(base: &str) -> bool {
    let last = base.rsplit('.').next().unwrap_or(base);
    last == "GenerationMixin"
        || last.ends_with("PreTrainedModel")
        || LM_SUFFIXES.iter().any(|s| last.ends_with(s))
}

pub fn has_lm_suffix(name: &str) -> bool {
    LM_SUFFIXES.iter().any(|s| name.ends_with(s))
}

/// The candidate rule (module documentation) over a chain: the class first, then its known
/// bases in MRO order.
pub fn is_candidate(chain: &[&ClassFacts], loss: &LossResolution) -> bool {
    let Some(first) = chain.first() else {
        return false;
    };
    let model = chain
        .iter()
        .any(|c| c.bases.iter().any(|b| is_model_base(b)));
    if !model {
        return false;
    }
    if has_lm_suffix(&first.name) {
        return true;
    }
    let Some(forward) = chain.iter().find_map(|c| c.forward) else {
        return false;
    };
    forward.takes_labels && forward.computes_lm_loss && !matches!(loss, LossResolution::Other(_))
}

/// A slice like `labels[..., 1:]` / `logits[..., :-1, :]` (a manual causal shift).
pub fn shifts_labels(def: &StmtFunctionDef) -> bool {
    fn has_shift_slice(expr: &Expr) -> bool {
        match expr {
            Expr::Slice(slice) => {
                let is_one = |e: &Option<Box<Expr>>| {
                    e.as_deref().is_some_and(|e| match e {
                        Expr::NumberLiteral(n) => n.value.as_int().and_then(|i| i.as_u8()) == Some(1),
                        Expr::UnaryOp(u) => matches!(&*u.operand, Expr::NumberLiteral(n) if n.value.as_int().and_then(|i| i.as_u8()) == Some(1)),
                        _ => false,
                    })
                };
                is_one(&slice.lower) || is_one(&slice.upper)
            }
            Expr::Tuple(tuple) => tuple.elts.iter().any(has_shift_slice),
            _ => false,
        }
    }
    let mut found = false;
    for stmt in &def.body {
        crate::syntax::for_each_subscript(stmt, &mut |sub| {
            let shifted_value = crate::syntax::names_in_expr(&sub.value)
                .iter()
                .any(|n| n.id.as_str().contains("labels") || n.id.as_str().contains("logits"));
            if shifted_value && has_shift_slice(&sub.slice) {
                found = true;
            }
        });
    }
    found
}

/// Whether the forward rolls a tensor (`torch.roll(...)` / `x.roll(...)`): MPT's label shift.
pub fn rolls_labels(def: &StmtFunctionDef) -> bool {
    let mut statements = Vec::new();
    walk_statements(&def.body, &mut statements);
    statements.iter().any(|s| {
        calls_in_stmt(s)
            .iter()
            .any(|c| callee_last_name(&c.func) == Some("roll"))
    })
}

/// Whether the forward names a vocabulary size (`self.config.vocab_size`, `vocab_size=`).
fn mentions_vocab_size(def: &StmtFunctionDef) -> bool {
    def.body.iter().any(|stmt| {
        crate::syntax::attributes_in_stmt(stmt)
            .iter()
            .any(|a| a.attr.as_str() == "vocab_size")
            || crate::syntax::names_in_stmt(stmt)
                .iter()
                .any(|n| n.id.as_str() == "vocab_size")
            || calls_in_stmt(stmt).iter().any(|c| {
                c.arguments
                    .keywords
                    .iter()
                    .any(|k| k.arg.as_ref().is_some_and(|a| a.as_str() == "vocab_size"))
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::ParsedSource;
    use ruff_python_ast::Stmt;

    fn facts(text: &str) -> Vec<ClassFacts> {
        let src = ParsedSource::parse(text).unwrap();
        src.suite()
            .iter()
            .filter_map(|s| match s {
                Stmt::ClassDef(c) => Some(ClassFacts::of(c, written_bases(c, |_| String::new()))),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn classes_by_what_they_do() {
        let all = facts(
            "class GPT2LMHeadModel(GPT2PreTrainedModel, GenerationMixin):
    def forward(self, input_ids, labels=None):
        loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size)
class QWenLMHead(PreTrainedModel):
    def forward(self, input_ids, labels=None):
        shift_labels = labels[..., 1:]
        loss = loss_fct(shift_logits, shift_labels)
class LlamaModel(LlamaPreTrainedModel):
    def forward(self, input_ids):
        return x
class KwargsForCausalLM(FlashAttentionKwargs, LossKwargs):
    pass
class FooForCausalLM(FooPreTrainedModel):
    pass
class Helper(nn.Module):
    def forward(self, x, labels=None):
        return self.loss_function(x, labels)
class BertForMultipleChoice(BertPreTrainedModel):
    def forward(self, input_ids, labels=None):
        loss = loss_fct(reshaped_logits, labels)
",
        );
        let causal = LossResolution::Causal;
        let other = LossResolution::Other("ForSequenceClassification".into());
        let one = |i: usize| vec![&all[i]];
        assert!(is_candidate(&one(0), &causal));
        assert!(is_candidate(&one(1), &causal), "any name, a loss on labels");
        assert!(
            !is_candidate(&one(1), &other),
            "a non-causal task loss by name"
        );
        assert!(!is_candidate(&one(2), &causal), "no labels, no loss");
        assert!(
            !is_candidate(&one(3), &causal),
            "a TypedDict is no model class"
        );
        assert!(
            is_candidate(&one(4), &causal),
            "LM suffix: reported even without forward"
        );
        assert!(!is_candidate(&one(5), &causal), "not a model class");
        assert!(
            !is_candidate(&one(6), &causal),
            "a loss, but not over the vocabulary"
        );
        // Inherited forward and model base through the chain.
        let child = facts("class Child(QWenLMHead):\n    pass\n");
        assert!(is_candidate(&[&child[0], &all[1]], &causal));
    }
}
