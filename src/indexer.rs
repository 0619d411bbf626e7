//! The indexer: what a resource's content becomes in the blind index when it is written
//! (digest rows for strings, tokens, references and URIs; date and number ranges; composite
//! tuples; presence), the one form a search term is looked up by, and whose patient
//! compartments a resource is in. Pure over the index key and the SearchParameter
//! definitions: it reads no database and decides no access; the store writes its rows and the
//! search engine builds conditions from its digests.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;

use crate::crypto::blind_index::{
    BlindIndexKey, Digest, LEGACY_PREFIX_CHARS, MAX_PREFIX_CHARS, ValueKind, bounded_prefix,
    normalize_string, prefixes, system_and_code,
};
use crate::fhir::ResourceId;
use crate::fhir::compartment::CompartmentRule;
use crate::fhir::search_params::{ParamType, SearchParamRegistry};
use crate::fhir::search_query::{FilterValue, SupportedParams};
use crate::fhir::search_values::{IndexPlan, SearchValue};
use crate::store::search::{Condition, DateRow, IndexRows, NumberRow};

/// The index plan and key: everything that turns resource content into index rows and
/// search terms into digests.
pub struct SearchIndex {
    plan: IndexPlan,
    /// The longest string prefix searches look up: [`MAX_PREFIX_CHARS`] once every stored
    /// resource is indexed with prefixes that long (the start-up reindex raises it).
    query_prefix_chars: AtomicUsize,
    /// Whose compartments a resource is in (the one rule; see [`CompartmentRule`]).
    compartment_rule: CompartmentRule,
    registry: SearchParamRegistry,
    key: BlindIndexKey,
    /// The server's FHIR base (`…/fhir`): absolute references to it index as relative.
    fhir_base: String,
}

impl SupportedParams for SearchIndex {
    fn supported(&self, resource_type: &str, code: &str) -> Option<ParamType> {
        if !self.plan.is_indexed(resource_type, code) {
            return None;
        }
        self.registry
            .get(resource_type, code)
            .map(|def| def.param_type)
    }

    fn components(&self, resource_type: &str, code: &str) -> Option<Vec<ParamType>> {
        self.plan.components(resource_type, code)
    }
}

impl SearchIndex {
    pub fn new(registry: SearchParamRegistry, key: BlindIndexKey, fhir_base: String) -> Self {
        let plan = IndexPlan::new(&registry);
        Self {
            compartment_rule: CompartmentRule::new(&registry, &plan),
            plan,
            query_prefix_chars: AtomicUsize::new(MAX_PREFIX_CHARS),
            registry,
            key,
            fhir_base,
        }
    }

    /// The same plan and base under another key: what rebuilding the index for a new index
    /// key writes with.
    pub fn with_key(&self, key: BlindIndexKey) -> Self {
        Self::new(self.registry.clone(), key, self.fhir_base.clone())
    }

    /// The server's FHIR base (`…/fhir`).
    pub fn fhir_base(&self) -> &str {
        &self.fhir_base
    }

    /// The id of the index key (never the key).
    pub fn key_id(&self) -> String {
        self.key.id()
    }

    /// The longest string prefix searches look up in the index.
    pub fn query_prefix_chars(&self) -> usize {
        self.query_prefix_chars.load(Ordering::Relaxed)
    }

    /// Searches look up prefixes of at most `chars` characters (the bound every stored
    /// resource's index is known to reach).
    pub(crate) fn set_query_prefix_chars(&self, chars: usize) {
        self.query_prefix_chars.store(
            chars.clamp(LEGACY_PREFIX_CHARS, MAX_PREFIX_CHARS),
            Ordering::Relaxed,
        );
    }

    pub fn registry(&self) -> &SearchParamRegistry {
        &self.registry
    }

    pub fn plan(&self) -> &IndexPlan {
        &self.plan
    }

    /// The digest saying that a resource has a value for parameter `code`.
    pub(crate) fn presence_digest(&self, resource_type: &str, code: &str) -> Digest {
        self.digest(resource_type, code, ValueKind::Present, "")
    }

    /// One value's digest on each searched type (digests are keyed by type): what a search
    /// over several types looks for.
    pub(crate) fn digests_on(
        &self,
        resource_types: &[String],
        code: &str,
        kind: ValueKind,
        text: &str,
    ) -> Vec<Digest> {
        resource_types
            .iter()
            .map(|resource_type| self.digest(resource_type, code, kind, text))
            .collect()
    }

    /// The presence digest of every indexed parameter of `resource_type`.
    pub fn presence_digests(&self, resource_type: &str) -> Vec<Digest> {
        self.plan
            .params(resource_type)
            .filter(|(code, _)| self.plan.is_indexed(resource_type, code))
            .map(|(code, _)| self.presence_digest(resource_type, code))
            .collect()
    }

    /// The index rows of one resource version.
    pub fn rows(&self, resource_type: &str, resource: &Value) -> IndexRows {
        let mut hashes = BTreeSet::new();
        let mut present = BTreeSet::new();
        let mut rows = IndexRows::default();
        for (code, value) in self.plan.extract(resource_type, resource) {
            if !present.contains(&code) {
                present.insert(code.clone());
            }
            match value {
                SearchValue::Composite(parts) => {
                    self.composite_rows(resource_type, &code, &parts, &mut hashes, &mut rows);
                }
                value => match self.range_row(resource_type, &code, &value, None) {
                    Some(row) => row.push_to(&mut rows),
                    None => hashes.extend(
                        self.stored_forms(&value)
                            .iter()
                            .map(|(kind, text)| self.digest(resource_type, &code, *kind, text)),
                    ),
                },
            }
        }
        rows.hashes = hashes.into_iter().collect();
        rows.presence = present
            .iter()
            .map(|code| self.presence_digest(resource_type, code))
            .collect();
        rows
    }

    /// The rows of one composite tuple (search.html#composite). When every component is
    /// hashable: one digest per combination of the components' searchable forms
    /// (`system|code`, `code`, … of a token; every prefix of a string). Otherwise the last
    /// component's date or number row, once per combination of the leading components' forms,
    /// carrying that combination's digest.
    fn composite_rows(
        &self,
        resource_type: &str,
        code: &str,
        parts: &[SearchValue],
        hashes: &mut BTreeSet<Digest>,
        rows: &mut IndexRows,
    ) {
        let Some((last, leading)) = parts.split_last() else {
            return;
        };
        // A composite query takes no `:exact`, so whole-text forms would never be asked for.
        let forms = |value: &SearchValue| -> Vec<(ValueKind, String)> {
            self.stored_forms(value)
                .into_iter()
                .filter(|(kind, _)| *kind != ValueKind::Exact)
                .collect()
        };
        let mut lists: Vec<_> = leading.iter().map(forms).collect();
        let ranged = matches!(
            last,
            SearchValue::Date { .. } | SearchValue::Number(_) | SearchValue::Quantity { .. }
        );
        if !ranged {
            lists.push(forms(last));
            for tuple in combinations(&lists) {
                hashes.insert(self.digest_tuple(resource_type, code, &tuple));
            }
            return;
        }
        for tuple in combinations(&lists) {
            let lead = self.digest_tuple(resource_type, code, &tuple);
            if let Some(row) = self.range_row(resource_type, code, last, Some(lead)) {
                row.push_to(rows);
            }
        }
    }

    /// The date or number row of a date, number or quantity value (`None` for the others,
    /// which are hashed).
    fn range_row(
        &self,
        resource_type: &str,
        code: &str,
        value: &SearchValue,
        lead: Option<Digest>,
    ) -> Option<RangeRow> {
        let param = code.to_owned();
        Some(match value {
            SearchValue::Date { low, high } => RangeRow::Date(DateRow {
                param,
                low: *low,
                high: *high,
                lead,
            }),
            SearchValue::Number(value) => RangeRow::Number(NumberRow {
                param,
                value: *value,
                unit_system_code: None,
                unit_code: None,
                lead,
            }),
            SearchValue::Quantity {
                value,
                system,
                code: unit_code,
                unit,
            } => RangeRow::Number(NumberRow {
                param,
                value: *value,
                unit_system_code: system.as_deref().zip(unit_code.as_deref()).map(|(s, c)| {
                    self.digest(
                        resource_type,
                        code,
                        ValueKind::UnitSystemCode,
                        &system_and_code(s, c),
                    )
                }),
                unit_code: unit_code
                    .as_deref()
                    .or(unit.as_deref())
                    .map(|c| self.digest(resource_type, code, ValueKind::UnitCode, c)),
                lead,
            }),
            _ => return None,
        })
    }

    /// The forms under which a stored string, token, reference or uri value is found
    /// (search.html#string, #token, #reference): every normalized prefix and the exact text;
    /// `code`, `system|code` or `|code`, and `system|`; `Type/id` and the id; the uri.
    pub(crate) fn stored_forms(&self, value: &SearchValue) -> Vec<(ValueKind, String)> {
        let mut forms = Vec::new();
        match value {
            SearchValue::String(text) => {
                let normalized = normalize_string(text);
                forms.extend(
                    prefixes(&normalized).map(|prefix| (ValueKind::Prefix, prefix.to_owned())),
                );
                forms.push((ValueKind::Exact, text.clone()));
            }
            SearchValue::Token { system, code } => {
                if let Some(code) = code {
                    forms.push((ValueKind::Code, code.clone()));
                    forms.push(match system {
                        Some(system) => (ValueKind::SystemCode, system_and_code(system, code)),
                        None => (ValueKind::CodeWithoutSystem, code.clone()),
                    });
                }
                if let Some(system) = system {
                    forms.push((ValueKind::System, system.clone()));
                }
            }
            SearchValue::Reference(reference) => match self.reference_target(reference) {
                ReferenceTarget::Local { resource_type, id } => {
                    forms.push((ValueKind::Reference, format!("{resource_type}/{id}")));
                    forms.push((ValueKind::ReferenceId, id));
                }
                ReferenceTarget::External(url) => forms.push((ValueKind::Reference, url)),
                ReferenceTarget::Unusable => {}
            },
            SearchValue::Uri(uri) => forms.push((ValueKind::Uri, uri.clone())),
            SearchValue::Date { .. }
            | SearchValue::Number(_)
            | SearchValue::Quantity { .. }
            | SearchValue::Composite(_) => {}
        }
        forms
    }

    /// The one form a search value of a string, token, reference or uri is looked up by;
    /// `None` when it can match nothing. Strings give their prefix within the index's bound.
    pub(crate) fn query_form(
        &self,
        value: &FilterValue,
        target_type: Option<&str>,
    ) -> Option<(ValueKind, String)> {
        Some(match value {
            FilterValue::String(text) => {
                let normalized = normalize_string(text);
                if normalized.is_empty() {
                    return None;
                }
                (
                    ValueKind::Prefix,
                    bounded_prefix(&normalized, self.query_prefix_chars()).to_owned(),
                )
            }
            FilterValue::Token { system, code } => match (system.as_deref(), code) {
                (None, Some(code)) => (ValueKind::Code, code.clone()),
                (Some(""), Some(code)) => (ValueKind::CodeWithoutSystem, code.clone()),
                (Some(system), Some(code)) => {
                    (ValueKind::SystemCode, system_and_code(system, code))
                }
                (Some(system), None) => (ValueKind::System, system.to_owned()),
                (None, None) => return None,
            },
            FilterValue::Reference(value) => match self.reference_target(value) {
                ReferenceTarget::Local { resource_type, id } => {
                    if target_type.is_some_and(|t| t != resource_type) {
                        return None;
                    }
                    (ValueKind::Reference, format!("{resource_type}/{id}"))
                }
                ReferenceTarget::External(url) => (ValueKind::Reference, url),
                ReferenceTarget::Unusable => match target_type {
                    Some(t) => (ValueKind::Reference, format!("{t}/{value}")),
                    None => (ValueKind::ReferenceId, value.clone()),
                },
            },
            FilterValue::Uri(uri) => (ValueKind::Uri, uri.clone()),
            _ => return None,
        })
    }

    /// The compartment rule every part of the server decides membership by.
    pub fn compartment_rule(&self) -> &CompartmentRule {
        &self.compartment_rule
    }

    /// Whether resources of `resource_type` belong to patients' compartments (see
    /// [`CompartmentRule`]); Practitioners, Medications and the like belong to none.
    pub fn has_compartments(&self, resource_type: &str) -> bool {
        self.compartment_rule.has_compartments(resource_type)
    }

    /// The ids of the patients whose compartments hold this resource (see
    /// [`CompartmentRule::compartments`]); `None` for a type outside compartments.
    pub fn compartments(
        &self,
        resource_type: &str,
        id: &str,
        resource: &Value,
    ) -> Option<BTreeSet<String>> {
        self.compartment_rule
            .compartments(
                &self.plan,
                resource_type,
                id,
                resource,
                |reference| match self.reference_target(reference) {
                    ReferenceTarget::Local { resource_type, id } if resource_type == "Patient" => {
                        Some(id)
                    }
                    _ => None,
                },
            )
    }

    /// [`Self::compartments`] of a stored resource's JSON, parsing only the elements the
    /// rule reads. JSON that does not parse belongs to no patient's compartment (and so is
    /// inside none: a confined token never sees it).
    pub fn stored_compartments(
        &self,
        resource_type: &str,
        id: &str,
        json: &str,
    ) -> Option<BTreeSet<String>> {
        if !self.has_compartments(resource_type) {
            return None;
        }
        match self.compartment_rule.parse_relevant(resource_type, json) {
            Ok(value) => self.compartments(resource_type, id, &value),
            Err(_) => Some(BTreeSet::new()),
        }
    }

    /// How many reference digests the compartment condition of `patients` patients over
    /// `resource_types` holds (see [`Self::compartment_condition`]).
    pub fn compartment_digests(&self, resource_types: &[String], patients: usize) -> usize {
        resource_types
            .iter()
            .map(|t| {
                let params = self
                    .compartment_rule
                    .params(t)
                    .iter()
                    .filter(|param| self.plan.is_indexed(t, param))
                    .count();
                params.saturating_mul(patients)
            })
            .sum()
    }

    /// The condition confining a search over `resource_types` (checked by
    /// [`Self::confinable`]) to `patients`' compartments, through the same reference digests
    /// a search by those parameters uses; `None` when the types belong to no compartment.
    pub fn compartment_condition(
        &self,
        resource_types: &[String],
        patients: &[String],
    ) -> Option<Condition> {
        if !resource_types.iter().any(|t| self.has_compartments(t)) {
            return None;
        }
        let references: Vec<String> = patients.iter().map(|p| format!("Patient/{p}")).collect();
        let digests: Vec<Digest> = resource_types
            .iter()
            .flat_map(|t| {
                self.compartment_rule
                    .params(t)
                    .iter()
                    .filter(|param| self.plan.is_indexed(t, param))
                    .flat_map(|param| {
                        references
                            .iter()
                            .map(|r| self.digest(t, param, ValueKind::Reference, r))
                    })
            })
            .collect();
        let linked = if digests.is_empty() {
            Condition::Nothing
        } else {
            Condition::HasAny(digests)
        };
        Some(if resource_types.iter().any(|t| t == "Patient") {
            Condition::AnyOf(vec![Condition::Id(patients.to_vec()), linked])
        } else {
            linked
        })
    }

    pub(crate) fn digest_tuple(
        &self,
        resource_type: &str,
        code: &str,
        tuple: &[(ValueKind, String)],
    ) -> Digest {
        let parts: Vec<(ValueKind, &str)> = tuple
            .iter()
            .map(|(kind, text)| (*kind, text.as_str()))
            .collect();
        self.key.digest_tuple(resource_type, code, &parts)
    }

    /// What a literal reference points at, relative to this server.
    pub fn reference_target(&self, reference: &str) -> ReferenceTarget {
        let local = reference
            .strip_prefix(&self.fhir_base)
            .and_then(|rest| rest.strip_prefix('/'))
            .unwrap_or(reference);
        if local.starts_with('#') || local.starts_with("urn:") {
            return ReferenceTarget::Unusable;
        }
        if local.contains("://") {
            return ReferenceTarget::External(reference.to_owned());
        }
        let mut parts = local.split('/');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(t), Some(id), None | Some("_history"))
                if looks_like_type(t) && ResourceId::parse(id).is_ok() =>
            {
                ReferenceTarget::Local {
                    resource_type: t.to_owned(),
                    id: id.to_owned(),
                }
            }
            _ => ReferenceTarget::Unusable,
        }
    }

    pub(crate) fn digest(
        &self,
        resource_type: &str,
        code: &str,
        kind: ValueKind,
        value: &str,
    ) -> Digest {
        self.key.digest(resource_type, code, kind, value)
    }
}

/// A date or number row of the index.
enum RangeRow {
    Date(DateRow),
    Number(NumberRow),
}

impl RangeRow {
    fn push_to(self, rows: &mut IndexRows) {
        match self {
            Self::Date(row) => rows.dates.push(row),
            Self::Number(row) => rows.numbers.push(row),
        }
    }
}

/// Every way to pick one item from each list, in order (none when a list is empty).
fn combinations<T: Clone>(lists: &[Vec<T>]) -> Vec<Vec<T>> {
    lists.iter().fold(vec![Vec::new()], |heads, list| {
        heads
            .iter()
            .flat_map(|head| {
                list.iter().map(move |item| {
                    let mut next = head.clone();
                    next.push(item.clone());
                    next
                })
            })
            .collect()
    })
}

/// Whether a reference's first segment can be a resource type name (`Patient`), as
/// opposed to a path on another server.
fn looks_like_type(segment: &str) -> bool {
    segment
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_uppercase())
        && segment.chars().all(|c| c.is_ascii_alphanumeric())
}

/// A literal reference resolved against this server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReferenceTarget {
    Local {
        resource_type: String,
        id: String,
    },
    External(String),
    /// Contained (`#…`), `urn:` or malformed.
    Unusable,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use serde_json::json;

    use super::*;

    const BASE: &str = "https://ehr.example/fhir";

    fn indexer() -> SearchIndex {
        SearchIndex::new(
            SearchParamRegistry::load().unwrap(),
            BlindIndexKey::from_bytes([3; 32]),
            BASE.to_owned(),
        )
    }

    fn observation() -> Value {
        json!({
            "resourceType": "Observation",
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
            "subject": {"reference": format!("{BASE}/Patient/p1")},
            "performer": [{"reference": "Practitioner/dr1"}],
            "effectiveDateTime": "2024-03-05",
            "valueQuantity": {"value": 72, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"}
        })
    }

    #[test]
    fn a_term_is_found_by_the_digest_its_stored_value_became() {
        let index = indexer();
        let rows = index.rows(
            "Patient",
            &json!({"resourceType": "Patient", "name": [{"family": "Ébré-Smith"}]}),
        );
        // A string is stored as its normalized prefixes; a search term of any of them is
        // looked up by exactly one of the stored digests.
        for term in ["e", "ebre", "ÉBRÉ-SM", "ebre-smith"] {
            let (kind, text) = index
                .query_form(&FilterValue::String(term.into()), None)
                .unwrap();
            let digest = index.digest("Patient", "family", kind, &text);
            assert!(rows.hashes.contains(&digest), "{term}");
        }
        let (kind, text) = index
            .query_form(&FilterValue::String("smith".into()), None)
            .unwrap();
        assert!(
            !rows
                .hashes
                .contains(&index.digest("Patient", "family", kind, &text))
        );
        // Digests are keyed by type and parameter: the same text elsewhere is another digest.
        assert_ne!(
            index.digest("Patient", "family", ValueKind::Prefix, "ebre"),
            index.digest("Practitioner", "family", ValueKind::Prefix, "ebre")
        );
        assert!(
            rows.presence
                .contains(&index.presence_digest("Patient", "family"))
        );
        assert!(
            !rows
                .presence
                .contains(&index.presence_digest("Patient", "birthdate"))
        );
    }

    #[test]
    fn tokens_references_dates_and_quantities_become_their_rows() {
        let index = indexer();
        let rows = index.rows("Observation", &observation());
        let digest = |code: &str, kind, text: &str| index.digest("Observation", code, kind, text);
        for expected in [
            digest(
                "code",
                ValueKind::SystemCode,
                &system_and_code("http://loinc.org", "8867-4"),
            ),
            digest("code", ValueKind::Code, "8867-4"),
            digest("code", ValueKind::System, "http://loinc.org"),
            digest("status", ValueKind::Code, "final"),
            // An absolute reference to this server is indexed as the relative one.
            digest("subject", ValueKind::Reference, "Patient/p1"),
            digest("patient", ValueKind::Reference, "Patient/p1"),
            digest("performer", ValueKind::Reference, "Practitioner/dr1"),
        ] {
            assert!(rows.hashes.contains(&expected));
        }
        let date = rows.dates.iter().find(|row| row.param == "date").unwrap();
        // 2024-03-05 covers the whole day, in µs since the epoch, its end excluded.
        assert_eq!(date.low, 1_709_596_800_000_000);
        assert_eq!(date.high - date.low, 86_400_000_000);
        assert!(rows.numbers.iter().any(|row| row.param == "value-quantity"));
        assert!(
            rows.presence
                .contains(&index.presence_digest("Observation", "subject"))
        );
        assert!(
            !rows
                .presence
                .contains(&index.presence_digest("Observation", "focus"))
        );
    }

    #[test]
    fn compartments_follow_references_to_patients_on_this_server_only() {
        let index = indexer();
        let members = index
            .compartments("Observation", "o1", &observation())
            .unwrap();
        assert_eq!(members, BTreeSet::from(["p1".to_owned()]));
        let elsewhere = json!({
            "resourceType": "Observation", "status": "final", "code": {"text": "x"},
            "subject": {"reference": "https://other.example/fhir/Patient/p1"}
        });
        assert!(
            index
                .compartments("Observation", "o2", &elsewhere)
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            index.compartments("Patient", "p9", &json!({"resourceType": "Patient"})),
            Some(BTreeSet::from(["p9".to_owned()]))
        );
        assert_eq!(
            index.compartments("Medication", "m1", &json!({"resourceType": "Medication"})),
            None
        );
        assert_eq!(
            index.reference_target("Patient/p1/_history/2"),
            ReferenceTarget::Local {
                resource_type: "Patient".into(),
                id: "p1".into()
            }
        );
        assert_eq!(
            index.reference_target("#contained"),
            ReferenceTarget::Unusable
        );
        assert_eq!(
            index.reference_target("https://other.example/fhir/Patient/p1"),
            ReferenceTarget::External("https://other.example/fhir/Patient/p1".into())
        );
    }

    #[test]
    fn the_compartment_condition_looks_for_the_same_digests_a_reference_search_does() {
        let index = indexer();
        let types = vec!["Observation".to_owned()];
        let Some(Condition::HasAny(digests)) =
            index.compartment_condition(&types, &["p1".to_owned()])
        else {
            panic!("a compartment type is confined by its reference digests");
        };
        let rows = index.rows("Observation", &observation());
        assert!(digests.iter().any(|d| rows.hashes.contains(d)));
        assert_eq!(digests.len(), index.compartment_digests(&types, 1));
        assert!(
            index
                .compartment_condition(&["Medication".to_owned()], &["p1".to_owned()])
                .is_none()
        );
    }
}
