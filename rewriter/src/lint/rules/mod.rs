//! The lint's rules: one module each, with its unit tests. Codes are `FR-A` (attention)
//! plus three digits; the hundreds digit is the family: `0xx` legacy switches, `1xx`
//! non-canonical names, `2xx` name comparisons where a capability should be asked. Codes are
//! stable: a retired rule keeps its number unused. The README's rule table mirrors
//! [`Rule::ALL`] (a test checks it).

pub(crate) mod implementation_comparison;
pub(crate) mod legacy_attribute;
pub(crate) mod legacy_definition;
pub(crate) mod legacy_key;
pub(crate) mod legacy_keyword;
pub(crate) mod short_name_argument;
pub(crate) mod short_name_comparison;

#[cfg(test)]
pub(crate) mod test_support;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rule {
    LegacyFlagKeyword,
    LegacyFlagAttribute,
    LegacyFlagKey,
    LegacyFlagDefinition,
    ShortNameArgument,
    ShortNameComparison,
    ImplementationComparison,
}

impl Rule {
    pub const ALL: [Rule; 7] = [
        Rule::LegacyFlagKeyword,
        Rule::LegacyFlagAttribute,
        Rule::LegacyFlagKey,
        Rule::LegacyFlagDefinition,
        Rule::ShortNameArgument,
        Rule::ShortNameComparison,
        Rule::ImplementationComparison,
    ];

    pub fn code(self) -> &'static str {
        match self {
            Rule::LegacyFlagKeyword => "FR-A001",
            Rule::LegacyFlagAttribute => "FR-A002",
            Rule::LegacyFlagKey => "FR-A003",
            Rule::LegacyFlagDefinition => "FR-A004",
            Rule::ShortNameArgument => "FR-A101",
            Rule::ShortNameComparison => "FR-A102",
            Rule::ImplementationComparison => "FR-A201",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Rule::LegacyFlagKeyword => "legacy-flag-keyword",
            Rule::LegacyFlagAttribute => "legacy-flag-attribute",
            Rule::LegacyFlagKey => "legacy-flag-key",
            Rule::LegacyFlagDefinition => "legacy-flag-definition",
            Rule::ShortNameArgument => "short-name-argument",
            Rule::ShortNameComparison => "short-name-comparison",
            Rule::ImplementationComparison => "implementation-comparison",
        }
    }

    /// One sentence: what the rule finds.
    pub fn summary(self) -> &'static str {
        match self {
            Rule::LegacyFlagKeyword => {
                "A legacy switch passed as a keyword argument (`use_flash_attention_2=True`)."
            }
            Rule::LegacyFlagAttribute => {
                "A legacy switch read or set as an attribute (`config._flash_attn_2_enabled`, `cfg.flash_attention`)."
            }
            Rule::LegacyFlagKey => {
                "A legacy switch used as a key (`kwargs[\"use_flash_attention_2\"]`, `.get(...)`, `getattr(cfg, \"flash_attention\")`, a dict literal)."
            }
            Rule::LegacyFlagDefinition => {
                "A legacy switch defined as a parameter or a configuration field (`flash_attention: bool = False`)."
            }
            Rule::ShortNameArgument => {
                "A short form given as the attention implementation (`attn_implementation=\"fa2\"`, `config._attn_implementation = \"flash\"`)."
            }
            Rule::ShortNameComparison => {
                "A value compared against a short form (`x == \"flash\"`, `x in (\"fa2\", \"sdp\")`)."
            }
            Rule::ImplementationComparison => {
                "An attention implementation compared against names (`== \"flash_attention_2\"`, `in [...]`, `\"flash\" in impl`, `.startswith(...)`) where a capability should be asked."
            }
        }
    }
}
