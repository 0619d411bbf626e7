//! Reading a `transaction` or `batch` Bundle (http.html#transaction): its entries' requests,
//! full URLs and resources (kept as raw JSON), and the request URLs relative to this server.

use serde::Deserialize;
use serde_json::value::RawValue;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleKind {
    Transaction,
    Batch,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Method {
    Get,
    Post,
    Put,
    Patch,
    Delete,
}

impl Method {
    /// Processing order inside a transaction (transaction.html#trules): DELETE, POST,
    /// PUT/PATCH, GET.
    pub fn transaction_rank(self) -> u8 {
        match self {
            Self::Delete => 0,
            Self::Post => 1,
            Self::Put | Self::Patch => 2,
            Self::Get => 3,
        }
    }
}

/// One entry of a request Bundle.
#[derive(Debug, Clone)]
pub struct RequestEntry {
    pub full_url: Option<String>,
    pub method: Method,
    pub url: EntryUrl,
    /// The entry's resource, as sent.
    pub resource: Option<String>,
    pub if_none_exist: Option<String>,
    pub if_match: Option<String>,
    pub if_none_match: Option<String>,
}

/// `request.url` relative to the FHIR base: `Type`, `Type/id`, `Type/id/_history/vid`, with
/// an optional query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryUrl {
    pub resource_type: String,
    pub id: Option<String>,
    pub version: Option<String>,
    pub query: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct BundleRequest {
    pub kind: BundleKind,
    pub entries: Vec<RequestEntry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BundleJson<'a> {
    resource_type: Option<String>,
    #[serde(rename = "type")]
    bundle_type: Option<String>,
    #[serde(default, borrow)]
    entry: Vec<EntryJson<'a>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EntryJson<'a> {
    full_url: Option<String>,
    #[serde(borrow)]
    resource: Option<&'a RawValue>,
    request: Option<RequestJson>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RequestJson {
    method: Option<String>,
    url: Option<String>,
    if_none_exist: Option<String>,
    if_match: Option<String>,
    if_none_match: Option<String>,
}

/// A request Bundle this server cannot process as sent (400), naming where it is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct BundleError {
    pub message: String,
    /// The FHIRPath of the offending element (`Bundle.entry[1].request.method`).
    pub expression: String,
}

fn invalid(expression: String, message: impl Into<String>) -> BundleError {
    BundleError {
        message: message.into(),
        expression,
    }
}

/// Parses a request Bundle. `fhir_base` (e.g. `https://x/fhir`) is stripped from absolute
/// request URLs.
pub fn parse_bundle(body: &[u8], fhir_base: &str) -> Result<BundleRequest, BundleError> {
    let bundle: BundleJson<'_> = serde_json::from_slice(body)
        .map_err(|e| invalid("Bundle".into(), format!("the body is not a Bundle: {e}")))?;
    if bundle.resource_type.as_deref() != Some("Bundle") {
        return Err(invalid(
            "Bundle".into(),
            "POST to the base takes a Bundle of type transaction or batch",
        ));
    }
    let kind = match bundle.bundle_type.as_deref() {
        Some("transaction") => BundleKind::Transaction,
        Some("batch") => BundleKind::Batch,
        _ => {
            return Err(invalid(
                "Bundle.type".into(),
                "only transaction and batch Bundles can be processed",
            ));
        }
    };
    let mut entries = Vec::with_capacity(bundle.entry.len());
    for (index, entry) in bundle.entry.into_iter().enumerate() {
        let at = |field: &str| format!("Bundle.entry[{index}].{field}");
        let request = entry
            .request
            .ok_or_else(|| invalid(at("request"), "every entry needs a request"))?;
        let method = match request.method.as_deref() {
            Some("GET") | Some("HEAD") => Method::Get,
            Some("POST") => Method::Post,
            Some("PUT") => Method::Put,
            Some("PATCH") => Method::Patch,
            Some("DELETE") => Method::Delete,
            _ => {
                return Err(invalid(
                    at("request.method"),
                    "request.method must be GET, HEAD, POST, PUT, PATCH or DELETE",
                ));
            }
        };
        let url = request
            .url
            .as_deref()
            .ok_or_else(|| invalid(at("request.url"), "request.url is required"))?;
        let url = parse_entry_url(url, fhir_base)
            .map_err(|message| invalid(at("request.url"), message))?;
        let resource = entry.resource.map(|r| r.get().to_owned());
        if matches!(method, Method::Post | Method::Put | Method::Patch) && resource.is_none() {
            return Err(invalid(
                at("resource"),
                "POST, PUT and PATCH entries need a resource",
            ));
        }
        entries.push(RequestEntry {
            full_url: entry.full_url,
            method,
            url,
            resource,
            if_none_exist: request.if_none_exist,
            if_match: request.if_match,
            if_none_match: request.if_none_match,
        });
    }
    Ok(BundleRequest { kind, entries })
}

/// Splits a request URL into type, id, version and query.
pub fn parse_entry_url(url: &str, fhir_base: &str) -> Result<EntryUrl, String> {
    let local = url.strip_prefix(fhir_base).unwrap_or(url);
    if local.contains("://") {
        return Err("request.url must be relative to this server's base".into());
    }
    let local = local.trim_start_matches('/');
    let (path, query) = match local.split_once('?') {
        Some((path, query)) => (path, query),
        None => (local, ""),
    };
    let query: Vec<(String, String)> =
        serde_urlencoded::from_str(query).map_err(|_| "the query of request.url is malformed")?;
    let segments: Vec<&str> = path.split('/').collect();
    let owned = |s: &str| Some(s.to_owned());
    let (resource_type, id, version) = match segments.as_slice() {
        [t] if !t.is_empty() => (*t, None, None),
        [t, id] if !id.starts_with('$') && !id.starts_with('_') => (*t, owned(id), None),
        [t, id, "_history", version] => (*t, owned(id), owned(version)),
        _ => {
            return Err(
                "request.url must be Type, Type?query, Type/id or Type/id/_history/vid \
                 (operations and other paths are not supported in Bundles)"
                    .into(),
            );
        }
    };
    Ok(EntryUrl {
        resource_type: resource_type.to_owned(),
        id,
        version,
        query,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_urls() {
        let base = "http://x/fhir";
        assert_eq!(
            parse_entry_url("Patient/1/_history/2", base).unwrap(),
            EntryUrl {
                resource_type: "Patient".into(),
                id: Some("1".into()),
                version: Some("2".into()),
                query: vec![]
            }
        );
        let url = parse_entry_url("/Patient?identifier=a|b&name=x", base).unwrap();
        assert_eq!(url.id, None);
        assert_eq!(url.query[0], ("identifier".into(), "a|b".into()));
        assert_eq!(
            parse_entry_url("http://x/fhir/Patient/7", base)
                .unwrap()
                .id
                .as_deref(),
            Some("7")
        );
        assert!(parse_entry_url("ValueSet/$lookup", base).is_err());
        assert!(parse_entry_url("http://elsewhere/fhir/Patient/7", base).is_err());
    }

    #[test]
    fn bundle_shape_errors_name_the_entry() {
        let body = br#"{"resourceType":"Bundle","type":"transaction","entry":[{"request":{"method":"POST","url":"Patient"},"resource":{"resourceType":"Patient"}},{"request":{"method":"FETCH","url":"Patient"}}]}"#;
        let error = parse_bundle(body, "http://x/fhir").unwrap_err();
        assert_eq!(error.expression, "Bundle.entry[1].request.method");
        let body = br#"{"resourceType":"Bundle","type":"collection"}"#;
        assert!(parse_bundle(body, "http://x/fhir").is_err());
    }
}
