//! Authorization cost (a bench binary, not timed tests): `cargo bench --bench access`.
//!
//! - a token's first check (signature, claims), EdDSA from the local issuer;
//! - a token already verified (served from the cache: SHA-256 of the token and a lookup);
//! - the whole per-request decision: the cached check plus the scope policy.
//!
//! The target is that authorization adds under 50 µs per request once a client's token has
//! been seen.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "benchmark harness"
)]

use std::hint::black_box;
use std::time::Instant;

use fhirledger::access::local_issuer::{LocalIssuer, TokenRequest};
use fhirledger::access::policy::authorize;
use fhirledger::access::{Permission, Principal, TokenVerifier};

const BASE_URL: &str = "https://fhir.bench";

fn main() {
    let issuer = LocalIssuer::from_seed(&rand::random(), BASE_URL).unwrap();
    let mut verifier = TokenVerifier::new(vec![BASE_URL.into()]);
    verifier.trust(issuer.issuer(), &issuer.jwks()).unwrap();
    let mint = |subject: String| {
        issuer
            .mint(&TokenRequest {
                subject,
                scope: "system/*.rs system/Observation.cruds ledger.read".into(),
                client_id: Some("bench".into()),
                fhir_user: Some("Practitioner/bench".into()),
                ttl_seconds: 3600,
                ..TokenRequest::default()
            })
            .unwrap()
    };

    let fresh: Vec<String> = (0..5_000).map(|i| mint(format!("user-{i}"))).collect();
    let started = Instant::now();
    for token in &fresh {
        black_box(verifier.verify(token).unwrap());
    }
    let first = started.elapsed().as_secs_f64() * 1e6 / fresh.len() as f64;

    let token = mint("steady".into());
    verifier.verify(&token).unwrap();
    let rounds = 200_000;
    let started = Instant::now();
    for _ in 0..rounds {
        black_box(verifier.verify(black_box(&token)).unwrap());
    }
    let cached = started.elapsed().as_secs_f64() * 1e6 / f64::from(rounds);

    let started = Instant::now();
    for _ in 0..rounds {
        let identity = verifier.verify(black_box(&token)).unwrap();
        let principal = Principal::Token(identity);
        black_box(authorize(&principal, Permission::Search, black_box("Observation")).unwrap());
    }
    let decision = started.elapsed().as_secs_f64() * 1e6 / f64::from(rounds);

    println!(
        "token first check (EdDSA, {} tokens): {first:.1} µs",
        fresh.len()
    );
    println!("token check served from the cache:     {cached:.2} µs");
    println!("cached check + scope decision:          {decision:.2} µs (target < 50 µs)");
}
