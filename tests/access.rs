//! Authentication and authorization end to end: every way a token can be wrong is refused
//! with 401 and a `WWW-Authenticate` challenge, every scope refusal with 403 naming its
//! rule; each refusal is a ledger entry, and no refusal carries resource content. Permitted
//! requests are ledgered with the token's actor and the rule that permitted them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

mod common;

use actix_web::http::StatusCode;
use actix_web::test::{self, TestRequest};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{BASE_URL, Reply, TestDb, call, call_as_is, create, get, post, token_with};
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::EncodePrivateKey as _;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

/// An identity provider the test server trusts through its JWKS, whose tokens the tests
/// forge at will.
struct Provider {
    issuer: String,
    kid: String,
    key: SigningKey,
}

impl Provider {
    fn new(issuer: &str) -> Self {
        Self {
            issuer: issuer.into(),
            kid: "k1".into(),
            key: SigningKey::from_bytes(&rand::random()),
        }
    }

    fn jwks(&self) -> JwkSet {
        let x = URL_SAFE_NO_PAD.encode(self.key.verifying_key().to_bytes());
        serde_json::from_value(json!({"keys": [
            {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": self.kid, "use": "sig"}
        ]}))
        .unwrap()
    }

    fn claims(&self, scope: &str) -> Value {
        let now = jsonwebtoken::get_current_timestamp();
        json!({
            "iss": self.issuer, "aud": BASE_URL, "sub": "nurse-7", "client_id": "ward-app",
            "scope": scope, "iat": now, "exp": now + 600, "fhirUser": "Practitioner/p7",
        })
    }

    fn sign(&self, header: &Header, claims: &Value) -> String {
        let der = self.key.to_pkcs8_der().unwrap();
        jsonwebtoken::encode(header, claims, &EncodingKey::from_ed_der(der.as_bytes())).unwrap()
    }

    fn header(&self) -> Header {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        header
    }

    fn token(&self, claims: &Value) -> String {
        self.sign(&self.header(), claims)
    }
}

const FAMILY: &str = "Quintavalle";

fn with_token(request: TestRequest, token: &str) -> TestRequest {
    request.insert_header(("Authorization", format!("Bearer {token}")))
}

/// The ledger entry a response's receipt names (read with the administrator's token).
async fn entry_of<S, B>(app: &S, reply: &Reply) -> Value
where
    S: common::TestApp<B>,
    B: actix_web::body::MessageBody,
{
    let receipt = reply
        .header("x-ledger-entry")
        .unwrap_or_else(|| panic!("no receipt on {}: {}", reply.status, reply.text()));
    let resolved = call(app, get(&format!("/ledger/receipts/{receipt}"))).await;
    assert_eq!(resolved.status, StatusCode::OK, "{}", resolved.text());
    resolved.json()["entry"].clone()
}

/// A refusal carries an OperationOutcome and nothing of the stored patient.
fn assert_refusal(reply: &Reply, status: StatusCode, code: &str) {
    assert_eq!(reply.status, status, "{}", reply.text());
    assert_eq!(reply.outcome_issue()["code"], code, "{}", reply.text());
    assert!(!reply.text().contains(FAMILY), "{}", reply.text());
    assert!(reply.header("www-authenticate").is_some());
}

async fn authentication_failures_are_refused_and_ledgered(db: TestDb) {
    let provider = Provider::new("https://idp.test");
    let state = db.state_trusting(vec![(provider.issuer.clone(), provider.jwks())]);
    let app = test::init_service(fhirledger::api::build_app(state.clone())).await;
    let created = call(
        &app,
        post(
            "/fhir/Patient",
            &json!({"resourceType": "Patient", "name": [{"family": FAMILY}]}),
        ),
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let path = format!("/fhir/Patient/{}", created.json()["id"].as_str().unwrap());

    // A good token from the provider reads; the entry names the actor and the rule.
    let good = provider.token(&provider.claims("system/Patient.r"));
    let read = call(&app, with_token(get(&path), &good)).await;
    assert_eq!(read.status, StatusCode::OK, "{}", read.text());
    let entry = entry_of(&app, &read).await;
    assert_eq!(entry["outcome"], "permit");
    assert_eq!(entry["rule"], "scope:system");
    assert_eq!(entry["actor"]["subject"], "nurse-7");
    assert_eq!(entry["actor"]["client"], "ward-app");
    assert_eq!(entry["actor"]["issuer"], "https://idp.test");
    assert_eq!(entry["actor"]["fhirUser"], "Practitioner/p7");
    assert_eq!(entry["actor"]["role"], "system");

    let now = jsonwebtoken::get_current_timestamp();
    let claims = provider.claims("system/Patient.r");
    let altered = |field: &str, value: Value| {
        let mut claims = claims.clone();
        claims[field] = value;
        provider.token(&claims)
    };
    let impostor = Provider::new("https://idp.test");
    let header_json = |alg: &str| {
        URL_SAFE_NO_PAD.encode(json!({"alg": alg, "kid": "k1", "typ": "JWT"}).to_string())
    };
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let public_key = provider.key.verifying_key().to_bytes();
    let mut hs256 = Header::new(Algorithm::HS256);
    hs256.kid = Some("k1".into());
    let mut unknown_kid = provider.header();
    unknown_kid.kid = Some("k2".into());
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("no token", None, "no-token"),
        (
            "not bearer",
            Some("Basic dXNlcjpwYXNz".into()),
            "malformed-token",
        ),
        (
            "malformed",
            Some("Bearer not.a-jwt".into()),
            "malformed-token",
        ),
        (
            "expired",
            Some(altered("exp", json!(now - 3600))),
            "token-expired",
        ),
        (
            "not yet valid",
            Some(altered("nbf", json!(now + 3600))),
            "token-not-yet-valid",
        ),
        (
            "wrong issuer",
            Some(altered("iss", json!("https://evil.test"))),
            "unknown-issuer",
        ),
        (
            "wrong audience",
            Some(altered("aud", json!("https://other-server.test"))),
            "wrong-audience",
        ),
        (
            "bad signature",
            Some(impostor.token(&claims)),
            "bad-signature",
        ),
        (
            "alg none",
            Some(format!("{}.{payload}.", header_json("none"))),
            "algorithm-refused",
        ),
        (
            "HS256 keyed with the public key",
            Some(
                jsonwebtoken::encode(
                    &hs256,
                    &claims,
                    &EncodingKey::from_secret(&public_key).unwrap(),
                )
                .unwrap(),
            ),
            "algorithm-refused",
        ),
        (
            "unknown kid",
            Some(provider.sign(&unknown_kid, &claims)),
            "unknown-key",
        ),
        (
            "no subject",
            Some({
                let mut claims = claims.clone();
                claims.as_object_mut().unwrap().remove("sub");
                provider.token(&claims)
            }),
            "missing-claim",
        ),
    ];
    for (name, credential, reason) in cases {
        let mut request = get(&path);
        if let Some(credential) = &credential {
            let value = if credential.contains(' ') {
                credential.clone()
            } else {
                format!("Bearer {credential}")
            };
            request = request.insert_header(("Authorization", value));
        }
        let reply = call_as_is(&app, request).await;
        assert_refusal(&reply, StatusCode::UNAUTHORIZED, "login");
        let challenge = reply.header("www-authenticate").unwrap();
        assert!(
            challenge.starts_with("Bearer realm=\"fhirledger\""),
            "{name}: {challenge}"
        );
        assert_eq!(
            challenge.contains("error=\"invalid_token\""),
            credential.is_some(),
            "{name}: {challenge}"
        );
        // Counted into its address's aggregate entry, which names the count.
        let ledger = state.ledger.clone();
        actix_web::rt::task::spawn_blocking(move || ledger.flush_refusals(true))
            .await
            .unwrap()
            .unwrap();
        let entry = entry_of(&app, &reply).await;
        assert_eq!(entry["outcome"], "deny", "{name}");
        assert_eq!(entry["reason"], reason, "{name}");
        assert_eq!(entry["count"], 1, "{name}");
        assert_eq!(entry["rule"], "authentication", "{name}");
        assert_eq!(entry["actor"]["subject"], "anonymous", "{name}");
    }

    // The public endpoints need no token.
    for public in [
        "/fhir/metadata",
        "/ledger/checkpoint",
        "/ledger/key",
        "/.well-known/smart-configuration",
        "/.well-known/jwks.json",
        "/healthz",
    ] {
        let reply = call_as_is(&app, get(public)).await;
        assert_eq!(reply.status, StatusCode::OK, "{public}: {}", reply.text());
    }
    let smart = call_as_is(&app, get("/.well-known/smart-configuration"))
        .await
        .json();
    assert_eq!(
        smart["jwks_uri"],
        format!("{BASE_URL}/.well-known/jwks.json")
    );
    // The local issuer's published key verifies the tokens it mints.
    let jwks = call_as_is(&app, get("/.well-known/jwks.json")).await.json();
    assert_eq!(jwks["keys"][0]["kty"], "OKP");
    assert!(
        jwks["keys"][0].get("d").is_none(),
        "the private key is never served"
    );
}

async fn scopes_decide_interactions_and_refusals_are_ledgered(db: TestDb) {
    let state = db.state();
    let app = test::init_service(fhirledger::api::build_app(state)).await;
    let patient = call(
        &app,
        post(
            "/fhir/Patient",
            &json!({"resourceType": "Patient", "name": [{"family": FAMILY}]}),
        ),
    )
    .await
    .json();
    let patient_id = patient["id"].as_str().unwrap().to_owned();
    let observation = call(
        &app,
        post(
            "/fhir/Observation",
            &json!({"resourceType": "Observation", "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
                    "subject": {"reference": format!("Patient/{patient_id}")}}),
        ),
    )
    .await
    .json();
    let observation_id = observation["id"].as_str().unwrap().to_owned();
    let patient_path = format!("/fhir/Patient/{patient_id}");

    let observations_only = token_with("system/Observation.rs", None, None);
    let read_only = token_with("system/Patient.rs", None, None);
    let unclaimed = token_with("patient/*.rs", None, None);
    let anonymous_user = token_with("user/*.rs", None, None);
    let clinician = token_with("user/*.cruds", None, Some("Practitioner/p1"));
    let auditor = token_with("ledger.read", None, None);
    let writer = token_with("system/*.cruds", None, None);
    let new_patient = json!({"resourceType": "Patient", "active": true});

    let refusals: Vec<(&str, TestRequest, &str, &str)> = vec![
        (
            "scope for another type",
            with_token(get(&patient_path), &observations_only),
            "scope",
            "read",
        ),
        (
            "read-only scope writing",
            with_token(post("/fhir/Patient", &new_patient), &read_only),
            "scope",
            "create",
        ),
        (
            "read-only scope deleting",
            with_token(TestRequest::delete().uri(&patient_path), &read_only),
            "scope",
            "delete",
        ),
        (
            "patient scope without a patient claim",
            with_token(get(&patient_path), &unclaimed),
            "patient-claim-missing",
            "read",
        ),
        (
            "a practitioner without Consent",
            with_token(
                get(&format!("/fhir/Observation/{observation_id}")),
                &clinician,
            ),
            "consent",
            "read",
        ),
        (
            "user scope without a fhirUser claim",
            with_token(get("/fhir/Observation"), &anonymous_user),
            "fhir-user-claim-missing",
            "search",
        ),
        (
            "auditor reading a Patient",
            with_token(get(&patient_path), &auditor),
            "scope",
            "read",
        ),
        (
            "auditor searching",
            with_token(get("/fhir/Patient"), &auditor),
            "scope",
            "search",
        ),
        (
            "history of a type not in scope",
            with_token(get("/fhir/Patient/_history"), &observations_only),
            "scope",
            "history",
        ),
        (
            "$everything without Patient read",
            with_token(
                get(&format!("{patient_path}/$everything")),
                &observations_only,
            ),
            "scope",
            "everything",
        ),
        (
            "creating an AuditEvent",
            with_token(
                post("/fhir/AuditEvent", &json!({"resourceType": "AuditEvent"})),
                &writer,
            ),
            "audit-events-read-only",
            "create",
        ),
        (
            "ledger entries without ledger.read",
            with_token(get("/ledger/entries"), &writer),
            "scope:ledger.read",
            "ledger-read",
        ),
        (
            "an entry bundle without ledger.read",
            with_token(get("/ledger/tile/entries/000.p/1"), &writer),
            "scope:ledger.read",
            "ledger-read",
        ),
    ];
    for (name, request, rule, action) in refusals {
        let reply = call_as_is(&app, request).await;
        assert_refusal(&reply, StatusCode::FORBIDDEN, "forbidden");
        assert!(reply.text().contains(rule), "{name}: {}", reply.text());
        let entry = entry_of(&app, &reply).await;
        assert_eq!(entry["outcome"], "deny", "{name}");
        assert_eq!(entry["reason"], "forbidden", "{name}");
        assert_eq!(entry["rule"], rule, "{name}");
        assert_eq!(entry["action"], action, "{name}");
    }

    // A transaction with one entry the token may not do changes nothing.
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Observation", "status": "final",
                      "code": {"text": "x"}},
         "request": {"method": "POST", "url": "Observation"}},
        {"resource": new_patient, "request": {"method": "POST", "url": "Patient"}},
    ]});
    let before = call(&app, get("/fhir/Observation?_summary=count"))
        .await
        .json()["total"]
        .clone();
    let refused = call_as_is(&app, with_token(post("/fhir", &bundle), &observations_only)).await;
    assert_refusal(&refused, StatusCode::FORBIDDEN, "forbidden");
    let after = call(&app, get("/fhir/Observation?_summary=count"))
        .await
        .json()["total"]
        .clone();
    assert_eq!(before, after, "the refused transaction wrote nothing");
    // In a batch, only the refused entry fails.
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": format!("Observation/{observation_id}")}},
        {"request": {"method": "GET", "url": format!("Patient/{patient_id}")}},
    ]});
    let reply = call_as_is(&app, with_token(post("/fhir", &batch), &observations_only)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let entries = reply.json()["entry"].clone();
    assert_eq!(entries[0]["response"]["status"], "200 OK");
    assert!(
        entries[1]["response"]["status"]
            .as_str()
            .unwrap()
            .starts_with("403")
    );
    assert!(!reply.text().contains(FAMILY));

    // Includes of types the token may not see are withheld, and the entry says how many.
    let search = call_as_is(
        &app,
        with_token(
            get(&format!(
                "/fhir/Observation?_id={observation_id}&_include=Observation:subject"
            )),
            &observations_only,
        ),
    )
    .await;
    assert_eq!(search.status, StatusCode::OK, "{}", search.text());
    let bundle = search.json();
    assert_eq!(common::searchset_ids(&bundle), vec![observation_id.clone()]);
    assert_eq!(bundle["entry"].as_array().unwrap().len(), 1, "{bundle}");
    assert!(!search.text().contains(FAMILY));
    let entry = entry_of(&app, &search).await;
    assert_eq!(entry["outcome"], "permit");
    assert_eq!(entry["withheld"], 1);
    assert_eq!(entry["rule"], "scope:system");

    // The system history withholds the Patient's versions from an Observation-only token.
    let history = call_as_is(&app, with_token(get("/fhir/_history"), &observations_only)).await;
    assert_eq!(history.status, StatusCode::OK, "{}", history.text());
    let types: Vec<String> = history.json()["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            e["resource"]["resourceType"]
                .as_str()
                .unwrap_or("-")
                .to_owned()
        })
        .collect();
    assert!(types.iter().all(|t| t == "Observation"), "{types:?}");
    assert!(!types.is_empty());
    assert!(entry_of(&app, &history).await["withheld"].as_u64().unwrap() >= 1);

    // The auditor reads the ledger; permitted.
    let entries = call_as_is(&app, with_token(get("/ledger/entries"), &auditor)).await;
    assert_eq!(entries.status, StatusCode::OK, "{}", entries.text());
}

/// Creates `resource` as the administrator; returns its id.
fn observation(patient: &str, text: &str) -> Value {
    json!({"resourceType": "Observation", "status": "final", "code": {"text": text},
           "subject": {"reference": format!("Patient/{patient}")}})
}

fn ids_of(reply: &Reply) -> Vec<String> {
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let mut ids: Vec<String> = reply.json()["entry"]
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .filter_map(|e| e["resource"]["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

/// Two patients, Alice and Bob, with an Observation each.
struct Records {
    alice: String,
    bob: String,
    alice_obs: String,
    bob_obs: String,
}

async fn two_patients<S, B>(app: &S) -> Records
where
    S: common::TestApp<B>,
    B: actix_web::body::MessageBody,
{
    let alice = create(
        app,
        json!({"resourceType": "Patient", "name": [{"family": "Alice"}]}),
    )
    .await;
    let bob = create(
        app,
        json!({"resourceType": "Patient", "name": [{"family": FAMILY}]}),
    )
    .await;
    Records {
        alice_obs: create(app, observation(&alice, "alice-glucose")).await,
        bob_obs: create(app, observation(&bob, "bob-secret")).await,
        alice,
        bob,
    }
}

fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

async fn patient_scopes_stay_inside_their_patients_compartment(db: TestDb) {
    let state = db.state();
    let app = test::init_service(fhirledger::api::build_app(state)).await;
    let Records {
        alice,
        bob,
        alice_obs,
        bob_obs,
    } = two_patients(&app).await;
    let doctor = create(
        &app,
        json!({"resourceType": "Practitioner", "active": true}),
    )
    .await;

    let token = token_with("patient/*.cruds", Some(&alice), None);
    let as_alice = |request: TestRequest| with_token(request, &token);

    // Reads: her own record and shared resources; Bob's are refused and ledgered.
    for path in [
        format!("/fhir/Patient/{alice}"),
        format!("/fhir/Observation/{alice_obs}"),
        format!("/fhir/Observation/{alice_obs}/_history/1"),
        format!("/fhir/Practitioner/{doctor}"),
    ] {
        let reply = call_as_is(&app, as_alice(get(&path))).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.text());
        assert_eq!(
            entry_of(&app, &reply).await["rule"],
            "scope:patient",
            "{path}"
        );
    }
    for path in [
        format!("/fhir/Patient/{bob}"),
        format!("/fhir/Observation/{bob_obs}"),
        format!("/fhir/Observation/{bob_obs}/_history/1"),
        format!("/fhir/Patient/{bob}/$everything"),
    ] {
        let reply = call_as_is(&app, as_alice(get(&path))).await;
        assert_refusal(&reply, StatusCode::FORBIDDEN, "forbidden");
        assert!(!reply.text().contains("bob-secret"));
        let entry = entry_of(&app, &reply).await;
        assert_eq!(entry["outcome"], "deny", "{path}");
        assert_eq!(entry["rule"], "compartment", "{path}");
    }

    // Searches, includes and histories return her compartment only.
    let search = |query: &str| call_as_is(&app, as_alice(get(query)));
    assert_eq!(
        ids_of(&search("/fhir/Observation").await),
        vec![alice_obs.clone()]
    );
    assert_eq!(
        ids_of(&search(&format!("/fhir/Observation?subject=Patient/{bob}")).await),
        Vec::<String>::new()
    );
    assert_eq!(ids_of(&search("/fhir/Patient").await), vec![alice.clone()]);
    let reply = search(&format!(
        "/fhir/Patient?_id={alice},{bob}&_revinclude=Observation:subject"
    ))
    .await;
    assert_eq!(
        ids_of(&reply),
        sorted(vec![alice.clone(), alice_obs.clone()])
    );
    assert!(!reply.text().contains("bob-secret"));
    let reply = search("/fhir/Observation?_include=Observation:subject").await;
    assert_eq!(
        ids_of(&reply),
        sorted(vec![alice.clone(), alice_obs.clone()])
    );
    // Paging through a type's or the system's history would tell of other patients'
    // versions (a short page, a cursor): refused, and the refusal is ledgered.
    for path in ["/fhir/Observation/_history", "/fhir/_history"] {
        let reply = search(path).await;
        assert_refusal(&reply, StatusCode::FORBIDDEN, "forbidden");
        assert!(!reply.text().contains("bob-secret"));
        let entry = entry_of(&app, &reply).await;
        assert_eq!(entry["outcome"], "deny", "{entry}");
        assert_eq!(entry["action"], "history", "{entry}");
    }
    // The history of shared reference data stays open.
    let reply = search("/fhir/Practitioner/_history").await;
    assert_eq!(ids_of(&reply), vec![doctor.clone()]);
    let reply = search(&format!("/fhir/Patient/{alice}/$everything")).await;
    assert_eq!(
        ids_of(&reply),
        sorted(vec![alice.clone(), alice_obs.clone()])
    );
    // A search that cannot be confined in one condition is refused.
    let reply = search("/fhir?_type=Observation,Patient").await;
    assert_refusal(&reply, StatusCode::FORBIDDEN, "forbidden");

    // Writes: into her compartment only.
    let reply = call_as_is(
        &app,
        as_alice(post("/fhir/Observation", &observation(&alice, "mine"))),
    )
    .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    let count = || async {
        call(&app, get("/fhir/Observation?_summary=count"))
            .await
            .json()["total"]
            .clone()
    };
    let before = count().await;
    let mut moved = observation(&bob, "moved");
    moved["id"] = json!(alice_obs);
    let mut bobs = observation(&bob, "overwritten");
    bobs["id"] = json!(bob_obs);
    let writes: Vec<(&str, TestRequest)> = vec![
        (
            "create in Bob's compartment",
            post("/fhir/Observation", &observation(&bob, "planted")),
        ),
        (
            "move her observation to Bob",
            common::put(&format!("/fhir/Observation/{alice_obs}"), &moved),
        ),
        (
            "overwrite Bob's observation",
            common::put(&format!("/fhir/Observation/{bob_obs}"), &bobs),
        ),
        (
            "delete Bob's observation",
            TestRequest::delete().uri(&format!("/fhir/Observation/{bob_obs}")),
        ),
        (
            "create another patient",
            post("/fhir/Patient", &json!({"resourceType": "Patient"})),
        ),
    ];
    for (name, request) in writes {
        let reply = call_as_is(&app, as_alice(request)).await;
        assert_refusal(&reply, StatusCode::FORBIDDEN, "forbidden");
        let entry = entry_of(&app, &reply).await;
        assert_eq!(entry["rule"], "compartment", "{name}");
        assert_eq!(entry["outcome"], "deny", "{name}");
    }
    assert_eq!(count().await, before, "no refused write changed anything");
    let bob_read = call(&app, get(&format!("/fhir/Observation/{bob_obs}")))
        .await
        .json();
    assert_eq!(bob_read["code"]["text"], "bob-secret");
    assert_eq!(bob_read["meta"]["versionId"], "1");

    // In a batch, Bob's entry is refused and hers is served.
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": format!("Observation/{alice_obs}")}},
        {"request": {"method": "GET", "url": format!("Observation/{bob_obs}")}},
        {"request": {"method": "GET", "url": format!("Observation?subject=Patient/{bob}")}},
    ]});
    let reply = call_as_is(&app, as_alice(post("/fhir", &batch))).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let entries = reply.json()["entry"].clone();
    assert_eq!(entries[0]["response"]["status"], "200 OK");
    assert!(
        entries[1]["response"]["status"]
            .as_str()
            .unwrap()
            .starts_with("403")
    );
    assert_eq!(entries[2]["resource"]["total"], 0, "{}", entries[2]);
    assert!(!reply.text().contains("bob-secret"));
}

fn consent(patient: &str, scope: &str, kind: &str, actor: Option<&str>) -> Value {
    let mut provision = json!({"type": kind});
    if let Some(actor) = actor {
        provision["actor"] = json!([{
            "role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "PRCP"}]},
            "reference": {"reference": actor},
        }]);
    }
    json!({
        "resourceType": "Consent", "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": scope}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": format!("Patient/{patient}")},
        "provision": provision,
    })
}

async fn consent_decides_what_clinicians_and_researchers_see(db: TestDb) {
    let state = db.state();
    let app = test::init_service(fhirledger::api::build_app(state.clone())).await;
    let Records {
        alice,
        bob,
        alice_obs,
        bob_obs,
    } = two_patients(&app).await;
    let alice_path = format!("/fhir/Observation/{alice_obs}");
    let bob_path = format!("/fhir/Observation/{bob_obs}");

    let clinician = token_with("user/*.cruds", None, Some("Practitioner/p1"));
    let as_clinician = |request: TestRequest| with_token(request, &clinician);
    let read = |path: String| call_as_is(&app, as_clinician(get(&path)));

    // No Consent: nothing, and the refusal says which rule.
    let reply = read(alice_path.clone()).await;
    assert_refusal(&reply, StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(entry_of(&app, &reply).await["rule"], "consent");
    assert_eq!(
        ids_of(&call_as_is(&app, as_clinician(get("/fhir/Observation"))).await),
        Vec::<String>::new()
    );

    // Alice permits Practitioner/p1: her record opens, Bob's stays shut.
    let permit = create(
        &app,
        consent(&alice, "patient-privacy", "permit", Some("Practitioner/p1")),
    )
    .await;
    let reply = read(alice_path.clone()).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let entry = entry_of(&app, &reply).await;
    assert_eq!(entry["rule"], "consent:treatment");
    assert_eq!(entry["actor"]["fhirUser"], "Practitioner/p1");
    assert_refusal(
        &read(bob_path.clone()).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    let reply = call_as_is(
        &app,
        as_clinician(get("/fhir/Observation?_include=Observation:subject")),
    )
    .await;
    assert_eq!(
        ids_of(&reply),
        sorted(vec![alice.clone(), alice_obs.clone()])
    );
    assert!(!reply.text().contains("bob-secret"));
    // Writes follow the same compartments.
    let reply = call_as_is(
        &app,
        as_clinician(post("/fhir/Observation", &observation(&alice, "note"))),
    )
    .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    let reply = call_as_is(
        &app,
        as_clinician(post("/fhir/Observation", &observation(&bob, "note"))),
    )
    .await;
    assert_refusal(&reply, StatusCode::FORBIDDEN, "forbidden");
    // Another practitioner is not named by the Consent.
    let other = token_with("user/*.rs", None, Some("Practitioner/p2"));
    assert_refusal(
        &call_as_is(&app, with_token(get(&alice_path), &other)).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );

    // A deny wins over the permit.
    let deny = create(
        &app,
        consent(&alice, "patient-privacy", "deny", Some("Practitioner/p1")),
    )
    .await;
    assert_refusal(
        &read(alice_path.clone()).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    let reply = call(
        &app,
        TestRequest::delete().uri(&format!("/fhir/Consent/{deny}")),
    )
    .await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    assert_eq!(read(alice_path.clone()).await.status, StatusCode::OK);

    // Revoking the permit takes effect on the next request.
    let mut revoked = consent(&alice, "patient-privacy", "permit", Some("Practitioner/p1"));
    revoked["id"] = json!(permit);
    revoked["status"] = json!("inactive");
    let reply = call(
        &app,
        common::put(&format!("/fhir/Consent/{permit}"), &revoked),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_refusal(
        &read(alice_path.clone()).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );

    // Break-the-glass: an emergency opens Bob's record, and the entry is flagged for review.
    let emergency =
        common::token_for_purpose("user/*.rs", None, Some("Practitioner/p1"), Some("ETREAT"));
    let reply = call_as_is(&app, with_token(get(&bob_path), &emergency)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let entry = entry_of(&app, &reply).await;
    assert_eq!(entry["rule"], "break-the-glass");
    assert_eq!(entry["actor"]["purpose"], "ETREAT");
    // An auditor lists break-the-glass accesses for review, and only those.
    let ledger = state.ledger.clone();
    tokio::task::spawn_blocking(move || ledger.sequence_pending())
        .await
        .unwrap()
        .unwrap();
    let auditor = token_with("ledger.read", None, None);
    let listed = call_as_is(
        &app,
        with_token(get("/fhir/AuditEvent?purpose=ETREAT"), &auditor),
    )
    .await
    .json();
    let listed = listed["entry"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(
        ledger_part(&listed[0]["resource"], "receipt")[0]["valueString"],
        entry["id"]
    );

    // A research client sees only patients whose research Consent permits it.
    let researcher = common::token_for_purpose("system/Observation.rs", None, None, Some("HRESCH"));
    let search = || call_as_is(&app, with_token(get("/fhir/Observation"), &researcher));
    assert_eq!(ids_of(&search().await), Vec::<String>::new());
    create(&app, consent(&bob, "research", "permit", None)).await;
    let reply = search().await;
    assert_eq!(ids_of(&reply), vec![bob_obs.clone()]);
    assert_eq!(entry_of(&app, &reply).await["rule"], "consent:research");
    let reply = call_as_is(&app, with_token(get(&alice_path), &researcher)).await;
    assert_refusal(&reply, StatusCode::FORBIDDEN, "forbidden");
}

fn receipt(reply: &Reply) -> String {
    reply.header("x-ledger-entry").expect("receipt")
}

/// A sub-extension of an AuditEvent's ledger-entry extension, every value of `url`.
fn ledger_part<'a>(event: &'a Value, url: &str) -> Vec<&'a Value> {
    event["extension"][0]["extension"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|part| part["url"] == url)
        .collect()
}

async fn patients_see_who_touched_their_record_with_proofs(db: TestDb) {
    use std::collections::BTreeSet;
    let state = db.state();
    let app = test::init_service(fhirledger::api::build_app(state.clone())).await;
    let mut alices = BTreeSet::new();
    let created = |reply: Reply| {
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
        (
            reply.json()["id"].as_str().unwrap().to_owned(),
            receipt(&reply),
        )
    };
    let (alice, r) = created(
        call(
            &app,
            post(
                "/fhir/Patient",
                &json!({"resourceType": "Patient", "name": [{"family": "Alice"}]}),
            ),
        )
        .await,
    );
    alices.insert(r);
    let (bob, _) = created(
        call(
            &app,
            post(
                "/fhir/Patient",
                &json!({"resourceType": "Patient", "name": [{"family": FAMILY}]}),
            ),
        )
        .await,
    );
    let (alice_obs, r) = created(
        call(
            &app,
            post("/fhir/Observation", &observation(&alice, "alice-glucose")),
        )
        .await,
    );
    alices.insert(r);
    let (bob_obs, _) = created(
        call(
            &app,
            post("/fhir/Observation", &observation(&bob, "bob-secret")),
        )
        .await,
    );
    let (_, r) = created(
        call(
            &app,
            post(
                "/fhir/Consent",
                &consent(&alice, "patient-privacy", "permit", Some("Practitioner/p1")),
            ),
        )
        .await,
    );
    alices.insert(r);

    // A clinician under Alice's Consent reads and searches; Bob's app tries her record.
    let clinician = token_with("user/*.rs", None, Some("Practitioner/p1"));
    let reply = call_as_is(
        &app,
        with_token(get(&format!("/fhir/Observation/{alice_obs}")), &clinician),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    alices.insert(receipt(&reply));
    let reply = call_as_is(&app, with_token(get("/fhir/Observation"), &clinician)).await;
    assert_eq!(ids_of(&reply), vec![alice_obs.clone()]);
    alices.insert(receipt(&reply));
    let bobs_app = token_with("patient/*.rs", Some(&bob), None);
    let reply = call_as_is(
        &app,
        with_token(get(&format!("/fhir/Observation/{alice_obs}")), &bobs_app),
    )
    .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    alices.insert(receipt(&reply));
    // Bob's own reads are not Alice's business.
    let reply = call_as_is(
        &app,
        with_token(get(&format!("/fhir/Observation/{bob_obs}")), &bobs_app),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let ledger = state.ledger.clone();
    tokio::task::spawn_blocking(move || ledger.sequence_pending())
        .await
        .unwrap()
        .unwrap();

    // Alice's app lists exactly those accesses, newest first, each with a proof that verifies.
    let alices_app = token_with("patient/*.rs", Some(&alice), None);
    let view = |query: &str| {
        call_as_is(
            &app,
            with_token(get(&format!("/fhir/AuditEvent{query}")), &alices_app),
        )
    };
    let reply = view("").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let bundle = reply.json();
    let events: Vec<Value> = bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"].clone())
        .collect();
    let listed: BTreeSet<String> = events
        .iter()
        .map(|e| {
            ledger_part(e, "receipt")[0]["valueString"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(listed, alices);
    assert!(
        !reply.text().contains(&bob_obs),
        "nothing of Bob's: {}",
        reply.text()
    );
    let key = call_as_is(&app, get("/ledger/key")).await.json()["vkey"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut previous = i64::MAX;
    for event in &events {
        assert_eq!(event["resourceType"], "AuditEvent");
        let index: i64 = ledger_part(event, "index")[0]["valueString"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(index < previous, "newest first");
        previous = index;
        let data = base64::engine::general_purpose::STANDARD
            .decode(
                ledger_part(event, "leafData")[0]["valueBase64Binary"]
                    .as_str()
                    .unwrap(),
            )
            .unwrap();
        let note = ledger_part(event, "checkpoint")[0]["valueString"]
            .as_str()
            .unwrap();
        let checkpoint = fhirledger::ledger::checkpoint::verify_checkpoint(note, &key).unwrap();
        let proof: Vec<_> = ledger_part(event, "inclusionProof")
            .iter()
            .map(|p| {
                fhirledger::ledger::checkpoint::decode_hash(p["valueString"].as_str().unwrap())
                    .unwrap()
            })
            .collect();
        fhirledger::ledger::tree::verify_inclusion(
            &proof,
            checkpoint.size,
            checkpoint.root,
            u64::try_from(index).unwrap(),
            fhirledger::ledger::tree::leaf_hash(&data),
        )
        .unwrap();
    }
    let by_clinician: Vec<&Value> = events
        .iter()
        .filter(|e| e["agent"][0]["who"]["reference"] == "Practitioner/p1")
        .collect();
    assert_eq!(by_clinician.len(), 2);
    let attempt = events
        .iter()
        .find(|e| e["outcome"] == "4")
        .expect("Bob's refused attempt is listed");
    assert!(
        attempt["outcomeDesc"]
            .as_str()
            .unwrap()
            .contains("compartment"),
        "{attempt}"
    );

    // Filters and paging.
    assert_eq!(
        view("?agent=Practitioner/p1").await.json()["entry"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let reply = view(&format!("?entity=Observation/{alice_obs}&_count=1")).await;
    assert_eq!(reply.json()["entry"].as_array().unwrap().len(), 1);
    let next = common::link(&reply.json(), "next").expect("a next page");
    let page_two = call_as_is(&app, with_token(get(&common::local(&next)), &alices_app)).await;
    assert_eq!(page_two.status, StatusCode::OK, "{}", page_two.text());
    assert!(!page_two.json()["entry"].as_array().unwrap().is_empty());
    assert_eq!(
        view("?date=ge2999-01-01").await.json()["entry"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    let past = view("?date=ge2000-01-01&date=lt2999").await.json();
    assert!(!past["entry"].as_array().unwrap().is_empty(), "{past}");
    // Outcome and purpose: an auditor's lists of refusals and of break-the-glass accesses.
    let refused = view("?outcome=4").await.json();
    let refused = refused["entry"].as_array().unwrap();
    assert_eq!(refused.len(), 1, "Bob's attempt only: {refused:?}");
    assert_eq!(refused[0]["resource"]["outcome"], "4");
    assert_eq!(
        view("?outcome=0").await.json()["entry"]
            .as_array()
            .unwrap()
            .len(),
        events.len() - 1
    );
    assert_eq!(
        view("?purpose=ETREAT").await.json()["entry"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    // The view's query is read by the search parser: what it does not apply is refused,
    // not ignored, and an unknown parameter is ignored only when the client asks leniency.
    for bad in [
        "?date=soon",
        "?_count=0",
        "?patient=Patient/a/b",
        "?code=x",
        "?date=ne2026-01-01",
        "?agent=a,b",
        "?agent:missing=true",
        "?agent=a&agent=b",
        "?_sort=date",
        "?_include=AuditEvent:agent",
        "?_summary=count",
        "?outcome=8",
        "?outcome=0&outcome=4",
    ] {
        assert_eq!(view(bad).await.status, StatusCode::BAD_REQUEST, "{bad}");
    }
    let lenient = call_as_is(
        &app,
        with_token(
            get("/fhir/AuditEvent?code=x&agent=Practitioner/p1")
                .insert_header(("Prefer", "handling=lenient")),
            &alices_app,
        ),
    )
    .await;
    assert_eq!(lenient.status, StatusCode::OK, "{}", lenient.text());
    assert_eq!(lenient.json()["entry"].as_array().unwrap().len(), 2);

    // Alice cannot list Bob's; the auditor can; nobody writes AuditEvents.
    let reply = view(&format!("?patient=Patient/{bob}")).await;
    assert_refusal(&reply, StatusCode::FORBIDDEN, "forbidden");
    let auditor = token_with("ledger.read", None, None);
    let reply = call_as_is(
        &app,
        with_token(get(&format!("/fhir/AuditEvent?patient={bob}")), &auditor),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert!(reply.text().contains(&bob_obs));
    let reply = call_as_is(
        &app,
        with_token(
            post("/fhir/AuditEvent", &json!({"resourceType": "AuditEvent"})),
            &alices_app,
        ),
    )
    .await;
    assert_refusal(&reply, StatusCode::FORBIDDEN, "forbidden");

    // The CapabilityStatement says exactly that.
    let metadata = call_as_is(&app, get("/fhir/metadata")).await.json();
    let audit = metadata["rest"][0]["resource"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "AuditEvent")
        .unwrap()
        .clone();
    assert_eq!(audit["interaction"], json!([{"code": "search-type"}]));
    let params: Vec<&str> = audit["searchParam"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        params,
        ["patient", "entity", "agent", "date", "outcome", "purpose"]
    );
    assert_eq!(
        metadata["rest"][0]["security"]["service"][0]["coding"][0]["code"],
        "SMART-on-FHIR"
    );
}

/// ES256 keys from an identity provider's JWKS verify too (the local issuer uses EdDSA);
/// a token whose header names another algorithm than the key's is refused.
#[actix_web::test]
async fn es256_tokens_from_a_jwks_verify() {
    use p256::pkcs8::EncodePrivateKey as _;
    let db = TestDb::sqlite();
    let secret = p256::SecretKey::from_slice(&rand::random::<[u8; 32]>()).unwrap();
    let point = secret.public_key().to_sec1_bytes();
    assert_eq!(point.len(), 65, "uncompressed point");
    let jwks: JwkSet = serde_json::from_value(json!({"keys": [{
        "kty": "EC", "crv": "P-256", "kid": "ec1", "use": "sig",
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
        "y": URL_SAFE_NO_PAD.encode(&point[33..]),
    }]}))
    .unwrap();
    let issuer = "https://ec-idp.test";
    let state = db.state_trusting(vec![(issuer.into(), jwks)]);
    let app = test::init_service(fhirledger::api::build_app(state.clone())).await;
    let now = jsonwebtoken::get_current_timestamp();
    let claims = json!({"iss": issuer, "aud": format!("{BASE_URL}/fhir"), "sub": "svc",
                        "scope": "system/Patient.rs", "exp": now + 300});
    let der = secret.to_pkcs8_der().unwrap();
    let key = EncodingKey::from_ec_der(der.as_bytes());
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("ec1".into());
    let token = jsonwebtoken::encode(&header, &claims, &key).unwrap();
    let reply = call_as_is(&app, with_token(get("/fhir/Patient"), &token)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    // The same key's kid under an EdDSA header: no such key for that algorithm.
    let provider = Provider::new(issuer);
    let mut mislabelled = provider.header();
    mislabelled.kid = Some("ec1".into());
    let forged = provider.sign(&mislabelled, &claims);
    let reply = call_as_is(&app, with_token(get("/fhir/Patient"), &forged)).await;
    assert_refusal(&reply, StatusCode::UNAUTHORIZED, "login");
    let ledger = state.ledger.clone();
    actix_web::rt::task::spawn_blocking(move || ledger.flush_refusals(true))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(entry_of(&app, &reply).await["reason"], "unknown-key");
}

on_both_backends!(
    patients_see_who_touched_their_record_with_proofs,
    consent_decides_what_clinicians_and_researchers_see,
    authentication_failures_are_refused_and_ledgered,
    scopes_decide_interactions_and_refusals_are_ledgered,
    patient_scopes_stay_inside_their_patients_compartment,
);
