//! The ledger: signed entries, the RFC 6962 Merkle tree over them, C2SP checkpoints and
//! tiles, and proof verification. Pure code over the small [`tree::HashStore`] trait: it
//! knows neither diesel nor FHIR, so auditors' tools (`fhirledger verify`, `audit`) reuse it.

pub mod checkpoint;
pub mod entry;
pub mod keys;
pub mod tiles;
pub mod tree;

pub use entry::{Actor, EntryResource, LedgerEntry, Outcome, SignedEntry};
pub use keys::LedgerKey;
pub use tree::{Hash, HashStore, LedgerError};
