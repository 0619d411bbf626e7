//! Cryptography: envelope encryption of resource versions and loading of the master key.
//! Pure functions plus key loading; nothing here knows about HTTP, SQL or FHIR semantics.

pub mod envelope;
pub mod keys;

pub use envelope::{EncryptedBlob, Envelope, IntegrityError, ResourceBinding};
pub use keys::{KeyError, KeyId, MasterKey};
