//! Requests refused for want of valid credentials: counted per client address, limited
//! (past the limit an address gets 429 until its window ends), and gathered into aggregates
//! that the ledger records as one entry per address and reason per interval, with the
//! count, instead of one durable entry per request. An unauthenticated client can then
//! neither grow the ledger at will nor make the server sign and fsync for it.
//!
//! The aggregates of the current interval live in memory until they are ledgered (every
//! [`AGGREGATE_INTERVAL`], and at shutdown); a crash loses at most one interval's counts of
//! refusals that named nobody. Every refusal of an authenticated request is still one
//! durable entry before the answer.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long an address's count runs before it starts again.
pub const LIMIT_WINDOW: Duration = Duration::from_secs(60);
/// How long an aggregate gathers refusals before it is ledgered.
pub const AGGREGATE_INTERVAL: Duration = Duration::from_secs(10);
/// Most addresses tracked at once; past it, windows that ended are dropped, and a new
/// address that still finds no room is limited (failing safe rather than forgetting).
const MAX_TRACKED: usize = 100_000;
/// Most aggregates (address and reason) gathered per interval; refusals from further
/// addresses are counted together under [`OTHER_SOURCES`], so that many addresses cannot
/// make many entries.
const MAX_AGGREGATES: usize = 1_000;
/// The source of the aggregate that counts addresses past [`MAX_AGGREGATES`].
pub const OTHER_SOURCES: &str = "other-addresses";

/// One address's (or IPv6 /64's) window.
#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    count: u32,
}

/// The refusals of one address for one reason, not yet ledgered.
#[derive(Debug, Clone)]
pub struct Aggregate {
    pub source: String,
    pub reason: &'static str,
    /// The receipt the entry will carry, returned to every refused request it counts.
    pub receipt: String,
    /// The request id of the first refusal it counts.
    pub first_request: String,
    pub count: u64,
    started: Instant,
}

/// See the module comment.
#[derive(Debug)]
pub struct RefusalThrottle {
    per_window: u32,
    windows: Mutex<HashMap<String, Window>>,
    pending: Mutex<BTreeMap<(String, &'static str), Aggregate>>,
    /// Aggregates taken but not ledgered (the ledger was unavailable), to try again.
    unwritten: Mutex<Vec<Aggregate>>,
}

/// What to answer a refused request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counted {
    /// The receipt of the aggregate entry that will count it.
    pub receipt: String,
    /// Seconds until the address may try again, when it is over its limit.
    pub retry_after: Option<u64>,
}

impl RefusalThrottle {
    /// At most `per_window` refusals per address per [`LIMIT_WINDOW`] are answered 401; the
    /// rest 429.
    pub fn new(per_window: u32) -> Self {
        Self {
            per_window: per_window.max(1),
            windows: Mutex::new(HashMap::new()),
            pending: Mutex::new(BTreeMap::new()),
            unwritten: Mutex::new(Vec::new()),
        }
    }

    /// Counts one refusal from `source` (none known: counted under `unknown`).
    pub fn count(&self, source: Option<IpAddr>, reason: &'static str, request: &str) -> Counted {
        let source = source.map_or_else(|| "unknown".to_owned(), source_key);
        let now = Instant::now();
        let retry_after = self.limit(&source, now);
        let reason = if retry_after.is_some() {
            "rate-limited"
        } else {
            reason
        };
        let receipt = match self.pending.lock() {
            Ok(mut pending) => {
                let source = if pending.len() >= MAX_AGGREGATES
                    && !pending.contains_key(&(source.clone(), reason))
                {
                    OTHER_SOURCES.to_owned()
                } else {
                    source
                };
                let aggregate =
                    pending
                        .entry((source.clone(), reason))
                        .or_insert_with(|| Aggregate {
                            source: source.clone(),
                            reason,
                            receipt: uuid::Uuid::now_v7().to_string(),
                            first_request: request.to_owned(),
                            count: 0,
                            started: now,
                        });
                aggregate.count += 1;
                aggregate.receipt.clone()
            }
            Err(_) => String::new(),
        };
        Counted {
            receipt,
            retry_after,
        }
    }

    /// `Some(seconds to wait)` when `source` is over its limit.
    fn limit(&self, source: &str, now: Instant) -> Option<u64> {
        let Ok(mut windows) = self.windows.lock() else {
            return Some(LIMIT_WINDOW.as_secs());
        };
        if windows.len() >= MAX_TRACKED && !windows.contains_key(source) {
            windows.retain(|_, w| now.duration_since(w.started) < LIMIT_WINDOW);
            if windows.len() >= MAX_TRACKED {
                return Some(LIMIT_WINDOW.as_secs());
            }
        }
        let window = windows.entry(source.to_owned()).or_insert(Window {
            started: now,
            count: 0,
        });
        if now.duration_since(window.started) >= LIMIT_WINDOW {
            *window = Window {
                started: now,
                count: 0,
            };
        }
        window.count = window.count.saturating_add(1);
        (window.count > self.per_window).then(|| {
            let left = LIMIT_WINDOW.saturating_sub(now.duration_since(window.started));
            left.as_secs().max(1)
        })
    }

    /// Takes the aggregates to ledger now: those whose interval is over (or all of them),
    /// and those an earlier attempt could not ledger.
    pub fn take_due(&self, all: bool) -> Vec<Aggregate> {
        let mut due = match self.unwritten.lock() {
            Ok(mut unwritten) => std::mem::take(&mut *unwritten),
            Err(_) => Vec::new(),
        };
        let Ok(mut pending) = self.pending.lock() else {
            return due;
        };
        let now = Instant::now();
        let keys: Vec<(String, &'static str)> = pending
            .iter()
            .filter(|(_, a)| all || now.duration_since(a.started) >= AGGREGATE_INTERVAL)
            .map(|(key, _)| key.clone())
            .collect();
        due.extend(keys.iter().filter_map(|key| pending.remove(key)));
        due
    }

    /// Keeps aggregates that could not be ledgered, to be taken again (their receipts were
    /// handed out, so they stay entries of their own).
    pub fn restore(&self, aggregates: Vec<Aggregate>) {
        if let Ok(mut unwritten) = self.unwritten.lock() {
            unwritten.extend(aggregates);
        }
    }
}

/// The key an address is limited by: an IPv4 address, or an IPv6 /64 (one host's usual
/// allocation, so a client cannot dodge the limit by walking its own prefix).
fn source_key(address: IpAddr) -> String {
    match address {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_limit_and_aggregate_per_address_and_reason() {
        let throttle = RefusalThrottle::new(3);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        let b2: IpAddr = "2001:db8::2".parse().unwrap();
        let first = throttle.count(Some(a), "bad-signature", "r1");
        assert_eq!(first.retry_after, None);
        assert_eq!(
            throttle.count(Some(a), "bad-signature", "r2").receipt,
            first.receipt
        );
        assert_eq!(throttle.count(Some(a), "no-token", "r3").retry_after, None);
        let limited = throttle.count(Some(a), "bad-signature", "r4");
        assert!(limited.retry_after.is_some_and(|s| s <= 60));
        assert_ne!(limited.receipt, first.receipt, "a 429 is counted apart");
        // Another address has its own count; a /64 is one address.
        assert_eq!(throttle.count(Some(b), "no-token", "r5").retry_after, None);
        throttle.count(Some(b2), "no-token", "r6");
        let mut due = throttle.take_due(true);
        due.sort_by_key(|a| (a.source.clone(), a.reason));
        let summary: Vec<(&str, &str, u64)> = due
            .iter()
            .map(|a| (a.source.as_str(), a.reason, a.count))
            .collect();
        assert_eq!(
            summary,
            [
                ("192.0.2.1", "bad-signature", 2),
                ("192.0.2.1", "no-token", 1),
                ("192.0.2.1", "rate-limited", 1),
                ("2001:db8:0:0::/64", "no-token", 2),
            ]
        );
        assert_eq!(due[0].first_request, "r1");
        assert!(throttle.take_due(true).is_empty());
        throttle.restore(due);
        assert_eq!(
            throttle.take_due(false).len(),
            4,
            "restored ones are tried again"
        );
        assert!(throttle.take_due(true).is_empty());
    }
}
