//! The FHIR `patch` interaction (https://hl7.org/fhir/R4/http.html#patch) in both formats R4
//! names: JSON Patch (RFC 6902, `application/json-patch+json`) and FHIRPath Patch
//! (https://hl7.org/fhir/R4/fhirpatch.html, a `Parameters` resource). A patch is parsed,
//! applied to the current version of a resource one operation at a time, and the result is
//! validated like the body of an update.
//!
//! A patch is a program the client runs inside the server, so it is bounded: at most
//! [`MAX_JSON_PATCH_OPERATIONS`] (or [`MAX_FHIRPATH_OPERATIONS`]) operations, and the document
//! may never grow past the size limit of a request body nor nest deeper than [`MAX_DEPTH`].
//! Growth is checked before each operation is applied, from the size of what it adds, so a
//! few dozen `copy` operations that each double an array are refused at the first one that
//! would cross the limit, without the document ever being built.
//!
//! Status codes follow http.html#patch: a patch document that cannot be parsed is the
//! client's malformed request (400); too many operations or a result too large is 413; a
//! well-formed patch that cannot be applied (a failed `test`, a path that does not exist) or
//! whose result is not an acceptable version of the resource is 422.

use std::io;

use json_patch::{Patch, PatchOperation};
use serde_json::{Map, Value};

use super::fhirpath::Expression;
use super::outcome::IssueCode;
use super::resource_types::{ResourceId, ResourceType, ResourceTypes};
use super::validate::{ValidatedResource, ValidationError, validate_resource};

/// The media type of a JSON Patch document (RFC 6902 §6).
pub const JSON_PATCH: &str = "application/json-patch+json";
/// Most operations of one JSON Patch document.
pub const MAX_JSON_PATCH_OPERATIONS: usize = 1_000;
/// Most operations of one FHIRPath Patch (each evaluates a FHIRPath expression over the
/// resource, and an `add` to an absent element may validate the resource to learn its
/// shape).
pub const MAX_FHIRPATH_OPERATIONS: usize = 100;
/// Deepest nesting a patched resource may reach: what is stored must parse again, and JSON
/// parsers stop at 128 levels.
pub const MAX_DEPTH: usize = 100;
/// Below this size, the shape of an element an `add` creates is decided against the whole
/// resource (required siblings present); above it, against a skeleton of its ancestors.
const WHOLE_PROBE_BYTES: usize = 64 * 1024;
/// Most validations one FHIRPath Patch may run to learn the shape of elements it adds;
/// past them the plain spelling is taken (and validation of the result decides).
const MAX_SHAPE_PROBES: usize = 300;

/// Why a patch was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    /// The patch document is not a JSON Patch or FHIRPath Patch (400).
    #[error("{0}")]
    Malformed(String),
    /// The patch could not be applied, or its result is not acceptable (422).
    #[error("{}", .0.message)]
    Unprocessable(ValidationError),
    /// Too many operations, or a result larger or deeper than allowed (413).
    #[error("{0}")]
    TooLarge(String),
}

impl PatchError {
    fn unprocessable(code: IssueCode, expression: Option<String>, message: String) -> Self {
        Self::Unprocessable(ValidationError {
            code,
            expression,
            message,
        })
    }

    fn failed(operation: usize, what: &str) -> Self {
        Self::unprocessable(
            IssueCode::Processing,
            Some(format!("Patch[{operation}]")),
            format!("patch operation {operation} failed: {what}"),
        )
    }
}

/// A parsed patch in any format.
#[derive(Debug, Clone)]
pub enum PatchDocument {
    Json(Patch),
    FhirPath(Vec<FhirPathOperation>),
    /// A JSON Merge Patch (RFC 7396): the members to set, `null` for those to remove.
    Merge(Value),
}

/// The format of a PATCH body, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PatchFormat {
    #[default]
    JsonPatch,
    /// `application/fhir+json` or `application/json`: a FHIRPath Patch (`Parameters`
    /// resource), or, as clients also send under these types, a JSON Patch array or a JSON
    /// Merge Patch object (fhirpy's `patch()`), told apart by the body's shape.
    FhirPath,
    /// `application/merge-patch+json` (RFC 7396).
    MergePatch,
}

/// Parses a patch body of `format`.
pub fn parse_patch(format: PatchFormat, body: &[u8]) -> Result<PatchDocument, PatchError> {
    match format {
        PatchFormat::JsonPatch => parse_json_patch(body).map(PatchDocument::Json),
        PatchFormat::MergePatch => parse_merge_patch(body),
        PatchFormat::FhirPath => {
            let value = parse_body(body, "patch")?;
            if value.is_array() {
                parse_json_patch(body).map(PatchDocument::Json)
            } else if value.get("resourceType").and_then(Value::as_str) == Some("Parameters") {
                parse_fhirpath_patch(body).map(PatchDocument::FhirPath)
            } else {
                parse_merge_patch(body)
            }
        }
    }
}

/// Parses a JSON Merge Patch: a JSON object (RFC 7396 §2; anything else would replace the
/// whole resource, which is an update, not a patch).
fn parse_merge_patch(body: &[u8]) -> Result<PatchDocument, PatchError> {
    let value = parse_body(body, "JSON Merge Patch")?;
    if !value.is_object() {
        return Err(PatchError::Malformed(
            "a JSON Merge Patch must be a JSON object of the members to set (null removes one)"
                .into(),
        ));
    }
    Ok(PatchDocument::Merge(value))
}

/// Parses a JSON Patch document: a JSON array of at most [`MAX_JSON_PATCH_OPERATIONS`]
/// operations (RFC 6902 §3, §4). Members an operation does not define are ignored, as §4
/// requires.
pub fn parse_json_patch(body: &[u8]) -> Result<Patch, PatchError> {
    let value = parse_body(body, "JSON Patch document")?;
    let Some(operations) = value.as_array() else {
        return Err(PatchError::Malformed(
            "a JSON Patch document must be a JSON array of operations (RFC 6902 §3)".into(),
        ));
    };
    too_many(operations.len(), MAX_JSON_PATCH_OPERATIONS)?;
    serde_path_to_error::deserialize(value).map_err(|e| {
        // The path (e.g. `[1].op`) names the operation without echoing its values.
        PatchError::Malformed(format!(
            "invalid JSON Patch operation at {}: {}",
            e.path(),
            short(&e.inner().to_string())
        ))
    })
}

fn parse_body(body: &[u8], what: &str) -> Result<Value, PatchError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| PatchError::Malformed(format!("the {what} is not valid UTF-8")))?;
    serde_json::from_str(text)
        .map_err(|e| PatchError::Malformed(format!("the {what} is not JSON: {e}")))
}

fn too_many(operations: usize, max: usize) -> Result<(), PatchError> {
    if operations > max {
        return Err(PatchError::TooLarge(format!(
            "the patch has {operations} operations; at most {max} are accepted"
        )));
    }
    Ok(())
}

/// Applies `patch` to `document` (RFC 6902 §5: all operations or none) within the default
/// bounds of a request body (16 MiB). Failures name the operation and its path, never the
/// values involved (they may be PHI).
pub fn apply_json_patch(document: &Value, patch: &Patch) -> Result<Value, PatchError> {
    apply_json_patch_within(document, patch, 16 * 1024 * 1024)
}

/// [`apply_json_patch`] with the document bounded to `max_bytes` when serialized.
pub fn apply_json_patch_within(
    document: &Value,
    patch: &Patch,
    max_bytes: usize,
) -> Result<Value, PatchError> {
    too_many(patch.0.len(), MAX_JSON_PATCH_OPERATIONS)?;
    let mut patched = document.clone();
    let mut budget = Budget::new(&patched, max_bytes)?;
    for (index, operation) in patch.0.iter().enumerate() {
        budget.admit_json(&patched, operation, index)?;
        // `patch_unsafe` leaves a half-patched document on error, which is dropped here;
        // the undoing variant can panic, which a request must never do.
        json_patch::patch_unsafe(&mut patched, std::slice::from_ref(operation)).map_err(|e| {
            let what = match e.kind {
                json_patch::PatchErrorKind::TestFailed => "the test failed: the value differs",
                json_patch::PatchErrorKind::InvalidFromPointer => "its 'from' path does not exist",
                json_patch::PatchErrorKind::InvalidPointer => {
                    "its path does not exist or is not valid"
                }
                json_patch::PatchErrorKind::CannotMoveInsideItself => {
                    "it moves a value inside itself"
                }
                _ => "it could not be applied",
            };
            PatchError::unprocessable(
                IssueCode::Processing,
                Some(format!("Patch[{index}]")),
                format!(
                    "JSON Patch operation {index} at path '{}' failed: {what}",
                    short(operation.path().as_str())
                ),
            )
        })?;
    }
    Ok(patched)
}

/// The size and depth a patched document may reach, tracked as it grows, and the work its
/// operations may do: a patch runs inside the write transaction (on SQLite, under the one
/// write lock), so copying and dropping large values over and over must stop too.
struct Budget {
    /// An upper bound of the document's serialized size.
    size: usize,
    max_bytes: usize,
    /// Bytes of values copied, added, replaced or removed so far.
    work: usize,
}

impl Budget {
    fn new(document: &Value, max_bytes: usize) -> Result<Self, PatchError> {
        Ok(Self {
            size: serialized_size(document)?,
            max_bytes,
            work: 0,
        })
    }

    /// Counts work; refuses once it passes twice the size limit (a patch that rewrites the
    /// whole of a resource at the limit once or twice).
    fn spend(&mut self, index: usize, bytes: usize) -> Result<(), PatchError> {
        self.work = self.work.saturating_add(bytes);
        if self.work > self.max_bytes.saturating_mul(2) {
            return Err(PatchError::TooLarge(format!(
                "patch operation {index} would make the patch copy or remove more than {} bytes in all",
                self.max_bytes.saturating_mul(2)
            )));
        }
        Ok(())
    }

    /// Admits an operation that puts `added` at `depth` levels below the root (replacing
    /// `removed`), or refuses it before it runs.
    fn admit(
        &mut self,
        index: usize,
        depth: usize,
        added: Option<&Value>,
        removed: Option<&Value>,
    ) -> Result<(), PatchError> {
        let removed = removed.map(serialized_size).transpose()?.unwrap_or(0);
        self.admit_sized(index, depth, added, removed)
    }

    /// [`Self::admit`] with the size of what is removed already counted.
    fn admit_sized(
        &mut self,
        index: usize,
        depth: usize,
        added: Option<&Value>,
        removed: usize,
    ) -> Result<(), PatchError> {
        self.spend(index, removed)?;
        let Some(added) = added else {
            self.size = self.size.saturating_sub(removed);
            return Ok(());
        };
        if depth + value_depth(added) > MAX_DEPTH {
            return Err(PatchError::TooLarge(format!(
                "patch operation {index} would nest the resource deeper than {MAX_DEPTH} levels"
            )));
        }
        // A member's name, quotes, colon and comma: a generous bound of what surrounds it.
        let added = serialized_size(added)? + 4 + 64;
        self.spend(index, added)?;
        let size = self.size.saturating_add(added).saturating_sub(removed);
        if size > self.max_bytes {
            return Err(PatchError::TooLarge(format!(
                "patch operation {index} would make the resource larger than {} bytes",
                self.max_bytes
            )));
        }
        self.size = size;
        Ok(())
    }

    fn admit_json(
        &mut self,
        document: &Value,
        operation: &PatchOperation,
        index: usize,
    ) -> Result<(), PatchError> {
        let depth = |pointer: &str| pointer.matches('/').count();
        match operation {
            PatchOperation::Add(op) => {
                let replaced = document.pointer(op.path.as_str()).filter(|_| {
                    // Adding to an array inserts; adding an object member replaces it.
                    parent_is_object(document, op.path.as_str())
                });
                self.admit(index, depth(op.path.as_str()), Some(&op.value), replaced)
            }
            PatchOperation::Replace(op) => self.admit(
                index,
                depth(op.path.as_str()),
                Some(&op.value),
                document.pointer(op.path.as_str()),
            ),
            PatchOperation::Copy(op) => match document.pointer(op.from.as_str()) {
                Some(copied) => self.admit(index, depth(op.path.as_str()), Some(copied), None),
                // The operation fails when applied.
                None => Ok(()),
            },
            PatchOperation::Move(op) => match document.pointer(op.from.as_str()) {
                // Moving deeper can nest the value past the bound; its size is unchanged.
                Some(moved) if depth(op.path.as_str()) + value_depth(moved) > MAX_DEPTH => {
                    Err(PatchError::TooLarge(format!(
                        "patch operation {index} would nest the resource deeper than {MAX_DEPTH} levels"
                    )))
                }
                _ => Ok(()),
            },
            PatchOperation::Remove(op) => {
                self.admit(index, 0, None, document.pointer(op.path.as_str()))
            }
            // Comparing costs what the value to compare with weighs.
            PatchOperation::Test(op) => self.spend(index, serialized_size(&op.value)?),
        }
    }
}

/// Whether the value a JSON Pointer names is a member of an object (not an array item).
fn parent_is_object(document: &Value, pointer: &str) -> bool {
    let parent = pointer.rsplit_once('/').map_or("", |(parent, _)| parent);
    document.pointer(parent).is_some_and(Value::is_object)
}

/// The length of a value's compact JSON, counted without building it.
fn serialized_size(value: &Value) -> Result<usize, PatchError> {
    struct Counter(usize);
    impl io::Write for Counter {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    serde_json::to_writer(&mut counter, value)
        .map_err(|e| PatchError::TooLarge(format!("the patched resource cannot be sized: {e}")))?;
    Ok(counter.0)
}

/// Nesting depth of a value (a scalar is 0).
fn value_depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(value_depth).max().unwrap_or(0),
        Value::Object(members) => 1 + members.values().map(value_depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// One FHIRPath Patch operation (fhirpatch.html, "Operations").
#[derive(Debug, Clone)]
pub struct FhirPathOperation {
    pub kind: FhirPathKind,
    /// The FHIRPath expression naming the element(s) the operation works on.
    pub path: Expression,
    /// `add`: the name of the element to add.
    pub name: Option<String>,
    /// `add`, `insert`, `replace`: the value.
    pub value: Option<PatchValue>,
    /// `insert`: where.
    pub index: Option<usize>,
    /// `move`: from where.
    pub source: Option<usize>,
    /// `move`: to where.
    pub destination: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FhirPathKind {
    Add,
    Insert,
    Delete,
    Replace,
    Move,
}

/// A value given to a FHIRPath Patch operation: a typed `value[x]` or, for an element with
/// no data type of its own (a backbone element such as `Patient.contact`), an anonymous
/// value whose parts are its elements.
#[derive(Debug, Clone)]
pub enum PatchValue {
    Typed {
        /// The data type, from the `value[x]` suffix (`Date`, `HumanName`, …).
        type_name: String,
        json: Value,
    },
    Anonymous(Vec<(String, PatchValue)>),
}

/// Parses a FHIRPath Patch: a `Parameters` resource whose parameters are each named
/// `operation`, with parts `type`, `path`, `name`, `value`, `index`, `source`,
/// `destination`.
pub fn parse_fhirpath_patch(body: &[u8]) -> Result<Vec<FhirPathOperation>, PatchError> {
    let value = parse_body(body, "FHIRPath Patch")?;
    if value["resourceType"] != "Parameters" {
        return Err(PatchError::Malformed(
            "a FHIRPath Patch is a Parameters resource (fhirpatch.html)".into(),
        ));
    }
    let parameters = match &value["parameter"] {
        Value::Null => &[][..],
        Value::Array(parameters) => parameters.as_slice(),
        _ => {
            return Err(PatchError::Malformed(
                "Parameters.parameter must be a list".into(),
            ));
        }
    };
    too_many(parameters.len(), MAX_FHIRPATH_OPERATIONS)?;
    parameters
        .iter()
        .enumerate()
        .map(|(index, parameter)| parse_operation(index, parameter))
        .collect()
}

fn parse_operation(index: usize, parameter: &Value) -> Result<FhirPathOperation, PatchError> {
    let bad = |what: &str| {
        PatchError::Malformed(format!(
            "FHIRPath Patch operation {index} (Parameters.parameter[{index}]): {what}"
        ))
    };
    if parameter["name"] != "operation" {
        return Err(bad("every parameter must be named 'operation'"));
    }
    let parts = parameter["part"]
        .as_array()
        .ok_or_else(|| bad("an operation needs parts"))?;
    let mut kind = None;
    let mut path = None;
    let mut name = None;
    let mut value = None;
    let mut index_part = None;
    let mut source = None;
    let mut destination = None;
    for part in parts {
        let part_name = part["name"]
            .as_str()
            .ok_or_else(|| bad("a part has no name"))?;
        let seen = match part_name {
            "type" => kind
                .replace(match part["valueCode"].as_str() {
                    Some("add") => FhirPathKind::Add,
                    Some("insert") => FhirPathKind::Insert,
                    Some("delete") => FhirPathKind::Delete,
                    Some("replace") => FhirPathKind::Replace,
                    Some("move") => FhirPathKind::Move,
                    _ => return Err(bad("'type' must be add, insert, delete, replace or move")),
                })
                .is_some(),
            "path" => {
                let text = part["valueString"]
                    .as_str()
                    .ok_or_else(|| bad("'path' must be a valueString"))?;
                let compiled = Expression::compile(text).map_err(|e| {
                    bad(&format!(
                        "'path' is not a supported FHIRPath expression: {}",
                        e.reason
                    ))
                })?;
                path.replace(compiled).is_some()
            }
            "name" => name
                .replace(
                    part["valueString"]
                        .as_str()
                        .filter(|n| is_element_name(n))
                        .ok_or_else(|| bad("'name' must be an element name"))?
                        .to_owned(),
                )
                .is_some(),
            "value" => value
                .replace(patch_value(part, 0).map_err(|what| bad(&what))?)
                .is_some(),
            "index" => index_part
                .replace(
                    position(part)
                        .ok_or_else(|| bad("'index' must be a non-negative valueInteger"))?,
                )
                .is_some(),
            "source" => source
                .replace(
                    position(part)
                        .ok_or_else(|| bad("'source' must be a non-negative valueInteger"))?,
                )
                .is_some(),
            "destination" => destination
                .replace(
                    position(part)
                        .ok_or_else(|| bad("'destination' must be a non-negative valueInteger"))?,
                )
                .is_some(),
            other => return Err(bad(&format!("unknown part '{}'", short(other)))),
        };
        if seen {
            return Err(bad(&format!("part '{part_name}' is given twice")));
        }
    }
    let kind = kind.ok_or_else(|| bad("'type' is missing"))?;
    let path = path.ok_or_else(|| bad("'path' is missing"))?;
    let needs = |present: bool, part: &str| {
        if present {
            Ok(())
        } else {
            Err(bad(
                &format!("a {kind:?} operation needs '{part}'").to_lowercase()
            ))
        }
    };
    match kind {
        FhirPathKind::Add => {
            needs(name.is_some(), "name")?;
            needs(value.is_some(), "value")?;
        }
        FhirPathKind::Insert => {
            needs(index_part.is_some(), "index")?;
            needs(value.is_some(), "value")?;
        }
        FhirPathKind::Replace => needs(value.is_some(), "value")?,
        FhirPathKind::Move => {
            needs(source.is_some(), "source")?;
            needs(destination.is_some(), "destination")?;
        }
        FhirPathKind::Delete => {}
    }
    Ok(FhirPathOperation {
        kind,
        path,
        name,
        value,
        index: index_part,
        source,
        destination,
    })
}

/// An element name as FHIR spells them.
fn is_element_name(name: &str) -> bool {
    name.len() <= 64
        && name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_alphanumeric())
}

fn position(part: &Value) -> Option<usize> {
    part["valueInteger"]
        .as_u64()
        .and_then(|n| usize::try_from(n).ok())
}

/// The value of a `value` part (or of a part of an anonymous value), at most
/// [`MAX_DEPTH`] parts deep.
fn patch_value(part: &Value, depth: usize) -> Result<PatchValue, String> {
    if depth > MAX_DEPTH {
        return Err("the value nests too deeply".into());
    }
    let object = part.as_object().ok_or("a part must be an object")?;
    let typed: Vec<(&String, &Value)> = object
        .iter()
        .filter(|(key, _)| {
            key.strip_prefix("value")
                .is_some_and(|t| t.starts_with(|c: char| c.is_ascii_uppercase()))
        })
        .collect();
    match (typed.as_slice(), object.get("part")) {
        ([(key, json)], None) => Ok(PatchValue::Typed {
            type_name: key["value".len()..].to_owned(),
            json: (*json).clone(),
        }),
        ([], Some(Value::Array(parts))) => {
            let mut elements = Vec::with_capacity(parts.len());
            for child in parts {
                let name = child["name"]
                    .as_str()
                    .filter(|n| is_element_name(n))
                    .ok_or("a part of an anonymous value needs an element name")?;
                elements.push((name.to_owned(), patch_value(child, depth + 1)?));
            }
            Ok(PatchValue::Anonymous(elements))
        }
        _ => Err("'value' needs exactly one value[x], or parts".into()),
    }
}

/// Applies `patch` to the stored JSON of `resource_type/id` and validates the result as the
/// body of an update would be: it must still be that resource (same `resourceType` and `id`)
/// and a valid R4 resource no larger than `max_bytes`.
pub fn patch_resource(
    types: &ResourceTypes,
    resource_type: &ResourceType,
    id: &ResourceId,
    current_json: &str,
    patch: &PatchDocument,
    max_bytes: usize,
) -> Result<ValidatedResource, PatchError> {
    let current: Value = serde_json::from_str(current_json).map_err(|e| {
        PatchError::unprocessable(
            IssueCode::Exception,
            None,
            format!("the stored resource could not be parsed: {e}"),
        )
    })?;
    let patched = match patch {
        PatchDocument::Json(patch) => apply_json_patch_within(&current, patch, max_bytes)?,
        PatchDocument::Merge(merge) => {
            // Work linear in the patch, which the body limit bounds; the result is
            // bounded like any other.
            let mut patched = current;
            json_patch::merge(&mut patched, merge);
            let size = serialized_size(&patched)?;
            if size > max_bytes {
                return Err(PatchError::TooLarge(format!(
                    "the patched resource would be {size} bytes; at most {max_bytes} are accepted"
                )));
            }
            patched
        }
        PatchDocument::FhirPath(operations) => {
            let budget = Budget::new(&current, max_bytes)?;
            let mut applier = FhirPathApplier {
                types,
                resource_type,
                document: current,
                budget,
                probes: std::cell::Cell::new(MAX_SHAPE_PROBES),
            };
            for (index, operation) in operations.iter().enumerate() {
                applier.apply(index, operation)?;
            }
            applier.document
        }
    };
    if patched.get("resourceType").and_then(Value::as_str) != Some(resource_type.as_str()) {
        return Err(PatchError::unprocessable(
            IssueCode::Invalid,
            Some("resourceType".into()),
            format!("a patch must not change or remove resourceType ('{resource_type}')"),
        ));
    }
    if patched.get("id").and_then(Value::as_str) != Some(id.as_str()) {
        return Err(PatchError::unprocessable(
            IssueCode::Invalid,
            Some(format!("{resource_type}.id")),
            format!("a patch must not change or remove the id ('{id}')"),
        ));
    }
    let body = serde_json::to_vec(&patched).map_err(|e| {
        PatchError::unprocessable(IssueCode::Exception, None, format!("serialization: {e}"))
    })?;
    validate_resource(types, resource_type, &body).map_err(|e| {
        PatchError::Unprocessable(ValidationError {
            message: format!("the patched resource is not valid: {}", e.message),
            ..e
        })
    })
}

/// One step of a location in a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(usize),
}

/// The location of a value in `document`, found by identity (FHIRPath evaluation yields
/// references into the document).
fn locate(document: &Value, target: &Value) -> Option<Vec<Step>> {
    fn walk(value: &Value, target: &Value, path: &mut Vec<Step>) -> bool {
        if std::ptr::eq(value, target) {
            return true;
        }
        match value {
            Value::Object(members) => {
                for (key, child) in members {
                    path.push(Step::Key(key.clone()));
                    if walk(child, target, path) {
                        return true;
                    }
                    path.pop();
                }
                false
            }
            Value::Array(items) => {
                for (index, child) in items.iter().enumerate() {
                    path.push(Step::Index(index));
                    if walk(child, target, path) {
                        return true;
                    }
                    path.pop();
                }
                false
            }
            _ => false,
        }
    }
    let mut path = Vec::new();
    walk(document, target, &mut path).then_some(path)
}

fn value_at_mut<'a>(document: &'a mut Value, location: &[Step]) -> Option<&'a mut Value> {
    let mut current = document;
    for step in location {
        current = match step {
            Step::Key(key) => current.as_object_mut()?.get_mut(key)?,
            Step::Index(index) => current.as_array_mut()?.get_mut(*index)?,
        };
    }
    Some(current)
}

/// The FHIRPath-like location the validator reports (`Patient.contact[0].name`).
fn spelled(resource_type: &str, location: &[Step]) -> String {
    let mut text = resource_type.to_owned();
    for step in location {
        match step {
            Step::Key(key) => {
                text.push('.');
                text.push_str(key);
            }
            Step::Index(index) => text.push_str(&format!("[{index}]")),
        }
    }
    text
}

/// Applies FHIRPath Patch operations to a document.
struct FhirPathApplier<'a> {
    types: &'a ResourceTypes,
    resource_type: &'a ResourceType,
    document: Value,
    budget: Budget,
    /// Shape probes left (see [`MAX_SHAPE_PROBES`]).
    probes: std::cell::Cell<usize>,
}

/// Where a value given to an operation goes.
#[derive(Debug, Clone)]
enum Slot {
    /// A new element, absent so far: its spelling (list or not, choice type) is decided.
    Absent,
    /// A single element under this key.
    Key(String),
    /// An item of the list, at this index.
    Item(usize),
}

impl FhirPathApplier<'_> {
    fn apply(&mut self, index: usize, operation: &FhirPathOperation) -> Result<(), PatchError> {
        // Evaluating the path and finding its nodes walk the resource.
        self.budget.spend(index, self.budget.size / 4)?;
        match operation.kind {
            FhirPathKind::Add => self.add(index, operation),
            FhirPathKind::Insert => self.insert(index, operation),
            FhirPathKind::Delete => self.delete(index, operation),
            FhirPathKind::Replace => self.replace(index, operation),
            FhirPathKind::Move => self.move_item(index, operation),
        }
    }

    /// The locations of the first two nodes `path` selects (an operation needs to know only
    /// whether there are none, one or several).
    fn select(&self, path: &Expression) -> Vec<Vec<Step>> {
        path.evaluate(self.resource_type.as_str(), &self.document)
            .iter()
            .filter_map(|node| locate(&self.document, node.value))
            .take(2)
            .collect()
    }

    /// The one node `path` selects, or the operation fails.
    fn single(&self, index: usize, path: &Expression) -> Result<Vec<Step>, PatchError> {
        let mut found = self.select(path);
        match found.len() {
            1 => Ok(found.remove(0)),
            0 => Err(PatchError::failed(index, "its path matches no element")),
            _ => Err(PatchError::failed(
                index,
                "its path matches more than one element",
            )),
        }
    }

    /// The list `path` names (`parent.name`) and where it lives: the parent's location
    /// and the member name. The list may be absent (empty).
    fn list(&self, index: usize, path: &Expression) -> Result<(Vec<Step>, String), PatchError> {
        let (parent, name) = path.split_last_member().ok_or_else(|| {
            PatchError::failed(index, "its path must end with the name of a list element")
        })?;
        let parent = self.single(index, &parent)?;
        let container = self.at(&parent);
        match container.and_then(|c| c.get(&name)) {
            None | Some(Value::Array(_)) => Ok((parent, name)),
            Some(_) => Err(PatchError::failed(index, "its path does not name a list")),
        }
    }

    fn at(&self, location: &[Step]) -> Option<&Value> {
        let mut current = &self.document;
        for step in location {
            current = match step {
                Step::Key(key) => current.get(key)?,
                Step::Index(index) => current.get(*index)?,
            };
        }
        Some(current)
    }

    fn add(&mut self, index: usize, operation: &FhirPathOperation) -> Result<(), PatchError> {
        let (Some(name), Some(value)) = (&operation.name, &operation.value) else {
            return Err(PatchError::failed(index, "it lacks a name or a value"));
        };
        let container = self.single(index, &operation.path)?;
        let existing = self.at(&container).and_then(|c| c.get(name));
        match existing {
            Some(Value::Array(items)) => {
                let (_, json) = self.place(&container, name, value, Slot::Item(items.len()));
                let mut location = container.clone();
                location.push(Step::Key(name.clone()));
                location.push(Step::Index(items.len()));
                self.admit(index, &location, &json, false)?;
                if let Some(Value::Array(items)) =
                    value_at_mut(&mut self.document, &container).and_then(|c| c.get_mut(name))
                {
                    items.push(json);
                }
                Ok(())
            }
            Some(_) => Err(PatchError::failed(
                index,
                "the element it adds already has a value (use replace)",
            )),
            None => {
                if !self.at(&container).is_some_and(Value::is_object) {
                    return Err(PatchError::failed(
                        index,
                        "its path does not name an element that can have children",
                    ));
                }
                let (key, json) = self.place(&container, name, value, Slot::Absent);
                let mut location = container.clone();
                location.push(Step::Key(key.clone()));
                self.admit(index, &location, &json, false)?;
                if let Some(Value::Object(members)) = value_at_mut(&mut self.document, &container) {
                    members.insert(key, json);
                }
                Ok(())
            }
        }
    }

    fn insert(&mut self, index: usize, operation: &FhirPathOperation) -> Result<(), PatchError> {
        let (Some(at), Some(value)) = (operation.index, &operation.value) else {
            return Err(PatchError::failed(index, "it lacks an index or a value"));
        };
        let (container, name) = self.list(index, &operation.path)?;
        let length = self
            .at(&container)
            .and_then(|c| c.get(&name))
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        if at > length {
            return Err(PatchError::failed(
                index,
                "its index is past the end of the list",
            ));
        }
        let (_, json) = self.place(&container, &name, value, Slot::Item(at));
        let mut location = container.clone();
        location.push(Step::Key(name.clone()));
        location.push(Step::Index(at));
        self.admit(index, &location, &json, false)?;
        let Some(Value::Object(members)) = value_at_mut(&mut self.document, &container) else {
            return Err(PatchError::failed(
                index,
                "its list's parent is not an element",
            ));
        };
        match members
            .entry(name)
            .or_insert_with(|| Value::Array(Vec::new()))
        {
            Value::Array(items) => items.insert(at, json),
            _ => return Err(PatchError::failed(index, "its path does not name a list")),
        }
        Ok(())
    }

    fn delete(&mut self, index: usize, operation: &FhirPathOperation) -> Result<(), PatchError> {
        let mut found = self.select(&operation.path);
        let location = match found.len() {
            // Deleting what is not there changes nothing (fhirpatch.html, delete).
            0 => return Ok(()),
            1 => found.remove(0),
            _ => {
                return Err(PatchError::failed(
                    index,
                    "its path matches more than one element",
                ));
            }
        };
        let Some((last, parent)) = location.split_last() else {
            return Err(PatchError::failed(
                index,
                "it cannot delete the resource itself",
            ));
        };
        let removed = self.at(&location).map(serialized_size).transpose()?;
        self.budget
            .admit_sized(index, 0, None, removed.unwrap_or(0))?;
        match (last, value_at_mut(&mut self.document, parent)) {
            (Step::Key(key), Some(Value::Object(members))) => {
                members.shift_remove(key);
                // The primitive's extensions go with it.
                members.shift_remove(&format!("_{key}"));
            }
            (Step::Index(at), Some(Value::Array(items))) if *at < items.len() => {
                items.remove(*at);
            }
            _ => return Err(PatchError::failed(index, "its path matches no element")),
        }
        self.prune_empty(parent);
        Ok(())
    }

    /// Removes the node at `location` and then its ancestors while they are left empty:
    /// FHIR JSON has no empty objects or lists (deleting `contact[0].name.text`, the name's
    /// only element, deletes the name).
    fn prune_empty(&mut self, location: &[Step]) {
        let mut location = location;
        while let Some((last, parent)) = location.split_last() {
            let empty = match self.at(location) {
                Some(Value::Object(members)) => members.is_empty(),
                Some(Value::Array(items)) => items.is_empty(),
                _ => false,
            };
            if !empty {
                return;
            }
            match (last, value_at_mut(&mut self.document, parent)) {
                (Step::Key(key), Some(Value::Object(members))) => {
                    members.shift_remove(key);
                }
                (Step::Index(at), Some(Value::Array(items))) if *at < items.len() => {
                    items.remove(*at);
                }
                _ => return,
            }
            location = parent;
        }
    }

    fn replace(&mut self, index: usize, operation: &FhirPathOperation) -> Result<(), PatchError> {
        let Some(value) = &operation.value else {
            return Err(PatchError::failed(index, "it lacks a value"));
        };
        let location = self.single(index, &operation.path)?;
        let Some((last, parent)) = location.split_last() else {
            return Err(PatchError::failed(
                index,
                "it cannot replace the resource itself",
            ));
        };
        // The last name the path gives: when the element is a choice (`deceased`), the
        // stored key (`deceasedBoolean`) changes with the new value's type.
        let asked = operation.path.split_last_member().map(|(_, name)| name);
        match last {
            Step::Index(at) => {
                let (name, grandparent) = match parent.split_last() {
                    Some((Step::Key(key), grandparent)) => (key.clone(), grandparent),
                    _ => return Err(PatchError::failed(index, "its path matches no element")),
                };
                let (_, json) = self.place(grandparent, &name, value, Slot::Item(*at));
                self.admit(index, &location, &json, true)?;
                if let Some(slot) = value_at_mut(&mut self.document, &location) {
                    *slot = json;
                }
            }
            Step::Key(key) => {
                let choice = asked
                    .as_deref()
                    .filter(|name| *name != key && key.starts_with(*name));
                let new_key = match (choice, value) {
                    (Some(name), PatchValue::Typed { type_name, .. }) => {
                        format!("{name}{type_name}")
                    }
                    _ => key.clone(),
                };
                let (new_key, json) =
                    self.place(parent, &new_key, value, Slot::Key(new_key.clone()));
                self.admit(index, &location, &json, true)?;
                if let Some(Value::Object(members)) = value_at_mut(&mut self.document, parent) {
                    if new_key != *key {
                        members.shift_remove(key);
                        members.shift_remove(&format!("_{key}"));
                    }
                    members.insert(new_key, json);
                }
            }
        }
        Ok(())
    }

    fn move_item(&mut self, index: usize, operation: &FhirPathOperation) -> Result<(), PatchError> {
        let (Some(source), Some(destination)) = (operation.source, operation.destination) else {
            return Err(PatchError::failed(
                index,
                "it lacks a source or a destination",
            ));
        };
        let (container, name) = self.list(index, &operation.path)?;
        let Some(Value::Array(items)) =
            value_at_mut(&mut self.document, &container).and_then(|c| c.get_mut(&name))
        else {
            return Err(PatchError::failed(index, "its list is empty"));
        };
        if source >= items.len() || destination >= items.len() {
            return Err(PatchError::failed(
                index,
                "its source or destination is past the end of the list",
            ));
        }
        let item = items.remove(source);
        items.insert(destination, item);
        Ok(())
    }

    /// Admits putting `added` at `location` (`replaces`: over what is there).
    fn admit(
        &mut self,
        index: usize,
        location: &[Step],
        added: &Value,
        replaces: bool,
    ) -> Result<(), PatchError> {
        let removed = match self.at(location).filter(|_| replaces) {
            Some(old) => serialized_size(old)?,
            None => 0,
        };
        self.budget
            .admit_sized(index, location.len(), Some(added), removed)
    }

    /// The key and JSON under which `value` is put as element `name` of the node at
    /// `container`, in `slot`. FHIR JSON spells a repeating element as a list and a choice
    /// element with its type (`deceasedBoolean`); without the element definitions at hand,
    /// each spelling of a new element is tried against the model where it will live, and
    /// the first the model does not refuse there wins. The elements of an anonymous value
    /// are spelled the same way, inside it.
    fn place(
        &self,
        container: &[Step],
        name: &str,
        value: &PatchValue,
        slot: Slot,
    ) -> (String, Value) {
        let (mut probe, container) = self.probe_base(container);
        self.place_in(&mut probe, &container, name, value, slot)
    }

    fn place_in(
        &self,
        probe: &mut Value,
        container: &[Step],
        name: &str,
        value: &PatchValue,
        slot: Slot,
    ) -> (String, Value) {
        let naive = naive_json(value);
        let mut candidates = match &slot {
            Slot::Absent => {
                let mut candidates = vec![
                    (name.to_owned(), naive.clone()),
                    (name.to_owned(), Value::Array(vec![naive.clone()])),
                ];
                if let PatchValue::Typed { type_name, .. } = value {
                    candidates.push((format!("{name}{type_name}"), naive.clone()));
                }
                candidates
            }
            Slot::Key(key) => vec![(key.clone(), naive.clone())],
            Slot::Item(_) => vec![(name.to_owned(), naive.clone())],
        };
        let chosen = if candidates.len() == 1 {
            0
        } else {
            candidates
                .iter()
                .position(|(key, json)| self.fits(probe, container, key, json))
                .unwrap_or(0)
        };
        let (key, json) = candidates.swap_remove(chosen);
        let PatchValue::Anonymous(parts) = value else {
            return (key, json);
        };
        // Put it in the probe, then spell its elements where they live.
        let listed = json.is_array();
        let mut element = container.to_vec();
        element.push(Step::Key(key.clone()));
        match &slot {
            Slot::Item(at) => {
                element.push(Step::Index(*at));
                insert_item(probe, container, &key, *at, naive.clone());
            }
            _ => {
                if listed {
                    element.push(Step::Index(0));
                }
                insert_member(probe, container, &key, json.clone());
            }
        }
        let mut object = Map::new();
        // The parts by name, in the order names first appear.
        let mut named: indexmap::IndexMap<&str, Vec<&PatchValue>> = indexmap::IndexMap::new();
        for (part, value) in parts {
            named.entry(part.as_str()).or_default().push(value);
        }
        for (part, values) in named {
            if let Some(Value::Object(members)) = value_at_mut(probe, &element) {
                members.shift_remove(part);
            }
            let (part_key, part_json) = match values.as_slice() {
                [single] => self.place_in(probe, &element, part, single, Slot::Absent),
                // A repeated element is a list.
                many => {
                    let items = many
                        .iter()
                        .enumerate()
                        .map(|(at, v)| self.place_in(probe, &element, part, v, Slot::Item(at)).1)
                        .collect();
                    (part.to_owned(), Value::Array(items))
                }
            };
            insert_member(probe, &element, &part_key, part_json.clone());
            object.insert(part_key, part_json);
        }
        let json = if listed {
            Value::Array(vec![Value::Object(object)])
        } else {
            Value::Object(object)
        };
        (key, json)
    }

    /// Whether `json` under `key` in the node at `container` of `probe` passes the model
    /// there (a missing required element inside it, or a problem elsewhere, does not
    /// count). Spends one probe; with none left, nothing fits.
    fn fits(&self, probe: &Value, container: &[Step], key: &str, json: &Value) -> bool {
        let left = self.probes.get();
        if left == 0 {
            return false;
        }
        self.probes.set(left - 1);
        let mut probe = probe.clone();
        insert_member(&mut probe, container, key, json.clone());
        let mut location = container.to_vec();
        location.push(Step::Key(key.to_owned()));
        let at = spelled(self.resource_type.as_str(), &location);
        let Ok(body) = serde_json::to_vec(&probe) else {
            return false;
        };
        match validate_resource(self.types, self.resource_type, &body) {
            Ok(_) => true,
            Err(error) => {
                // Where the model stopped tells whose fault it was; when it cannot say (no
                // location, or only the resource, or an ancestor of the element), the
                // spelling is not taken.
                let Some(expression) = error.expression else {
                    return false;
                };
                let itself = expression == at || expression == format!("{at}[0]");
                // A problem inside the value's own elements is theirs (an anonymous value's
                // elements are spelled next, where they live): this shape took.
                let deeper = expression.starts_with(&format!("{at}."))
                    || expression.starts_with(&format!("{at}[0]."));
                let above = at.starts_with(&format!("{expression}."))
                    || at.starts_with(&format!("{expression}["));
                if itself {
                    // The element took this shape and then missed a required part of its
                    // own: the shape is right.
                    error.code == IssueCode::Required
                } else {
                    deeper || (!above && expression != self.resource_type.as_str())
                }
            }
        }
    }

    /// What an element's spelling is tried against: the whole document when small, else a
    /// skeleton of the container's ancestors (lists of one item); with the container's
    /// location in it.
    fn probe_base(&self, container: &[Step]) -> (Value, Vec<Step>) {
        if serialized_size(&self.document).is_ok_and(|size| size <= WHOLE_PROBE_BYTES) {
            return (self.document.clone(), container.to_vec());
        }
        let mut skeleton = serde_json::json!({"resourceType": self.resource_type.as_str()});
        let mut location = Vec::new();
        let mut steps = container.iter().peekable();
        while let Some(step) = steps.next() {
            let Step::Key(key) = step else { continue };
            let listed = matches!(steps.peek(), Some(Step::Index(_)));
            let empty = Value::Object(Map::new());
            let slot = if listed {
                Value::Array(vec![empty])
            } else {
                empty
            };
            insert_member(&mut skeleton, &location, key, slot);
            location.push(Step::Key(key.clone()));
            if listed {
                location.push(Step::Index(0));
            }
        }
        (skeleton, location)
    }
}

/// A value as JSON without any spelling decided: an anonymous value's elements under their
/// plain names, repeated ones as lists.
fn naive_json(value: &PatchValue) -> Value {
    match value {
        PatchValue::Typed { json, .. } => json.clone(),
        PatchValue::Anonymous(parts) => {
            let mut object = Map::new();
            for (name, part) in parts {
                let json = naive_json(part);
                match object.get_mut(name) {
                    Some(Value::Array(items)) => items.push(json),
                    Some(single) => *single = Value::Array(vec![single.clone(), json]),
                    None => {
                        object.insert(name.clone(), json);
                    }
                }
            }
            Value::Object(object)
        }
    }
}

/// Sets member `key` of the object at `container` (nothing when there is none).
fn insert_member(document: &mut Value, container: &[Step], key: &str, json: Value) {
    if let Some(Value::Object(members)) = value_at_mut(document, container) {
        members.insert(key.to_owned(), json);
    }
}

/// Inserts an item into list `key` of the object at `container`, creating the list.
fn insert_item(document: &mut Value, container: &[Step], key: &str, at: usize, json: Value) {
    if let Some(Value::Object(members)) = value_at_mut(document, container)
        && let Value::Array(items) = members
            .entry(key.to_owned())
            .or_insert_with(|| Value::Array(Vec::new()))
    {
        items.insert(at.min(items.len()), json);
    }
}

fn short(text: &str) -> String {
    text.chars().take(120).collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn malformed_documents_are_400_and_failures_422() {
        assert!(matches!(
            parse_json_patch(b"{\"op\":\"add\"}"),
            Err(PatchError::Malformed(_))
        ));
        assert!(matches!(
            parse_json_patch(b"[{\"op\":\"frobnicate\",\"path\":\"/a\"}]"),
            Err(PatchError::Malformed(_))
        ));
        assert!(matches!(
            parse_json_patch(b"[{\"op\":\"add\",\"path\":\"/a\"}]"),
            Err(PatchError::Malformed(_))
        ));
        let patch = parse_json_patch(br#"[{"op":"test","path":"/a","value":2}]"#).unwrap();
        let Err(PatchError::Unprocessable(error)) =
            apply_json_patch(&serde_json::json!({"a": 1}), &patch)
        else {
            panic!("a failed test must be unprocessable");
        };
        assert_eq!(error.expression.as_deref(), Some("Patch[0]"));
        assert!(!error.message.contains('1'), "{}", error.message);
    }

    #[test]
    fn doubling_copies_are_refused_before_they_grow_the_document() {
        let mut operations = vec![json!({"op": "add", "path": "/a", "value": vec!["x"; 16]})];
        for _ in 0..60 {
            operations.push(json!({"op": "copy", "from": "/a", "path": "/a/-"}));
        }
        let body = serde_json::to_vec(&operations).unwrap();
        let patch = parse_json_patch(&body).unwrap();
        let started = std::time::Instant::now();
        let refused = apply_json_patch_within(&json!({}), &patch, 1024 * 1024);
        assert!(
            matches!(refused, Err(PatchError::TooLarge(_))),
            "{refused:?}"
        );
        // Refused at the first copy past the limit, not after building gigabytes.
        assert!(started.elapsed() < std::time::Duration::from_secs(5));

        // Each operation nests one level deeper at a constant size.
        let deep: Vec<Value> = (0..120)
            .map(|level| json!({"op": "add", "path": format!("/a{}", "/0".repeat(level)), "value": [0]}))
            .collect();
        let patch = parse_json_patch(&serde_json::to_vec(&deep).unwrap()).unwrap();
        let refused = apply_json_patch_within(&json!({}), &patch, usize::MAX);
        assert!(
            matches!(refused, Err(PatchError::TooLarge(_))),
            "{refused:?}"
        );

        let many =
            vec![json!({"op": "test", "path": "/a", "value": 1}); MAX_JSON_PATCH_OPERATIONS + 1];
        let refused = parse_json_patch(&serde_json::to_vec(&many).unwrap());
        assert!(matches!(refused, Err(PatchError::TooLarge(_))));
    }

    #[test]
    fn copying_and_removing_over_and_over_is_bounded_too() {
        // The document never grows past its limit, but each round copies and drops a
        // value of a tenth of it.
        let mut operations = vec![json!({"op": "add", "path": "/a", "value": "x".repeat(100_000)})];
        for _ in 0..400 {
            operations.push(json!({"op": "copy", "from": "/a", "path": "/b"}));
            operations.push(json!({"op": "remove", "path": "/b"}));
        }
        let patch = parse_json_patch(&serde_json::to_vec(&operations).unwrap()).unwrap();
        let refused = apply_json_patch_within(&json!({}), &patch, 1024 * 1024);
        assert!(
            matches!(refused, Err(PatchError::TooLarge(_))),
            "{refused:?}"
        );
        // A few such rounds are fine.
        let patch = Patch(patch.0.into_iter().take(9).collect());
        assert!(apply_json_patch_within(&json!({}), &patch, 1024 * 1024).is_ok());
    }

    #[test]
    fn fhirpath_patches_parse_and_refuse_what_is_not_one() {
        let add = json!({"resourceType": "Parameters", "parameter": [{"name": "operation", "part": [
            {"name": "type", "valueCode": "add"},
            {"name": "path", "valueString": "Patient"},
            {"name": "name", "valueString": "birthDate"},
            {"name": "value", "valueDate": "1930-01-01"}]}]});
        let operations = parse_fhirpath_patch(&serde_json::to_vec(&add).unwrap()).unwrap();
        assert_eq!(operations.len(), 1);
        assert_eq!(operations[0].kind, FhirPathKind::Add);
        let mut no_value = add.clone();
        no_value["parameter"][0]["part"]
            .as_array_mut()
            .unwrap()
            .pop();
        assert!(matches!(
            parse_fhirpath_patch(&serde_json::to_vec(&no_value).unwrap()),
            Err(PatchError::Malformed(_))
        ));
        let mut bad_path = add.clone();
        bad_path["parameter"][0]["part"][1]["valueString"] = json!("Patient.name.select(");
        assert!(matches!(
            parse_fhirpath_patch(&serde_json::to_vec(&bad_path).unwrap()),
            Err(PatchError::Malformed(_))
        ));
        assert!(matches!(
            parse_fhirpath_patch(br#"{"resourceType":"Patient"}"#),
            Err(PatchError::Malformed(_))
        ));
    }
}
