//! Who is asking. Until authentication exists every request is made by the anonymous
//! principal; the access-control work fills [`Principal`] in from the bearer token and
//! decides authorization here, in one place.

pub mod principal;

pub use principal::{Principal, ReceiptSlot, RequestContext};
