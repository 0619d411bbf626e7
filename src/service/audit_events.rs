//! The patient's view of the ledger (`GET /fhir/AuditEvent`): R4 AuditEvents generated from
//! the sequenced ledger entries that touched a patient's compartment, newest first. Each
//! carries, in its `ledger-entry` extension, the entry's leaf index, receipt and exact bytes,
//! and its inclusion proof in the latest signed checkpoint (also carried), so the patient's
//! app checks offline that the account it shows is the log's: SHA-256(0x00 ‖ bytes) is the
//! leaf, the proof leads to the checkpoint's root, the checkpoint verifies under the key of
//! `GET /ledger/key`. Nothing is stored as an AuditEvent: the ledger is the record, and these
//! are views of it.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Value, json};

use crate::access::policy::{self, Refusal};
use crate::access::{Permission, RequestContext};
use crate::error::AppError;
use crate::fhir::ResourceId;
use crate::fhir::search_params::{ParamType, SearchParamRegistry};
use crate::fhir::search_query::{
    Criterion, FilterValue, Handling, Modifier, Prefix, SearchError, SearchRequest,
    SupportedParams, parse_search,
};
use crate::fhir::search_values::date_range;
use crate::ledger::Action;
use crate::ledger::checkpoint::encode_hash;
use crate::ledger::entry::{LedgerEntry, Outcome};
use crate::ledger::{Hash, tree};
use crate::store::ledger::{self as rows, CheckpointRow, CosignedCheckpoint, DbHashStore};

use super::base::ResourceService;
use super::cursor::{self, CursorKind};
use super::ledger::LedgerEvent;

/// Most entries examined for one page (filters may skip many).
const MAX_EXAMINED: usize = 10_000;
/// The extension naming an AuditEvent's ledger entry.
pub const LEDGER_ENTRY_EXTENSION: &str =
    "https://fhirledger.dev/fhir/StructureDefinition/ledger-entry";

/// A date test on an entry's time: `ge`, `gt`, `le`, `lt` or `eq` against a FHIR date.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DateTest {
    pub prefix: Prefix,
    pub low: i64,
    pub high: i64,
}

impl DateTest {
    fn passes(&self, at: i64) -> bool {
        match self.prefix {
            Prefix::Ge => at >= self.low,
            Prefix::Gt => at >= self.high,
            Prefix::Le => at < self.high,
            Prefix::Lt => at < self.low,
            _ => self.low <= at && at < self.high,
        }
    }
}

/// The parameters the view answers, typed as R4's AuditEvent search parameters, so that its
/// query is read by the same parser as every search.
struct ViewParams;

impl SupportedParams for ViewParams {
    fn supported(&self, resource_type: &str, code: &str) -> Option<ParamType> {
        if resource_type != "AuditEvent" {
            return None;
        }
        match code {
            "patient" | "entity" | "agent" => Some(ParamType::Reference),
            "date" => Some(ParamType::Date),
            "outcome" | "purpose" => Some(ParamType::Token),
            _ => None,
        }
    }

    fn components(&self, _resource_type: &str, _code: &str) -> Option<Vec<ParamType>> {
        None
    }
}

/// The refusal of what the view does not answer.
fn unsupported(parameter: &str, message: impl Into<String>) -> AppError {
    SearchError::new(parameter, message).into()
}

/// What the view answers, for messages.
const VIEW_PARAMS: &str =
    "patient, entity, agent, date (ge, gt, le, lt, eq), outcome, purpose, _count and _cursor";

/// What the view is asked for.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// The patient's id.
    pub patient: Option<String>,
    /// `Type/id`: entries naming this resource.
    pub entity: Option<String>,
    /// Entries whose actor's subject or `fhirUser` is this.
    pub agent: Option<String>,
    pub dates: Vec<DateTest>,
    /// `outcome` 0 (permitted) or 4 (refused): an auditor's list of refusals.
    pub outcome: Option<Outcome>,
    /// `purpose` (R5's AuditEvent parameter of that name): the purpose of use the actor's
    /// token stated, such as `ETREAT` for break-the-glass.
    pub purpose: Option<String>,
    pub count: usize,
    /// `_cursor` from a `next` link: continue with the entries below the leaf index it seals.
    pub cursor: Option<String>,
}

impl AuditQuery {
    /// Reads the view's query with the search parser ([`parse_search`]): one value per
    /// parameter, no modifiers, and none of the result parameters the view does not apply.
    /// Returns the query and the parameters its `self` and `next` links repeat.
    pub fn parse(
        registry: &SearchParamRegistry,
        params: &[(String, String)],
        handling: Handling,
    ) -> Result<(Self, Vec<(String, String)>), AppError> {
        let request = parse_search(
            registry,
            &ViewParams,
            vec!["AuditEvent".to_owned()],
            params,
            handling,
        )?;
        let defaults = SearchRequest::over(Vec::new());
        if !request.sort.is_empty()
            || !request.includes.is_empty()
            || !request.revincludes.is_empty()
            || !request.elements.is_empty()
            || request.summary != defaults.summary
            || request.total != defaults.total
        {
            return Err(unsupported(
                "_query",
                format!("the AuditEvent view takes {VIEW_PARAMS}"),
            ));
        }
        let mut query = Self {
            count: request.count,
            cursor: request.cursor.clone(),
            ..Self::default()
        };
        for criterion in &request.criteria {
            let Criterion::Filter(filter) = criterion else {
                return Err(unsupported(
                    "_query",
                    format!("the AuditEvent view takes {VIEW_PARAMS}"),
                ));
            };
            let code = filter.code.as_str();
            let [value] = filter.values.as_slice() else {
                return Err(unsupported(code, format!("'{code}' takes one value here")));
            };
            if filter.modifier != Modifier::None {
                return Err(unsupported(
                    code,
                    format!("'{code}' takes no modifier here"),
                ));
            }
            let once = |taken: bool| {
                if taken {
                    Err(unsupported(
                        code,
                        format!("parameter '{code}' is given more than once"),
                    ))
                } else {
                    Ok(())
                }
            };
            match (code, value) {
                ("patient", FilterValue::Reference(reference)) => {
                    once(query.patient.is_some())?;
                    let id = reference.strip_prefix("Patient/").unwrap_or(reference);
                    ResourceId::parse(id)
                        .map_err(|_| unsupported(code, "patient must be Patient/<id> or an id"))?;
                    query.patient = Some(id.to_owned());
                }
                ("entity", FilterValue::Reference(reference)) => {
                    once(query.entity.is_some())?;
                    if reference.split('/').count() != 2 {
                        return Err(unsupported(code, "entity must be Type/id"));
                    }
                    query.entity = Some(reference.clone());
                }
                ("agent", FilterValue::Reference(agent)) => {
                    once(query.agent.is_some())?;
                    query.agent = Some(agent.clone());
                }
                (
                    "outcome",
                    FilterValue::Token {
                        code: Some(code), ..
                    },
                ) => {
                    once(query.outcome.is_some())?;
                    query.outcome = Some(match code.as_str() {
                        "0" => Outcome::Permit,
                        "4" => Outcome::Deny,
                        _ => {
                            return Err(unsupported(
                                "outcome",
                                "outcome is 0 (permitted) or 4 (refused) here",
                            ));
                        }
                    });
                }
                (
                    "purpose",
                    FilterValue::Token {
                        code: Some(purpose),
                        ..
                    },
                ) => {
                    once(query.purpose.is_some())?;
                    query.purpose = Some(purpose.clone());
                }
                ("date", FilterValue::Date { prefix, low, high })
                    if matches!(
                        prefix,
                        Prefix::Eq | Prefix::Ge | Prefix::Gt | Prefix::Le | Prefix::Lt
                    ) =>
                {
                    query.dates.push(DateTest {
                        prefix: *prefix,
                        low: *low,
                        high: *high,
                    });
                }
                _ => {
                    return Err(unsupported(
                        code,
                        format!("the AuditEvent view takes {VIEW_PARAMS}"),
                    ));
                }
            }
        }
        Ok((query, request.link_params))
    }
}

/// One page of the view.
#[derive(Debug, Clone)]
pub struct AuditPage {
    pub events: Vec<Value>,
    /// `_cursor` of the next page, when entries remain.
    pub next: Option<String>,
}

impl ResourceService {
    /// Answers the view: an auditor (`ledger.read`) or an unconfined token may ask about
    /// any patient or all of them; a confined token (a patient's app, a clinician under
    /// Consent) only about the patients its grant opens. The answer is itself ledgered.
    pub async fn audit_events(
        &self,
        ctx: &RequestContext,
        mut query: AuditQuery,
    ) -> Result<AuditPage, AppError> {
        let this = self.clone();
        let ctx = ctx.clone();
        super::blocking(move || {
            if ctx.principal.may_read_ledger() {
                ctx.rule.set(policy::RULE_LEDGER_SCOPE);
            } else {
                let grant = this.authorize(
                    &ctx,
                    Permission::Search,
                    "AuditEvent",
                    Action::AuditView,
                    Vec::new(),
                )?;
                if let Some(confinement) = &grant.confinement {
                    let own = match confinement {
                        policy::Confinement::Patient(patient) => Some(patient.clone()),
                        _ => None,
                    };
                    let patient = query.patient.clone().or(own);
                    let refusal = match &patient {
                        Some(patient) if this.opens(None, &ctx, confinement, patient)? => None,
                        Some(_) => Some(confinement.refusal()),
                        None => Some(Refusal {
                            rule: confinement.refusal().rule,
                            message: "name the patient (patient=Patient/…) whose accesses to list"
                                .into(),
                        }),
                    };
                    if let Some(refusal) = refusal {
                        return Err(this.ledger().refuse(
                            &ctx,
                            Action::AuditView,
                            Vec::new(),
                            refusal,
                        ));
                    }
                    query.patient = patient;
                }
            }
            let page = this.audit_page(&query)?;
            let event = LedgerEvent::permit(Action::AuditView).concerning(query.patient.clone());
            this.ledger().append(&ctx, event)?;
            Ok(page)
        })
        .await
    }

    /// The sealed cursor of the page below leaf `before`.
    fn audit_cursor(&self, before: Option<i64>) -> Option<String> {
        before.map(|index| cursor::seal(self.envelope(), CursorKind::AuditView, &index))
    }

    fn audit_page(&self, query: &AuditQuery) -> Result<AuditPage, AppError> {
        let mut conn = self.connection()?;
        // Only entries the latest checkpoint covers are listed: each comes with its proof.
        let Some(checkpoint) = rows::latest_checkpoint(&mut conn)? else {
            return Ok(AuditPage {
                events: Vec::new(),
                next: None,
            });
        };
        let before: Option<i64> = query
            .cursor
            .as_deref()
            .map(|text| cursor::open(self.envelope(), CursorKind::AuditView, text))
            .transpose()?;
        let mut before = before.unwrap_or(i64::MAX).min(checkpoint.tree_size);
        let mut events = Vec::new();
        let mut examined = 0;
        loop {
            let batch = i64::try_from(query.count.max(50)).unwrap_or(1000).min(1000);
            let mut rows = match &query.patient {
                Some(patient) => {
                    let indexes = rows::patient_entry_indexes(&mut conn, patient, before, batch)?;
                    rows::entries_at(&mut conn, &indexes)?
                }
                None => rows::entries_range(&mut conn, (before - batch).max(0), before)?,
            };
            rows.sort_by_key(|row| std::cmp::Reverse(row.leaf_index));
            if rows.is_empty() {
                return Ok(AuditPage { events, next: None });
            }
            for row in rows {
                let Some(index) = row.leaf_index else {
                    continue;
                };
                before = index;
                examined += 1;
                let Ok(entry) = serde_json::from_slice::<LedgerEntry>(&row.data) else {
                    continue;
                };
                // Entries written before entries were split per patient may name several
                // patients: a patient's view shows that one happened, not what it names (the
                // leaf hash, not the bytes, still proves it), and filters only on what it
                // shows, so that `entity` cannot ask about another patient's resources.
                let legacy = query.patient.is_some() && entry.patients.len() > 1;
                let entry = if legacy {
                    LedgerEntry {
                        resources: Vec::new(),
                        ..entry
                    }
                } else {
                    entry
                };
                if query.matches(&entry) {
                    let mut event = audit_event(index, &entry);
                    let proof = Self::proof(&mut conn, index, checkpoint.tree_size)?;
                    attach_proof(&mut event, &row.data, legacy, &checkpoint, &proof);
                    // The first checkpoint witnesses cosigned that includes the entry, once
                    // there is one: their clocks bound the entry's time.
                    if let Some((size, note)) =
                        rows::cosigned_note(&mut conn, CosignedCheckpoint::Covering(index), 1)?
                    {
                        let proof = Self::proof(&mut conn, index, size)?;
                        attach_cosigned(&mut event, size, &proof, note);
                    }
                    events.push(event);
                    if events.len() == query.count {
                        return Ok(AuditPage {
                            events,
                            next: self.audit_cursor((index > 0).then_some(index)),
                        });
                    }
                }
                if examined >= MAX_EXAMINED {
                    // A short page with a next link: the filters skipped many entries.
                    return Ok(AuditPage {
                        events,
                        next: self.audit_cursor((index > 0).then_some(index)),
                    });
                }
            }
            if before == 0 {
                return Ok(AuditPage { events, next: None });
            }
        }
    }
}

impl ResourceService {
    /// The inclusion proof of leaf `index` in the tree of `tree_size`.
    fn proof(
        conn: &mut crate::store::DbConnection,
        index: i64,
        tree_size: i64,
    ) -> Result<Vec<Hash>, AppError> {
        let (Ok(index), Ok(size)) = (u64::try_from(index), u64::try_from(tree_size)) else {
            return Err(AppError::Internal("negative leaf index".into()));
        };
        let store = DbHashStore::new(conn);
        tree::inclusion_proof(&store, size, index)
            .map_err(|e| AppError::Internal(format!("inclusion proof: {e}")))
    }
}

/// Adds the entry's bytes (or, `redacted`, only its leaf hash), its inclusion proof and the
/// checkpoint it leads to.
fn attach_proof(
    event: &mut Value,
    leaf_data: &[u8],
    redacted: bool,
    checkpoint: &CheckpointRow,
    proof: &[Hash],
) {
    let Some(parts) = event["extension"][0]["extension"].as_array_mut() else {
        return;
    };
    if redacted {
        let leaf = tree::leaf_hash(leaf_data);
        parts.push(json!({"url": "leafHash", "valueString": encode_hash(&leaf)}));
    } else {
        parts.push(json!({"url": "leafData", "valueBase64Binary": BASE64.encode(leaf_data)}));
    }
    parts.push(json!({"url": "treeSize", "valueString": checkpoint.tree_size.to_string()}));
    parts.extend(
        proof
            .iter()
            .map(|hash| json!({"url": "inclusionProof", "valueString": encode_hash(hash)})),
    );
    parts.push(json!({"url": "checkpoint", "valueString": checkpoint.note}));
}

/// Adds the first cosigned checkpoint that includes the entry (with the witnesses'
/// cosignature lines) and the entry's inclusion proof in it.
fn attach_cosigned(event: &mut Value, tree_size: i64, proof: &[Hash], note: String) {
    let Some(parts) = event["extension"][0]["extension"].as_array_mut() else {
        return;
    };
    parts.push(json!({"url": "cosignedTreeSize", "valueString": tree_size.to_string()}));
    parts.extend(
        proof
            .iter()
            .map(|hash| json!({"url": "cosignedInclusionProof", "valueString": encode_hash(hash)})),
    );
    parts.push(json!({"url": "cosignedCheckpoint", "valueString": note}));
}

impl AuditQuery {
    fn matches(&self, entry: &LedgerEntry) -> bool {
        let entity_ok = self.entity.as_deref().is_none_or(|entity| {
            entry
                .resources
                .iter()
                .any(|r| entity == format!("{}/{}", r.resource_type, r.id))
        });
        let agent_ok = self.agent.as_deref().is_none_or(|agent| {
            entry.actor.subject == agent || entry.actor.fhir_user.as_deref() == Some(agent)
        });
        let dates_ok = self.dates.is_empty()
            || date_range(&entry.time)
                .is_some_and(|(at, _)| self.dates.iter().all(|test| test.passes(at)));
        let outcome_ok = self.outcome.is_none_or(|outcome| entry.outcome == outcome);
        let purpose_ok = self
            .purpose
            .as_deref()
            .is_none_or(|purpose| entry.actor.purpose.as_deref() == Some(purpose));
        entity_ok && agent_ok && dates_ok && outcome_ok && purpose_ok
    }
}

/// The R4 AuditEvent of one ledger entry (its id is `ledger-<index>`).
pub fn audit_event(index: i64, entry: &LedgerEntry) -> Value {
    let action = Action::parse(&entry.action);
    // R4 AuditEvent.action (audit-event-action): create, read, update, delete, execute.
    let action_code = match action {
        Some(Action::Create) => "C",
        Some(Action::Update) => "U",
        Some(Action::Delete) => "D",
        Some(
            Action::Read
            | Action::Vread
            | Action::History
            | Action::Search
            | Action::Everything
            | Action::Export
            | Action::AuditView,
        ) => "R",
        Some(
            Action::LedgerRead
            | Action::Authenticate
            | Action::KeySplit
            | Action::KeyUnseal
            | Action::KeyRotate
            | Action::KeyRetire
            | Action::IndexKeyRotate
            | Action::LedgerKeyRotate
            | Action::Notify,
        )
        | None => "E",
    };
    // The R4 restful-interaction code, where the action is one.
    let interaction = match action {
        Some(
            Action::Create
            | Action::Read
            | Action::Vread
            | Action::Update
            | Action::Delete
            | Action::History
            | Action::Search,
        ) => Some(entry.action.as_str()),
        Some(Action::Everything | Action::Export) => Some("operation"),
        Some(
            Action::AuditView
            | Action::LedgerRead
            | Action::Authenticate
            | Action::KeySplit
            | Action::KeyUnseal
            | Action::KeyRotate
            | Action::KeyRetire
            | Action::IndexKeyRotate
            | Action::LedgerKeyRotate
            | Action::Notify,
        )
        | None => None,
    };
    let who = match &entry.actor.fhir_user {
        Some(user) => json!({"reference": user}),
        None => json!({"identifier": {
            "system": entry.actor.issuer.as_deref().unwrap_or("urn:fhirledger:actor"),
            "value": entry.actor.subject,
        }}),
    };
    let mut agent = json!({"who": who, "requestor": true, "name": entry.actor.subject});
    if let Some(client) = &entry.actor.client {
        agent["altId"] = json!(client);
    }
    if let Some(purpose) = &entry.actor.purpose {
        agent["purposeOfUse"] = json!([{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": purpose,
        }]}]);
    }
    let mut event = json!({
        "resourceType": "AuditEvent",
        "id": format!("ledger-{index}"),
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest",
                 "display": "RESTful Operation"},
        "action": action_code,
        "recorded": entry.time,
        "outcome": if entry.outcome == Outcome::Permit { "0" } else { "4" },
        "agent": [agent],
        "source": {"observer": {"display": "fhirledger ledger"}},
        "extension": [{"url": LEDGER_ENTRY_EXTENSION, "extension": [
            {"url": "index", "valueString": index.to_string()},
            {"url": "receipt", "valueString": entry.id},
        ]}],
    });
    if action == Some(Action::Export) {
        // DICOM's audit event type for data leaving the system (used by FHIR's IHE BALP).
        event["type"] = json!({"system": "http://dicom.nema.org/resources/ontology/DCM",
                               "code": "110106", "display": "Export"});
    }
    if let Some(interaction) = interaction {
        event["subtype"] = json!([{"system": "http://hl7.org/fhir/restful-interaction",
                                   "code": interaction}]);
    }
    let description: Vec<&str> = [entry.reason.as_deref(), entry.rule.as_deref()]
        .into_iter()
        .flatten()
        .collect();
    if !description.is_empty() {
        event["outcomeDesc"] = json!(description.join("; rule: "));
    }
    let entities: Vec<Value> = entry
        .resources
        .iter()
        .map(|r| {
            let reference = match &r.version_id {
                Some(version) => format!("{}/{}/_history/{version}", r.resource_type, r.id),
                None => format!("{}/{}", r.resource_type, r.id),
            };
            json!({"what": {"reference": reference}})
        })
        .collect();
    if !entities.is_empty() {
        event["entity"] = json!(entities);
    }
    event
}
