//! The CapabilityStatement (`GET /fhir/metadata`): generated from the resource-type registry
//! so that it lists exactly what the server does.

use serde_json::{Value, json};

use super::resource_types::ResourceTypes;

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

pub struct CapabilityInputs<'a> {
    pub base_url: &'a str,
    pub software_version: &'a str,
    /// When this server instance started (RFC 3339), used as the statement's date.
    pub date: &'a str,
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
                "conditionalCreate": false,
                "conditionalRead": "not-supported",
                "conditionalUpdate": false,
                "conditionalDelete": "not-supported",
                "referencePolicy": ["literal", "logical"],
            })
        })
        .collect();
    json!({
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
            "documentation": "Resources are stored encrypted (AES-256-GCM). JSON only. PATCH takes JSON Patch (application/json-patch+json).",
            "resource": resources,
            "interaction": [{"code": "history-system"}],
        }],
    })
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
}
