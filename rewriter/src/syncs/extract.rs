//! What one module contributes to the call graph, read from its AST into owned facts (so
//! files are parsed in parallel and their trees dropped): functions and methods with their
//! call sites (callees still symbolic) and sync sites, classes with their bases, the
//! submodules their `__init__` builds and their `_global_mapping` dispatch tables, module
//! instances of those tables, and imports.
//!
//! Nested functions and lambdas are not followed (mask closures run inside vmap or the
//! kernel, not as Python calls of the forward).

use std::collections::{HashMap, HashSet};

use ruff_python_ast::visitor::{self, Visitor};
use ruff_python_ast::{Expr, ExprCall, Stmt, StmtClassDef, StmtFunctionDef, UnaryOp};
use ruff_text_size::{Ranged, TextRange};

use super::kinds::SyncKind;
use super::tensor::TensorNames;
use crate::index::absolute_module;
use crate::parse::ParsedSource;
use crate::syntax::{dotted_name, walk_statements};

#[derive(Debug, Clone, Default)]
pub struct ModuleFacts {
    pub module: String,
    /// As reported: relative to the package root (`models/llama/modeling_llama.py`).
    pub path: String,
    /// Local name → (absolute module, name there), from `from X import Y as Z`.
    pub imports: HashMap<String, (String, String)>,
    pub functions: Vec<FunctionFacts>,
    pub classes: Vec<ClassFacts>,
    /// Module-level `NAME = Class()` (dispatch tables: `ALL_ATTENTION_FUNCTIONS`).
    pub instances: HashMap<String, String>,
    /// Module-level `NAME = {"key": Class, ...}` (layer-type tables), the values' names.
    pub class_maps: HashMap<String, Vec<String>>,
    /// Module-level `NAME = f if c else g` / `NAME = f`: names for other globals
    /// (`sdpa_mask = sdpa_mask_recent_torch if ... else sdpa_mask_older_torch`).
    pub aliases: HashMap<String, Vec<String>>,
}

#[derive(Debug, Clone, Default)]
pub struct ClassFacts {
    pub name: String,
    /// Base class expressions, dotted (`LlamaPreTrainedModel`, `nn.Module`).
    pub bases: Vec<String>,
    /// Method name → index into the module's `functions`.
    pub methods: Vec<(String, usize)>,
    /// `self.<attr> = <Class>(...)` in `__init__` (every assignment: conditional ones too).
    pub submodules: Vec<(String, Submodule)>,
    /// `_global_mapping = {"sdpa": sdpa_attention_forward, ...}` in the class body.
    pub global_mapping: Vec<(String, String)>,
}

/// What `__init__` assigns to a `self.<attr>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submodule {
    /// The class called, dotted as written (`LlamaDecoderLayer`, `nn.Linear`).
    pub class: String,
    /// Built inside `nn.ModuleList(...)`: `self.<attr>` is a list of them.
    pub list: bool,
}

#[derive(Debug, Clone)]
pub struct FunctionFacts {
    /// `forward` or `LlamaModel.forward`.
    pub qualname: String,
    /// 1-based line of the `def`.
    pub line: u32,
    /// A `@property` (or `.setter`): read as an attribute, never called.
    pub is_property: bool,
    pub calls: Vec<CallFacts>,
    pub sites: Vec<SiteFacts>,
    /// Some `return` gives a tensor expression (for `if f(...):` in callers).
    pub returns_tensor: bool,
}

#[derive(Debug, Clone)]
pub struct CallFacts {
    pub callee: Callee,
    pub line: u32,
    /// The call's result is truth-tested (`if _is_packed_sequence(...):`): a `condition` sync
    /// when the callee returns a tensor.
    pub truth_site: Option<SiteFacts>,
}

/// A call target, still symbolic: resolved against the whole program in `graph.rs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Callee {
    /// `f(...)`: a module function, an imported one, or a class (its `__init__`).
    Name(String),
    /// `self.x(...)`: a method of the class chain, or a submodule's `forward`.
    SelfAttr(String),
    /// `self.x.m(...)`: method `m` of submodule `x`'s class.
    SelfAttrMethod(String, String),
    /// An element of the `nn.ModuleList` `self.<attr>` called: `layer(...)` inside
    /// `for layer in self.<attr>` (`layer_loop`), or `self.<attr>[i](...)`.
    Element { attr: String, layer_loop: bool },
    /// A function looked up in a dispatch table (`ALL_ATTENTION_FUNCTIONS[...]`,
    /// `.get_interface(name, default)`) and called.
    Dispatch {
        table: String,
        default: Option<String>,
        get_interface: bool,
    },
    /// `super().m(...)`.
    Super(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteFacts {
    pub kind: SyncKind,
    pub line: u32,
    /// The expression, on one line, shortened.
    pub text: String,
    /// The test of the innermost `if` around it (`else of ...` in an else branch).
    pub guard: Option<String>,
}

pub fn extract(source: &ParsedSource, module: &str, path: &str) -> ModuleFacts {
    let mut facts = ModuleFacts {
        module: module.to_string(),
        path: path.to_string(),
        ..ModuleFacts::default()
    };
    let modules = imported_modules(source.suite());
    visit_module_body(source, source.suite(), &mut facts, &modules, 0);
    facts
}

/// Names bound by `import x` / `import x.y` / `import x as y` at module level (or under a
/// top-level `if` / `try`): module objects, whose functions (`np.sum`) are not tensor methods.
fn imported_modules(body: &[Stmt]) -> HashSet<String> {
    let mut out = HashSet::new();
    for stmt in body {
        match stmt {
            Stmt::Import(import) => {
                for alias in &import.names {
                    out.insert(match &alias.asname {
                        Some(asname) => asname.to_string(),
                        None => alias.name.split('.').next().unwrap_or_default().to_string(),
                    });
                }
            }
            Stmt::If(_) | Stmt::Try(_) => {
                for block in crate::syntax::child_blocks(stmt) {
                    out.extend(imported_modules(block));
                }
            }
            _ => {}
        }
    }
    out
}

fn visit_module_body(
    source: &ParsedSource,
    body: &[Stmt],
    facts: &mut ModuleFacts,
    modules: &HashSet<String>,
    depth: usize,
) {
    for stmt in body {
        match stmt {
            Stmt::FunctionDef(def) => {
                let function = function_facts(source, def, def.name.to_string(), modules);
                facts.functions.push(function);
            }
            Stmt::ClassDef(class) => class_facts(source, class, facts, modules),
            Stmt::ImportFrom(import) => {
                let Some(base) = absolute_module(
                    &facts.module,
                    import.module.as_ref().map(|m| m.as_str()),
                    import.level,
                ) else {
                    continue;
                };
                for alias in &import.names {
                    let local = alias.asname.as_ref().unwrap_or(&alias.name).to_string();
                    facts
                        .imports
                        .insert(local, (base.clone(), alias.name.to_string()));
                }
            }
            Stmt::Assign(a) if a.targets.len() == 1 => {
                module_instance(&a.targets[0], &a.value, facts);
            }
            Stmt::AnnAssign(a) => {
                if let Some(value) = &a.value {
                    module_instance(&a.target, value, facts);
                }
            }
            // Definitions guarded by `if is_torch_available():` or `try:`.
            Stmt::If(_) | Stmt::Try(_) if depth == 0 => {
                for block in crate::syntax::child_blocks(stmt) {
                    visit_module_body(source, block, facts, modules, depth + 1);
                }
            }
            _ => {}
        }
    }
}

fn module_instance(target: &Expr, value: &Expr, facts: &mut ModuleFacts) {
    if let Expr::Name(name) = target {
        let names = class_names(value);
        if !names.is_empty() && !names.iter().any(|n| n.ends_with("[]")) {
            facts.aliases.insert(name.id.to_string(), names);
            return;
        }
    }
    if let (Expr::Name(name), Expr::Dict(dict)) = (target, value) {
        let values: Vec<String> = dict
            .items
            .iter()
            .filter_map(|i| match &i.value {
                Expr::Tuple(t) => t.elts.first().and_then(dotted_name),
                v => dotted_name(v),
            })
            .collect();
        if !values.is_empty() && values.len() == dict.items.len() {
            facts.class_maps.insert(name.id.to_string(), values);
        }
        return;
    }
    if let (Expr::Name(name), Expr::Call(call)) = (target, value)
        && call.arguments.is_empty()
        && let Expr::Name(class) = call.func.as_ref()
    {
        facts
            .instances
            .insert(name.id.to_string(), class.id.to_string());
    }
}

fn class_facts(
    source: &ParsedSource,
    class: &StmtClassDef,
    facts: &mut ModuleFacts,
    modules: &HashSet<String>,
) {
    let mut out = ClassFacts {
        name: class.name.to_string(),
        bases: class
            .arguments
            .as_ref()
            .map(|args| args.args.iter().filter_map(dotted_name).collect())
            .unwrap_or_default(),
        ..ClassFacts::default()
    };
    for stmt in &class.body {
        match stmt {
            Stmt::FunctionDef(def) => {
                let qualname = format!("{}.{}", class.name, def.name);
                let function = function_facts(source, def, qualname, modules);
                out.methods
                    .push((def.name.to_string(), facts.functions.len()));
                facts.functions.push(function);
                if def.name.as_str() == "__init__" {
                    out.submodules = submodules(&def.body);
                }
            }
            Stmt::Assign(a) => {
                let is_mapping = a
                    .targets
                    .iter()
                    .any(|t| matches!(t, Expr::Name(n) if n.id.as_str() == "_global_mapping"));
                if is_mapping && let Expr::Dict(dict) = a.value.as_ref() {
                    for item in &dict.items {
                        if let (Some(Expr::StringLiteral(key)), Expr::Name(value)) =
                            (&item.key, &item.value)
                        {
                            out.global_mapping
                                .push((key.value.to_str().to_string(), value.id.to_string()));
                        }
                    }
                }
            }
            _ => {}
        }
    }
    facts.classes.push(out);
}

/// The `self.<attr> = Class(...)` assignments of an `__init__` body, seeing through the
/// usual ways of building layer lists: `nn.ModuleList([C(...) for ...])`, a local list filled
/// with `.append(C(...))` then wrapped, `self.<attr>.append(C(...))`, a local class alias
/// (`cls = A if c else B`, `cls = LAYER_TYPES[kind]`) and `C._from_config(...)`.
pub(crate) fn submodules(body: &[Stmt]) -> Vec<(String, Submodule)> {
    let mut statements = Vec::new();
    walk_statements(body, &mut statements);
    // Local names bound to classes, and local lists of built modules.
    let mut aliases: HashMap<String, Vec<String>> = HashMap::new();
    let mut lists: HashMap<String, Vec<String>> = HashMap::new();
    for stmt in &statements {
        if let Stmt::Assign(a) = stmt
            && let [Expr::Name(target)] = &a.targets[..]
        {
            let classes = class_names(&a.value);
            if !classes.is_empty() {
                aliases
                    .entry(target.id.to_string())
                    .or_default()
                    .extend(classes);
            }
            let built = list_elements(&a.value, &aliases);
            if !built.is_empty() {
                lists
                    .entry(target.id.to_string())
                    .or_default()
                    .extend(built);
            }
        }
    }
    let mut out = Vec::new();
    for stmt in &statements {
        // `layers.append(C(...))` / `self.block.append(C(...))`.
        if let Stmt::Expr(e) = stmt
            && let Expr::Call(call) = e.value.as_ref()
            && let Expr::Attribute(attr) = call.func.as_ref()
            && attr.attr.as_str() == "append"
            && let Some(element) = call.arguments.args.first()
        {
            let classes = built_by(element, &aliases);
            if let Expr::Name(list) = attr.value.as_ref() {
                lists
                    .entry(list.id.to_string())
                    .or_default()
                    .extend(classes);
            } else if let Some(owner) = crate::syntax::self_attribute(&attr.value) {
                for class in classes {
                    out.push((owner.to_string(), Submodule { class, list: true }));
                }
            }
        }
    }
    for stmt in statements {
        let (targets, value): (Vec<&Expr>, &Expr) = match stmt {
            Stmt::Assign(a) => (a.targets.iter().collect(), &a.value),
            Stmt::AnnAssign(a) => match &a.value {
                Some(v) => (vec![a.target.as_ref()], v),
                None => continue,
            },
            _ => continue,
        };
        for target in targets {
            let Some(attr) = crate::syntax::self_attribute(target) else {
                continue;
            };
            for built in built_classes(value, &aliases, &lists) {
                out.push((attr.to_string(), built));
            }
        }
    }
    out
}

/// The classes a value names: `C`, `mod.C`, `A if c else B`, `TABLE[kind]` (as `TABLE[]`).
fn class_names(value: &Expr) -> Vec<String> {
    match value {
        Expr::Name(_) | Expr::Attribute(_) => dotted_name(value).into_iter().collect(),
        Expr::If(e) => {
            let mut out = class_names(&e.body);
            out.extend(class_names(&e.orelse));
            out
        }
        Expr::Subscript(sub) => match sub.value.as_ref() {
            Expr::Name(table) => vec![format!("{}[]", table.id)],
            _ => Vec::new(),
        },
        _ => Vec::new(),
    }
}

/// The classes a call builds: `C(...)`, `alias(...)`, `TABLE[kind](...)`, `C._from_config(...)`.
fn built_by(value: &Expr, aliases: &HashMap<String, Vec<String>>) -> Vec<String> {
    match value {
        Expr::If(e) => {
            let mut out = built_by(&e.body, aliases);
            out.extend(built_by(&e.orelse, aliases));
            out
        }
        Expr::Call(call) => {
            if let Expr::Name(name) = call.func.as_ref()
                && let Some(classes) = aliases.get(name.id.as_str())
            {
                return classes.clone();
            }
            let Some(class) = class_names(&call.func).into_iter().next() else {
                return Vec::new();
            };
            let class = ["._from_config", ".from_config", ".from_pretrained"]
                .iter()
                .find_map(|suffix| class.strip_suffix(suffix))
                .map_or(class.clone(), str::to_string);
            vec![class]
        }
        _ => Vec::new(),
    }
}

/// The classes built in a list expression: `[C(...) for ...]`, `[A(...), B(...)]`.
fn list_elements(value: &Expr, aliases: &HashMap<String, Vec<String>>) -> Vec<String> {
    let elements: Vec<&Expr> = match value {
        Expr::ListComp(c) => vec![&c.elt],
        Expr::Generator(g) => vec![&g.elt],
        Expr::List(l) => l.elts.iter().collect(),
        Expr::Tuple(t) => t.elts.iter().collect(),
        _ => return Vec::new(),
    };
    elements
        .into_iter()
        .flat_map(|e| built_by(e, aliases))
        .collect()
}

fn built_classes(
    value: &Expr,
    aliases: &HashMap<String, Vec<String>>,
    lists: &HashMap<String, Vec<String>>,
) -> Vec<Submodule> {
    if let Expr::If(e) = value {
        let mut out = built_classes(&e.body, aliases, lists);
        out.extend(built_classes(&e.orelse, aliases, lists));
        return out;
    }
    let Expr::Call(call) = value else {
        return Vec::new();
    };
    let container = dotted_name(&call.func)
        .map(|d| d.rsplit('.').next().unwrap_or_default().to_string())
        .filter(|last| last == "ModuleList" || last == "Sequential");
    let Some(container) = container else {
        return built_by(value, aliases)
            .into_iter()
            .map(|class| Submodule { class, list: false })
            .collect();
    };
    let list = container == "ModuleList";
    let mut out = Vec::new();
    for arg in &call.arguments.args {
        let classes = match arg {
            Expr::Name(name) => lists.get(name.id.as_str()).cloned().unwrap_or_default(),
            Expr::Call(_) => built_by(arg, aliases),
            other => list_elements(other, aliases),
        };
        out.extend(classes.into_iter().map(|class| Submodule { class, list }));
    }
    out
}

fn is_property(def: &StmtFunctionDef) -> bool {
    def.decorator_list.iter().any(|d| match &d.expression {
        Expr::Name(n) => n.id.as_str() == "property" || n.id.as_str() == "cached_property",
        Expr::Attribute(a) => matches!(a.attr.as_str(), "setter" | "getter" | "deleter"),
        _ => false,
    })
}

fn function_facts(
    source: &ParsedSource,
    def: &StmtFunctionDef,
    qualname: String,
    modules: &HashSet<String>,
) -> FunctionFacts {
    let tensors = TensorNames::infer(&def.parameters, &def.body, modules, |e| {
        source.slice(e).to_string()
    });
    let mut walker = BodyWalker {
        source,
        tensors,
        local_functions: local_functions(&def.body),
        loop_vars: HashMap::new(),
        dispatch: dispatch_bindings(&def.body),
        guards: Vec::new(),
        truth_checked: HashSet::new(),
        truth_calls: HashMap::new(),
        call_results: call_results(&def.body),
        name_truths: Vec::new(),
        calls: Vec::new(),
        call_ranges: Vec::new(),
        sites: Vec::new(),
        returns_tensor: false,
    };
    walker.visit_body(&def.body);
    for (range, site) in std::mem::take(&mut walker.name_truths) {
        if let Some(i) = walker.call_ranges.iter().position(|r| *r == range)
            && walker.calls[i].truth_site.is_none()
        {
            walker.calls[i].truth_site = Some(site);
        }
    }
    FunctionFacts {
        qualname,
        line: source.line_of(def.start().to_usize()),
        is_property: is_property(def),
        calls: walker.calls,
        sites: walker.sites,
        returns_tensor: walker.returns_tensor,
    }
}

/// `name = f(...)` assigned once: name → the call's range.
fn call_results(body: &[Stmt]) -> HashMap<String, TextRange> {
    let mut statements = Vec::new();
    walk_statements(body, &mut statements);
    let mut out: HashMap<String, TextRange> = HashMap::new();
    let mut twice: HashSet<String> = HashSet::new();
    for stmt in statements {
        let Stmt::Assign(a) = stmt else { continue };
        for target in &a.targets {
            let Expr::Name(name) = target else { continue };
            let id = name.id.to_string();
            if out.contains_key(&id) || twice.contains(&id) {
                out.remove(&id);
                twice.insert(id);
            } else if let Expr::Call(call) = a.value.as_ref() {
                out.insert(id, call.range());
            } else {
                twice.insert(id);
            }
        }
    }
    out
}

/// `f = a if c else b` / `f = a`: local names for module functions (plain names only; a
/// name also assigned anything else is dropped, it may not be a function).
fn local_functions(body: &[Stmt]) -> HashMap<String, Vec<String>> {
    fn names(value: &Expr) -> Option<Vec<String>> {
        match value {
            Expr::Name(n) => Some(vec![n.id.to_string()]),
            Expr::If(e) => {
                let mut out = names(&e.body)?;
                out.extend(names(&e.orelse)?);
                Some(out)
            }
            _ => None,
        }
    }
    let mut statements = Vec::new();
    walk_statements(body, &mut statements);
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    let mut other: HashSet<String> = HashSet::new();
    for stmt in statements {
        let Stmt::Assign(a) = stmt else { continue };
        let [Expr::Name(target)] = &a.targets[..] else {
            continue;
        };
        match names(&a.value) {
            Some(found) => out.entry(target.id.to_string()).or_default().extend(found),
            None => {
                other.insert(target.id.to_string());
            }
        }
    }
    out.retain(|name, _| !other.contains(name));
    out
}

/// A local variable bound to a dispatch-table lookup, with the function it falls back to.
#[derive(Debug, Clone)]
struct DispatchBinding {
    table: String,
    default: Option<String>,
    get_interface: bool,
}

/// `v = TABLE[...]`, `v = TABLE.get_interface(name, default)`, `v = TABLE.get(name, default)`,
/// together with plain `v = some_function` bindings (4.57's
/// `attention_interface = eager_attention_forward` before the lookup): the default.
fn dispatch_bindings(body: &[Stmt]) -> HashMap<String, DispatchBinding> {
    let mut statements = Vec::new();
    walk_statements(body, &mut statements);
    let mut lookups: HashMap<String, DispatchBinding> = HashMap::new();
    let mut plain: HashMap<String, String> = HashMap::new();
    for stmt in statements {
        let (target, value) = match stmt {
            Stmt::Assign(a) if a.targets.len() == 1 => (&a.targets[0], a.value.as_ref()),
            Stmt::AnnAssign(a) => match &a.value {
                Some(v) => (a.target.as_ref(), v.as_ref()),
                None => continue,
            },
            _ => continue,
        };
        let Expr::Name(target) = target else { continue };
        if let Some(binding) = lookup(value) {
            lookups.insert(target.id.to_string(), binding);
        } else if let Expr::Name(function) = value {
            plain.insert(target.id.to_string(), function.id.to_string());
        }
    }
    for (name, binding) in &mut lookups {
        if binding.default.is_none() {
            binding.default = plain.get(name).cloned();
        }
    }
    lookups
}

fn lookup(value: &Expr) -> Option<DispatchBinding> {
    match value {
        Expr::Subscript(sub) => match sub.value.as_ref() {
            Expr::Name(table) => Some(DispatchBinding {
                table: table.id.to_string(),
                default: None,
                get_interface: false,
            }),
            _ => None,
        },
        Expr::Call(call) => {
            let Expr::Attribute(attr) = call.func.as_ref() else {
                return None;
            };
            let Expr::Name(table) = attr.value.as_ref() else {
                return None;
            };
            let get_interface = attr.attr.as_str() == "get_interface";
            // `.get` on anything named like a constant: `kwargs.get(...)` is not a table.
            let constant = table.id.chars().all(|c| c.is_ascii_uppercase() || c == '_');
            let table_get = attr.attr.as_str() == "get" && constant;
            if !(get_interface || table_get) {
                return None;
            }
            let default = call
                .arguments
                .args
                .get(1)
                .or_else(|| call.arguments.find_keyword("default").map(|k| &k.value))
                .and_then(|d| match d {
                    Expr::Name(n) => Some(n.id.to_string()),
                    _ => None,
                });
            Some(DispatchBinding {
                table: table.id.to_string(),
                default,
                get_interface,
            })
        }
        _ => None,
    }
}

struct BodyWalker<'s> {
    source: &'s ParsedSource,
    tensors: TensorNames,
    /// Local names bound to functions: `mask_function = create_causal_mask if c else
    /// create_sliding_window_causal_mask`.
    local_functions: HashMap<String, Vec<String>>,
    /// `for layer in self.layers` → layer → layers.
    loop_vars: HashMap<String, String>,
    dispatch: HashMap<String, DispatchBinding>,
    guards: Vec<String>,
    /// Expressions already truth-tested (an `if` test's `and` is not tested twice).
    truth_checked: HashSet<TextRange>,
    /// Calls whose result is truth-tested, with the site they would make.
    truth_calls: HashMap<TextRange, SiteFacts>,
    /// `flag = f(...)`: the call a local name holds the result of (single assignments only),
    /// so `if flag:` truth-tests what `f` returns.
    call_results: HashMap<String, TextRange>,
    /// Truth tests of such names, matched to their calls once the body is walked.
    name_truths: Vec<(TextRange, SiteFacts)>,
    calls: Vec<CallFacts>,
    /// The range of each entry of `calls`.
    call_ranges: Vec<TextRange>,
    sites: Vec<SiteFacts>,
    returns_tensor: bool,
}

impl BodyWalker<'_> {
    fn site(&self, kind: SyncKind, node: &impl Ranged) -> SiteFacts {
        SiteFacts {
            kind,
            line: self.source.line_of(node.start().to_usize()),
            text: short_text(self.source.slice(node.range())),
            guard: self.guards.last().cloned(),
        }
    }

    fn add_site(&mut self, kind: SyncKind, node: &impl Ranged) {
        let site = self.site(kind, node);
        self.sites.push(site);
    }

    /// `expr`'s truth value is taken.
    fn truth(&mut self, expr: &Expr) {
        if !self.truth_checked.insert(expr.range()) {
            return;
        }
        match expr {
            Expr::BoolOp(op) => {
                for value in &op.values {
                    self.truth(value);
                }
            }
            Expr::UnaryOp(op) if op.op == UnaryOp::Not => self.truth(&op.operand),
            Expr::Named(named) => self.truth(&named.value),
            Expr::Call(call) if !self.tensors.is_tensor(expr) => {
                let site = self.site(SyncKind::Condition, call);
                self.truth_calls.insert(call.range(), site);
            }
            Expr::Name(name) if !self.tensors.is_tensor(expr) => {
                if let Some(range) = self.call_results.get(name.id.as_str()).copied() {
                    let site = self.site(SyncKind::Condition, name);
                    self.name_truths.push((range, site));
                }
            }
            _ if self.tensors.is_tensor(expr) => self.add_site(SyncKind::Condition, expr),
            _ => {}
        }
    }

    fn with_guard(&mut self, guard: String, body: &[Stmt]) {
        self.guards.push(guard);
        self.visit_body(body);
        self.guards.pop();
    }

    fn call(&mut self, call: &ExprCall) {
        self.call_sites(call);
        let callee = match call.func.as_ref() {
            Expr::Name(name) => {
                let id = name.id.as_str();
                if let Some(attr) = self.loop_vars.get(id) {
                    Some(Callee::Element {
                        attr: attr.clone(),
                        layer_loop: true,
                    })
                } else if let Some(binding) = self.dispatch.get(id) {
                    Some(Callee::Dispatch {
                        table: binding.table.clone(),
                        default: binding.default.clone(),
                        get_interface: binding.get_interface,
                    })
                } else if let Some(targets) = self.local_functions.get(id) {
                    let line = self.source.line_of(call.start().to_usize());
                    let truth_site = self.truth_calls.remove(&call.range());
                    for target in targets.clone() {
                        self.calls.push(CallFacts {
                            callee: Callee::Name(target),
                            line,
                            truth_site: truth_site.clone(),
                        });
                        self.call_ranges.push(call.range());
                    }
                    None
                } else {
                    Some(Callee::Name(id.to_string()))
                }
            }
            Expr::Attribute(attr) => match attr.value.as_ref() {
                Expr::Name(n) if n.id.as_str() == "self" => {
                    Some(Callee::SelfAttr(attr.attr.to_string()))
                }
                value => {
                    if let Some(owner) = crate::syntax::self_attribute(value) {
                        Some(Callee::SelfAttrMethod(
                            owner.to_string(),
                            attr.attr.to_string(),
                        ))
                    } else if let Expr::Call(inner) = value
                        && matches!(inner.func.as_ref(), Expr::Name(n) if n.id.as_str() == "super")
                    {
                        Some(Callee::Super(attr.attr.to_string()))
                    } else {
                        None
                    }
                }
            },
            Expr::Subscript(sub) => {
                if let Some(attr) = crate::syntax::self_attribute(&sub.value) {
                    Some(Callee::Element {
                        attr: attr.to_string(),
                        layer_loop: false,
                    })
                } else {
                    lookup(call.func.as_ref()).map(|b| Callee::Dispatch {
                        table: b.table,
                        default: b.default,
                        get_interface: b.get_interface,
                    })
                }
            }
            _ => None,
        };
        if let Some(callee) = callee {
            self.calls.push(CallFacts {
                callee,
                line: self.source.line_of(call.start().to_usize()),
                truth_site: self.truth_calls.remove(&call.range()),
            });
            self.call_ranges.push(call.range());
        }
    }

    /// The sync sites a call is by itself.
    fn call_sites(&mut self, call: &ExprCall) {
        let args = &call.arguments;
        let kind = match call.func.as_ref() {
            Expr::Attribute(attr) => {
                let torch = dotted_name(&call.func);
                match attr.attr.as_str() {
                    "item" if args.is_empty() => Some(SyncKind::Item),
                    "tolist" if args.is_empty() => Some(SyncKind::Tolist),
                    "cpu" => Some(SyncKind::Cpu),
                    "numpy" => Some(SyncKind::Numpy),
                    "to" if to_cpu(call) => Some(SyncKind::Cpu),
                    "nonzero" | "argwhere" | "masked_select" => Some(SyncKind::Nonzero),
                    "where" if torch.as_deref() == Some("torch.where") => (args.args.len() == 1
                        && args.keywords.is_empty())
                    .then_some(SyncKind::Nonzero),
                    "unique" | "unique_consecutive" => Some(SyncKind::Unique),
                    "equal" | "allclose" => Some(SyncKind::Equal),
                    "is_nonzero" if torch.as_deref() == Some("torch.is_nonzero") => {
                        Some(SyncKind::Scalar)
                    }
                    "synchronize" => Some(SyncKind::Synchronize),
                    _ => None,
                }
            }
            Expr::Name(name) => match name.id.as_str() {
                "bool" | "int" | "float" | "complex"
                    if args.args.len() == 1 && self.tensors.is_tensor(&args.args[0]) =>
                {
                    Some(SyncKind::Scalar)
                }
                "print" if args.args.iter().any(|a| self.tensors.is_tensor(a)) => {
                    Some(SyncKind::Print)
                }
                _ => None,
            },
            _ => None,
        };
        if let Some(kind) = kind {
            self.add_site(kind, call);
        }
    }
}

/// `.to("cpu")`, `.to(device="cpu")`, `.to(torch.device("cpu"))`.
fn to_cpu(call: &ExprCall) -> bool {
    let is_cpu = |e: &Expr| match e {
        Expr::StringLiteral(s) => s.value.to_str() == "cpu",
        Expr::Call(c) => {
            dotted_name(&c.func).as_deref() == Some("torch.device")
                && c.arguments.args.first().is_some_and(
                    |a| matches!(a, Expr::StringLiteral(s) if s.value.to_str() == "cpu"),
                )
        }
        _ => false,
    };
    call.arguments.args.first().is_some_and(is_cpu)
        || call
            .arguments
            .find_keyword("device")
            .is_some_and(|k| is_cpu(&k.value))
}

fn short_text(text: &str) -> String {
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() > 80 {
        let cut: String = one_line.chars().take(77).collect();
        format!("{cut}...")
    } else {
        one_line
    }
}

impl<'a> Visitor<'a> for BodyWalker<'_> {
    fn visit_stmt(&mut self, stmt: &'a Stmt) {
        match stmt {
            // Nested scopes are not followed.
            Stmt::FunctionDef(_) | Stmt::ClassDef(_) => {}
            Stmt::If(s) => {
                self.truth(&s.test);
                self.visit_expr(&s.test);
                let test = short_text(self.source.slice(s.test.range()));
                self.with_guard(test.clone(), &s.body);
                let mut previous = test;
                for clause in &s.elif_else_clauses {
                    match &clause.test {
                        Some(t) => {
                            self.truth(t);
                            self.visit_expr(t);
                            previous = short_text(self.source.slice(t.range()));
                            self.with_guard(previous.clone(), &clause.body);
                        }
                        None => self.with_guard(format!("else of {previous}"), &clause.body),
                    }
                }
            }
            Stmt::While(s) => {
                self.truth(&s.test);
                visitor::walk_stmt(self, stmt);
            }
            Stmt::Assert(s) => {
                self.truth(&s.test);
                visitor::walk_stmt(self, stmt);
            }
            Stmt::For(s) => {
                if let Some((var, attr)) = loop_over_submodules(&s.target, &s.iter) {
                    self.loop_vars.insert(var, attr);
                }
                visitor::walk_stmt(self, stmt);
            }
            Stmt::Return(r) => {
                if let Some(value) = &r.value
                    && self.tensors.is_tensor(value)
                {
                    self.returns_tensor = true;
                }
                visitor::walk_stmt(self, stmt);
            }
            _ => visitor::walk_stmt(self, stmt),
        }
    }

    fn visit_expr(&mut self, expr: &'a Expr) {
        match expr {
            Expr::Lambda(_) => return,
            Expr::If(e) => self.truth(&e.test),
            Expr::BoolOp(op) => {
                for value in &op.values[..op.values.len().saturating_sub(1)] {
                    self.truth(value);
                }
            }
            Expr::UnaryOp(op) if op.op == UnaryOp::Not => self.truth(&op.operand),
            Expr::Call(call) => self.call(call),
            _ => {}
        }
        visitor::walk_expr(self, expr);
    }

    fn visit_comprehension(&mut self, comprehension: &'a ruff_python_ast::Comprehension) {
        for condition in &comprehension.ifs {
            self.truth(condition);
        }
        visitor::walk_comprehension(self, comprehension);
    }
}

/// `for layer in self.layers`, `... in self.layers[:n]`, `for i, layer in enumerate(...)`,
/// `for h, layer in zip(xs, self.layers)`: the loop variable bound to an element of
/// `self.<attr>`.
pub(crate) fn loop_over_submodules(target: &Expr, iter: &Expr) -> Option<(String, String)> {
    let strip_slice = |e: &Expr| -> Option<String> {
        let e = match e {
            Expr::Subscript(sub) => sub.value.as_ref(),
            other => other,
        };
        crate::syntax::self_attribute(e).map(str::to_string)
    };
    if let Some(attr) = strip_slice(iter) {
        if let Expr::Name(var) = target {
            return Some((var.id.to_string(), attr));
        }
        return None;
    }
    let Expr::Call(call) = iter else { return None };
    let Expr::Name(function) = call.func.as_ref() else {
        return None;
    };
    let Expr::Tuple(targets) = target else {
        return None;
    };
    let position = match function.id.as_str() {
        "enumerate" => {
            strip_slice(call.arguments.args.first()?)?;
            1
        }
        "zip" => call
            .arguments
            .args
            .iter()
            .position(|a| strip_slice(a).is_some())?,
        _ => return None,
    };
    let attr = match function.id.as_str() {
        "enumerate" => strip_slice(&call.arguments.args[0])?,
        _ => strip_slice(&call.arguments.args[position])?,
    };
    match targets.elts.get(position)? {
        Expr::Name(var) => Some((var.id.to_string(), attr)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(src: &str) -> ModuleFacts {
        extract(&ParsedSource::parse(src).unwrap(), "pkg.mod", "mod.py")
    }

    fn function<'f>(facts: &'f ModuleFacts, name: &str) -> &'f FunctionFacts {
        facts.functions.iter().find(|f| f.qualname == name).unwrap()
    }

    fn kinds(f: &FunctionFacts) -> Vec<(&'static str, u32)> {
        f.sites.iter().map(|s| (s.kind.name(), s.line)).collect()
    }

    #[test]
    fn finds_each_sync_kind() {
        let f = facts(
            "def f(x: torch.Tensor, n: int, m):
    a = x.max().item()
    b = x.tolist()
    c = x.cpu().numpy()
    d = torch.nonzero(x)
    e = m.nonzero(as_tuple=True)
    g = torch.unique(x)
    if x.any():
        pass
    h = bool(x)
    k = int(n)
    if torch.equal(x, x):
        pass
    print(x)
    torch.cuda.synchronize()
    i = torch.where(x > 0)
    j = torch.where(x > 0, x, 0)
    y = x.to(\"cpu\")
    if n > 1 and not (x == 0).all():
        pass
    assert x.shape[0] == n
",
        );
        let f = function(&f, "f");
        assert_eq!(
            kinds(f),
            [
                ("item", 2),
                ("tolist", 3),
                ("numpy", 4),
                ("cpu", 4),
                ("nonzero", 5),
                ("nonzero", 6),
                ("unique", 7),
                ("condition", 8),
                ("scalar", 10),
                ("equal", 12),
                ("print", 14),
                ("synchronize", 15),
                ("nonzero", 16),
                ("cpu", 18),
                ("condition", 19),
            ]
        );
        assert_eq!(f.sites[14].text, "(x == 0).all()");
        assert_eq!(f.sites[14].guard, None);
    }

    #[test]
    fn shapes_and_none_checks_are_not_syncs() {
        let f = facts(
            "def f(x: torch.Tensor, mask: torch.Tensor | None):
    if mask is not None and mask.dtype != torch.bool:
        pass
    if x.shape[-1] == 1 or len(x) > 2 or x.size(0) > 1:
        pass
    n = int(x.shape[0])
",
        );
        assert!(function(&f, "f").sites.is_empty());
    }

    #[test]
    fn guards_and_returned_tensors() {
        let f = facts(
            "def packed(position_ids, batch_size):
    if position_ids is None:
        return False
    seqs = torch.arange(3) + position_ids.min()
    return (seqs - position_ids).abs().sum().bool()

def caller(q, position_ids):
    if torch.jit.is_tracing():
        n = q.item()
    else:
        n = 0
    if packed(position_ids, 1):
        pass
    flag = packed(position_ids, 2)
    if q is None:
        pass
    elif flag:
        pass
",
        );
        assert!(function(&f, "packed").returns_tensor);
        let caller = function(&f, "caller");
        assert_eq!(
            caller.sites[0].guard.as_deref(),
            Some("torch.jit.is_tracing()")
        );
        let call = caller
            .calls
            .iter()
            .find(|c| c.callee == Callee::Name("packed".into()))
            .unwrap();
        assert_eq!(
            call.truth_site.as_ref().unwrap().text,
            "packed(position_ids, 1)"
        );
    }

    #[test]
    fn classes_submodules_layer_loops_and_dispatch() {
        let f = facts(
            "class M(Base):
    def __init__(self, config):
        self.layers = nn.ModuleList([Layer(config, i) for i in range(3)])
        self.norm = Norm(config) if config.x else OtherNorm(config)
        self.head = nn.Linear(2, 3)

    def forward(self, x):
        for i, layer in enumerate(self.layers[:2]):
            x = layer(x)
        x = self.norm(x)
        x = self.head.forward(x)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out = attention_interface(self, x)
        mask = ALL_MASK_ATTENTION_FUNCTIONS[impl](x)
        return super().forward(x)

class Interface(GeneralInterface):
    _global_mapping = {\"sdpa\": sdpa_attention_forward}

TABLE: Interface = Interface()
",
        );
        let class = &f.classes[0];
        assert_eq!(class.bases, ["Base"]);
        let built: Vec<(&str, &str, bool)> = class
            .submodules
            .iter()
            .map(|(a, s)| (a.as_str(), s.class.as_str(), s.list))
            .collect();
        assert_eq!(
            built,
            [
                ("layers", "Layer", true),
                ("norm", "Norm", false),
                ("norm", "OtherNorm", false),
                ("head", "nn.Linear", false)
            ]
        );
        let callees: Vec<&Callee> = function(&f, "M.forward")
            .calls
            .iter()
            .map(|c| &c.callee)
            .collect();
        assert!(callees.contains(&&Callee::Element {
            attr: "layers".into(),
            layer_loop: true
        }));
        assert!(callees.contains(&&Callee::SelfAttr("norm".into())));
        assert!(callees.contains(&&Callee::SelfAttrMethod("head".into(), "forward".into())));
        assert!(callees.contains(&&Callee::Dispatch {
            table: "ALL_ATTENTION_FUNCTIONS".into(),
            default: Some("eager_attention_forward".into()),
            get_interface: true
        }));
        assert!(callees.contains(&&Callee::Dispatch {
            table: "ALL_MASK_ATTENTION_FUNCTIONS".into(),
            default: None,
            get_interface: false
        }));
        assert!(callees.contains(&&Callee::Super("forward".into())));
        assert_eq!(
            f.classes[1].global_mapping,
            [("sdpa".to_string(), "sdpa_attention_forward".to_string())]
        );
        assert_eq!(
            f.instances.get("TABLE").map(String::as_str),
            Some("Interface")
        );
    }
}
