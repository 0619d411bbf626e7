//! The identifiers of a set of resources not yet stored, so that the conditional references
//! between them (`Practitioner?identifier=system|value`, as Synthea's bulk output writes
//! them) resolve to literal ones whatever order the resources are loaded in.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use serde_json::Value;

/// Which resource an identifier names within the set: one, or several (then a reference
/// by it is ambiguous, as a search matching two resources would be).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Named {
    One(String),
    Several,
}

/// What the set says about a conditional reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentifierMatch {
    /// Exactly one resource of the set carries the identifier: its `Type/id`.
    Resource(String),
    /// Several resources of the set carry it.
    Ambiguous,
    /// The reference is not by identifier, or no resource of the set carries it; whatever
    /// is stored already must answer.
    NotInSet,
}

/// Identifiers of resources, by type, system and value, following the token search rules:
/// `identifier=value` matches any system, `system|value` that system only and `|value`
/// identifiers without a system.
#[derive(Debug, Default)]
pub struct IdentifierIndex {
    with_system: HashMap<(String, String, String), Named>,
    any_system: HashMap<(String, String), Named>,
    without_system: HashMap<(String, String), Named>,
}

impl IdentifierIndex {
    /// Adds the identifiers of `resource` (a resource's JSON with `resourceType` and `id`);
    /// a resource without an id cannot be referred to and adds nothing.
    pub fn add(&mut self, resource: &Value) {
        let (Some(resource_type), Some(id)) = (
            resource.get("resourceType").and_then(Value::as_str),
            resource.get("id").and_then(Value::as_str),
        ) else {
            return;
        };
        let Some(identifiers) = resource.get("identifier").and_then(Value::as_array) else {
            return;
        };
        let literal = format!("{resource_type}/{id}");
        for identifier in identifiers {
            let Some(value) = identifier.get("value").and_then(Value::as_str) else {
                continue;
            };
            let key = (resource_type.to_owned(), value.to_owned());
            name(&mut self.any_system, key.clone(), &literal);
            match identifier.get("system").and_then(Value::as_str) {
                Some(system) => name(
                    &mut self.with_system,
                    (
                        resource_type.to_owned(),
                        system.to_owned(),
                        value.to_owned(),
                    ),
                    &literal,
                ),
                None => name(&mut self.without_system, key, &literal),
            }
        }
    }

    /// Resolves `Type?identifier=…` against the set; any other reference is
    /// [`IdentifierMatch::NotInSet`].
    pub fn resolve(&self, reference: &str) -> IdentifierMatch {
        let Some((resource_type, query)) = reference.split_once('?') else {
            return IdentifierMatch::NotInSet;
        };
        let Ok(pairs) = serde_urlencoded::from_str::<Vec<(String, String)>>(query) else {
            return IdentifierMatch::NotInSet;
        };
        let [(name, token)] = pairs.as_slice() else {
            return IdentifierMatch::NotInSet;
        };
        if name != "identifier" {
            return IdentifierMatch::NotInSet;
        }
        let named = match token.split_once('|') {
            None => self
                .any_system
                .get(&(resource_type.to_owned(), token.clone())),
            Some(("", value)) => self
                .without_system
                .get(&(resource_type.to_owned(), value.to_owned())),
            Some((_, "")) => return IdentifierMatch::NotInSet,
            Some((system, value)) => self.with_system.get(&(
                resource_type.to_owned(),
                system.to_owned(),
                value.to_owned(),
            )),
        };
        match named {
            Some(Named::One(literal)) => IdentifierMatch::Resource(literal.clone()),
            Some(Named::Several) => IdentifierMatch::Ambiguous,
            None => IdentifierMatch::NotInSet,
        }
    }
}

/// Records that `key` names `literal`; a key naming a second resource becomes ambiguous
/// (the same resource listing an identifier twice stays one).
fn name<K: std::hash::Hash + Eq>(map: &mut HashMap<K, Named>, key: K, literal: &str) {
    match map.entry(key) {
        Entry::Vacant(vacant) => {
            vacant.insert(Named::One(literal.to_owned()));
        }
        Entry::Occupied(mut occupied) => {
            if *occupied.get() != Named::One(literal.to_owned()) {
                occupied.insert(Named::Several);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn index() -> IdentifierIndex {
        let mut index = IdentifierIndex::default();
        index.add(&json!({
            "resourceType": "Practitioner", "id": "p1",
            "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": "999"}]
        }));
        index.add(&json!({
            "resourceType": "Practitioner", "id": "p2",
            "identifier": [{"system": "urn:other", "value": "999"}, {"value": "local-7"}]
        }));
        index.add(&json!({
            "resourceType": "Organization", "id": "o1",
            "identifier": [{"system": "urn:org", "value": "A"}, {"system": "urn:org", "value": "A"}]
        }));
        index
    }

    #[test]
    fn identifiers_resolve_by_the_token_rules() {
        let index = index();
        assert_eq!(
            index.resolve("Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|999"),
            IdentifierMatch::Resource("Practitioner/p1".into())
        );
        // Percent-encoded as a client may send it.
        assert_eq!(
            index.resolve("Practitioner?identifier=urn%3Aother%7C999"),
            IdentifierMatch::Resource("Practitioner/p2".into())
        );
        assert_eq!(
            index.resolve("Practitioner?identifier=|local-7"),
            IdentifierMatch::Resource("Practitioner/p2".into())
        );
        // Without a system the value matches in any system: two practitioners.
        assert_eq!(
            index.resolve("Practitioner?identifier=999"),
            IdentifierMatch::Ambiguous
        );
        // One resource listing the same identifier twice is still one match.
        assert_eq!(
            index.resolve("Organization?identifier=urn:org|A"),
            IdentifierMatch::Resource("Organization/o1".into())
        );
    }

    #[test]
    fn other_references_are_left_to_the_database() {
        let index = index();
        for reference in [
            "Practitioner/p1",
            "Practitioner?identifier=urn:unknown|999",
            "Patient?identifier=http://hl7.org/fhir/sid/us-npi|999",
            "Practitioner?name=Smith",
            "Practitioner?identifier=urn:other|999&name=Smith",
            "Practitioner?identifier=urn:other|",
        ] {
            assert_eq!(
                index.resolve(reference),
                IdentifierMatch::NotInSet,
                "{reference}"
            );
        }
    }
}
