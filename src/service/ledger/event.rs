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
        }
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
    };
    if patients.len() <= 1 {
        let resources = event.resources.iter().map(|r| r.resource.clone()).collect();
        let mut only = entry(resources, patients.first());
        only.withheld = event.withheld;
        return vec![only];
    }
    let shared = event
        .resources
        .iter()
        .filter(|r| r.patients.is_empty())
        .map(|r| r.resource.clone())
        .collect();
    let mut lead = entry(shared, None);
    lead.withheld = event.withheld;
    let mut parts: Vec<LedgerEntry> = patients
        .iter()
        .map(|patient| {
            // A patient's part names the resources in their compartment and, when the event
            // concerns them (a refusal naming whose record it protected, a `$everything` of
            // theirs), those in no compartment it named too (what a refusal was asked for):
            // each patient sees what was attempted on their record.
            let concerned = event.concerns.contains(patient);
            let theirs = event
                .resources
                .iter()
                .filter(|r| r.patients.contains(patient) || (concerned && r.patients.is_empty()))
                .map(|r| r.resource.clone())
                .collect();
            let mut part = entry(theirs, Some(patient));
            part.part_of = Some(lead.id.clone());
            part
        })
        .collect();
    lead.parts = parts.iter().map(|part| part.id.clone()).collect();
    let mut all = vec![lead];
    all.append(&mut parts);
    all
}
