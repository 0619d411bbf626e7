//! The one compartment rule: which patients' compartments a resource belongs to. Access
//! control (confinement of reads, searches and writes), the ledger's attribution of entries
//! to patients, the patient's AuditEvent view and `$everything` all ask this rule, so they
//! cannot disagree about whose record a resource is part of.
//!
//! The rule is R4's CompartmentDefinition for Patient ([`super::compartment_definition`]),
//! extended to the types that definition leaves out although they may point at a patient:
//! every type outside it with a reference search parameter whose targets include Patient,
//! whatever the parameter's name (read from the R4 SearchParameters: Device `patient`, Task
//! `for`/`owner`/`focus`, VerificationResult `target`, Linkage `item`, MessageHeader `focus`,
//! Contract, GuidanceResponse, PaymentNotice, and the knowledge artifacts whose
//! `relatedArtifact` may name any resource), and to the two types whose content is opaque
//! to the index ([`OPAQUE_TYPES`]: a stored Bundle holds whole resources, a Binary any
//! content, its `securityContext` perhaps a patient), which belong to no one's compartment.
//! A device implanted in a patient or a task for a patient is part of that patient's record
//! as much as an Observation is.
//!
//! A resource of a compartment type is in the compartment of every Patient one of its
//! compartment parameters references (a Patient also in its own); one that references no
//! patient is in none, so a confined token does not see it (it fails closed). A resource
//! of a type with no parameter that may point at a patient (Practitioner, Organization,
//! Medication, Location, …) is shared reference data and belongs to no patient.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::{Map, Value};

use super::compartment_definition::PATIENT_COMPARTMENT;
use super::search_params::{ParamType, SearchParamRegistry};
use super::search_values::{IndexPlan, SearchValue};

/// Types whose content the index cannot place in a compartment: they belong to none.
pub const OPAQUE_TYPES: &[&str] = &["Binary", "Bundle"];

/// The compartment rule, built once from the search parameter definitions.
#[derive(Debug, Clone)]
pub struct CompartmentRule {
    /// Compartment parameters of each type that can be in a patient's compartment.
    params: BTreeMap<String, Vec<String>>,
    /// The top-level elements those parameters read, per type (`None`: the whole resource),
    /// so that a stored resource can be parsed in part.
    elements: HashMap<String, Option<Vec<String>>>,
}

impl CompartmentRule {
    /// R4's definition plus the extension, restricted to what `plan` indexes (a parameter
    /// the index cannot evaluate could not confine a search either).
    pub fn new(registry: &SearchParamRegistry, plan: &IndexPlan) -> Self {
        let mut params: BTreeMap<String, Vec<String>> = PATIENT_COMPARTMENT
            .iter()
            .map(|(resource_type, params)| {
                let params = params.iter().map(|p| (*p).to_owned()).collect();
                ((*resource_type).to_owned(), params)
            })
            .collect();
        for resource_type in registry.bases() {
            if params.contains_key(resource_type) || resource_type == "Patient" {
                continue;
            }
            let extension: Vec<String> = registry
                .for_type(resource_type)
                .into_values()
                .filter(|def| {
                    def.param_type == ParamType::Reference
                        && def.target.iter().any(|t| t == "Patient")
                        && def.base.iter().any(|b| b == resource_type)
                })
                .map(|def| def.code.clone())
                .collect();
            if !extension.is_empty() {
                params.insert(resource_type.to_owned(), extension);
            }
        }
        for opaque in OPAQUE_TYPES {
            params.insert((*opaque).to_owned(), Vec::new());
        }
        for (resource_type, codes) in &mut params {
            codes.retain(|code| plan.is_indexed(resource_type, code));
        }
        let elements = params
            .iter()
            .map(|(resource_type, codes)| {
                let mut names = Vec::new();
                for code in codes {
                    match plan.top_level_elements(resource_type, code) {
                        Some(found) => names.extend(found),
                        None => return (resource_type.clone(), None),
                    }
                }
                (resource_type.clone(), Some(names))
            })
            .collect();
        Self { params, elements }
    }

    /// The compartment parameters of `resource_type`; empty when it belongs to no patient.
    pub fn params(&self, resource_type: &str) -> &[String] {
        self.params.get(resource_type).map_or(&[], Vec::as_slice)
    }

    /// Whether resources of `resource_type` belong to patients' compartments.
    pub fn has_compartments(&self, resource_type: &str) -> bool {
        resource_type == "Patient" || self.params.contains_key(resource_type)
    }

    /// Every type that can be in a patient's compartment, with its parameters.
    pub fn types(&self) -> impl Iterator<Item = (&str, &[String])> {
        self.params
            .iter()
            .map(|(resource_type, params)| (resource_type.as_str(), params.as_slice()))
    }

    /// The ids of the patients whose compartments hold the resource; `None` for a type that
    /// belongs to no patient. `local_patient` turns a literal reference into the id of the
    /// Patient it names on this server, if it names one.
    pub fn compartments(
        &self,
        plan: &IndexPlan,
        resource_type: &str,
        id: &str,
        resource: &Value,
        local_patient: impl Fn(&str) -> Option<String>,
    ) -> Option<BTreeSet<String>> {
        if !self.has_compartments(resource_type) {
            return None;
        }
        let mut patients = BTreeSet::new();
        if resource_type == "Patient" {
            patients.insert(id.to_owned());
        }
        for param in self.params(resource_type) {
            for value in plan.extract_param(resource_type, param, resource) {
                if let SearchValue::Reference(reference) = value
                    && let Some(patient) = local_patient(&reference)
                {
                    patients.insert(patient);
                }
            }
        }
        Some(patients)
    }

    /// The part of a stored resource's JSON that [`Self::compartments`] reads: only the
    /// top-level elements its parameters name are built, the rest is skipped unparsed
    /// (this runs on every read and every resource a search returns).
    pub fn parse_relevant(&self, resource_type: &str, json: &str) -> serde_json::Result<Value> {
        match self.elements.get(resource_type) {
            Some(Some(names)) => {
                let mut deserializer = serde_json::Deserializer::from_str(json);
                let value = KeepElements { names }.deserialize(&mut deserializer)?;
                deserializer.end()?;
                Ok(value)
            }
            _ => serde_json::from_str(json),
        }
    }
}

/// Deserializes a JSON object keeping only the members a compartment parameter reads: a
/// name itself, or a choice element built on it (`value` keeps `valueReference`).
struct KeepElements<'a> {
    names: &'a [String],
}

impl KeepElements<'_> {
    fn keeps(&self, key: &str) -> bool {
        self.names.iter().any(|name| {
            key.strip_prefix(name.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(char::is_uppercase))
        })
    }
}

impl<'de> DeserializeSeed<'de> for KeepElements<'_> {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for KeepElements<'_> {
    type Value = Value;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a FHIR resource (a JSON object)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut kept = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if self.keeps(&key) {
                kept.insert(key, map.next_value()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(Value::Object(kept))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn rule() -> (CompartmentRule, IndexPlan) {
        let registry = SearchParamRegistry::load().unwrap();
        let plan = IndexPlan::new(&registry);
        (CompartmentRule::new(&registry, &plan), plan)
    }

    fn local(reference: &str) -> Option<String> {
        reference.strip_prefix("Patient/").map(str::to_owned)
    }

    #[test]
    fn extends_r4_to_types_that_point_at_a_patient() {
        let (rule, _) = rule();
        assert_eq!(rule.params("Device"), ["patient"]);
        for (resource_type, param) in [
            ("Task", "owner"),
            ("Task", "patient"),
            ("VerificationResult", "target"),
            ("Linkage", "item"),
            ("MessageHeader", "focus"),
            ("Contract", "subject"),
        ] {
            assert!(
                rule.params(resource_type).iter().any(|p| p == param),
                "{resource_type}.{param}: {:?}",
                rule.params(resource_type)
            );
        }
        // R4's own entries are kept as the definition gives them.
        assert_eq!(rule.params("Observation"), ["subject", "performer"]);
        assert_eq!(
            rule.params("Coverage"),
            ["policy-holder", "subscriber", "beneficiary", "payor"]
        );
        for shared in ["Practitioner", "Organization", "Location", "Medication"] {
            assert!(!rule.has_compartments(shared), "{shared}");
        }
        for opaque in OPAQUE_TYPES {
            assert!(rule.has_compartments(opaque) && rule.params(opaque).is_empty());
        }
        assert!(rule.has_compartments("Patient"));
    }

    #[test]
    fn finds_every_patient_and_reads_only_what_it_needs() {
        let (rule, plan) = rule();
        let appointment = json!({"resourceType": "Appointment", "status": "booked",
            "participant": [{"actor": {"reference": "Patient/a"}, "status": "accepted"},
                            {"actor": {"reference": "Practitioner/p"}, "status": "accepted"}]});
        let found = rule.compartments(&plan, "Appointment", "x", &appointment, local);
        assert_eq!(found, Some(BTreeSet::from(["a".to_owned()])));
        let task = json!({"resourceType": "Task", "for": {"reference": "Patient/b"}});
        let found = rule.compartments(&plan, "Task", "t", &task, local);
        assert_eq!(found, Some(BTreeSet::from(["b".to_owned()])));
        let group = json!({"resourceType": "Observation", "subject": {"reference": "Group/g"}});
        let found = rule.compartments(&plan, "Observation", "o", &group, local);
        assert_eq!(found, Some(BTreeSet::new()));
        assert_eq!(
            rule.compartments(&plan, "Practitioner", "p", &json!({}), local),
            None
        );

        let text = r#"{"resourceType":"Observation","status":"final","code":{"text":"x"},
            "valueString":"secret","subject":{"reference":"Patient/c"},"performer":[{"reference":"Patient/d"}]}"#;
        let relevant = rule.parse_relevant("Observation", text).unwrap();
        assert!(relevant.get("valueString").is_none(), "{relevant}");
        let found = rule.compartments(&plan, "Observation", "o", &relevant, local);
        assert_eq!(
            found,
            Some(BTreeSet::from(["c".to_owned(), "d".to_owned()]))
        );
        let linked = r#"{"resourceType":"Patient","link":[{"other":{"reference":"Patient/e"},"type":"seealso"}]}"#;
        let relevant = rule.parse_relevant("Patient", linked).unwrap();
        let found = rule.compartments(&plan, "Patient", "p", &relevant, local);
        assert_eq!(
            found,
            Some(BTreeSet::from(["e".to_owned(), "p".to_owned()]))
        );
        assert!(rule.parse_relevant("Observation", "{\"subject\":").is_err());
    }
}
