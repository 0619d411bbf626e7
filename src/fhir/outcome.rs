//! OperationOutcome: how every error (and `Prefer: return=OperationOutcome`) is reported.

use serde::Serialize;
use utoipa::ToSchema;

/// R4 `issue-type` codes this server uses (<https://hl7.org/fhir/R4/valueset-issue-type.html>).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum IssueCode {
    Invalid,
    Structure,
    Required,
    Value,
    CodeInvalid,
    NotSupported,
    NotFound,
    Deleted,
    Conflict,
    TooLong,
    Exception,
    Transient,
    Timeout,
    Throttled,
    Processing,
    Security,
    Login,
    Forbidden,
    Informational,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Fatal,
    Error,
    Warning,
    Information,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Issue {
    pub severity: Severity,
    pub code: IssueCode,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diagnostics: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub expression: Vec<String>,
}

/// A FHIR R4 OperationOutcome resource.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(example = json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-found", "diagnostics": "Patient/123 is not known"}]}))]
pub struct OperationOutcome {
    /// Always `OperationOutcome`.
    #[schema(value_type = String)]
    resource_type: &'static str,
    pub issue: Vec<Issue>,
}

impl OperationOutcome {
    pub fn single(
        severity: Severity,
        code: IssueCode,
        diagnostics: impl Into<String>,
        expression: Option<String>,
    ) -> Self {
        Self {
            resource_type: "OperationOutcome",
            issue: vec![Issue {
                severity,
                code,
                diagnostics: Some(diagnostics.into()),
                expression: expression.into_iter().collect(),
            }],
        }
    }

    pub fn error(code: IssueCode, diagnostics: impl Into<String>) -> Self {
        Self::single(Severity::Error, code, diagnostics, None)
    }

    pub fn information(diagnostics: impl Into<String>) -> Self {
        Self::single(
            Severity::Information,
            IssueCode::Informational,
            diagnostics,
            None,
        )
    }

    pub fn warning(diagnostics: impl Into<String>) -> Self {
        Self::single(
            Severity::Warning,
            IssueCode::NotSupported,
            diagnostics,
            None,
        )
    }

    pub fn to_json(&self) -> String {
        // Serializing plain strings and enums cannot fail; an empty object is a safe fallback.
        serde_json::to_string(self).unwrap_or_else(|_| "{}".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_as_r4_operation_outcome() {
        let outcome = OperationOutcome::single(
            Severity::Error,
            IssueCode::CodeInvalid,
            "bad code",
            Some("Patient.gender".into()),
        );
        let value: serde_json::Value = serde_json::from_str(&outcome.to_json()).unwrap();
        assert_eq!(value["resourceType"], "OperationOutcome");
        assert_eq!(value["issue"][0]["code"], "code-invalid");
        assert_eq!(value["issue"][0]["severity"], "error");
        assert_eq!(value["issue"][0]["expression"][0], "Patient.gender");
    }
}
