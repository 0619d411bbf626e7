//! The identity of a request, built once per request by the API layer and handed to every
//! service call (and, with the ledger, to every ledger entry).

/// The party behind a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// No credentials were presented (the only principal before authentication exists).
    Anonymous,
}

impl Principal {
    /// A short, PHI-free label for logs.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Anonymous => "anonymous",
        }
    }
}

/// Everything a service call needs to know about the request it serves.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub principal: Principal,
    /// The server-assigned request id (also in logs and the `X-Request-Id` header).
    pub request_id: String,
}
