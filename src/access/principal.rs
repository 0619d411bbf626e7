//! The identity of a request: who is behind it ([`Principal`]) and what their token says
//! ([`TokenIdentity`]), and the actor each ledger entry names. What the identity may do is
//! [`super::policy`]'s to decide; the rest of a request's state is in [`super::context`].

use std::sync::Arc;

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

/// What a verified token says about its bearer (serializable: a bulk export job keeps it,
/// sealed, to run as the token that started it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
