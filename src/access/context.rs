//! The state of one request that its handling shares: the [`RequestContext`] the API layer
//! builds once per request and hands to every service call (its principal, its id, where the
//! ledger receipt goes), and the answers worked out once per request ([`Slot`], [`Memo`]).

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use super::policy::Confinement;
use super::principal::Principal;

/// A value one part of a request's handling leaves for another (shared by clones of the
/// request's context).
#[derive(Debug, Clone)]
pub struct Slot<T>(Arc<Mutex<Option<T>>>);

impl<T> Default for Slot<T> {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(None)))
    }
}

impl<T: Clone> Slot<T> {
    pub fn set(&self, value: T) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(value);
        }
    }

    pub fn get(&self) -> Option<T> {
        self.0.lock().ok().and_then(|slot| slot.clone())
    }
}

/// Answers worked out once per request and shared by clones of its context.
#[derive(Debug, Clone)]
pub struct Memo<K, V>(Arc<Mutex<HashMap<K, V>>>);

impl<K, V> Default for Memo<K, V> {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(HashMap::new())))
    }
}

impl<K: Eq + Hash, V: Clone> Memo<K, V> {
    pub fn get(&self, key: &K) -> Option<V> {
        self.0.lock().ok().and_then(|map| map.get(key).cloned())
    }

    pub fn insert(&self, key: K, value: V) {
        if let Ok(mut map) = self.0.lock() {
            map.insert(key, value);
        }
    }
}

/// Where the service leaves the receipt of the ledger entry a request produced, for the
/// API layer to return in the `X-Ledger-Entry` header (also on error responses).
pub type ReceiptSlot = Slot<String>;

/// Everything a service call needs to know about the request it serves.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub principal: Principal,
    /// The server-assigned request id (also in logs and the `X-Request-Id` header).
    pub request_id: String,
    pub receipt: ReceiptSlot,
    /// The access rule that permitted the request's latest authorized step, which its
    /// ledger entries name.
    pub rule: Slot<&'static str>,
    /// The patients a confinement's searches are confined to, resolved once per request.
    pub confined: Slot<(Confinement, Arc<BTreeSet<String>>)>,
    /// Whether a Consent-based confinement opens a patient's compartment, decided once per
    /// request and patient.
    pub consents: Memo<(Confinement, String), bool>,
}

impl RequestContext {
    /// A context for work that no HTTP request carries (tools, benchmarks, tests of the
    /// service layer): the internal principal, which every check permits.
    pub fn internal(request_id: impl Into<String>) -> Self {
        Self::acting_as(Principal::Internal, request_id)
    }

    /// A context for work done later on a principal's behalf (a bulk export job runs as
    /// the token that started it).
    pub fn acting_as(principal: Principal, request_id: impl Into<String>) -> Self {
        Self {
            principal,
            request_id: request_id.into(),
            receipt: ReceiptSlot::default(),
            rule: Slot::default(),
            confined: Slot::default(),
            consents: Memo::default(),
        }
    }
}
