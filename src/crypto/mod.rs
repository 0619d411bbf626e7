//! Cryptography: envelope encryption of resource versions, blind indexes for search, and
//! loading of keys. Pure functions plus key loading; nothing here knows about HTTP, SQL or
//! FHIR semantics.

pub mod blind_index;
pub mod envelope;
pub mod keys;
pub mod shares;

pub use blind_index::{BlindIndexKey, ValueKind};
pub use envelope::{EncryptedBlob, Envelope, IntegrityError, ResourceBinding};
pub use keys::{KeyError, KeyId, MasterKey};
