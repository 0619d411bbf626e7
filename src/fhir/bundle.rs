//! Bundles the server builds. Resources are embedded as raw JSON so that the stored text
//! (and so every decimal's written precision) reaches the client unchanged.

use serde::Serialize;
use serde_json::value::RawValue;

/// A Bundle.link.
#[derive(Debug, Clone, Serialize)]
pub struct Link {
    pub relation: &'static str,
    pub url: String,
}

#[derive(Debug, Serialize)]
pub struct EntryRequest {
    pub method: String,
    pub url: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EntryResponse {
    pub status: String,
    pub etag: String,
    pub last_modified: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    pub full_url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource: Option<Box<RawValue>>,
    pub request: EntryRequest,
    pub response: EntryResponse,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Bundle {
    resource_type: &'static str,
    pub id: String,
    #[serde(rename = "type")]
    pub bundle_type: &'static str,
    pub timestamp: String,
    /// Omitted where counting would cost a scan per page (type and system history).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total: Option<i64>,
    pub link: Vec<Link>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub entry: Vec<Entry>,
}

impl Bundle {
    pub fn history(
        timestamp: String,
        total: Option<i64>,
        link: Vec<Link>,
        entry: Vec<Entry>,
    ) -> Self {
        Self {
            resource_type: "Bundle",
            id: uuid::Uuid::new_v4().to_string(),
            bundle_type: "history",
            timestamp,
            total,
            link,
            entry,
        }
    }

    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string(self)
    }
}

/// Embeds stored JSON (already valid) as a raw value.
pub fn raw_resource(json: String) -> Result<Box<RawValue>, serde_json::Error> {
    RawValue::from_string(json)
}
