//! The call graph (petgraph) over every loaded module: one node per function or method, one
//! edge per statically resolved call. Resolution:
//!
//! * `f(...)`: a function of the module, or one imported from a loaded module (through
//!   re-exports). Class constructions are not followed (in a forward they build outputs and
//!   caches, whose code is not loaded).
//! * `self.m(...)`: a method of the class chain (bases resolved like names, left-first), else
//!   the `forward` of what `__init__` assigned to `self.m` (every assignment: conditional
//!   branches give several edges); `self.x.m(...)`: method `m` of that class; `super().m(...)`.
//! * `layer(...)` in `for layer in self.layers` / `self.layers[i](...)`: the `forward` of the
//!   class built in `nn.ModuleList(...)`; the loop call is a *layer edge* (it runs once per
//!   element).
//! * A dispatch-table call (`ALL_ATTENTION_FUNCTIONS.get_interface(name, default)(...)`,
//!   `ALL_MASK_ATTENTION_FUNCTIONS[name](...)`): one edge per backend of the shared table
//!   (`attention_backends.json`), to the function the table's `_global_mapping` gives for that
//!   name; `get_interface` also maps `paged|X` (not `paged|eager`) to `X`, and `eager` to the
//!   default, as transformers 5.x does. A backend the table has no entry for gets no edge.
//!
//! `@property` methods are never call targets. Calls that resolve to nothing loaded (torch,
//! Python builtins, unloaded modules) are leaves; a submodule built from a class that is not
//! loaded and is not a torch module (`AutoModel.from_config(...)`) is recorded as unresolved,
//! so the report can say what it could not see.

use std::collections::HashMap;

use petgraph::graph::{DiGraph, NodeIndex};

use super::extract::{Callee, ClassFacts, FunctionFacts, ModuleFacts, SiteFacts, Submodule};
use crate::backends::Backends;

/// A function: (module index, function index in that module).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FnRef {
    pub module: usize,
    pub function: usize,
}

/// A class: (module index, class index).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClassRef {
    pub module: usize,
    pub class: usize,
}

#[derive(Clone, Debug)]
pub struct Edge {
    pub line: u32,
    /// A call of a `nn.ModuleList` element inside a loop over it.
    pub layer: bool,
    /// The backend (index into the table's backends) under which a dispatch call takes this
    /// edge; None for ordinary calls.
    pub backend: Option<usize>,
    /// The caller truth-tests the returned tensor (`if _is_packed_sequence(...)`): a
    /// `condition` site in the caller that exists only when this edge is taken.
    pub truth_site: Option<SiteFacts>,
}

enum Global {
    Function(FnRef),
    Class(ClassRef),
    Instance {
        module: usize,
        class: String,
    },
    /// A module-level alias of other globals (`NAME = f if c else g`), in its module.
    Alias {
        module: usize,
        names: Vec<String>,
    },
}

pub struct Program {
    pub modules: Vec<ModuleFacts>,
    pub graph: DiGraph<FnRef, Edge>,
    nodes: HashMap<FnRef, NodeIndex>,
    by_module: HashMap<String, usize>,
    /// Per module: module-level function and class names → index (the last definition).
    functions_by_name: Vec<HashMap<String, usize>>,
    classes_by_name: Vec<HashMap<String, usize>>,
    /// Every class's chain (itself, then its bases), computed once.
    chains: HashMap<ClassRef, Vec<ClassRef>>,
    /// Per function: the submodule calls that could not be resolved (`self.language_model`
    /// built by `AutoModel.from_config`).
    pub unresolved: HashMap<FnRef, Vec<String>>,
}

impl Program {
    pub fn build(modules: Vec<ModuleFacts>, backends: &Backends) -> Program {
        let by_module = modules
            .iter()
            .enumerate()
            .map(|(i, m)| (m.module.clone(), i))
            .collect();
        let functions_by_name = modules
            .iter()
            .map(|m| {
                m.functions
                    .iter()
                    .enumerate()
                    .filter(|(_, f)| !f.qualname.contains('.'))
                    .map(|(i, f)| (f.qualname.clone(), i))
                    .collect()
            })
            .collect();
        let classes_by_name = modules
            .iter()
            .map(|m| {
                m.classes
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.name.clone(), i))
                    .collect()
            })
            .collect();
        let mut program = Program {
            modules,
            graph: DiGraph::new(),
            nodes: HashMap::new(),
            by_module,
            functions_by_name,
            classes_by_name,
            chains: HashMap::new(),
            unresolved: HashMap::new(),
        };
        let mut chains = HashMap::new();
        for (m, module) in program.modules.iter().enumerate() {
            for c in 0..module.classes.len() {
                let class = ClassRef {
                    module: m,
                    class: c,
                };
                chains.insert(class, program.compute_chain(class));
            }
        }
        program.chains = chains;
        for (m, module) in program.modules.iter().enumerate() {
            for f in 0..module.functions.len() {
                let r = FnRef {
                    module: m,
                    function: f,
                };
                let node = program.graph.add_node(r);
                program.nodes.insert(r, node);
            }
        }
        let mut edges = Vec::new();
        for (m, module) in program.modules.iter().enumerate() {
            for (f, function) in module.functions.iter().enumerate() {
                let caller = FnRef {
                    module: m,
                    function: f,
                };
                for call in &function.calls {
                    program.resolve_call(caller, call, backends, &mut edges);
                }
            }
        }
        for (caller, callee, edge) in edges {
            match callee {
                Ok(callee) => {
                    let (a, b) = (program.nodes[&caller], program.nodes[&callee]);
                    program.graph.add_edge(a, b, edge);
                }
                Err(what) => program.unresolved.entry(caller).or_default().push(what),
            }
        }
        for list in program.unresolved.values_mut() {
            list.sort();
            list.dedup();
        }
        program
    }

    pub fn node(&self, function: FnRef) -> NodeIndex {
        self.nodes[&function]
    }

    pub fn function(&self, function: FnRef) -> &FunctionFacts {
        &self.modules[function.module].functions[function.function]
    }

    pub fn class(&self, class: ClassRef) -> &ClassFacts {
        &self.modules[class.module].classes[class.class]
    }

    pub fn module_index(&self, module: &str) -> Option<usize> {
        self.by_module.get(module).copied()
    }

    /// A class by module and name (the last definition wins, as at import).
    pub fn find_class(&self, module: &str, name: &str) -> Option<ClassRef> {
        let m = self.module_index(module)?;
        let class = *self.classes_by_name[m].get(name)?;
        Some(ClassRef { module: m, class })
    }

    /// A module-level function by module and name.
    pub fn find_function(&self, module: &str, name: &str) -> Option<FnRef> {
        let m = self.module_index(module)?;
        let function = *self.functions_by_name[m].get(name)?;
        Some(FnRef {
            module: m,
            function,
        })
    }

    fn resolve_global(&self, module: usize, name: &str, depth: usize) -> Option<Global> {
        let facts = &self.modules[module];
        if let Some(&function) = self.functions_by_name[module].get(name) {
            return Some(Global::Function(FnRef { module, function }));
        }
        if let Some(&class) = self.classes_by_name[module].get(name) {
            return Some(Global::Class(ClassRef { module, class }));
        }
        if let Some(class) = facts.instances.get(name) {
            return Some(Global::Instance {
                module,
                class: class.clone(),
            });
        }
        if let Some(names) = facts.aliases.get(name) {
            return Some(Global::Alias {
                module,
                names: names.clone(),
            });
        }
        let (source, original) = facts.imports.get(name)?;
        if depth > 6 {
            return None;
        }
        let target = self.module_index(source)?;
        self.resolve_global(target, original, depth + 1)
    }

    fn resolve_class(&self, module: usize, dotted: &str) -> Option<ClassRef> {
        match self.resolve_global(module, dotted, 0)? {
            Global::Class(c) => Some(c),
            _ => None,
        }
    }

    /// The classes a submodule build names: one class, or every value of a module-level
    /// table for `TABLE[]`. Err with the name when nothing loaded matches; Ok(empty) for a
    /// torch module or a factory function (leaves).
    fn built_classes(&self, module: usize, class: &str) -> Result<Vec<ClassRef>, String> {
        if let Some(table) = class.strip_suffix("[]") {
            let (m, name) = self
                .resolve_map(module, table, 0)
                .ok_or_else(|| class.to_string())?;
            return Ok(self.modules[m].class_maps[&name]
                .iter()
                .filter_map(|c| self.resolve_class(m, c))
                .collect());
        }
        match self.resolve_global(module, class, 0) {
            Some(Global::Class(c)) => Ok(vec![c]),
            Some(_) => Ok(Vec::new()),
            None if self.is_leaf_name(module, class) => Ok(Vec::new()),
            None => Err(class.to_string()),
        }
    }

    fn resolve_map(&self, module: usize, name: &str, depth: usize) -> Option<(usize, String)> {
        let facts = &self.modules[module];
        if facts.class_maps.contains_key(name) {
            return Some((module, name.to_string()));
        }
        let (source, original) = facts.imports.get(name)?;
        if depth > 6 {
            return None;
        }
        self.resolve_map(self.module_index(source)?, original, depth + 1)
    }

    /// Names whose modules are not part of what the report follows, by design: torch's own
    /// modules (`nn.Linear`, `torch.nn.Embedding`, names imported from torch), other
    /// libraries (`functools.partial`), and `self.<method>(...)` results. A name imported from
    /// the package itself (`AutoModel`) or unknown is not a leaf: it is reported unresolved.
    fn is_leaf_name(&self, module: usize, dotted: &str) -> bool {
        let first = dotted.split('.').next().unwrap_or_default();
        let package = self.modules[module]
            .module
            .split('.')
            .next()
            .unwrap_or_default();
        matches!(first, "nn" | "torch" | "self")
            || self.modules[module]
                .imports
                .get(first)
                .is_some_and(|(source, _)| source.split('.').next() != Some(package))
    }

    /// The class and its bases, left-first, each once.
    pub fn chain(&self, class: ClassRef) -> &[ClassRef] {
        self.chains.get(&class).map_or(&[], Vec::as_slice)
    }

    fn compute_chain(&self, class: ClassRef) -> Vec<ClassRef> {
        let mut out = Vec::new();
        let mut stack = vec![class];
        while let Some(c) = stack.pop() {
            if out.contains(&c) || out.len() > 32 {
                continue;
            }
            out.push(c);
            for base in self.class(c).bases.iter().rev() {
                if let Some(b) = self.resolve_class(c.module, base) {
                    stack.push(b);
                }
            }
        }
        out
    }

    /// A method through the chain (properties excluded).
    pub fn method(&self, class: ClassRef, name: &str) -> Option<FnRef> {
        self.method_in(self.chain(class), name)
    }

    fn method_in(&self, chain: &[ClassRef], name: &str) -> Option<FnRef> {
        for c in chain {
            if let Some((_, f)) = self.class(*c).methods.iter().rev().find(|(n, _)| n == name) {
                let r = FnRef {
                    module: c.module,
                    function: *f,
                };
                return (!self.function(r).is_property).then_some(r);
            }
        }
        None
    }

    /// What `__init__` assigns to `self.<attr>`, from the first class of the chain that
    /// assigns it: resolved classes, and the names of the ones not loaded.
    pub fn submodule(
        &self,
        class: ClassRef,
        attr: &str,
    ) -> Option<Vec<(Result<ClassRef, String>, bool)>> {
        let mut out = Vec::new();
        for &c in self.chain(class) {
            let builds: Vec<&Submodule> = self
                .class(c)
                .submodules
                .iter()
                .filter(|(a, _)| a == attr)
                .map(|(_, s)| s)
                .collect();
            if builds.is_empty() {
                continue;
            }
            for s in builds {
                match self.built_classes(c.module, &s.class) {
                    Ok(classes) => out.extend(classes.into_iter().map(|k| (Ok(k), s.list))),
                    Err(name) => out.push((Err(name), s.list)),
                }
            }
            return Some(out);
        }
        None
    }

    /// The class that owns a method (`LlamaModel.forward` → `LlamaModel` in its module).
    fn owner(&self, function: FnRef) -> Option<ClassRef> {
        let (class, _) = self.function(function).qualname.split_once('.')?;
        let m = function.module;
        let index = *self.classes_by_name[m].get(class)?;
        Some(ClassRef {
            module: m,
            class: index,
        })
    }

    fn resolve_call(
        &self,
        caller: FnRef,
        call: &super::extract::CallFacts,
        backends: &Backends,
        out: &mut Vec<(FnRef, Result<FnRef, String>, Edge)>,
    ) {
        let edge = |layer: bool, backend: Option<usize>| Edge {
            line: call.line,
            layer,
            backend,
            truth_site: call.truth_site.clone(),
        };
        let owner = self.owner(caller);
        // `self.<attr>.<method>(...)` (method `forward` for a plain call); a missing method
        // may be a submodule of the submodule (`self.model.decoder(...)`).
        let to_forward = |out: &mut Vec<_>,
                          builds: Vec<(Result<ClassRef, String>, bool)>,
                          attr: &str,
                          method: &str,
                          layer_loop: bool| {
            for (class, list) in builds {
                match class {
                    Ok(class) => {
                        if let Some(target) = self.method(class, method) {
                            out.push((caller, Ok(target), edge(layer_loop && list, None)));
                        } else if method != "forward"
                            && let Some(inner) = self.submodule(class, method)
                        {
                            for (inner, _) in inner {
                                match inner {
                                    Ok(k) => {
                                        if let Some(target) = self.method(k, "forward") {
                                            out.push((caller, Ok(target), edge(false, None)));
                                        }
                                    }
                                    Err(name) => out.push((
                                        caller,
                                        Err(format!("self.{attr}.{method}: {name} (not loaded)")),
                                        edge(false, None),
                                    )),
                                }
                            }
                        }
                    }
                    Err(name) => out.push((
                        caller,
                        Err(format!("self.{attr}: {name} (not loaded)")),
                        edge(false, None),
                    )),
                }
            }
        };
        match &call.callee {
            Callee::Name(name) => {
                for target in self.resolve_functions(caller.module, name) {
                    out.push((caller, Ok(target), edge(false, None)));
                }
            }
            Callee::SelfAttr(attr) => {
                let Some(class) = owner else { return };
                if let Some(target) = self.method(class, attr) {
                    out.push((caller, Ok(target), edge(false, None)));
                } else if let Some(builds) = self.submodule(class, attr) {
                    to_forward(out, builds, attr, "forward", false);
                }
            }
            Callee::SelfAttrMethod(attr, method) => {
                let Some(class) = owner else { return };
                if let Some(builds) = self.submodule(class, attr) {
                    to_forward(out, builds, attr, method, false);
                }
            }
            Callee::Element { attr, layer_loop } => {
                let Some(class) = owner else { return };
                if let Some(builds) = self.submodule(class, attr) {
                    to_forward(out, builds, attr, "forward", *layer_loop);
                }
            }
            Callee::Super(method) => {
                let Some(class) = owner else { return };
                let chain = self.chain(class);
                if let Some(target) = self.method_in(&chain[1..], method) {
                    out.push((caller, Ok(target), edge(false, None)));
                }
            }
            Callee::Dispatch {
                table,
                default,
                get_interface,
            } => {
                let Some(Global::Instance { module, class }) =
                    self.resolve_global(caller.module, table, 0)
                else {
                    return;
                };
                let Some(class) = self.resolve_class(module, &class) else {
                    return;
                };
                let mapping = &self.class(class).global_mapping;
                let entry = |name: &str| {
                    mapping
                        .iter()
                        .rev()
                        .find(|(k, _)| k == name)
                        .map(|(_, v)| v.as_str())
                };
                for (b, name) in backends.names().enumerate() {
                    let targets = if let Some(value) = entry(name) {
                        self.resolve_functions(class.module, value)
                    } else if *get_interface
                        && name != "paged|eager"
                        && let Some(inner) = name.strip_prefix("paged|")
                        && let Some(value) = entry(inner)
                    {
                        self.resolve_functions(class.module, value)
                    } else if name == "eager"
                        && let Some(default) = default
                    {
                        self.resolve_functions(caller.module, default)
                    } else {
                        Vec::new()
                    };
                    for target in targets {
                        out.push((caller, Ok(target), edge(false, Some(b))));
                    }
                }
            }
        }
    }

    /// The functions a name may call: a function, or every function an alias names.
    fn resolve_functions(&self, module: usize, name: &str) -> Vec<FnRef> {
        self.functions_of(self.resolve_global(module, name, 0), 0)
    }

    fn functions_of(&self, global: Option<Global>, depth: usize) -> Vec<FnRef> {
        match global {
            Some(Global::Function(f)) if !self.function(f).is_property => vec![f],
            Some(Global::Alias { module, names }) if depth < 4 => names
                .iter()
                .flat_map(|n| self.functions_of(self.resolve_global(module, n, 0), depth + 1))
                .collect(),
            _ => Vec::new(),
        }
    }
}
