//! `GET /metrics`: Prometheus text without a token, counting requests by interaction and
//! status and the ledger's group commits, and holding nothing of any request's content.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

mod common;

use actix_web::http::StatusCode;
use actix_web::test;
use common::{TestDb, call, call_as_is, get};
use serde_json::json;

/// The value of the first sample line that starts with `prefix` (name and labels).
fn sample(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|line| line.starts_with(prefix))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0.0)
}

async fn metrics_count_interactions_and_hold_no_content(db: TestDb) {
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    let family = "Quorblefenwick";
    let id = common::create(
        &app,
        json!({"resourceType": "Patient", "name": [{"family": family}]}),
    )
    .await;
    let before = call_as_is(&app, get("/metrics")).await;
    assert_eq!(before.status, StatusCode::OK, "no token needed");
    assert!(
        before
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/plain")),
        "{:?}",
        before.header("content-type")
    );
    let reads = "fhirledger_http_requests_total{interaction=\"read\",status=\"200\"}";
    let missing = "fhirledger_http_requests_total{interaction=\"read\",status=\"404\"}";
    let commits = "fhirledger_ledger_group_commit_entries_sum";
    let (reads_before, missing_before, commits_before) = (
        sample(&before.text(), reads),
        sample(&before.text(), missing),
        sample(&before.text(), commits),
    );

    for _ in 0..3 {
        assert_eq!(
            call(&app, get(&format!("/fhir/Patient/{id}"))).await.status,
            StatusCode::OK
        );
    }
    assert_eq!(
        call(&app, get("/fhir/Patient/no-such-patient"))
            .await
            .status,
        StatusCode::NOT_FOUND
    );

    let after = call_as_is(&app, get("/metrics")).await.text();
    // Other tests of this binary may read at the same time: at least ours were counted.
    assert!(sample(&after, reads) >= reads_before + 3.0, "{after}");
    assert!(sample(&after, missing) >= missing_before + 1.0, "{after}");
    // Each read's entry went through a group commit.
    assert!(sample(&after, commits) >= commits_before + 4.0, "{after}");
    assert!(after.contains("fhirledger_http_request_duration_seconds_bucket{interaction=\"read\""));
    assert!(after.contains("fhirledger_db_pool_connections{state=\"idle\"}"));
    for content in [id.as_str(), family, "no-such-patient"] {
        assert!(!after.contains(content), "/metrics holds {content}");
    }
}

on_both_backends!(metrics_count_interactions_and_hold_no_content);
