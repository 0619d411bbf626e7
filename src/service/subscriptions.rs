//! FHIR R4 Subscriptions with rest-hook channels: a Subscription written through the API is
//! checked (channel, endpoint, criteria searchable by its writer), made `active` and
//! registered with its writer's identity sealed; writes of a subscribed type and accesses
//! to a subscribed patient's record queue events in their own transactions; the dispatcher
//! delivers each event once the subscriber's gate still lets it see the focus, retrying with
//! back-off, marking a subscription `error` after repeated failures, and ledgering each
//! delivery. Notifications carry references only (the Subscriptions Backport IG's
//! `id-only` content), never resource content.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::access::principal::TokenIdentity;
use crate::access::{Permission, Principal, RequestContext, policy};
use crate::clock::now_micros;
use crate::crypto::ResourceBinding;
use crate::error::AppError;
use crate::fhir::ResourceId;
use crate::fhir::document::format_instant;
use crate::fhir::outcome::IssueCode;
use crate::fhir::search_query::{Handling, parse_search};
use crate::fhir::validate::ValidationError;
use crate::ledger::{Action, EntryResource};
use crate::store::DbConnection;
use crate::store::ledger as ledger_rows;
use crate::store::subscriptions::{self as rows, EventRow, SubscriptionRow};

use super::ResourceService;
use super::ledger::LedgerEvent;

/// Most headers a channel may carry, and most bytes in each and in the endpoint.
const MAX_HEADERS: usize = 10;
const MAX_HEADER_BYTES: usize = 4096;
const MAX_ENDPOINT_BYTES: usize = 2048;
/// Events taken per dispatcher round.
const DISPATCH_BATCH: i64 = 100;
/// How long a notifier round waits for its posts. One still going then (an endpoint that
/// hangs) finishes and is recorded on its own thread; until then its events stay claimed,
/// so its subscription sits out the rounds, and the others' notifications do not wait.
const ROUND_WAIT: Duration = Duration::from_millis(500);
/// How long one delivery may take.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Consecutive failed deliveries after which a subscription is set to `error`.
pub const MAX_FAILURES: i32 = 5;
/// The first retry's delay; each further one doubles it, up to [`MAX_RETRY_DELAY`].
const FIRST_RETRY_DELAY: Duration = Duration::from_secs(1);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(600);

/// What a Subscription asks for, as read from the resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionSpec {
    /// The searched type (`AuditEvent` for accesses to a record).
    pub resource_type: String,
    /// The criteria's query (after `?`), as pairs.
    pub query: Vec<(String, String)>,
    /// For `AuditEvent?patient=…`: the patient's id.
    pub patient: Option<String>,
    pub endpoint: String,
    /// `Name: value` headers sent with each notification.
    pub headers: Vec<(String, String)>,
    /// Whether a notification Bundle is sent (`channel.payload`); otherwise an empty POST.
    pub with_payload: bool,
    pub status: String,
    /// `Subscription.end` (µs since the epoch): the server turns the subscription off then.
    pub end: Option<i64>,
}

fn invalid(expression: &str, message: impl Into<String>) -> AppError {
    AppError::Unprocessable(ValidationError {
        code: IssueCode::Invalid,
        expression: Some(format!("Subscription.{expression}")),
        message: message.into(),
    })
}

fn not_supported(expression: &str, message: impl Into<String>) -> AppError {
    AppError::Unprocessable(ValidationError {
        code: IssueCode::NotSupported,
        expression: Some(format!("Subscription.{expression}")),
        message: message.into(),
    })
}

impl SubscriptionSpec {
    /// Reads a Subscription resource (already valid R4).
    pub fn parse(resource: &Value) -> Result<Self, AppError> {
        let channel = &resource["channel"];
        let channel_type = channel["type"].as_str().unwrap_or_default();
        if channel_type != "rest-hook" {
            return Err(not_supported(
                "channel.type",
                format!("channel type '{channel_type}' is not supported; use rest-hook"),
            ));
        }
        let endpoint = channel["endpoint"]
            .as_str()
            .ok_or_else(|| invalid("channel.endpoint", "a rest-hook needs an endpoint"))?;
        check_endpoint(endpoint)?;
        let with_payload = match channel["payload"].as_str() {
            None => false,
            Some("application/fhir+json" | "application/json") => true,
            Some(other) => {
                return Err(not_supported(
                    "channel.payload",
                    format!(
                        "payload '{other}' is not supported; use application/fhir+json or none"
                    ),
                ));
            }
        };
        let headers = channel["header"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|header| parse_header(header.as_str().unwrap_or_default()))
            .collect::<Result<Vec<_>, _>>()?;
        if headers.len() > MAX_HEADERS {
            return Err(invalid(
                "channel.header",
                format!("at most {MAX_HEADERS} headers"),
            ));
        }
        let criteria = resource["criteria"].as_str().unwrap_or_default();
        let (resource_type, query) = criteria.split_once('?').unwrap_or((criteria, ""));
        if resource_type.is_empty() || resource_type.contains('/') {
            return Err(invalid(
                "criteria",
                "criteria must be a search: Type?parameters",
            ));
        }
        let query: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
        let patient = if resource_type == "AuditEvent" {
            let [(name, value)] = query.as_slice() else {
                return Err(not_supported(
                    "criteria",
                    "accesses are subscribed to as AuditEvent?patient=Patient/<id>",
                ));
            };
            let id = value.strip_prefix("Patient/").unwrap_or(value);
            if name != "patient" || ResourceId::parse(id).is_err() {
                return Err(not_supported(
                    "criteria",
                    "accesses are subscribed to as AuditEvent?patient=Patient/<id>",
                ));
            }
            Some(id.to_owned())
        } else {
            None
        };
        let end = match resource["end"].as_str() {
            None => None,
            Some(text) => Some(
                crate::fhir::search_values::date_range(text)
                    .ok_or_else(|| invalid("end", "end must be an instant"))?
                    .0,
            ),
        };
        Ok(Self {
            resource_type: resource_type.to_owned(),
            query,
            patient,
            endpoint: endpoint.to_owned(),
            headers,
            with_payload,
            status: resource["status"].as_str().unwrap_or_default().to_owned(),
            end,
        })
    }

    /// Whether its end has passed at `now`.
    pub fn ended(&self, now: i64) -> bool {
        self.end.is_some_and(|end| end <= now)
    }
}

/// An endpoint the server may post to: https anywhere, http only to this machine (a local
/// receiver, a development setup).
fn check_endpoint(endpoint: &str) -> Result<(), AppError> {
    if endpoint.len() > MAX_ENDPOINT_BYTES {
        return Err(invalid("channel.endpoint", "the endpoint is too long"));
    }
    let url = url::Url::parse(endpoint)
        .map_err(|e| invalid("channel.endpoint", format!("not a URL: {e}")))?;
    match url.scheme() {
        "https" => Ok(()),
        "http" if reach(&url) == Reach::ThisMachine => Ok(()),
        _ => Err(invalid(
            "channel.endpoint",
            "the endpoint must be https:// (http:// only to localhost)",
        )),
    }
}

/// An endpoint a confined writer may have notifications posted to: `https://` to a host
/// named in DNS or at a public address, not this machine or its private networks.
fn check_public_endpoint(endpoint: &str) -> Result<(), AppError> {
    let url = url::Url::parse(endpoint)
        .map_err(|e| invalid("channel.endpoint", format!("not a URL: {e}")))?;
    if url.scheme() != "https" || reach(&url) != Reach::Public {
        return Err(invalid(
            "channel.endpoint",
            "a token confined to a patient's record has notifications posted only to https:// \
             endpoints at public hosts",
        ));
    }
    Ok(())
}

/// Where an endpoint's host is, as far as its URL tells (a DNS name is not resolved).
#[derive(Debug, PartialEq, Eq)]
enum Reach {
    /// `localhost` or a loopback address.
    ThisMachine,
    /// Another name for this machine, or a private, link-local, shared (CGNAT) or
    /// unspecified address: the server's neighbours.
    Near,
    Public,
}

fn reach(url: &url::Url) -> Reach {
    let near = match url.host() {
        Some(url::Host::Domain("localhost")) => return Reach::ThisMachine,
        Some(url::Host::Domain(host)) => {
            let host = host.trim_end_matches('.');
            host == "localhost" || host.ends_with(".localhost")
        }
        Some(url::Host::Ipv4(ip)) if ip.is_loopback() => return Reach::ThisMachine,
        Some(url::Host::Ipv4(ip)) => {
            let [first, second, ..] = ip.octets();
            ip.is_private()
                || ip.is_link_local()
                || ip.is_unspecified()
                || ip.is_broadcast()
                || first == 0
                || (first == 100 && (second & 0xc0) == 64)
        }
        Some(url::Host::Ipv6(ip)) if ip.is_loopback() => return Reach::ThisMachine,
        Some(url::Host::Ipv6(ip)) => {
            let first = ip.segments()[0];
            ip.is_unspecified()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || ip.to_ipv4_mapped().is_some()
        }
        None => true,
    };
    if near { Reach::Near } else { Reach::Public }
}

fn parse_header(text: &str) -> Result<(String, String), AppError> {
    let (name, value) = text
        .split_once(':')
        .ok_or_else(|| invalid("channel.header", "a header is 'Name: value'"))?;
    let name = name.trim();
    let valid_name = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b));
    if !valid_name || text.len() > MAX_HEADER_BYTES || text.contains(['\r', '\n']) {
        return Err(invalid("channel.header", "a header is 'Name: value'"));
    }
    Ok((name.to_owned(), value.trim().to_owned()))
}

/// What a subscription's row seals: who created it, so that every notification is checked
/// as that token's search would be.
#[derive(serde::Serialize, serde::Deserialize)]
struct Sealed {
    /// `None`: the server itself (a tool, a test).
    identity: Option<TokenIdentity>,
}

pub(super) fn sealed_binding(id: &str) -> ResourceBinding<'_> {
    ResourceBinding {
        resource_type: "$subscription",
        id,
        version_id: 1,
    }
}

/// What one subscription's share of a batch came to, before it is recorded.
struct Attempt {
    id: String,
    events: Vec<EventRow>,
    /// The Subscription's type, id and content (absent when it is no longer active).
    subscription: Option<(crate::fhir::ResourceType, ResourceId, Value)>,
    /// The subscriber (absent when the subscription is no longer active).
    ctx: Option<RequestContext>,
    /// Where to post, with what (absent when the subscription is no longer active).
    spec: Option<SubscriptionSpec>,
    /// Per event, in order: whether the subscriber may see it, decided before any post.
    verdicts: Vec<Verdict>,
    /// Events ended: delivered, skipped or dropped.
    ended: Vec<(i64, &'static str)>,
    /// The foci delivered, in order.
    delivered: Vec<String>,
    /// The position of the event that failed, and why.
    failed: Option<(usize, String)>,
}

impl Attempt {
    /// Records the attempt in the batch's transaction; returns the subscription's count of
    /// consecutive failures.
    fn record_in(&self, service: &ResourceService, tx: &mut DbConnection) -> Result<i32, AppError> {
        for (seq, state) in &self.ended {
            rows::finish(tx, *seq, state, now_micros())?;
        }
        if let Some(ctx) = &self.ctx {
            for focus in &self.delivered {
                service.ledger_delivery(tx, ctx, &self.id, focus)?;
            }
        }
        if !self.delivered.is_empty() {
            rows::record_outcome(tx, &self.id, false)?;
        }
        let Some((position, _)) = &self.failed else {
            return Ok(0);
        };
        let failures = rows::record_outcome(tx, &self.id, true)?;
        if failures >= MAX_FAILURES {
            rows::set_status(tx, &self.id, rows::ERROR)?;
        } else {
            let event = &self.events[*position];
            let retry_at = now_micros() + retry_delay(event.attempts);
            rows::retry(tx, event.seq, retry_at)?;
            // The events after it wait their turn: notifications arrive in order.
            let behind: Vec<i64> = self.events[position + 1..].iter().map(|e| e.seq).collect();
            rows::postpone(tx, &behind, retry_at)?;
        }
        Ok(failures)
    }
}

/// Whether an event is to be posted, decided on the notifier's connection.
enum Verdict {
    Post,
    Skip,
    Fail(String),
}

/// The notifier's HTTP client: a post may take [`DELIVERY_TIMEOUT`], follows no redirect,
/// and any status is an answer (not 2xx is a failure, with its status).
pub(super) fn notifier_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(DELIVERY_TIMEOUT))
        .http_status_as_error(false)
        .max_redirects(0)
        .build()
        .into()
}

impl ResourceService {
    /// A Subscription about to be written: checked, and made `active` (the server's to set;
    /// `off` is kept). Its criteria must be a search its writer may make, so a subscription
    /// discloses nothing its writer could not search for. Other types pass unchanged.
    /// `created`: whether the write creates the Subscription (else it replaces a version).
    pub(super) fn admit_subscription(
        &self,
        ctx: &RequestContext,
        resource_type: &str,
        compact_json: &str,
        created: bool,
    ) -> Result<Option<String>, AppError> {
        if resource_type != "Subscription" {
            return Ok(None);
        }
        let mut resource: Value = serde_json::from_str(compact_json)
            .map_err(|e| AppError::Internal(format!("validated JSON does not parse: {e}")))?;
        let spec = SubscriptionSpec::parse(&resource)?;
        let status = match spec.status.as_str() {
            "requested" | "active" => "active",
            "off" => "off",
            "error" if matches!(ctx.principal, Principal::Internal) => "error",
            other => {
                return Err(invalid(
                    "status",
                    format!("a client asks for 'requested' or 'off', not '{other}'"),
                ));
            }
        };
        // A writer the policy does not let write Subscriptions outright (a patient's app, as
        // their writer) posts only to public https endpoints: the server must not become its
        // probe of the hosts and ports near it.
        let permission = if created {
            Permission::Create
        } else {
            Permission::Update
        };
        if policy::authorize(&ctx.principal, permission, "Subscription").is_err() {
            check_public_endpoint(&spec.endpoint)?;
        }
        // The search's rule is not the write's: the write is ledgered under the rule that
        // let it be made.
        let rule = ctx.rule.get();
        self.authorize_criteria(ctx, &spec)?;
        if let Some(rule) = rule {
            ctx.rule.set(rule);
        }
        // One whose end has passed is off from the start (R4: the server turns it off then).
        let status = if spec.ended(now_micros()) {
            "off"
        } else {
            status
        };
        resource["status"] = json!(status);
        Ok(Some(resource.to_string()))
    }

    /// The criteria's search, authorized for `ctx` as a search request would be (a refusal
    /// is ledgered and answered 403).
    fn authorize_criteria(
        &self,
        ctx: &RequestContext,
        spec: &SubscriptionSpec,
    ) -> Result<(), AppError> {
        match &spec.patient {
            Some(patient) => self.authorize_access_view(ctx, patient),
            None => {
                let index = self.search_index();
                let request = parse_search(
                    index.registry(),
                    index,
                    vec![self.resolve_type(&spec.resource_type)?.to_string()],
                    &spec.query,
                    Handling::Strict,
                )?;
                self.authorize_search(ctx, request, Action::Search)
                    .map(|_| ())
            }
        }
    }

    /// Whether `ctx` may see the accesses to `patient`'s record, as `GET
    /// /fhir/AuditEvent?patient=` decides (a refusal is ledgered).
    fn authorize_access_view(&self, ctx: &RequestContext, patient: &str) -> Result<(), AppError> {
        if ctx.principal.may_read_ledger() {
            return Ok(());
        }
        let grant = self.authorize(
            ctx,
            Permission::Search,
            "AuditEvent",
            Action::AuditView,
            Vec::new(),
        )?;
        match &grant.confinement {
            Some(confinement) if !self.opens(None, ctx, confinement, patient)? => Err(self
                .ledger()
                .refuse(ctx, Action::AuditView, Vec::new(), confinement.refusal())),
            _ => Ok(()),
        }
    }

    /// Registers (or, deleted, forgets) a Subscription in the write's transaction, and
    /// queues `focus` for the subscriptions to writes of its type.
    pub(super) fn note_write(
        &self,
        tx: &mut DbConnection,
        ctx: &RequestContext,
        resource_type: &str,
        id: &str,
        written: Option<(&str, &str)>,
    ) -> Result<(), AppError> {
        let now = now_micros();
        if resource_type == "Subscription" {
            match written {
                None => rows::remove(tx, id)?,
                Some((json, _)) => {
                    let resource: Value = serde_json::from_str(json).map_err(|e| {
                        AppError::Internal(format!("stored Subscription does not parse: {e}"))
                    })?;
                    let spec = SubscriptionSpec::parse(&resource)?;
                    let sealed = match (&ctx.principal, rows::subscription(tx, id)?) {
                        // The server's own writes (status error, off) keep the subscriber
                        // it acts for, who stays its writer.
                        (Principal::Internal, Some(row)) => row.sealed(),
                        (principal, _) => {
                            let identity = match principal {
                                Principal::Token(identity) => Some(TokenIdentity::clone(identity)),
                                _ => None,
                            };
                            let plain = serde_json::to_vec(&Sealed { identity })
                                .map_err(|e| AppError::Internal(e.to_string()))?;
                            self.envelope().seal(sealed_binding(id), &plain)
                        }
                    };
                    let kind = if spec.patient.is_some() {
                        rows::ACCESS
                    } else {
                        rows::RESOURCE
                    };
                    rows::upsert(
                        tx,
                        &rows::NewSubscription {
                            id,
                            kind,
                            resource_type: &spec.resource_type,
                            patient: spec.patient.as_deref(),
                            status: &spec.status,
                            sealed: &sealed,
                            now,
                            ends_at: spec.end,
                        },
                    )?;
                }
            }
        }
        if let Some((_, version)) = written {
            let focus = format!("{resource_type}/{id}/_history/{version}");
            rows::enqueue_for_type(tx, resource_type, &focus, now)?;
        }
        Ok(())
    }

    /// Delivers the events due now, a batch at a time; returns how many were delivered.
    /// Each batch costs two writes whatever its size: claiming its events, then recording
    /// what became of them with the deliveries' ledger entries (on SQLite both queue for the
    /// one writer, whose every commit under load is a wait; a write per event put
    /// notifications seconds behind).
    pub fn deliver_notifications(&self) -> Result<usize, AppError> {
        self.turn_off_ended()?;
        let mut delivered = 0;
        loop {
            let started = std::time::Instant::now();
            let due = self.on_notifier_connection(|conn| {
                Ok(rows::due(conn, now_micros(), DISPATCH_BATCH)?)
            })?;
            if due.is_empty() {
                return Ok(delivered);
            }
            let found = started.elapsed();
            // Each event is claimed for the longest its delivery may take: another process
            // on the database leaves it alone meanwhile.
            let lease_until =
                now_micros() + i64::try_from(DELIVERY_TIMEOUT.as_micros() * 2).unwrap_or(i64::MAX);
            let claimed = self.pool.write(|tx| -> Result<Vec<EventRow>, AppError> {
                let mut claimed = Vec::with_capacity(due.len());
                for event in due {
                    if rows::claim(tx, &event, lease_until)? {
                        claimed.push(event);
                    }
                }
                Ok(claimed)
            })?;
            let claimed_after = started.elapsed();
            let mut by_subscription: HashMap<String, Vec<EventRow>> = HashMap::new();
            for event in claimed {
                by_subscription
                    .entry(event.subscription_id.clone())
                    .or_default()
                    .push(event);
            }
            // Everything the posts need is read first, on the notifier's own connection:
            // under load every pooled connection is taken by requests, and rounds that
            // queued for them fell seconds behind.
            let mut attempts = Vec::with_capacity(by_subscription.len());
            for (id, events) in by_subscription {
                match self.on_notifier_connection(|conn| self.prepare_attempt(conn, &id, events)) {
                    Ok(attempt) => attempts.push(attempt),
                    // Its events stay claimed until the lease runs out, then are due.
                    Err(error) => tracing::warn!(%error, "subscription delivery failed; retrying"),
                }
            }
            let prepared_after = started.elapsed();
            let subscriptions = attempts.len();
            let attempts = self.post_attempts(attempts);
            let posted_after = started.elapsed();
            let round = self.record_attempts(&attempts)?;
            tracing::debug!(
                delivered = round,
                subscriptions,
                late = subscriptions - attempts.len(),
                found_ms = found.as_millis(),
                claimed_ms = claimed_after.as_millis(),
                prepared_ms = prepared_after.as_millis(),
                posted_ms = posted_after.as_millis(),
                recorded_ms = started.elapsed().as_millis(),
                "notification batch"
            );
            delivered += round;
            if round == 0 {
                // Everything due failed or was skipped: the back-off decides when next.
                return Ok(delivered);
            }
        }
    }

    /// Posts the attempts, subscriptions in parallel and each one's events in order, and
    /// returns those done within [`ROUND_WAIT`] (and those with nothing to post). The
    /// others are recorded by their own threads when their posts end.
    fn post_attempts(&self, attempts: Vec<Attempt>) -> Vec<Attempt> {
        /// What the round collects; once `closed`, a post that ends records itself.
        #[derive(Default)]
        struct Round {
            closed: bool,
            done: Vec<Attempt>,
        }
        let round = Arc::new((
            parking_lot::Mutex::new(Round::default()),
            parking_lot::Condvar::new(),
        ));
        let expected = attempts.len();
        for attempt in attempts {
            if attempt.spec.is_none() {
                round.0.lock().done.push(attempt);
                continue;
            }
            let (service, round) = (self.clone(), Arc::clone(&round));
            std::thread::spawn(move || {
                let mut attempt = attempt;
                service.post_attempt(&mut attempt);
                let mut collected = round.0.lock();
                if !collected.closed {
                    collected.done.push(attempt);
                    round.1.notify_one();
                    return;
                }
                drop(collected);
                if let Err(error) = service.record_attempts(std::slice::from_ref(&attempt)) {
                    // Its events stay claimed until the lease runs out, then are due again.
                    tracing::warn!(subscription = attempt.id, %error, "late notification not recorded");
                }
            });
        }
        let deadline = std::time::Instant::now() + ROUND_WAIT;
        let mut collected = round.0.lock();
        while collected.done.len() < expected {
            if round.1.wait_until(&mut collected, deadline).timed_out() {
                break;
            }
        }
        collected.closed = true;
        std::mem::take(&mut collected.done)
    }

    /// Runs `work` on the notifier's own connection, opened on first use and again after
    /// a failure.
    fn on_notifier_connection<T>(
        &self,
        work: impl FnOnce(&mut DbConnection) -> Result<T, AppError>,
    ) -> Result<T, AppError> {
        self.pool.on_own_connection(&self.notifier_connection, work)
    }

    /// Records a batch's attempts in one write, with a `notify` ledger entry per delivery;
    /// then writes the Subscriptions that failed too often with `status: error`. Returns how
    /// many were delivered.
    fn record_attempts(&self, attempts: &[Attempt]) -> Result<usize, AppError> {
        let failures = self.pool.write(|tx| -> Result<Vec<i32>, AppError> {
            let mut failures = Vec::with_capacity(attempts.len());
            for attempt in attempts {
                failures.push(attempt.record_in(self, tx)?);
            }
            Ok(failures)
        })?;
        for (attempt, failures) in attempts.iter().zip(failures) {
            let (Some((_, error)), Some(subscription)) = (&attempt.failed, &attempt.subscription)
            else {
                continue;
            };
            tracing::warn!(subscription = attempt.id, failures, %error, "notification not delivered");
            if failures >= MAX_FAILURES {
                let why = format!(
                    "{MAX_FAILURES} deliveries in a row failed; the last: {}",
                    error.chars().take(200).collect::<String>()
                );
                self.set_subscription_status(subscription, rows::ERROR, Some(&why))?;
            }
        }
        Ok(attempts.iter().map(|a| a.delivered.len()).sum())
    }

    /// Reads what delivering one subscription's claimed events needs, and whether its
    /// subscriber may see each, on `conn`; posts nothing and writes nothing.
    fn prepare_attempt(
        &self,
        conn: &mut DbConnection,
        id: &str,
        events: Vec<EventRow>,
    ) -> Result<Attempt, AppError> {
        let mut attempt = Attempt {
            id: id.to_owned(),
            events,
            subscription: None,
            ctx: None,
            spec: None,
            verdicts: Vec::new(),
            ended: Vec::new(),
            delivered: Vec::new(),
            failed: None,
        };
        let row = rows::subscription(conn, id)?;
        let Some(row) = row.filter(|row| row.status == rows::ACTIVE) else {
            attempt.ended = attempt
                .events
                .iter()
                .map(|e| (e.seq, rows::DROPPED))
                .collect();
            return Ok(attempt);
        };
        let subscription = self.current_subscription(conn, id)?;
        let spec = SubscriptionSpec::parse(&subscription.2)?;
        let ctx = self.subscriber_context(&row)?;
        attempt.verdicts = attempt
            .events
            .iter()
            .map(
                |event| match self.visible_to_subscriber(conn, &ctx, &row, &spec, &event.focus) {
                    Ok(true) => Verdict::Post,
                    Ok(false) => Verdict::Skip,
                    Err(error) => Verdict::Fail(error.to_string()),
                },
            )
            .collect();
        attempt.subscription = Some(subscription);
        attempt.ctx = Some(ctx);
        attempt.spec = Some(spec);
        Ok(attempt)
    }

    /// Posts a prepared attempt's events, in order and in one notification, up to the first
    /// whose check failed; the events of a failed post wait for the retry.
    fn post_attempt(&self, attempt: &mut Attempt) {
        let Some(spec) = &attempt.spec else {
            return;
        };
        let (mut posted, mut skipped) = (Vec::new(), Vec::new());
        for (position, verdict) in attempt.verdicts.iter().enumerate() {
            match verdict {
                Verdict::Post => posted.push(position),
                Verdict::Skip => skipped.push(position),
                Verdict::Fail(error) => {
                    attempt.failed = Some((position, error.clone()));
                    break;
                }
            }
        }
        if let Some(&first) = posted.first() {
            let events: Vec<&EventRow> = posted.iter().map(|&p| &attempt.events[p]).collect();
            if let Err(error) = self.post_notification(&attempt.id, spec, &events) {
                // Retried from its first event; what was skipped before it stays skipped.
                attempt.failed = Some((first, error));
                skipped.retain(|&position| position < first);
                posted.clear();
            }
        }
        for position in skipped {
            attempt
                .ended
                .push((attempt.events[position].seq, rows::SKIPPED));
        }
        for position in posted {
            let event = &attempt.events[position];
            attempt.ended.push((event.seq, rows::DELIVERED));
            attempt.delivered.push(event.focus.clone());
        }
    }

    /// The token that wrote the subscription, as its row seals it (`None`: the server).
    pub(super) fn subscription_writer(
        &self,
        row: &SubscriptionRow,
    ) -> Result<Option<TokenIdentity>, AppError> {
        let plain = self
            .envelope()
            .open(sealed_binding(&row.id), &row.sealed())
            .map_err(|e| AppError::Internal(format!("subscription {}: {e}", row.id)))?;
        let sealed: Sealed = serde_json::from_slice(&plain)
            .map_err(|e| AppError::Internal(format!("subscription {}: {e}", row.id)))?;
        Ok(sealed.identity)
    }

    /// The subscriber's identity, as its sealed row says.
    fn subscriber_context(&self, row: &SubscriptionRow) -> Result<RequestContext, AppError> {
        let principal = match self.subscription_writer(row)? {
            Some(identity) => Principal::Token(Arc::new(identity)),
            None => Principal::Internal,
        };
        Ok(RequestContext::acting_as(
            principal,
            format!("subscription-{}", row.id),
        ))
    }

    /// Whether the subscriber, were it to search now, would be shown the event's focus: an
    /// access to the subscribed patient's record (not the subscriber's own), or a written
    /// resource that its criteria match under its gate. A refusal by the gate is ledgered.
    fn visible_to_subscriber(
        &self,
        conn: &mut DbConnection,
        ctx: &RequestContext,
        row: &SubscriptionRow,
        spec: &SubscriptionSpec,
        focus: &str,
    ) -> Result<bool, AppError> {
        if let Some(patient) = &spec.patient {
            let index: i64 = focus
                .strip_prefix("AuditEvent/ledger-")
                .and_then(|i| i.parse().ok())
                .ok_or_else(|| AppError::Internal(format!("access event {focus}")))?;
            let Some(entry) = ledger_rows::entries_at(conn, &[index])?.pop() else {
                return Ok(false);
            };
            let entry: crate::ledger::LedgerEntry = serde_json::from_slice(&entry.data)
                .map_err(|e| AppError::Internal(format!("ledger entry #{index}: {e}")))?;
            // The subscriber's own reads of the record (its app fetching what it was told
            // of) are not news to it, and would tell it again without end.
            let own = match &ctx.principal {
                Principal::Token(identity) => {
                    entry.actor.subject == identity.subject
                        && entry.actor.issuer.as_deref() == Some(identity.issuer.as_str())
                }
                _ => false,
            };
            let told = matches!(
                crate::ledger::Action::parse(&entry.action),
                Some(Action::AuditView | Action::Notify)
            );
            if own || told || !entry.patient_ids().contains(patient) {
                return Ok(false);
            }
            return match self.authorize_access_view(ctx, patient) {
                Ok(()) => Ok(true),
                Err(AppError::Forbidden { .. }) => Ok(false),
                Err(other) => Err(other),
            };
        }
        let Some((reference, _)) = focus.split_once("/_history/") else {
            return Err(AppError::Internal(format!("event focus {focus}")));
        };
        let Some((_, id)) = reference.split_once('/') else {
            return Err(AppError::Internal(format!("event focus {focus}")));
        };
        let index = self.search_index();
        let mut query = spec.query.clone();
        query.push(("_id".to_owned(), id.to_owned()));
        let request = parse_search(
            index.registry(),
            index,
            vec![row.resource_type.clone()],
            &query,
            Handling::Strict,
        )?;
        let search = match self.authorize_search(ctx, request, Action::Search) {
            Ok(search) => search,
            Err(AppError::Forbidden { .. }) => return Ok(false),
            Err(other) => return Err(other),
        };
        let page = self.search_page(conn, &search)?;
        Ok(page
            .matches
            .iter()
            .any(|resource| resource.id.as_str() == id))
    }

    /// Posts one notification of `events` to the endpoint; `Err` says why it failed.
    fn post_notification(
        &self,
        id: &str,
        spec: &SubscriptionSpec,
        events: &[&EventRow],
    ) -> Result<(), String> {
        let mut request = self
            .notifier_agent
            .post(&spec.endpoint)
            .header("Content-Type", "application/fhir+json");
        for (name, value) in &spec.headers {
            request = request.header(name, value);
        }
        let body = if spec.with_payload {
            self.notification_bundle(id, events).to_string()
        } else {
            String::new()
        };
        match request.send(body.as_bytes()) {
            Ok(response) if response.status().is_success() => Ok(()),
            Ok(response) => Err(format!("the endpoint answered {}", response.status())),
            Err(error) => Err(error.to_string()),
        }
    }

    /// The notification: a history Bundle whose first entry is the R4 Subscriptions
    /// Backport's subscription status (`Parameters`), with one `notification-event` per
    /// event, in order, naming its focus by reference.
    fn notification_bundle(&self, id: &str, events: &[&EventRow]) -> Value {
        let base = self.search_index().fhir_base();
        let subscription = format!("{base}/Subscription/{id}");
        let mut parameters = vec![
            json!({"name": "subscription", "valueReference": {"reference": subscription}}),
            json!({"name": "status", "valueCode": "active"}),
            json!({"name": "type", "valueCode": "event-notification"}),
        ];
        parameters.extend(events.iter().map(|event| {
            json!({"name": "notification-event", "part": [
                {"name": "event-number", "valueString": event.seq.to_string()},
                {"name": "timestamp", "valueInstant": format_instant(event.created_at)},
                {"name": "focus", "valueReference": {"reference": format!("{base}/{}", event.focus)}},
            ]})
        }));
        json!({
            "resourceType": "Bundle",
            "type": "history",
            "timestamp": format_instant(now_micros()),
            "entry": [{
                "fullUrl": format!("urn:uuid:{}", uuid::Uuid::new_v4()),
                "resource": {
                    "resourceType": "Parameters",
                    "meta": {"profile": ["http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription-status-r4"]},
                    "parameter": parameters,
                },
                "request": {"method": "GET", "url": format!("{subscription}/$status")},
                "response": {"status": "200"},
            }],
        })
    }

    /// Ledgers a delivery: the subscriber was told of the focus.
    fn ledger_delivery(
        &self,
        tx: &mut DbConnection,
        ctx: &RequestContext,
        id: &str,
        focus: &str,
    ) -> Result<(), AppError> {
        let reference = focus.split("/_history/").next().unwrap_or(focus);
        let (focus_type, focus_id) = reference.split_once('/').unwrap_or(("", reference));
        let event = LedgerEvent::permit(Action::Notify)
            .touching(
                EntryResource {
                    resource_type: "Subscription".into(),
                    id: id.into(),
                    version_id: None,
                    content_hash: None,
                },
                None,
            )
            .touching(
                EntryResource {
                    resource_type: focus_type.into(),
                    id: focus_id.into(),
                    version_id: None,
                    content_hash: None,
                },
                None,
            );
        self.ledger().append_in(tx, ctx, event).map(|_| ())
    }

    /// Turns off, by writing their next version, the active subscriptions whose end has
    /// passed; their undelivered events are dropped.
    fn turn_off_ended(&self) -> Result<(), AppError> {
        let ended = self.on_notifier_connection(|conn| Ok(rows::ended(conn, now_micros())?))?;
        for id in ended {
            let turned_off = self
                .on_notifier_connection(|conn| self.current_subscription(conn, &id))
                .and_then(|subscription| {
                    self.set_subscription_status(&subscription, rows::OFF, None)
                });
            // One that cannot be turned off holds up neither the others nor the deliveries.
            if let Err(error) = turned_off {
                tracing::warn!(subscription = id, %error, "subscription not turned off at its end");
            }
        }
        Ok(())
    }

    /// The Subscription's type, id and current content.
    fn current_subscription(
        &self,
        conn: &mut DbConnection,
        id: &str,
    ) -> Result<(crate::fhir::ResourceType, ResourceId, Value), AppError> {
        let subscription_type = self.resolve_type("Subscription")?;
        let resource_id = ResourceId::parse(id)
            .map_err(|_| AppError::Internal(format!("subscription id {id:?} is not valid")))?;
        let (_, version) = crate::store::resources::current(conn, "Subscription", id)?
            .ok_or_else(|| AppError::NotFound(format!("Subscription/{id}")))?;
        let version = version.ok_or_else(|| {
            AppError::Internal(format!("Subscription/{id} has no current version"))
        })?;
        let resource = self.open_version(&subscription_type, &resource_id, &version)?;
        let parsed: Value = serde_json::from_str(&resource.json)
            .map_err(|e| AppError::Internal(format!("stored Subscription: {e}")))?;
        Ok((subscription_type, resource_id, parsed))
    }

    /// Writes the Subscription's next version with the server's `status` (`error` after
    /// failures, with why; `off` at its end), as the server itself.
    fn set_subscription_status(
        &self,
        (subscription_type, id, current): &(crate::fhir::ResourceType, ResourceId, Value),
        status: &str,
        error: Option<&str>,
    ) -> Result<(), AppError> {
        let mut resource = current.clone();
        resource["status"] = json!(status);
        if let (Some(error), Some(fields)) = (error, resource.as_object_mut()) {
            fields.insert("error".to_owned(), json!(error));
        }
        if let Some(meta) = resource.get_mut("meta").and_then(Value::as_object_mut) {
            meta.remove("versionId");
            meta.remove("lastUpdated");
        }
        let ctx = RequestContext::internal(format!("subscription-{id}"));
        self.write(
            &ctx,
            subscription_type,
            id,
            None,
            super::write::WriteKind::Content {
                compact_json: resource.to_string(),
                method: "PUT",
            },
        )
        .map(|_| ())
    }
}

/// The delay before the attempt after `attempts` failed ones: 1 s, 2 s, 4 s, … up to 10 min.
fn retry_delay(attempts: i32) -> i64 {
    let exponent = u32::try_from(attempts.clamp(0, 20)).unwrap_or(0);
    let delay = FIRST_RETRY_DELAY
        .saturating_mul(2u32.saturating_pow(exponent))
        .min(MAX_RETRY_DELAY);
    i64::try_from(delay.as_micros()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subscription(criteria: &str, endpoint: &str) -> Value {
        json!({"resourceType": "Subscription", "status": "requested", "reason": "test",
               "criteria": criteria,
               "channel": {"type": "rest-hook", "endpoint": endpoint, "payload": "application/fhir+json",
                           "header": ["Authorization: Bearer abc"]}})
    }

    #[test]
    fn specs_are_read_and_bad_channels_refused() {
        let spec = SubscriptionSpec::parse(&subscription(
            "AuditEvent?patient=Patient/p1",
            "https://app.example/hook",
        ))
        .unwrap();
        assert_eq!(spec.patient.as_deref(), Some("p1"));
        assert_eq!(
            spec.headers,
            [("Authorization".to_owned(), "Bearer abc".to_owned())]
        );
        let spec = SubscriptionSpec::parse(&subscription(
            "Observation?code=http://loinc.org|1234-5&patient=Patient/p1",
            "http://127.0.0.1:9/hook",
        ))
        .unwrap();
        assert_eq!(spec.resource_type, "Observation");
        assert_eq!(spec.query.len(), 2);
        for (criteria, endpoint) in [
            ("Observation?code=x", "http://app.example/hook"),
            ("Observation?code=x", "ftp://127.0.0.1/hook"),
            (
                "AuditEvent?agent=Practitioner/1",
                "https://app.example/hook",
            ),
            ("Patient/1", "https://app.example/hook"),
        ] {
            assert!(
                SubscriptionSpec::parse(&subscription(criteria, endpoint)).is_err(),
                "{criteria} {endpoint}"
            );
        }
        let mut websocket = subscription("Observation?code=x", "https://app.example/hook");
        websocket["channel"]["type"] = json!("websocket");
        assert!(SubscriptionSpec::parse(&websocket).is_err());
        let mut injected = subscription("Observation?code=x", "https://app.example/hook");
        injected["channel"]["header"] = json!(["X-A: b\r\nX-B: c"]);
        assert!(SubscriptionSpec::parse(&injected).is_err());
    }

    #[test]
    fn retries_back_off_to_a_bound() {
        assert_eq!(retry_delay(0), 1_000_000);
        assert_eq!(retry_delay(3), 8_000_000);
        assert_eq!(retry_delay(50), 600_000_000);
    }
}
