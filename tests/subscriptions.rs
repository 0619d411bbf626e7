//! Subscriptions (rest-hook): a subscriber is told of accesses to a patient's record (a
//! read, a refusal) and of written resources its criteria match, under the same gate as its
//! searches; deliveries carry references only, are ledgered, retried with back-off, and a
//! failing endpoint ends in `error`; a subscription whose criteria its writer may not search
//! is refused.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

mod common;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

use actix_web::http::StatusCode;
use actix_web::test::{self, TestRequest};
use common::{TestDb, call, get, post, token_with};
use diesel::RunQueryDsl as _;
use fhirledger::service::subscriptions::MAX_FAILURES;
use serde_json::{Value, json};

/// A local rest-hook endpoint: records each request (its head and body) and answers with
/// the status it is set to.
struct Receiver {
    port: u16,
    received: Arc<Mutex<Vec<(String, String)>>>,
    status: Arc<AtomicU16>,
}

impl Receiver {
    fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let status = Arc::new(AtomicU16::new(200));
        let (sink, answer) = (received.clone(), status.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                let length = head
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                sink.lock()
                    .unwrap()
                    .push((head, String::from_utf8(body).unwrap()));
                let code = answer.load(Ordering::Relaxed);
                let _ = write!(
                    stream,
                    "HTTP/1.1 {code} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
            }
        });
        Self {
            port,
            received,
            status,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    fn take(&self) -> Vec<(String, String)> {
        std::mem::take(&mut *self.received.lock().unwrap())
    }
}

fn subscription(criteria: &str, endpoint: &str) -> Value {
    json!({"resourceType": "Subscription", "status": "requested", "reason": "tell me",
           "criteria": criteria,
           "channel": {"type": "rest-hook", "endpoint": endpoint,
                       "payload": "application/fhir+json",
                       "header": ["Authorization: Bearer subscriber-secret"]}})
}

fn as_token(request: TestRequest, token: &str) -> TestRequest {
    request.insert_header(("Authorization", format!("Bearer {token}")))
}

/// Sequences what is pending and delivers what is due, as the server's timers do.
async fn deliver(state: &fhirledger::api::AppState) -> usize {
    let (ledger, resources) = (state.ledger.clone(), state.resources.clone());
    tokio::task::spawn_blocking(move || {
        ledger.sequence_pending().unwrap();
        resources.deliver_notifications().unwrap()
    })
    .await
    .unwrap()
}

/// The first 1,000 entries of the ledger, as sequenced so far.
async fn ledger_entries<S, B>(app: &S) -> Vec<Value>
where
    S: common::TestApp<B>,
    B: actix_web::body::MessageBody,
{
    let page: Value = call(app, get("/ledger/entries?start=0&end=1000"))
        .await
        .json();
    page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|served| served["entry"].clone())
        .collect()
}

/// The focus references of the events the notifications received tell of, in order.
fn foci(received: &[(String, String)]) -> Vec<String> {
    received
        .iter()
        .flat_map(|(_, body)| {
            let bundle: Value = serde_json::from_str(body).unwrap();
            let parameters = bundle["entry"][0]["resource"]["parameter"].clone();
            parameters
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| p["name"] == "notification-event")
                .map(|event| {
                    event["part"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|p| p["name"] == "focus")
                        .unwrap()["valueReference"]["reference"]
                        .as_str()
                        .unwrap()
                        .to_owned()
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

async fn an_access_subscription_tells_of_reads_and_refusals(db: TestDb) {
    let state = db.state();
    let app = test::init_service(fhirledger::api::build_app(state.clone())).await;
    let patient = common::create(&app, json!({"resourceType": "Patient", "active": true})).await;
    let receiver = Receiver::start();
    // The patient's portal, acting for them: another party than the clinicians.
    let subscriber = token_of(
        "patient-portal",
        "portal",
        "system/Subscription.crud ledger.read",
        None,
    );
    let reply = call(
        &app,
        as_token(
            post(
                "/fhir/Subscription",
                &subscription(
                    &format!("AuditEvent?patient=Patient/{patient}"),
                    &receiver.endpoint(),
                ),
            ),
            &subscriber,
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    assert_eq!(reply.json()["status"], "active");
    let subscription_id = reply.json()["id"].as_str().unwrap().to_owned();
    deliver(&state).await;
    receiver.take();
    // A patient-confined token that did not write it neither reads it (the endpoint and
    // its secret are in it) nor finds it by searching.
    let patient_app = token_with("patient/*.cruds", Some(&patient), None);
    let read = call(
        &app,
        as_token(
            get(&format!("/fhir/Subscription/{subscription_id}")),
            &patient_app,
        ),
    )
    .await;
    assert_eq!(read.status, StatusCode::FORBIDDEN, "{}", read.text());
    let found = call(&app, as_token(get("/fhir/Subscription"), &patient_app)).await;
    assert_eq!(found.status, StatusCode::FORBIDDEN, "{}", found.text());

    // A clinician's read, and another patient's refused attempt: one notification of both,
    // in order, each event naming the AuditEvent of the access, with the subscriber's header.
    let read = call(&app, get(&format!("/fhir/Patient/{patient}"))).await;
    assert_eq!(read.status, StatusCode::OK);
    let stranger = token_with("patient/*.rs", Some("someone-else"), None);
    let refused = call(
        &app,
        as_token(get(&format!("/fhir/Patient/{patient}")), &stranger),
    )
    .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(deliver(&state).await, 2);
    let received = receiver.take();
    assert_eq!(received.len(), 1);
    for (head, _) in &received {
        assert!(
            head.contains("Authorization: Bearer subscriber-secret")
                || head.contains("authorization: Bearer subscriber-secret"),
            "{head}"
        );
    }
    let told = foci(&received);
    assert_eq!(told.len(), 2, "{told:?}");
    let leaves: Vec<u64> = told
        .iter()
        .map(|focus| {
            let (_, leaf) = focus.split_once("/fhir/AuditEvent/ledger-").unwrap();
            leaf.parse().unwrap()
        })
        .collect();
    assert!(
        leaves[0] < leaves[1],
        "the read is told before the refusal: {told:?}"
    );
    // What the notification names is what the subscriber's view lists.
    let view: Value = call(
        &app,
        as_token(
            get(&format!("/fhir/AuditEvent?patient=Patient/{patient}")),
            &subscriber,
        ),
    )
    .await
    .json();
    let listed: Vec<String> = view["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| format!("AuditEvent/{}", e["resource"]["id"].as_str().unwrap()))
        .collect();
    for focus in &told {
        assert!(
            listed.iter().any(|l| focus.ends_with(l.as_str())),
            "{focus} not in {listed:?}"
        );
    }
    // The subscriber's own look at the view, and the notifications, are not news.
    assert_eq!(deliver(&state).await, 0);
    assert!(receiver.take().is_empty());

    // Each delivery is ledgered, naming the subscription.
    let notified = ledger_entries(&app)
        .await
        .iter()
        .filter(|e| e["action"] == "notify")
        .count();
    assert_eq!(notified, 2);

    // The endpoint's secret header is stored nowhere in clear.
    if let Some(path) = db.sqlite_path() {
        drop(app);
        let bytes = std::fs::read(&path).unwrap();
        let wal = std::fs::read(path.with_extension("db-wal")).unwrap_or_default();
        for file in [bytes, wal] {
            assert!(
                !file
                    .windows(b"subscriber-secret".len())
                    .any(|w| w == b"subscriber-secret")
            );
        }
    }
}

on_both_backends!(an_access_subscription_tells_of_reads_and_refusals);

fn observation(code: &str) -> Value {
    json!({"resourceType": "Observation", "status": "final",
           "code": {"coding": [{"system": "http://loinc.org", "code": code}]}})
}

async fn a_resource_subscription_tells_of_matches_and_a_failing_endpoint_ends_in_error(db: TestDb) {
    let state = db.state();
    let app = test::init_service(fhirledger::api::build_app(state.clone())).await;
    let receiver = Receiver::start();
    let criteria = "Observation?code=http://loinc.org|1234-5";

    // Criteria its writer may not search, and a channel the server does not offer: refused.
    let blind = token_with("system/Subscription.c", None, None);
    let reply = call(
        &app,
        as_token(
            post(
                "/fhir/Subscription",
                &subscription(criteria, &receiver.endpoint()),
            ),
            &blind,
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    let mut websocket = subscription(criteria, &receiver.endpoint());
    websocket["channel"]["type"] = json!("websocket");
    let reply = call(&app, post("/fhir/Subscription", &websocket)).await;
    assert_eq!(
        reply.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        reply.text()
    );
    let outside = subscription(criteria, "http://192.0.2.1/hook");
    let reply = call(&app, post("/fhir/Subscription", &outside)).await;
    assert_eq!(
        reply.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        reply.text()
    );

    let subscriber = token_with("system/Subscription.crud system/Observation.s", None, None);
    let reply = call(
        &app,
        as_token(
            post(
                "/fhir/Subscription",
                &subscription(criteria, &receiver.endpoint()),
            ),
            &subscriber,
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    let subscription_id = reply.json()["id"].as_str().unwrap().to_owned();

    let matching = common::create(&app, observation("1234-5")).await;
    common::create(&app, observation("9999-9")).await;
    assert_eq!(deliver(&state).await, 1);
    let told = foci(&receiver.take());
    assert_eq!(told.len(), 1);
    assert!(
        told[0].ends_with(&format!("/fhir/Observation/{matching}/_history/1")),
        "{told:?}"
    );

    // The endpoint fails: both events are retried together with back-off, then the
    // subscription is set to error.
    receiver.status.store(500, Ordering::Relaxed);
    common::create(&app, observation("1234-5")).await;
    common::create(&app, observation("1234-5")).await;
    for attempt in 1..=MAX_FAILURES {
        deliver(&state).await;
        let received = receiver.take();
        assert_eq!(received.len(), 1, "attempt {attempt}");
        assert_eq!(foci(&received).len(), 2, "attempt {attempt}");
        // Not due again before its back-off: make it due now.
        assert_eq!(deliver(&state).await, 0);
        assert!(receiver.take().is_empty());
        diesel::sql_query("UPDATE subscription_events SET next_attempt_at = 0")
            .execute(&mut db.connect())
            .unwrap();
    }
    let stored: Value = call(&app, get(&format!("/fhir/Subscription/{subscription_id}")))
        .await
        .json();
    assert_eq!(stored["status"], "error", "{stored}");
    assert!(
        stored["error"]
            .as_str()
            .unwrap()
            .contains("the endpoint answered 500")
    );
    // An errored subscription is told nothing more.
    receiver.status.store(200, Ordering::Relaxed);
    common::create(&app, observation("1234-5")).await;
    deliver(&state).await;
    assert!(receiver.take().is_empty());

    // Asked to start again (status requested), it is active and delivers.
    let mut restart = stored.clone();
    restart["status"] = json!("requested");
    let reply = call(
        &app,
        as_token(
            common::put(&format!("/fhir/Subscription/{subscription_id}"), &restart),
            &subscriber,
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["status"], "active");
    common::create(&app, observation("1234-5")).await;
    assert_eq!(deliver(&state).await, 1);
    assert_eq!(receiver.take().len(), 1);
}

on_both_backends!(a_resource_subscription_tells_of_matches_and_a_failing_endpoint_ends_in_error);

/// `Subscription.end`, `micros` from now, as an instant.
fn instant_after(micros: i64) -> String {
    fhirledger::fhir::document::format_instant(fhirledger::clock::now_micros() + micros)
}

async fn a_subscription_turns_off_at_its_end(db: TestDb) {
    let state = db.state();
    let app = test::init_service(fhirledger::api::build_app(state.clone())).await;
    let receiver = Receiver::start();
    let criteria = "Observation?code=http://loinc.org|1234-5";

    // One whose end has already passed is off from the start.
    let mut past = subscription(criteria, &receiver.endpoint());
    past["end"] = json!(instant_after(-60_000_000));
    let reply = call(&app, post("/fhir/Subscription", &past)).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    assert_eq!(reply.json()["status"], "off");
    let mut garbled = subscription(criteria, &receiver.endpoint());
    garbled["end"] = json!("next tuesday");
    let reply = call(&app, post("/fhir/Subscription", &garbled)).await;
    assert!(reply.status.is_client_error(), "{}", reply.text());

    // One that ends in two seconds delivers until then.
    let mut ending = subscription(criteria, &receiver.endpoint());
    ending["end"] = json!(instant_after(2_000_000));
    let reply = call(&app, post("/fhir/Subscription", &ending)).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    assert_eq!(reply.json()["status"], "active");
    let id = reply.json()["id"].as_str().unwrap().to_owned();
    common::create(&app, observation("1234-5")).await;
    assert_eq!(deliver(&state).await, 1);
    assert_eq!(receiver.take().len(), 1);

    // After its end the server turns it off, and tells nothing more.
    tokio::time::sleep(std::time::Duration::from_millis(2_100)).await;
    common::create(&app, observation("1234-5")).await;
    assert_eq!(deliver(&state).await, 0);
    assert!(receiver.take().is_empty());
    let stored: Value = call(&app, get(&format!("/fhir/Subscription/{id}")))
        .await
        .json();
    assert_eq!(stored["status"], "off", "{stored}");
    assert_eq!(stored["meta"]["versionId"], "2", "{stored}");
    assert_eq!(stored["end"], ending["end"]);
}

on_both_backends!(a_subscription_turns_off_at_its_end);

/// A token from the test issuer for `subject` using `client`, with `scope`, launched for
/// `patient` if given.
fn token_of(subject: &str, client: &str, scope: &str, patient: Option<&str>) -> String {
    common::local_issuer()
        .mint(&fhirledger::access::local_issuer::TokenRequest {
            subject: subject.into(),
            scope: scope.into(),
            client_id: Some(client.into()),
            patient: patient.map(str::to_owned),
            fhir_user: None,
            purpose_of_use: None,
            ttl_seconds: 3600,
        })
        .unwrap()
}

/// A patient app's token for `subject` using `client`, launched for `patient`.
fn patient_app_token(subject: &str, client: &str, patient: &str) -> String {
    let scope = "patient/Subscription.cruds patient/*.rs";
    token_of(subject, client, scope, Some(patient))
}

async fn a_patient_app_keeps_its_own_subscriptions(db: TestDb) {
    let state = db.state();
    let app = test::init_service(fhirledger::api::build_app(state.clone())).await;
    let patient = common::create(&app, json!({"resourceType": "Patient", "active": true})).await;
    let other = common::create(&app, json!({"resourceType": "Patient", "active": true})).await;
    let receiver = Receiver::start();
    let phone = patient_app_token("patient-user", "phone-app", &patient);
    let accesses = |of: &str, endpoint: &str| {
        subscription(&format!("AuditEvent?patient=Patient/{of}"), endpoint)
    };
    // Its endpoint (no such host: a post fails, to be retried later).
    let hook = "https://phone-app.invalid/hook";

    // The server is not its probe of the hosts near it: public https endpoints only.
    for near in [
        receiver.endpoint(),
        "https://localhost/hook".to_owned(),
        "https://10.0.0.7/hook".to_owned(),
        "https://[::1]:8443/hook".to_owned(),
        "http://phone-app.invalid/hook".to_owned(),
    ] {
        let request = post("/fhir/Subscription", &accesses(&patient, &near));
        let reply = call(&app, as_token(request, &phone)).await;
        assert_eq!(
            reply.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{near}: {}",
            reply.text()
        );
    }
    // The app subscribes to accesses of its patient's record, not of another's.
    let reply = call(
        &app,
        as_token(
            post("/fhir/Subscription", &accesses(&patient, hook)),
            &phone,
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    assert_eq!(reply.json()["status"], "active");
    let mine = reply.json();
    let id = mine["id"].as_str().unwrap().to_owned();
    let reply = call(
        &app,
        as_token(post("/fhir/Subscription", &accesses(&other, hook)), &phone),
    )
    .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    let path = format!("/fhir/Subscription/{id}");
    // A clinician's token confined by Consent does not subscribe this way.
    let clinician_app = token_with(
        "user/Subscription.cruds user/*.rs",
        None,
        Some("Practitioner/dr-adams"),
    );
    let request = post("/fhir/Subscription", &accesses(&patient, hook));
    let reply = call(&app, as_token(request, &clinician_app)).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    assert!(
        reply.text().contains("subscription-unconfined"),
        "refused as a Subscription, not for want of Consent: {}",
        reply.text()
    );

    // It reads its own; nobody else confined does, not even the same user's other app.
    let read = call(&app, as_token(get(&path), &phone)).await;
    assert_eq!(read.status, StatusCode::OK, "{}", read.text());
    assert_eq!(
        read.json()["channel"]["header"][0],
        "Authorization: Bearer subscriber-secret"
    );
    for stranger in [
        patient_app_token("patient-user", "other-app", &patient),
        patient_app_token("someone-else", "phone-app", &patient),
        patient_app_token("patient-user", "phone-app", &other),
    ] {
        let read = call(&app, as_token(get(&path), &stranger)).await;
        assert_eq!(read.status, StatusCode::FORBIDDEN, "{}", read.text());
        let mut off = mine.clone();
        off["status"] = json!("off");
        let write = call(&app, as_token(common::put(&path, &off), &stranger)).await;
        assert_eq!(write.status, StatusCode::FORBIDDEN, "{}", write.text());
        let delete = call(&app, as_token(TestRequest::delete().uri(&path), &stranger)).await;
        assert_eq!(delete.status, StatusCode::FORBIDDEN, "{}", delete.text());
    }
    // Searches, histories and versions of Subscriptions stay closed to it.
    for closed in [
        "/fhir/Subscription".to_owned(),
        format!("{path}/_history"),
        format!("{path}/_history/1"),
    ] {
        let reply = call(&app, as_token(get(&closed), &phone)).await;
        assert_eq!(
            reply.status,
            StatusCode::FORBIDDEN,
            "{closed}: {}",
            reply.text()
        );
    }
    // An administrator's subscription to the same record is not the app's to read, and an
    // update to an id that is not there creates nothing.
    let to_receiver = accesses(&patient, &receiver.endpoint());
    let reply = call(&app, post("/fhir/Subscription", &to_receiver)).await;
    let theirs = format!(
        "/fhir/Subscription/{}",
        reply.json()["id"].as_str().unwrap()
    );
    let read = call(&app, as_token(get(&theirs), &phone)).await;
    assert_eq!(read.status, StatusCode::FORBIDDEN, "{}", read.text());
    let mut planted = accesses(&patient, hook);
    planted["id"] = json!("planted");
    let reply = call(
        &app,
        as_token(common::put("/fhir/Subscription/planted", &planted), &phone),
    )
    .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    deliver(&state).await;
    receiver.take();

    // A clinician's read is told to the administrator's receiver and posted, under the app's
    // gate, to the app's endpoint (which fails: the post is to be retried).
    let clinician = token_of("dr-adams", "ehr", "system/Patient.r", None);
    let read = call(
        &app,
        as_token(get(&format!("/fhir/Patient/{patient}")), &clinician),
    )
    .await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(deliver(&state).await, 1);
    assert_eq!(foci(&receiver.take()).len(), 1);
    let row = fhirledger::store::subscriptions::subscription(&mut db.connect(), &id)
        .unwrap()
        .unwrap();
    assert_eq!(row.failures, 1, "posted once, not skipped");

    // It may not point its subscription at another patient's record, but may end it; the
    // server's own write at its end keeps it the app's.
    let mut elsewhere = mine.clone();
    elsewhere["criteria"] = json!(format!("AuditEvent?patient=Patient/{other}"));
    let reply = call(&app, as_token(common::put(&path, &elsewhere), &phone)).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    // Nor at a host near the server, even with a token that may update but not create.
    let updater = token_of(
        "patient-user",
        "phone-app",
        "patient/Subscription.ru patient/*.rs",
        Some(&patient),
    );
    let mut near = mine.clone();
    near["channel"]["endpoint"] = json!(receiver.endpoint());
    let reply = call(&app, as_token(common::put(&path, &near), &updater)).await;
    assert_eq!(
        reply.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        reply.text()
    );
    let mut ending = mine.clone();
    ending["end"] = json!(instant_after(1_000_000));
    let reply = call(&app, as_token(common::put(&path, &ending), &phone)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    deliver(&state).await;
    let read = call(&app, as_token(get(&path), &phone)).await;
    assert_eq!(read.status, StatusCode::OK, "{}", read.text());
    assert_eq!(read.json()["status"], "off");

    // Its writes are ledgered under the rule that let it make them.
    deliver(&state).await;
    let entries = ledger_entries(&app).await;
    let created = entries
        .iter()
        .find(|e| e["action"] == "create" && e["resources"][0]["id"] == id.as_str())
        .unwrap();
    assert_eq!(created["rule"], "subscription-owner", "{created}");

    // And delete it.
    let delete = call(&app, as_token(TestRequest::delete().uri(&path), &phone)).await;
    assert!(delete.status.is_success(), "{}", delete.text());
    let read = call(&app, as_token(get(&path), &phone)).await;
    assert_eq!(read.status, StatusCode::FORBIDDEN, "{}", read.text());
}

on_both_backends!(a_patient_app_keeps_its_own_subscriptions);

/// Calls the app, failing rather than hanging when no answer comes within 10 s.
async fn call_within<S, B>(app: &S, request: TestRequest) -> common::Reply
where
    S: common::TestApp<B>,
    B: actix_web::body::MessageBody,
{
    tokio::time::timeout(std::time::Duration::from_secs(10), call(app, request))
        .await
        .expect("an answer within 10 s")
}

async fn an_update_to_criteria_its_writer_may_not_search_is_refused_and_holds_nothing(db: TestDb) {
    let state = db.state();
    let app = test::init_service(fhirledger::api::build_app(state.clone())).await;
    let receiver = Receiver::start();
    let writer = token_with("system/Subscription.cru system/Observation.s", None, None);
    let created = subscription(
        "Observation?code=http://loinc.org|1234-5",
        &receiver.endpoint(),
    );
    let reply = call_within(
        &app,
        as_token(post("/fhir/Subscription", &created), &writer),
    )
    .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    let mut changed = reply.json();
    let path = format!("/fhir/Subscription/{}", changed["id"].as_str().unwrap());
    changed["criteria"] = json!("Condition?code=http://snomed.info/sct|44054006");

    // The refusal is found inside the update's transaction; on SQLite its ledger entry once
    // waited there for the writer that transaction held, and every write after it too.
    let reply = call_within(&app, as_token(common::put(&path, &changed), &writer)).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    let reply = call_within(
        &app,
        post("/fhir/Patient", &json!({"resourceType": "Patient"})),
    )
    .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    let stored: Value = call_within(&app, get(&path)).await.json();
    assert_eq!(stored["meta"]["versionId"], "1");

    // The refusal is ledgered.
    deliver(&state).await;
    let entries = ledger_entries(&app).await;
    let refused = entries
        .iter()
        .filter(|e| e["outcome"] == "deny" && e["action"] == "update")
        .count();
    assert!(refused >= 1, "{entries:?}");
}

on_both_backends!(an_update_to_criteria_its_writer_may_not_search_is_refused_and_holds_nothing);

async fn a_hanging_endpoint_holds_up_only_its_own_subscription(db: TestDb) {
    let state = db.state();
    let app = test::init_service(fhirledger::api::build_app(state.clone())).await;
    let receiver = Receiver::start();
    // Takes connections (the kernel does) and never answers.
    let hanging = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hanging_endpoint = format!(
        "http://127.0.0.1:{}/hook",
        hanging.local_addr().unwrap().port()
    );
    let criteria = "Observation?code=http://loinc.org|1234-5";
    let mut ids = Vec::new();
    for endpoint in [hanging_endpoint, receiver.endpoint()] {
        let reply = call(
            &app,
            post("/fhir/Subscription", &subscription(criteria, &endpoint)),
        )
        .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
        ids.push(reply.json()["id"].as_str().unwrap().to_owned());
    }
    common::create(&app, observation("1234-5")).await;

    // The answering endpoint is told at once; the round does not wait out the other's
    // timeout (5 s).
    let started = std::time::Instant::now();
    assert_eq!(deliver(&state).await, 1);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(receiver.take().len(), 1);

    // The hanging post ends at its timeout and is recorded on its own thread: a failure,
    // retried later.
    let failures = || {
        fhirledger::store::subscriptions::subscription(&mut db.connect(), &ids[0])
            .unwrap()
            .unwrap()
            .failures
    };
    assert_eq!(failures(), 0);
    let waited = std::time::Instant::now();
    while failures() == 0 && waited.elapsed() < std::time::Duration::from_secs(10) {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(failures(), 1);
    drop(hanging);
}

on_both_backends!(a_hanging_endpoint_holds_up_only_its_own_subscription);
