//! Which patient's compartment a resource belongs to, for ledger entries. A first
//! approximation of the R4 Patient CompartmentDefinition: a Patient is its own compartment;
//! other resources belong to the patient their `subject` or `patient` element references.

use serde::Deserialize;

/// The only elements read: everything else is skipped without being built, since this runs
/// on every read and write.
#[derive(Deserialize)]
struct CompartmentElements {
    subject: Option<MaybeReference>,
    patient: Option<MaybeReference>,
}

/// A single Reference, or some other shape (e.g. `Contract.subject` is a list) to ignore.
#[derive(Deserialize)]
#[serde(untagged)]
enum MaybeReference {
    Reference { reference: Option<String> },
    Other(serde::de::IgnoredAny),
}

/// `Patient/<id>` of the compartment, when there is one.
pub fn patient_compartment(resource_type: &str, id: &str, json: &str) -> Option<String> {
    if resource_type == "Patient" {
        return Some(format!("Patient/{id}"));
    }
    let elements: CompartmentElements = serde_json::from_str(json).ok()?;
    [elements.subject, elements.patient]
        .into_iter()
        .filter_map(|element| match element? {
            MaybeReference::Reference { reference } => reference,
            MaybeReference::Other(_) => None,
        })
        .find_map(|reference| patient_reference(&reference))
}

/// Normalizes a literal reference to a patient (`Patient/1`, `https://x/fhir/Patient/1`,
/// `Patient/1/_history/2`) to `Patient/<id>`.
fn patient_reference(reference: &str) -> Option<String> {
    let after = match reference.rfind("Patient/") {
        Some(at) if at == 0 || reference[..at].ends_with('/') => {
            &reference[at + "Patient/".len()..]
        }
        _ => return None,
    };
    let id = after.split('/').next()?;
    crate::fhir::ResourceId::parse(id)
        .ok()
        .map(|id| format!("Patient/{id}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_patient() {
        assert_eq!(
            patient_compartment("Patient", "p1", "{}").as_deref(),
            Some("Patient/p1")
        );
        let observation =
            r#"{"resourceType":"Observation","subject":{"reference":"Patient/example"}}"#;
        assert_eq!(
            patient_compartment("Observation", "o", observation).as_deref(),
            Some("Patient/example")
        );
        let absolute = r#"{"patient":{"reference":"https://h.org/fhir/Patient/7/_history/2"}}"#;
        assert_eq!(
            patient_compartment("AllergyIntolerance", "a", absolute).as_deref(),
            Some("Patient/7")
        );
        let group = r#"{"subject":{"reference":"Group/1"}}"#;
        assert_eq!(patient_compartment("Observation", "o", group), None);
        let list_then_patient =
            r#"{"subject":[{"reference":"Patient/1"}],"patient":{"reference":"Patient/2"}}"#;
        assert_eq!(
            patient_compartment("Contract", "c", list_then_patient).as_deref(),
            Some("Patient/2")
        );
        let lookalike = r#"{"subject":{"reference":"NotPatient/1"}}"#;
        assert_eq!(patient_compartment("Observation", "o", lookalike), None);
    }
}
