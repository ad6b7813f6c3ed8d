//! The modules the pass reads: the class's own (always, when the caller gives it) and, when
//! the caller has them, the others (`passes::Modules`): a class name is resolved in a module
//! (defined there, or imported `from .x import Name` from a module the caller has), methods
//! are found through the resolvable bases, and an `AutoModel.from_config(config.<sub>)` is
//! resolved to the model class of the sub-configuration's default `model_type` (the
//! configuration module's `sub_configs_defaults` / `CONFIG_MAPPING["x"]`, then transformers'
//! `MODEL_MAPPING_NAMES`).

use ruff_python_ast::{Expr, ExprCall, Stmt, StmtClassDef, StmtFunctionDef};

use crate::index::absolute_module;
use crate::parse::ParsedSource;
use crate::passes::Modules;
use crate::syntax::{child_blocks, dotted_name, method, self_attribute, walk_statements};

use super::flow::Function;

/// A parsed module and its dotted name.
#[derive(Clone)]
pub(super) struct Module<'a> {
    pub name: String,
    pub source: &'a ParsedSource,
}

#[derive(Clone, Copy)]
pub(super) struct Program<'a> {
    local: Option<(&'a str, &'a ParsedSource)>,
    modules: Option<&'a dyn Modules>,
}

/// Where a class name leads.
pub(super) enum Found<'a> {
    Class(Class<'a>),
    /// Imported from a modeling module the caller did not give (`module.Class`).
    Unseen(String),
    /// Not a class of a modeling module (`nn.Linear`, a utility, an unknown name).
    Missing,
}

/// A class statement of a module.
#[derive(Clone)]
pub(super) struct Class<'a> {
    pub module: Module<'a>,
    pub def: &'a StmtClassDef,
}

impl<'a> Program<'a> {
    pub fn new(
        local: Option<(&'a str, &'a ParsedSource)>,
        modules: Option<&'a dyn Modules>,
    ) -> Self {
        Program { local, modules }
    }

    pub fn module(&self, name: &str) -> Option<Module<'a>> {
        if let Some((local, source)) = self.local
            && local == name
        {
            return Some(Module {
                name: name.to_string(),
                source,
            });
        }
        let source = self.modules?.module(name)?;
        Some(Module {
            name: name.to_string(),
            source,
        })
    }

    /// Resolve a class name (`Name`, or `module.Name` through an imported module is not
    /// followed) as seen from `module`.
    pub fn class(&self, module: &Module<'a>, name: &str) -> Found<'a> {
        self.class_at(module, name, 0)
    }

    fn class_at(&self, module: &Module<'a>, name: &str, depth: usize) -> Found<'a> {
        if depth > 6 || name.contains('.') {
            return Found::Missing;
        }
        if let Some(def) = class_def(module.source.suite(), name) {
            return Found::Class(Class {
                module: module.clone(),
                def,
            });
        }
        let Some((from, original)) = import_of(module, name) else {
            return Found::Missing;
        };
        match self.module(&from) {
            Some(other) => self.class_at(&other, &original, depth + 1),
            None if is_modeling_module(&from) => Found::Unseen(format!("{from}.{original}")),
            None => Found::Missing,
        }
    }

    /// The model class `AutoX.from_config(config.<sub>)` builds with the sub-configuration's
    /// default, as seen from the class whose `__init__` (`init`) holds the call: Ok((the
    /// class, the sub-configuration, its default model type)), or Err(why not).
    pub fn auto_default(
        &self,
        module: &Module<'a>,
        init: Option<&'a StmtFunctionDef>,
        auto: &str,
        call: &'a ExprCall,
    ) -> Result<(Class<'a>, String, String), String> {
        let mapping = match auto {
            "AutoModel" => "MODEL_MAPPING_NAMES",
            "AutoModelForCausalLM" => "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
            other => return Err(format!("{other} has no mapping the pass reads")),
        };
        let config_arg = call
            .arguments
            .args
            .first()
            .or_else(|| call.arguments.find_keyword("config").map(|k| &k.value))
            .ok_or("no configuration argument")?;
        let sub = match config_arg {
            Expr::Attribute(attr) => attr.attr.to_string(),
            Expr::Call(c)
                if crate::syntax::callee_last_name(&c.func) == Some("get_text_config") =>
            {
                "text_config".to_string()
            }
            other => {
                return Err(format!(
                    "configuration argument `{}`",
                    module.source.slice(other)
                ));
            }
        };
        if self.modules.is_none() {
            return Err("the caller gave no other modules".to_string());
        }
        let config_class = config_class_of(module, init).ok_or("no configuration class found")?;
        let (config_module, config_name) = match import_of(module, &config_class) {
            Some(found) => found,
            None => (module.name.clone(), config_class.clone()),
        };
        let config_module = self
            .module(&config_module)
            .ok_or_else(|| format!("module {config_module} not available"))?;
        let def = class_def(config_module.source.suite(), &config_name)
            .ok_or_else(|| format!("{config_name} not found in {}", config_module.name))?;
        let model_type = self
            .default_model_type(&config_module, def, &sub)
            .ok_or_else(|| format!("no default model type for {config_name}.{sub}"))?;
        let auto_module = auto_module_name(&module.name).ok_or("not a transformers module")?;
        let auto = self
            .module(&auto_module)
            .ok_or_else(|| format!("module {auto_module} not available"))?;
        let class_name = mapping_entry(auto.source.suite(), mapping, &model_type)
            .ok_or_else(|| format!("{model_type} is not in {mapping}"))?;
        let class_module = self
            .modules
            .and_then(|m| m.class_module(&class_name))
            .ok_or_else(|| format!("{class_name} is in no scanned module"))?
            .to_string();
        let target = self
            .module(&class_module)
            .ok_or_else(|| format!("module {class_module} not available"))?;
        match self.class(&target, &class_name) {
            Found::Class(class) => Ok((class, sub, model_type)),
            _ => Err(format!("{class_name} not found in {class_module}")),
        }
    }

    /// The default `model_type` of sub-configuration `sub` of a configuration class:
    /// `sub_configs_defaults = {"text_config": SubConfigSpec(model_type="x")}` or a config
    /// class there (its `model_type`), else `CONFIG_MAPPING["x"]` / `.get("model_type", "x")`
    /// in a statement of the class that mentions the sub-configuration.
    fn default_model_type(
        &self,
        module: &Module<'a>,
        def: &'a StmtClassDef,
        sub: &str,
    ) -> Option<String> {
        for stmt in &def.body {
            let (target, value) = match stmt {
                Stmt::Assign(a) if a.targets.len() == 1 => (&a.targets[0], a.value.as_ref()),
                Stmt::AnnAssign(a) => match &a.value {
                    Some(v) => (a.target.as_ref(), v.as_ref()),
                    None => continue,
                },
                _ => continue,
            };
            let Expr::Name(name) = target else { continue };
            if !matches!(name.id.as_str(), "sub_configs_defaults" | "sub_configs") {
                continue;
            }
            let Expr::Dict(dict) = value else { continue };
            for item in &dict.items {
                let Some(Expr::StringLiteral(key)) = &item.key else {
                    continue;
                };
                if key.value.to_str() != sub {
                    continue;
                }
                match &item.value {
                    Expr::Call(spec) => {
                        if let Some(Expr::StringLiteral(t)) =
                            spec.arguments.find_keyword("model_type").map(|k| &k.value)
                        {
                            return Some(t.value.to_str().to_string());
                        }
                        if let Some(class) = spec
                            .arguments
                            .find_keyword("config_class")
                            .and_then(|k| dotted_name(&k.value))
                            && let Some(t) = self.config_model_type(module, &class)
                        {
                            return Some(t);
                        }
                    }
                    Expr::Name(class) => {
                        if let Some(t) = self.config_model_type(module, class.id.as_str()) {
                            return Some(t);
                        }
                    }
                    _ => {}
                }
            }
        }
        // 4.x, in `__init__`: `text_config = CONFIG_MAPPING["llama"]()`,
        // `.get("model_type", "llama")`.
        let mut statements = Vec::new();
        walk_statements(&def.body, &mut statements);
        for stmt in &def.body {
            if let Stmt::FunctionDef(method) = stmt {
                walk_statements(&method.body, &mut statements);
            }
        }
        for stmt in statements {
            if matches!(stmt, Stmt::FunctionDef(_) | Stmt::ClassDef(_))
                || !child_blocks(stmt).is_empty()
                || !crate::syntax::stmt_mentions(stmt, sub)
                    && !crate::syntax::attributes_in_stmt(stmt)
                        .iter()
                        .any(|a| a.attr.as_str() == sub)
            {
                continue;
            }
            let mut found = None;
            crate::syntax::for_each_subscript(stmt, &mut |s| {
                if found.is_none()
                    && matches!(s.value.as_ref(), Expr::Name(n) if n.id.as_str() == "CONFIG_MAPPING")
                    && let Expr::StringLiteral(key) = s.slice.as_ref()
                {
                    found = Some(key.value.to_str().to_string());
                }
            });
            if found.is_some() {
                return found;
            }
            for call in crate::syntax::calls_in_stmt(stmt) {
                if crate::syntax::callee_last_name(&call.func) == Some("get")
                    && let [Expr::StringLiteral(key), Expr::StringLiteral(value)] =
                        &call.arguments.args[..]
                    && key.value.to_str() == "model_type"
                {
                    return Some(value.value.to_str().to_string());
                }
            }
        }
        None
    }

    /// `model_type = "x"` of a configuration class (in `module` or imported there).
    fn config_model_type(&self, module: &Module<'a>, class: &str) -> Option<String> {
        let (module, def) = match class_def(module.source.suite(), class) {
            Some(def) => (module.clone(), def),
            None => {
                let (from, name) = import_of(module, class)?;
                let other = self.module(&from)?;
                let def = class_def(other.source.suite(), &name)?;
                (other, def)
            }
        };
        let _ = module;
        def.body.iter().find_map(|stmt| match stmt {
            Stmt::Assign(a)
                if matches!(&a.targets[..], [Expr::Name(n)] if n.id.as_str() == "model_type") =>
            {
                match a.value.as_ref() {
                    Expr::StringLiteral(s) => Some(s.value.to_str().to_string()),
                    _ => None,
                }
            }
            _ => None,
        })
    }
}

impl<'a> Class<'a> {
    pub fn name(&self) -> &'a str {
        self.def.name.as_str()
    }

    /// The class, then its bases that resolve to classes of readable modules, depth first
    /// (the order a method is looked up in for single inheritance).
    pub fn mro(&self, program: &Program<'a>) -> Vec<Class<'a>> {
        let mut out: Vec<Class<'a>> = Vec::new();
        let mut stack = vec![self.clone()];
        while let Some(class) = stack.pop() {
            if out.len() > 12
                || out
                    .iter()
                    .any(|c| c.module.name == class.module.name && c.name() == class.name())
            {
                continue;
            }
            let bases: Vec<String> = class
                .def
                .arguments
                .as_ref()
                .map(|a| a.args.iter().filter_map(dotted_name).collect())
                .unwrap_or_default();
            out.push(class.clone());
            for base in bases.iter().rev() {
                if let Found::Class(base) = program.class(&class.module, base) {
                    stack.push(base);
                }
            }
        }
        out
    }

    /// The method `name` the class runs, with the class that defines it.
    pub fn method(&self, program: &Program<'a>, name: &str) -> Option<Function<'a>> {
        self.mro(program).into_iter().find_map(|class| {
            method(&class.def.body, name).map(|def| Function {
                def,
                source: class.module.source,
                owner: class.def.name.as_str(),
            })
        })
    }

    /// The `self.<attr> = value` assignments of the `__init__`s (the class first), with the
    /// class and `__init__` holding each.
    pub fn init_values(
        &self,
        program: &Program<'a>,
        attr: &str,
    ) -> Vec<(Class<'a>, &'a StmtFunctionDef, &'a Expr)> {
        let mut out = Vec::new();
        for class in self.mro(program) {
            if let Some(init) = method(&class.def.body, "__init__") {
                for value in init_values(&init.body, attr) {
                    out.push((class.clone(), init, value));
                }
            }
        }
        out
    }
}

/// The values assigned to `self.<attr>` in an `__init__` body.
pub(super) fn init_values<'a>(body: &'a [Stmt], attr: &str) -> Vec<&'a Expr> {
    let mut statements = Vec::new();
    walk_statements(body, &mut statements);
    let mut out = Vec::new();
    for stmt in statements {
        match stmt {
            Stmt::Assign(a) if a.targets.iter().any(|t| self_attribute(t) == Some(attr)) => {
                out.push(a.value.as_ref());
            }
            Stmt::AnnAssign(a) if self_attribute(&a.target) == Some(attr) => {
                if let Some(v) = &a.value {
                    out.push(v.as_ref());
                }
            }
            _ => {}
        }
    }
    out
}

/// A top-level class statement (also under a top-level `if` / `try`).
pub(super) fn class_def<'a>(suite: &'a [Stmt], name: &str) -> Option<&'a StmtClassDef> {
    top_level(suite).into_iter().find_map(|stmt| match stmt {
        Stmt::ClassDef(c) if c.name.as_str() == name => Some(c),
        _ => None,
    })
}

/// The module-level statements, looking into top-level `if` / `try` blocks.
pub(super) fn top_level(suite: &[Stmt]) -> Vec<&Stmt> {
    let mut out = Vec::new();
    for stmt in suite {
        match stmt {
            Stmt::If(_) | Stmt::Try(_) => {
                for block in child_blocks(stmt) {
                    out.extend(block.iter());
                }
            }
            other => out.push(other),
        }
    }
    out
}

/// `from X import Y as name` at module level: (absolute X, Y).
pub(super) fn import_of(module: &Module<'_>, name: &str) -> Option<(String, String)> {
    top_level(module.source.suite())
        .into_iter()
        .find_map(|stmt| match stmt {
            Stmt::ImportFrom(import) => import.names.iter().find_map(|alias| {
                let local = alias.asname.as_ref().unwrap_or(&alias.name);
                (local.as_str() == name).then(|| {
                    absolute_module(
                        &module.name,
                        import.module.as_ref().map(|m| m.as_str()),
                        import.level,
                    )
                    .map(|m| (m, alias.name.to_string()))
                })?
            }),
            _ => None,
        })
}

fn is_modeling_module(name: &str) -> bool {
    name.rsplit('.')
        .next()
        .is_some_and(|last| last.starts_with("modeling_"))
}

/// `transformers.models.auto.modeling_auto` for a module of the same package.
fn auto_module_name(module: &str) -> Option<String> {
    let (root, rest) = module.split_once('.')?;
    rest.starts_with("models.")
        .then(|| format!("{root}.models.auto.modeling_auto"))
}

/// The configuration class of a model class's `__init__`: the annotation of its `config`
/// parameter, else the first `...Config` imported from a `configuration_*` module.
fn config_class_of(module: &Module<'_>, init: Option<&StmtFunctionDef>) -> Option<String> {
    if let Some(init) = init {
        let p = &init.parameters;
        if let Some(annotation) = p
            .args
            .iter()
            .chain(&p.kwonlyargs)
            .find(|a| a.parameter.name.as_str() == "config")
            .and_then(|a| a.parameter.annotation.as_deref())
            .and_then(dotted_name)
        {
            return Some(annotation);
        }
    }
    top_level(module.source.suite())
        .into_iter()
        .find_map(|stmt| match stmt {
            Stmt::ImportFrom(import)
                if import
                    .module
                    .as_ref()
                    .is_some_and(|m| m.as_str().contains("configuration_")) =>
            {
                import.names.iter().find_map(|a| {
                    let local = a.asname.as_ref().unwrap_or(&a.name);
                    local
                        .as_str()
                        .ends_with("Config")
                        .then(|| local.to_string())
                })
            }
            _ => None,
        })
}

/// The class name of `model_type` in a mapping of `modeling_auto.py`
/// (`NAME = OrderedDict([("llama", "LlamaModel"), ...])`; a tuple of names gives the first).
fn mapping_entry(suite: &[Stmt], mapping: &str, model_type: &str) -> Option<String> {
    let value = top_level(suite).into_iter().find_map(|stmt| match stmt {
        Stmt::Assign(a)
            if matches!(&a.targets[..], [Expr::Name(n)] if n.id.as_str() == mapping) =>
        {
            Some(a.value.as_ref())
        }
        Stmt::AnnAssign(a)
            if matches!(a.target.as_ref(), Expr::Name(n) if n.id.as_str() == mapping) =>
        {
            a.value.as_deref()
        }
        _ => None,
    })?;
    let list = match value {
        Expr::Call(call) => call.arguments.args.first()?,
        other => other,
    };
    let elements: Vec<&Expr> = match list {
        Expr::List(l) => l.elts.iter().collect(),
        Expr::Tuple(t) => t.elts.iter().collect(),
        _ => return None,
    };
    elements.into_iter().find_map(|e| {
        let Expr::Tuple(pair) = e else { return None };
        let [Expr::StringLiteral(key), value] = &pair.elts[..] else {
            return None;
        };
        if key.value.to_str() != model_type {
            return None;
        }
        match value {
            Expr::StringLiteral(s) => Some(s.value.to_str().to_string()),
            Expr::Tuple(t) => match t.elts.first()? {
                Expr::StringLiteral(s) => Some(s.value.to_str().to_string()),
                _ => None,
            },
            _ => None,
        }
    })
}

/// A module-level `NAME = {"key": Class, ...}` (a table of layer classes): the values.
pub(super) fn class_table(module: &Module<'_>, name: &str) -> Option<Vec<String>> {
    top_level(module.source.suite())
        .into_iter()
        .find_map(|stmt| {
            let (target, value) = match stmt {
                Stmt::Assign(a) if a.targets.len() == 1 => (&a.targets[0], a.value.as_ref()),
                Stmt::AnnAssign(a) => (a.target.as_ref(), a.value.as_deref()?),
                _ => return None,
            };
            let Expr::Name(n) = target else { return None };
            if n.id.as_str() != name {
                return None;
            }
            let Expr::Dict(dict) = value else { return None };
            Some(
                dict.items
                    .iter()
                    .filter_map(|i| dotted_name(&i.value))
                    .collect(),
            )
        })
}
