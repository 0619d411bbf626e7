//! The per-type paths of the OpenAPI document: for every supported type its create, read,
//! update, patch, delete and search, the search with the parameters the CapabilityStatement
//! lists for that type (the same definitions build both), so that a client generated from
//! `/openapi.json` can call and search each type by name.

use serde_json::{Map, Value, json};

use crate::fhir::ResourceTypes;
use crate::fhir::capability::{CapabilityInputs, capability_statement, describe_search};
use crate::fhir::search_params::SearchParamRegistry;
use crate::fhir::search_values::IndexPlan;

/// AuditEvents are the ledger's view, searched only (described by its generic path).
const NOT_STORED: &str = "AuditEvent";

/// Result parameters every type's search takes, declared once under `components`.
const RESULT_PARAMETERS: &[(&str, &str)] = &[
    ("_count", "Page size, 1 to 1000 (0: the total alone)"),
    ("_sort", "Comma-separated sort keys, `-` for descending"),
    ("_total", "none, estimate or accurate"),
    ("_summary", "count or false"),
    ("_elements", "Comma-separated top-level elements to return"),
    (
        "_include",
        "Type:param[:Target] to include the resources matches reference",
    ),
    (
        "_revinclude",
        "Type:param[:Target] to include the resources referencing matches",
    ),
    ("_cursor", "Paging cursor from a next or previous link"),
];

/// Adds the per-type paths, their parameters, headers and resource schemas, and the
/// document's `servers`.
pub fn add_typed_paths(document: &mut Value) {
    let (Ok(types), Ok(registry)) = (ResourceTypes::load(), SearchParamRegistry::load()) else {
        return;
    };
    let plan = IndexPlan::new(&registry);
    let inputs = CapabilityInputs {
        base_url: "",
        software_version: "",
        date: "",
        oauth: None,
        cors: false,
    };
    let mut statement = capability_statement(&types, &inputs);
    describe_search(&mut statement, &registry, &plan);
    document["servers"] =
        json!([{"url": "/", "description": "this server (its FHIR base is /fhir)"}]);
    declare_components(document);
    let Some(resources) = statement["rest"][0]["resource"].as_array() else {
        return;
    };
    for resource in resources {
        let Some(name) = resource["type"].as_str().filter(|name| *name != NOT_STORED) else {
            continue;
        };
        let search_params: Vec<&str> = resource["searchParam"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|param| param["name"].as_str())
            .collect();
        document["components"]["schemas"][name] = json!({
            "type": "object",
            "description": format!("An R4 {name} (https://hl7.org/fhir/R4/{}.html), validated by the server", name.to_lowercase()),
            "required": ["resourceType"],
            "properties": {"resourceType": {"type": "string", "const": name}, "id": {"type": "string"}},
            "additionalProperties": true,
        });
        document["paths"][format!("/fhir/{name}")] = json!({
            "get": search_operation(name, &search_params),
            "post": create_operation(name),
        });
        document["paths"][format!("/fhir/{name}/{{id}}")] = instance_operations(name);
    }
}

fn declare_components(document: &mut Value) {
    let components = &mut document["components"];
    for (name, description) in [
        ("ETag", "The version read or written, W/\"<versionId>\""),
        ("Last-Modified", "When the version was written"),
        (
            "Location",
            "The new version: {base}/{type}/{id}/_history/{versionId}",
        ),
        (
            "X-Ledger-Entry",
            "The receipt of the ledger entry recording this interaction (GET /ledger/receipts/{receipt})",
        ),
    ] {
        components["headers"][name] =
            json!({"description": description, "schema": {"type": "string"}});
    }
    for (name, description) in [
        (
            "BadSearch",
            "Unknown or unsupported parameter, or malformed value",
        ),
        (
            "Invalid",
            "Invalid resource, or its id does not match the URL",
        ),
        (
            "PreconditionFailed",
            "If-Match does not name the current version, or If-None-Exist matched several",
        ),
        ("NotFound", "Unknown resource"),
        ("Gone", "The resource is deleted"),
        (
            "Unprocessable",
            "The patch cannot be applied or its result is invalid",
        ),
    ] {
        components["responses"][name] =
            json!({"description": description, "content": fhir_body("OperationOutcome")});
    }
    for (name, description) in RESULT_PARAMETERS {
        components["parameters"][*name] = json!({
            "name": name, "in": "query", "required": false, "description": description,
            "schema": {"type": "string"},
        });
    }
}

fn headers(names: &[&str]) -> Value {
    let mut headers = Map::new();
    for name in names {
        headers.insert(
            (*name).to_owned(),
            json!({"$ref": format!("#/components/headers/{name}")}),
        );
    }
    Value::Object(headers)
}

fn fhir_body(schema: &str) -> Value {
    json!({"application/fhir+json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}})
}

/// An error answer, declared once under `components.responses` (the documents are large
/// enough without 126 copies of each).
fn outcome(name: &str) -> Value {
    json!({"$ref": format!("#/components/responses/{name}")})
}

fn id_parameter() -> Value {
    json!({"name": "id", "in": "path", "required": true, "description": "Logical id", "schema": {"type": "string"}})
}

fn search_operation(name: &str, search_params: &[&str]) -> Value {
    let mut parameters: Vec<Value> = search_params
        .iter()
        .map(|code| {
            // Described by the CapabilityStatement's searchParam of the same name.
            json!({"name": code, "in": "query", "schema": {"type": "string"}})
        })
        .collect();
    parameters.extend(
        RESULT_PARAMETERS
            .iter()
            .map(|(param, _)| json!({"$ref": format!("#/components/parameters/{param}")})),
    );
    json!({
        "tags": ["fhir"], "operationId": format!("search{name}"),
        "summary": format!("Search {name}"),
        "parameters": parameters,
        "responses": {
            "200": {"description": "searchset Bundle", "content": fhir_body("Bundle"), "headers": headers(&["X-Ledger-Entry"])},
            "400": outcome("BadSearch"),
        },
    })
}

fn create_operation(name: &str) -> Value {
    json!({
        "tags": ["fhir"], "operationId": format!("create{name}"),
        "summary": format!("Create a {name} (the server assigns the id)"),
        "requestBody": {"required": true, "content": fhir_body(name)},
        "responses": {
            "201": {"description": "Created", "content": fhir_body(name), "headers": headers(&["Location", "ETag", "Last-Modified", "X-Ledger-Entry"])},
            "400": outcome("Invalid"),
            "412": outcome("PreconditionFailed"),
        },
    })
}

fn instance_operations(name: &str) -> Value {
    let written = headers(&["Location", "ETag", "Last-Modified", "X-Ledger-Entry"]);
    json!({
        "get": {
            "tags": ["fhir"], "operationId": format!("read{name}"), "parameters": [id_parameter()], "summary": format!("Read a {name}"),
            "responses": {
                "200": {"description": "The current version", "content": fhir_body(name), "headers": headers(&["ETag", "Last-Modified", "X-Ledger-Entry"])},
                "304": {"description": "Not modified since the version (If-None-Match) or date (If-Modified-Since) held"},
                "404": outcome("NotFound"),
                "410": outcome("Gone"),
            },
        },
        "put": {
            "tags": ["fhir"], "operationId": format!("update{name}"), "parameters": [id_parameter()], "summary": format!("Update (or create with this id) a {name}"),
            "requestBody": {"required": true, "content": fhir_body(name)},
            "responses": {
                "200": {"description": "The new version", "content": fhir_body(name), "headers": written.clone()},
                "201": {"description": "Created with this id", "content": fhir_body(name), "headers": written.clone()},
                "400": outcome("Invalid"),
                "412": outcome("PreconditionFailed"),
            },
        },
        "patch": {
            "tags": ["fhir"], "operationId": format!("patch{name}"), "parameters": [id_parameter()], "summary": format!("Patch a {name}"),
            "requestBody": {"required": true, "content": {
                "application/json-patch+json": {"schema": {"type": "array", "items": {"type": "object"}}},
                "application/merge-patch+json": {"schema": {"type": "object"}},
                "application/fhir+json": {"schema": {"$ref": "#/components/schemas/Parameters"}},
            }},
            "responses": {
                "200": {"description": "The new version", "content": fhir_body(name), "headers": written},
                "422": outcome("Unprocessable"),
            },
        },
        "delete": {
            "tags": ["fhir"], "operationId": format!("delete{name}"), "parameters": [id_parameter()], "summary": format!("Delete a {name} (its history remains)"),
            "responses": {
                "204": {"description": "Deleted", "headers": headers(&["X-Ledger-Entry"])},
            },
        },
    })
}
