//! `searchset` Bundles (search.html#return). Resources are embedded as raw JSON, so stored
//! text (decimal precision included) reaches the client unchanged; `_elements` keeps only
//! the named top-level elements.

use indexmap::IndexMap;
use serde::Serialize;
use serde_json::value::RawValue;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SearchMode {
    Match,
    Include,
    Outcome,
}

#[derive(Debug)]
pub struct SearchEntry {
    pub full_url: String,
    pub resource: Box<RawValue>,
    pub mode: SearchMode,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EntryJson<'a> {
    full_url: &'a str,
    resource: &'a RawValue,
    search: SearchJson,
}

#[derive(Serialize)]
struct SearchJson {
    mode: SearchMode,
}

#[derive(Serialize)]
struct LinkJson<'a> {
    relation: &'a str,
    url: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BundleJson<'a> {
    resource_type: &'static str,
    id: String,
    #[serde(rename = "type")]
    bundle_type: &'static str,
    timestamp: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    total: Option<i64>,
    link: Vec<LinkJson<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    entry: Vec<EntryJson<'a>>,
}

/// A searchset or a resource in it that could not be rendered: stored JSON that does not
/// parse back (the server's fault, never the client's).
#[derive(Debug, thiserror::Error)]
#[error("{context}: {source}")]
pub struct RenderError {
    context: &'static str,
    #[source]
    source: serde_json::Error,
}

impl RenderError {
    fn of(context: &'static str) -> impl Fn(serde_json::Error) -> Self {
        move |source| Self { context, source }
    }
}

/// Renders a searchset Bundle.
pub fn bundle_json(
    timestamp: &str,
    total: Option<i64>,
    links: &[(&str, String)],
    entries: Vec<SearchEntry>,
) -> Result<String, RenderError> {
    let bundle = BundleJson {
        resource_type: "Bundle",
        id: uuid::Uuid::new_v4().to_string(),
        bundle_type: "searchset",
        timestamp,
        total,
        link: links
            .iter()
            .map(|(relation, url)| LinkJson { relation, url })
            .collect(),
        entry: entries
            .iter()
            .map(|e| EntryJson {
                full_url: &e.full_url,
                resource: &e.resource,
                search: SearchJson { mode: e.mode },
            })
            .collect(),
    };
    serde_json::to_string(&bundle).map_err(RenderError::of("searchset"))
}

/// Embeds JSON text.
pub fn raw(json: String) -> Result<Box<RawValue>, RenderError> {
    RawValue::from_string(json).map_err(RenderError::of("searchset entry"))
}

/// The resource with only `elements` (plus `resourceType`, `id`, `meta`), marked
/// SUBSETTED as search.html#elements requires; the whole resource when `elements` is empty.
pub fn subset(json: &str, elements: &[String]) -> Result<Box<RawValue>, RenderError> {
    if elements.is_empty() {
        return raw(json.to_owned());
    }
    subset_where(json, |key| elements.iter().any(|e| e == key))
}

/// `_summary=text` (only `text`, besides `resourceType`, `id` and `meta`) or `_summary=data`
/// (everything but `text`), marked SUBSETTED (search.html#summary).
pub fn summary(json: &str, text_only: bool) -> Result<Box<RawValue>, RenderError> {
    subset_where(json, |key| (key == "text") == text_only)
}

/// The resource with `resourceType`, `id`, `meta` and the top-level elements `keep` admits,
/// its `meta.tag` saying SUBSETTED.
fn subset_where(json: &str, keep: impl Fn(&str) -> bool) -> Result<Box<RawValue>, RenderError> {
    let internal = RenderError::of("_elements");
    let mut object: IndexMap<String, Box<RawValue>> =
        serde_json::from_str(json).map_err(&internal)?;
    object.retain(|key, _| matches!(key.as_str(), "resourceType" | "id" | "meta") || keep(key));
    let mut meta: serde_json::Map<String, serde_json::Value> = match object.get("meta") {
        Some(meta) => serde_json::from_str(meta.get()).map_err(&internal)?,
        None => serde_json::Map::new(),
    };
    let tags = meta
        .entry("tag")
        .or_insert_with(|| serde_json::Value::Array(Vec::new()));
    if let Some(tags) = tags.as_array_mut() {
        tags.push(serde_json::json!({
            "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
            "code": "SUBSETTED",
        }));
    }
    let meta = serde_json::to_string(&meta).map_err(&internal)?;
    object.insert("meta".into(), raw(meta)?);
    raw(serde_json::to_string(&object).map_err(&internal)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subset_keeps_named_elements_and_precision() {
        let json = r#"{"resourceType":"Observation","id":"1","meta":{"versionId":"2"},"status":"final","valueQuantity":{"value":1.50},"code":{"text":"x"}}"#;
        let subset = subset(json, &["valueQuantity".into()]).unwrap();
        let text = subset.get();
        assert!(text.contains(r#""value":1.50"#), "{text}");
        assert!(!text.contains("status"), "{text}");
        assert!(text.contains("SUBSETTED"), "{text}");
        assert!(text.contains(r#""versionId":"2""#), "{text}");
        assert_eq!(super::subset(json, &[]).unwrap().get(), json);
    }
}
