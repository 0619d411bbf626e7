//! fhirledger: an HL7 FHIR R4 server that stores every resource encrypted and
//! (from the ledger work on) records every interaction in a Merkle ledger.
//!
//! Layers, outermost first (see `shared/docs/design.md`):
//! - [`api`]: actix-web handlers, content negotiation, the one error → OperationOutcome mapping, OpenAPI;
//! - [`access`]: who is asking ([`access::Principal`]);
//! - [`service`]: one function per use case, orchestrating validation, crypto and one store transaction;
//! - [`indexer`]: resource content into blind-index rows, search terms into digests;
//! - [`fhir`]: FHIR semantics without HTTP or SQL (validation, Bundles, CapabilityStatement, OperationOutcome);
//! - [`store`]: diesel schema, migrations and queries over ciphertext;
//! - [`crypto`]: envelope encryption and key loading;
//! - [`config`] and [`server`]: settings and start-up; [`import`]: `fhirledger import`;
//!   [`clock`]: the time everything is stamped with.

pub mod access;
pub mod api;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod error;
pub mod fhir;
pub mod import;
pub mod indexer;
pub mod ledger;
pub mod metrics;
pub mod server;
pub mod service;
pub mod store;
pub mod unseal;
pub mod verifier;
pub mod witness;
