//! The R4 Patient CompartmentDefinition as data: which resource types can be in a patient's
//! compartment, and through which search parameters. Transcribed from FHIR 4.0.1's
//! `CompartmentDefinition/patient` (<https://hl7.org/fhir/R4/compartmentdefinition-patient.html>,
//! canonical URL [`PATIENT_COMPARTMENT_URL`]); types the definition lists without parameters
//! are never in the compartment and are left out.
//!
//! "A resource is in this compartment if the nominated search parameter (or chain) refers to
//! the patient resource that defines the compartment" (ibid.). `Patient` itself is in its own
//! compartment by identity; the `link` entry adds other Patients that link to it.

/// The canonical URL of the definition transcribed here.
pub const PATIENT_COMPARTMENT_URL: &str = "http://hl7.org/fhir/CompartmentDefinition/patient";

/// `(resource type, search parameters)` of every type that can be in a Patient compartment,
/// in the definition's order.
pub const PATIENT_COMPARTMENT: &[(&str, &[&str])] = &[
    ("Account", &["subject"]),
    ("AdverseEvent", &["subject"]),
    ("AllergyIntolerance", &["patient", "recorder", "asserter"]),
    ("Appointment", &["actor"]),
    ("AppointmentResponse", &["actor"]),
    ("AuditEvent", &["patient"]),
    ("Basic", &["patient", "author"]),
    ("BodyStructure", &["patient"]),
    ("CarePlan", &["patient", "performer"]),
    ("CareTeam", &["patient", "participant"]),
    ("ChargeItem", &["subject"]),
    ("Claim", &["patient", "payee"]),
    ("ClaimResponse", &["patient"]),
    ("ClinicalImpression", &["subject"]),
    ("Communication", &["subject", "sender", "recipient"]),
    (
        "CommunicationRequest",
        &["subject", "sender", "recipient", "requester"],
    ),
    ("Composition", &["subject", "author", "attester"]),
    ("Condition", &["patient", "asserter"]),
    ("Consent", &["patient"]),
    (
        "Coverage",
        &["policy-holder", "subscriber", "beneficiary", "payor"],
    ),
    ("CoverageEligibilityRequest", &["patient"]),
    ("CoverageEligibilityResponse", &["patient"]),
    ("DetectedIssue", &["patient"]),
    ("DeviceRequest", &["subject", "performer"]),
    ("DeviceUseStatement", &["subject"]),
    ("DiagnosticReport", &["subject"]),
    ("DocumentManifest", &["subject", "author", "recipient"]),
    ("DocumentReference", &["subject", "author"]),
    ("Encounter", &["patient"]),
    ("EnrollmentRequest", &["subject"]),
    ("EpisodeOfCare", &["patient"]),
    ("ExplanationOfBenefit", &["patient", "payee"]),
    ("FamilyMemberHistory", &["patient"]),
    ("Flag", &["patient"]),
    ("Goal", &["patient"]),
    ("Group", &["member"]),
    ("ImagingStudy", &["patient"]),
    ("Immunization", &["patient"]),
    ("ImmunizationEvaluation", &["patient"]),
    ("ImmunizationRecommendation", &["patient"]),
    ("Invoice", &["subject", "patient", "recipient"]),
    ("List", &["subject", "source"]),
    ("MeasureReport", &["patient"]),
    ("Media", &["subject"]),
    (
        "MedicationAdministration",
        &["patient", "performer", "subject"],
    ),
    ("MedicationDispense", &["subject", "patient", "receiver"]),
    ("MedicationRequest", &["subject"]),
    ("MedicationStatement", &["subject"]),
    ("MolecularSequence", &["patient"]),
    ("NutritionOrder", &["patient"]),
    ("Observation", &["subject", "performer"]),
    ("Patient", &["link"]),
    ("Person", &["patient"]),
    ("Procedure", &["patient", "performer"]),
    ("Provenance", &["patient"]),
    ("QuestionnaireResponse", &["subject", "author"]),
    ("RelatedPerson", &["patient"]),
    ("RequestGroup", &["subject", "participant"]),
    ("ResearchSubject", &["individual"]),
    ("RiskAssessment", &["subject"]),
    ("Schedule", &["actor"]),
    ("ServiceRequest", &["subject", "performer"]),
    ("Specimen", &["subject"]),
    ("SupplyDelivery", &["patient"]),
    ("SupplyRequest", &["subject"]),
    ("VisionPrescription", &["patient"]),
];

/// The parameters linking `resource_type` to a patient, empty when the type is never in a
/// Patient compartment.
pub fn patient_compartment_params(resource_type: &str) -> &'static [&'static str] {
    PATIENT_COMPARTMENT
        .iter()
        .find(|(t, _)| *t == resource_type)
        .map_or(&[], |(_, params)| params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::ResourceTypes;
    use crate::fhir::search_params::{ParamType, SearchParamRegistry};

    /// Every entry names a supported type and one of its R4 reference parameters that may
    /// point at a Patient, so a transcription slip cannot silently shrink a compartment.
    #[test]
    fn every_entry_is_a_reference_parameter_that_can_point_at_a_patient() {
        let registry = SearchParamRegistry::load().unwrap();
        let types = ResourceTypes::load().unwrap();
        for (resource_type, params) in PATIENT_COMPARTMENT {
            assert!(types.resolve(resource_type).is_ok(), "{resource_type}");
            for param in *params {
                let def = registry
                    .get(resource_type, param)
                    .unwrap_or_else(|| panic!("{resource_type}.{param}"));
                assert_eq!(
                    def.param_type,
                    ParamType::Reference,
                    "{resource_type}.{param}"
                );
                assert!(
                    def.target.iter().any(|t| t == "Patient" || t == "Resource"),
                    "{resource_type}.{param} cannot refer to a Patient"
                );
            }
        }
        assert_eq!(
            patient_compartment_params("AllergyIntolerance"),
            ["patient", "recorder", "asserter"]
        );
        assert!(patient_compartment_params("Practitioner").is_empty());
    }
}
