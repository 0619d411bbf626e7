//! Validation of incoming resources against the R4 definitions (through fhir-sdk's R4B
//! model), including what the model alone lets through: elements the definition does not
//! have, empty values and `null`s, which R4's JSON format forbids
//! (<https://hl7.org/fhir/R4/json.html>).

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::outcome::IssueCode;
use super::resource_types::{ResourceType, ResourceTypes};

/// The first problem found in a submitted resource.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ValidationError {
    pub code: IssueCode,
    /// FHIRPath-like location of the problem (`Patient.name[0].given`), when known.
    pub expression: Option<String>,
    pub message: String,
}

impl ValidationError {
    fn new(code: IssueCode, expression: Option<String>, message: impl Into<String>) -> Self {
        Self {
            code,
            expression,
            message: message.into(),
        }
    }
}

/// A resource that passed validation, with its body in compact JSON exactly as the client
/// wrote it (numbers keep their written form, e.g. `1.50`).
#[derive(Debug, Clone)]
pub struct ValidatedResource {
    pub resource_type: ResourceType,
    /// The `id` element of the body, if any.
    pub id: Option<String>,
    pub compact_json: String,
}

/// Parses and validates a request body that must be a resource of `expected` type.
pub fn validate_resource(
    types: &ResourceTypes,
    expected: &ResourceType,
    body: &[u8],
) -> Result<ValidatedResource, ValidationError> {
    let text = std::str::from_utf8(body).map_err(|_| {
        ValidationError::new(IssueCode::Structure, None, "the body is not valid UTF-8")
    })?;
    let value: Value = serde_json::from_str(text).map_err(|e| {
        ValidationError::new(IssueCode::Structure, None, format!("malformed JSON: {e}"))
    })?;
    let Value::Object(object) = &value else {
        return Err(ValidationError::new(
            IssueCode::Structure,
            None,
            "the body must be a JSON object",
        ));
    };
    let declared = match object.get("resourceType") {
        Some(Value::String(name)) => name,
        Some(_) => {
            return Err(ValidationError::new(
                IssueCode::Structure,
                Some("resourceType".into()),
                "resourceType must be a string",
            ));
        }
        None => {
            return Err(ValidationError::new(
                IssueCode::Required,
                Some("resourceType".into()),
                "the body has no resourceType",
            ));
        }
    };
    if declared != expected.as_str() {
        return Err(ValidationError::new(
            IssueCode::Invalid,
            Some("resourceType".into()),
            format!(
                "resourceType '{}' does not match the type '{expected}' in the URL",
                truncate(declared)
            ),
        ));
    }
    let resource_type = types.resolve(declared).map_err(|e| {
        ValidationError::new(
            IssueCode::NotSupported,
            Some("resourceType".into()),
            e.to_string(),
        )
    })?;

    check_json_form(&value, expected.as_str())?;
    let normalized = round_trip_through_model(expected.as_str(), &value)?;
    find_unknown_element(&value, &normalized, expected.as_str())?;

    let id = match object.get("id") {
        Some(Value::String(id)) => Some(id.clone()),
        _ => None,
    };
    Ok(ValidatedResource {
        resource_type,
        id,
        compact_json: compact(text),
    })
}

/// R4 JSON rules the model does not enforce: no empty strings, objects or arrays, and no
/// `null` except as an array placeholder (primitive extensions, json.html §2.6.2).
fn check_json_form(value: &Value, path: &str) -> Result<(), ValidationError> {
    match value {
        Value::String(s) if s.is_empty() => Err(ValidationError::new(
            IssueCode::Value,
            Some(path.to_owned()),
            "empty strings are not allowed; leave the element out instead",
        )),
        Value::Object(map) => {
            if map.is_empty() {
                return Err(ValidationError::new(
                    IssueCode::Structure,
                    Some(path.to_owned()),
                    "empty objects are not allowed",
                ));
            }
            for (key, child) in map {
                let child_path = format!("{path}.{key}");
                if child.is_null() {
                    return Err(ValidationError::new(
                        IssueCode::Structure,
                        Some(child_path),
                        "null is not allowed as an element value",
                    ));
                }
                check_json_form(child, &child_path)?;
            }
            Ok(())
        }
        Value::Array(items) => {
            if items.is_empty() {
                return Err(ValidationError::new(
                    IssueCode::Structure,
                    Some(path.to_owned()),
                    "empty arrays are not allowed",
                ));
            }
            if items.iter().all(Value::is_null) {
                return Err(ValidationError::new(
                    IssueCode::Structure,
                    Some(path.to_owned()),
                    "an array may use null only as a placeholder beside real values",
                ));
            }
            for (index, item) in items.iter().enumerate() {
                if !item.is_null() {
                    check_json_form(item, &format!("{path}[{index}]"))?;
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Deserializes into the model type and serializes back; returns what the model kept.
fn round_trip<T: DeserializeOwned + Serialize>(
    root: &str,
    value: &Value,
) -> Result<Value, ValidationError> {
    // Tracking the path costs on every element; it is only needed to report a failure.
    let model = match T::deserialize(value) {
        Ok(model) => model,
        Err(_) => return Err(model_error::<T>(root, value)),
    };
    serde_json::to_value(&model)
        .map_err(|e| ValidationError::new(IssueCode::Value, Some(root.to_owned()), e.to_string()))
}

/// Why `value` does not deserialize into the model type, with the path of the failure.
fn model_error<T: DeserializeOwned>(root: &str, value: &Value) -> ValidationError {
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(_) => ValidationError::new(
            IssueCode::Value,
            Some(root.to_owned()),
            "the resource does not match its R4 definition",
        ),
        Err(e) => {
            let path = e.path().to_string();
            let expression = if path == "." {
                root.to_owned()
            } else {
                format!("{root}.{path}")
            };
            let message = e.into_inner().to_string();
            let code = if message.starts_with("missing field") {
                IssueCode::Required
            } else if message.starts_with("unknown variant") || message.starts_with("Unknown value")
            {
                IssueCode::CodeInvalid
            } else {
                IssueCode::Value
            };
            ValidationError::new(code, Some(expression), message)
        }
    }
}

/// Finds the first element of `sent` that the model dropped: fhir-sdk ignores elements
/// its definition does not have, and R4 says those make the resource invalid.
fn find_unknown_element(sent: &Value, kept: &Value, path: &str) -> Result<(), ValidationError> {
    match first_dropped(sent, kept) {
        None => Ok(()),
        Some(dropped) => {
            let mut expression = path.to_owned();
            for step in dropped.iter().rev() {
                match step {
                    Step::Key(key) => {
                        expression.push('.');
                        expression.push_str(key);
                    }
                    Step::Index(index) => expression.push_str(&format!("[{index}]")),
                }
            }
            let key = match dropped.first() {
                Some(Step::Key(key)) => *key,
                _ => "",
            };
            Err(ValidationError::new(
                IssueCode::Structure,
                Some(expression),
                format!(
                    "unknown element '{}': the R4 definition has no such element here",
                    truncate(key)
                ),
            ))
        }
    }
}

/// One step of a path into JSON.
enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

/// The path, innermost step first, to the first element of `sent` missing from `kept`
/// (paths are only spelled out for the one that is reported).
fn first_dropped<'a>(sent: &'a Value, kept: &Value) -> Option<Vec<Step<'a>>> {
    match (sent, kept) {
        (Value::Object(sent), Value::Object(kept)) => {
            for (key, sent_child) in sent {
                let Some(kept_child) = kept.get(key) else {
                    return Some(vec![Step::Key(key)]);
                };
                if let Some(mut path) = first_dropped(sent_child, kept_child) {
                    path.push(Step::Key(key));
                    return Some(path);
                }
            }
            None
        }
        (Value::Array(sent), Value::Array(kept)) => {
            for (index, (s, k)) in sent.iter().zip(kept).enumerate() {
                if let Some(mut path) = first_dropped(s, k) {
                    path.push(Step::Index(index));
                    return Some(path);
                }
            }
            None
        }
        _ => None,
    }
}

/// Removes the insignificant whitespace of valid JSON text, leaving every token (and so
/// every number's written form) untouched.
pub fn compact(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let mut in_string = false;
    let mut escaped = false;
    for c in json.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !matches!(c, ' ' | '\t' | '\n' | '\r') {
            out.push(c);
        }
    }
    out
}

/// Bounds what of a client's text is echoed back in a message.
fn truncate(text: &str) -> String {
    const MAX: usize = 64;
    if text.chars().count() <= MAX {
        text.to_owned()
    } else {
        format!("{}…", text.chars().take(MAX).collect::<String>())
    }
}

/// Calls [`round_trip`] with the model type named `resource_type`.
macro_rules! model_round_trip {
    ($($name:ident),* $(,)?) => {
        fn round_trip_through_model(resource_type: &str, value: &Value) -> Result<Value, ValidationError> {
            use fhir_sdk::r4b::resources as model;
            match resource_type {
                $(stringify!($name) => round_trip::<model::$name>(resource_type, value),)*
                other => Err(ValidationError::new(
                    IssueCode::NotSupported,
                    Some("resourceType".into()),
                    format!("no model to validate '{}' against", truncate(other)),
                )),
            }
        }

        #[cfg(test)]
        const MODEL_TYPES: &[&str] = &[$(stringify!($name)),*];
    };
}

// Every type listed as supported in schema/resource-types.json (a test keeps them equal).
model_round_trip!(
    Account,
    ActivityDefinition,
    AdverseEvent,
    AllergyIntolerance,
    Appointment,
    AppointmentResponse,
    AuditEvent,
    Basic,
    Binary,
    BiologicallyDerivedProduct,
    BodyStructure,
    Bundle,
    CapabilityStatement,
    CarePlan,
    CareTeam,
    CatalogEntry,
    ChargeItem,
    ChargeItemDefinition,
    Claim,
    ClaimResponse,
    ClinicalImpression,
    CodeSystem,
    Communication,
    CommunicationRequest,
    CompartmentDefinition,
    Composition,
    ConceptMap,
    Condition,
    Consent,
    Contract,
    Coverage,
    CoverageEligibilityRequest,
    CoverageEligibilityResponse,
    DetectedIssue,
    Device,
    DeviceDefinition,
    DeviceMetric,
    DeviceRequest,
    DeviceUseStatement,
    DiagnosticReport,
    DocumentManifest,
    DocumentReference,
    Encounter,
    Endpoint,
    EnrollmentRequest,
    EnrollmentResponse,
    EpisodeOfCare,
    EventDefinition,
    ExampleScenario,
    ExplanationOfBenefit,
    FamilyMemberHistory,
    Flag,
    Goal,
    GraphDefinition,
    Group,
    GuidanceResponse,
    HealthcareService,
    ImagingStudy,
    Immunization,
    ImmunizationEvaluation,
    ImmunizationRecommendation,
    ImplementationGuide,
    InsurancePlan,
    Invoice,
    Library,
    Linkage,
    List,
    Location,
    Measure,
    MeasureReport,
    Media,
    Medication,
    MedicationAdministration,
    MedicationDispense,
    MedicationKnowledge,
    MedicationRequest,
    MedicationStatement,
    MessageDefinition,
    MessageHeader,
    MolecularSequence,
    NamingSystem,
    NutritionOrder,
    Observation,
    ObservationDefinition,
    OperationDefinition,
    OperationOutcome,
    Organization,
    OrganizationAffiliation,
    Parameters,
    Patient,
    PaymentNotice,
    PaymentReconciliation,
    Person,
    PlanDefinition,
    Practitioner,
    PractitionerRole,
    Procedure,
    Provenance,
    Questionnaire,
    QuestionnaireResponse,
    RelatedPerson,
    RequestGroup,
    ResearchDefinition,
    ResearchElementDefinition,
    ResearchStudy,
    ResearchSubject,
    RiskAssessment,
    Schedule,
    SearchParameter,
    ServiceRequest,
    Slot,
    Specimen,
    SpecimenDefinition,
    StructureDefinition,
    StructureMap,
    Subscription,
    Substance,
    SupplyDelivery,
    SupplyRequest,
    Task,
    TerminologyCapabilities,
    TestReport,
    TestScript,
    ValueSet,
    VerificationResult,
    VisionPrescription
);

#[cfg(test)]
mod tests {
    use super::*;

    fn patient_type() -> (ResourceTypes, ResourceType) {
        let types = ResourceTypes::load().unwrap();
        let patient = types.resolve("Patient").unwrap();
        (types, patient)
    }

    fn check(body: &str) -> Result<ValidatedResource, ValidationError> {
        let (types, patient) = patient_type();
        validate_resource(&types, &patient, body.as_bytes())
    }

    #[test]
    fn every_supported_type_has_a_model() {
        let types = ResourceTypes::load().unwrap();
        let supported: Vec<&str> = types.iter().collect();
        let mut models = MODEL_TYPES.to_vec();
        models.sort_unstable();
        assert_eq!(supported, models);
    }

    #[test]
    fn valid_patient_keeps_its_written_numbers() {
        let body = r#"{ "resourceType": "Patient", "id": "p1",
            "extension": [{"url": "http://example.org/w", "valueDecimal": 1.50}],
            "name": [{"family": "Chalmers", "given": ["Peter", "James"]}] }"#;
        let validated = check(body).unwrap();
        assert_eq!(validated.id.as_deref(), Some("p1"));
        assert!(validated.compact_json.contains("\"valueDecimal\":1.50"));
        assert!(
            validated
                .compact_json
                .contains("\"given\":[\"Peter\",\"James\"]")
        );
    }

    #[test]
    fn unknown_element_is_reported_with_its_path() {
        let err = check(r#"{"resourceType":"Patient","name":[{"family":"X","nickname":"Y"}]}"#)
            .unwrap_err();
        assert_eq!(err.expression.as_deref(), Some("Patient.name[0].nickname"));
        let err = check(r#"{"resourceType":"Patient","colour":"blue"}"#).unwrap_err();
        assert_eq!(err.expression.as_deref(), Some("Patient.colour"));
    }

    #[test]
    fn wrong_types_and_codes_are_reported_with_their_path() {
        let err = check(r#"{"resourceType":"Patient","gender":"sometimes"}"#).unwrap_err();
        assert_eq!(err.expression.as_deref(), Some("Patient.gender"));
        let err = check(r#"{"resourceType":"Patient","active":"yes"}"#).unwrap_err();
        assert_eq!(err.expression.as_deref(), Some("Patient.active"));
    }

    #[test]
    fn json_form_rules() {
        assert!(check(r#"{"resourceType":"Patient","name":[]}"#).is_err());
        assert!(check(r#"{"resourceType":"Patient","gender":""}"#).is_err());
        assert!(check(r#"{"resourceType":"Patient","gender":null}"#).is_err());
        assert!(check(r#"{"resourceType":"Patient","name":[{}]}"#).is_err());
        assert!(check(r#"{"resourceType":"Patient""#).is_err());
        assert!(check(r#"[]"#).is_err());
        // null as an array placeholder beside a primitive extension is valid R4 JSON.
        check(
            r#"{"resourceType":"Patient","name":[{"given":["A","B"],
            "_given":[null,{"extension":[{"url":"http://e.org/x","valueString":"v"}]}]}]}"#,
        )
        .unwrap();
    }

    #[test]
    fn resource_type_must_match() {
        let err = check(r#"{"resourceType":"Observation","status":"final","code":{"text":"x"}}"#)
            .unwrap_err();
        assert_eq!(err.expression.as_deref(), Some("resourceType"));
        assert!(check(r#"{"id":"x"}"#).is_err());
    }

    #[test]
    fn compact_keeps_strings_and_numbers() {
        assert_eq!(
            compact("{ \"a\" : \"b c\\\" d\" ,\n \"n\": 1.50 }"),
            "{\"a\":\"b c\\\" d\",\"n\":1.50}"
        );
    }
}
