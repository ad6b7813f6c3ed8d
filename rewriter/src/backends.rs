//! The table of attention backends, read from the one shared file
//! `runtime/python/forward_rewrite/attention_backends.json` (the Python attention module reads
//! the same file): canonical names and their capabilities, the short forms (`aliases`), the
//! legacy switches (`legacy_flags`). `lint` and `scan --syncs` take every backend name from
//! here; nothing in Rust repeats the table.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde::Deserialize;
use serde_json::Value;

/// The shared file, compiled in.
pub const TABLE_JSON: &str =
    include_str!("../../runtime/python/forward_rewrite/attention_backends.json");

/// The table, in the file's order (a `Vec`, not a map, where the order matters for output).
#[derive(Debug)]
pub struct Backends {
    /// Canonical names with their capabilities, in file order.
    pub backends: Vec<(String, Capabilities)>,
    /// Short form → canonical name.
    pub aliases: BTreeMap<String, String>,
    /// Legacy switch → the canonical name it selected.
    pub legacy_flags: BTreeMap<String, String>,
    /// Names (canonical or short) that are also ordinary words in code (`default`, `math`,
    /// `eager`, ...): the lint reports them only where the other side of the comparison
    /// is an attention value.
    pub ambiguous_names: Vec<String>,
}

/// A backend's capabilities: the keys of its object in the file, in file order. `mask` is a
/// string, the others are booleans.
#[derive(Debug, Clone)]
pub struct Capabilities(pub Vec<(String, Value)>);

impl Capabilities {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn flag(&self, key: &str) -> Option<bool> {
        self.get(key).and_then(Value::as_bool)
    }
}

#[derive(Deserialize)]
struct Raw {
    schema: u32,
    backends: serde_json::Map<String, Value>,
    aliases: BTreeMap<String, String>,
    legacy_flags: BTreeMap<String, String>,
    #[serde(default)]
    lint: RawLint,
}

#[derive(Deserialize, Default)]
struct RawLint {
    #[serde(default)]
    ambiguous_names: Vec<String>,
}

/// The compiled-in table (parsed once; a malformed file is a build-time bug, caught by the
/// tests below).
/// The order in which capabilities are offered when several single out the same backends:
/// how a backend is called (varlen kwargs, packing, paging, mask kind) before its numerics.
const KEY_ORDER: [&str; 7] = [
    "takes_varlen_kwargs",
    "supports_packing",
    "paged",
    "mask",
    "needs_dtype_cast",
    "sliding_window",
    "softcap",
];

pub fn table() -> &'static Backends {
    static TABLE: OnceLock<Backends> = OnceLock::new();
    TABLE.get_or_init(|| parse(TABLE_JSON).expect("attention_backends.json is valid"))
}

pub fn parse(text: &str) -> Result<Backends, String> {
    let raw: Raw = serde_json::from_str(text).map_err(|e| e.to_string())?;
    if raw.schema != 1 {
        return Err(format!("unknown schema {}", raw.schema));
    }
    let mut backends = Vec::new();
    for (name, caps) in raw.backends {
        let Value::Object(caps) = caps else {
            return Err(format!("backend {name} is not an object"));
        };
        backends.push((name, Capabilities(caps.into_iter().collect())));
    }
    Ok(Backends {
        backends,
        aliases: raw.aliases,
        legacy_flags: raw.legacy_flags,
        ambiguous_names: raw.lint.ambiguous_names,
    })
}

impl Backends {
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.backends.iter().map(|(n, _)| n.as_str())
    }

    pub fn is_canonical(&self, name: &str) -> bool {
        self.backends.iter().any(|(n, _)| n == name)
    }

    pub fn capabilities(&self, name: &str) -> Option<&Capabilities> {
        self.backends
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c)
    }

    /// The canonical name of a short form.
    pub fn alias(&self, name: &str) -> Option<&str> {
        self.aliases.get(name).map(String::as_str)
    }

    /// The canonical name a legacy switch selected.
    pub fn legacy_flag(&self, name: &str) -> Option<&str> {
        self.legacy_flags.get(name).map(String::as_str)
    }

    pub fn is_ambiguous(&self, name: &str) -> bool {
        self.ambiguous_names.iter().any(|n| n == name)
    }

    /// A legacy switch whose name is also a backend name or a short form (`flash_attention`,
    /// `flex_attention`, `sdp_attention`): it also names functions, modules and registry keys,
    /// so the lint wants more evidence that it is read as a switch.
    pub fn flag_is_ambiguous(&self, flag: &str) -> bool {
        self.is_canonical(flag) || self.aliases.contains_key(flag)
    }

    /// The backends for which a boolean capability is true.
    pub fn with_capability(&self, key: &str) -> Vec<&str> {
        self.backends
            .iter()
            .filter(|(_, c)| c.flag(key) == Some(true))
            .map(|(n, _)| n.as_str())
            .collect()
    }

    /// The capability keys, in the order of the first backend.
    pub fn capability_keys(&self) -> Vec<&str> {
        self.backends
            .first()
            .map(|(_, c)| c.0.iter().map(|(k, _)| k.as_str()).collect())
            .unwrap_or_default()
    }

    /// The question to ask instead of comparing a name against `set` (canonical names):
    /// the capability test whose true set is `set` exactly, else the one whose true set is
    /// the smallest that contains `set`. Positive booleans are preferred, then `mask ==`,
    /// then negated booleans; ties go by [`KEY_ORDER`]. None when nothing contains the set.
    pub fn capability_question(&self, set: &[&str]) -> Option<CapabilityQuestion> {
        if set.is_empty() {
            return None;
        }
        let mut candidates: Vec<(usize, usize, CapabilityQuestion)> = Vec::new();
        for key in self.capability_keys() {
            let mut tests: Vec<(usize, Test)> = Vec::new();
            let first = self.backends.first().and_then(|(_, c)| c.get(key));
            match first {
                Some(Value::Bool(_)) => {
                    tests.push((0, Test::True));
                    tests.push((2, Test::False));
                }
                Some(Value::String(_)) => {
                    let mut values: Vec<&str> = Vec::new();
                    for (_, caps) in &self.backends {
                        if let Some(v) = caps.get(key).and_then(Value::as_str)
                            && !values.contains(&v)
                        {
                            values.push(v);
                        }
                    }
                    tests.extend(values.into_iter().map(|v| (1, Test::Equals(v.to_string()))));
                }
                _ => continue,
            }
            for (preference, test) in tests {
                let holds: Vec<&str> = self
                    .backends
                    .iter()
                    .filter(|(_, caps)| test.holds(caps.get(key)))
                    .map(|(n, _)| n.as_str())
                    .collect();
                // A test that holds everywhere separates nothing.
                if holds.len() < self.backends.len() && set.iter().all(|n| holds.contains(n)) {
                    let question = CapabilityQuestion {
                        key: key.to_string(),
                        test: test.clone(),
                        exact: holds.len() == set.len(),
                        also: holds
                            .iter()
                            .filter(|n| !set.contains(n))
                            .map(|n| n.to_string())
                            .collect(),
                    };
                    candidates.push((holds.len(), preference, question));
                }
            }
        }
        // Equal (size, preference): the capability that says most about how a backend is
        // called comes first (the table's keys come back in alphabetical order).
        let rank = |key: &str| {
            KEY_ORDER
                .iter()
                .position(|k| *k == key)
                .unwrap_or(KEY_ORDER.len())
        };
        candidates.sort_by_key(|(size, preference, q)| (*size, *preference, rank(&q.key)));
        candidates.into_iter().next().map(|(_, _, q)| q)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Test {
    True,
    False,
    Equals(String),
}

impl Test {
    fn holds(&self, value: Option<&Value>) -> bool {
        match (self, value) {
            (Test::True, Some(Value::Bool(b))) => *b,
            (Test::False, Some(Value::Bool(b))) => !*b,
            (Test::Equals(v), Some(Value::String(s))) => v == s,
            _ => false,
        }
    }
}

/// A capability test that replaces a name comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapabilityQuestion {
    pub key: String,
    pub test: Test,
    /// The test holds for exactly the compared names.
    pub exact: bool,
    /// Other backends the test also holds for (empty when exact).
    pub also: Vec<String>,
}

impl CapabilityQuestion {
    /// The Python expression, over `capabilities(<subject>)`; `negate` for `!=` / `not in`.
    pub fn render(&self, subject: &str, negate: bool) -> String {
        let caps = format!("forward_rewrite.attention.capabilities({subject})");
        let positive = match &self.test {
            Test::True => true,
            Test::False => false,
            Test::Equals(_) => true,
        };
        match &self.test {
            Test::Equals(v) => {
                let op = if negate { "!=" } else { "==" };
                format!("{caps}.{} {op} \"{v}\"", self.key)
            }
            _ => {
                if positive != negate {
                    format!("{caps}.{}", self.key)
                } else {
                    format!("not {caps}.{}", self.key)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shared_file_parses() {
        let t = table();
        assert!(t.is_canonical("flash_attention_2"));
        assert_eq!(t.alias("fa2"), Some("flash_attention_2"));
        assert_eq!(
            t.legacy_flag("use_flash_attention_2"),
            Some("flash_attention_2")
        );
        assert!(t.flag_is_ambiguous("flex_attention"));
        assert!(t.flag_is_ambiguous("flash_attention"));
        assert!(!t.flag_is_ambiguous("use_flash_attention_2"));
        assert!(t.capability_keys().contains(&"supports_packing"));
        // Every alias and flag points at a canonical name.
        for target in t.aliases.values().chain(t.legacy_flags.values()) {
            assert!(t.is_canonical(target), "{target}");
        }
        for name in &t.ambiguous_names {
            assert!(t.is_canonical(name) || t.alias(name).is_some(), "{name}");
        }
    }

    #[test]
    fn capability_questions_come_from_the_table() {
        let t = table();
        let q = t
            .capability_question(&[
                "flash_attention_2",
                "flash_attention_3",
                "flash_attention_4",
            ])
            .unwrap();
        assert_eq!(q.key, "takes_varlen_kwargs");
        assert!(q.exact);
        let q = t.capability_question(&["flash_attention_2"]).unwrap();
        assert_eq!(q.key, "takes_varlen_kwargs");
        assert!(!q.exact);
        assert_eq!(q.also, ["flash_attention_3", "flash_attention_4"]);
        let q = t.capability_question(&["sdpa", "eager"]).unwrap();
        assert_eq!(
            (q.key.as_str(), &q.test),
            ("mask", &Test::Equals("dense".into()))
        );
        assert!(q.exact);
        assert_eq!(
            q.render("impl", true),
            "forward_rewrite.attention.capabilities(impl).mask != \"dense\""
        );
        let q = t.capability_question(&["flex_attention"]).unwrap();
        assert_eq!(
            q.render("x", false),
            "forward_rewrite.attention.capabilities(x).mask == \"block\""
        );
    }
}
