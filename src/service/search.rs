//! The search engine: a parsed, authorized [`SearchRequest`] into SQL conditions over the
//! blind-index rows the indexer ([`crate::indexer`]) wrote; then paging, decryption of what
//! is returned, checks of long terms after decryption, `_include`/`_revinclude`, and the
//! ledger entry naming every resource a search disclosed.

use std::collections::{BTreeSet, HashMap, HashSet};

use serde_json::Value;

use crate::access::RequestContext;
use crate::crypto::Envelope;
use crate::crypto::blind_index::{
    Digest, LEGACY_PREFIX_CHARS, MAX_PREFIX_CHARS, ValueKind, bounded_prefix, normalize_string,
    system_and_code,
};
use crate::error::AppError;
use crate::fhir::ResourceId;
use crate::fhir::search_params::ParamType;
use crate::fhir::search_query::{
    Criterion, Filter, FilterValue, Include, MAX_INNER_MATCHES, Modifier, Prefix, SearchRequest,
    SortParam, Summary, TotalMode,
};
use crate::fhir::search_values::SearchValue;
use crate::indexer::{ReferenceTarget, SearchIndex};
use crate::ledger::Action;
use crate::store::DbConnection;
use crate::store::search::{
    self as index, Condition, MatchedRow, NumberTest, Position, RangeOp, RangeTest, SearchSql,
    SortBy, SortKey, SortValue, UnitMatch,
};

use super::base::{ResourceService, StoredResource, target};
use super::cursor::{self, CursorKind};
use super::gate::AuthorizedSearch;
use super::ledger::LedgerEvent;

/// Most resources `_include`/`_revinclude` add to one page.
pub const MAX_INCLUDED: i64 = 1000;
/// Most matches a search sorted by a digest-only parameter may have (all are decrypted
/// to be sorted).
pub const MAX_SORTED_IN_MEMORY: i64 = 5_000;
/// Candidate rows fetched per round when long string terms need checking after decryption.
const CHECK_BATCH: i64 = 200;

/// A page of search results.
#[derive(Debug, Clone)]
pub struct SearchPage {
    pub matches: Vec<StoredResource>,
    pub included: Vec<StoredResource>,
    pub total: Option<i64>,
    /// Cursor of the next page, when there is one.
    pub next: Option<String>,
    /// Cursor of the previous page, when this is not the first.
    pub previous: Option<String>,
}

impl SearchPage {
    /// `_summary=count`: the total and nothing else.
    fn count_only(total: Option<i64>) -> Self {
        Self {
            matches: Vec::new(),
            included: Vec::new(),
            total,
            next: None,
            previous: None,
        }
    }
}

/// A string term longer than the index's prefix bound, checked after decryption.
#[derive(Debug, Clone)]
enum LongTermCheck {
    Strings {
        code: String,
        /// Normalized alternatives; a resource passes if any value of `code` starts with one.
        terms: Vec<String>,
    },
    /// A composite with a string component: a resource passes if one of its tuples of
    /// `code` matches one of these alternatives in every component.
    Tuples {
        code: String,
        tuples: Vec<Vec<ComponentCheck>>,
    },
}

/// One component of a composite alternative, as checked after decryption.
#[derive(Debug, Clone)]
enum ComponentCheck {
    /// A normalized string term: the stored text must start with it.
    StartsWith(String),
    /// A token (or other hashable) value: the stored value must have this form.
    Form(FilterValue),
    /// A date or number, already matched by the database on the same row (a composite
    /// with a string component has no date or number component: the index plan refuses
    /// that shape).
    Matched,
}

impl ComponentCheck {
    fn of(value: &FilterValue) -> Self {
        match value {
            FilterValue::String(text) => Self::StartsWith(normalize_string(text)),
            FilterValue::Token { .. } | FilterValue::Reference(_) | FilterValue::Uri(_) => {
                Self::Form(value.clone())
            }
            _ => Self::Matched,
        }
    }
}

/// Whether a stored component value passes a component of a composite alternative
/// (after decryption, for string terms beyond the index's prefix bound).
fn component_passes(index: &SearchIndex, check: &ComponentCheck, stored: &SearchValue) -> bool {
    match check {
        ComponentCheck::StartsWith(term) => match stored {
            SearchValue::String(text) => normalize_string(text).starts_with(term.as_str()),
            _ => false,
        },
        ComponentCheck::Form(value) => index
            .query_form(value, None)
            .is_some_and(|form| index.stored_forms(stored).contains(&form)),
        ComponentCheck::Matched => true,
    }
}

/// Paging direction and position of a search or `$everything` page, carried in `_cursor`
/// sealed ([`super::cursor`]).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct Cursor {
    /// `true`: the page before the position; `false`: the page after it.
    #[serde(rename = "b")]
    backward: bool,
    /// Sort values of the row at the position (`None`: the row had no value).
    #[serde(rename = "v")]
    values: Vec<Option<SortValue>>,
    #[serde(rename = "s")]
    seq: i64,
}

impl Cursor {
    pub(super) fn at(backward: bool, values: Vec<Option<SortValue>>, seq: i64) -> Self {
        Self {
            backward,
            values,
            seq,
        }
    }

    pub(super) fn encode(&self, envelope: &Envelope) -> String {
        cursor::seal(envelope, CursorKind::Search, self)
    }

    /// Opens a cursor from a link; refused (400) unless sealed by this server for a search
    /// with `sort_keys` sort keys.
    pub(super) fn decode(
        text: &str,
        envelope: &Envelope,
        sort_keys: usize,
    ) -> Result<Self, AppError> {
        let cursor: Self = cursor::open(envelope, CursorKind::Search, text)?;
        if cursor.values.len() != sort_keys {
            return Err(cursor::not_ours());
        }
        Ok(cursor)
    }

    /// The position for database keyset paging, whose sort values are never missing.
    pub(super) fn position(&self) -> Result<Position, AppError> {
        let values = self
            .values
            .iter()
            .cloned()
            .collect::<Option<Vec<_>>>()
            .ok_or_else(cursor::not_ours)?;
        Ok(Position {
            values,
            seq: self.seq,
        })
    }
}

impl ResourceService {
    /// Moves the presence digests of resources stored before `resources.presence` existed
    /// out of `search_hashes` into that column, in batches (once, at start-up); returns how
    /// many resources it moved.
    pub fn move_presence_digests(&self) -> Result<usize, AppError> {
        const BATCH: i64 = 500;
        let mut candidates: HashMap<String, Vec<Digest>> = HashMap::new();
        let mut moved = 0;
        loop {
            let batch = index::without_presence(&mut *self.connection()?, BATCH)?;
            if batch.is_empty() {
                return Ok(moved);
            }
            self.transact("the search index", |tx| {
                for (seq, resource_type) in &batch {
                    let digests = candidates
                        .entry(resource_type.clone())
                        .or_insert_with(|| self.search_index().presence_digests(resource_type));
                    index::move_presence(tx, *seq, digests)?;
                }
                Ok(())
            })?;
            moved += batch.len();
        }
    }

    /// Brings a database whose index holds string prefixes shorter than
    /// [`MAX_PREFIX_CHARS`] (written by an earlier version) up to the bound: until then
    /// searches look up prefixes within the old bound (and check longer terms after
    /// decryption, as before), while a background thread rebuilds the index of every live
    /// resource, in `seq` order, recording how far it got so that a restart continues there.
    /// Writes meanwhile index with the full bound, as always.
    pub fn widen_prefixes(&self) -> Result<(), AppError> {
        let (chars, through) = index::prefix_state(&mut *self.connection()?)?;
        let chars = usize::try_from(chars).unwrap_or(LEGACY_PREFIX_CHARS);
        if chars >= MAX_PREFIX_CHARS {
            return Ok(());
        }
        self.search_index().set_query_prefix_chars(chars);
        let this = self.clone();
        let spawned = std::thread::Builder::new()
            .name("reindex".into())
            .spawn(move || match this.rebuild_index_after(chars, through) {
                Ok(rebuilt) => tracing::info!(
                    resources = rebuilt,
                    prefix_chars = MAX_PREFIX_CHARS,
                    "search index rebuilt with longer string prefixes"
                ),
                Err(error) => tracing::warn!(
                    %error,
                    "search index rebuild stopped; it continues at the next start"
                ),
            });
        if let Err(error) = spawned {
            tracing::warn!(%error, "cannot start the search index rebuild");
        }
        Ok(())
    }

    /// Rebuilds the index rows of every live resource after `seq` (see
    /// [`Self::widen_prefixes`]); returns how many were rebuilt.
    fn rebuild_index_after(&self, chars: usize, after: i64) -> Result<u64, AppError> {
        let chars = i32::try_from(chars).unwrap_or(i32::MAX);
        let rebuilt = self.rebuild_index(self.search_index(), after, |tx, last| {
            index::set_prefix_state(tx, chars, last)
        })?;
        self.transact("the search index", |tx| {
            let (_, through) = index::prefix_state(tx)?;
            index::set_prefix_state(
                tx,
                i32::try_from(MAX_PREFIX_CHARS).unwrap_or(i32::MAX),
                through,
            )?;
            Ok(())
        })?;
        self.search_index().set_query_prefix_chars(MAX_PREFIX_CHARS);
        Ok(rebuilt)
    }

    /// Rewrites, with `index`, the index rows and presence digests of every live resource
    /// after `seq`, a batch per transaction in `seq` order; `progress` records in each
    /// batch's transaction the last `seq` it covered, so that a stopped rebuild continues
    /// there. Returns how many resources were rebuilt.
    pub(super) fn rebuild_index(
        &self,
        index: &SearchIndex,
        mut after: i64,
        progress: impl Fn(&mut DbConnection, i64) -> Result<(), crate::store::StoreError>,
    ) -> Result<u64, AppError> {
        const BATCH: i64 = 200;
        let mut rebuilt = 0;
        loop {
            let batch = index::live_after(&mut *self.connection()?, after, BATCH)?;
            let Some(last) = batch.last().map(|(seq, ..)| *seq) else {
                break;
            };
            // Decrypted and extracted before taking the write lock.
            let mut rows = Vec::with_capacity(batch.len());
            for (seq, type_name, id, version) in &batch {
                let resource_type = self.resolve_type(type_name)?;
                let id = ResourceId::parse(id)
                    .map_err(|_| AppError::Internal(format!("stored id {id:?} is not valid")))?;
                let resource = match self.read_version(&resource_type, &id, *version) {
                    Err(AppError::NotFound(_)) => continue,
                    read => read?,
                };
                let parsed: Value = serde_json::from_str(&resource.json).map_err(|e| {
                    AppError::Internal(format!("stored JSON of {resource_type}/{id}: {e}"))
                })?;
                rows.push((
                    *seq,
                    *version,
                    type_name.clone(),
                    index.rows(type_name, &parsed),
                ));
            }
            rebuilt += self.transact("the search index", |tx| {
                let mut done = 0;
                for (seq, version, type_name, index_rows) in &rows {
                    // A write since the read indexed its own version already.
                    if index::is_current(tx, *seq, *version)? {
                        index::clear_index(tx, *seq)?;
                        index::insert_index(tx, *seq, type_name, index_rows)?;
                        index::set_presence(tx, *seq, &index_rows.presence)?;
                        done += 1;
                    }
                }
                progress(tx, last)?;
                Ok(done)
            })?;
            after = last;
        }
        Ok(rebuilt)
    }

    /// Runs a parsed search: one page of matches, includes, and one ledger entry naming
    /// every disclosed resource.
    pub async fn search(
        &self,
        ctx: &RequestContext,
        request: SearchRequest,
    ) -> Result<SearchPage, AppError> {
        let ctx = ctx.clone();
        self.disclose(false, move |this| {
            let search = this.authorize_search(&ctx, request, Action::Search)?;
            let mut conn = this.connection()?;
            let mut page = this.search_page(&mut conn, &search)?;
            drop(conn);
            let withheld = this.withhold_unseen(None, &ctx, &mut page.included);
            this.ledger()
                .append(&ctx, this.search_event(&page).withholding(withheld))?;
            Ok(page)
        })
        .await
    }

    /// A search inside the caller's transaction (Bundle entries): one page and its ledger
    /// entry, which commits with the transaction.
    pub(super) fn search_in(
        &self,
        tx: &mut DbConnection,
        ctx: &RequestContext,
        search: &AuthorizedSearch,
    ) -> Result<(SearchPage, String), AppError> {
        let mut page = self.search_page(tx, search)?;
        let withheld = self.withhold_unseen(Some(&mut *tx), ctx, &mut page.included);
        let event = self.search_event(&page).withholding(withheld);
        let receipt = self.ledger().append_in(tx, ctx, event)?;
        Ok((page, receipt))
    }

    /// The current resources matching `request` (no paging, no ledger entry), at most
    /// `limit`; for conditional interactions and transaction processing, inside the
    /// caller's transaction.
    pub(crate) fn matching_in(
        &self,
        conn: &mut DbConnection,
        search: &AuthorizedSearch,
        limit: i64,
    ) -> Result<Vec<StoredResource>, AppError> {
        let (sql, checks) = self.search_sql(conn, search, None)?;
        self.fetch_checked(conn, &sql, &checks, limit)
    }

    pub(super) fn search_page(
        &self,
        conn: &mut DbConnection,
        search: &AuthorizedSearch,
    ) -> Result<SearchPage, AppError> {
        let request = search.request();
        let cursor = request
            .cursor
            .as_deref()
            .map(|text| Cursor::decode(text, self.envelope(), request.sort.len()))
            .transpose()?;
        if request.sort.iter().any(sorted_after_decryption) {
            return self.search_page_sorted_in_memory(conn, search, cursor.as_ref());
        }
        let position = cursor.as_ref().map(Cursor::position).transpose()?;
        let (mut sql, checks) = self.search_sql(conn, search, position)?;
        let accurate = request.total == TotalMode::Accurate || request.summary == Summary::Count;
        if request.summary == Summary::Count {
            let total = if checks.is_empty() {
                Some(index::count(conn, &sql)?)
            } else {
                None
            };
            return Ok(SearchPage::count_only(total));
        }
        let count = i64::try_from(request.count).unwrap_or(i64::MAX);
        let backward = cursor.as_ref().is_some_and(|c| c.backward);
        sql.backward = backward;
        let mut rows = self.fetch_rows(conn, &mut sql, &checks, count + 1)?;
        let has_more = rows.len() as i64 > count;
        // A first page that holds every match has counted them: most searches (an identifier,
        // a patient's few resources) need no second query for their total.
        let total = if !accurate {
            None
        } else if cursor.is_none() && !has_more {
            Some(rows.len() as i64)
        } else if checks.is_empty() {
            Some(index::count(conn, &sql)?)
        } else {
            None
        };
        rows.truncate(request.count);
        if backward {
            rows.reverse();
        }
        let (next, previous) = {
            let first = rows.first().map(|(row, _)| row.position.clone());
            let last = rows.last().map(|(row, _)| row.position.clone());
            let encode = |backward: bool, position: Option<Position>| {
                position.map(|position| {
                    let values = position.values.into_iter().map(Some).collect();
                    Cursor::at(backward, values, position.seq).encode(self.envelope())
                })
            };
            if backward {
                // Came from a later page: there is always a next one; a previous one if the
                // backward fetch found more.
                (
                    encode(false, last),
                    if has_more { encode(true, first) } else { None },
                )
            } else {
                (
                    if has_more { encode(false, last) } else { None },
                    if cursor.is_some() {
                        encode(true, first)
                    } else {
                        None
                    },
                )
            }
        };
        let matches: Vec<StoredResource> = rows.into_iter().map(|(_, r)| r).collect();
        let included = self.includes(conn, request, &matches)?;
        Ok(SearchPage {
            matches,
            included,
            total,
            next,
            previous,
        })
    }

    /// The ledger entry of a search: every resource it disclosed, each in the compartments
    /// it belongs to (one entry per patient when they are several).
    fn search_event(&self, page: &SearchPage) -> LedgerEvent {
        self.disclosure_event(Action::Search, page.matches.iter().chain(&page.included))
    }

    /// The event of disclosing `resources`, each in the compartments it is stored in.
    pub(super) fn disclosure_event<'a>(
        &self,
        action: Action,
        resources: impl Iterator<Item = &'a StoredResource>,
    ) -> LedgerEvent {
        let index = self.search_index();
        let mut event = LedgerEvent::permit(action);
        for resource in resources {
            let (resource_type, id) = (resource.resource_type.as_str(), resource.id.as_str());
            event.touch(
                target(
                    &resource.resource_type,
                    &resource.id,
                    Some(resource.meta.version_id),
                ),
                index.stored_compartments(resource_type, id, &resource.json),
            );
        }
        event
    }

    /// A page of a search sorted by a parameter the database holds only as digests
    /// (string, token, reference, uri): every match is decrypted (at most
    /// [`MAX_SORTED_IN_MEMORY`]), sorted by the values in the resources, and the page taken
    /// after the cursor's position, so paging stays exact while data changes.
    fn search_page_sorted_in_memory(
        &self,
        conn: &mut DbConnection,
        search: &AuthorizedSearch,
        cursor: Option<&Cursor>,
    ) -> Result<SearchPage, AppError> {
        let request = search.request();
        let (mut sql, checks) = self.search_sql(conn, search, None)?;
        let rows = self.fetch_rows(conn, &mut sql, &checks, MAX_SORTED_IN_MEMORY + 1)?;
        if rows.len() as i64 > MAX_SORTED_IN_MEMORY {
            return Err(AppError::BadRequest {
                message: format!(
                    "this search matches more than {MAX_SORTED_IN_MEMORY} resources, too many to sort by a \
                     parameter held only as keyed digests (string, token, reference, uri); narrow it, or sort \
                     by a date, number or quantity parameter, _lastUpdated or _id"
                ),
                expression: Some("_sort".into()),
            });
        }
        let mut keyed: Vec<(Vec<Option<SortValue>>, i64, StoredResource)> = rows
            .into_iter()
            .map(|(row, resource)| (self.sort_values(request, &resource), row.seq, resource))
            .collect();
        let order = |a: (&[Option<SortValue>], i64), b: (&[Option<SortValue>], i64)| {
            compare_sort_values(a.0, b.0, &request.sort).then(a.1.cmp(&b.1))
        };
        keyed.sort_by(|a, b| order((&a.0, a.1), (&b.0, b.1)));
        let total = (request.total == TotalMode::Accurate || request.summary == Summary::Count)
            .then_some(keyed.len() as i64);
        if request.summary == Summary::Count {
            return Ok(SearchPage::count_only(total));
        }
        let (start, end) = match cursor {
            None => (0, request.count.min(keyed.len())),
            Some(cursor) => {
                let at = (cursor.values.as_slice(), cursor.seq);
                let split = keyed
                    .iter()
                    .position(|k| order((&k.0, k.1), at) == std::cmp::Ordering::Greater)
                    .unwrap_or(keyed.len());
                if cursor.backward {
                    // Rows before the position: everything up to the first row not before it.
                    let before = keyed
                        .iter()
                        .position(|k| order((&k.0, k.1), at) != std::cmp::Ordering::Less)
                        .unwrap_or(keyed.len());
                    (before.saturating_sub(request.count), before)
                } else {
                    (split, (split + request.count).min(keyed.len()))
                }
            }
        };
        let cursor_at = |index: usize, backward: bool| {
            keyed.get(index).map(|(values, seq, _)| {
                Cursor::at(backward, values.clone(), *seq).encode(self.envelope())
            })
        };
        let next = (end < keyed.len() && end > start)
            .then(|| cursor_at(end - 1, false))
            .flatten();
        let previous = (start > 0).then(|| cursor_at(start, true)).flatten();
        let matches: Vec<StoredResource> = keyed
            .drain(start..end)
            .map(|(_, _, resource)| resource)
            .collect();
        let included = self.includes(conn, request, &matches)?;
        Ok(SearchPage {
            matches,
            included,
            total,
            next,
            previous,
        })
    }

    /// The values a resource sorts by, one per sort key (search.html#sort: the lowest value
    /// ascending, the highest descending).
    fn sort_values(
        &self,
        request: &SearchRequest,
        resource: &StoredResource,
    ) -> Vec<Option<SortValue>> {
        let json: Option<Value> = serde_json::from_str(&resource.json).ok();
        request
            .sort
            .iter()
            .map(|key| match key.code.as_str() {
                "_id" => Some(SortValue::Text(resource.id.to_string())),
                "_lastUpdated" => Some(SortValue::Int(resource.meta.last_updated)),
                code => {
                    let json = json.as_ref()?;
                    let values = self
                        .search_index()
                        .plan()
                        .extract_param(resource.resource_type.as_str(), code, json)
                        .into_iter()
                        .filter_map(|value| match value {
                            SearchValue::String(text) => {
                                Some(SortValue::Text(normalize_string(&text)))
                            }
                            SearchValue::Token { code, .. } => code.map(SortValue::Text),
                            SearchValue::Reference(text) | SearchValue::Uri(text) => {
                                Some(SortValue::Text(text))
                            }
                            SearchValue::Date { low, high } => {
                                Some(SortValue::Int(if key.descending { high } else { low }))
                            }
                            SearchValue::Number(value) | SearchValue::Quantity { value, .. } => {
                                Some(SortValue::Float(value))
                            }
                            // Composites are refused as sort keys.
                            SearchValue::Composite(_) => None,
                        });
                    if key.descending {
                        values.max_by(compare_sort_value)
                    } else {
                        values.min_by(compare_sort_value)
                    }
                }
            })
            .collect()
    }

    /// Fetches up to `limit` matching rows after the cursor, decrypting them and applying
    /// long-term checks (which may need several rounds).
    fn fetch_rows(
        &self,
        conn: &mut DbConnection,
        sql: &mut SearchSql,
        checks: &[LongTermCheck],
        limit: i64,
    ) -> Result<Vec<(MatchedRow, StoredResource)>, AppError> {
        let mut found = Vec::new();
        loop {
            let batch = if checks.is_empty() {
                limit
            } else {
                CHECK_BATCH.max(limit)
            };
            let rows = index::search(conn, sql, batch)?;
            let exhausted = (rows.len() as i64) < batch;
            let last_position = rows.last().map(|r| r.position.clone());
            for row in rows {
                let resource = self.open_matched(&row)?;
                if self.passes_checks(&resource, checks) {
                    found.push((row, resource));
                    if found.len() as i64 >= limit {
                        return Ok(found);
                    }
                }
            }
            if exhausted || checks.is_empty() {
                return Ok(found);
            }
            sql.after = last_position;
        }
    }

    fn fetch_checked(
        &self,
        conn: &mut DbConnection,
        sql: &SearchSql,
        checks: &[LongTermCheck],
        limit: i64,
    ) -> Result<Vec<StoredResource>, AppError> {
        let mut sql = sql.clone();
        Ok(self
            .fetch_rows(conn, &mut sql, checks, limit)?
            .into_iter()
            .map(|(_, resource)| resource)
            .collect())
    }

    fn passes_checks(&self, resource: &StoredResource, checks: &[LongTermCheck]) -> bool {
        if checks.is_empty() {
            return true;
        }
        let Ok(json) = serde_json::from_str::<Value>(&resource.json) else {
            return false;
        };
        let index = self.search_index();
        let values = |code: &str| {
            index
                .plan()
                .extract_param(resource.resource_type.as_str(), code, &json)
        };
        checks.iter().all(|check| match check {
            LongTermCheck::Strings { code, terms } => values(code).iter().any(|value| {
                let SearchValue::String(text) = value else {
                    return false;
                };
                let normalized = normalize_string(text);
                terms
                    .iter()
                    .any(|term| normalized.starts_with(term.as_str()))
            }),
            LongTermCheck::Tuples { code, tuples } => values(code).iter().any(|value| {
                let SearchValue::Composite(parts) = value else {
                    return false;
                };
                tuples.iter().any(|tuple| {
                    tuple.len() == parts.len()
                        && tuple
                            .iter()
                            .zip(parts)
                            .all(|(check, part)| component_passes(index, check, part))
                })
            }),
        })
    }

    pub(crate) fn open_matched(&self, row: &MatchedRow) -> Result<StoredResource, AppError> {
        let resource_type = self.resolve_type(&row.resource_type)?;
        let id = ResourceId::parse(&row.id).map_err(|_| {
            AppError::Internal(format!("stored id of {} is malformed", row.resource_type))
        })?;
        self.open_sealed(
            &resource_type,
            &id,
            row.version_id,
            row.last_updated,
            crate::crypto::EncryptedBlob {
                key_id: row.key_id.clone().unwrap_or_default(),
                wrapped_key: row.wrapped_key.clone().unwrap_or_default(),
                nonce: row.nonce.clone().unwrap_or_default(),
                ciphertext: row.ciphertext.clone().unwrap_or_default(),
            },
        )
    }

    /// The SQL of a search, plus checks to apply after decryption.
    fn search_sql(
        &self,
        conn: &mut DbConnection,
        search: &AuthorizedSearch,
        position: Option<Position>,
    ) -> Result<(SearchSql, Vec<LongTermCheck>), AppError> {
        let request = search.request();
        let mut conditions = Vec::new();
        let mut checks = Vec::new();
        if let Some(patients) = &request.compartments
            && let Some(confined) = self
                .search_index()
                .compartment_condition(&request.resource_types, patients)
        {
            conditions.push(confined);
        }
        if let Some(patient) = &request.in_compartment {
            let patients = std::slice::from_ref(patient);
            conditions.push(
                self.search_index()
                    .compartment_condition(&request.resource_types, patients)
                    .unwrap_or(Condition::Nothing),
            );
        }
        for criterion in &request.criteria {
            conditions.push(self.condition(conn, search, criterion, &mut checks)?);
        }
        // Sorts by digest-only parameters happen after decryption
        // (search_page_sorted_in_memory); the database then returns matches in storage order.
        let in_memory = request.sort.iter().any(sorted_after_decryption);
        let sort = request
            .sort
            .iter()
            .filter(|_| !in_memory)
            .map(|s| {
                let key = match (s.code.as_str(), s.param_type) {
                    ("_lastUpdated", _) => SortKey::LastUpdated,
                    ("_id", _) => SortKey::Id,
                    (code, Some(ParamType::Date)) => SortKey::Date(code.to_owned()),
                    (code, Some(ParamType::Number | ParamType::Quantity)) => {
                        SortKey::Number(code.to_owned())
                    }
                    (code, _) => {
                        return Err(AppError::Internal(format!(
                            "sort key '{code}' cannot be sorted in the database"
                        )));
                    }
                };
                Ok(SortBy {
                    key,
                    descending: s.descending,
                })
            })
            .collect::<Result<Vec<_>, AppError>>()?;
        Ok((
            SearchSql {
                resource_types: request.resource_types.clone(),
                conditions,
                sort,
                after: position,
                backward: false,
            },
            checks,
        ))
    }

    fn condition(
        &self,
        conn: &mut DbConnection,
        search: &AuthorizedSearch,
        criterion: &Criterion,
        checks: &mut Vec<LongTermCheck>,
    ) -> Result<Condition, AppError> {
        let index = self.search_index();
        let resource_types = &search.request().resource_types;
        Ok(match criterion {
            Criterion::Id(ids) => Condition::Id(ids.clone()),
            Criterion::LastUpdated(values) => {
                Condition::LastUpdated(values.iter().filter_map(date_test).collect())
            }
            Criterion::Filter(filter) => filter_condition(index, resource_types, filter, checks),
            Criterion::Chain {
                reference,
                target_types,
                inner,
            } => {
                // One inner search per target type, each authorized and confined on its own.
                let mut targets = Vec::new();
                for target_type in target_types {
                    let inner_search = search.inner_search(target_type, inner)?;
                    let left = MAX_INNER_MATCHES + 1 - targets.len() as i64;
                    targets.extend(self.matching_in(conn, &inner_search, left)?);
                    if targets.len() as i64 > MAX_INNER_MATCHES {
                        return Err(too_broad(reference));
                    }
                }
                let digests = targets
                    .iter()
                    .flat_map(|t| {
                        let text = format!("{}/{}", t.resource_type, t.id);
                        resource_types
                            .iter()
                            .map(move |rt| index.digest(rt, reference, ValueKind::Reference, &text))
                            .collect::<Vec<_>>()
                    })
                    .collect();
                Condition::HasAny(digests)
            }
            Criterion::Has {
                source_type,
                reference,
                inner,
            } => {
                let inner_search = search.inner_search(source_type, inner)?;
                let sources = self.matching_in(conn, &inner_search, MAX_INNER_MATCHES + 1)?;
                if sources.len() as i64 > MAX_INNER_MATCHES {
                    return Err(too_broad(&format!("_has:{source_type}:{reference}")));
                }
                let mut ids = BTreeSet::new();
                for source in &sources {
                    for (target_type, id) in self.references_of(source, reference) {
                        if resource_types.contains(&target_type) {
                            ids.insert(id);
                        }
                    }
                }
                Condition::Id(ids.into_iter().collect())
            }
        })
    }

    /// The local `(type, id)` targets of reference parameter `code` in a resource.
    fn references_of(&self, resource: &StoredResource, code: &str) -> Vec<(String, String)> {
        let Ok(json) = serde_json::from_str::<Value>(&resource.json) else {
            return Vec::new();
        };
        self.search_index()
            .plan()
            .extract_param(resource.resource_type.as_str(), code, &json)
            .into_iter()
            .filter_map(|value| match value {
                SearchValue::Reference(reference) => {
                    match self.search_index().reference_target(&reference) {
                        ReferenceTarget::Local { resource_type, id } => Some((resource_type, id)),
                        _ => None,
                    }
                }
                _ => None,
            })
            .collect()
    }

    /// `_include` and `_revinclude` for one page of matches.
    fn includes(
        &self,
        conn: &mut DbConnection,
        request: &SearchRequest,
        matches: &[StoredResource],
    ) -> Result<Vec<StoredResource>, AppError> {
        let mut seen: HashSet<(String, String)> = matches
            .iter()
            .map(|m| (m.resource_type.to_string(), m.id.to_string()))
            .collect();
        let mut wanted: Vec<(String, String)> = Vec::new();
        for include in &request.includes {
            for source in matches
                .iter()
                .filter(|m| m.resource_type.as_str() == include.source_type)
            {
                for (target_type, id) in self.references_of(source, &include.param) {
                    if include
                        .target_type
                        .as_ref()
                        .is_none_or(|t| *t == target_type)
                    {
                        wanted.push((target_type, id));
                    }
                }
            }
        }
        for Include {
            source_type,
            param,
            target_type,
        } in &request.revincludes
        {
            let Some(scope) = request.revinclude_compartments.get(source_type) else {
                continue;
            };
            let confinement = scope.as_ref().and_then(|patients| {
                self.search_index()
                    .compartment_condition(std::slice::from_ref(source_type), patients)
            });
            let digests: Vec<Digest> = matches
                .iter()
                .filter(|m| {
                    target_type
                        .as_ref()
                        .is_none_or(|t| t == m.resource_type.as_str())
                })
                .map(|m| {
                    self.search_index().digest(
                        source_type,
                        param,
                        ValueKind::Reference,
                        &format!("{}/{}", m.resource_type, m.id),
                    )
                })
                .collect();
            wanted.extend(index::holders_of(
                conn,
                &digests,
                confinement,
                MAX_INCLUDED,
            )?);
        }
        wanted.retain(|key| seen.insert(key.clone()));
        wanted.truncate(usize::try_from(MAX_INCLUDED).unwrap_or(usize::MAX));
        self.current_versions(conn, &wanted)
    }

    /// The current versions of the named resources that exist and are not deleted.
    pub(crate) fn current_versions(
        &self,
        conn: &mut DbConnection,
        wanted: &[(String, String)],
    ) -> Result<Vec<StoredResource>, AppError> {
        let mut by_type: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
        for (resource_type, id) in wanted {
            if self.resolve_type(resource_type).is_ok() {
                by_type.entry(resource_type).or_default().push(id.clone());
            }
        }
        let mut found = Vec::new();
        for (resource_type, ids) in by_type {
            let sql = SearchSql {
                resource_types: vec![resource_type.to_owned()],
                conditions: vec![Condition::Id(ids)],
                sort: Vec::new(),
                after: None,
                backward: false,
            };
            for row in index::search(conn, &sql, MAX_INCLUDED)? {
                found.push(self.open_matched(&row)?);
            }
        }
        Ok(found)
    }
}

/// Whether a sort key can only be ordered after decryption.
fn sorted_after_decryption(key: &SortParam) -> bool {
    matches!(
        key.param_type,
        Some(ParamType::String | ParamType::Token | ParamType::Reference | ParamType::Uri)
    )
}

fn compare_sort_value(a: &SortValue, b: &SortValue) -> std::cmp::Ordering {
    match (a, b) {
        (SortValue::Int(a), SortValue::Int(b)) => a.cmp(b),
        (SortValue::Float(a), SortValue::Float(b)) => a.total_cmp(b),
        (SortValue::Text(a), SortValue::Text(b)) => a.cmp(b),
        // One key always yields one kind; order kinds arbitrarily but consistently.
        (SortValue::Int(_), _) | (SortValue::Float(_), SortValue::Text(_)) => {
            std::cmp::Ordering::Less
        }
        _ => std::cmp::Ordering::Greater,
    }
}

/// Orders two rows' sort values by the keys' directions; missing values sort last either way.
fn compare_sort_values(
    a: &[Option<SortValue>],
    b: &[Option<SortValue>],
    keys: &[SortParam],
) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    for ((a, b), key) in a.iter().zip(b).zip(keys) {
        let ordering = match (a, b) {
            (None, None) => Ordering::Equal,
            (None, Some(_)) => Ordering::Greater,
            (Some(_), None) => Ordering::Less,
            (Some(a), Some(b)) if key.descending => compare_sort_value(b, a),
            (Some(a), Some(b)) => compare_sort_value(a, b),
        };
        if ordering != Ordering::Equal {
            return ordering;
        }
    }
    Ordering::Equal
}

fn too_broad(parameter: &str) -> AppError {
    AppError::BadRequest {
        message: format!(
            "'{parameter}' matches more than {MAX_INNER_MATCHES} resources; narrow the inner search"
        ),
        expression: Some(parameter.to_owned()),
    }
}

fn filter_condition(
    index: &SearchIndex,
    resource_types: &[String],
    filter: &Filter,
    checks: &mut Vec<LongTermCheck>,
) -> Condition {
    let code = filter.code.as_str();
    let digests_for =
        |kind: ValueKind, text: &str| index.digests_on(resource_types, code, kind, text);
    if filter.modifier == Modifier::Missing {
        let present = digests_for(ValueKind::Present, "");
        return match filter.values.first() {
            Some(FilterValue::Missing(true)) => Condition::LacksParam(present),
            _ => Condition::HasParam(present),
        };
    }
    match filter.param_type {
        ParamType::Date => Condition::Date {
            param: code.to_owned(),
            lead: None,
            tests: filter.values.iter().filter_map(date_test).collect(),
        },
        ParamType::Number | ParamType::Quantity => Condition::Number {
            param: code.to_owned(),
            lead: None,
            tests: filter
                .values
                .iter()
                .filter_map(|value| number_test(index, resource_types, code, value))
                .collect(),
        },
        ParamType::Composite => composite_condition(index, resource_types, filter, checks),
        _ => {
            let mut digests = Vec::new();
            let mut long_terms = false;
            for value in &filter.values {
                if let FilterValue::String(text) = value {
                    if filter.modifier == Modifier::Exact {
                        digests.extend(digests_for(ValueKind::Exact, text));
                        continue;
                    }
                    let normalized = normalize_string(text);
                    long_terms |= bounded_prefix(&normalized, index.query_prefix_chars()).len()
                        < normalized.len();
                }
                if let Some((kind, text)) = index.query_form(value, filter.target_type.as_deref()) {
                    digests.extend(digests_for(kind, &text));
                }
            }
            if long_terms {
                // Terms within the bound need no check: every alternative must be long
                // for the check to be exact, so short ones are kept as full terms too.
                let terms = filter
                    .values
                    .iter()
                    .filter_map(|v| match v {
                        FilterValue::String(text) => Some(normalize_string(text)),
                        _ => None,
                    })
                    .collect();
                checks.push(LongTermCheck::Strings {
                    code: code.to_owned(),
                    terms,
                });
            }
            if filter.modifier == Modifier::Not {
                Condition::HasNone(digests)
            } else {
                Condition::HasAny(digests)
            }
        }
    }
}

/// A composite's alternatives (search.html#composite): tuples of hashable components match
/// one digest each; a tuple ending in a date, number or quantity matches a row of that
/// value carrying the leading components' digest. A string component longer than the
/// index's prefix bound is checked in full after decryption.
fn composite_condition(
    index: &SearchIndex,
    resource_types: &[String],
    filter: &Filter,
    checks: &mut Vec<LongTermCheck>,
) -> Condition {
    let code = filter.code.as_str();
    let tuple_digests = |forms: &[(ValueKind, String)]| -> Vec<Digest> {
        resource_types
            .iter()
            .map(|t| index.digest_tuple(t, code, forms))
            .collect()
    };
    let mut digests = Vec::new();
    let mut ranges = Vec::new();
    let mut long_terms = false;
    let mut tuples = Vec::new();
    for value in &filter.values {
        let FilterValue::Composite(parts) = value else {
            continue;
        };
        let Some((last, leading)) = parts.split_last() else {
            continue;
        };
        let forms: Option<Vec<_>> = leading.iter().map(|p| index.query_form(p, None)).collect();
        // A component that can match nothing (an empty string) makes the tuple match nothing.
        let Some(mut forms) = forms else {
            continue;
        };
        tuples.push(parts.iter().map(ComponentCheck::of).collect());
        match last {
            FilterValue::Date { .. } => {
                ranges.extend(date_test(last).map(|test| Condition::Date {
                    param: code.to_owned(),
                    lead: Some(tuple_digests(&forms)),
                    tests: vec![test],
                }))
            }
            FilterValue::Number { .. } | FilterValue::Quantity { .. } => {
                ranges.extend(number_test(index, resource_types, code, last).map(|test| {
                    Condition::Number {
                        param: code.to_owned(),
                        lead: Some(tuple_digests(&forms)),
                        tests: vec![test],
                    }
                }))
            }
            hashable => {
                if let FilterValue::String(text) = hashable {
                    let normalized = normalize_string(text);
                    long_terms |= bounded_prefix(&normalized, index.query_prefix_chars()).len()
                        < normalized.len();
                }
                if let Some(form) = index.query_form(hashable, None) {
                    forms.push(form);
                    digests.extend(tuple_digests(&forms));
                }
            }
        }
    }
    if long_terms {
        checks.push(LongTermCheck::Tuples {
            code: code.to_owned(),
            tuples,
        });
    }
    if ranges.is_empty() {
        Condition::HasAny(digests)
    } else {
        Condition::AnyOf(ranges)
    }
}

fn range_op(prefix: Prefix) -> RangeOp {
    match prefix {
        Prefix::Eq => RangeOp::Eq,
        Prefix::Ne => RangeOp::Ne,
        Prefix::Gt => RangeOp::Gt,
        Prefix::Lt => RangeOp::Lt,
        Prefix::Ge => RangeOp::Ge,
        Prefix::Le => RangeOp::Le,
        Prefix::Sa => RangeOp::StartsAfter,
        Prefix::Eb => RangeOp::EndsBefore,
        Prefix::Ap => RangeOp::Approximately,
    }
}

fn date_test(value: &FilterValue) -> Option<RangeTest<i64>> {
    let FilterValue::Date { prefix, low, high } = *value else {
        return None;
    };
    let (low, high) = if prefix == Prefix::Ap {
        // "Approximately": 10% of the distance from now, at least the value's own range
        // (search.html#prefix leaves the amount to the server).
        let now = crate::clock::now_micros();
        let gap = (now - low).abs().max((now - high).abs()) / 10;
        (low.saturating_sub(gap), high.saturating_add(gap))
    } else {
        (low, high)
    };
    Some(RangeTest {
        op: range_op(prefix),
        low,
        high,
    })
}

fn number_test(
    index: &SearchIndex,
    resource_types: &[String],
    code: &str,
    value: &FilterValue,
) -> Option<NumberTest> {
    let (prefix, number, low, high, unit) = match value {
        FilterValue::Number {
            prefix,
            value,
            low,
            high,
        } => (*prefix, *value, *low, *high, None),
        FilterValue::Quantity {
            prefix,
            value,
            low,
            high,
            system,
            code: unit_code,
        } => {
            // Units are hashed per type: the unit's digest on every searched type.
            let on_each_type =
                |kind: ValueKind, unit: &str| index.digests_on(resource_types, code, kind, unit);
            let unit = match (system, unit_code) {
                (Some(s), Some(c)) => Some(UnitMatch::SystemCode(on_each_type(
                    ValueKind::UnitSystemCode,
                    &system_and_code(s, c),
                ))),
                (None, Some(c)) => Some(UnitMatch::Code(on_each_type(ValueKind::UnitCode, c))),
                _ => None,
            };
            (*prefix, *value, *low, *high, unit)
        }
        _ => return None,
    };
    let (low, high) = if prefix == Prefix::Ap {
        let margin = (number * 0.1).abs();
        (number - margin, number + margin)
    } else {
        (low, high)
    };
    Some(NumberTest {
        range: RangeTest {
            op: range_op(prefix),
            low,
            high,
        },
        value: number,
        unit,
    })
}
