//! The stored form of a resource version: the client's JSON with the server-owned `id`
//! and `meta.versionId`/`meta.lastUpdated` set, every other element byte for byte as sent.

use indexmap::IndexMap;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::resource_types::{ResourceId, ResourceType};

/// The number of one version of a resource (`meta.versionId`): 1 for the first, one more
/// for each version after it, deletions included. A type of its own so that it cannot be
/// mixed up with the other numbers a version carries (its `lastUpdated`, its resource's
/// storage `seq`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct VersionId(i64);

impl VersionId {
    pub const FIRST: Self = Self(1);

    /// The version written after this one.
    #[must_use]
    pub fn next(self) -> Self {
        Self(self.0.saturating_add(1))
    }

    /// The version before this one, if there is one.
    pub fn previous(self) -> Option<Self> {
        (self.0 > 1).then(|| Self(self.0 - 1))
    }

    /// The number as the database stores it.
    pub fn get(self) -> i64 {
        self.0
    }

    /// A version number as a client writes it (`_history/{vid}`, `If-Match`, a Bundle's
    /// `ifMatch`): a positive decimal integer.
    pub fn parse(text: &str) -> Option<Self> {
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        text.parse().ok().filter(|&n| n > 0).map(Self)
    }
}

/// Numbers read back from the database, which only ever stored [`VersionId`]s.
impl From<i64> for VersionId {
    fn from(stored: i64) -> Self {
        Self(stored)
    }
}

impl std::fmt::Display for VersionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Server-owned metadata of one version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionMeta {
    pub version_id: VersionId,
    /// Microseconds since the Unix epoch, UTC.
    pub last_updated: i64,
}

/// Formats microseconds since the epoch as a FHIR `instant` (RFC 3339, UTC, microseconds).
pub fn format_instant(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
        .unwrap_or_else(|| "1970-01-01T00:00:00.000000Z".to_owned())
}

/// Builds the stored JSON from a validated compact body. Elements keep their order, with
/// `resourceType`, `id` and `meta` first. Fails only if the body is not a JSON object,
/// which validation has already excluded.
pub fn stamp(
    compact_body: &str,
    resource_type: &ResourceType,
    id: &ResourceId,
    meta: VersionMeta,
) -> Result<String, serde_json::Error> {
    let mut elements: IndexMap<String, Box<RawValue>> = serde_json::from_str(compact_body)?;
    elements.shift_remove("resourceType");
    elements.shift_remove("id");
    let mut meta_object = match elements.shift_remove("meta") {
        Some(raw) => match serde_json::from_str::<Value>(raw.get())? {
            Value::Object(map) => map,
            _ => Map::new(),
        },
        None => Map::new(),
    };
    meta_object.insert(
        "versionId".into(),
        Value::String(meta.version_id.to_string()),
    );
    meta_object.insert(
        "lastUpdated".into(),
        Value::String(format_instant(meta.last_updated)),
    );

    let mut out: IndexMap<&str, Box<RawValue>> = IndexMap::with_capacity(elements.len() + 3);
    out.insert(
        "resourceType",
        serde_json::value::to_raw_value(resource_type.as_str())?,
    );
    out.insert("id", serde_json::value::to_raw_value(id.as_str())?);
    out.insert("meta", serde_json::value::to_raw_value(&meta_object)?);
    for (key, value) in &elements {
        out.insert(key.as_str(), value.clone());
    }
    serde_json::to_string(&out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::ResourceTypes;

    #[test]
    fn version_ids_are_positive_decimals_and_count_up_from_one() {
        assert_eq!(VersionId::parse("1"), Some(VersionId::FIRST));
        assert_eq!(VersionId::parse("42").map(VersionId::get), Some(42));
        for text in [
            "",
            "0",
            "-1",
            "+1",
            "1.0",
            " 1",
            "1e3",
            "x",
            "99999999999999999999",
        ] {
            assert_eq!(VersionId::parse(text), None, "{text:?}");
        }
        let second = VersionId::FIRST.next();
        assert_eq!(second.get(), 2);
        assert_eq!(second.previous(), Some(VersionId::FIRST));
        assert_eq!(VersionId::FIRST.previous(), None);
        assert_eq!(second.to_string(), "2");
        // Sealed cursors and ledger positions carry it as a plain number.
        assert_eq!(serde_json::to_string(&second).unwrap(), "2");
    }

    #[test]
    fn stamps_id_and_meta_and_keeps_everything_else() {
        let types = ResourceTypes::load().unwrap();
        let patient = types.resolve("Patient").unwrap();
        let id = ResourceId::parse("abc").unwrap();
        let body = r#"{"resourceType":"Patient","id":"old","meta":{"versionId":"9","profile":["http://p"]},"extension":[{"url":"u","valueDecimal":1.50}]}"#;
        let stamped = stamp(
            body,
            &patient,
            &id,
            VersionMeta {
                version_id: VersionId::from(2),
                last_updated: 1_700_000_000_123_456,
            },
        )
        .unwrap();
        assert_eq!(
            stamped,
            r#"{"resourceType":"Patient","id":"abc","meta":{"versionId":"2","profile":["http://p"],"lastUpdated":"2023-11-14T22:13:20.123456Z"},"extension":[{"url":"u","valueDecimal":1.50}]}"#
        );
    }
}
