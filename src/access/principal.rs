//! The identity of a request, built once per request by the API layer and handed to every
//! service call, which turns it into the actor of each ledger entry.

use std::sync::{Arc, Mutex};

use crate::ledger::Actor;

/// The party behind a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// No credentials were presented (the only principal before authentication exists).
    Anonymous,
}

impl Principal {
    /// The actor recorded in ledger entries.
    pub fn ledger_actor(&self) -> Actor {
        match self {
            Self::Anonymous => Actor {
                subject: "anonymous".into(),
                client: None,
                role: "anonymous".into(),
            },
        }
    }
}

/// Where the service leaves the receipt of the ledger entry a request produced, for the
/// API layer to return in the `X-Ledger-Entry` header (also on error responses).
#[derive(Debug, Clone, Default)]
pub struct ReceiptSlot(Arc<Mutex<Option<String>>>);

impl ReceiptSlot {
    pub fn set(&self, receipt: String) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(receipt);
        }
    }

    pub fn get(&self) -> Option<String> {
        self.0.lock().ok().and_then(|slot| slot.clone())
    }
}

/// Everything a service call needs to know about the request it serves.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub principal: Principal,
    /// The server-assigned request id (also in logs and the `X-Request-Id` header).
    pub request_id: String,
    pub receipt: ReceiptSlot,
}

impl RequestContext {
    /// A context for work that no HTTP request carries (tests, tools).
    pub fn internal(request_id: impl Into<String>) -> Self {
        Self {
            principal: Principal::Anonymous,
            request_id: request_id.into(),
            receipt: ReceiptSlot::default(),
        }
    }
}
