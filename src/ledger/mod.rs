//! The ledger: signed entries, the RFC 6962 Merkle tree over them, C2SP checkpoints and
//! tiles, proof verification and the sequencer. Pure code over two small traits
//! ([`tree::HashStore`], [`sequencer::SequencerStore`]): it
//! knows neither diesel nor FHIR, so auditors' tools (`fhirledger verify`, `audit`) reuse it.

pub mod checkpoint;
pub mod cosignature;
pub mod entry;
pub mod key_chain;
pub mod keys;
pub mod sequencer;
pub mod tiles;
pub mod tree;

pub use entry::{Action, Actor, EntryResource, LedgerEntry, Outcome, SignedEntry};
pub use keys::LedgerKey;
pub use tree::{Hash, HashStore, LedgerError};
