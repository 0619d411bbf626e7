//! The FHIR `patch` interaction (https://hl7.org/fhir/R4/http.html#patch) with JSON Patch
//! (RFC 6902): parsing the patch document and applying it to the current version of a
//! resource. The patched resource is then validated like the body of an update.
//!
//! Status codes follow http.html#patch: a patch document that cannot be parsed is the
//! client's malformed request (400); a well-formed patch that cannot be applied (a failed
//! `test`, a path that does not exist) or whose result is not an acceptable version of the
//! resource is 422 Unprocessable Entity.

use json_patch::{Patch, PatchErrorKind};
use serde_json::Value;

use super::outcome::IssueCode;
use super::resource_types::{ResourceId, ResourceType, ResourceTypes};
use super::validate::{ValidatedResource, ValidationError, validate_resource};

/// The media type of a JSON Patch document (RFC 6902 §6).
pub const JSON_PATCH: &str = "application/json-patch+json";

/// Why a patch was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    /// The patch document is not a JSON Patch (400).
    #[error("{0}")]
    Malformed(String),
    /// The patch could not be applied, or its result is not acceptable (422).
    #[error("{}", .0.message)]
    Unprocessable(ValidationError),
}

impl PatchError {
    fn unprocessable(code: IssueCode, expression: Option<String>, message: String) -> Self {
        Self::Unprocessable(ValidationError {
            code,
            expression,
            message,
        })
    }
}

/// Parses a JSON Patch document: a JSON array of operations (RFC 6902 §3, §4). Members an
/// operation does not define are ignored, as §4 requires.
pub fn parse_json_patch(body: &[u8]) -> Result<Patch, PatchError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| PatchError::Malformed("the JSON Patch document is not valid UTF-8".into()))?;
    let value: Value = serde_json::from_str(text)
        .map_err(|e| PatchError::Malformed(format!("the JSON Patch document is not JSON: {e}")))?;
    if !value.is_array() {
        return Err(PatchError::Malformed(
            "a JSON Patch document must be a JSON array of operations (RFC 6902 §3)".into(),
        ));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        // The path (e.g. `[1].op`) names the operation without echoing its values.
        PatchError::Malformed(format!(
            "invalid JSON Patch operation at {}: {}",
            e.path(),
            short(&e.inner().to_string())
        ))
    })
}

/// Applies `patch` to `document` (RFC 6902 §5: all operations or none). Failures name the
/// operation and its path, never the values involved (they may be PHI).
pub fn apply_json_patch(document: &Value, patch: &Patch) -> Result<Value, PatchError> {
    let mut patched = document.clone();
    // `patch_unsafe` leaves a half-patched document on error, which is dropped here; the
    // undoing variant can panic, which a request must never do.
    json_patch::patch_unsafe(&mut patched, &patch.0).map_err(|e| {
        let what = match e.kind {
            PatchErrorKind::TestFailed => "the test failed: the value differs",
            PatchErrorKind::InvalidFromPointer => "its 'from' path does not exist",
            PatchErrorKind::InvalidPointer => "its path does not exist or is not valid",
            PatchErrorKind::CannotMoveInsideItself => "it moves a value inside itself",
            _ => "it could not be applied",
        };
        PatchError::unprocessable(
            IssueCode::Processing,
            Some(format!("Patch[{}]", e.operation)),
            format!(
                "JSON Patch operation {} at path '{}' failed: {what}",
                e.operation,
                short(e.path.as_str())
            ),
        )
    })?;
    Ok(patched)
}

/// Applies `patch` to the stored JSON of `resource_type/id` and validates the result as the
/// body of an update would be: it must still be that resource (same `resourceType` and `id`)
/// and a valid R4 resource.
pub fn patch_resource(
    types: &ResourceTypes,
    resource_type: &ResourceType,
    id: &ResourceId,
    current_json: &str,
    patch: &Patch,
) -> Result<ValidatedResource, PatchError> {
    let current: Value = serde_json::from_str(current_json).map_err(|e| {
        PatchError::unprocessable(
            IssueCode::Exception,
            None,
            format!("the stored resource could not be parsed: {e}"),
        )
    })?;
    let patched = apply_json_patch(&current, patch)?;
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

fn short(text: &str) -> String {
    text.chars().take(120).collect()
}

#[cfg(test)]
mod tests {
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
}
