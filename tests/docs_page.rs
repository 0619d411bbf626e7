//! `/docs`: the API viewer (Swagger UI) is served by the binary itself, without a token,
//! names no other host, and renders `/openapi.json`.
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

/// The values of every `attribute="…"` in `html`.
fn attribute_values<'a>(html: &'a str, attribute: &str) -> Vec<&'a str> {
    let needle = format!(" {attribute}=\"");
    html.match_indices(&needle)
        .map(|(at, _)| {
            let value = &html[at + needle.len()..];
            &value[..value.find('"').expect("closing quote")]
        })
        .collect()
}

#[actix_web::test]
async fn docs_page_and_its_files_come_from_the_server() {
    let db = TestDb::sqlite();
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;

    // `/docs/` is trimmed to `/docs` by the app, so both answer the page (no redirect).
    for path in ["/docs", "/docs/"] {
        let page = call_as_is(&app, TestRequest::get().uri(path)).await;
        assert_eq!(page.status, StatusCode::OK, "{path}: {}", page.text());
        assert!(
            page.header("content-type")
                .unwrap()
                .starts_with("text/html"),
            "{path}"
        );
    }
    let page = call_as_is(&app, TestRequest::get().uri("/docs"))
        .await
        .text();
    assert!(!page.contains("cdn."), "{page}");

    let scripts = attribute_values(&page, "src");
    let stylesheets: Vec<&str> = page
        .split('<')
        .filter(|tag| tag.starts_with("link ") && tag.contains("rel=\"stylesheet\""))
        .flat_map(|tag| attribute_values(tag, "href"))
        .collect();
    assert!(scripts.len() >= 2, "{page}");
    assert!(!stylesheets.is_empty(), "{page}");
    let mut initializer = None;
    for (files, content_type) in [(&scripts, "text/javascript"), (&stylesheets, "text/css")] {
        for &file in files.iter() {
            // Absolute paths on this server: `/docs` has no trailing slash, so a relative
            // name would resolve outside `/docs/`; a scheme or `//` would be another host.
            assert!(
                file.starts_with("/docs/") && !file.contains(':') && !file.starts_with("//"),
                "{file} is not served from /docs/ on this server"
            );
            let served = call_as_is(&app, TestRequest::get().uri(file)).await;
            assert_eq!(served.status, StatusCode::OK, "{file}");
            let served_type = served.header("content-type").unwrap();
            assert!(
                served_type.starts_with(content_type)
                    || (content_type == "text/javascript"
                        && served_type.starts_with("application/javascript")),
                "{file}: {served_type}"
            );
            assert!(!served.body.is_empty(), "{file}");
            if file.ends_with("swagger-initializer.js") {
                initializer = Some(served.text());
            }
        }
    }

    // The initializer renders this server's document and turns the public validator off.
    let initializer = initializer.expect("the page loads swagger-initializer.js");
    assert!(
        initializer.contains("\"url\": \"/openapi.json\""),
        "{initializer}"
    );
    assert!(
        initializer.contains("\"validatorUrl\": \"none\""),
        "{initializer}"
    );
    assert!(!initializer.contains("https://"), "{initializer}");

    // The document it points at is served without a token, and an unknown file is a 404.
    let document = call_as_is(&app, TestRequest::get().uri("/openapi.json")).await;
    assert_eq!(document.status, StatusCode::OK);
    assert_eq!(document.json()["openapi"], "3.1.0");
    let missing = call_as_is(&app, TestRequest::get().uri("/docs/no-such-file.js")).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
}
