//! `/portal`: the patient's and auditor's page is served by the binary, without a token,
//! under a Content-Security-Policy that allows no inline script and no other host, and
//! every file it names is served here. (tests/portal.sh drives it in a browser.)
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

mod common;

use actix_web::http::StatusCode;
use actix_web::test::{self, TestRequest};
use common::{TestDb, call_as_is};

#[actix_web::test]
async fn portal_page_and_its_files_come_from_the_server() {
    let db = TestDb::sqlite();
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;

    for path in ["/portal", "/portal/"] {
        let page = call_as_is(&app, TestRequest::get().uri(path)).await;
        assert_eq!(page.status, StatusCode::OK, "{path}: {}", page.text());
        assert!(
            page.header("content-type")
                .unwrap()
                .starts_with("text/html")
        );
        let policy = page.header("content-security-policy").unwrap();
        for directive in [
            "default-src 'none'",
            "script-src 'self';",
            "connect-src 'self';",
            "frame-ancestors 'none'",
            "base-uri 'none'",
        ] {
            assert!(policy.contains(directive), "{directive}: {policy}");
        }
        assert_eq!(page.header("referrer-policy").unwrap(), "no-referrer");
        assert_eq!(page.header("x-content-type-options").unwrap(), "nosniff");
    }
    let page = call_as_is(&app, TestRequest::get().uri("/portal"))
        .await
        .text();
    // No inline script (the policy would block it, and a page that needs it is broken), and
    // every file named is an absolute path here, never another host.
    assert!(!page.contains("<script>"), "{page}");
    let names: Vec<&str> = page
        .match_indices(['"'])
        .filter_map(|(at, _)| page[at + 1..].split('"').next())
        .filter(|value| value.starts_with("/portal/"))
        .collect();
    assert!(names.len() >= 3, "{names:?}");
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "{page}"
    );
    for name in names {
        let file = call_as_is(&app, TestRequest::get().uri(name)).await;
        assert_eq!(file.status, StatusCode::OK, "{name}");
        let expected = match name.rsplit('.').next().unwrap() {
            "js" => "text/javascript",
            "css" => "text/css",
            "svg" => "image/svg+xml",
            other => panic!("unexpected file type {other}"),
        };
        assert!(
            file.header("content-type").unwrap().starts_with(expected),
            "{name}"
        );
    }
    // The page's module imports its checks from the server too.
    let script = call_as_is(&app, TestRequest::get().uri("/portal/portal.js"))
        .await
        .text();
    assert!(script.contains("from \"/portal/verify.js\""));
    let verifier = call_as_is(&app, TestRequest::get().uri("/portal/verify.js")).await;
    assert_eq!(verifier.status, StatusCode::OK);

    for missing in [
        "/portal/nothing.js",
        "/portal/..%2Fportal.rs",
        "/portal/index.html.bak",
    ] {
        let reply = call_as_is(&app, TestRequest::get().uri(missing)).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{missing}");
    }
    // Without a configured provider the page offers the token form only.
    let config = call_as_is(&app, TestRequest::get().uri("/portal/config.json")).await;
    assert_eq!(config.json(), serde_json::json!({}));
}
