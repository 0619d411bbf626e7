//! What an interaction becomes in the ledger: the event a use case describes (who did what
//! to which resources, allowed or refused, and whose records they are in) and the entries
//! it is recorded as, one per patient whose record it touched plus a lead.

use std::collections::BTreeSet;

use crate::access::RequestContext;
use crate::ledger::Action;
use crate::ledger::entry::{ENTRY_VERSION, EntryResource, LedgerEntry, Outcome};

/// A resource an interaction disclosed or changed, with the patients whose compartments
/// hold it (by the one compartment rule).
#[derive(Debug, Clone)]
pub struct Touched {
    pub resource: EntryResource,
    /// Patient ids; empty for shared reference data or a resource in no compartment.
    pub patients: BTreeSet<String>,
}

/// What happened, to be recorded.
///
/// An event that touches one patient's record at most becomes one entry naming that patient.
/// An event that touches several patients' records (a search or history page across
/// patients) becomes one entry per patient, each naming only that patient's resources and
/// pointing at a lead entry (`partOf`), plus the lead entry itself, which names no patient,
/// lists its parts' receipts (`parts`) and holds the shared resources and the `withheld`
/// count. Each patient's view shows the entry about them and nothing of the others.
#[derive(Debug, Clone)]
pub struct LedgerEvent {
    pub action: Action,
    pub outcome: Outcome,
    pub reason: Option<&'static str>,
    /// The access rule that decided, when one did.
    pub rule: Option<&'static str>,
    /// Resources matched but withheld from the token (searches, histories).
    pub withheld: Option<u64>,
    pub resources: Vec<Touched>,
    /// Patients (ids) the event concerns besides its resources' compartments: the
    /// compartments a refusal was decided on, the patient whose account was viewed.
    pub concerns: BTreeSet<String>,
    /// How many requests an aggregated entry stands for (unauthenticated refusals).
    pub count: Option<u64>,
    /// The client address an aggregated entry counts requests from.
    pub source: Option<String>,
    /// The receipt of the (lead) entry, when it was handed out before the entry was
    /// written (aggregated refusals).
    pub receipt: Option<String>,
    /// The id of the key a key-custody event concerns.
    pub key: Option<String>,
}

impl LedgerEvent {
    pub fn permit(action: Action) -> Self {
        Self::new(action, Outcome::Permit, None)
    }

    pub fn deny(action: Action, reason: &'static str) -> Self {
        Self::new(action, Outcome::Deny, Some(reason))
    }

    fn new(action: Action, outcome: Outcome, reason: Option<&'static str>) -> Self {
        Self {
            action,
            outcome,
            reason,
            rule: None,
            withheld: None,
            resources: Vec::new(),
            concerns: BTreeSet::new(),
            count: None,
            source: None,
            receipt: None,
            key: None,
        }
    }

    /// Names the key (by id) a key-custody event concerns.
    pub fn about_key(mut self, key_id: impl Into<String>) -> Self {
        self.key = Some(key_id.into());
        self
    }

    /// Names a resource, in the compartments of `patients` (`None`: a type outside them).
    pub fn touching(mut self, resource: EntryResource, patients: Option<BTreeSet<String>>) -> Self {
        self.touch(resource, patients);
        self
    }

    /// [`Self::touching`], in place.
    pub fn touch(&mut self, resource: EntryResource, patients: Option<BTreeSet<String>>) {
        self.resources.push(Touched {
            resource,
            patients: patients.unwrap_or_default(),
        });
    }

    /// Names resources without placing them in any compartment (what was asked for by a
    /// refused request, before anything was read).
    pub fn naming(mut self, resources: Vec<EntryResource>) -> Self {
        self.resources
            .extend(resources.into_iter().map(|resource| Touched {
                resource,
                patients: BTreeSet::new(),
            }));
        self
    }

    /// Adds patients (ids) the event concerns besides its resources' compartments.
    pub fn concerning(mut self, patients: impl IntoIterator<Item = String>) -> Self {
        self.concerns.extend(patients);
        self
    }

    /// Names the access rule that decided.
    pub fn decided_by(mut self, rule: &'static str) -> Self {
        self.rule = Some(rule);
        self
    }

    /// Records how many matches were withheld from the token (none: nothing recorded).
    pub fn withholding(mut self, withheld: u64) -> Self {
        self.withheld = (withheld > 0).then_some(withheld);
        self
    }

    /// Every patient the event touches or concerns.
    fn patients(&self) -> BTreeSet<&str> {
        self.concerns
            .iter()
            .chain(self.resources.iter().flat_map(|r| &r.patients))
            .map(String::as_str)
            .collect()
    }
}

/// Most resources one entry names. An event's resources beyond it go into continuation
/// entries (`partOf` the lead, naming the same patient), so that an entry stays well within
/// the 64 KiB an entry of a C2SP entry bundle may have (a resource is at most ~250 bytes).
pub const MAX_ENTRY_RESOURCES: usize = 100;
/// Most receipts one entry lists in `parts`; the receipts the lead cannot list are listed by
/// entries that are `partOf` it and name no patient and no resource.
pub const MAX_ENTRY_PARTS: usize = 500;

/// The entries of an event, lead first (see [`LedgerEvent`]), timed `time`.
pub(super) fn entries_of(ctx: &RequestContext, event: LedgerEvent, time: &str) -> Vec<LedgerEntry> {
    let patients: Vec<String> = event.patients().into_iter().map(str::to_owned).collect();
    let mut receipt = event.receipt.clone();
    let mut entry = |resources: Vec<EntryResource>, patient: Option<&String>| LedgerEntry {
        v: ENTRY_VERSION,
        // The first entry made is the lead.
        id: receipt
            .take()
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
        time: time.to_owned(),
        actor: ctx.principal.ledger_actor(),
        action: event.action.as_str().to_owned(),
        outcome: event.outcome,
        reason: event.reason.map(str::to_owned),
        rule: event.rule.or_else(|| ctx.rule.get()).map(str::to_owned),
        withheld: None,
        resources,
        patient: patient.map(|p| format!("Patient/{p}")),
        patients: Vec::new(),
        parts: Vec::new(),
        part_of: None,
        count: event.count,
        source: event.source.clone(),
        request: ctx.request_id.clone(),
        key: event.key.clone(),
    };
    // The lead: about the one patient there is, or about none when there are several, in
    // which case it holds the resources in no compartment and each patient gets parts.
    let one_patient = patients.len() <= 1;
    let lead_resources: Vec<EntryResource> = event
        .resources
        .iter()
        .filter(|r| one_patient || r.patients.is_empty())
        .map(|r| r.resource.clone())
        .collect();
    let lead_patient = if one_patient { patients.first() } else { None };
    let mut chunks = lead_resources.chunks(MAX_ENTRY_RESOURCES);
    let mut lead = entry(chunks.next().unwrap_or_default().to_vec(), lead_patient);
    lead.withheld = event.withheld;
    let mut parts: Vec<LedgerEntry> = chunks
        .map(|chunk| entry(chunk.to_vec(), lead_patient))
        .collect();
    if !one_patient {
        for patient in &patients {
            // A patient's part names the resources in their compartment and, when the event
            // concerns them (a refusal naming whose record it protected, a `$everything` of
            // theirs), those in no compartment it named too (what a refusal was asked for):
            // each patient sees what was attempted on their record.
            let concerned = event.concerns.contains(patient);
            let theirs: Vec<EntryResource> = event
                .resources
                .iter()
                .filter(|r| r.patients.contains(patient) || (concerned && r.patients.is_empty()))
                .map(|r| r.resource.clone())
                .collect();
            if theirs.is_empty() {
                parts.push(entry(Vec::new(), Some(patient)));
            }
            for chunk in theirs.chunks(MAX_ENTRY_RESOURCES) {
                parts.push(entry(chunk.to_vec(), Some(patient)));
            }
        }
    }
    if parts.is_empty() {
        return vec![lead];
    }
    let receipts: Vec<String> = parts.iter().map(|part| part.id.clone()).collect();
    let mut listed = receipts.chunks(MAX_ENTRY_PARTS);
    lead.parts = listed.next().unwrap_or_default().to_vec();
    for more in listed {
        let mut lists = entry(Vec::new(), None);
        lists.parts = more.to_vec();
        parts.push(lists);
    }
    for part in &mut parts {
        part.part_of = Some(lead.id.clone());
    }
    let mut all = vec![lead];
    all.append(&mut parts);
    all
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail by panicking")]

    use super::*;
    use crate::ledger::LedgerKey;

    fn observation(n: usize) -> EntryResource {
        EntryResource {
            resource_type: "Observation".into(),
            // The longest id FHIR allows, so the sizes below are the worst case.
            id: format!("{n:0>64}"),
            version_id: Some("12345678901234567890".into()),
            content_hash: Some("f".repeat(64)),
        }
    }

    /// The entries of `event`, each signed as the ledger stores it; checks that every one
    /// fits an entry bundle's 16-bit length.
    fn signed_entries(event: LedgerEvent) -> Vec<LedgerEntry> {
        let ctx = RequestContext::internal("test");
        let key = LedgerKey::generate("test.example/ledger").unwrap();
        let entries = entries_of(&ctx, event, "2026-12-02T00:00:00.000000Z");
        for entry in &entries {
            let signed = entry.clone().sign(&key).unwrap();
            assert!(
                signed.leaf_data.len() < 60 * 1024,
                "{} bytes",
                signed.leaf_data.len()
            );
        }
        entries
    }

    #[test]
    fn one_patients_many_resources_continue_in_entries_part_of_the_lead() {
        let mut event = LedgerEvent::permit(Action::Export);
        for n in 0..(2 * MAX_ENTRY_RESOURCES + 1) {
            event.touch(observation(n), Some(BTreeSet::from(["p1".to_owned()])));
        }
        let entries = signed_entries(event);
        assert_eq!(entries.len(), 3);
        let lead = &entries[0];
        assert_eq!(lead.resources.len(), MAX_ENTRY_RESOURCES);
        assert_eq!(lead.parts, [entries[1].id.clone(), entries[2].id.clone()]);
        for part in &entries[1..] {
            assert_eq!(part.part_of.as_ref(), Some(&lead.id));
            assert_eq!(part.patient.as_deref(), Some("Patient/p1"));
        }
        let named: usize = entries.iter().map(|e| e.resources.len()).sum();
        assert_eq!(named, 2 * MAX_ENTRY_RESOURCES + 1);
    }

    #[test]
    fn a_small_event_stays_one_entry() {
        let event = LedgerEvent::permit(Action::Read)
            .touching(observation(1), Some(BTreeSet::from(["p1".to_owned()])));
        let entries = signed_entries(event);
        assert_eq!(entries.len(), 1);
        assert!(entries[0].parts.is_empty() && entries[0].part_of.is_none());
    }

    #[test]
    fn parts_the_lead_cannot_list_are_listed_by_entries_part_of_it() {
        let patients = MAX_ENTRY_PARTS + 10;
        let mut event = LedgerEvent::permit(Action::Search);
        for n in 0..patients {
            event.touch(observation(n), Some(BTreeSet::from([format!("p{n}")])));
        }
        // The largest lead there can be: a full page of shared resources and of parts.
        for n in 0..MAX_ENTRY_RESOURCES {
            event.touch(observation(patients + n), None);
        }
        let entries = signed_entries(event);
        let lead = &entries[0];
        assert_eq!(lead.resources.len(), MAX_ENTRY_RESOURCES);
        let about_patients: Vec<&LedgerEntry> =
            entries.iter().filter(|e| e.patient.is_some()).collect();
        assert_eq!(about_patients.len(), patients);
        let lists: Vec<&LedgerEntry> = entries[1..]
            .iter()
            .filter(|e| e.patient.is_none())
            .collect();
        assert_eq!(lists.len(), 1);
        assert!(lists[0].resources.is_empty());
        // Every part is listed exactly once, by the lead or by an entry part of it.
        let mut listed: Vec<&String> = lead.parts.iter().chain(&lists[0].parts).collect();
        listed.sort();
        let mut expected: Vec<&String> = about_patients.iter().map(|e| &e.id).collect();
        expected.sort();
        assert_eq!(listed, expected);
        assert!(
            entries[1..]
                .iter()
                .all(|e| e.part_of.as_ref() == Some(&lead.id))
        );
    }
}
