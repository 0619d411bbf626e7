//! Who is asking and what they may do: the identity of a request ([`principal`]) and the
//! state its handling shares ([`context`]), bearer tokens verified against trusted issuers
//! ([`tokens`]), the local issuer of the embedded default ([`local_issuer`]), SMART scopes
//! ([`scopes`]) and the decisions made from them ([`policy`]); what the trusted identity
//! provider offers SMART clients ([`smart`]). Every decision is made here
//! and ledgered by the caller, permits and refusals alike.

pub mod consent;
pub mod context;
pub mod local_issuer;
pub mod policy;
pub mod principal;
pub mod scopes;
pub mod smart;
pub mod throttle;
pub mod tokens;

pub use context::{ReceiptSlot, RequestContext, Slot};
pub use principal::{Principal, TokenIdentity};
pub use scopes::{Permission, Scopes};
pub use tokens::{AuthError, TokenVerifier};
