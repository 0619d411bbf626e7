//! FHIRPath Patch against HL7's own test cases (`fhir-test-cases/r4/patch`, in
//! `../shared/fixtures/fhir/patch-tests/fhir-patch-tests.xml`): every case applies its
//! Parameters to its input Patient and must give its output, or fail where it names an
//! error. The cases are FHIR XML; the server speaks JSON, so a small converter below turns
//! them into FHIR JSON (the Patient and Parameters elements the cases use).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

mod common;

use fhirledger::fhir::patch::{PatchDocument, parse_fhirpath_patch, patch_resource};
use fhirledger::fhir::{ResourceId, ResourceTypes};
use quick_xml::events::{BytesStart, Event};
use quick_xml::reader::Reader;
use serde_json::{Map, Value, json};

/// An XML element: name, attributes, children; `raw` keeps an XHTML `div` as written.
#[derive(Debug, Clone)]
struct Element {
    name: String,
    attributes: Vec<(String, String)>,
    children: Vec<Element>,
    raw: Option<String>,
}

impl Element {
    fn attribute(&self, name: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }
}

fn start(event: &BytesStart<'_>) -> Element {
    Element {
        name: String::from_utf8(event.local_name().as_ref().to_vec()).unwrap(),
        attributes: event
            .attributes()
            .map(|a| {
                let a = a.unwrap();
                (
                    String::from_utf8(a.key.local_name().as_ref().to_vec()).unwrap(),
                    a.unescape_value().unwrap().into_owned(),
                )
            })
            .collect(),
        children: Vec::new(),
        raw: None,
    }
}

/// Parses the test file into its root element.
fn parse(text: &str) -> Element {
    let mut reader = Reader::from_str(text);
    let mut stack: Vec<Element> = vec![Element {
        name: "#document".into(),
        attributes: Vec::new(),
        children: Vec::new(),
        raw: None,
    }];
    let mut div_start: Option<(usize, usize)> = None; // (byte offset, depth)
    loop {
        let before = usize::try_from(reader.buffer_position()).unwrap();
        match reader.read_event().unwrap() {
            Event::Start(event) => {
                let element = start(&event);
                if element.name == "div" && div_start.is_none() {
                    div_start = Some((before, stack.len()));
                }
                stack.push(element);
            }
            Event::Empty(event) => {
                let element = start(&event);
                stack.last_mut().unwrap().children.push(element);
            }
            Event::End(_) => {
                let mut element = stack.pop().unwrap();
                if let Some((offset, depth)) = div_start
                    && depth == stack.len()
                {
                    let end = usize::try_from(reader.buffer_position()).unwrap();
                    // As an XML parser would hand it over: line ends normalized, quotes
                    // unescaped (the same XHTML either way).
                    let raw = text[offset..end]
                        .replace("\r\n", "\n")
                        .replace("&quot;", "\"")
                        .replace("&apos;", "'");
                    element.raw = Some(raw);
                    element.children.clear();
                    div_start = None;
                }
                stack.last_mut().unwrap().children.push(element);
            }
            Event::Eof => break,
            _ => {}
        }
    }
    stack.pop().unwrap()
}

/// Elements that repeat (are JSON arrays) in the cases, as `(parent, child)`.
const LISTS: &[(&str, &str)] = &[
    ("Patient", "identifier"),
    ("Patient", "name"),
    ("Patient", "telecom"),
    ("Patient", "address"),
    ("Patient", "contact"),
    ("Patient", "communication"),
    ("Patient", "generalPractitioner"),
    ("Patient", "link"),
    ("Patient", "photo"),
    ("name", "given"),
    ("name", "prefix"),
    ("name", "suffix"),
    ("valueHumanName", "given"),
    ("address", "line"),
    ("contact", "telecom"),
    ("contact", "relationship"),
    ("Parameters", "parameter"),
    ("parameter", "part"),
    ("part", "part"),
];

/// FHIR XML to FHIR JSON (json.html): a primitive's `value` attribute becomes the value,
/// typed by its element, and its extensions go under `_name`; `url` stays an attribute
/// turned member; a `div` becomes its XHTML text; the rest objects, lists where they
/// repeat.
fn to_json(element: &Element) -> Value {
    if let Some(raw) = &element.raw {
        return json!(raw);
    }
    if let Some(value) = element.attribute("value") {
        let name = element.name.as_str();
        return if name == "active" || name.ends_with("Boolean") {
            json!(value == "true")
        } else if name.ends_with("Integer") || name.ends_with("Decimal") {
            serde_json::from_str(value).unwrap()
        } else {
            json!(value)
        };
    }
    let mut object = Map::new();
    if let Some(url) = element.attribute("url") {
        object.insert("url".into(), json!(url));
    }
    for child in &element.children {
        let listed = LISTS.contains(&(element.name.as_str(), child.name.as_str()))
            || child.name == "extension"
            || child.name == "coding";
        let mut put = |name: String, value: Value| {
            if listed {
                object
                    .entry(name)
                    .or_insert_with(|| json!([]))
                    .as_array_mut()
                    .unwrap()
                    .push(value);
            } else {
                assert!(
                    !object.contains_key(&name),
                    "{}.{name} repeats: add it to LISTS",
                    element.name
                );
                object.insert(name, value);
            }
        };
        put(child.name.clone(), to_json(child));
        // A primitive's own extensions (json.html#primitive).
        if child.attribute("value").is_some() && !child.children.is_empty() {
            let extensions = Element {
                attributes: Vec::new(),
                ..child.clone()
            };
            put(format!("_{}", child.name), to_json(&extensions));
        }
    }
    Value::Object(object)
}

fn resource(element: &Element) -> Value {
    let mut value = to_json(element);
    value
        .as_object_mut()
        .unwrap()
        .insert("resourceType".into(), json!(element.name));
    // Order the way FHIR JSON puts it, for readable failures.
    let mut ordered = Map::new();
    ordered.insert("resourceType".into(), json!(element.name));
    for (key, item) in value.as_object().unwrap() {
        ordered.insert(key.clone(), item.clone());
    }
    Value::Object(ordered)
}

#[test]
fn hl7_fhirpath_patch_cases() {
    let path = common::fixtures_dir().join("fhir/patch-tests/fhir-patch-tests.xml");
    let text = std::fs::read_to_string(&path).unwrap();
    let document = parse(&text);
    let tests = document.child("tests").unwrap();
    let types = ResourceTypes::load().unwrap();
    let patient = types.resolve("Patient").unwrap();
    let mut passed = 0;
    for case in &tests.children {
        let name = case.attribute("name").unwrap();
        let input = case.child("input").unwrap().child("Patient").unwrap();
        let diff = case.child("diff").unwrap().child("Parameters").unwrap();
        let mut input = resource(input);
        // Stored resources have ids; the cases' inputs mostly do not.
        input
            .as_object_mut()
            .unwrap()
            .entry("id")
            .or_insert(json!("example"));
        let id = ResourceId::parse(input["id"].as_str().unwrap()).unwrap();
        let parameters = resource(diff);
        let operations = parse_fhirpath_patch(&serde_json::to_vec(&parameters).unwrap())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let result = patch_resource(
            &types,
            &patient,
            &id,
            &input.to_string(),
            &PatchDocument::FhirPath(operations),
            1 << 20,
        );
        match (case.child("output"), case.child("error")) {
            (Some(output), _) => {
                let mut expected = resource(output.child("Patient").unwrap());
                expected
                    .as_object_mut()
                    .unwrap()
                    .entry("id")
                    .or_insert(json!("example"));
                let patched = result.unwrap_or_else(|e| panic!("{name}: {e}"));
                let patched: Value = serde_json::from_str(&patched.compact_json).unwrap();
                assert_eq!(patched, expected, "{name}");
            }
            (None, Some(_)) => {
                assert!(result.is_err(), "{name}: expected an error, got {result:?}");
            }
            (None, None) => panic!("{name}: a case needs an output or an error"),
        }
        passed += 1;
    }
    assert_eq!(passed, 33, "every case of the suite ran");
}
