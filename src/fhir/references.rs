//! Literal references inside a resource: collecting them and rewriting them (Bundle
//! processing resolves `urn:uuid:` and conditional references, transaction.html#urls) while
//! every other byte of the resource, decimals included, stays as the client wrote it.

use indexmap::IndexMap;
use serde_json::value::RawValue;

/// Every `reference` string in the resource (any depth).
pub fn collect_references(json: &str) -> Result<Vec<String>, serde_json::Error> {
    let mut found = Vec::new();
    let value: &RawValue = serde_json::from_str(json)?;
    walk(value, &mut |reference| {
        found.push(reference.to_owned());
        None
    })?;
    Ok(found)
}

/// The resource with each `reference` string for which `replace` gives a value replaced;
/// the text is unchanged when nothing is replaced.
pub fn rewrite_references(
    json: &str,
    mut replace: impl FnMut(&str) -> Option<String>,
) -> Result<String, serde_json::Error> {
    let value: &RawValue = serde_json::from_str(json)?;
    Ok(match walk(value, &mut replace)? {
        Some(rewritten) => rewritten.get().to_owned(),
        None => json.to_owned(),
    })
}

/// Visits `value`; returns the rewritten value when something inside it changed.
fn walk(
    value: &RawValue,
    replace: &mut dyn FnMut(&str) -> Option<String>,
) -> Result<Option<Box<RawValue>>, serde_json::Error> {
    let text = value.get().trim_start();
    if text.starts_with('{') {
        let mut object: IndexMap<&str, &RawValue> = serde_json::from_str(value.get())?;
        let mut changed: IndexMap<String, Box<RawValue>> = IndexMap::new();
        for (key, member) in &object {
            if *key == "reference" && member.get().starts_with('"') {
                let reference: String = serde_json::from_str(member.get())?;
                if let Some(new) = replace(&reference) {
                    changed.insert((*key).to_owned(), serde_json::value::to_raw_value(&new)?);
                }
            } else if let Some(new) = walk(member, replace)? {
                changed.insert((*key).to_owned(), new);
            }
        }
        if changed.is_empty() {
            return Ok(None);
        }
        for (key, new) in &changed {
            if let Some(slot) = object.get_mut(key.as_str()) {
                *slot = new;
            }
        }
        return serde_json::value::to_raw_value(&object).map(Some);
    }
    if text.starts_with('[') {
        let mut items: Vec<&RawValue> = serde_json::from_str(value.get())?;
        let mut changed = Vec::new();
        for (index, item) in items.iter().enumerate() {
            if let Some(new) = walk(item, replace)? {
                changed.push((index, new));
            }
        }
        if changed.is_empty() {
            return Ok(None);
        }
        for (index, new) in &changed {
            items[*index] = new;
        }
        return serde_json::value::to_raw_value(&items).map(Some);
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OBSERVATION: &str = r#"{"resourceType":"Observation","subject":{"reference":"urn:uuid:1"},"performer":[{"reference":"Practitioner?identifier=x|1"},{"display":"n"}],"valueQuantity":{"value":1.50},"component":[{"valueQuantity":{"value":2.0}}]}"#;

    #[test]
    fn collects_every_reference() {
        assert_eq!(
            collect_references(OBSERVATION).unwrap(),
            vec!["urn:uuid:1", "Practitioner?identifier=x|1"]
        );
    }

    #[test]
    fn rewrites_only_references_and_keeps_decimals() {
        let rewritten = rewrite_references(OBSERVATION, |r| {
            (r == "urn:uuid:1").then(|| "Patient/abc".to_owned())
        })
        .unwrap();
        assert!(
            rewritten.contains(r#""subject":{"reference":"Patient/abc"}"#),
            "{rewritten}"
        );
        assert!(rewritten.contains(r#""value":1.50"#), "{rewritten}");
        assert!(rewritten.contains(r#""value":2.0"#), "{rewritten}");
        assert!(
            rewritten.contains("Practitioner?identifier=x|1"),
            "{rewritten}"
        );
        let unchanged = rewrite_references(OBSERVATION, |_| None).unwrap();
        assert_eq!(unchanged, OBSERVATION);
    }
}
