//! The identity of a request, built once per request by the API layer and handed to every
//! service call, which asks [`super::policy`] what it may do and turns it into the actor of
//! each ledger entry.

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use super::policy::Confinement;

use super::scopes::Scopes;
use crate::ledger::Actor;

/// The party behind a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// No valid credentials: may do nothing; named as the actor of refusals of
    /// unauthenticated requests.
    Anonymous,
    /// The server itself acting outside any HTTP request (tools, benchmarks, tests of the
    /// service layer): unrestricted.
    Internal,
    /// A verified bearer token.
    Token(Arc<TokenIdentity>),
}

/// What a verified token says about its bearer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenIdentity {
    pub issuer: String,
    pub subject: String,
    pub client_id: Option<String>,
    pub scopes: Scopes,
    /// The FHIR resource of the user (`Practitioner/123`), from the `fhirUser` claim.
    pub fhir_user: Option<String>,
    /// The launch patient's id (`patient` claim), which `patient/` scopes are confined to.
    pub patient: Option<String>,
    /// `purpose_of_use` claim (e.g. `ETREAT` for break-the-glass).
    pub purpose_of_use: Option<String>,
    /// Expiry, seconds since the epoch.
    pub expires_at: u64,
}

impl Principal {
    /// The actor recorded in ledger entries.
    pub fn ledger_actor(&self) -> Actor {
        match self {
            Self::Anonymous => Actor::named("anonymous", "anonymous"),
            Self::Internal => Actor::named("internal", "internal"),
            Self::Token(identity) => Actor {
                subject: identity.subject.clone(),
                client: identity.client_id.clone(),
                role: identity.role().into(),
                issuer: Some(identity.issuer.clone()),
                fhir_user: identity.fhir_user.clone(),
                purpose: identity.purpose_of_use.clone(),
            },
        }
    }

    /// Whether the principal may read the ledger API beyond its public endpoints.
    pub fn may_read_ledger(&self) -> bool {
        match self {
            Self::Anonymous => false,
            Self::Internal => true,
            Self::Token(identity) => identity.scopes.ledger_read(),
        }
    }
}

impl TokenIdentity {
    /// The role the ledger names: the widest context of the token's resource scopes, or
    /// `auditor` for a token that may only read the ledger.
    fn role(&self) -> &'static str {
        match self.scopes.widest_context() {
            Some(context) => context.as_str(),
            None if self.scopes.ledger_read() => "auditor",
            None => "none",
        }
    }
}

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
        Self {
            principal: Principal::Internal,
            request_id: request_id.into(),
            receipt: ReceiptSlot::default(),
            rule: Slot::default(),
            confined: Slot::default(),
            consents: Memo::default(),
        }
    }
}
