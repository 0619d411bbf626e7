//! The access gate: every evaluation over stored data passes here first. It asks the policy
//! ([`crate::access::policy`]) whether the request may do an interaction on a type, ledgers
//! each refusal, resolves a confined grant to the patients it opens (a patient's app: its own
//! compartment; a clinician or a research client: the compartments whose Consents permit
//! it), and applies the answer before anything is evaluated:
//!
//! - searches, outer and inner (chains, `_has`), conditional matches and conditional
//!   references: each type needs the search permission, and a confined type gets the
//!   compartment as a condition the database evaluates, so a guess about another patient's
//!   record matches nothing whether it is right or wrong ([`AuthorizedSearch`]);
//! - reads and writes of one resource: the resource (for a write, the version it replaces,
//!   or the last one before a deletion) must be inside before anything else about it is told:
//!   its `If-Match` version, a PATCH's tests, its content;
//! - what comes along (includes, histories, `$everything`): withheld when the token may not
//!   see it.
//!
//! Membership is decided by the one compartment rule ([`crate::fhir::compartment`]).

use crate::fhir::document::VersionId;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::access::consent::{ConsentKind, ConsentRequest, permitted_patients};
use crate::access::policy::{self, Confinement, Grant, Refusal};
use crate::access::{Permission, Principal, RequestContext};
use crate::error::AppError;
use crate::fhir::search_query::{
    Criterion, Handling, MAX_INNER_MATCHES, SearchRequest, TotalMode, parse_search,
};
use crate::fhir::{ResourceId, ResourceType};
use crate::indexer::{ReferenceTarget, SearchIndex};
use crate::ledger::Action;
use crate::ledger::EntryResource;
use crate::store::DbConnection;
use crate::store::resources::{self as rows, ResourceHead};

use super::base::{ResourceService, StoredResource, target};
use super::ledger::LedgerEvent;

/// Most patients a Consent-confined search may span: their compartments become one
/// condition of the search. Beyond it the search is refused (reads and writes are decided
/// per patient and have no such bound).
pub const MAX_CONSENTED_PATIENTS: usize = 10_000;
/// Most reference digests a compartment condition may hold (patients × compartment
/// parameters of the searched types): each is a bound value of one statement.
const MAX_CONFINEMENT_DIGESTS: usize = 20_000;
/// Most Consents read to decide one patient's (a patient has a handful).
const MAX_CONSENTS_PER_PATIENT: i64 = 1_000;
/// Patients whose Consents are read per query when a search's set is resolved.
const CONSENT_BATCH: usize = 200;

/// A search the gate authorized for a request: every type it evaluates, outer and inner,
/// was permitted, and each confined one carries its compartment condition. Only the gate
/// makes these, so a search cannot be evaluated without passing it.
#[derive(Debug, Clone)]
pub struct AuthorizedSearch {
    request: SearchRequest,
    /// The patients each inner search's type is confined to (`None`: unconfined).
    inner: BTreeMap<String, Option<Vec<String>>>,
    /// A search the server makes for itself, on no client's behalf.
    internal: bool,
}

impl AuthorizedSearch {
    pub fn request(&self) -> &SearchRequest {
        &self.request
    }

    pub fn into_request(self) -> SearchRequest {
        self.request
    }

    /// The same search from the page `cursor` names (the gate's decision does not depend
    /// on the page).
    pub(super) fn at_cursor(mut self, cursor: Option<String>) -> Self {
        self.request.cursor = cursor;
        self
    }

    /// The same search confined further to the compartments of `patients` (a Group's
    /// members, a bulk export's `patient` parameter): never wider than the gate allowed.
    pub(super) fn narrowed_to(mut self, patients: &[String]) -> Self {
        let narrowed = match self.request.compartments.take() {
            None => patients.to_vec(),
            Some(allowed) => {
                let wanted: std::collections::HashSet<&String> = patients.iter().collect();
                allowed
                    .into_iter()
                    .filter(|patient| wanted.contains(patient))
                    .collect()
            }
        };
        self.request.compartments = Some(narrowed);
        self
    }

    /// A search the server makes for itself (the Consents a confinement depends on, the
    /// `:missing` migration), not on behalf of a client: unconfined.
    pub(super) fn server_internal(request: SearchRequest) -> Self {
        Self {
            request,
            inner: BTreeMap::new(),
            internal: true,
        }
    }

    /// The search a chain or `_has` makes over `resource_type` for `criterion`, confined as
    /// the gate decided. A type the gate did not authorize fails closed.
    pub(super) fn inner_search(
        &self,
        resource_type: &str,
        criterion: &Criterion,
    ) -> Result<AuthorizedSearch, AppError> {
        let compartments = match self.inner.get(resource_type) {
            Some(scope) => scope.clone(),
            None if self.internal => None,
            None => {
                return Err(AppError::Internal(format!(
                    "an inner search over {resource_type} was not authorized"
                )));
            }
        };
        let request = SearchRequest {
            criteria: vec![criterion.clone()],
            count: usize::try_from(MAX_INNER_MATCHES).unwrap_or(1000),
            total: TotalMode::None,
            compartments,
            ..SearchRequest::over(vec![resource_type.to_owned()])
        };
        Ok(Self {
            request,
            inner: BTreeMap::new(),
            internal: self.internal,
        })
    }
}

/// The types the chains and `_has` of `criteria` search.
fn inner_types(criteria: &[Criterion]) -> BTreeSet<String> {
    let mut types = BTreeSet::new();
    for criterion in criteria {
        match criterion {
            Criterion::Chain { target_types, .. } => types.extend(target_types.iter().cloned()),
            Criterion::Has { source_type, .. } => {
                types.insert(source_type.clone());
            }
            Criterion::Filter(_) | Criterion::Id(_) | Criterion::LastUpdated(_) => {}
        }
    }
    types
}

/// Keeps the items `keep` admits; returns how many were withheld, for the ledger entry.
pub(super) fn withhold<T>(items: &mut Vec<T>, keep: impl FnMut(&T) -> bool) -> u64 {
    let before = items.len();
    items.retain(keep);
    (before - items.len()) as u64
}

/// The refusal of a resource outside a confined grant, naming the compartments (patient
/// ids) it involved so that the refusal is in those patients' views.
fn outside(confinement: &Confinement, patients: &BTreeSet<String>) -> AppError {
    let refusal = confinement.refusal();
    AppError::Forbidden {
        rule: refusal.rule,
        message: refusal.message,
        patients: patients.iter().map(|p| format!("Patient/{p}")).collect(),
    }
}

impl ResourceService {
    /// Asks the access policy whether the request may do `permission` on `resource_type`,
    /// before anything is read. A refusal is ledgered under `action`, naming `resources`
    /// (what was asked for, never content), and returned as 403; a permit's rule is named
    /// by the request's ledger entries.
    pub(crate) fn authorize(
        &self,
        ctx: &RequestContext,
        permission: Permission,
        resource_type: &str,
        action: Action,
        resources: Vec<EntryResource>,
    ) -> Result<Grant, AppError> {
        match policy::authorize(&ctx.principal, permission, resource_type) {
            Ok(grant) => {
                ctx.rule.set(grant.rule);
                Ok(grant)
            }
            Err(refusal) => Err(self.ledger().refuse(ctx, action, resources, refusal)),
        }
    }

    /// [`Self::authorize`] for an interaction on one resource (version), which a refusal
    /// names.
    pub(super) fn authorize_instance(
        &self,
        ctx: &RequestContext,
        permission: Permission,
        resource_type: &ResourceType,
        id: &ResourceId,
        version_id: Option<VersionId>,
        action: Action,
    ) -> Result<Grant, AppError> {
        let asked = vec![target(resource_type, id, version_id)];
        self.authorize(ctx, permission, resource_type.as_str(), action, asked)
    }

    /// [`Self::authorize_instance`] for the interactions by id through which a confined
    /// token reaches the Subscriptions it wrote (see [`Self::subscriber_may`]); `id` is
    /// `None` for a create. A permit for that reason has rule `subscription-owner` and no
    /// confinement; for other types and tokens this is `authorize_instance`.
    pub(super) fn authorize_subscriber(
        &self,
        ctx: &RequestContext,
        permission: Permission,
        resource_type: &ResourceType,
        id: Option<&ResourceId>,
        action: Action,
    ) -> Result<Grant, AppError> {
        let type_name = resource_type.as_str();
        if type_name == "Subscription"
            && let Err(refusal) = policy::authorize(&ctx.principal, permission, type_name)
            && self.subscriber_may(
                &mut *self.connection()?,
                ctx,
                permission,
                type_name,
                id,
                &refusal,
            )?
        {
            ctx.rule.set(policy::RULE_SUBSCRIPTION_OWNER);
            return Ok(Grant {
                rule: policy::RULE_SUBSCRIPTION_OWNER,
                confinement: None,
            });
        }
        // Everything else, a refusal included, as for any type (the connection above is
        // given back before a refusal is ledgered, which may need one).
        let asked = id.map(|id| target(resource_type, id, None));
        self.authorize(
            ctx,
            permission,
            type_name,
            action,
            asked.into_iter().collect(),
        )
    }

    /// Whether a token confined to its launch patient's compartment, which the policy refused
    /// a Subscription (`subscription-unconfined`), may have it anyway as its writer: it may
    /// create one (`id` absent; the criteria are authorized as its own search, and the
    /// endpoint checked, when the content is admitted), and read, change or delete one that
    /// exists and whose sealed writer is this token. Everything else of Subscriptions
    /// (searches, histories, versions, includes, others' Subscriptions) stays refused.
    /// `conn`: where the writer is read (a write's transaction, so that the answer holds for
    /// what it replaces).
    pub(super) fn subscriber_may(
        &self,
        conn: &mut DbConnection,
        ctx: &RequestContext,
        permission: Permission,
        resource_type: &str,
        id: Option<&ResourceId>,
        refusal: &Refusal,
    ) -> Result<bool, AppError> {
        if resource_type != "Subscription" || refusal.rule != policy::RULE_SUBSCRIPTION_UNCONFINED {
            return Ok(false);
        }
        // A patient's own app only: a clinician's or researcher's grant under Consent would
        // have its criteria confined by a Consent search inside the write's transaction.
        let scopes = policy::authorize_scopes(&ctx.principal, permission, resource_type);
        if !matches!(
            scopes,
            Ok(Grant {
                confinement: Some(Confinement::Patient(_)),
                ..
            })
        ) {
            return Ok(false);
        }
        match (permission, id) {
            (Permission::Create, None) => Ok(true),
            (Permission::Read | Permission::Update | Permission::Delete, Some(id)) => {
                self.wrote_subscription(conn, ctx, id)
            }
            _ => Ok(false),
        }
    }

    /// Whether the Subscription `id` is registered with the request's token as its writer:
    /// the same issuer, subject, client and launch patient (another app of the same user
    /// does not hold the first one's endpoint secret, nor does the same app launched for
    /// another patient see whose record the first subscription watches).
    pub(super) fn wrote_subscription(
        &self,
        conn: &mut DbConnection,
        ctx: &RequestContext,
        id: &ResourceId,
    ) -> Result<bool, AppError> {
        let Principal::Token(identity) = &ctx.principal else {
            return Ok(false);
        };
        let Some(row) = crate::store::subscriptions::subscription(conn, id.as_str())? else {
            return Ok(false);
        };
        Ok(self.subscription_writer(&row)?.is_some_and(|writer| {
            writer.issuer == identity.issuer
                && writer.subject == identity.subject
                && writer.client_id == identity.client_id
                && writer.patient == identity.patient
        }))
    }

    /// Authorizes one line of a bulk import, which creates or updates `Type/id` as a `PUT`
    /// does: the token needs both permissions on the type, unconfined. A grant confined to a
    /// patient's compartment or to consenting patients is refused: it writes through the
    /// REST API, where each write is checked against it. A refusal is ledgered naming the
    /// line's resource.
    pub(super) fn authorize_imported(
        &self,
        ctx: &RequestContext,
        resource_type: &ResourceType,
        id: &ResourceId,
    ) -> Result<(), AppError> {
        for (permission, action) in [
            (Permission::Create, Action::Create),
            (Permission::Update, Action::Update),
        ] {
            let grant =
                self.authorize_instance(ctx, permission, resource_type, id, None, action)?;
            if grant.confinement.is_some() {
                let refusal = Refusal {
                    rule: policy::RULE_BULK_IMPORT,
                    message: "bulk import needs a system/ scope that no purpose of use confines; \
                              write through the REST API instead"
                        .into(),
                };
                let asked = vec![target(resource_type, id, None)];
                return Err(self.ledger().refuse(ctx, action, asked, refusal));
            }
        }
        Ok(())
    }

    /// Authorizes a search and every search inside it: each type it searches, and each
    /// type a chain or `_has` searches, needs the search permission (refusals are ledgered
    /// under `action`); a confined type gets its compartment condition. A search across
    /// every type, or one mixing types that cannot share one condition, is refused when
    /// confined.
    pub(crate) fn authorize_search(
        &self,
        ctx: &RequestContext,
        mut request: SearchRequest,
        action: Action,
    ) -> Result<AuthorizedSearch, AppError> {
        let all = ["*".to_owned()];
        let types = if request.resource_types.is_empty() {
            &all[..]
        } else {
            &request.resource_types[..]
        };
        // One confined type confines the whole search, and types confined differently
        // (a patient/ scope on one, a Consent on another) to the patients both open.
        let mut scope: Option<Vec<String>> = None;
        for resource_type in types {
            let grant =
                self.authorize(ctx, Permission::Search, resource_type, action, Vec::new())?;
            if let Some(patients) = self.search_scope(ctx, &grant, action)? {
                scope = Some(match scope {
                    None => patients,
                    Some(before) => before
                        .into_iter()
                        .filter(|p| patients.contains(p))
                        .collect(),
                });
            }
        }
        let outer_rule = ctx.rule.get();
        if let Some(patients) = scope {
            self.check_confinable(ctx, &request.resource_types, action, patients.len())?;
            request.compartments = Some(patients);
        }
        let mut inner = BTreeMap::new();
        for resource_type in inner_types(&request.criteria) {
            let grant =
                self.authorize(ctx, Permission::Search, &resource_type, action, Vec::new())?;
            let scope = self.search_scope(ctx, &grant, action)?;
            if let Some(patients) = &scope {
                let types = std::slice::from_ref(&resource_type);
                self.check_confinable(ctx, types, action, patients.len())?;
            }
            inner.insert(resource_type, scope);
        }
        // Resources a `_revinclude` brings are looked for only where the token may see them:
        // were they looked for everywhere and withheld after, how many of another patient's
        // fill the page's room would show.
        let revinclude_types: BTreeSet<String> = request
            .revincludes
            .iter()
            .map(|include| include.source_type.clone())
            .collect();
        for resource_type in revinclude_types {
            let Ok(grant) = policy::authorize(&ctx.principal, Permission::Search, &resource_type)
            else {
                continue;
            };
            let scope = self.search_scope(ctx, &grant, action)?;
            if let Some(patients) = &scope {
                let types = std::slice::from_ref(&resource_type);
                self.check_confinable(ctx, types, action, patients.len())?;
            }
            request.revinclude_compartments.insert(resource_type, scope);
        }
        // The entry names the rule that let the request search what it asked for.
        if let Some(rule) = outer_rule {
            ctx.rule.set(rule);
        }
        Ok(AuthorizedSearch {
            request,
            inner,
            internal: false,
        })
    }

    /// Type and system history page through every version in storage order, and old
    /// versions are not in the search index, so a confined grant's history could only be
    /// filtered after the page is read: a page's size and its paging cursor would then tell
    /// of other patients' versions. A confined grant therefore gets the history of shared
    /// reference data only; other patients' records are refused (instance history and
    /// search remain).
    pub(super) fn confine_history(
        &self,
        ctx: &RequestContext,
        confinement: Option<&Confinement>,
        searched: &str,
    ) -> Result<(), AppError> {
        let Some(confinement) = confinement else {
            return Ok(());
        };
        if searched != "*" && !self.search_index().has_compartments(searched) {
            return Ok(());
        }
        let refusal = Refusal {
            rule: confinement.refusal().rule,
            message:
                "a token confined to patients' compartments cannot page through the history of \
                      a type or of the system; read an instance's history or search instead"
                    .into(),
        };
        Err(self
            .ledger()
            .refuse(ctx, Action::History, Vec::new(), refusal))
    }

    /// A confined search over `resource_types` must be expressible as one compartment
    /// condition over `patients` patients, of a size the databases take; if not, the
    /// refusal is ledgered.
    pub(super) fn check_confinable(
        &self,
        ctx: &RequestContext,
        resource_types: &[String],
        action: Action,
        patients: usize,
    ) -> Result<(), AppError> {
        let index = self.search_index();
        let refusal = match confinable(index, resource_types) {
            Err(refusal) => refusal,
            Ok(_)
                if index.compartment_digests(resource_types, patients)
                    > MAX_CONFINEMENT_DIGESTS =>
            {
                Refusal {
                    rule: policy::RULE_CONSENT,
                    message: format!(
                        "the {patients} patients whose records this requester may open are too many to \
                         search these types at once; search fewer types, or read by id"
                    ),
                }
            }
            Ok(_) => return Ok(()),
        };
        Err(self.ledger().refuse(ctx, action, Vec::new(), refusal))
    }

    /// The patients a confined grant's searches are confined to (`None`: unconfined).
    /// Resolved once per request and kept in its context.
    fn search_scope(
        &self,
        ctx: &RequestContext,
        grant: &Grant,
        action: Action,
    ) -> Result<Option<Vec<String>>, AppError> {
        let Some(confinement) = &grant.confinement else {
            return Ok(None);
        };
        if let Some((resolved_for, patients)) = ctx.confined.get()
            && resolved_for == *confinement
        {
            return Ok(Some(patients.iter().cloned().collect()));
        }
        let patients = match confinement {
            Confinement::Patient(patient) => BTreeSet::from([patient.clone()]),
            Confinement::Treatment { .. } | Confinement::Research { .. } => {
                match self.consenting_patients(ctx, confinement)? {
                    Some(patients) => patients,
                    None => {
                        let refusal = Refusal {
                            rule: policy::RULE_CONSENT,
                            message: format!(
                                "Consents open more than {MAX_CONSENTED_PATIENTS} patients' records to this \
                                 requester, too many to search at once; read the resources by id"
                            ),
                        };
                        return Err(self.ledger().refuse(ctx, action, Vec::new(), refusal));
                    }
                }
            }
        };
        let patients = Arc::new(patients);
        ctx.confined.set((confinement.clone(), patients.clone()));
        Ok(Some(patients.iter().cloned().collect()))
    }

    /// Whether a confined grant opens `patient`'s compartment. A patient's app opens its
    /// own; a Consent-confined grant the compartments whose Consents permit it, decided
    /// from that patient's Consents alone (found by the index, remembered for the request).
    pub(crate) fn opens(
        &self,
        conn: Option<&mut DbConnection>,
        ctx: &RequestContext,
        confinement: &Confinement,
        patient: &str,
    ) -> Result<bool, AppError> {
        let (kind, actor) = match confinement {
            Confinement::Patient(own) => return Ok(own == patient),
            Confinement::Treatment { actor } => (ConsentKind::Treatment, Some(actor.as_str())),
            Confinement::Research { actor } => (ConsentKind::Research, actor.as_deref()),
        };
        let key = (confinement.clone(), patient.to_owned());
        if let Some(decided) = ctx.consents.get(&key) {
            return Ok(decided);
        }
        let patients = [patient.to_owned()];
        let consents = match conn {
            Some(conn) => self.consents_of(conn, &patients)?,
            None => self.consents_of(&mut *self.connection()?, &patients)?,
        };
        let local = self.local_reference();
        let request = consent_request(ctx, kind, actor, &local);
        let opens = permitted_patients(&consents, &request).contains(patient);
        ctx.consents.insert(key, opens);
        Ok(opens)
    }

    /// The `Type/id` a reference names on this server, as the search index reads it.
    fn local_reference(&self) -> impl Fn(&str) -> Option<String> + '_ {
        let index = self.search_index();
        move |reference| match index.reference_target(reference) {
            ReferenceTarget::Local { resource_type, id } => Some(format!("{resource_type}/{id}")),
            _ => None,
        }
    }

    /// Whether a confined grant opens every one of `members` (and there is one).
    fn opens_all(
        &self,
        mut conn: Option<&mut DbConnection>,
        ctx: &RequestContext,
        confinement: &Confinement,
        members: &BTreeSet<String>,
    ) -> Result<bool, AppError> {
        if members.is_empty() {
            return Ok(false);
        }
        for patient in members {
            if !self.opens(conn.as_deref_mut(), ctx, confinement, patient)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Whether a confined grant opens any of `members` (a resource's compartments).
    fn opens_any(
        &self,
        mut conn: Option<&mut DbConnection>,
        ctx: &RequestContext,
        confinement: &Confinement,
        members: &BTreeSet<String>,
    ) -> Result<bool, AppError> {
        for patient in members {
            if self.opens(conn.as_deref_mut(), ctx, confinement, patient)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The patients whose Consents permit a Consent-confined grant, for its searches; `None`
    /// when more than [`MAX_CONSENTED_PATIENTS`]. Candidates come from the index (Consents
    /// naming the requester, and Consents naming no actor); each candidate's Consents are
    /// then read whole, so a deny the candidate query did not find still wins.
    fn consenting_patients(
        &self,
        ctx: &RequestContext,
        confinement: &Confinement,
    ) -> Result<Option<BTreeSet<String>>, AppError> {
        let (kind, actor) = match confinement {
            Confinement::Patient(patient) => return Ok(Some(BTreeSet::from([patient.clone()]))),
            Confinement::Treatment { actor } => (ConsentKind::Treatment, Some(actor.as_str())),
            Confinement::Research { actor } => (ConsentKind::Research, actor.as_deref()),
        };
        let scopes = match kind {
            ConsentKind::Treatment => "patient-privacy,treatment",
            ConsentKind::Research => "research",
        };
        let mut conn = self.connection()?;
        let limit = i64::try_from(MAX_CONSENTED_PATIENTS).unwrap_or(i64::MAX);
        let mut queries = vec![vec![("actor:missing", "true".to_owned())]];
        if let Some(actor) = actor {
            queries.push(vec![("actor", actor.to_owned())]);
        }
        let mut candidates = BTreeSet::new();
        for extra in queries {
            let mut query = vec![
                ("status", "active".to_owned()),
                ("scope", scopes.to_owned()),
            ];
            query.extend(extra);
            let consents = self.server_search(&mut conn, "Consent", &query, limit + 1)?;
            if consents.len() as i64 > limit {
                return Ok(None);
            }
            let local = self.local_reference();
            candidates.extend(
                consents
                    .iter()
                    .filter_map(|c| crate::access::consent::consent_patient(&c.json, &local)),
            );
        }
        if candidates.len() > MAX_CONSENTED_PATIENTS {
            return Ok(None);
        }
        let local = self.local_reference();
        let request = consent_request(ctx, kind, actor, &local);
        let candidates: Vec<String> = candidates.into_iter().collect();
        let mut permitted = BTreeSet::new();
        for batch in candidates.chunks(CONSENT_BATCH) {
            let consents = self.consents_of(&mut conn, batch)?;
            permitted.extend(permitted_patients(&consents, &request));
        }
        for patient in &permitted {
            ctx.consents
                .insert((confinement.clone(), patient.clone()), true);
        }
        Ok(Some(permitted))
    }

    /// The active Consents of `patients`, parsed.
    fn consents_of(
        &self,
        conn: &mut DbConnection,
        patients: &[String],
    ) -> Result<Vec<serde_json::Value>, AppError> {
        let references: Vec<String> = patients.iter().map(|p| format!("Patient/{p}")).collect();
        let query = [
            ("status", "active".to_owned()),
            ("patient", references.join(",")),
        ];
        let limit = MAX_CONSENTS_PER_PATIENT * patients.len() as i64;
        let consents = self.server_search(conn, "Consent", &query, limit + 1)?;
        if consents.len() as i64 > limit {
            // Deciding on part of a patient's Consents could miss a deny: refuse instead.
            return Err(AppError::Unavailable(format!(
                "a patient has more than {MAX_CONSENTS_PER_PATIENT} active Consents; \
                 access under Consent cannot be decided"
            )));
        }
        Ok(consents
            .iter()
            .filter_map(|c| serde_json::from_str(&c.json).ok())
            .collect())
    }

    /// Runs a search the server makes for itself (see [`AuthorizedSearch::server_internal`]).
    fn server_search(
        &self,
        conn: &mut DbConnection,
        resource_type: &str,
        query: &[(&str, String)],
        limit: i64,
    ) -> Result<Vec<StoredResource>, AppError> {
        let pairs: Vec<(String, String)> = query
            .iter()
            .map(|(name, value)| ((*name).to_owned(), value.clone()))
            .collect();
        let index = self.search_index();
        let request = parse_search(
            index.registry(),
            index,
            vec![resource_type.to_owned()],
            &pairs,
            Handling::Strict,
        )?;
        self.matching_in(conn, &AuthorizedSearch::server_internal(request), limit)
    }

    /// Whether the request may see a resource version it did not ask for by type and id
    /// (includes, `$everything`, histories): the token must be allowed to read its type,
    /// and a confined token sees only what is in the compartments it opens. A deletion
    /// (`json` absent) of a type that belongs to compartments cannot be placed in one, so a
    /// confined token does not see it.
    pub(crate) fn may_see(
        &self,
        conn: Option<&mut DbConnection>,
        ctx: &RequestContext,
        resource_type: &str,
        id: &str,
        json: Option<&str>,
    ) -> bool {
        let members = match json {
            Some(json) => self
                .search_index()
                .stored_compartments(resource_type, id, json),
            None => self
                .search_index()
                .has_compartments(resource_type)
                .then(BTreeSet::new),
        };
        self.visible(conn, ctx, resource_type, members.as_ref())
            .is_ok()
    }

    /// Withholds the resources the request may not see; returns how many. `conn`: the
    /// caller's transaction, if it is in one (Consents are then read in it, not on a second
    /// connection the pool may not have to spare).
    pub(crate) fn withhold_unseen(
        &self,
        mut conn: Option<&mut DbConnection>,
        ctx: &RequestContext,
        resources: &mut Vec<StoredResource>,
    ) -> u64 {
        withhold(resources, |r| {
            let (resource_type, id) = (r.resource_type.as_str(), r.id.as_str());
            self.may_see(conn.as_deref_mut(), ctx, resource_type, id, Some(&r.json))
        })
    }

    /// Whether the request may read a resource of `resource_type` in the compartments
    /// `members` (`None`: a type outside compartments, shared reference data), with the
    /// refusal when it may not.
    pub(crate) fn visible(
        &self,
        conn: Option<&mut DbConnection>,
        ctx: &RequestContext,
        resource_type: &str,
        members: Option<&BTreeSet<String>>,
    ) -> Result<(), AppError> {
        let grant = policy::authorize(&ctx.principal, Permission::Read, resource_type)?;
        let Some(confinement) = &grant.confinement else {
            return Ok(());
        };
        match members {
            None => Ok(()),
            Some(members) if self.opens_any(conn, ctx, confinement, members)? => Ok(()),
            Some(members) => Err(outside(confinement, members)),
        }
    }

    /// A confined write's check of the resource it replaces or deletes, made before anything
    /// else about it is evaluated or told (its `If-Match` version, a PATCH's tests): the
    /// current version, or the last content before a deletion, must be inside the grant; a
    /// type outside compartments is written only by unconfined grants. Returns the
    /// compartments of that version (for the ledger entry of a deletion), read for every
    /// deletion whether confined or not.
    pub(super) fn confine_existing(
        &self,
        tx: &mut DbConnection,
        ctx: &RequestContext,
        permission: Permission,
        resource_type: &ResourceType,
        id: &ResourceId,
        head: Option<ResourceHead>,
    ) -> Result<Option<BTreeSet<String>>, AppError> {
        let grant = match policy::authorize(&ctx.principal, permission, resource_type.as_str()) {
            Ok(grant) => grant,
            Err(refusal) => {
                // A Subscription's writer: checked here, in the write's transaction.
                let existing = head.map(|_| id);
                let type_name = resource_type.as_str();
                if self.subscriber_may(tx, ctx, permission, type_name, existing, &refusal)? {
                    return Ok(None);
                }
                return Err(refusal.into());
            }
        };
        let confinement = grant.confinement.as_ref();
        let index = self.search_index();
        if confinement.is_some() && !index.has_compartments(resource_type.as_str()) {
            return Err(self.shared_write_refusal(resource_type));
        }
        let Some(head) = head else {
            return Ok(None);
        };
        if confinement.is_none() && permission != Permission::Delete {
            return Ok(None);
        }
        let members = self.last_content_members(tx, resource_type, id, head)?;
        if let Some(confinement) = confinement {
            // Changing a resource changes every record it is part of: all of them must be
            // open to the grant. One whose content cannot be read is in none.
            let Some(members) = &members else {
                return Err(outside(confinement, &BTreeSet::new()));
            };
            if !self.opens_all(Some(tx), ctx, confinement, members)? {
                return Err(outside(confinement, members));
            }
        }
        Ok(members)
    }

    /// The compartments of a resource's last content: its current version, or the one
    /// before a deletion (a tombstone names no patient). `None` when there is none to read
    /// or its type belongs to no compartment.
    fn last_content_members(
        &self,
        conn: &mut DbConnection,
        resource_type: &ResourceType,
        id: &ResourceId,
        head: ResourceHead,
    ) -> Result<Option<BTreeSet<String>>, AppError> {
        let version = if head.deleted {
            head.current_version.previous()
        } else {
            Some(head.current_version)
        };
        let Some(version) = version else {
            return Ok(None);
        };
        let Some(row) = rows::version(conn, resource_type.as_str(), id.as_str(), version)? else {
            return Ok(None);
        };
        if row.deleted {
            return Ok(None);
        }
        let content = self.open_version(resource_type, id, &row)?;
        Ok(self.search_index().stored_compartments(
            resource_type.as_str(),
            id.as_str(),
            &content.json,
        ))
    }

    /// Before an instance's history is read: a confined grant sees it only when the
    /// resource is inside its compartments, and gets the same refusal when it is outside or
    /// absent (an empty history would tell the id is taken).
    pub(super) fn confine_instance(
        &self,
        ctx: &RequestContext,
        permission: Permission,
        resource_type: &ResourceType,
        id: &ResourceId,
    ) -> Result<(), AppError> {
        let grant = policy::authorize(&ctx.principal, permission, resource_type.as_str())?;
        let Some(confinement) = &grant.confinement else {
            return Ok(());
        };
        if !self.search_index().has_compartments(resource_type.as_str()) {
            return Ok(());
        }
        let mut conn = self.connection()?;
        let members = match rows::head(&mut conn, resource_type.as_str(), id.as_str())? {
            Some(head) => self.last_content_members(&mut conn, resource_type, id, head)?,
            None => None,
        }
        .unwrap_or_default();
        if self.opens_any(Some(&mut conn), ctx, confinement, &members)? {
            return Ok(());
        }
        Err(outside(confinement, &members))
    }

    /// What a confined grant is told when a resource of a compartment type is absent (404)
    /// or deleted (410): the same refusal as for one outside its compartments (403), unless
    /// the resource is shown to be inside (a patient's own deleted record stays 410). A
    /// token then learns nothing of other patients' records, not even whether an id is
    /// taken. Other errors, unconfined grants and shared types pass unchanged.
    pub(super) fn mask_absence(
        &self,
        conn: &mut DbConnection,
        ctx: &RequestContext,
        permission: Permission,
        resource_type: &ResourceType,
        id: &ResourceId,
        error: AppError,
    ) -> AppError {
        if !matches!(error, AppError::NotFound(_) | AppError::Gone { .. }) {
            return error;
        }
        let Ok(grant) = policy::authorize(&ctx.principal, permission, resource_type.as_str())
        else {
            return error;
        };
        let Some(confinement) = &grant.confinement else {
            return error;
        };
        if !self.search_index().has_compartments(resource_type.as_str()) {
            return error;
        }
        let inside = rows::head(conn, resource_type.as_str(), id.as_str())
            .map_err(AppError::from)
            .and_then(|head| match head {
                Some(head) => self.last_content_members(conn, resource_type, id, head),
                None => Ok(None),
            })
            .and_then(|members| match members {
                Some(members) => self.opens_any(Some(conn), ctx, confinement, &members),
                None => Ok(false),
            });
        match inside {
            Ok(true) => error,
            Ok(false) => outside(confinement, &BTreeSet::new()),
            Err(failure) => failure,
        }
    }

    /// An update, patch or delete of an id that does not exist, by a confined grant on a
    /// compartment type: refused like another patient's resource, so that the answer (a
    /// create, a 412, a 404) does not tell the id is free. A confined grant creates with
    /// POST, under an id the server assigns.
    pub(super) fn confine_absent(
        &self,
        ctx: &RequestContext,
        permission: Permission,
        resource_type: &ResourceType,
    ) -> Result<(), AppError> {
        let grant = policy::authorize(&ctx.principal, permission, resource_type.as_str())?;
        match &grant.confinement {
            Some(confinement) if self.search_index().has_compartments(resource_type.as_str()) => {
                Err(outside(confinement, &BTreeSet::new()))
            }
            _ => Ok(()),
        }
    }

    /// A confined write's check of what it writes: the new content must belong to the
    /// compartments the grant opens and to no other (`existing`: the compartments of the
    /// version replaced, named by the refusal too).
    pub(super) fn confine_content(
        &self,
        tx: &mut DbConnection,
        ctx: &RequestContext,
        permission: Permission,
        resource_type: &ResourceType,
        members: Option<&BTreeSet<String>>,
        existing: Option<&BTreeSet<String>>,
    ) -> Result<(), AppError> {
        let grant = match policy::authorize(&ctx.principal, permission, resource_type.as_str()) {
            Ok(grant) => grant,
            // A Subscription by its writer, whom `confine_existing` checked before: what it
            // writes is checked by `admit_subscription`, whose criteria must be a search
            // this token may make.
            Err(refusal)
                if resource_type.as_str() == "Subscription"
                    && refusal.rule == policy::RULE_SUBSCRIPTION_UNCONFINED
                    && matches!(permission, Permission::Create | Permission::Update) =>
            {
                return Ok(());
            }
            Err(refusal) => return Err(refusal.into()),
        };
        let Some(confinement) = &grant.confinement else {
            return Ok(());
        };
        let Some(members) = members else {
            return Err(self.shared_write_refusal(resource_type));
        };
        if self.opens_all(Some(tx), ctx, confinement, members)? {
            return Ok(());
        }
        let mut involved = members.clone();
        involved.extend(existing.into_iter().flatten().cloned());
        Err(outside(confinement, &involved))
    }

    /// The refusal of a confined grant's write to a type that belongs to no compartment
    /// (shared reference data such as a Practitioner).
    fn shared_write_refusal(&self, resource_type: &ResourceType) -> AppError {
        AppError::Forbidden {
            rule: policy::RULE_COMPARTMENT,
            message: format!(
                "a token confined to patients' compartments may read {resource_type} resources \
                 (shared by every patient) but not write them"
            ),
            patients: Vec::new(),
        }
    }
}

/// Whether a search over `resource_types` can be confined to patients' compartments in
/// one condition: `Ok(true)` when it needs one, `Ok(false)` when its types belong to no
/// compartment. A search across all types, or mixing Patient or types outside
/// compartments with others, cannot and is refused.
fn confinable(index: &SearchIndex, resource_types: &[String]) -> Result<bool, Refusal> {
    let unconfinable = |why: &str| Refusal {
        rule: policy::RULE_COMPARTMENT,
        message: format!(
            "a search confined to a patient's compartment must {why}; search one type at a time"
        ),
    };
    if resource_types.is_empty() {
        return Err(unconfinable("name its types"));
    }
    let members = resource_types
        .iter()
        .filter(|t| index.has_compartments(t))
        .count();
    if members == 0 {
        return Ok(false);
    }
    if members < resource_types.len()
        || (resource_types.len() > 1 && resource_types.iter().any(|t| t == "Patient"))
    {
        return Err(unconfinable(
            "not mix types of the compartment with Patient or with types outside it",
        ));
    }
    Ok(true)
}

/// The Consent question of a request.
fn consent_request<'a>(
    ctx: &'a RequestContext,
    kind: ConsentKind,
    actor: Option<&'a str>,
    local: &'a dyn Fn(&str) -> Option<String>,
) -> ConsentRequest<'a> {
    let purpose = match &ctx.principal {
        Principal::Token(identity) => identity.purpose_of_use.as_deref(),
        _ => None,
    };
    ConsentRequest {
        kind,
        actor,
        purpose,
        now: crate::clock::now_micros(),
        local,
    }
}

impl ResourceService {
    /// Ledgers a failed request that reached a resource (not found, gone, conflicts).
    pub(super) fn record_refusal(
        &self,
        ctx: &RequestContext,
        action: Action,
        resource_type: &ResourceType,
        id: &ResourceId,
        version_id: Option<VersionId>,
        error: &AppError,
    ) -> Result<(), AppError> {
        let resources = vec![target(resource_type, id, version_id)];
        let Some(event) = refusal_event(action, error, resources) else {
            return Ok(());
        };
        self.ledger.append(ctx, event).map(|_| ())
    }
}

/// The deny entry of a failed request, when the failure is evidence of an interaction with
/// a record; a refusal by the access policy names its rule.
pub(super) fn refusal_event(
    action: Action,
    error: &AppError,
    resources: Vec<EntryResource>,
) -> Option<LedgerEvent> {
    let mut event = LedgerEvent::deny(action, refusal_reason(error)?).naming(resources);
    if let AppError::Forbidden { rule, patients, .. } = error {
        event.rule = Some(rule);
        event = event.concerning(
            patients
                .iter()
                .filter_map(|p| p.strip_prefix("Patient/"))
                .map(str::to_owned),
        );
    }
    Some(event)
}

/// The ledger reason of a refusal that reached a record, or `None` for errors that did
/// not (malformed requests, server failures), which are not ledgered.
fn refusal_reason(error: &AppError) -> Option<&'static str> {
    Some(match error {
        AppError::Forbidden { .. } => "forbidden",
        AppError::NotFound(_) => "not-found",
        AppError::Gone { .. } => "gone",
        AppError::PreconditionFailed(_) => "precondition-failed",
        AppError::Conflict(_) => "conflict",
        // A patch that failed on the stored content (e.g. a `test` op): it was evaluated
        // against the record, so the attempt is evidence too.
        AppError::Unprocessable(_) => "unprocessable",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;
    use crate::crypto::blind_index::BlindIndexKey;
    use crate::fhir::outcome::IssueCode;
    use crate::fhir::search_params::SearchParamRegistry;
    use crate::fhir::validate::ValidationError;

    fn index() -> SearchIndex {
        SearchIndex::new(
            SearchParamRegistry::load().unwrap(),
            BlindIndexKey::from_bytes([5; 32]),
            "https://ehr.example/fhir".to_owned(),
        )
    }

    fn types(names: &[&str]) -> Vec<String> {
        names.iter().map(|&t| t.to_owned()).collect()
    }

    fn search(index: &SearchIndex, resource_type: &str, query: &[(&str, &str)]) -> SearchRequest {
        let params: Vec<(String, String)> = query
            .iter()
            .map(|&(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        parse_search(
            index.registry(),
            index,
            types(&[resource_type]),
            &params,
            Handling::Strict,
        )
        .unwrap()
    }

    #[test]
    fn a_confined_search_names_types_of_one_compartment_or_none() {
        let index = index();
        assert_eq!(confinable(&index, &types(&["Observation"])), Ok(true));
        assert_eq!(confinable(&index, &types(&["Patient"])), Ok(true));
        assert_eq!(
            confinable(&index, &types(&["Observation", "Condition"])),
            Ok(true)
        );
        // Types no patient's compartment holds need no condition.
        assert_eq!(confinable(&index, &types(&["Organization"])), Ok(false));
        for unconfinable in [
            types(&[]),
            types(&["Observation", "Organization"]),
            types(&["Observation", "Patient"]),
        ] {
            let refusal = confinable(&index, &unconfinable).unwrap_err();
            assert_eq!(refusal.rule, policy::RULE_COMPARTMENT, "{unconfinable:?}");
        }
    }

    #[test]
    fn inner_searches_are_the_types_of_chains_and_has() {
        let index = index();
        let request = search(
            &index,
            "Observation",
            &[
                ("subject:Patient.family", "Smith"),
                ("_has:Provenance:target:agent", "Practitioner/p1"),
                ("code", "http://loinc.org|8867-4"),
                ("_id", "o1"),
            ],
        );
        assert_eq!(
            inner_types(&request.criteria),
            BTreeSet::from(["Patient".to_owned(), "Provenance".to_owned()])
        );
        assert!(inner_types(&search(&index, "Observation", &[("code", "x")]).criteria).is_empty());
    }

    #[test]
    fn an_inner_search_runs_only_over_a_type_the_gate_authorized() {
        let index = index();
        let outer = search(
            &index,
            "Observation",
            &[("subject:Patient.family", "Smith")],
        );
        let Criterion::Chain { inner, .. } = outer.criteria[0].clone() else {
            panic!("a chain: {:?}", outer.criteria);
        };
        let confined = vec!["p1".to_owned()];
        let authorized = AuthorizedSearch {
            request: outer.clone(),
            inner: BTreeMap::from([("Patient".to_owned(), Some(confined.clone()))]),
            internal: false,
        };
        let inner = inner.as_ref();
        let patients = authorized.inner_search("Patient", inner).unwrap();
        assert_eq!(patients.request().compartments, Some(confined));
        assert_eq!(patients.request().resource_types, types(&["Patient"]));
        // The inner search carries its own criterion only, bounded, without a total.
        assert_eq!(patients.request().criteria.len(), 1);
        assert_eq!(patients.request().total, TotalMode::None);
        // A type the gate never saw fails closed for a client's search...
        let refused = authorized.inner_search("Group", inner).unwrap_err();
        assert!(matches!(refused, AppError::Internal(_)), "{refused:?}");
        // ...and is open only to the server's own searches.
        let internal = AuthorizedSearch::server_internal(outer);
        assert_eq!(
            internal
                .inner_search("Group", inner)
                .unwrap()
                .request()
                .compartments,
            None
        );
    }

    #[test]
    fn only_failures_that_reached_a_record_are_ledgered() {
        let resources = || {
            vec![EntryResource {
                resource_type: "Patient".into(),
                id: "p1".into(),
                version_id: None,
                content_hash: None,
            }]
        };
        let forbidden = AppError::Forbidden {
            rule: policy::RULE_COMPARTMENT,
            message: "outside".into(),
            patients: vec!["Patient/p1".into(), "Patient/p2".into(), "Group/g".into()],
        };
        let event = refusal_event(Action::Read, &forbidden, resources()).unwrap();
        assert_eq!(event.reason, Some("forbidden"));
        assert_eq!(event.rule, Some(policy::RULE_COMPARTMENT));
        assert_eq!(
            event.concerns,
            BTreeSet::from(["p1".to_owned(), "p2".to_owned()])
        );
        assert_eq!(event.resources.len(), 1);
        for (error, reason) in [
            (AppError::NotFound("Patient/p1".into()), "not-found"),
            (
                AppError::PreconditionFailed("If-Match".into()),
                "precondition-failed",
            ),
            (AppError::Conflict("exists".into()), "conflict"),
            (
                AppError::Unprocessable(ValidationError {
                    code: IssueCode::Invalid,
                    expression: None,
                    message: "a patch test failed".into(),
                }),
                "unprocessable",
            ),
        ] {
            let event = refusal_event(Action::Update, &error, resources()).unwrap();
            assert_eq!(event.reason, Some(reason), "{error:?}");
            assert_eq!(event.rule, None, "{error:?}");
        }
        // A malformed request or a server failure reached no record.
        for error in [
            AppError::BadRequest {
                message: "bad".into(),
                expression: None,
            },
            AppError::Internal("broken".into()),
        ] {
            assert!(refusal_event(Action::Read, &error, resources()).is_none());
        }
    }

    #[test]
    fn withholding_counts_what_it_removes() {
        let mut items = vec![1, 2, 3, 4, 5];
        assert_eq!(withhold(&mut items, |n| n % 2 == 1), 2);
        assert_eq!(items, [1, 3, 5]);
        assert_eq!(withhold(&mut items, |_| true), 0);
    }
}
