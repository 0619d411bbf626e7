//! Typed search values extracted from resources at write time (search.html#ptypes): the
//! [`IndexPlan`] compiles every indexable SearchParameter expression once and turns the nodes
//! they select into plain [`SearchValue`]s, and the nodes a composite selects into tuples of
//! its components' values taken from that same node (search.html#composite). Hashing and normalising them for the blind index is
//! the search engine's job; [`date_range`] and [`number_range`] are shared with its parser so a
//! stored value and a query value mean the same range.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;

use crate::fhir::fhirpath::{Expression, Node};
use crate::fhir::search_params::{
    CompositeComponent, ParamType, SearchParamDef, SearchParamRegistry,
};

/// Parameters the engine answers from columns (`_id`, `_lastUpdated`) or that are not value
/// searches at all (search.html#all); they are never indexed.
const NOT_INDEXED: &[&str] = &[
    "_id",
    "_lastUpdated",
    "_text",
    "_content",
    "_list",
    "_query",
    "_filter",
];

/// Searchable without the index: answered from the resource's own columns.
const COLUMN_PARAMS: &[(&str, ParamType)] =
    &[("_id", ParamType::Token), ("_lastUpdated", ParamType::Date)];

/// Bases whose parameters every resource type inherits.
const INHERITED_BASES: &[&str] = &["Resource", "DomainResource"];

/// `ContactPoint.system` codes (valueset-contact-point-system); an object with one of these as
/// `system` is a ContactPoint, whose token is its value alone (search.html#token).
const CONTACT_POINT_SYSTEMS: &[&str] = &["phone", "fax", "email", "pager", "url", "sms", "other"];

/// Text parts of HumanName and Address that string search matches (search.html#string).
const STRING_PARTS: &[&str] = &[
    "family",
    "given",
    "prefix",
    "suffix",
    "text",
    "line",
    "city",
    "district",
    "state",
    "postalCode",
    "country",
];

/// ISO 4217, the system of `Money.currency` when a Money is searched as a quantity.
const CURRENCY_SYSTEM: &str = "urn:iso:std:iso:4217";

/// Composites left out of the index, and why:
/// - `context-type-quantity`: its value may be a Range, which the number index (points, not
///   ranges) cannot hold; indexing only the Quantity values would silently miss the Ranges.
///
/// The four MolecularSequence coordinates (token$number$number) are left out by the shape
/// rule in [`composite_components`]: a row of the number index holds one number, and both
/// numbers must be matched on the same node.
const LEFT_OUT_COMPOSITES: &[&str] = &["context-type-quantity"];

/// Component expressions R4 published wrongly, corrected: the DocumentReference
/// `relationship` components pair the reference definition (`relatesto`) with `code` and the
/// token one (`relation`) with `target`, so as published neither could ever match; each is
/// paired here with the element its definition names (`relatesTo.target`, `relatesTo.code`).
/// `(composite URL, component index, expression)`.
const COMPONENT_ERRATA: &[(&str, usize, &str)] = &[
    (
        "http://hl7.org/fhir/SearchParameter/DocumentReference-relationship",
        0,
        "target",
    ),
    (
        "http://hl7.org/fhir/SearchParameter/DocumentReference-relationship",
        1,
        "code",
    ),
];

/// Most tuples one node of a composite gives (the product of its components' values, e.g.
/// codings × codings); beyond that the node is not indexed, so a crafted resource cannot
/// make one write store millions of rows.
const MAX_TUPLES_PER_NODE: usize = 256;

/// One value of one search parameter, as the index stores it.
#[derive(Debug, Clone, PartialEq)]
pub enum SearchValue {
    /// Raw text; a HumanName or Address gives one per text part.
    String(String),
    /// Coding (system, code); CodeableConcept gives one per coding; Identifier (system, value);
    /// ContactPoint (value only); code/string/id/boolean give the code alone.
    Token {
        system: Option<String>,
        code: Option<String>,
    },
    /// The literal `reference` (or a canonical URL); identifier-only references give nothing.
    Reference(String),
    Uri(String),
    /// µs since the Unix epoch (UTC), half-open `[low, high)`: the range the value covers at its
    /// precision (search.html#date). Open Period ends are `i64::MIN` / `i64::MAX`.
    Date {
        low: i64,
        high: i64,
    },
    Number(f64),
    Quantity {
        value: f64,
        system: Option<String>,
        code: Option<String>,
        unit: Option<String>,
    },
    /// One tuple of a composite: a value of each component, in order, all from the same
    /// node (the same `Observation.component`, say).
    Composite(Vec<SearchValue>),
}

#[derive(Debug)]
struct PlanEntry {
    code: String,
    param_type: ParamType,
    expression: Arc<Expression>,
    /// A composite's components, each evaluated relative to a node `expression` selects;
    /// empty for every other type.
    components: Vec<Component>,
}

#[derive(Debug)]
struct Component {
    param_type: ParamType,
    expression: Arc<Expression>,
}

type Compiled = HashMap<String, Option<Arc<Expression>>>;

/// The compiled, indexable search parameters of every resource type.
#[derive(Debug)]
pub struct IndexPlan {
    /// Own and inherited parameters of each type with definitions of its own, sorted by code.
    by_type: HashMap<String, Vec<PlanEntry>>,
    /// The inherited parameters alone, for types without definitions of their own.
    inherited: Vec<PlanEntry>,
}

impl IndexPlan {
    /// Compiles every indexable parameter once. Special parameters, those in
    /// [`NOT_INDEXED`], composites the index cannot answer (see [`LEFT_OUT_COMPOSITES`] and
    /// [`composite_components`]) and expressions outside the FHIRPath subset are skipped (the
    /// last with a warning; none of R4's are).
    pub fn new(registry: &SearchParamRegistry) -> Self {
        let mut compiled = Compiled::new();
        let mut plan_for = |resource_type: &str| -> Vec<PlanEntry> {
            registry
                .for_type(resource_type)
                .into_values()
                .filter_map(|definition| plan_entry(registry, definition, &mut compiled))
                .collect()
        };
        let inherited = plan_for("Resource");
        let by_type = registry
            .bases()
            .filter(|base| !INHERITED_BASES.contains(base))
            .map(|base| (base.to_owned(), plan_for(base)))
            .collect();
        Self { by_type, inherited }
    }

    fn entries(&self, resource_type: &str) -> &[PlanEntry] {
        self.by_type
            .get(resource_type)
            .map_or(&self.inherited, Vec::as_slice)
    }

    /// Every indexed value of `resource`, by parameter code, without duplicates.
    pub fn extract(&self, resource_type: &str, resource: &Value) -> Vec<(String, SearchValue)> {
        let mut out = Vec::new();
        let mut values = Vec::new();
        for entry in self.entries(resource_type) {
            values.clear();
            entry_values(entry, resource_type, resource, &mut values);
            out.extend(values.drain(..).map(|value| (entry.code.clone(), value)));
        }
        out
    }

    /// Whether `code` is in the index for `resource_type` (false for `_id` and `_lastUpdated`,
    /// which the engine answers from columns, for special parameters and for the composites
    /// left out).
    pub fn is_indexed(&self, resource_type: &str, code: &str) -> bool {
        self.entry(resource_type, code).is_some()
    }

    /// The parameters a client can search `resource_type` by: `_id` and `_lastUpdated`, then the
    /// indexed ones by code.
    pub fn params(&self, resource_type: &str) -> impl Iterator<Item = (&str, ParamType)> {
        COLUMN_PARAMS.iter().copied().chain(
            self.entries(resource_type)
                .iter()
                .map(|entry| (entry.code.as_str(), entry.param_type)),
        )
    }

    /// The values of one parameter (for `_sort` and `_include`), without duplicates; empty when
    /// the parameter is not indexed.
    pub fn extract_param(
        &self,
        resource_type: &str,
        code: &str,
        resource: &Value,
    ) -> Vec<SearchValue> {
        let mut values = Vec::new();
        if let Some(entry) = self.entry(resource_type, code) {
            entry_values(entry, resource_type, resource, &mut values);
        }
        values
    }

    /// The top-level elements of a `resource_type` resource that parameter `code` reads
    /// (see [`Expression::top_level_elements`]); `None` when it is not indexed or may read
    /// the whole resource.
    pub fn top_level_elements(&self, resource_type: &str, code: &str) -> Option<Vec<String>> {
        let entry = self.entry(resource_type, code)?;
        entry.expression.top_level_elements(resource_type)
    }

    /// The component types of composite `code` on `resource_type`, in order; `None` when it
    /// is not an indexed composite.
    pub fn components(&self, resource_type: &str, code: &str) -> Option<Vec<ParamType>> {
        let entry = self.entry(resource_type, code)?;
        (entry.param_type == ParamType::Composite)
            .then(|| entry.components.iter().map(|c| c.param_type).collect())
    }

    fn entry(&self, resource_type: &str, code: &str) -> Option<&PlanEntry> {
        let entries = self.entries(resource_type);
        entries
            .binary_search_by(|entry| entry.code.as_str().cmp(code))
            .ok()
            .and_then(|index| entries.get(index))
    }
}

fn plan_entry(
    registry: &SearchParamRegistry,
    definition: &SearchParamDef,
    compiled: &mut Compiled,
) -> Option<PlanEntry> {
    if definition.param_type == ParamType::Special
        || NOT_INDEXED.contains(&definition.code.as_str())
    {
        return None;
    }
    let source = definition.expression.as_deref()?;
    let expression = compile(compiled, &definition.url, source)?;
    let components = if definition.param_type == ParamType::Composite {
        composite_components(registry, definition, compiled)?
    } else {
        Vec::new()
    };
    Some(PlanEntry {
        code: definition.code.clone(),
        param_type: definition.param_type,
        expression,
        components,
    })
}

fn compile(compiled: &mut Compiled, url: &str, source: &str) -> Option<Arc<Expression>> {
    compiled
        .entry(source.to_owned())
        .or_insert_with(|| match Expression::compile(source) {
            Ok(expression) => Some(Arc::new(expression)),
            Err(error) => {
                tracing::warn!(%url, %error, "search parameter not indexed");
                None
            }
        })
        .clone()
}

/// The components of a composite the index can answer, or `None`. Every component but the
/// last must be hashable (token, string, reference, uri): their tuple becomes one blind-index
/// digest. The last may instead be a date, number or quantity, stored as a range or number
/// row carrying the digest of the leading components; a second such component would need
/// two numbers in one row, so those composites are left out.
fn composite_components(
    registry: &SearchParamRegistry,
    definition: &SearchParamDef,
    compiled: &mut Compiled,
) -> Option<Vec<Component>> {
    if LEFT_OUT_COMPOSITES.contains(&definition.code.as_str()) || definition.component.len() < 2 {
        return None;
    }
    let component_type = |component: &CompositeComponent| {
        Some(
            registry
                .by_url(component.definition.as_deref()?)?
                .param_type,
        )
    };
    let types: Option<Vec<ParamType>> = definition.component.iter().map(component_type).collect();
    let types = types?;
    // A string term beyond the prefix bound is checked after decryption against whole
    // tuples of hashable values; no R4 composite pairs a string with a date or number.
    if types.contains(&ParamType::String)
        && types
            .iter()
            .any(|t| matches!(t, ParamType::Date | ParamType::Number | ParamType::Quantity))
    {
        return None;
    }
    let mut components = Vec::with_capacity(definition.component.len());
    for (index, (component, param_type)) in definition.component.iter().zip(types).enumerate() {
        let last = index + 1 == definition.component.len();
        let fits = match param_type {
            ParamType::Token | ParamType::String | ParamType::Reference | ParamType::Uri => true,
            ParamType::Date | ParamType::Number | ParamType::Quantity => last,
            ParamType::Composite | ParamType::Special => false,
        };
        if !fits {
            return None;
        }
        let corrected = COMPONENT_ERRATA
            .iter()
            .find(|(url, at, _)| *url == definition.url && *at == index)
            .map(|(_, _, expression)| *expression);
        let source = corrected.or(component.expression.as_deref())?;
        components.push(Component {
            param_type,
            expression: compile(compiled, &definition.url, source)?,
        });
    }
    Some(components)
}

/// Appends the entry's values for `resource` to `out` (which must start empty), deduplicated.
fn entry_values(
    entry: &PlanEntry,
    resource_type: &str,
    resource: &Value,
    out: &mut Vec<SearchValue>,
) {
    for node in entry.expression.evaluate(resource_type, resource) {
        let start = out.len();
        if entry.param_type == ParamType::Composite {
            tuples(entry, resource_type, resource, node, out);
        } else {
            node_values(entry.param_type, node, out);
        }
        // Values per parameter are few; a linear check beats hashing floats.
        let mut index = start;
        while index < out.len() {
            let duplicate = out
                .get(index)
                .is_some_and(|value| out.get(..index).is_some_and(|seen| seen.contains(value)));
            if duplicate {
                out.remove(index);
            } else {
                index += 1;
            }
        }
    }
}

/// The tuples of one node of a composite: every combination of its components' values,
/// each component evaluated relative to the node. A node lacking a component gives none.
fn tuples<'a>(
    entry: &'a PlanEntry,
    resource_type: &str,
    resource: &'a Value,
    node: Node<'a>,
    out: &mut Vec<SearchValue>,
) {
    let mut combinations: Vec<Vec<SearchValue>> = vec![Vec::new()];
    for component in &entry.components {
        let mut values = Vec::new();
        for value_node in component
            .expression
            .evaluate_on(resource_type, resource, node)
        {
            node_values(component.param_type, value_node, &mut values);
        }
        if values.is_empty() || combinations.len() * values.len() > MAX_TUPLES_PER_NODE {
            if !values.is_empty() {
                tracing::warn!(
                    resource_type,
                    param = %entry.code,
                    "composite node has too many value combinations; not indexed"
                );
            }
            return;
        }
        combinations = combinations
            .into_iter()
            .flat_map(|head| {
                values.iter().map(move |value| {
                    let mut tuple = head.clone();
                    tuple.push(value.clone());
                    tuple
                })
            })
            .collect();
    }
    out.extend(combinations.into_iter().map(SearchValue::Composite));
}

fn node_values(param_type: ParamType, node: Node<'_>, out: &mut Vec<SearchValue>) {
    let value = node.value;
    match param_type {
        ParamType::String => string_values(value, out),
        ParamType::Token => token_values(value, node.type_hint, out),
        ParamType::Reference => {
            let literal = match value {
                Value::String(canonical) => Some(canonical),
                Value::Object(object) => match object.get("reference") {
                    Some(Value::String(reference)) => Some(reference),
                    _ => None,
                },
                _ => None,
            };
            if let Some(literal) = literal.filter(|literal| !literal.is_empty()) {
                out.push(SearchValue::Reference(literal.clone()));
            }
        }
        ParamType::Uri => {
            if let Some(uri) = value.as_str() {
                out.push(SearchValue::Uri(uri.to_owned()));
            }
        }
        ParamType::Date => date_values(value, out),
        ParamType::Number => {
            if let Some(number) = value.as_f64() {
                out.push(SearchValue::Number(number));
            }
        }
        ParamType::Quantity => quantity_values(value, out),
        ParamType::Composite | ParamType::Special => {}
    }
}

fn strings(value: &Value) -> impl Iterator<Item = &str> {
    let items = match value {
        Value::Array(items) => items.as_slice(),
        single => std::slice::from_ref(single),
    };
    items.iter().filter_map(Value::as_str)
}

fn string_values(value: &Value, out: &mut Vec<SearchValue>) {
    match value {
        Value::String(text) => out.push(SearchValue::String(text.clone())),
        Value::Object(object) => {
            for part in STRING_PARTS {
                if let Some(parts) = object.get(*part) {
                    out.extend(strings(parts).map(|text| SearchValue::String(text.to_owned())));
                }
            }
        }
        _ => {}
    }
}

fn owned_str(value: Option<&Value>) -> Option<String> {
    value.and_then(Value::as_str).map(str::to_owned)
}

fn push_token(out: &mut Vec<SearchValue>, system: Option<String>, code: Option<String>) {
    if system.is_some() || code.is_some() {
        out.push(SearchValue::Token { system, code });
    }
}

fn token_values(value: &Value, type_hint: Option<&str>, out: &mut Vec<SearchValue>) {
    match value {
        Value::String(code) => push_token(out, None, Some(code.clone())),
        Value::Bool(flag) => push_token(out, None, Some(flag.to_string())),
        Value::Number(number) => push_token(out, None, Some(number.to_string())),
        Value::Object(object) => {
            if let Some(codings) = object.get("coding") {
                // CodeableConcept: one token per coding.
                for coding in codings.as_array().map(Vec::as_slice).unwrap_or_default() {
                    push_token(
                        out,
                        owned_str(coding.get("system")),
                        owned_str(coding.get("code")),
                    );
                }
            } else if object.contains_key("code") {
                push_token(
                    out,
                    owned_str(object.get("system")),
                    owned_str(object.get("code")),
                );
            } else if let Some(Value::String(identifier)) = object.get("value") {
                let system = object.get("system").and_then(Value::as_str);
                let contact_point = type_hint == Some("ContactPoint")
                    || system.is_some_and(|system| CONTACT_POINT_SYSTEMS.contains(&system));
                let system = system.filter(|_| !contact_point).map(str::to_owned);
                push_token(out, system, Some(identifier.clone()));
            } else if object.contains_key("system") {
                push_token(out, owned_str(object.get("system")), None);
            }
        }
        Value::Null | Value::Array(_) => {}
    }
}

fn date_values(value: &Value, out: &mut Vec<SearchValue>) {
    match value {
        Value::String(text) => {
            if let Some((low, high)) = date_range(text) {
                out.push(SearchValue::Date { low, high });
            }
        }
        Value::Object(object) => {
            if object.contains_key("start") || object.contains_key("end") {
                out.extend(period_value(value));
            }
            // Timing: every event, and the bounds of the repeat.
            if let Some(events) = object.get("event") {
                out.extend(
                    strings(events)
                        .filter_map(date_range)
                        .map(|(low, high)| SearchValue::Date { low, high }),
                );
            }
            if let Some(bounds) = object.get("repeat").and_then(|r| r.get("boundsPeriod")) {
                out.extend(period_value(bounds));
            }
        }
        _ => {}
    }
}

/// A Period's range: from its start's low to its end's high, open where missing; nothing when
/// a present bound does not parse or neither is present.
fn period_value(period: &Value) -> Option<SearchValue> {
    let bound = |key: &str| -> Option<Option<(i64, i64)>> {
        match period.get(key) {
            None | Some(Value::Null) => Some(None),
            Some(text) => text.as_str().and_then(date_range).map(Some),
        }
    };
    let (start, end) = (bound("start")?, bound("end")?);
    if start.is_none() && end.is_none() {
        return None;
    }
    Some(SearchValue::Date {
        low: start.map_or(i64::MIN, |(low, _)| low),
        high: end.map_or(i64::MAX, |(_, high)| high),
    })
}

fn quantity_values(value: &Value, out: &mut Vec<SearchValue>) {
    match value {
        Value::Number(number) => {
            if let Some(value) = number.as_f64() {
                out.push(SearchValue::Quantity {
                    value,
                    system: None,
                    code: None,
                    unit: None,
                });
            }
        }
        Value::Object(object) => {
            let Some(number) = object.get("value").and_then(Value::as_f64) else {
                // Range, SampledData, Ratio: no single quantity to index.
                return;
            };
            let (system, code) = match object.get("currency").and_then(Value::as_str) {
                Some(currency) if !object.contains_key("code") => {
                    (Some(CURRENCY_SYSTEM.to_owned()), Some(currency.to_owned()))
                }
                _ => (
                    owned_str(object.get("system")),
                    owned_str(object.get("code")),
                ),
            };
            out.push(SearchValue::Quantity {
                value: number,
                system,
                code,
                unit: owned_str(object.get("unit")),
            });
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Ranges shared with the query side.

const MICROS_PER_SECOND: i64 = 1_000_000;
const MICROS_PER_MINUTE: i64 = 60 * MICROS_PER_SECOND;
const MICROS_PER_DAY: i64 = 86_400 * MICROS_PER_SECOND;

/// Days from 1970-01-01 to the proleptic Gregorian date (Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_index = (month + 9) % 12;
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// A fixed-width run of ASCII digits at the front of `text`.
fn take_digits(text: &str, width: usize) -> Option<(i64, &str)> {
    let digits = text.get(..width)?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((digits.parse().ok()?, text.get(width..)?))
}

fn expect_char(text: &str, c: char) -> Option<&str> {
    text.strip_prefix(c)
}

/// The half-open range in µs since the epoch (UTC) that a FHIR date, dateTime or instant covers
/// at its precision (search.html#date): `2013` is all of 2013, `2013-01-14T10:00` that minute,
/// `…:00.123` that millisecond. Without a zone the time is taken as UTC. `None` for anything
/// that is not such a value (including a search prefix: strip `ge` etc. first).
pub fn date_range(text: &str) -> Option<(i64, i64)> {
    let (year, rest) = take_digits(text, 4)?;
    if rest.is_empty() {
        let low = days_from_civil(year, 1, 1) * MICROS_PER_DAY;
        return Some((low, days_from_civil(year + 1, 1, 1) * MICROS_PER_DAY));
    }
    let (month, rest) = take_digits(expect_char(rest, '-')?, 2)?;
    if !(1..=12).contains(&month) {
        return None;
    }
    if rest.is_empty() {
        let low = days_from_civil(year, month, 1) * MICROS_PER_DAY;
        let high = days_from_civil(year, month, days_in_month(year, month)) + 1;
        return Some((low, high * MICROS_PER_DAY));
    }
    let (day, rest) = take_digits(expect_char(rest, '-')?, 2)?;
    if day < 1 || day > days_in_month(year, month) {
        return None;
    }
    let midnight = days_from_civil(year, month, day) * MICROS_PER_DAY;
    if rest.is_empty() {
        return Some((midnight, midnight + MICROS_PER_DAY));
    }
    let (hour, rest) = take_digits(expect_char(rest, 'T')?, 2)?;
    let (minute, mut rest) = take_digits(expect_char(rest, ':')?, 2)?;
    if hour > 23 || minute > 59 {
        return None;
    }
    let mut low = midnight + hour * 60 * MICROS_PER_MINUTE + minute * MICROS_PER_MINUTE;
    let mut width = MICROS_PER_MINUTE;
    if let Some(seconds) = rest.strip_prefix(':') {
        let (second, after) = take_digits(seconds, 2)?;
        // FHIR's pattern admits a leap second (60); ranges in µs cannot represent it.
        if second > 59 {
            return None;
        }
        low += second * MICROS_PER_SECOND;
        width = MICROS_PER_SECOND;
        rest = after;
        if let Some(fraction) = rest.strip_prefix('.') {
            let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return None;
            }
            let (all, after) = fraction.split_at(digits);
            // Beyond µs the value is truncated to the µs that contains it.
            let kept = all.get(..digits.min(6)).unwrap_or_default();
            let scale = 10_i64.pow(6 - u32::try_from(kept.len()).ok()?);
            low += kept.parse::<i64>().ok()? * scale;
            width = scale;
            rest = after;
        }
    }
    let offset = match rest {
        "" | "Z" => 0,
        zone => {
            let sign = match zone.get(..1)? {
                "+" => 1,
                "-" => -1,
                _ => return None,
            };
            let (hours, after) = take_digits(zone.get(1..)?, 2)?;
            let (minutes, after) = take_digits(expect_char(after, ':')?, 2)?;
            if !after.is_empty() || hours > 14 || minutes > 59 {
                return None;
            }
            sign * (hours * 60 + minutes) * MICROS_PER_MINUTE
        }
    };
    Some((low - offset, low - offset + width))
}

/// The implicit range of a search number (search.html#number): half a unit of its last
/// significant digit either side, `[value - δ, value + δ)`. `100` → `[99.5, 100.5)`, `100.00` →
/// `[99.995, 100.005)`, `1e2` → `[50, 150)` (one significant figure; the spec's own example
/// says `[95, 105)`, which contradicts its rule). `None` for anything that is not a decimal.
pub fn number_range(text: &str) -> Option<(f64, f64)> {
    let unsigned = text.strip_prefix(['-', '+']).unwrap_or(text);
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(at) => {
            let exponent = unsigned.get(at + 1..)?;
            let digits = exponent.strip_prefix(['-', '+']).unwrap_or(exponent);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            (unsigned.get(..at)?, exponent.parse::<i32>().ok()?)
        }
        None => (unsigned, 0),
    };
    let (whole, decimals) = match mantissa.split_once('.') {
        Some((whole, fraction)) => (whole, fraction),
        None => (mantissa, ""),
    };
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !all_digits(whole) || !all_digits(decimals) || mantissa.ends_with('.') {
        return None;
    }
    let value: f64 = text.parse().ok()?;
    let decimals = i32::try_from(decimals.len()).ok()?;
    let half_unit = 0.5 * 10_f64.powi(exponent.checked_sub(decimals)?);
    let (low, high) = (value - half_unit, value + half_unit);
    (value.is_finite() && low.is_finite() && high.is_finite() && half_unit > 0.0)
        .then_some((low, high))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn plan() -> IndexPlan {
        IndexPlan::new(&SearchParamRegistry::load().unwrap())
    }

    fn fixture(path: &str) -> Value {
        let full = format!(
            "{}/../shared/fixtures/fhir/{path}",
            env!("CARGO_MANIFEST_DIR")
        );
        serde_json::from_str(&std::fs::read_to_string(&full).unwrap()).unwrap()
    }

    fn token(system: Option<&str>, code: &str) -> SearchValue {
        SearchValue::Token {
            system: system.map(str::to_owned),
            code: Some(code.to_owned()),
        }
    }

    fn string(text: &str) -> SearchValue {
        SearchValue::String(text.to_owned())
    }

    fn date(text: &str) -> SearchValue {
        let (low, high) = date_range(text).unwrap();
        SearchValue::Date { low, high }
    }

    /// `2013-01-14T10:00:00Z` in µs, checked against chrono.
    fn micros(text: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(text)
            .unwrap()
            .timestamp_micros()
    }

    #[test]
    fn patient_example() {
        let plan = plan();
        let patient = fixture("hl7-r4/Patient-example.json");
        let values = |code| plan.extract_param("Patient", code, &patient);
        // The fixture's second name is the maiden name, Windsor.
        assert_eq!(values("family"), [string("Chalmers"), string("Windsor")]);
        assert!(values("given").contains(&string("Peter")));
        assert!(values("given").contains(&string("James")));
        assert!(values("name").contains(&string("Chalmers")));
        assert_eq!(
            values("identifier"),
            [token(Some("urn:oid:1.2.36.146.595.217.0.1"), "12345")]
        );
        assert_eq!(values("birthdate"), [date("1974-12-25")]);
        assert_eq!(
            values("birthdate"),
            [SearchValue::Date {
                low: micros("1974-12-25T00:00:00Z"),
                high: micros("1974-12-26T00:00:00Z")
            }]
        );
        assert_eq!(values("gender"), [token(None, "male")]);
        assert_eq!(values("deceased"), [token(None, "false")]);
        assert_eq!(values("active"), [token(None, "true")]);
        // ContactPoints match on their value alone; there is no e-mail address.
        assert!(values("phone").contains(&token(None, "(03) 5555 6473")));
        assert_eq!(values("phone").len(), 3);
        assert!(values("email").is_empty());
        assert_eq!(values("address-city"), [string("PleasantVille")]);
        assert!(values("address").contains(&string("534 Erewhon St")));
        assert!(values("address").contains(&string("3999")));
        assert!(
            values("organization").contains(&SearchValue::Reference("Organization/1".to_owned()))
        );

        let all = plan.extract("Patient", &patient);
        assert!(all.contains(&("family".to_owned(), string("Chalmers"))));
        assert!(
            !all.iter()
                .any(|(code, _)| code == "_id" || code == "_lastUpdated")
        );
        for (index, item) in all.iter().enumerate() {
            assert!(!all[..index].contains(item), "duplicate {item:?}");
        }
    }

    #[test]
    fn observation_example() {
        let plan = plan();
        let observation = fixture("hl7-r4/Observation-example.json");
        let values = |code| plan.extract_param("Observation", code, &observation);
        let loinc = Some("http://loinc.org");
        assert_eq!(
            values("code"),
            [
                token(loinc, "29463-7"),
                token(loinc, "3141-9"),
                token(Some("http://snomed.info/sct"), "27113001"),
                token(
                    Some("http://acme.org/devices/clinical-codes"),
                    "body-weight"
                ),
            ]
        );
        let example = SearchValue::Reference("Patient/example".to_owned());
        assert_eq!(values("subject"), std::slice::from_ref(&example));
        assert_eq!(values("patient"), [example]);
        assert_eq!(
            values("value-quantity"),
            [SearchValue::Quantity {
                value: 185.0,
                system: Some("http://unitsofmeasure.org".to_owned()),
                code: Some("[lb_av]".to_owned()),
                unit: Some("lbs".to_owned()),
            }]
        );
        assert_eq!(values("date"), [date("2016-03-28")]);
        assert!(values("value-concept").is_empty());
        assert!(values("value-date").is_empty());
        assert!(values("combo-code").contains(&token(loinc, "29463-7")));
        // One tuple per coding of the code, each with the one value.
        let tuples = values("code-value-quantity");
        assert_eq!(tuples.len(), 4);
        assert!(tuples.contains(&SearchValue::Composite(vec![
            token(loinc, "29463-7"),
            values("value-quantity")[0].clone()
        ])));
        assert!(values("component-code-value-quantity").is_empty());
        assert!(values("code-value-concept").is_empty());
    }

    #[test]
    fn composite_components_come_from_the_same_node() {
        let plan = plan();
        let pressure = fixture("hl7-r4/Observation-blood-pressure.json");
        let values = |code| plan.extract_param("Observation", code, &pressure);
        let loinc = Some("http://loinc.org");
        let mm_hg = |value: f64| SearchValue::Quantity {
            value,
            system: Some("http://unitsofmeasure.org".to_owned()),
            code: Some("mm[Hg]".to_owned()),
            unit: Some("mmHg".to_owned()),
        };
        let pair = |code, value| SearchValue::Composite(vec![token(loinc, code), mm_hg(value)]);
        let tuples = values("component-code-value-quantity");
        // Systolic has three codings, diastolic one: four tuples, never crossed.
        assert_eq!(tuples.len(), 4, "{tuples:?}");
        assert!(tuples.contains(&pair("8480-6", 107.0)));
        assert!(tuples.contains(&pair("8462-4", 60.0)));
        assert!(!tuples.contains(&pair("8480-6", 60.0)));
        assert!(!tuples.contains(&pair("8462-4", 107.0)));
        // The panel itself has no value: combo- gives the components' tuples alone.
        assert_eq!(values("combo-code-value-quantity"), tuples);
        assert!(values("code-value-quantity").is_empty());
        assert_eq!(
            plan.components("Observation", "component-code-value-quantity"),
            Some(vec![ParamType::Token, ParamType::Quantity])
        );
        assert_eq!(plan.components("Observation", "code"), None);

        let observation = json!({"resourceType": "Observation",
            "code": {"coding": [{"system": "http://loinc.org", "code": "1"}]},
            "valuePeriod": {"start": "2020-01", "end": "2020-02"},
            "component": [{"code": {"coding": [{"code": "c"}]},
                           "valueCodeableConcept": {"coding": [{"system": "urn:v", "code": "v"}]}}]});
        let values = |code| plan.extract_param("Observation", code, &observation);
        assert_eq!(
            values("code-value-date"),
            [SearchValue::Composite(vec![
                token(loinc, "1"),
                SearchValue::Date {
                    low: micros("2020-01-01T00:00:00Z"),
                    high: micros("2020-03-01T00:00:00Z")
                }
            ])]
        );
        assert_eq!(
            values("component-code-value-concept"),
            [SearchValue::Composite(vec![
                token(None, "c"),
                token(Some("urn:v"), "v")
            ])]
        );
        assert!(values("code-value-concept").is_empty());
        let string = json!({"resourceType": "Observation", "code": {"coding": [{"code": "x"}]},
            "valueString": "Trace"});
        assert_eq!(
            plan.extract_param("Observation", "code-value-string", &string),
            [SearchValue::Composite(vec![
                token(None, "x"),
                SearchValue::String("Trace".to_owned())
            ])]
        );
    }

    #[test]
    fn composites_left_out_and_corrected() {
        let plan = plan();
        for code in [
            "chromosome-variant-coordinate",
            "chromosome-window-coordinate",
            "referenceseqid-variant-coordinate",
            "referenceseqid-window-coordinate",
        ] {
            assert!(!plan.is_indexed("MolecularSequence", code), "{code}");
        }
        assert!(!plan.is_indexed("Measure", "context-type-quantity"));
        assert!(!plan.is_indexed("ValueSet", "context-type-quantity"));
        assert!(plan.is_indexed("ValueSet", "context-type-value"));
        assert!(plan.is_indexed("Group", "characteristic-value"));
        // The R4 relationship components are swapped; the corrected ones match.
        let document = json!({"resourceType": "DocumentReference", "relatesTo": [
            {"code": "replaces", "target": {"reference": "DocumentReference/old"}},
            {"code": "appends", "target": {"reference": "DocumentReference/other"}}]});
        let tuples = plan.extract_param("DocumentReference", "relationship", &document);
        assert_eq!(
            tuples,
            [
                SearchValue::Composite(vec![
                    SearchValue::Reference("DocumentReference/old".to_owned()),
                    token(None, "replaces")
                ]),
                SearchValue::Composite(vec![
                    SearchValue::Reference("DocumentReference/other".to_owned()),
                    token(None, "appends")
                ]),
            ]
        );
        assert_eq!(
            plan.components("DocumentReference", "relationship"),
            Some(vec![ParamType::Reference, ParamType::Token])
        );
    }

    #[test]
    fn a_crafted_composite_cannot_explode() {
        let plan = plan();
        let codings: Vec<Value> = (0..100)
            .map(|i| json!({"system": "urn:s", "code": i.to_string()}))
            .collect();
        let group = json!({"resourceType": "Group", "characteristic": [
            {"code": {"coding": codings}, "valueCodeableConcept": {"coding": codings}},
            {"code": {"coding": [{"code": "a"}]}, "valueCodeableConcept": {"coding": [{"code": "b"}]}}]});
        assert_eq!(
            plan.extract_param("Group", "characteristic-value", &group),
            [SearchValue::Composite(vec![
                token(None, "a"),
                token(None, "b")
            ])]
        );
    }

    #[test]
    fn a_subject_that_is_not_a_patient_is_not_a_patient() {
        let plan = plan();
        let mut observation = fixture("hl7-r4/Observation-example.json");
        observation["subject"] = json!({"reference": "Group/101"});
        assert_eq!(
            plan.extract_param("Observation", "subject", &observation),
            [SearchValue::Reference("Group/101".to_owned())]
        );
        assert!(
            plan.extract_param("Observation", "patient", &observation)
                .is_empty()
        );
        // Identifier-only references give no reference value.
        observation["subject"] = json!({"identifier": {"system": "urn:x", "value": "1"}});
        assert!(
            plan.extract_param("Observation", "subject", &observation)
                .is_empty()
        );
    }

    #[test]
    fn periods_and_choice_types() {
        let plan = plan();
        let encounter = fixture("us-core/encounter-example-1.json");
        assert_eq!(
            plan.extract_param("Encounter", "date", &encounter),
            [SearchValue::Date {
                low: micros("2015-11-01T17:00:14-05:00"),
                high: micros("2015-11-01T18:00:15-05:00"),
            }]
        );
        let condition = fixture("hl7-r4/Condition-example.json");
        assert_eq!(
            plan.extract_param("Condition", "onset-date", &condition),
            [date("2012-05-24")]
        );
        let open = json!({"resourceType": "Condition", "onsetPeriod": {"start": "2020-02"}, "abatementAge": {"value": 12, "unit": "a", "system": "http://unitsofmeasure.org", "code": "a"}});
        assert_eq!(
            plan.extract_param("Condition", "onset-date", &open),
            [SearchValue::Date {
                low: micros("2020-02-01T00:00:00Z"),
                high: i64::MAX
            }]
        );
        // An Age is not a date: nothing, and no error.
        assert!(
            plan.extract_param("Condition", "abatement-date", &open)
                .is_empty()
        );
        assert_eq!(
            plan.extract_param("Condition", "abatement-age", &open),
            [SearchValue::Quantity {
                value: 12.0,
                system: Some("http://unitsofmeasure.org".to_owned()),
                code: Some("a".to_owned()),
                unit: Some("a".to_owned()),
            }]
        );
        let ended = json!({"resourceType": "Encounter", "period": {"end": "2020"}});
        assert_eq!(
            plan.extract_param("Encounter", "date", &ended),
            [SearchValue::Date {
                low: i64::MIN,
                high: micros("2021-01-01T00:00:00Z")
            }]
        );
        let care_plan = json!({"resourceType": "CarePlan", "activity": [{"detail": {"scheduledTiming": {
            "event": ["2021-03-04", "not a date"],
            "repeat": {"boundsPeriod": {"start": "2021-03-01", "end": "2021-03-31"}}
        }}}]});
        assert_eq!(
            plan.extract_param("CarePlan", "activity-date", &care_plan),
            [
                date("2021-03-04"),
                SearchValue::Date {
                    low: micros("2021-03-01T00:00:00Z"),
                    high: micros("2021-04-01T00:00:00Z")
                }
            ]
        );
    }

    #[test]
    fn inherited_parameters_and_what_is_listed() {
        let plan = plan();
        let resource = json!({"resourceType": "OperationOutcome", "meta": {
            "profile": ["http://example.org/p"],
            "tag": [{"system": "urn:t", "code": "a"}],
            "security": [{"system": "urn:s", "code": "R"}],
            "source": "urn:src"
        }});
        let mut all = plan.extract("OperationOutcome", &resource);
        all.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            all,
            [
                (
                    "_profile".to_owned(),
                    SearchValue::Uri("http://example.org/p".to_owned())
                ),
                ("_security".to_owned(), token(Some("urn:s"), "R")),
                ("_source".to_owned(), SearchValue::Uri("urn:src".to_owned())),
                ("_tag".to_owned(), token(Some("urn:t"), "a")),
            ]
        );
        assert!(plan.is_indexed("Patient", "_tag"));
        assert!(plan.is_indexed("Patient", "family"));
        assert!(!plan.is_indexed("Patient", "_id"));
        assert!(!plan.is_indexed("Patient", "_lastUpdated"));
        assert!(!plan.is_indexed("Patient", "_text"));
        assert!(!plan.is_indexed("Patient", "no-such"));
        assert!(!plan.is_indexed("Location", "near"));
        assert!(plan.is_indexed("Observation", "code-value-quantity"));
        let params: Vec<_> = plan.params("Patient").collect();
        assert!(params.contains(&("_id", ParamType::Token)));
        assert!(params.contains(&("_lastUpdated", ParamType::Date)));
        assert!(params.contains(&("birthdate", ParamType::Date)));
        assert!(!params.iter().any(|(code, _)| *code == "_content"));
        assert!(
            plan.params("Observation")
                .any(|p| p == ("value-quantity", ParamType::Quantity))
        );
    }

    #[test]
    fn every_fixture_extracts() {
        let plan = plan();
        let mut count = 0;
        for dir in ["hl7-r4", "us-core"] {
            let path = format!(
                "{}/../shared/fixtures/fhir/{dir}",
                env!("CARGO_MANIFEST_DIR")
            );
            for file in std::fs::read_dir(&path).unwrap() {
                let file = file.unwrap().path();
                if file.extension().and_then(|e| e.to_str()) != Some("json") {
                    continue;
                }
                let resource: Value =
                    serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
                // One summary file in hl7-r4 is a list of definitions, not a resource.
                let Some(resource_type) = resource.get("resourceType").and_then(Value::as_str)
                else {
                    continue;
                };
                let values = plan.extract(resource_type, &resource);
                // OperationOutcome has no parameters of its own; without meta it has nothing.
                if resource_type != "OperationOutcome" {
                    assert!(!values.is_empty(), "{}", file.display());
                }
                count += 1;
            }
        }
        assert!(count > 250, "{count}");
    }

    #[test]
    fn date_ranges_at_every_precision() {
        let cases = [
            ("2013", "2013-01-01T00:00:00Z", "2014-01-01T00:00:00Z"),
            ("2013-01", "2013-01-01T00:00:00Z", "2013-02-01T00:00:00Z"),
            ("2013-12", "2013-12-01T00:00:00Z", "2014-01-01T00:00:00Z"),
            ("2012-02", "2012-02-01T00:00:00Z", "2012-03-01T00:00:00Z"),
            ("2013-01-14", "2013-01-14T00:00:00Z", "2013-01-15T00:00:00Z"),
            ("2012-02-29", "2012-02-29T00:00:00Z", "2012-03-01T00:00:00Z"),
            (
                "2013-01-14T10:00",
                "2013-01-14T10:00:00Z",
                "2013-01-14T10:01:00Z",
            ),
            (
                "2013-01-14T10:00Z",
                "2013-01-14T10:00:00Z",
                "2013-01-14T10:01:00Z",
            ),
            (
                "2013-01-14T10:00:05",
                "2013-01-14T10:00:05Z",
                "2013-01-14T10:00:06Z",
            ),
            (
                "2013-01-14T10:00:00.123+02:00",
                "2013-01-14T08:00:00.123Z",
                "2013-01-14T08:00:00.124Z",
            ),
            (
                "2013-01-14T10:00:00.1234567-05:30",
                "2013-01-14T15:30:00.123456Z",
                "2013-01-14T15:30:00.123457Z",
            ),
            (
                "1969-12-31T23:59:59Z",
                "1969-12-31T23:59:59Z",
                "1970-01-01T00:00:00Z",
            ),
            ("0001-01-01", "0001-01-01T00:00:00Z", "0001-01-02T00:00:00Z"),
        ];
        for (text, low, high) in cases {
            assert_eq!(
                date_range(text),
                Some((micros(low), micros(high))),
                "{text}"
            );
        }
        for bad in [
            "",
            "13",
            "2013-1",
            "2013-13",
            "2013-02-29",
            "2013-01-14T",
            "2013-01-14T10",
            "2013-01-14T24:00",
            "2013-01-14T10:00:60",
            "2013-01-14T10:00:00.",
            "2013-01-14T10:00+2",
            "2013-01-14T10:00+02:00x",
            "2013-01-14+02:00",
            "ge2013",
            "２０１３",
            "2013-01-14T10:00:00.123+15:00",
        ] {
            assert_eq!(date_range(bad), None, "{bad}");
        }
    }

    #[test]
    fn number_ranges_follow_significant_figures() {
        let close = |text: &str, low: f64, high: f64| {
            let (l, h) = number_range(text).unwrap();
            assert!(
                (l - low).abs() < 1e-9 && (h - high).abs() < 1e-9,
                "{text}: {l} {h}"
            );
        };
        close("100", 99.5, 100.5);
        close("100.00", 99.995, 100.005);
        close("0.1", 0.05, 0.15);
        close("-100", -100.5, -99.5);
        close("+3", 2.5, 3.5);
        close("1e2", 50.0, 150.0);
        close("1.0e2", 95.0, 105.0);
        close("1.5E-2", 0.0145, 0.0155);
        for bad in [
            "", "abc", "1.", ".5", "1e", "1e+", "NaN", "inf", "1,5", "--1", "1e400", "0x10", "1 ",
        ] {
            assert_eq!(number_range(bad), None, "{bad}");
        }
    }

    #[test]
    fn odd_shapes_give_nothing_rather_than_failing() {
        let plan = plan();
        // Each element below has a JSON type its FHIR type cannot have: the parameter over it
        // gives no value (and extraction neither panics nor errs over the rest). A bare scalar
        // is the exception: token parameters also index primitives (code, boolean, integer),
        // so a number where an Identifier belongs would give a code. Validation refuses such a
        // resource before it is indexed.
        let odd = [
            (
                json!({"resourceType": "Patient", "birthDate": 1974, "gender": {"a": 1}, "identifier": [null, {"system": 5}, {"value": {"v": 1}}], "telecom": {"system": "email"}}),
                &["birthdate", "gender", "identifier"][..],
            ),
            (
                json!({"resourceType": "Observation", "valueQuantity": {"value": "185"}, "effectivePeriod": {"start": 3}, "code": {"coding": "x"}, "subject": {"reference": null}}),
                &["value-quantity", "date", "code", "subject", "patient"][..],
            ),
            (
                json!({"resourceType": "Observation", "valueRange": {"low": {"value": true}}, "effectiveTiming": {"repeat": 5}}),
                &["value-quantity", "date"][..],
            ),
        ];
        for (resource, params) in odd {
            let resource_type = resource["resourceType"].as_str().unwrap();
            for param in params {
                assert!(
                    plan.is_indexed(resource_type, param),
                    "{resource_type}.{param}"
                );
                let values = plan.extract_param(resource_type, param, &resource);
                assert!(values.is_empty(), "{resource_type}.{param}: {values:?}");
            }
        }
        // Not a resource at all: nothing that names its content (a computed parameter such as
        // Patient's `deceased` still evaluates, to false). A type without parameters: nothing.
        for resource in [json!(null), json!([]), json!("Patient")] {
            for resource_type in ["Patient", "Observation"] {
                for (code, value) in plan.extract(resource_type, &resource) {
                    assert!(
                        matches!(&value, SearchValue::Token { code: Some(c), .. } if c == "false"),
                        "{resource_type}.{code} over {resource}: {value:?}"
                    );
                }
            }
            assert!(plan.extract("NoSuchType", &resource).is_empty());
        }
        let values = plan.extract("NoSuchType", &json!({"resourceType": "NoSuchType", "a": 1}));
        assert!(values.is_empty(), "{values:?}");
    }
}
