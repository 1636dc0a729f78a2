//! The body of `GET /v1/models`: the model tier's repository grouped by model, newest version first.

use std::cmp::Reverse;
use std::collections::BTreeMap;

use serde::Serialize;
use utoipa::ToSchema;

use crate::model_client::{RepositoryEntry, VersionState, parse_version};

/// Every model the model tier has.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ModelList {
    /// The model a predict request without `model` gets.
    pub default_model: String,
    /// By name.
    pub models: Vec<ModelListing>,
}

/// One model and its versions.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ModelListing {
    /// Model name.
    pub name: String,
    /// Newest first.
    pub versions: Vec<VersionListing>,
    /// The version a predict request without `version` gets: the configured one, else the highest ready
    /// one; none when no version is ready.
    pub default_version: Option<String>,
}

/// One version of a model.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct VersionListing {
    /// Version, a decimal string.
    pub version: String,
    /// Where it is in its life.
    pub state: VersionState,
}

impl ModelList {
    /// Groups `entries` by model; `configured_version` is `--model-version` ("" when not set).
    pub fn new(
        entries: Vec<RepositoryEntry>,
        default_model: &str,
        configured_version: &str,
    ) -> Self {
        let mut by_model: BTreeMap<String, Vec<VersionListing>> = BTreeMap::new();
        for entry in entries {
            let versions = by_model.entry(entry.model).or_default();
            // A model on disk with no version loaded (explicit control) is listed with no versions.
            if !entry.version.is_empty() {
                versions.push(VersionListing {
                    version: entry.version,
                    state: entry.state,
                });
            }
        }
        let models = by_model
            .into_iter()
            .map(|(name, mut versions)| {
                // Numerically, newest first; anything that is not a number last.
                versions.sort_by(|a, b| {
                    let key = |v: &VersionListing| Reverse(parse_version(&v.version));
                    key(a).cmp(&key(b)).then_with(|| a.version.cmp(&b.version))
                });
                let default_version = if configured_version.is_empty() {
                    versions
                        .iter()
                        .find(|v| {
                            v.state == VersionState::Ready && parse_version(&v.version).is_some()
                        })
                        .map(|v| v.version.clone())
                } else {
                    Some(configured_version.to_owned())
                };
                ModelListing {
                    name,
                    versions,
                    default_version,
                }
            })
            .collect();
        ModelList {
            default_model: default_model.to_owned(),
            models,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(model: &str, version: &str, state: VersionState) -> RepositoryEntry {
        RepositoryEntry {
            model: model.into(),
            version: version.into(),
            state,
        }
    }

    fn listed(list: &ModelList, model: &str) -> Vec<(String, VersionState)> {
        let listing = list.models.iter().find(|m| m.name == model).unwrap();
        listing
            .versions
            .iter()
            .map(|v| (v.version.clone(), v.state))
            .collect()
    }

    #[test]
    fn versions_are_grouped_newest_first_and_the_default_is_the_highest_ready() {
        use VersionState::*;
        let entries = vec![
            entry("b", "1", Ready),
            entry("a", "9", Ready),
            entry("a", "11", Loading),
            entry("a", "10", Unloading),
            entry("a", "2", Ready),
            entry("c", "1", Unavailable),
            entry("d", "", Unavailable),
        ];
        let list = ModelList::new(entries, "a", "");
        let names: Vec<&str> = list.models.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c", "d"]);
        assert_eq!(listed(&list, "d"), []);
        assert_eq!(
            listed(&list, "a"),
            [
                ("11".into(), Loading),
                ("10".into(), Unloading),
                ("9".into(), Ready),
                ("2".into(), Ready)
            ]
        );
        let defaults: Vec<Option<&str>> = list
            .models
            .iter()
            .map(|m| m.default_version.as_deref())
            .collect();
        assert_eq!(defaults, [Some("9"), Some("1"), None, None]);
    }

    #[test]
    fn a_configured_version_is_the_default() {
        let list = ModelList::new(vec![entry("a", "2", VersionState::Ready)], "a", "1");
        assert_eq!(list.models[0].default_version.as_deref(), Some("1"));
    }
}
