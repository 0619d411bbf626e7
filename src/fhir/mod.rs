//! FHIR semantics without HTTP types or SQL: the supported resource types, validation of
//! incoming resources, the stored JSON form, search parameter definitions, value
//! extraction (a FHIRPath subset) and query parsing, Bundles, the CapabilityStatement and
//! OperationOutcome.

pub mod bundle;
pub mod bundle_request;
pub mod capability;
pub mod compartment;
pub mod compartment_definition;
pub mod document;
pub mod fhirpath;
pub mod identifier_index;
pub mod ndjson;
pub mod outcome;
pub mod patch;
pub mod references;
pub mod resource_types;
pub mod search_params;
pub mod search_query;
pub mod search_values;
pub mod searchset;
pub mod validate;

pub use outcome::{IssueCode, OperationOutcome};
pub use resource_types::{ResourceId, ResourceType, ResourceTypes};
pub use validate::{ValidatedResource, ValidationError};
