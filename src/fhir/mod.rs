//! FHIR semantics without HTTP types or SQL: the supported resource types, validation of
//! incoming resources, the stored JSON form, Bundles, the CapabilityStatement and
//! OperationOutcome.

pub mod bundle;
pub mod capability;
pub mod compartment;
pub mod document;
pub mod outcome;
pub mod patch;
pub mod resource_types;
pub mod search_params;
pub mod validate;

pub use outcome::{IssueCode, OperationOutcome};
pub use resource_types::{ResourceId, ResourceType, ResourceTypes};
pub use validate::{ValidatedResource, ValidationError};
