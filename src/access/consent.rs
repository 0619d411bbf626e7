//! The Consent rule: which patients' compartments a practitioner or organization (a `user/`
//! token's `fhirUser`) or a research client may open, decided from R4 `Consent` resources.
//!
//! A Consent counts for a request when it is `active` and its `scope` is the request's kind
//! (`patient-privacy` or `treatment` for care, `research` for research). Its provision's
//! conditions are then each decided for the request: `period` (if any) covers now, `actor`
//! (if any) names the requester's `fhirUser`, `purpose` (if any) includes the token's
//! `purpose_of_use`. References compare as the resources they name on this server, however
//! written (relative, absolute under this server's base, versioned). A condition the
//! request cannot answer (a token without `fhirUser` or without a purpose, a period that
//! does not parse, an actor named by identifier or on another server) is undecided, and
//! the rule fails closed: a `permit` applies only when every condition holds, a `deny`
//! whenever none is known to fail. For each patient, a `deny` that applies wins over any
//! `permit`; without a `permit` that applies there is no access.
//!
//! What the rule does not evaluate can only narrow access: a `permit` restricted further
//! (nested exceptions, `class`, `code`, `data`, `dataPeriod`, `securityLabel`, or an
//! `action` other than access) grants nothing, and a `deny` so restricted denies whole.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::fhir::search_values::date_range;

/// What the access is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsentKind {
    Treatment,
    Research,
}

/// Restrictions of a provision the rule does not evaluate (see the module comment).
const UNEVALUATED: &[&str] = &[
    "provision",
    "class",
    "code",
    "data",
    "dataPeriod",
    "securityLabel",
];

/// Who asks, and why.
pub struct ConsentRequest<'a> {
    pub kind: ConsentKind,
    /// The requester's FHIR resource (`Practitioner/7`, `Organization/3`), if the token names
    /// one: provisions that list actors apply only to the actors they list.
    pub actor: Option<&'a str>,
    /// The token's `purpose_of_use`.
    pub purpose: Option<&'a str>,
    /// Now, µs since the epoch.
    pub now: i64,
    /// The `Type/id` a reference names on this server; `None` when it names none here
    /// (another server's, contained, malformed).
    pub local: &'a dyn Fn(&str) -> Option<String>,
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
    let patient = patient_id(consent, request.local)?;
    let provision = &consent["provision"];
    let permit = match provision["type"].as_str() {
        Some("permit") => true,
        Some("deny") => false,
        _ => return None,
    };
    if permit
        && (UNEVALUATED.iter().any(|key| !provision[*key].is_null()) || !grants_access(provision))
    {
        return None;
    }
    // Each condition: Some(true) holds, Some(false) fails, None undecided for this request.
    let period = if provision["period"].is_null() {
        Some(true)
    } else {
        covers(&provision["period"], request.now)
    };
    let actor = match provision["actor"].as_array().filter(|a| !a.is_empty()) {
        None => Some(true),
        Some(actors) => names_requester(actors, request),
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

/// Whether a provision's `action` (if any) includes access (consentaction `access`).
fn grants_access(provision: &Value) -> bool {
    match provision["action"].as_array().filter(|a| !a.is_empty()) {
        None => true,
        Some(actions) => actions
            .iter()
            .any(|action| codes(action).any(|code| code == "access")),
    }
}

/// Whether a provision's actors name the requester: `Some(true)` when one does, `Some(false)`
/// when every one names someone else, `None` when that cannot be told (the token names no
/// one here, or an actor is named in a way that cannot be compared).
fn names_requester(actors: &[Value], request: &ConsentRequest<'_>) -> Option<bool> {
    let requester = request.actor.and_then(request.local)?;
    let listed: Vec<Option<String>> = actors
        .iter()
        .map(|actor| {
            actor["reference"]["reference"]
                .as_str()
                .and_then(request.local)
        })
        .collect();
    if listed
        .iter()
        .any(|named| named.as_deref() == Some(requester.as_str()))
    {
        Some(true)
    } else if listed.iter().any(Option::is_none) {
        None
    } else {
        Some(false)
    }
}

/// The id of the patient a Consent (stored JSON) is about, on this server.
pub fn consent_patient(json: &str, local: &dyn Fn(&str) -> Option<String>) -> Option<String> {
    let consent: Value = serde_json::from_str(json).ok()?;
    patient_id(&consent, local)
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

/// The id of the local Patient a Consent's `patient` references.
fn patient_id(consent: &Value, local: &dyn Fn(&str) -> Option<String>) -> Option<String> {
    let named = local(consent["patient"]["reference"].as_str()?)?;
    named
        .strip_prefix("Patient/")
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
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

    const BASE: &str = "https://ehr.example/fhir/";

    /// This server's references: relative, or absolute under [`BASE`]; versions dropped.
    fn local(reference: &str) -> Option<String> {
        let relative = reference.strip_prefix(BASE).unwrap_or(reference);
        if relative.contains("://") {
            return None;
        }
        let mut parts = relative.split('/');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(t), Some(id), None | Some("_history")) if !id.is_empty() => {
                Some(format!("{t}/{id}"))
            }
            _ => None,
        }
    }

    fn care(actor: &str) -> ConsentRequest<'_> {
        ConsentRequest {
            kind: ConsentKind::Treatment,
            actor: Some(actor),
            purpose: None,
            now: NOW,
            local: &local,
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
            local: &local,
        };
        let open_study = consent("a", "research", "permit", None);
        let named_deny = consent("a", "research", "deny", Some("Organization/9"));
        assert!(permitted_patients(&[open_study, named_deny], &research).is_empty());
        let mut unreadable = consent("a", "patient-privacy", "deny", None);
        unreadable["provision"]["period"] = json!({"start": "not a date"});
        assert!(permitted_patients(&[permit, unreadable], &treating).is_empty());
    }

    #[test]
    fn references_compare_as_the_resources_they_name() {
        // A deny naming the requester absolutely, or a version of it, still denies; so does
        // a deny about the patient written with a version.
        let permit = consent("a", "patient-privacy", "permit", None);
        let absolute = consent(
            "a",
            "patient-privacy",
            "deny",
            Some(&format!("{BASE}Practitioner/1")),
        );
        let versioned = consent(
            "a",
            "patient-privacy",
            "deny",
            Some("Practitioner/1/_history/3"),
        );
        let mut about_version = consent("x", "patient-privacy", "deny", None);
        about_version["patient"]["reference"] = json!("Patient/a/_history/2");
        for deny in [absolute, versioned, about_version] {
            assert!(
                permitted_patients(&[permit.clone(), deny.clone()], &care("Practitioner/1"))
                    .is_empty(),
                "{deny}"
            );
        }
        // The token's fhirUser may be absolute too.
        let named = consent("a", "patient-privacy", "permit", Some("Practitioner/1"));
        let absolute_user = format!("{BASE}Practitioner/1");
        assert_eq!(
            permitted_patients(std::slice::from_ref(&named), &care(&absolute_user)),
            BTreeSet::from(["a".to_owned()])
        );
        // An actor named by identifier or on another server cannot be compared: a deny
        // naming one applies, a permit naming only one grants nothing.
        let mut by_identifier = consent("a", "patient-privacy", "deny", None);
        by_identifier["provision"]["actor"] =
            json!([{"role": {"text": "x"}, "reference": {"identifier": {"value": "123"}}}]);
        assert!(
            permitted_patients(&[permit.clone(), by_identifier], &care("Practitioner/1"))
                .is_empty()
        );
        let elsewhere = consent(
            "a",
            "patient-privacy",
            "permit",
            Some("https://other.example/fhir/Practitioner/1"),
        );
        assert!(permitted_patients(&[elsewhere], &care("Practitioner/1")).is_empty());
    }

    #[test]
    fn permits_restricted_beyond_the_rule_grant_nothing() {
        let restrictions = [
            ("class", json!([{"code": "Observation"}])),
            ("code", json!([{"coding": [{"code": "1234-5"}]}])),
            (
                "data",
                json!([{"meaning": "instance", "reference": {"reference": "Observation/1"}}]),
            ),
            ("dataPeriod", json!({"start": "2020-01-01"})),
            ("securityLabel", json!([{"code": "N"}])),
            ("action", json!([{"coding": [{"code": "collect"}]}])),
        ];
        for (key, value) in restrictions {
            let mut narrow = consent("a", "patient-privacy", "permit", None);
            narrow["provision"][key] = value.clone();
            assert!(
                permitted_patients(std::slice::from_ref(&narrow), &care("Practitioner/1"))
                    .is_empty(),
                "{key}"
            );
            // The same restriction on a deny denies whole.
            let mut deny = consent("a", "patient-privacy", "deny", None);
            deny["provision"][key] = value;
            let permit = consent("a", "patient-privacy", "permit", None);
            assert!(
                permitted_patients(&[permit, deny], &care("Practitioner/1")).is_empty(),
                "{key}"
            );
        }
        let mut access = consent("a", "patient-privacy", "permit", None);
        access["provision"]["action"] = json!([{"coding": [{"code": "access"}]}]);
        assert_eq!(
            permitted_patients(&[access], &care("Practitioner/1")),
            BTreeSet::from(["a".to_owned()])
        );
    }
}
