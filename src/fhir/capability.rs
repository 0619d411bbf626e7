//! The CapabilityStatement (`GET /fhir/metadata`): generated from the resource-type registry
//! so that it lists exactly what the server does.

use serde_json::{Value, json};

use super::resource_types::ResourceTypes;
use super::search_params::{ParamType, SearchParamRegistry};
use super::search_values::IndexPlan;

/// Interactions every supported type offers (http.html).
const TYPE_INTERACTIONS: &[&str] = &[
    "read",
    "vread",
    "update",
    "patch",
    "delete",
    "history-instance",
    "history-type",
    "create",
];

/// The identity provider's OAuth endpoints the statement names (SMART App Launch 1.0's
/// `oauth-uris`); `None` for an endpoint the provider does not offer.
#[derive(Debug, Clone, Copy)]
pub struct OAuthEndpoints<'a> {
    pub authorize: Option<&'a str>,
    pub token: &'a str,
    pub register: Option<&'a str>,
    pub manage: Option<&'a str>,
    pub introspect: Option<&'a str>,
    pub revoke: Option<&'a str>,
}

pub struct CapabilityInputs<'a> {
    pub base_url: &'a str,
    pub software_version: &'a str,
    /// When this server instance started (RFC 3339), used as the statement's date.
    pub date: &'a str,
    /// The trusted identity provider's OAuth endpoints, when configured.
    pub oauth: Option<OAuthEndpoints<'a>>,
    /// Whether CORS is on (origins configured).
    pub cors: bool,
}

pub fn capability_statement(types: &ResourceTypes, inputs: &CapabilityInputs<'_>) -> Value {
    let resources: Vec<Value> = types
        .iter()
        .map(|name| {
            json!({
                "type": name,
                "profile": format!("http://hl7.org/fhir/StructureDefinition/{name}"),
                "interaction": TYPE_INTERACTIONS.iter().map(|code| json!({"code": code})).collect::<Vec<_>>(),
                "versioning": "versioned-update",
                "readHistory": true,
                "updateCreate": true,
                "conditionalCreate": true,
                "conditionalRead": "full-support",
                "conditionalUpdate": true,
                "conditionalDelete": "single",
                "referencePolicy": ["literal", "logical"],
            })
        })
        .collect();
    let mut statement = json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": inputs.date,
        "publisher": "fhirledger",
        "kind": "instance",
        "software": {"name": "fhirledger", "version": inputs.software_version},
        "implementation": {
            "description": "fhirledger: FHIR R4 server with encrypted storage",
            "url": format!("{}/fhir", inputs.base_url),
        },
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [{
            "mode": "server",
            "documentation": "Resources are stored encrypted (AES-256-GCM); search runs over keyed blind indexes. JSON only. PATCH takes JSON Patch (application/json-patch+json) or FHIRPath Patch (a Parameters resource). Conditional create, update and delete; transaction and batch Bundles resolve urn:uuid and conditional (Type?query) references.",
            "security": {
                "service": [{"coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                    "code": "SMART-on-FHIR",
                }]}],
                "description": "Bearer JWTs from trusted issuers; SMART v1/v2 scopes (system/, patient/ confined to the patient's compartment, user/ confined by Consent), ledger.read for the ledger API. See /.well-known/smart-configuration.",
                "cors": inputs.cors,
            },
            "resource": resources,
            "interaction": [
                {"code": "transaction"},
                {"code": "batch"},
                {"code": "history-system"},
            ],
            // Searched as `Patient/{id}/{type}` (search.html#compartments).
            "compartment": ["http://hl7.org/fhir/CompartmentDefinition/patient"],
        }],
    });
    // SMART endpoints only when configured: without them the statement claims none.
    if let Some(oauth) = &inputs.oauth {
        statement["rest"][0]["security"]["extension"] = json!([oauth_uris(oauth)]);
    }
    statement
}

/// The SMART extension listing OAuth endpoints in `rest.security` (SMART App Launch 2.x,
/// conformance.html: still published for clients of 1.0).
pub const OAUTH_URIS_EXTENSION: &str =
    "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris";

/// The `oauth-uris` extension of `rest.security`, naming the identity provider's endpoints.
/// Only configured endpoints are listed: an invented URL would be worse than none.
fn oauth_uris(oauth: &OAuthEndpoints<'_>) -> Value {
    let uris: Vec<Value> = [
        ("authorize", oauth.authorize),
        ("token", Some(oauth.token)),
        ("register", oauth.register),
        ("manage", oauth.manage),
        ("introspect", oauth.introspect),
        ("revoke", oauth.revoke),
    ]
    .into_iter()
    .filter_map(|(name, uri)| uri.map(|uri| json!({"url": name, "valueUri": uri})))
    .collect();
    json!({"url": OAUTH_URIS_EXTENSION, "extension": uris})
}

/// The definition of Patient `$everything` (patient-operation-everything.html).
pub const PATIENT_EVERYTHING_DEFINITION: &str =
    "http://hl7.org/fhir/OperationDefinition/Patient-everything";

/// Adds what search serves to a statement from [`capability_statement`]: per type the
/// `search-type` interaction, a `searchParam` for each parameter the index answers (`_id`,
/// `_lastUpdated` and [`IndexPlan::params`]; composite and special ones are not indexed and
/// so not listed), and the `Type:param` references usable with `_include`/`_revinclude`;
/// at rest level `search-system` with `_id` and `_lastUpdated`; and Patient `$everything`.
/// Result controls (`_count`, `_sort`, …) are not search parameters and are not listed.
pub fn describe_search(statement: &mut Value, registry: &SearchParamRegistry, plan: &IndexPlan) {
    let Some(rest) = statement
        .get_mut("rest")
        .and_then(|r| r.get_mut(0))
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    let Some(resources) = rest.get_mut("resource").and_then(Value::as_array_mut) else {
        return;
    };
    let types: Vec<String> = resources
        .iter()
        .filter_map(|r| r["type"].as_str().map(str::to_owned))
        .collect();
    // `_revinclude` sources of each target type: every indexed reference parameter of any
    // type, under each type it may point at.
    let mut revincludes: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
    for source in types.iter().filter(|t| *t != AUDIT_EVENT) {
        for (code, _) in reference_params(plan, source) {
            let Some(def) = registry.get(source, code) else {
                continue;
            };
            for target in &types {
                if def.target.iter().any(|t| t == target || t == "Resource") {
                    revincludes
                        .entry(target.as_str())
                        .or_default()
                        .push(format!("{source}:{code}"));
                }
            }
        }
    }
    for resource in resources.iter_mut() {
        let Some(name) = resource["type"].as_str().map(str::to_owned) else {
            continue;
        };
        let Some(object) = resource.as_object_mut() else {
            continue;
        };
        if name == AUDIT_EVENT {
            describe_audit_events(object, registry);
            continue;
        }
        if let Some(interactions) = object.get_mut("interaction").and_then(Value::as_array_mut) {
            interactions.push(json!({"code": "search-type"}));
        }
        let params: Vec<Value> = plan
            .params(&name)
            .filter_map(|(code, param_type)| search_param(registry, &name, code, param_type))
            .collect();
        object.insert("searchParam".into(), Value::Array(params));
        let includes: Vec<String> = reference_params(plan, &name)
            .map(|(code, _)| format!("{name}:{code}"))
            .collect();
        object.insert("searchInclude".into(), json!(includes));
        object.insert(
            "searchRevInclude".into(),
            json!(revincludes.remove(name.as_str()).unwrap_or_default()),
        );
        if name == "Patient" {
            object.insert(
                "operation".into(),
                json!([{"name": "everything", "definition": PATIENT_EVERYTHING_DEFINITION}]),
            );
        }
    }
    if let Some(interactions) = rest.get_mut("interaction").and_then(Value::as_array_mut) {
        interactions.push(json!({"code": "search-system"}));
    }
    let system_params: Vec<Value> = ["_id", "_lastUpdated"]
        .into_iter()
        .filter_map(|code| {
            let def = registry.get("Resource", code)?;
            search_param(registry, "Resource", code, def.param_type)
        })
        .collect();
    rest.insert("searchParam".into(), Value::Array(system_params));
}

/// The Bulk Data Access IG's operation definitions (bulk-data 2.0.0).
pub const BULK_EXPORT_DEFINITION: &str =
    "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export";
pub const PATIENT_EXPORT_DEFINITION: &str =
    "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export";
pub const GROUP_EXPORT_DEFINITION: &str =
    "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export";

/// Adds bulk export to a statement from [`capability_statement`]: the IG's server
/// capability in `instantiates`, `$export` at the system level, on Patient and on Group.
pub fn describe_bulk_export(statement: &mut Value) {
    let Some(object) = statement.as_object_mut() else {
        return;
    };
    object.insert(
        "instantiates".into(),
        json!(["http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"]),
    );
    let Some(rest) = object
        .get_mut("rest")
        .and_then(|r| r.get_mut(0))
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    let operations = rest.entry("operation").or_insert_with(|| json!([]));
    if let Some(list) = operations.as_array_mut() {
        list.push(json!({"name": "export", "definition": BULK_EXPORT_DEFINITION}));
    }
    for resource in rest
        .get_mut("resource")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
    {
        let definition = match resource["type"].as_str() {
            Some("Patient") => PATIENT_EXPORT_DEFINITION,
            Some("Group") => GROUP_EXPORT_DEFINITION,
            _ => continue,
        };
        let Some(object) = resource.as_object_mut() else {
            continue;
        };
        let operations = object.entry("operation").or_insert_with(|| json!([]));
        if let Some(list) = operations.as_array_mut() {
            list.push(json!({"name": "export", "definition": definition}));
        }
    }
}

const AUDIT_EVENT: &str = "AuditEvent";

/// AuditEvents are generated from the ledger: searched through their own parameters only,
/// never read by id, written or included.
fn describe_audit_events(
    object: &mut serde_json::Map<String, Value>,
    registry: &SearchParamRegistry,
) {
    object.insert("interaction".into(), json!([{"code": "search-type"}]));
    object.insert(
        "documentation".into(),
        json!(
            "Generated from the ledger: the accesses to a patient's compartment, each with its \
               ledger entry and inclusion proof (extension ledger-entry). Read-only."
        ),
    );
    let mut params: Vec<Value> = [
        ("patient", ParamType::Reference),
        ("entity", ParamType::Reference),
        ("agent", ParamType::Reference),
        ("date", ParamType::Date),
        ("outcome", ParamType::Token),
    ]
    .into_iter()
    .filter_map(|(code, param_type)| search_param(registry, AUDIT_EVENT, code, param_type))
    .collect();
    // R4 has no parameter for the agent's purpose of use; R5 defines this one, which an
    // auditor uses to list break-the-glass accesses (`purpose=ETREAT`).
    params.push(json!({
        "name": "purpose",
        "definition": "http://hl7.org/fhir/SearchParameter/AuditEvent-purpose",
        "type": "token",
        "documentation": "The purpose of use the actor's token stated (R5's AuditEvent purpose)",
    }));
    object.insert("searchParam".into(), Value::Array(params));
    object.insert("searchInclude".into(), json!([]));
    object.insert("searchRevInclude".into(), json!([]));
    for unsupported in [
        "versioning",
        "conditionalCreate",
        "conditionalUpdate",
        "conditionalDelete",
        "readHistory",
        "updateCreate",
    ] {
        object.remove(unsupported);
    }
}

fn reference_params<'a>(
    plan: &'a IndexPlan,
    resource_type: &str,
) -> impl Iterator<Item = (&'a str, ParamType)> {
    plan.params(resource_type)
        .filter(|(_, param_type)| *param_type == ParamType::Reference)
}

/// One `rest.resource.searchParam` (or `rest.searchParam`) entry.
fn search_param(
    registry: &SearchParamRegistry,
    resource_type: &str,
    code: &str,
    param_type: ParamType,
) -> Option<Value> {
    let def = registry.get(resource_type, code)?;
    Some(json!({
        "name": code,
        "definition": def.url,
        "type": param_type_code(param_type),
    }))
}

/// The `SearchParamType` code (valueset-search-param-type).
fn param_type_code(param_type: ParamType) -> &'static str {
    match param_type {
        ParamType::Number => "number",
        ParamType::Date => "date",
        ParamType::String => "string",
        ParamType::Token => "token",
        ParamType::Reference => "reference",
        ParamType::Composite => "composite",
        ParamType::Quantity => "quantity",
        ParamType::Uri => "uri",
        ParamType::Special => "special",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_every_supported_type_and_no_removed_one() {
        let types = ResourceTypes::load().unwrap();
        let statement = capability_statement(
            &types,
            &CapabilityInputs {
                base_url: "http://x",
                software_version: "0",
                date: "2026-01-01T00:00:00Z",
                oauth: None,
                cors: false,
            },
        );
        assert_eq!(statement["fhirVersion"], "4.0.1");
        let listed: Vec<&str> = statement["rest"][0]["resource"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["type"].as_str().unwrap())
            .collect();
        assert_eq!(listed, types.iter().collect::<Vec<_>>());
        assert!(!listed.contains(&"MedicinalProduct"));
        assert!(!listed.contains(&"EffectEvidenceSynthesis"));
    }

    #[test]
    fn lists_exactly_the_indexed_search_parameters() {
        let types = ResourceTypes::load().unwrap();
        let registry = SearchParamRegistry::load().unwrap();
        let plan = IndexPlan::new(&registry);
        let mut statement = capability_statement(
            &types,
            &CapabilityInputs {
                base_url: "http://x",
                software_version: "0",
                date: "2026-01-01T00:00:00Z",
                oauth: None,
                cors: false,
            },
        );
        describe_search(&mut statement, &registry, &plan);
        let rest = &statement["rest"][0];
        let resource = |name: &str| {
            rest["resource"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["type"] == name)
                .unwrap()
                .clone()
        };
        let names = |resource: &Value| -> Vec<String> {
            resource["searchParam"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["name"].as_str().unwrap().to_owned())
                .collect()
        };
        let patient = resource("Patient");
        let listed = names(&patient);
        for name in ["_id", "_lastUpdated", "family", "birthdate", "identifier"] {
            assert!(listed.iter().any(|n| n == name), "{name}: {listed:?}");
        }
        let birthdate = patient["searchParam"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "birthdate")
            .unwrap();
        assert_eq!(birthdate["type"], "date");
        assert_eq!(
            birthdate["definition"],
            "http://hl7.org/fhir/SearchParameter/individual-birthdate"
        );
        // Controls are not parameters; `_text`/`_content` are not indexed.
        for name in ["_count", "_sort", "_include", "_text", "_content"] {
            assert!(!listed.iter().any(|n| n == name), "{name}");
        }
        // No special parameter on any type; composites only where the index answers them.
        let mut composites = 0;
        for resource in rest["resource"].as_array().unwrap() {
            let name = resource["type"].as_str().unwrap();
            for param in resource["searchParam"].as_array().unwrap() {
                assert_ne!(param["type"], "special", "{name}: {param}");
                let code = param["name"].as_str().unwrap();
                // The one parameter R4 does not define: the AuditEvent view's R5 `purpose`.
                let Some(def) = registry.get(name, code) else {
                    assert_eq!((name, code), ("AuditEvent", "purpose"));
                    continue;
                };
                assert_ne!(def.param_type, ParamType::Special, "{name}.{code}");
                if param["type"] == "composite" {
                    assert_eq!(def.param_type, ParamType::Composite, "{name}.{code}");
                    assert!(plan.components(name, code).is_some(), "{name}.{code}");
                    composites += 1;
                }
            }
            assert!(
                resource["interaction"]
                    .as_array()
                    .unwrap()
                    .contains(&json!({"code": "search-type"}))
            );
        }
        // 8 on Observation, Group's, DocumentReference's and context-type-value on 25 types.
        assert_eq!(composites, 8 + 1 + 1 + 25);
        let observation = names(&resource("Observation"));
        for code in [
            "code-value-quantity",
            "component-code-value-quantity",
            "combo-code-value-quantity",
            "code-value-concept",
            "component-code-value-concept",
            "combo-code-value-concept",
            "code-value-date",
            "code-value-string",
        ] {
            assert!(observation.iter().any(|n| n == code), "{code}");
        }
        assert!(observation.iter().any(|n| n == "code"));
        // Left out: two numbers per node, and quantities that may be Ranges.
        let sequence = names(&resource("MolecularSequence"));
        assert!(!sequence.iter().any(|n| n.ends_with("-coordinate")));
        let value_set = names(&resource("ValueSet"));
        assert!(value_set.iter().any(|n| n == "context-type-value"));
        assert!(!value_set.iter().any(|n| n == "context-type-quantity"));
        let includes = resource("Observation")["searchInclude"].clone();
        assert!(
            includes
                .as_array()
                .unwrap()
                .contains(&json!("Observation:subject"))
        );
        let revincludes = patient["searchRevInclude"].as_array().unwrap();
        assert!(revincludes.contains(&json!("Observation:subject")));
        assert!(revincludes.contains(&json!("AllergyIntolerance:patient")));
        assert_eq!(
            patient["operation"][0]["definition"],
            PATIENT_EVERYTHING_DEFINITION
        );
        assert!(
            rest["interaction"]
                .as_array()
                .unwrap()
                .contains(&json!({"code": "search-system"}))
        );
    }
}
