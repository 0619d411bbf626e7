//! The Consent rule: which patients' compartments a practitioner or organization (a `user/`
//! token's `fhirUser`) or a research client may open, decided from R4 `Consent` resources.
//!
//! A Consent counts for a request when it is `active` and its `scope` is the request's kind
//! (`patient-privacy` or `treatment` for care, `research` for research). Its provision's
//! conditions are then each decided for the request: `period` (if any) covers now, `actor`
//! (if any) names the requester's `fhirUser`, `purpose` (if any) includes the token's
//! `purpose_of_use`. A condition the request cannot answer (a token without `fhirUser` or
//! without a purpose, a period that does not parse) is undecided, and the rule fails
//! closed: a `permit` applies only when every condition holds, a `deny` whenever none is
//! known to fail. For each patient, a `deny` that applies wins over any `permit`; without a
//! `permit` that applies there is no access. Nested provisions (exceptions inside a
//! provision) are not evaluated: a `permit` that has them grants nothing, a `deny` that has
//! them denies whole, so an exception can never widen access.

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
    let permit = match provision["type"].as_str() {
        Some("permit") => true,
        Some("deny") => false,
        _ => return None,
    };
    if permit && provision.get("provision").is_some() {
        return None; // exceptions are not evaluated (see the module comment)
    }
    // Each condition: Some(true) holds, Some(false) fails, None undecided for this request.
    let period = if provision["period"].is_null() {
        Some(true)
    } else {
        covers(&provision["period"], request.now)
    };
    let actor = match provision["actor"].as_array().filter(|a| !a.is_empty()) {
        None => Some(true),
        Some(actors) => request.actor.map(|actor| {
            actors
                .iter()
                .filter_map(|listed| listed["reference"]["reference"].as_str())
                .any(|reference| reference == actor)
        }),
    };
    let purpose = match provision["purpose"].as_array().filter(|p| !p.is_empty()) {
        None => Some(true),
        Some(purposes) => request
            .purpose
            .map(|purpose| purposes.iter().any(|coding| coding["code"] == purpose)),
    };
    let conditions = [period, actor, purpose];
    let counts = if permit {
        conditions.iter().all(|c| *c == Some(true))
    } else {
        !conditions.contains(&Some(false))
    };
    counts.then_some((patient, permit))
}

/// The id of the patient a Consent (stored JSON) is about.
pub fn consent_patient(json: &str) -> Option<String> {
    let consent: Value = serde_json::from_str(json).ok()?;
    consent["patient"]["reference"]
        .as_str()
        .and_then(patient_id)
}

/// The codes of a CodeableConcept.
fn codes(concept: &Value) -> impl Iterator<Item = &str> {
    concept["coding"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|coding| coding["code"].as_str())
}

/// Whether a Period covers `now`; `None` when a bound does not parse.
fn covers(period: &Value, now: i64) -> Option<bool> {
    let bound = |name: &str| -> Option<Option<(i64, i64)>> {
        match &period[name] {
            Value::Null => Some(None),
            Value::String(text) => date_range(text).map(Some),
            _ => None,
        }
    };
    let starts_by = bound("start")?.is_none_or(|(low, _)| low <= now);
    let ends_after = bound("end")?.is_none_or(|(_, high)| now < high);
    Some(starts_by && ends_after)
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

    #[test]
    fn undecidable_conditions_fail_closed() {
        // A permit for a stated purpose does not open the record to a token stating none.
        let mut for_treatment = consent("a", "patient-privacy", "permit", None);
        for_treatment["provision"]["purpose"] = json!([{"code": "TREAT"}]);
        let no_purpose = care("Practitioner/1");
        assert!(permitted_patients(std::slice::from_ref(&for_treatment), &no_purpose).is_empty());
        let treating = ConsentRequest {
            purpose: Some("TREAT"),
            ..care("Practitioner/1")
        };
        assert_eq!(
            permitted_patients(std::slice::from_ref(&for_treatment), &treating),
            BTreeSet::from(["a".to_owned()])
        );
        // A deny restricted by purpose or actor applies when the token cannot show it is
        // outside the restriction; a deny with nested exceptions denies whole.
        let mut deny_marketing = consent("a", "patient-privacy", "deny", None);
        deny_marketing["provision"]["purpose"] = json!([{"code": "HMARKT"}]);
        let permit = consent("a", "patient-privacy", "permit", None);
        let consents = [permit.clone(), deny_marketing];
        assert!(permitted_patients(&consents, &no_purpose).is_empty());
        assert_eq!(
            permitted_patients(&consents, &treating),
            BTreeSet::from(["a".to_owned()])
        );
        let mut deny_with_exception = consent("a", "patient-privacy", "deny", None);
        deny_with_exception["provision"]["provision"] =
            json!([{"type": "permit", "actor": [{"reference": {"reference": "Practitioner/1"}}]}]);
        assert!(permitted_patients(&[permit.clone(), deny_with_exception], &treating).is_empty());
        let research = ConsentRequest {
            kind: ConsentKind::Research,
            actor: None,
            purpose: Some("HRESCH"),
            now: NOW,
        };
        let open_study = consent("a", "research", "permit", None);
        let named_deny = consent("a", "research", "deny", Some("Organization/9"));
        assert!(permitted_patients(&[open_study, named_deny], &research).is_empty());
        let mut unreadable = consent("a", "patient-privacy", "deny", None);
        unreadable["provision"]["period"] = json!({"start": "not a date"});
        assert!(permitted_patients(&[permit, unreadable], &treating).is_empty());
    }
}
