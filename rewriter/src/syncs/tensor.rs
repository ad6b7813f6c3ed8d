//! Which expressions of a function hold a tensor: a small, local, flow-insensitive inference.
//! Only the sync kinds that depend on a value being a tensor (`bool(t)`, `if t:`, `print(t)`)
//! need it; `.item()`, `.nonzero()` and friends are reported whatever their receiver.
//!
//! A name is a tensor when a parameter annotation says so (`torch.Tensor`,
//! `torch.LongTensor | None`, `Optional[torch.Tensor]`) or when any assignment in the
//! function gives it a tensor expression. Tensor expressions: calls of `torch.*` functions
//! (not `torch.is_*` / `get_*` / `finfo` / ...), `F.*` / `nn.functional.*`, `torch.linalg.*`;
//! methods of a tensor other than the few that return Python values (`size`, `dim`, `item`,
//! `get_*`, ...); methods that only tensors have, whatever the receiver unless it is an
//! imported module (`.any()`, `.sum()`, `.cumsum()`, but not `np.sum(...)`); arithmetic,
//! element-wise comparisons, indexing and `.T` of tensors; loop variables over tensors.
//! `.shape`, `.dtype`, `.device` and `len()` are not tensors, so shape checks never count.

use std::collections::HashSet;

use ruff_python_ast::{CmpOp, Expr, Parameters, Stmt, UnaryOp};

use crate::syntax::{dotted_name, walk_statements};

/// Methods that only tensors have: the receiver does not need to be known.
const TENSOR_METHODS: &[&str] = &[
    "any",
    "all",
    "bool",
    "sum",
    "cumsum",
    "cumprod",
    "diff",
    "abs",
    "amax",
    "amin",
    "argmax",
    "argmin",
    "masked_fill",
    "nonzero",
    "long",
    "float",
    "int",
    "half",
    "bfloat16",
    "eq",
    "ne",
    "ge",
    "gt",
    "le",
    "lt",
    "logical_and",
    "logical_or",
    "logical_not",
    "sigmoid",
    "softmax",
    "unsqueeze",
    "squeeze",
    "view",
    "reshape",
    "contiguous",
    "transpose",
    "expand",
    "flatten",
    "clamp",
    "max",
    "min",
    "mean",
    "prod",
    "isnan",
    "isinf",
    "isfinite",
];

/// Tensor methods that return Python values, not tensors.
const PYTHON_VALUE_METHODS: &[&str] = &[
    "item",
    "tolist",
    "size",
    "dim",
    "ndimension",
    "numel",
    "nelement",
    "element_size",
    "data_ptr",
    "stride",
    "storage_offset",
    "is_contiguous",
    "is_floating_point",
    "is_complex",
    "get_device",
    "numpy",
    "type",
    "untyped_storage",
    "has_names",
    "__len__",
];

/// Tensor attributes that are tensors (the others, `shape`, `dtype`, `device`, `ndim`, ...,
/// are not).
const TENSOR_ATTRIBUTES: &[&str] = &["T", "mT", "H", "mH", "data", "grad", "real", "imag"];

/// `torch.<name>` functions that do not return a tensor.
const TORCH_NON_TENSOR: &[&str] = &[
    "finfo",
    "iinfo",
    "device",
    "dtype",
    "Size",
    "no_grad",
    "enable_grad",
    "inference_mode",
    "equal",
    "allclose",
    "compile",
    "autocast",
    "broadcast_shapes",
    "result_type",
    "promote_types",
    "can_cast",
    "numel",
    "typename",
    "Generator",
    "Stream",
    "Event",
];

/// The names known to hold tensors in one function.
#[derive(Debug, Default)]
pub struct TensorNames {
    names: HashSet<String>,
    /// Imported modules (`np`, `math`): `np.sum(...)` is not a tensor method.
    modules: HashSet<String>,
}

impl TensorNames {
    /// Infer from the parameters' annotations and the body's assignments (to a fixpoint).
    pub fn infer(
        parameters: &Parameters,
        body: &[Stmt],
        modules: &HashSet<String>,
        annotation_text: impl Fn(&Expr) -> String,
    ) -> TensorNames {
        let mut known = TensorNames {
            names: HashSet::new(),
            modules: modules.clone(),
        };
        for parameter in parameters.iter_non_variadic_params() {
            if let Some(annotation) = &parameter.parameter.annotation
                && is_tensor_annotation(&annotation_text(annotation))
            {
                known.names.insert(parameter.parameter.name.to_string());
            }
        }
        let mut statements = Vec::new();
        walk_statements(body, &mut statements);
        let mut assignments: Vec<(&Expr, &Expr)> = Vec::new();
        for stmt in statements {
            match stmt {
                Stmt::Assign(a) => {
                    for target in &a.targets {
                        pair_targets(target, &a.value, &mut assignments);
                    }
                }
                Stmt::AnnAssign(a) => {
                    if let Some(value) = &a.value {
                        pair_targets(&a.target, value, &mut assignments);
                    }
                }
                // Iterating a tensor gives tensors (`for idx in expert_hit:`).
                Stmt::For(f) => {
                    if matches!(f.target.as_ref(), Expr::Name(_)) {
                        assignments.push((&f.target, &f.iter));
                    }
                }
                _ => {}
            }
        }
        loop {
            let before = known.names.len();
            for (target, value) in &assignments {
                if let Expr::Name(name) = target
                    && !known.names.contains(name.id.as_str())
                    && known.is_tensor(value)
                {
                    known.names.insert(name.id.to_string());
                }
            }
            if known.names.len() == before {
                return known;
            }
        }
    }

    pub fn is_tensor(&self, expr: &Expr) -> bool {
        match expr {
            Expr::Name(name) => self.names.contains(name.id.as_str()),
            Expr::Call(call) => match call.func.as_ref() {
                Expr::Attribute(attr) => {
                    if let Some(function) = torch_function(&call.func) {
                        return function;
                    }
                    let method = attr.attr.as_str();
                    // A Python value (`size`, `item`, ...; `get_*`, like Cache.get_seq_length)
                    // or a module's function (`np.sum`).
                    if PYTHON_VALUE_METHODS.contains(&method)
                        || method.starts_with("get_")
                        || matches!(attr.value.as_ref(), Expr::Name(n) if self.modules.contains(n.id.as_str()))
                    {
                        return false;
                    }
                    TENSOR_METHODS.contains(&method) || self.is_tensor(&attr.value)
                }
                _ => false,
            },
            Expr::Attribute(attr) => {
                TENSOR_ATTRIBUTES.contains(&attr.attr.as_str()) && self.is_tensor(&attr.value)
            }
            Expr::Subscript(sub) => self.is_tensor(&sub.value),
            Expr::BinOp(op) => self.is_tensor(&op.left) || self.is_tensor(&op.right),
            Expr::UnaryOp(op) => op.op != UnaryOp::Not && self.is_tensor(&op.operand),
            Expr::Compare(compare) => {
                compare
                    .ops
                    .iter()
                    .all(|op| !matches!(op, CmpOp::Is | CmpOp::IsNot | CmpOp::In | CmpOp::NotIn))
                    && (self.is_tensor(&compare.left)
                        || compare.comparators.iter().any(|c| self.is_tensor(c)))
            }
            Expr::BoolOp(op) => op.values.iter().any(|v| self.is_tensor(v)),
            Expr::If(e) => self.is_tensor(&e.body) || self.is_tensor(&e.orelse),
            Expr::Named(named) => self.is_tensor(&named.value),
            _ => false,
        }
    }
}

/// `torch.f(...)`, `F.f(...)`, `nn.functional.f(...)`, `torch.linalg.f(...)`: Some(whether it
/// returns a tensor); None for anything else.
fn torch_function(func: &Expr) -> Option<bool> {
    let dotted = dotted_name(func)?;
    let (namespace, name) = dotted.rsplit_once('.')?;
    match namespace {
        "torch" => Some(
            !(name.starts_with("is_")
                || name.starts_with("get_")
                || name.starts_with("set_")
                || name.starts_with('_')
                || TORCH_NON_TENSOR.contains(&name)),
        ),
        "F"
        | "nn.functional"
        | "torch.nn.functional"
        | "torch.linalg"
        | "torch.special"
        | "torch.fft" => Some(!name.starts_with('_')),
        _ => None,
    }
}

/// `torch.Tensor`, `Tensor | None`, `Optional[torch.LongTensor]`: an annotation that says
/// the value is a tensor (not a tuple or list of them).
pub fn is_tensor_annotation(text: &str) -> bool {
    let text = text.trim();
    let text = text
        .strip_prefix("Optional[")
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(text);
    text.split('|').any(|part| {
        let part = part.trim().trim_matches('"').trim_matches('\'');
        !part.is_empty()
            && part
                .chars()
                .all(|c| c.is_alphanumeric() || c == '_' || c == '.')
            && part.ends_with("Tensor")
    })
}

/// `a, b = x, y` pairs up; anything else binds the whole value to a plain name target.
fn pair_targets<'a>(target: &'a Expr, value: &'a Expr, out: &mut Vec<(&'a Expr, &'a Expr)>) {
    match (target, value) {
        (Expr::Tuple(targets), Expr::Tuple(values)) if targets.elts.len() == values.elts.len() => {
            for (t, v) in targets.elts.iter().zip(&values.elts) {
                pair_targets(t, v, out);
            }
        }
        (Expr::Name(_), _) => out.push((target, value)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::ParsedSource;

    fn names(src: &str) -> (ParsedSource, Vec<String>) {
        let source = ParsedSource::parse(src).unwrap();
        let Stmt::FunctionDef(def) = &source.suite()[0] else {
            panic!()
        };
        let modules = HashSet::from(["np".to_string()]);
        let known = TensorNames::infer(&def.parameters, &def.body, &modules, |e| {
            source.slice(e).to_string()
        });
        let mut found: Vec<String> = known.names.into_iter().collect();
        found.sort();
        (source, found)
    }

    #[test]
    fn annotations_and_assignments() {
        let (_, found) = names(
            "def f(a: torch.Tensor, b: torch.LongTensor | None, c: int, d: tuple[torch.Tensor, torch.Tensor], e):\n    x = torch.arange(3) + e.min()\n    n = a.shape[0]\n    s = a.size(0)\n    m = (x == 0).any()\n    y, z = a * 2, c\n    k = e.sum()\n    l = np.sum(e)\n    c2 = a.get_seq_length()\n    for i in x:\n        pass\n    for j in range(3):\n        pass\n",
        );
        assert_eq!(found, ["a", "b", "i", "k", "m", "x", "y"]);
    }

    #[test]
    fn annotation_forms() {
        assert!(is_tensor_annotation("torch.Tensor"));
        assert!(is_tensor_annotation("Optional[torch.BoolTensor]"));
        assert!(is_tensor_annotation("torch.Tensor | BlockMask | None"));
        assert!(!is_tensor_annotation("tuple[torch.Tensor, torch.Tensor]"));
        assert!(!is_tensor_annotation("list[torch.Tensor] | None"));
        assert!(!is_tensor_annotation("int"));
    }
}
