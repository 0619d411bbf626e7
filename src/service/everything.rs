//! `Patient/{id}/$everything` (<https://hl7.org/fhir/R4/patient-operation-everything.html>):
//! the patient and every current resource in its compartment, paged by cursor, with one
//! ledger entry per page naming every resource it disclosed.
//!
//! Membership follows the one compartment rule ([`crate::fhir::compartment`]: R4's Patient
//! CompartmentDefinition and its extension): a resource is in the compartment when one of
//! the rule's reference parameters for its type holds `Patient/{id}`. The index holds those
//! references as keyed digests, so the whole compartment is one search for "any of these
//! digests" over the compartment's types, in storage order (`seq`), which pages stably while
//! resources are added.

use crate::access::{Permission, RequestContext};
use crate::crypto::blind_index::{Digest, ValueKind};
use crate::error::AppError;
use crate::fhir::ResourceId;
use crate::ledger::Action;
use crate::store::DbConnection;
use crate::store::resources as rows;
use crate::store::search::{self as index, Condition, RangeOp, RangeTest, SearchSql};

use super::base::{ResourceService, StoredResource, target};
use super::ledger::LedgerEvent;
use super::search::Cursor;

/// One `$everything` request.
#[derive(Debug, Clone)]
pub struct EverythingQuery {
    pub patient: ResourceId,
    /// `_type`: only these types (validated by the caller); `None` for every type.
    pub types: Option<Vec<String>>,
    /// `_since`: only resources last updated at or after this instant (µs since the epoch).
    pub since: Option<i64>,
    /// `_count`: page size, at least 1.
    pub count: i64,
    /// `_cursor` from a `next` link.
    pub cursor: Option<String>,
}

/// One page: the patient first (on the first page, when it passes `_type` and `_since`),
/// then compartment members in storage order.
#[derive(Debug, Clone)]
pub struct EverythingPage {
    pub resources: Vec<StoredResource>,
    /// Cursor of the next page, when there is one.
    pub next: Option<String>,
}

impl ResourceService {
    /// Runs `$everything` for one patient: 404 if it never existed, 410 if it is deleted
    /// (both ledgered as denials), else one page and a permit entry naming each disclosed
    /// version, with `patient` = `Patient/{id}`.
    pub async fn patient_everything(
        &self,
        ctx: &RequestContext,
        query: EverythingQuery,
    ) -> Result<EverythingPage, AppError> {
        let this = self.clone();
        let ctx = ctx.clone();
        super::blocking(move || {
            let patient_type = this.resolve_type("Patient")?;
            let asked = vec![target(&patient_type, &query.patient, None)];
            let grant = this.authorize(
                &ctx,
                Permission::Read,
                "Patient",
                Action::Everything,
                asked.clone(),
            )?;
            // A confined token opens only the records of the patients its grant reaches.
            if let Some(confinement) = &grant.confinement
                && !this.opens(None, &ctx, confinement, query.patient.as_str())?
            {
                let refusal = confinement.refusal();
                return Err(this
                    .ledger()
                    .refuse(&ctx, Action::Everything, asked, refusal));
            }
            let mut conn = this.connection()?;
            let page = this.everything_page(&mut conn, &query);
            drop(conn);
            match page {
                Ok(mut page) => {
                    // Compartment members of types the token may not see are withheld.
                    let withheld = this.withhold_unseen(None, &ctx, &mut page.resources);
                    let index = this.search_index();
                    let mut event = LedgerEvent::permit(Action::Everything)
                        .concerning([query.patient.to_string()])
                        .withholding(withheld);
                    for r in &page.resources {
                        event.touch(
                            target(&r.resource_type, &r.id, Some(r.meta.version_id)),
                            index.stored_compartments(
                                r.resource_type.as_str(),
                                r.id.as_str(),
                                &r.json,
                            ),
                        );
                    }
                    this.ledger().append(&ctx, event)?;
                    Ok(page)
                }
                Err(error) => {
                    let reason = match &error {
                        AppError::NotFound(_) => "not-found",
                        AppError::Gone { .. } => "gone",
                        _ => return Err(error),
                    };
                    let version = match &error {
                        AppError::Gone { version_id, .. } => Some(*version_id),
                        _ => None,
                    };
                    let event = LedgerEvent::deny(Action::Everything, reason)
                        .naming(vec![target(&patient_type, &query.patient, version)])
                        .concerning([query.patient.to_string()]);
                    this.ledger().append(&ctx, event)?;
                    Err(error)
                }
            }
        })
        .await
    }

    fn everything_page(
        &self,
        conn: &mut DbConnection,
        query: &EverythingQuery,
    ) -> Result<EverythingPage, AppError> {
        let patient_type = self.resolve_type("Patient")?;
        let id = &query.patient;
        let head = rows::head(conn, "Patient", id.as_str())?
            .ok_or_else(|| AppError::NotFound(format!("Patient/{id}")))?;
        if head.deleted {
            return Err(AppError::Gone {
                resource: "Patient".into(),
                id: id.to_string(),
                version_id: head.current_version,
            });
        }
        let after = query
            .cursor
            .as_deref()
            .map(|text| Cursor::decode(text, self.envelope(), 0)?.position())
            .transpose()?;
        let wanted = |t: &str| {
            query
                .types
                .as_ref()
                .is_none_or(|types| types.iter().any(|w| w == t))
        };
        let since_ok = |last_updated: i64| query.since.is_none_or(|since| last_updated >= since);

        let mut resources = Vec::new();
        if after.is_none() && wanted("Patient") && since_ok(head.last_updated) {
            let row = rows::version(conn, "Patient", id.as_str(), head.current_version)?
                .ok_or_else(|| {
                    AppError::Internal(format!("Patient/{id} has no current version row"))
                })?;
            resources.push(self.open_version(&patient_type, id, &row)?);
        }

        let (member_types, digests) = self.compartment_digests(id, &wanted);
        if member_types.is_empty() {
            return Ok(EverythingPage {
                resources,
                next: None,
            });
        }
        let mut conditions = vec![Condition::HasAny(digests)];
        if let Some(since) = query.since {
            // An instant is a one-microsecond range; "starts at or after `since`".
            conditions.push(Condition::LastUpdated(vec![RangeTest {
                op: RangeOp::StartsAfter,
                low: since,
                high: since,
            }]));
        }
        let sql = SearchSql {
            resource_types: member_types,
            conditions,
            sort: Vec::new(),
            after: after.clone(),
            backward: false,
        };
        // The patient counts towards the first page's size.
        let limit = (query.count - resources.len() as i64).max(0);
        let mut matched = index::search(conn, &sql, limit + 1)?;
        let has_more = matched.len() as i64 > limit;
        matched.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        let next = has_more.then(|| {
            // Nothing fitted on this page (the patient filled it): start from the top.
            let seq = matched.last().map_or(i64::MIN, |row| row.position.seq);
            Cursor::at(false, Vec::new(), seq).encode(self.envelope())
        });
        for row in &matched {
            // A Patient whose `link` names itself is already on the first page.
            if row.resource_type == "Patient" && row.id == id.as_str() {
                continue;
            }
            resources.push(self.open_matched(row)?);
        }
        Ok(EverythingPage { resources, next })
    }

    /// The supported compartment types that `wanted` admits and that have at least one
    /// indexed linking parameter, and the digests of `Patient/{id}` under each of those
    /// parameters (a digest is keyed by type and parameter, so one list serves all types).
    fn compartment_digests(
        &self,
        id: &ResourceId,
        wanted: &dyn Fn(&str) -> bool,
    ) -> (Vec<String>, Vec<Digest>) {
        let index = self.search_index();
        let reference = format!("Patient/{id}");
        let mut types = Vec::new();
        let mut digests = Vec::new();
        for (resource_type, params) in index.compartment_rule().types() {
            if !wanted(resource_type) || self.resolve_type(resource_type).is_err() {
                continue;
            }
            let before = digests.len();
            digests.extend(
                params
                    .iter()
                    .filter(|param| index.plan().is_indexed(resource_type, param))
                    .map(|param| {
                        index.digest(resource_type, param, ValueKind::Reference, &reference)
                    }),
            );
            if digests.len() > before {
                types.push(resource_type.to_owned());
            }
        }
        (types, digests)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{Envelope, MasterKey};
    use crate::store::search::Position;

    #[test]
    fn cursors_round_trip_and_foreign_ones_are_refused() {
        let envelope = Envelope::new(MasterKey::generate());
        let text = Cursor::at(false, Vec::new(), 42).encode(&envelope);
        assert_eq!(
            Cursor::decode(&text, &envelope, 0)
                .unwrap()
                .position()
                .unwrap(),
            Position {
                values: Vec::new(),
                seq: 42
            }
        );
        assert!(Cursor::decode("not base64!", &envelope, 0).is_err());
        // Sealed under another key, or with sort values: not a cursor of $everything.
        let other = Envelope::new(MasterKey::generate());
        assert!(Cursor::decode(&text, &other, 0).is_err());
        let sorted = Cursor::at(false, vec![None], 1).encode(&envelope);
        assert!(Cursor::decode(&sorted, &envelope, 0).is_err());
    }
}
