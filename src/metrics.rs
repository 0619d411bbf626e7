//! The process's operational metrics, served in Prometheus's text format at `/metrics`:
//! counts and latencies by interaction and status, the ledger's group commits and sequencer
//! lag, and the database pool. Labels come from fixed sets (interaction names, status codes),
//! never from a request's content: no resource id, patient, token or search value.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus::{
    Encoder as _, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets (seconds) for requests and commits: 0.25 ms to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_25, 0.000_5, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024,
    2.5, 5.0, 10.0,
];

/// How many entries one group commit carried.
const GROUP_SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0];

pub struct Metrics {
    registry: Registry,
    /// Requests answered, by interaction and status code.
    pub requests: IntCounterVec,
    /// Time from a request's arrival to its response, by interaction.
    pub request_seconds: HistogramVec,
    /// Time one group commit of ledger entries took (the durable append requests wait on).
    pub group_commit_seconds: Histogram,
    /// Entries per group commit.
    pub group_commit_entries: Histogram,
    /// Time from an entry's durable append to the signed checkpoint that covers it (the
    /// oldest entry of each sequenced batch).
    pub sequencer_lag_seconds: Histogram,
    /// The size of the latest signed checkpoint's tree.
    pub tree_size: IntGauge,
    /// Database connections of this process's pool, `idle` or `in_use`.
    pub pool_connections: IntGaugeVec,
    /// Requests a database connection could not be had for in time.
    pub pool_timeouts: IntCounter,
    /// Data keys still wrapped by a previous master key (a rotation in progress).
    pub rewrap_remaining: IntGauge,
    /// Data keys re-wrapped by the current master key since the process started.
    pub rewrapped: IntCounter,
    /// Witnesses' lag: entries of the latest checkpoint each has not cosigned.
    pub witness_lag_entries: IntGaugeVec,
}

impl Metrics {
    fn build() -> prometheus::Result<Self> {
        let registry = Registry::new_custom(Some("fhirledger".into()), None)?;
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            register(
                &registry,
                Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))?,
            )
        };
        let requests = register(
            &registry,
            IntCounterVec::new(
                Opts::new("http_requests_total", "HTTP requests answered"),
                &["interaction", "status"],
            )?,
        )?;
        let request_seconds = register(
            &registry,
            HistogramVec::new(
                HistogramOpts::new("http_request_duration_seconds", "Time to answer a request")
                    .buckets(LATENCY_BUCKETS.to_vec()),
                &["interaction"],
            )?,
        )?;
        let group_commit_seconds = histogram(
            "ledger_group_commit_seconds",
            "Time one group commit of ledger entries took",
            LATENCY_BUCKETS,
        )?;
        let group_commit_entries = histogram(
            "ledger_group_commit_entries",
            "Ledger entries per group commit",
            GROUP_SIZE_BUCKETS,
        )?;
        let sequencer_lag_seconds = histogram(
            "ledger_sequencer_lag_seconds",
            "Time from an entry's durable append to the signed checkpoint covering it",
            LATENCY_BUCKETS,
        )?;
        let tree_size = register(
            &registry,
            IntGauge::new("ledger_tree_size", "Size of the latest signed checkpoint")?,
        )?;
        let pool_connections = register(
            &registry,
            IntGaugeVec::new(
                Opts::new("db_pool_connections", "Database connections of the pool"),
                &["state"],
            )?,
        )?;
        let pool_timeouts = register(
            &registry,
            IntCounter::new(
                "db_pool_timeouts_total",
                "Requests that could not get a database connection in time",
            )?,
        )?;
        let rewrap_remaining = register(
            &registry,
            IntGauge::new(
                "master_key_rewrap_remaining",
                "Data keys still wrapped by a previous master key",
            )?,
        )?;
        let rewrapped = register(
            &registry,
            IntCounter::new(
                "master_key_rewrapped_total",
                "Data keys re-wrapped by the current master key",
            )?,
        )?;
        let witness_lag_entries = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "witness_lag_entries",
                    "Entries of the latest checkpoint a witness has not cosigned",
                ),
                &["witness"],
            )?,
        )?;
        Ok(Self {
            rewrap_remaining,
            rewrapped,
            witness_lag_entries,
            registry,
            requests,
            request_seconds,
            group_commit_seconds,
            group_commit_entries,
            sequencer_lag_seconds,
            tree_size,
            pool_connections,
            pool_timeouts,
        })
    }

    /// Counts one answered request.
    pub fn observe_request(&self, interaction: &str, status: u16, elapsed: Duration) {
        let code = status.to_string();
        self.requests
            .with_label_values(&[interaction, code.as_str()])
            .inc();
        self.request_seconds
            .with_label_values(&[interaction])
            .observe(elapsed.as_secs_f64());
    }

    /// Everything, in Prometheus's text exposition format.
    pub fn render(&self) -> Result<String, String> {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .map_err(|e| e.to_string())?;
        String::from_utf8(out).map_err(|e| e.to_string())
    }
}

/// The process's metrics; `None` only if they could not be set up (logged once), in which
/// case nothing is counted and `/metrics` answers 503.
pub fn metrics() -> Option<&'static Metrics> {
    static METRICS: OnceLock<Option<Metrics>> = OnceLock::new();
    METRICS
        .get_or_init(|| {
            Metrics::build()
                .map_err(|error| tracing::error!(%error, "metrics could not be set up"))
                .ok()
        })
        .as_ref()
}

/// The FHIR interaction (or other endpoint) a request was routed to, from its method and the
/// route pattern it matched: a fixed set of names, whatever the path held.
pub fn interaction(method: &str, pattern: Option<&str>) -> &'static str {
    let Some(pattern) = pattern else {
        return "unmatched";
    };
    match (pattern.strip_prefix("/fhir"), method) {
        (Some("/metadata"), _) => "capabilities",
        (Some("/{type}/{id}"), "GET" | "HEAD") => "read",
        (Some("/{type}/{id}"), "PUT") => "update",
        (Some("/{type}/{id}"), "PATCH") => "patch",
        (Some("/{type}/{id}"), "DELETE") => "delete",
        (Some("/{type}/{id}/_history/{vid}"), _) => "vread",
        (Some("/{type}/{id}/_history"), _) => "history-instance",
        (Some("/{type}/_history"), _) => "history-type",
        (Some("/_history"), _) => "history-system",
        (Some("/{type}"), "GET" | "HEAD") | (Some("/{type}/_search"), _) => "search-type",
        (Some("/{type}"), "POST") => "create",
        (Some("/{type}"), "PUT") => "conditional-update",
        (Some("/{type}"), "DELETE") => "conditional-delete",
        (Some(""), "POST") => "batch-transaction",
        (Some(""), _) => "search-system",
        (Some("/{compartment}/{id}/{type}"), _) => "search-compartment",
        (Some("/{type}/{id}/$everything"), _) => "everything",
        (Some("/AuditEvent"), _) => "audit-events",
        (Some(_), _) => "fhir-other",
        (None, _) if pattern.starts_with("/ledger") => "ledger",
        (None, _) => "other",
    }
}

/// Registers `metric` with `registry` and hands it back, so that each metric is made and
/// registered in one place.
fn register<M>(registry: &Registry, metric: M) -> prometheus::Result<M>
where
    M: prometheus::core::Collector + Clone + 'static,
{
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, reason = "tests")]

    use super::*;

    #[test]
    fn interactions_are_named_from_route_patterns_not_paths() {
        assert_eq!(interaction("GET", Some("/fhir/{type}/{id}")), "read");
        assert_eq!(interaction("PATCH", Some("/fhir/{type}/{id}")), "patch");
        assert_eq!(interaction("POST", Some("/fhir/{type}")), "create");
        assert_eq!(interaction("POST", Some("/fhir")), "batch-transaction");
        assert_eq!(
            interaction("GET", Some("/fhir/{type}/{id}/_history/{vid}")),
            "vread"
        );
        assert_eq!(interaction("GET", Some("/ledger/entries")), "ledger");
        assert_eq!(interaction("GET", None), "unmatched");
    }

    #[test]
    fn renders_counted_requests() {
        let metrics = metrics().expect("metrics set up");
        metrics.observe_request("read", 200, Duration::from_millis(3));
        let text = metrics.render().expect("rendered");
        assert!(
            text.contains("fhirledger_http_requests_total{interaction=\"read\",status=\"200\"}")
        );
        assert!(
            text.contains("fhirledger_http_request_duration_seconds_bucket{interaction=\"read\"")
        );
    }
}
