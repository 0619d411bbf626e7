//! Search benchmarks (a bench binary, not timed tests): `cargo bench --bench search`.
//!
//! - transaction Bundle import throughput: Synthea-like transaction Bundles, cloned from
//!   the two fixture Bundles in `shared/fixtures/fhir/synthea/` with fresh `urn:uuid:` full
//!   URLs (and every reference to them), a unique suffix on the patient's family name, fresh
//!   identifier values and dates shifted per copy, processed by `process_bundle` from two
//!   threads (`FHIRLEDGER_BENCH_LOADERS` sets how many) until the database holds 10,000 and
//!   then `FHIRLEDGER_BENCH_RESOURCES` (default 100,000) resources;
//! - search latency at 10,000 and at the full size, at the service level (parse, search,
//!   decrypt and the search's ledger entry, as the HTTP handler does minus HTTP and
//!   rendering), one thread, random targets among the loaded patients: identifier, family
//!   name prefix, one patient's observations in a date range, one patient's observations,
//!   and two multi-patient searches for context. `FHIRLEDGER_BENCH_QUERIES` (default 2,000)
//!   sets the queries per kind; each kind also stops after 60 s, and a kind whose median
//!   was over 1 s at 10,000 is skipped at the full size.
//!
//! SQLite unless `FHIRLEDGER_BENCH_SQLITE=0`; PostgreSQL too when
//! `FHIRLEDGER_BENCH_DATABASE_URL` names a server whose user may create databases (a scratch
//! database is created and dropped). The ledger sequencer does not run: search and write
//! entries stay pending.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "benchmark harness"
)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::{Datelike as _, NaiveDate};
use diesel::{Connection as _, RunQueryDsl as _};
use fhirledger::access::RequestContext;
use fhirledger::api::AppState;
use fhirledger::crypto::{BlindIndexKey, MasterKey};
use fhirledger::fhir::bundle_request::parse_bundle;
use fhirledger::fhir::search_query::{Handling, parse_search};
use fhirledger::ledger::LedgerKey;
use fhirledger::server::{Keys, StateOptions, prepare_state};
use fhirledger::service::bundles::Outcome;
use fhirledger::store::DatabaseUrl;
use rand::Rng as _;
use rand::seq::SliceRandom as _;
use serde_json::Value;

const BASE_URL: &str = "http://fhir.bench";
const SYNTHEA_SYSTEM: &str = "https://github.com/synthetichealth/synthea";
/// Loading threads (concurrent import clients) unless `FHIRLEDGER_BENCH_LOADERS` says.
const LOAD_THREADS: usize = 2;
const FIRST_STOP: usize = 10_000;
/// Each search kind stops after this long, whatever the query count.
const KIND_BUDGET: Duration = Duration::from_secs(60);
/// A kind whose median query took longer than this is skipped at the next, larger size (a
/// single query there could run for many minutes).
const SKIP_AFTER_MS: f64 = 1000.0;

// ---------------------------------------------------------------------------------------
// Bundle templates

/// A piece of a fixture Bundle's compact JSON text.
enum Segment {
    Text(String),
    /// The n-th distinct UUID of the fixture (full URLs, ids, references, identifiers).
    Uuid(usize),
    /// A `YYYY-MM-DD` date (alone or starting a dateTime/instant), shifted per copy.
    Date(NaiveDate),
    /// The patient's family name, which gets a unique suffix per copy.
    Family,
    /// A non-UUID patient identifier value (SSN, licence, passport): digits scrambled.
    Digits(String),
}

/// One fixture Bundle cut into segments, and what the searches need to know about it.
struct Template {
    name: String,
    segments: Vec<Segment>,
    uuids: usize,
    resources: usize,
    family: String,
    /// Which UUID is the value of the patient's Synthea identifier.
    identifier_uuid: usize,
    /// Observation effective dates, unshifted.
    observation_dates: Vec<NaiveDate>,
    /// Observation LOINC codes (one per coding, repeats kept).
    observation_codes: Vec<String>,
}

/// One generated copy: the Bundle and the values the searches look for.
struct Generated {
    body: String,
    identifier: String,
    family: String,
    observation_dates: Vec<NaiveDate>,
}

/// A patient in the database.
struct Loaded {
    id: String,
    identifier: String,
    family: String,
    observation_dates: Vec<NaiveDate>,
}

fn is_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
}

fn uuid_at(bytes: &[u8], i: usize) -> bool {
    if i + 36 > bytes.len() || (i > 0 && is_hex(bytes[i - 1])) {
        return false;
    }
    if bytes.get(i + 36).is_some_and(|b| is_hex(*b)) {
        return false;
    }
    (0..36).all(|k| match k {
        8 | 13 | 18 | 23 => bytes[i + k] == b'-',
        _ => is_hex(bytes[i + k]),
    })
}

fn date_at(text: &str, i: usize) -> Option<NaiveDate> {
    let bytes = text.as_bytes();
    if i + 11 > bytes.len() || !matches!(bytes[i + 10], b'"' | b'T') {
        return None;
    }
    let shape = (0..10).all(|k| match k {
        4 | 7 => bytes[i + k] == b'-',
        _ => bytes[i + k].is_ascii_digit(),
    });
    if !shape {
        return None;
    }
    NaiveDate::from_ymd_opt(
        text[i..i + 4].parse().ok()?,
        text[i + 5..i + 7].parse().ok()?,
        text[i + 8..i + 10].parse().ok()?,
    )
}

fn format_date(date: NaiveDate) -> String {
    format!("{:04}-{:02}-{:02}", date.year(), date.month(), date.day())
}

impl Template {
    fn load(path: &Path) -> Self {
        let value: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let entries = value["entry"].as_array().unwrap();
        let patient = entries
            .iter()
            .map(|e| &e["resource"])
            .find(|r| r["resourceType"] == "Patient")
            .unwrap();
        let family = patient["name"][0]["family"].as_str().unwrap().to_owned();
        let identifiers = patient["identifier"].as_array().unwrap();
        let synthea_value = identifiers
            .iter()
            .find(|i| i["system"] == SYNTHEA_SYSTEM)
            .and_then(|i| i["value"].as_str())
            .unwrap()
            .to_owned();
        let other_values: Vec<String> = identifiers
            .iter()
            .filter_map(|i| i["value"].as_str())
            .filter(|v| !uuid_at(v.as_bytes(), 0))
            .map(|v| format!("\"value\":\"{v}\""))
            .collect();
        let mut observation_dates = Vec::new();
        let mut observation_codes = Vec::new();
        for resource in entries.iter().map(|e| &e["resource"]) {
            if resource["resourceType"] != "Observation" {
                continue;
            }
            if let Some(when) = resource["effectiveDateTime"].as_str() {
                observation_dates.push(date_at(&format!("{when}\""), 0).unwrap());
            }
            for coding in resource["code"]["coding"].as_array().into_iter().flatten() {
                if coding["system"] == "http://loinc.org" {
                    observation_codes.push(coding["code"].as_str().unwrap().to_owned());
                }
            }
        }

        let text = serde_json::to_string(&value).unwrap();
        let family_field = format!("\"family\":\"{family}\"");
        let bytes = text.as_bytes();
        let mut segments = Vec::new();
        let mut uuids: HashMap<&str, usize> = HashMap::new();
        let mut literal = String::new();
        let mut i = 0;
        let flush = |literal: &mut String, segments: &mut Vec<Segment>| {
            if !literal.is_empty() {
                segments.push(Segment::Text(std::mem::take(literal)));
            }
        };
        while i < bytes.len() {
            if uuid_at(bytes, i) {
                flush(&mut literal, &mut segments);
                let next = uuids.len();
                let n = *uuids.entry(&text[i..i + 36]).or_insert(next);
                segments.push(Segment::Uuid(n));
                i += 36;
            } else if bytes[i] == b'"'
                && let Some(date) = date_at(&text, i + 1)
            {
                literal.push('"');
                flush(&mut literal, &mut segments);
                segments.push(Segment::Date(date));
                i += 11;
            } else if text[i..].starts_with(&family_field) {
                literal.push_str("\"family\":\"");
                flush(&mut literal, &mut segments);
                segments.push(Segment::Family);
                literal.push('"');
                i += family_field.len();
            } else if let Some(field) = other_values.iter().find(|f| text[i..].starts_with(*f)) {
                literal.push_str("\"value\":\"");
                flush(&mut literal, &mut segments);
                segments.push(Segment::Digits(field[9..field.len() - 1].to_owned()));
                literal.push('"');
                i += field.len();
            } else {
                let ch = text[i..].chars().next().unwrap();
                literal.push(ch);
                i += ch.len_utf8();
            }
        }
        flush(&mut literal, &mut segments);
        let identifier_uuid = uuids[synthea_value.as_str()];
        Self {
            name: path.file_name().unwrap().to_string_lossy().into_owned(),
            segments,
            uuids: uuids.len(),
            resources: entries.len(),
            family,
            identifier_uuid,
            observation_dates,
            observation_codes,
        }
    }

    /// A copy with fresh UUIDs, a unique family name, scrambled identifiers and every date
    /// moved back by the same random number of days (up to ten years).
    fn render(&self, rng: &mut impl rand::Rng) -> Generated {
        let ids: Vec<String> = (0..self.uuids)
            .map(|_| uuid::Uuid::new_v4().to_string())
            .collect();
        let shift = chrono::Duration::days(-rng.gen_range(0..3650));
        let suffix: String = (0..6).map(|_| rng.gen_range(b'a'..=b'z') as char).collect();
        let family = format!("{}{suffix}", self.family);
        let mut body = String::with_capacity(self.segments.len() * 64);
        for segment in &self.segments {
            match segment {
                Segment::Text(text) => body.push_str(text),
                Segment::Uuid(n) => body.push_str(&ids[*n]),
                Segment::Date(date) => body.push_str(&format_date(*date + shift)),
                Segment::Family => body.push_str(&family),
                Segment::Digits(value) => body.extend(value.chars().map(|c| {
                    if c.is_ascii_digit() {
                        char::from(b'0' + rng.gen_range(0..10u8))
                    } else {
                        c
                    }
                })),
            }
        }
        Generated {
            body,
            identifier: ids[self.identifier_uuid].clone(),
            family,
            observation_dates: self.observation_dates.iter().map(|d| *d + shift).collect(),
        }
    }
}

fn templates() -> Vec<Template> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/fhir/synthea");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no fixture Bundles in {}", dir.display());
    paths.iter().map(|p| Template::load(p)).collect()
}

// ---------------------------------------------------------------------------------------
// Import

struct LoadStats {
    resources: usize,
    bundles: usize,
    seconds: f64,
    /// Time the loading threads spent generating Bundles (client side), summed.
    render_seconds: f64,
}

/// Imports Bundles from [`loaders`] threads until `loaded` reaches `target` resources.
fn load(
    state: &AppState,
    rt: &tokio::runtime::Runtime,
    templates: &[Template],
    target: usize,
    loaded: &AtomicUsize,
    patients: &Mutex<Vec<Loaded>>,
) -> LoadStats {
    let before = loaded.load(Ordering::SeqCst);
    let bundles = AtomicUsize::new(0);
    let render_nanos = AtomicUsize::new(0);
    let fhir_base = state.fhir_base();
    let started = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..loaders() {
            let (bundles, render_nanos, fhir_base) = (&bundles, &render_nanos, &fhir_base);
            scope.spawn(move || {
                let mut rng = rand::thread_rng();
                let ctx = RequestContext::internal(format!("bench-load-{t}"));
                loop {
                    let template = templates.choose(&mut rng).unwrap();
                    if loaded.fetch_add(template.resources, Ordering::SeqCst) >= target {
                        loaded.fetch_sub(template.resources, Ordering::SeqCst);
                        break;
                    }
                    let render_started = Instant::now();
                    let copy = template.render(&mut rng);
                    render_nanos.fetch_add(
                        render_started.elapsed().as_nanos() as usize,
                        Ordering::Relaxed,
                    );
                    let bundle = parse_bundle(copy.body.as_bytes(), fhir_base).unwrap();
                    let results = rt
                        .block_on(
                            state
                                .resources
                                .process_bundle(&ctx, bundle, Handling::Strict),
                        )
                        .unwrap_or_else(|e| {
                            panic!("{}: entry {} failed: {}", template.name, e.index, e.error)
                        });
                    assert_eq!(results.len(), template.resources);
                    let mut patient_id = None;
                    for result in results {
                        match result.unwrap() {
                            Outcome::Written { resource, .. }
                                if resource.resource_type.as_str() == "Patient" =>
                            {
                                patient_id = Some(resource.id.to_string());
                            }
                            Outcome::Written { .. } => {}
                            _ => panic!("a transaction POST did something other than write"),
                        }
                    }
                    bundles.fetch_add(1, Ordering::Relaxed);
                    patients.lock().unwrap().push(Loaded {
                        id: patient_id.unwrap(),
                        identifier: copy.identifier,
                        family: copy.family,
                        observation_dates: copy.observation_dates,
                    });
                }
            });
        }
    });
    LoadStats {
        resources: loaded.load(Ordering::SeqCst) - before,
        bundles: bundles.into_inner(),
        seconds: started.elapsed().as_secs_f64(),
        render_seconds: render_nanos.into_inner() as f64 / 1e9,
    }
}

// ---------------------------------------------------------------------------------------
// Search

struct Latency {
    kind: String,
    queries: usize,
    p50: f64,
    p99: f64,
    max: f64,
    average_matches: f64,
    /// Share of queries with at least one match.
    hit_rate: f64,
}

impl Latency {
    fn skipped(kind: &str) -> Self {
        Self {
            kind: kind.to_owned(),
            queries: 0,
            p50: f64::NAN,
            p99: f64::NAN,
            max: f64::NAN,
            average_matches: f64::NAN,
            hit_rate: f64::NAN,
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Runs up to `queries` searches of one kind (stopping after [`KIND_BUDGET`]), one thread.
fn measure(
    bench: &Bench<'_>,
    kind: &str,
    resource_type: &str,
    queries: usize,
    mut params: impl FnMut() -> Vec<(String, String)>,
) -> Latency {
    let Bench {
        state,
        rt,
        skip,
        size,
    } = bench;
    if skip.iter().any(|k| k == kind) {
        println!(
            "  at {size}: {kind}: skipped (median over {SKIP_AFTER_MS} ms at the previous size)"
        );
        return Latency::skipped(kind);
    }
    let ctx = RequestContext::internal("bench-search");
    let index = state.resources.search_index();
    let mut ms = Vec::with_capacity(queries);
    let mut matches = 0usize;
    let mut hits = 0usize;
    let started = Instant::now();
    while ms.len() < queries && started.elapsed() < KIND_BUDGET {
        let params = params();
        let t = Instant::now();
        let request = parse_search(
            index.registry(),
            index,
            vec![resource_type.to_owned()],
            &params,
            Handling::Strict,
        )
        .unwrap_or_else(|e| panic!("{params:?}: {e:?}"));
        let page = rt
            .block_on(state.resources.search(&ctx, request))
            .unwrap_or_else(|e| panic!("{params:?}: {e}"));
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
        matches += page.matches.len();
        hits += usize::from(!page.matches.is_empty());
    }
    let n = ms.len();
    ms.sort_by(f64::total_cmp);
    println!(
        "  at {size}: {kind}: p50 {:.2} ms, p99 {:.2} ms ({n} queries)",
        percentile(&ms, 50.0),
        percentile(&ms, 99.0)
    );
    Latency {
        kind: kind.to_owned(),
        queries: n,
        p50: percentile(&ms, 50.0),
        p99: percentile(&ms, 99.0),
        max: ms.last().copied().unwrap_or(f64::NAN),
        average_matches: matches as f64 / n.max(1) as f64,
        hit_rate: hits as f64 / n.max(1) as f64,
    }
}

/// What every measurement of one round needs.
struct Bench<'a> {
    state: &'a AppState,
    rt: &'a tokio::runtime::Runtime,
    /// Kinds too slow at the previous size.
    skip: Vec<String>,
    /// Resources in the database.
    size: usize,
}

fn searches(
    bench: &Bench<'_>,
    templates: &[Template],
    patients: &[Loaded],
    queries: usize,
) -> Vec<Latency> {
    let mut rng = rand::thread_rng();
    let pick = || &patients[rand::thread_rng().gen_range(0..patients.len())];
    let single = [
        measure(bench, "identifier", "Patient", queries, || {
            let p = pick();
            vec![(
                "identifier".into(),
                format!("{SYNTHEA_SYSTEM}|{}", p.identifier),
            )]
        }),
        // The base name plus four letters of the unique suffix: a prefix match (the value is
        // not a whole family name) that finds about one patient.
        measure(
            bench,
            "family prefix (~1 patient)",
            "Patient",
            queries,
            || {
                let p = pick();
                let prefix: String = p
                    .family
                    .chars()
                    .take(p.family.chars().count() - 2)
                    .collect();
                vec![("family".into(), prefix)]
            },
        ),
        measure(
            bench,
            "Observation subject + date range",
            "Observation",
            queries,
            || {
                let p = pick();
                let day = *p.observation_dates.choose(&mut rng).unwrap();
                vec![
                    ("subject".into(), format!("Patient/{}", p.id)),
                    (
                        "date".into(),
                        format!("ge{}", format_date(day - chrono::Duration::days(30))),
                    ),
                    (
                        "date".into(),
                        format!("le{}", format_date(day + chrono::Duration::days(30))),
                    ),
                ]
            },
        ),
        measure(
            bench,
            "Observation subject (page 50)",
            "Observation",
            queries,
            || {
                let p = pick();
                vec![("subject".into(), format!("Patient/{}", p.id))]
            },
        ),
    ];
    for latency in single.iter().filter(|l| l.queries > 0) {
        assert!(
            latency.hit_rate >= 0.9,
            "{}: only {:.0}% of queries matched anything",
            latency.kind,
            latency.hit_rate * 100.0
        );
    }
    // The most common LOINC code of the fixtures' observations.
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for code in templates.iter().flat_map(|t| &t.observation_codes) {
        *counts.entry(code.as_str()).or_default() += 1;
    }
    let mut common: Vec<(&str, usize)> = counts.into_iter().collect();
    common.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let code = common[0].0;
    let broad = queries.div_ceil(10);
    let base = &templates[0].family;
    let short: String = base.chars().take(4).collect();
    let mut all: Vec<Latency> = single.into_iter().collect();
    all.push(measure(
        bench,
        &format!("Observation code={code} _count=50 (context)"),
        "Observation",
        broad,
        || {
            vec![
                ("code".into(), format!("http://loinc.org|{code}")),
                ("_count".into(), "50".into()),
            ]
        },
    ));
    all.push(measure(
        bench,
        &format!("Patient family={short} (context)"),
        "Patient",
        broad,
        || vec![("family".into(), short.clone())],
    ));
    all
}

// ---------------------------------------------------------------------------------------
// Report

struct Report {
    backend: String,
    loads: Vec<(String, LoadStats)>,
    searches: Vec<(usize, Vec<Latency>)>,
    pending_ledger_entries: i64,
}

fn loaders() -> usize {
    std::env::var("FHIRLEDGER_BENCH_LOADERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(LOAD_THREADS)
}

fn print_report(report: &Report) {
    println!();
    println!("{}", report.backend);
    println!(
        "  {:<28} {:>10} {:>8} {:>10} {:>13} {:>10}",
        format!("import ({} threads)", loaders()),
        "resources",
        "bundles",
        "seconds",
        "resources/s",
        "render s"
    );
    let mut total = (0, 0, 0.0, 0.0);
    for (label, stats) in &report.loads {
        println!(
            "  {:<28} {:>10} {:>8} {:>10.1} {:>13.0} {:>10.2}",
            label,
            stats.resources,
            stats.bundles,
            stats.seconds,
            stats.resources as f64 / stats.seconds,
            stats.render_seconds
        );
        total.0 += stats.resources;
        total.1 += stats.bundles;
        total.2 += stats.seconds;
        total.3 += stats.render_seconds;
    }
    println!(
        "  {:<28} {:>10} {:>8} {:>10.1} {:>13.0} {:>10.2}",
        "total",
        total.0,
        total.1,
        total.2,
        total.0 as f64 / total.2,
        total.3
    );
    for (size, latencies) in &report.searches {
        println!();
        println!(
            "  {:<48} {:>7} {:>8} {:>8} {:>8} {:>8} {:>6}",
            format!("search at {size} resources (1 thread)"),
            "queries",
            "p50 ms",
            "p99 ms",
            "max ms",
            "matches",
            "hit %"
        );
        for l in latencies {
            if l.queries == 0 {
                println!(
                    "  {:<48} skipped: median over {SKIP_AFTER_MS} ms at the previous size",
                    l.kind
                );
                continue;
            }
            println!(
                "  {:<48} {:>7} {:>8.2} {:>8.2} {:>8.2} {:>8.1} {:>6.0}",
                l.kind,
                l.queries,
                l.p50,
                l.p99,
                l.max,
                l.average_matches,
                l.hit_rate * 100.0
            );
        }
    }
    println!(
        "  pending ledger entries at the end: {}",
        report.pending_ledger_entries
    );
}

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

fn count(url: &DatabaseUrl, sql: &str) -> i64 {
    let mut conn = fhirledger::store::connection::establish(url).unwrap();
    let rows: Vec<Count> = diesel::sql_query(sql).load(&mut conn).unwrap();
    rows[0].n
}

fn run(
    backend: &str,
    url: &DatabaseUrl,
    templates: &[Template],
    total: usize,
    queries: usize,
) -> Report {
    println!("{backend}: loading…");
    let state = prepare_state(
        url,
        Keys {
            master: MasterKey::generate(),
            ledger: LedgerKey::generate("fhir.bench/ledger").unwrap(),
            index: BlindIndexKey::generate(),
            local_issuer: None,
        },
        &StateOptions {
            base_url: BASE_URL.into(),
            max_body_bytes: 16 * 1024 * 1024,
            pool_size: 8,
            ledger_batch_size: 4096,
            auth_failures_per_minute: 60,
            trusted_issuers: Vec::new(),
            smart: None,
            cors_origins: Vec::new(),
            export_retention: std::time::Duration::from_secs(3600),
            witnesses: Vec::new(),
            previous_master_keys: std::sync::Arc::new(Vec::new()),
            previous_ledger_key: None,
            index_maintenance: false,
        },
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(LOAD_THREADS)
        .enable_all()
        .build()
        .unwrap();
    let loaded = AtomicUsize::new(0);
    let patients = Mutex::new(Vec::new());
    let mut report = Report {
        backend: backend.to_owned(),
        loads: Vec::new(),
        searches: Vec::new(),
        pending_ledger_entries: 0,
    };
    let mut stops = vec![FIRST_STOP.min(total)];
    if total > FIRST_STOP {
        stops.push(total);
    }
    let mut from = 0;
    let mut skip = Vec::new();
    for stop in stops {
        let stats = load(&state, &rt, templates, stop, &loaded, &patients);
        let in_db = count(url, "SELECT COUNT(*) AS n FROM resources WHERE NOT deleted");
        assert_eq!(in_db as usize, loaded.load(Ordering::SeqCst));
        println!(
            "  loaded {from} → {in_db} resources in {:.1} s ({:.0}/s)",
            stats.seconds,
            stats.resources as f64 / stats.seconds
        );
        let per_resource = |table: &str| {
            count(url, &format!("SELECT COUNT(*) AS n FROM {table}")) as f64 / in_db as f64
        };
        println!(
            "  index rows per resource: {:.1} digests, {:.1} dates, {:.1} numbers",
            per_resource("search_hashes"),
            per_resource("search_dates"),
            per_resource("search_numbers")
        );
        report.loads.push((format!("{from} → {in_db}"), stats));
        // Planner statistics, as a database's autovacuum (or SQLite's `PRAGMA optimize`)
        // would have them after a bulk load; this machine's PostgreSQL runs without
        // autovacuum.
        let mut conn = fhirledger::store::connection::establish(url).unwrap();
        diesel::sql_query("ANALYZE").execute(&mut conn).unwrap();
        from = in_db as usize;
        let patients = patients.lock().unwrap();
        let bench = Bench {
            state: &state,
            rt: &rt,
            skip,
            size: in_db as usize,
        };
        let latencies = searches(&bench, templates, &patients, queries);
        skip = latencies
            .iter()
            .filter(|l| l.queries == 0 || l.p50 > SKIP_AFTER_MS)
            .map(|l| l.kind.clone())
            .collect();
        report.searches.push((in_db as usize, latencies));
    }
    report.pending_ledger_entries = count(
        url,
        "SELECT COUNT(*) AS n FROM ledger_entries WHERE leaf_index IS NULL",
    );
    report
}

fn main() {
    let total: usize = std::env::var("FHIRLEDGER_BENCH_RESOURCES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let queries: usize = std::env::var("FHIRLEDGER_BENCH_QUERIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    let templates = templates();
    for t in &templates {
        println!(
            "template {}: {} resources, {} UUIDs, {} observations",
            t.name,
            t.resources,
            t.uuids,
            t.observation_dates.len()
        );
    }
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let mut reports = Vec::new();
    if std::env::var("FHIRLEDGER_BENCH_SQLITE").as_deref() == Ok("0") {
        println!("SQLite: skipped (FHIRLEDGER_BENCH_SQLITE=0)");
    } else {
        reports.push(run(
            "SQLite",
            &DatabaseUrl::sqlite_file(&dir.path().join("bench.db")),
            &templates,
            total,
            queries,
        ));
        println!("SQLite done after {:.0} s", started.elapsed().as_secs_f64());
    }

    if let Ok(admin) = std::env::var("FHIRLEDGER_BENCH_DATABASE_URL") {
        let name = format!("fhirledger_bench_{}", uuid::Uuid::new_v4().simple());
        let mut conn = diesel::PgConnection::establish(&admin).unwrap();
        diesel::sql_query(format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .unwrap();
        let url = match admin.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => panic!("FHIRLEDGER_BENCH_DATABASE_URL must end with /<database>"),
        };
        reports.push(run(
            "PostgreSQL",
            &DatabaseUrl::parse(&url).unwrap(),
            &templates,
            total,
            queries,
        ));
        diesel::sql_query(format!("DROP DATABASE {name} WITH (FORCE)"))
            .execute(&mut conn)
            .unwrap();
    } else {
        println!("PostgreSQL: skipped (set FHIRLEDGER_BENCH_DATABASE_URL)");
    }
    println!();
    println!(
        "==== summary ({} s in all) ====",
        started.elapsed().as_secs_f64().round()
    );
    for report in &reports {
        print_report(report);
    }
}
