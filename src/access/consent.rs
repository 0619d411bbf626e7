//! The Consent rule: which patients' compartments a practitioner or organization (a `user/`
//! token's `fhirUser`) or a research client may open, decided from R4 `Consent` resources.
//!
//! A Consent applies to a request when it is `active`, its `scope` is the request's kind
//! (`patient-privacy` or `treatment` for care, `research` for research), its
//! `provision.period` (if any) covers now, its `provision.actor` (if any) names the
//! requester's `fhirUser`, and its `provision.purpose` (if any) includes the token's
//! `purpose_of_use` (when the token states one). For each patient, a `deny` that applies wins
//! over any `permit`; without a `permit` that applies there is no access. Nested provisions
//! (exceptions inside a provision) are not evaluated: a Consent that has them grants
//! nothing, so an exception can never widen access.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::fhir::search_values::date_range;

/// What the access is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsentKind {
    Treatment,
    Research,
}

/// Who asks, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentRequest<'a> {
    pub kind: ConsentKind,
    /// The requester's FHIR resource (`Practitioner/7`, `Organization/3`), if the token names
    /// one: provisions that list actors apply only to the actors they list.
    pub actor: Option<&'a str>,
    /// The token's `purpose_of_use`.
    pub purpose: Option<&'a str>,
    /// Now, µs since the epoch.
    pub now: i64,
}

/// The ids of the patients whose Consents permit `request`, deny winning.
pub fn permitted_patients<'a>(
    consents: impl IntoIterator<Item = &'a Value>,
    request: &ConsentRequest<'_>,
) -> BTreeSet<String> {
    let mut permitted = BTreeSet::new();
    let mut denied = BTreeSet::new();
    for consent in consents {
        let Some((patient, permit)) = applies(consent, request) else {
            continue;
        };
        if permit {
            permitted.insert(patient);
        } else {
            denied.insert(patient);
        }
    }
    permitted.retain(|patient| !denied.contains(patient));
    permitted
}

/// For a Consent that applies to `request`: its patient's id and whether it permits.
fn applies(consent: &Value, request: &ConsentRequest<'_>) -> Option<(String, bool)> {
    if consent["status"] != "active" {
        return None;
    }
    let scopes: &[&str] = match request.kind {
        ConsentKind::Treatment => &["patient-privacy", "treatment"],
        ConsentKind::Research => &["research"],
    };
    let scope_matches = codes(&consent["scope"]).any(|code| scopes.contains(&code));
    if !scope_matches {
        return None;
    }
    let patient = consent["patient"]["reference"]
        .as_str()
        .and_then(patient_id)?;
    let provision = &consent["provision"];
    if provision.get("provision").is_some() {
        return None; // nested exceptions are not evaluated (see the module comment)
    }
    let permit = match provision["type"].as_str() {
        Some("permit") => true,
        Some("deny") => false,
        _ => return None,
    };
    if !covers(&provision["period"], request.now) {
        return None;
    }
    if let Some(actors) = provision["actor"].as_array().filter(|a| !a.is_empty()) {
        let named = actors
            .iter()
            .filter_map(|actor| actor["reference"]["reference"].as_str())
            .any(|reference| Some(reference) == request.actor);
        if !named {
            return None;
        }
    }
    if let (Some(purposes), Some(purpose)) = (
        provision["purpose"].as_array().filter(|p| !p.is_empty()),
        request.purpose,
    ) && !purposes.iter().any(|coding| coding["code"] == purpose)
    {
        return None;
    }
    Some((patient, permit))
}

/// The codes of a CodeableConcept.
fn codes(concept: &Value) -> impl Iterator<Item = &str> {
    concept["coding"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|coding| coding["code"].as_str())
}

/// Whether a Period (absent: always) covers `now`.
fn covers(period: &Value, now: i64) -> bool {
    if period.is_null() {
        return true;
    }
    let starts_by = period["start"]
        .as_str()
        .is_none_or(|start| date_range(start).is_some_and(|(low, _)| low <= now));
    let ends_after = period["end"]
        .as_str()
        .is_none_or(|end| date_range(end).is_some_and(|(_, high)| now < high));
    starts_by && ends_after
}

/// `Patient/<id>` (relative or absolute) to the id.
fn patient_id(reference: &str) -> Option<String> {
    let (before, id) = reference.rsplit_once('/')?;
    (before == "Patient" || before.ends_with("/Patient"))
        .then(|| id.to_owned())
        .filter(|id| !id.is_empty())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const NOW: i64 = 1_780_000_000_000_000; // 2026-05-28

    fn consent(patient: &str, scope: &str, kind: &str, actor: Option<&str>) -> Value {
        let mut provision = json!({"type": kind});
        if let Some(actor) = actor {
            provision["actor"] =
                json!([{"role": {"text": "x"}, "reference": {"reference": actor}}]);
        }
        json!({"resourceType": "Consent", "status": "active",
               "scope": {"coding": [{"code": scope}]},
               "patient": {"reference": format!("Patient/{patient}")},
               "provision": provision})
    }

    fn care(actor: &str) -> ConsentRequest<'_> {
        ConsentRequest {
            kind: ConsentKind::Treatment,
            actor: Some(actor),
            purpose: None,
            now: NOW,
        }
    }

    #[test]
    fn permits_name_their_actor_and_deny_wins() {
        let consents = [
            consent("a", "patient-privacy", "permit", Some("Practitioner/1")),
            consent("b", "patient-privacy", "permit", Some("Practitioner/2")),
            consent("c", "treatment", "permit", None),
            consent("c", "patient-privacy", "deny", Some("Practitioner/1")),
            consent("d", "research", "permit", None),
        ];
        let permitted = permitted_patients(&consents, &care("Practitioner/1"));
        assert_eq!(permitted, BTreeSet::from(["a".to_owned()]));
        let permitted = permitted_patients(&consents, &care("Practitioner/2"));
        assert_eq!(permitted, BTreeSet::from(["b".to_owned(), "c".to_owned()]));
        let research = ConsentRequest {
            kind: ConsentKind::Research,
            ..care("Organization/9")
        };
        assert_eq!(
            permitted_patients(&consents, &research),
            BTreeSet::from(["d".to_owned()])
        );
    }

    #[test]
    fn inactive_expired_nested_or_off_purpose_consents_grant_nothing() {
        let mut inactive = consent("a", "patient-privacy", "permit", None);
        inactive["status"] = json!("inactive");
        let mut expired = consent("a", "patient-privacy", "permit", None);
        expired["provision"]["period"] = json!({"start": "2020-01-01", "end": "2021-01-01"});
        let mut nested = consent("a", "patient-privacy", "permit", None);
        nested["provision"]["provision"] = json!([{"type": "deny"}]);
        let mut other_purpose = consent("a", "patient-privacy", "permit", None);
        other_purpose["provision"]["purpose"] = json!([{"code": "HMARKT"}]);
        let mut current = consent("b", "patient-privacy", "permit", None);
        current["provision"]["period"] = json!({"start": "2026-01-01"});
        let request = ConsentRequest {
            purpose: Some("TREAT"),
            ..care("Practitioner/1")
        };
        let permitted = permitted_patients(
            &[inactive, expired, nested, other_purpose, current],
            &request,
        );
        assert_eq!(permitted, BTreeSet::from(["b".to_owned()]));
    }
}
