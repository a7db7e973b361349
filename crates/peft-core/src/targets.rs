//! Choosing linear sites by module path, as PEFT's `target_modules` does.
//!
//! - a list of names: a site matches a name equal to its whole path or to a suffix of it that
//!   starts after a `.` (`q_proj` matches `model.layers.3.self_attn.q_proj`,
//!   `self_attn.q_proj` does too, `proj` does not);
//! - a single string other than `all-linear`: a regular expression that must match the whole
//!   path (`.*\.(q|v)_proj`);
//! - `all-linear`: every linear site except the output head.

use std::fmt;

use regex::Regex;
use serde::de::{self, Deserializer, Visitor};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};

use crate::error::{PeftError, Result};
use crate::model::LinearSite;

/// Which linear sites an adapter targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetModules {
    /// Module names, each matching a whole path or a `.`-separated suffix of one.
    Names(Vec<String>),
    /// A regular expression matched against the whole module path.
    Regex(String),
    /// Every linear site except the output head.
    AllLinear,
}

impl TargetModules {
    /// Targets from names (`["q_proj", "v_proj"]`).
    pub fn names<S: AsRef<str>>(names: &[S]) -> Self {
        Self::Names(names.iter().map(|n| n.as_ref().to_string()).collect())
    }

    /// Parses PEFT's `target_modules` as the command line gives it: `all-linear`, a list of
    /// names, or a single name. A string with regular-expression syntax in it (`.*`, `(`, `|`,
    /// `[`, `^`, `$`, `\`) is a regular expression.
    ///
    /// # Errors
    /// An empty list, or a regular expression that does not compile.
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<Self> {
        let targets = match items {
            [] => return Err(PeftError::Config("target_modules is empty".into())),
            [one] if one.as_ref() == "all-linear" => Self::AllLinear,
            [one] if one.as_ref().contains(['*', '(', '|', '[', '^', '$', '\\']) => {
                Self::Regex(one.as_ref().to_string())
            }
            names => Self::names(names),
        };
        targets.matcher()?;
        Ok(targets)
    }

    /// A matcher (the regular expression compiled once).
    ///
    /// # Errors
    /// A regular expression that does not compile, or an empty list or name.
    pub fn matcher(&self) -> Result<TargetMatcher<'_>> {
        Ok(match self {
            Self::Names(names) => {
                if names.is_empty() || names.iter().any(String::is_empty) {
                    return Err(PeftError::Config(format!(
                        "target_modules {names:?} is empty or names an empty module"
                    )));
                }
                TargetMatcher::Names(names)
            }
            Self::Regex(pattern) => {
                let anchored = format!("^(?:{pattern})$");
                TargetMatcher::Regex(Regex::new(&anchored).map_err(|e| {
                    PeftError::Config(format!(
                        "target_modules `{pattern}` is not a regular expression: {e}"
                    ))
                })?)
            }
            Self::AllLinear => TargetMatcher::AllLinear,
        })
    }

    /// The sites of `sites` these targets select, in the model's order.
    ///
    /// # Errors
    /// A bad regular expression, or targets that select nothing: like PEFT, an adapter that would
    /// adapt nothing is an error, listing the model's sites.
    pub fn select<'s>(&self, sites: &'s [LinearSite]) -> Result<Vec<&'s LinearSite>> {
        let matcher = self.matcher()?;
        let selected: Vec<&LinearSite> = sites.iter().filter(|s| matcher.matches(s)).collect();
        // A name that matches nothing is a typo PEFT would pass over when another name matches;
        // here it is an error, as a silent no-op would be.
        let unmatched = match self {
            Self::Names(names) => names
                .iter()
                .find(|name| !sites.iter().any(|s| path_has_suffix(&s.path, name))),
            _ => None,
        };
        if selected.is_empty() || unmatched.is_some() {
            let what = match unmatched {
                Some(name) => format!("target module `{name}` matches"),
                None => format!("target_modules {self} match"),
            };
            let mut names: Vec<&str> = sites.iter().map(|s| s.name.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            return Err(PeftError::Incompatible(format!(
                "{what} no linear layer of the model (its sites: {})",
                names.join(", ")
            )));
        }
        Ok(selected)
    }
}

impl fmt::Display for TargetModules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Names(names) => write!(f, "{names:?}"),
            Self::Regex(pattern) => write!(f, "`{pattern}`"),
            Self::AllLinear => f.write_str("all-linear"),
        }
    }
}

/// [`TargetModules`] ready to match paths.
#[derive(Debug, Clone)]
pub enum TargetMatcher<'a> {
    /// See [`TargetModules::Names`].
    Names(&'a [String]),
    /// See [`TargetModules::Regex`].
    Regex(Regex),
    /// See [`TargetModules::AllLinear`].
    AllLinear,
}

impl TargetMatcher<'_> {
    /// Whether `site` is targeted.
    pub fn matches(&self, site: &LinearSite) -> bool {
        match self {
            Self::Names(names) => names.iter().any(|name| path_has_suffix(&site.path, name)),
            Self::Regex(regex) => regex.is_match(&site.path),
            Self::AllLinear => !site.output_head,
        }
    }
}

/// Whether `path` is `name` or ends with `.{name}` (PEFT's rule for a list of names).
pub fn path_has_suffix(path: &str, name: &str) -> bool {
    path == name
        || path
            .strip_suffix(name)
            .is_some_and(|rest| rest.ends_with('.'))
}

/// Written as PEFT writes it: a list of names, or a string (a regular expression or
/// `all-linear`).
impl Serialize for TargetModules {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Self::Names(names) => names.serialize(serializer),
            Self::Regex(pattern) => serializer.serialize_str(pattern),
            Self::AllLinear => serializer.serialize_str("all-linear"),
        }
    }
}

impl<'de> Deserialize<'de> for TargetModules {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct Targets;
        impl<'de> Visitor<'de> for Targets {
            type Value = TargetModules;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of module names, a regular expression, or \"all-linear\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<TargetModules, E> {
                Ok(if v == "all-linear" {
                    TargetModules::AllLinear
                } else {
                    TargetModules::Regex(v.to_string())
                })
            }
            fn visit_seq<A: de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<TargetModules, A::Error> {
                let mut names = Vec::new();
                while let Some(name) = seq.next_element::<String>()? {
                    names.push(name);
                }
                Ok(TargetModules::Names(names))
            }
        }
        deserializer.deserialize_any(Targets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sites() -> Vec<LinearSite> {
        let mut sites = Vec::new();
        for layer in 0..2 {
            for name in ["self_attn.q_proj", "self_attn.v_proj", "mlp.fc1"] {
                sites.push(LinearSite::in_layer("model.layers", layer, name, 4, 4));
            }
        }
        sites.push(LinearSite::top_level("lm_head", 4, 10).as_output_head());
        sites.push(LinearSite::top_level("classifier", 4, 2));
        sites
    }

    fn selected(targets: &TargetModules) -> Vec<String> {
        let sites = sites();
        targets
            .select(&sites)
            .unwrap()
            .into_iter()
            .map(|s| s.path.clone())
            .collect()
    }

    #[test]
    fn names_match_whole_paths_and_dotted_suffixes_only() {
        let targets = TargetModules::names(&["q_proj", "classifier"]);
        assert_eq!(
            selected(&targets),
            [
                "model.layers.0.self_attn.q_proj",
                "model.layers.1.self_attn.q_proj",
                "classifier"
            ]
        );
        let layer_one = TargetModules::names(&["layers.1.self_attn.v_proj"]);
        assert_eq!(selected(&layer_one), ["model.layers.1.self_attn.v_proj"]);
        assert!(!path_has_suffix("model.layers.0.self_attn.q_proj", "proj"));
    }

    #[test]
    fn a_regular_expression_must_match_the_whole_path() {
        let targets = TargetModules::parse(&[r".*\.0\..*_proj"]).unwrap();
        assert!(matches!(targets, TargetModules::Regex(_)));
        assert_eq!(
            selected(&targets),
            [
                "model.layers.0.self_attn.q_proj",
                "model.layers.0.self_attn.v_proj"
            ]
        );
        // `q_proj` as a regular expression would not match any whole path.
        let partial = TargetModules::Regex("q_proj".into());
        assert!(matches!(
            partial.select(&sites()),
            Err(PeftError::Incompatible(message)) if message.contains("match no linear layer")
        ));
    }

    #[test]
    fn all_linear_leaves_out_the_output_head() {
        let paths = selected(&TargetModules::parse(&["all-linear"]).unwrap());
        assert_eq!(paths.len(), 7);
        assert!(!paths.contains(&"lm_head".to_string()));
        assert!(paths.contains(&"classifier".to_string()));
    }

    #[test]
    fn targets_round_trip_through_peft_json() {
        for (targets, json) in [
            (
                TargetModules::names(&["q_proj", "v_proj"]),
                r#"["q_proj","v_proj"]"#,
            ),
            (TargetModules::AllLinear, r#""all-linear""#),
            (TargetModules::Regex(r".*\.fc1".into()), r#"".*\\.fc1""#),
        ] {
            assert_eq!(serde_json::to_string(&targets).unwrap(), json);
            assert_eq!(
                serde_json::from_str::<TargetModules>(json).unwrap(),
                targets
            );
        }
    }

    #[test]
    fn a_name_that_matches_nothing_is_an_error_even_beside_one_that_matches() {
        let targets = TargetModules::names(&["q_proj", "qproj"]);
        assert!(matches!(
            targets.select(&sites()),
            Err(PeftError::Incompatible(message))
                if message.contains("`qproj` matches no linear layer") && message.contains("self_attn.v_proj")
        ));
    }

    #[test]
    fn a_bad_regular_expression_is_a_configuration_error() {
        assert!(matches!(
            TargetModules::parse(&["(q_proj"]),
            Err(PeftError::Config(message)) if message.contains("not a regular expression")
        ));
        assert!(TargetModules::parse::<&str>(&[]).is_err());
    }
}
