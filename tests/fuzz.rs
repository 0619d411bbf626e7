//! Property tests of every parser that takes network input: search queries, JSON Patch and
//! FHIRPath Patch (parsed and applied), Bundle request entries, tile paths and token claims.
//! Each is fed thousands of generated inputs, shaped like real ones and broken in every
//! way, and must answer with a value or an error: never a panic, never a result past its
//! bounds. The case counts keep the whole file to seconds, so it runs with every test run.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

mod common;

use std::sync::OnceLock;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::EncodePrivateKey as _;
use fhirledger::access::TokenVerifier;
use fhirledger::crypto::BlindIndexKey;
use fhirledger::fhir::patch::{
    MAX_DEPTH, PatchDocument, PatchError, apply_json_patch_within, parse_fhirpath_patch,
    parse_json_patch, patch_resource,
};
use fhirledger::fhir::search_params::SearchParamRegistry;
use fhirledger::fhir::search_query::{Handling, parse_search};
use fhirledger::fhir::{ResourceId, ResourceTypes};
use fhirledger::indexer::SearchIndex;
use fhirledger::ledger::tiles::{parse_tile_path, tile_path};
use proptest::prelude::*;
use serde_json::{Value, json};

/// Arbitrary JSON, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::String),
        prop::sample::select(vec![
            "Patient",
            "Patient/1",
            "final",
            "",
            "1970-01-01",
            "x|y"
        ])
        .prop_map(|s| json!(s)),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn index() -> &'static SearchIndex {
    static INDEX: OnceLock<SearchIndex> = OnceLock::new();
    INDEX.get_or_init(|| {
        SearchIndex::new(
            SearchParamRegistry::load().unwrap(),
            BlindIndexKey::generate(),
            "http://fhir.test/fhir".into(),
        )
    })
}

fn types() -> &'static ResourceTypes {
    static TYPES: OnceLock<ResourceTypes> = OnceLock::new();
    TYPES.get_or_init(|| ResourceTypes::load().unwrap())
}

fn search_name() -> impl Strategy<Value = String> {
    let known = prop::sample::select(vec![
        "_id",
        "_lastUpdated",
        "_count",
        "_sort",
        "_total",
        "_summary",
        "_elements",
        "_include",
        "_revinclude",
        "_cursor",
        "_type",
        "subject",
        "subject:Patient",
        "subject:Patient.name",
        "subject.family",
        "code",
        "code:not",
        "code:text",
        "date",
        "value-quantity",
        "code-value-quantity",
        "component-code-value-quantity",
        "name",
        "name:exact",
        "family:contains",
        "birthdate",
        "identifier",
        "patient",
        "_has:Observation:subject:code",
        "_has:Observation:patient:_has:Encounter:subject:status",
        "general-practitioner:missing",
        "link",
        "combo-code-value-concept",
        "performer.identifier",
        "encounter:Encounter.status",
    ]);
    prop_oneof![
        4 => known.prop_map(str::to_owned),
        1 => "[a-z_:.-]{0,24}",
        1 => ".{0,16}",
    ]
}

fn search_value() -> impl Strategy<Value = String> {
    prop_oneof![
        "(ge|le|gt|lt|eq|ne|sa|eb|ap)?[0-9]{1,4}(-[0-9]{2}(-[0-9]{2}(T[0-9:]{2,8}Z?)?)?)?",
        "[a-z:/.]{0,20}\\|[A-Za-z0-9.-]{0,10}(\\$[a-z0-9.|]{0,10})?",
        "(Patient|Observation|Group)/[A-Za-z0-9.-]{0,10}",
        "[-+]?[0-9]{0,6}(\\.[0-9]{0,4})?(e[0-9]{1,3})?(\\|[a-z]{0,5}\\|[a-z]{0,5})?",
        "[A-Za-z,\\\\|$:*.-]{0,24}",
        ".{0,30}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn search_queries_parse_or_refuse(
        types in prop::sample::subsequence(vec!["Patient", "Observation", "Encounter", "Device", "Consent"], 0..3),
        pairs in prop::collection::vec((search_name(), search_value()), 0..8),
        lenient in any::<bool>(),
    ) {
        let index = index();
        let handling = if lenient { Handling::Lenient } else { Handling::Strict };
        let types = types.into_iter().map(str::to_owned).collect();
        if let Ok(request) = parse_search(index.registry(), index, types, &pairs, handling) {
            prop_assert!(request.count <= 1000);
            prop_assert!(request.sort.len() <= 3);
            prop_assert!(request.compartments.is_none(), "only the gate confines");
        }
    }

    #[test]
    fn fhirpath_paths_compile_and_select_inside_their_type(
        root in prop::sample::select(vec!["Patient", "Observation"]),
        steps in prop::collection::vec((fhirpath_member(), prop::option::of(0usize..3)), 0..5),
        filter in prop::option::of((fhirpath_member(), "[a-z]{0,4}")),
    ) {
        let mut source = root.to_owned();
        for (member, index) in steps {
            source.push('.');
            source.push_str(&member);
            if let Some(index) = index {
                source.push_str(&format!("[{index}]"));
            }
        }
        if let Some((member, value)) = filter {
            source.push_str(&format!(".where({member} = '{value}')"));
        }
        let compiled = fhirledger::fhir::fhirpath::Expression::compile(&source);
        prop_assert!(compiled.is_ok(), "{source}: {compiled:?}");
        let expression = compiled.unwrap();
        let resource = patient();
        let nodes = expression.evaluate("Patient", &resource);
        if root == "Observation" {
            prop_assert!(nodes.is_empty(), "{source} selected from a Patient");
        }
        for node in nodes {
            prop_assert!(holds(&resource, node.value), "{source} selected {} from outside the Patient", node.value);
        }
    }

    #[test]
    fn fhirpath_expressions_compile_or_refuse(source in prop_oneof![
        "[A-Za-z().\\[\\]'=| $%0-9]{0,40}",
        ".{0,40}",
    ]) {
        match fhirledger::fhir::fhirpath::Expression::compile(&source) {
            Ok(expression) => {
                prop_assert_eq!(expression.source(), source.as_str());
                let resource = patient();
                let _ = expression.evaluate("Patient", &resource);
            }
            Err(refused) => prop_assert!(!refused.to_string().is_empty(), "{source}: refused without a reason"),
        }
    }
}

/// A member name for generated FHIRPath: element names of the test Patient, or names that
/// cannot be FHIRPath keywords or functions (none starts with `q`).
fn fhirpath_member() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "name",
            "given",
            "family",
            "identifier",
            "system",
            "value",
            "use",
            "active",
            "birthDate"
        ])
        .prop_map(str::to_owned),
        "q[a-z]{0,5}",
    ]
}

/// Whether `node` is `root` or a value inside it (the same allocation, not an equal value).
fn holds(root: &Value, node: &Value) -> bool {
    std::ptr::eq(root, node)
        || match root {
            Value::Array(items) => items.iter().any(|item| holds(item, node)),
            Value::Object(members) => members.values().any(|member| holds(member, node)),
            _ => false,
        }
}

/// One JSON Patch operation, mostly well-formed.
fn json_patch_operation() -> impl Strategy<Value = Value> {
    let path = prop_oneof![
        prop::sample::select(vec![
            "",
            "/name",
            "/name/0",
            "/name/-",
            "/name/0/given",
            "/name/0/given/-",
            "/name/0/given/0",
            "/id",
            "/resourceType",
            "/active",
            "/birthDate",
            "/x/y",
            "/name/9",
            "/~1a~0b",
        ])
        .prop_map(str::to_owned),
        "(/[a-z0-9~-]{0,6}){0,5}",
    ];
    let op = prop::sample::select(vec![
        "add", "remove", "replace", "move", "copy", "test", "frob",
    ]);
    (op, path.clone(), path, any_json(), any::<bool>()).prop_map(
        |(op, path, from, value, extra)| {
            let mut operation = json!({"op": op, "path": path, "from": from, "value": value});
            if extra {
                operation["ignored"] = json!(true);
            }
            operation
        },
    )
}

fn patient() -> Value {
    json!({"resourceType": "Patient", "id": "p", "active": true, "birthDate": "1970-01-01",
           "name": [{"family": "Doe", "given": ["A", "B"]}],
           "identifier": [{"system": "urn:x", "value": "1"}, {"system": "urn:y", "value": "2", "use": "official"}]})
}

/// A FHIRPath Patch part list for one operation, mostly well-formed.
fn fhirpath_operation() -> impl Strategy<Value = Value> {
    let kind = prop::sample::select(vec!["add", "insert", "delete", "replace", "move", "frob"]);
    let path = prop_oneof![
        prop::sample::select(vec![
            "Patient",
            "Patient.name",
            "Patient.name[0]",
            "Patient.name[0].given",
            "Patient.identifier",
            "Patient.identifier.where(use = 'official')",
            "Patient.identifier[1].value",
            "Patient.birthDate",
            "Patient.contact[0]",
            "Patient.deceased",
            "Patient.text.div",
            "Patient.name.first()",
        ])
        .prop_map(str::to_owned),
        "[A-Za-z.\\[\\]0-9()']{0,30}",
    ];
    let name = prop::sample::select(vec![
        "birthDate",
        "contact",
        "given",
        "deceased",
        "telecom",
        "Bad",
        "x",
    ]);
    let value = prop_oneof![
        ".{0,10}".prop_map(|s| json!({"name": "value", "valueString": s})),
        Just(json!({"name": "value", "valueDate": "1930-01-01"})),
        Just(json!({"name": "value", "valueBoolean": true})),
        any::<i32>().prop_map(|n| json!({"name": "value", "valueInteger": n})),
        Just(json!({"name": "value", "valueHumanName": {"text": "a name"}})),
        Just(json!({"name": "value", "part": [
            {"name": "name", "valueHumanName": {"family": "X"}},
            {"name": "gender", "valueCode": "male"},
            {"name": "telecom", "valueContactPoint": {"system": "phone", "value": "1"}}]})),
        any_json().prop_map(|v| json!({"name": "value", "valueString": v})),
    ];
    let position = prop_oneof![0u64..4, Just(u64::MAX)];
    (
        kind,
        path,
        name,
        value,
        position.clone(),
        position.clone(),
        position,
        any::<u8>(),
    )
        .prop_map(
            |(kind, path, name, value, index, source, destination, drop)| {
                let mut parts = vec![
                    json!({"name": "type", "valueCode": kind}),
                    json!({"name": "path", "valueString": path}),
                    json!({"name": "name", "valueString": name}),
                    value,
                    json!({"name": "index", "valueInteger": index}),
                    json!({"name": "source", "valueInteger": source}),
                    json!({"name": "destination", "valueInteger": destination}),
                ];
                // Leave some parts out, so that every kind meets missing ones too.
                let keep = usize::from(drop % 8);
                if keep < parts.len() && keep > 1 {
                    parts.remove(keep);
                }
                json!({"name": "operation", "part": parts})
            },
        )
}

const PATCH_LIMIT: usize = 64 * 1024;

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn json_patches_apply_within_their_bounds(operations in prop::collection::vec(json_patch_operation(), 0..24)) {
        let body = serde_json::to_vec(&operations).unwrap();
        if let Ok(patch) = parse_json_patch(&body) {
            match apply_json_patch_within(&patient(), &patch, PATCH_LIMIT) {
                Ok(patched) => {
                    prop_assert!(serde_json::to_vec(&patched).unwrap().len() <= PATCH_LIMIT);
                    prop_assert!(depth(&patched) <= MAX_DEPTH + 1);
                }
                Err(PatchError::Unprocessable(_) | PatchError::TooLarge(_)) => {}
                Err(PatchError::Malformed(m)) => prop_assert!(false, "malformed after parsing: {m}"),
            }
        }
    }

    #[test]
    fn json_patch_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = parse_json_patch(&bytes);
    }

    #[test]
    fn fhirpath_patches_apply_within_their_bounds(operations in prop::collection::vec(fhirpath_operation(), 0..6)) {
        let body = serde_json::to_vec(&json!({"resourceType": "Parameters", "parameter": operations})).unwrap();
        if let Ok(operations) = parse_fhirpath_patch(&body) {
            let patient_type = types().resolve("Patient").unwrap();
            let id = ResourceId::parse("p").unwrap();
            let current = patient().to_string();
            if let Ok(patched) = patch_resource(types(), &patient_type, &id, &current,
                                                &PatchDocument::FhirPath(operations), PATCH_LIMIT) {
                prop_assert!(patched.compact_json.len() <= PATCH_LIMIT);
            }
        }
    }

    #[test]
    fn bundles_parse_or_refuse(
        kind in prop::sample::select(vec!["transaction", "batch", "searchset", "x"]),
        entries in prop::collection::vec((
            prop::sample::select(vec!["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", ""]),
            prop_oneof![
                "(Patient|Observation)(/[A-Za-z0-9-]{0,8}(/_history/[0-9]{0,3})?)?(\\?[a-z=&|]{0,12})?",
                "http://fhir\\.test/fhir/[A-Za-z/?=]{0,16}",
                ".{0,20}",
            ],
            any_json(),
            any::<bool>(),
        ), 0..6),
    ) {
        let entries: Vec<Value> = entries.into_iter().map(|(method, url, resource, full_url)| {
            let mut entry = json!({"request": {"method": method, "url": url}, "resource": resource});
            if full_url {
                entry["fullUrl"] = json!("urn:uuid:3f1b6a8e-0000-4000-8000-000000000001");
            }
            entry
        }).collect();
        let body = serde_json::to_vec(&json!({"resourceType": "Bundle", "type": kind, "entry": entries})).unwrap();
        let _ = fhirledger::fhir::bundle_request::parse_bundle(&body, "http://fhir.test/fhir");
    }

    #[test]
    fn tile_paths_parse_or_refuse(path in prop_oneof![
        "[0-9]{1,3}/(x[0-9]{3}/){0,3}[0-9]{3}(\\.p/[0-9]{1,3})?",
        "[0-9x./p-]{0,30}",
        ".{0,30}",
    ]) {
        if let Ok(tile) = parse_tile_path(&path) {
            prop_assert_eq!(parse_tile_path(&tile_path(tile)).ok(), Some(tile));
        }
    }
}

fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(members) => 1 + members.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// An issuer the verifier trusts, whose tokens carry whatever claims a case makes.
struct Issuer {
    key: SigningKey,
    verifier: TokenVerifier,
}

fn issuer() -> &'static Issuer {
    static ISSUER: OnceLock<Issuer> = OnceLock::new();
    ISSUER.get_or_init(|| {
        let key = SigningKey::from_bytes(&[7; 32]);
        let x = URL_SAFE_NO_PAD.encode(key.verifying_key().to_bytes());
        let jwks = serde_json::from_value(json!({"keys": [
            {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "k1", "use": "sig"}]}))
        .unwrap();
        let mut verifier = TokenVerifier::new(vec![common::BASE_URL.to_owned()]);
        verifier.trust("https://idp.fuzz", &jwks).unwrap();
        Issuer { key, verifier }
    })
}

fn claim_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => any_json(),
        1 => Just(json!("system/*.cruds patient/Observation.rs?code=x user/*.* launch openid")),
        1 => ".{0,40}".prop_map(Value::String),
        1 => any::<i64>().prop_map(|n| json!(n)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 800, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn token_claims_verify_or_refuse(
        claims in prop::collection::btree_map(
            prop::sample::select(vec!["iss", "aud", "sub", "exp", "nbf", "iat", "scope", "client_id",
                                      "patient", "fhirUser", "purpose_of_use", "extra"]),
            claim_value(), 0..12),
        base in any::<bool>(),
    ) {
        let mut claims: serde_json::Map<String, Value> = claims.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        if base {
            // Mostly valid, so that the claims past the signature are reached.
            let now = jsonwebtoken::get_current_timestamp();
            claims.entry("iss").or_insert(json!("https://idp.fuzz"));
            claims.entry("aud").or_insert(json!(common::BASE_URL));
            claims.entry("exp").or_insert(json!(now + 600));
        }
        let issuer = issuer();
        let der = issuer.key.to_pkcs8_der().unwrap();
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
        header.kid = Some("k1".into());
        let token = jsonwebtoken::encode(&header, &Value::Object(claims),
                                         &jsonwebtoken::EncodingKey::from_ed_der(der.as_bytes())).unwrap();
        if let Ok(identity) = issuer.verifier.verify(&token) {
            prop_assert!(!identity.subject.is_empty());
        }
    }

    #[test]
    fn token_text_never_panics(token in prop_oneof![
        "[A-Za-z0-9_-]{0,40}\\.[A-Za-z0-9_-]{0,60}\\.[A-Za-z0-9_-]{0,40}",
        ".{0,80}",
    ]) {
        let _ = issuer().verifier.verify(&token);
    }
}

/// Found by `search_queries_parse_or_refuse`: a prefix cut inside a character panicked.
#[test]
fn a_prefix_is_never_cut_inside_a_character() {
    let index = index();
    for value in ["R\u{baa44}[:", "o\u{8860e}:", "g\u{e9}2020"] {
        let pairs = vec![("birthdate".to_owned(), value.to_owned())];
        let parsed = parse_search(
            index.registry(),
            index,
            vec!["Patient".to_owned()],
            &pairs,
            Handling::Strict,
        );
        assert!(parsed.is_err(), "{value}");
    }
}
