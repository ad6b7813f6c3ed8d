//! Per class: which sync sites its forward reaches, once per forward or once per layer, under
//! each backend of the shared table, stock and patched; and the text rendering.
//!
//! *Per forward*: reachable from the class's `forward` without crossing a layer edge (the
//! code of `*ForCausalLM.forward` and `*Model.forward` around the layer loop, the mask
//! creation, ...). *Per layer*: reachable from a layer edge's target (the decoder layer's
//! `forward` and everything below it); a site reached both ways is in both. *Patched*: the
//! same with the effects of `patch.rs` applied, for classes the audit patches.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Write as _;

use petgraph::graph::NodeIndex;
use petgraph::visit::EdgeRef;
use serde::Serialize;

use super::extract::SiteFacts;
use super::graph::{ClassRef, FnRef, Program};
use super::kinds::SyncKind;
use super::patch::{PATCHES, PatchEffect};
use crate::backends::Backends;

/// A site, as reported.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct SiteKey {
    pub path: String,
    pub line: u32,
    pub kind: SyncKind,
    pub function: String,
    pub text: String,
    pub guard: Option<String>,
}

/// The backends under which a site is reached once per forward, and once per layer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Reached {
    pub per_forward: Vec<String>,
    pub per_layer: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SiteRow {
    #[serde(flatten)]
    pub site: SiteKey,
    pub stock: Reached,
    pub patched: Reached,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub per_forward: usize,
    pub per_layer: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendTotals {
    pub backend: String,
    pub stock: Counts,
    pub patched: Counts,
}

/// The `syncs` section of one class.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClassSyncs {
    /// The forward the class runs (`LlamaForCausalLM.forward`), with its file and line.
    pub forward: Option<String>,
    pub forward_path: Option<String>,
    pub forward_line: Option<u32>,
    /// The classes whose `forward` runs once per element of a layer loop.
    pub layers: Vec<String>,
    /// The patch effects applied to the patched column (empty when the class is not patched
    /// or no effect's function is reached).
    pub patches: Vec<String>,
    /// Submodule calls that could not be followed (their syncs are not counted).
    pub unresolved: Vec<String>,
    pub sites: Vec<SiteRow>,
    /// Distinct sites per forward and per layer, per backend (file order of the table).
    pub totals: Vec<BackendTotals>,
}

/// A patch effect located in the program.
pub struct ResolvedPatch {
    effect: &'static PatchEffect,
    /// Per backend: does the effect apply.
    backends: Vec<bool>,
    callers: Vec<NodeIndex>,
    cut: HashSet<(NodeIndex, NodeIndex)>,
    per_forward: Vec<NodeIndex>,
}

/// Find each declared effect's functions in the program (every loaded package).
pub fn resolve_patches(program: &Program, table: &Backends) -> Vec<ResolvedPatch> {
    PATCHES
        .iter()
        .map(|effect| {
            let backends = table
                .names()
                .map(|n| {
                    table
                        .capabilities(n)
                        .and_then(|c| c.flag(effect.capability))
                        .unwrap_or(false)
                })
                .collect();
            let mut callers = Vec::new();
            let mut cut = HashSet::new();
            let mut per_forward = Vec::new();
            for module in &program.modules {
                let Some(package) = module.module.split('.').next() else {
                    continue;
                };
                if module.module != format!("{package}.{}", effect.caller.0) {
                    continue;
                }
                let Some(caller) = program.find_function(&module.module, effect.caller.1) else {
                    continue;
                };
                let node = program.node(caller);
                callers.push(node);
                for edge in program.graph.edges(node) {
                    let target = program.graph[edge.target()];
                    if effect
                        .cut
                        .contains(&program.function(target).qualname.as_str())
                    {
                        cut.insert((node, edge.target()));
                    }
                }
                for (m, f) in effect.per_forward {
                    if let Some(function) = program.find_function(&format!("{package}.{m}"), f) {
                        per_forward.push(program.node(function));
                    }
                }
            }
            ResolvedPatch {
                effect,
                backends,
                callers,
                cut,
                per_forward,
            }
        })
        .collect()
}

/// What one traversal reached.
#[derive(Default)]
struct Walked {
    nodes: HashSet<NodeIndex>,
    /// Truth sites on the edges taken.
    edge_sites: Vec<(FnRef, SiteFacts)>,
    /// Layer edges met (not followed unless asked).
    layer_edges: Vec<NodeIndex>,
}

struct Walker<'p> {
    program: &'p Program,
    backend: usize,
    cut: &'p HashSet<(NodeIndex, NodeIndex)>,
}

impl Walker<'_> {
    fn walk(&self, starts: &[NodeIndex], follow_layers: bool) -> Walked {
        let mut walked = Walked::default();
        let mut stack: Vec<NodeIndex> = starts.to_vec();
        while let Some(node) = stack.pop() {
            if !walked.nodes.insert(node) {
                continue;
            }
            for edge in self.program.graph.edges(node) {
                let weight = edge.weight();
                if weight.backend.is_some_and(|b| b != self.backend)
                    || self.cut.contains(&(node, edge.target()))
                {
                    continue;
                }
                if weight.layer && !follow_layers {
                    walked.layer_edges.push(edge.target());
                    continue;
                }
                if let Some(site) = &weight.truth_site
                    && self
                        .program
                        .function(self.program.graph[edge.target()])
                        .returns_tensor
                {
                    walked
                        .edge_sites
                        .push((self.program.graph[node], site.clone()));
                }
                stack.push(edge.target());
            }
        }
        walked
    }

    fn sites(&self, walked: &Walked, out: &mut BTreeSet<SiteKey>) {
        for node in &walked.nodes {
            let function = self.program.graph[*node];
            let facts = self.program.function(function);
            for site in &facts.sites {
                out.insert(key(self.program, function, site));
            }
        }
        for (function, site) in &walked.edge_sites {
            out.insert(key(self.program, *function, site));
        }
    }
}

fn key(program: &Program, function: FnRef, site: &SiteFacts) -> SiteKey {
    SiteKey {
        path: program.modules[function.module].path.clone(),
        line: site.line,
        kind: site.kind,
        function: program.function(function).qualname.clone(),
        text: site.text.clone(),
        guard: site.guard.clone(),
    }
}

#[derive(Default, Clone)]
struct Reach {
    forward: BTreeSet<SiteKey>,
    layer: BTreeSet<SiteKey>,
    layers: BTreeSet<String>,
    nodes: HashSet<NodeIndex>,
}

fn reach(
    program: &Program,
    root: NodeIndex,
    backend: usize,
    cut: &HashSet<(NodeIndex, NodeIndex)>,
    extra_forward: &[NodeIndex],
) -> Reach {
    let walker = Walker {
        program,
        backend,
        cut,
    };
    let mut reach = Reach::default();
    let forward = walker.walk(&[root], false);
    walker.sites(&forward, &mut reach.forward);
    reach.nodes.extend(&forward.nodes);
    if !extra_forward.is_empty() {
        let extra = walker.walk(extra_forward, false);
        walker.sites(&extra, &mut reach.forward);
        reach.nodes.extend(&extra.nodes);
    }
    let mut targets = forward.layer_edges.clone();
    targets.sort();
    targets.dedup();
    for target in targets {
        let function = program.function(program.graph[target]);
        let class = function
            .qualname
            .split_once('.')
            .map_or(function.qualname.as_str(), |(c, _)| c);
        reach.layers.insert(class.to_string());
        let layer = walker.walk(&[target], true);
        walker.sites(&layer, &mut reach.layer);
        reach.nodes.extend(&layer.nodes);
    }
    reach
}

/// The syncs section of a class (`patched`: the audit patches it).
pub fn class_syncs(
    program: &Program,
    table: &Backends,
    patches: &[ResolvedPatch],
    class: ClassRef,
    patched: bool,
) -> ClassSyncs {
    let mut out = ClassSyncs {
        forward: None,
        forward_path: None,
        forward_line: None,
        layers: Vec::new(),
        patches: Vec::new(),
        unresolved: Vec::new(),
        sites: Vec::new(),
        totals: Vec::new(),
    };
    let Some(forward) = program.method(class, "forward") else {
        return out;
    };
    let facts = program.function(forward);
    out.forward = Some(facts.qualname.clone());
    out.forward_path = Some(program.modules[forward.module].path.clone());
    out.forward_line = Some(facts.line);
    let root = program.node(forward);
    let names: Vec<&str> = table.names().collect();
    let no_cut = HashSet::new();

    // Per site: [stock, patched] x [per forward, per layer] → backend indices.
    let mut rows: BTreeMap<SiteKey, [[BTreeSet<usize>; 2]; 2]> = BTreeMap::new();
    let mut layers = BTreeSet::new();
    let mut applied = BTreeSet::new();
    let mut nodes = HashSet::new();
    for (b, name) in names.iter().enumerate() {
        let stock = reach(program, root, b, &no_cut, &[]);
        let mut cut = HashSet::new();
        let mut extra = Vec::new();
        if patched {
            for patch in patches {
                let reached = patch.callers.iter().any(|c| stock.nodes.contains(c));
                if patch.backends[b] && reached {
                    cut.extend(patch.cut.iter().copied());
                    extra.extend(patch.per_forward.iter().copied());
                    applied.insert(patch.effect.name);
                }
            }
        }
        let after = if cut.is_empty() && extra.is_empty() {
            stock.clone()
        } else {
            reach(program, root, b, &cut, &extra)
        };
        out.totals.push(BackendTotals {
            backend: name.to_string(),
            stock: Counts {
                per_forward: stock.forward.len(),
                per_layer: stock.layer.len(),
            },
            patched: Counts {
                per_forward: after.forward.len(),
                per_layer: after.layer.len(),
            },
        });
        for (set, column, slot) in [
            (&stock.forward, 0, 0),
            (&stock.layer, 0, 1),
            (&after.forward, 1, 0),
            (&after.layer, 1, 1),
        ] {
            for site in set {
                rows.entry(site.clone()).or_default()[column][slot].insert(b);
            }
        }
        layers.extend(stock.layers);
        nodes.extend(stock.nodes);
    }
    let backend_names = |set: &BTreeSet<usize>| set.iter().map(|b| names[*b].to_string()).collect();
    out.sites = rows
        .into_iter()
        .map(|(site, [stock, patched])| SiteRow {
            site,
            stock: Reached {
                per_forward: backend_names(&stock[0]),
                per_layer: backend_names(&stock[1]),
            },
            patched: Reached {
                per_forward: backend_names(&patched[0]),
                per_layer: backend_names(&patched[1]),
            },
        })
        .collect();
    out.layers = layers.into_iter().collect();
    out.patches = applied.into_iter().map(str::to_string).collect();
    let mut unresolved: BTreeSet<String> = BTreeSet::new();
    for node in nodes {
        if let Some(list) = program.unresolved.get(&program.graph[node]) {
            unresolved.extend(list.iter().cloned());
        }
    }
    out.unresolved = unresolved.into_iter().collect();
    out
}

/// `all`, `all but x, y`, or the list: whichever is shorter.
fn backends_text(set: &[String], all: &[&str]) -> String {
    if set.len() == all.len() {
        return "all".to_string();
    }
    let missing: Vec<&str> = all
        .iter()
        .copied()
        .filter(|n| !set.iter().any(|s| s == n))
        .collect();
    if !set.is_empty() && missing.len() < set.len() {
        format!("all but {}", missing.join(", "))
    } else {
        set.join(", ")
    }
}

fn reached_text(reached: &Reached, all: &[&str]) -> String {
    let mut parts = Vec::new();
    if !reached.per_forward.is_empty() {
        parts.push(format!(
            "forward: {}",
            backends_text(&reached.per_forward, all)
        ));
    }
    if !reached.per_layer.is_empty() {
        parts.push(format!("layer: {}", backends_text(&reached.per_layer, all)));
    }
    if parts.is_empty() {
        "-".to_string()
    } else {
        parts.join("; ")
    }
}

/// At most `width` characters, `...` when cut.
fn clip(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_string();
    }
    let cut: String = text.chars().take(width - 3).collect();
    format!("{cut}...")
}

/// The text block of one class: its sites, stock and patched, and the totals per backend.
pub fn render_class(header: &str, syncs: &ClassSyncs, table: &Backends) -> String {
    let all: Vec<&str> = table.names().collect();
    let mut out = String::new();
    let _ = writeln!(out, "{header}");
    let Some(forward) = &syncs.forward else {
        let _ = writeln!(out, "  no forward found in the loaded sources");
        return out;
    };
    let _ = writeln!(
        out,
        "  forward {forward} ({}:{}); layers: {}; patch: {}",
        syncs.forward_path.as_deref().unwrap_or("?"),
        syncs.forward_line.unwrap_or(0),
        if syncs.layers.is_empty() {
            "none found".to_string()
        } else {
            syncs.layers.join(", ")
        },
        if syncs.patches.is_empty() {
            "none".to_string()
        } else {
            syncs.patches.join(", ")
        }
    );
    let rows: Vec<[String; 6]> = syncs
        .sites
        .iter()
        .map(|row| {
            let stock = reached_text(&row.stock, &all);
            let patched = reached_text(&row.patched, &all);
            let mut expression = row.site.text.clone();
            if let Some(guard) = &row.site.guard {
                let _ = write!(expression, " [if {guard}]");
            }
            [
                row.site.kind.name().to_string(),
                format!("{}:{}", row.site.path, row.site.line),
                row.site.function.clone(),
                clip(&expression, 60),
                stock.clone(),
                if patched == stock {
                    "same".to_string()
                } else {
                    patched
                },
            ]
        })
        .collect();
    let headers = ["KIND", "SITE", "FUNCTION", "EXPRESSION", "STOCK", "PATCHED"];
    let mut widths = headers.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut line = |cells: [&str; 6]| {
        let mut text = String::from("  ");
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:<width$}  ", width = widths[i]);
            }
        }
        let _ = writeln!(out, "{}", text.trim_end());
    };
    if rows.is_empty() {
        line(["(no sync site reached)", "", "", "", "", ""]);
    } else {
        line(headers);
        for row in &rows {
            line([&row[0], &row[1], &row[2], &row[3], &row[4], &row[5]]);
        }
    }
    let totals: Vec<String> = syncs
        .totals
        .iter()
        .map(|t| {
            let stock = format!("{}+{}", t.stock.per_forward, t.stock.per_layer);
            let patched = format!("{}+{}", t.patched.per_forward, t.patched.per_layer);
            if stock == patched {
                format!("{} {stock}", t.backend)
            } else {
                format!("{} {stock} -> {patched}", t.backend)
            }
        })
        .collect();
    let _ = writeln!(
        out,
        "  sites per forward + per layer (stock -> patched): {}",
        totals.join(", ")
    );
    if !syncs.unresolved.is_empty() {
        let _ = writeln!(out, "  not followed: {}", syncs.unresolved.join("; "));
    }
    out
}
