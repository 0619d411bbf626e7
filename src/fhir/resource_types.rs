//! The resource types this server serves, loaded from `schema/resource-types.json`, and
//! the identity newtypes ([`ResourceType`], [`ResourceId`]) that keep them apart.

use std::collections::BTreeSet;
use std::fmt;

use serde::Deserialize;

const RESOURCE_TYPES_JSON: &str = include_str!("../../schema/resource-types.json");

#[derive(Debug, Deserialize)]
struct ResourceTypesFile {
    supported: Vec<String>,
    #[serde(rename = "removedInR4B")]
    removed_in_r4b: Vec<String>,
    #[serde(rename = "redefinedInR4B")]
    redefined_in_r4b: Vec<String>,
}

/// Why a type name in a URL cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TypeError {
    #[error("unknown resource type '{0}'")]
    Unknown(String),
    #[error(
        "resource type '{0}' is not supported by this server (its R4 definition is not represented in the R4B model it validates against)"
    )]
    Unsupported(String),
}

/// The registry of supported types.
#[derive(Debug, Clone)]
pub struct ResourceTypes {
    supported: BTreeSet<String>,
    known_unsupported: BTreeSet<String>,
}

impl ResourceTypes {
    /// Loads the registry compiled in from `schema/`. The file is part of the build and a
    /// test checks it parses, so failure here is a build defect, reported rather than hidden.
    pub fn load() -> Result<Self, serde_json::Error> {
        let file: ResourceTypesFile = serde_json::from_str(RESOURCE_TYPES_JSON)?;
        Ok(Self {
            supported: file.supported.into_iter().collect(),
            known_unsupported: file
                .removed_in_r4b
                .into_iter()
                .chain(file.redefined_in_r4b)
                .collect(),
        })
    }

    /// Resolves a type name from a URL or a body.
    pub fn resolve(&self, name: &str) -> Result<ResourceType, TypeError> {
        if self.supported.contains(name) {
            Ok(ResourceType(name.to_owned()))
        } else if self.known_unsupported.contains(name) {
            Err(TypeError::Unsupported(name.to_owned()))
        } else {
            Err(TypeError::Unknown(name.to_owned()))
        }
    }

    /// Supported types in alphabetical order.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.supported.iter().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.supported.len()
    }

    pub fn is_empty(&self) -> bool {
        self.supported.is_empty()
    }
}

/// A supported resource type name, e.g. `Patient`. Only [`ResourceTypes::resolve`] makes one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceType(String);

impl ResourceType {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ResourceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A logical id: 1–64 characters of `A-Z a-z 0-9 - .` (FHIR R4 datatypes, `id`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a valid resource id (1 to 64 characters of A-Z, a-z, 0-9, '-' and '.')")]
pub struct InvalidId(pub String);

impl ResourceId {
    pub fn parse(text: &str) -> Result<Self, InvalidId> {
        let valid = (1..=64).contains(&text.len())
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if valid {
            Ok(Self(text.to_owned()))
        } else {
            // Echo at most a short prefix: a malformed id might be anything a client typed.
            Err(InvalidId(text.chars().take(64).collect()))
        }
    }

    /// A new server-assigned id (a random UUID: opaque, carries no PHI).
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7().to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_resolves_supported_unsupported_and_unknown() {
        let types = ResourceTypes::load().unwrap();
        assert!(types.len() > 100);
        assert_eq!(types.resolve("Patient").unwrap().as_str(), "Patient");
        assert_eq!(
            types.resolve("MedicinalProduct"),
            Err(TypeError::Unsupported("MedicinalProduct".into()))
        );
        assert_eq!(
            types.resolve("Evidence"),
            Err(TypeError::Unsupported("Evidence".into()))
        );
        assert_eq!(
            types.resolve("Patients"),
            Err(TypeError::Unknown("Patients".into()))
        );
        // R4B-only types are not R4 types.
        assert_eq!(
            types.resolve("Citation"),
            Err(TypeError::Unknown("Citation".into()))
        );
    }

    #[test]
    fn ids_follow_the_r4_id_datatype() {
        assert!(ResourceId::parse("example-1.2").is_ok());
        assert!(ResourceId::parse(&"a".repeat(64)).is_ok());
        assert!(ResourceId::parse(&"a".repeat(65)).is_err());
        assert!(ResourceId::parse("").is_err());
        assert!(ResourceId::parse("a/b").is_err());
        assert!(ResourceId::parse("a_b").is_err());
        assert!(ResourceId::parse(ResourceId::generate().as_str()).is_ok());
    }
}
