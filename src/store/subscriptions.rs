//! Subscriptions and their notifications: the rows matching needs (type, patient, status,
//! the sealed identity of the subscriber) and the durable queue of events to deliver, with
//! their attempts and back-off.

use diesel::prelude::*;

use super::database::DbConnection;
use super::error::StoreError;
use super::schema::{subscription_events, subscriptions};
use crate::crypto::EncryptedBlob;

/// A subscription to accesses of one patient's record (`AuditEvent?patient=…`).
pub const ACCESS: &str = "access";
/// A subscription to writes of resources of one type matching its criteria.
pub const RESOURCE: &str = "resource";

pub const ACTIVE: &str = "active";
pub const ERROR: &str = "error";
pub const OFF: &str = "off";

/// An event's states.
pub const PENDING: &str = "pending";
pub const DELIVERED: &str = "delivered";
pub const SKIPPED: &str = "skipped";
pub const DROPPED: &str = "dropped";

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = subscriptions)]
pub struct SubscriptionRow {
    pub id: String,
    pub kind: String,
    pub resource_type: String,
    pub patient: Option<String>,
    pub status: String,
    pub key_id: String,
    pub wrapped_key: Vec<u8>,
    pub nonce: Vec<u8>,
    pub sealed: Vec<u8>,
    pub failures: i32,
    pub created_at: i64,
    /// `Subscription.end` (µs), after which the subscription is turned off.
    pub ends_at: Option<i64>,
}

impl SubscriptionRow {
    /// The subscriber's sealed identity.
    pub fn sealed(&self) -> EncryptedBlob {
        EncryptedBlob {
            key_id: self.key_id.clone(),
            wrapped_key: self.wrapped_key.clone(),
            nonce: self.nonce.clone(),
            ciphertext: self.sealed.clone(),
        }
    }
}

/// What a subscription is registered with.
pub struct NewSubscription<'a> {
    pub id: &'a str,
    pub kind: &'a str,
    pub resource_type: &'a str,
    pub patient: Option<&'a str>,
    pub status: &'a str,
    pub sealed: &'a EncryptedBlob,
    pub now: i64,
    pub ends_at: Option<i64>,
}

/// Registers a subscription, replacing what an earlier version of it registered (its
/// failures count again from zero).
pub fn upsert(conn: &mut DbConnection, new: &NewSubscription<'_>) -> Result<(), StoreError> {
    remove(conn, new.id)?;
    diesel::insert_into(subscriptions::table)
        .values((
            subscriptions::id.eq(new.id),
            subscriptions::kind.eq(new.kind),
            subscriptions::resource_type.eq(new.resource_type),
            subscriptions::patient.eq(new.patient),
            subscriptions::status.eq(new.status),
            subscriptions::key_id.eq(&new.sealed.key_id),
            subscriptions::wrapped_key.eq(&new.sealed.wrapped_key),
            subscriptions::nonce.eq(&new.sealed.nonce),
            subscriptions::sealed.eq(&new.sealed.ciphertext),
            subscriptions::created_at.eq(new.now),
            subscriptions::ends_at.eq(new.ends_at),
        ))
        .execute(conn)
        .map(|_| ())
        .map_err(StoreError::classify)
}

/// Forgets a subscription (its resource was deleted); its undelivered events are dropped.
pub fn remove(conn: &mut DbConnection, id: &str) -> Result<(), StoreError> {
    drop_pending(conn, id)?;
    diesel::delete(subscriptions::table.find(id))
        .execute(conn)
        .map(|_| ())
        .map_err(StoreError::classify)
}

pub fn subscription(
    conn: &mut DbConnection,
    id: &str,
) -> Result<Option<SubscriptionRow>, StoreError> {
    subscriptions::table
        .find(id)
        .select(SubscriptionRow::as_select())
        .first(conn)
        .optional()
        .map_err(StoreError::classify)
}

/// Queues `focus` for every active subscription to writes of `resource_type`; returns how
/// many. One indexed lookup when there is none, which is every write of most types.
pub fn enqueue_for_type(
    conn: &mut DbConnection,
    resource_type: &str,
    focus: &str,
    now: i64,
) -> Result<usize, StoreError> {
    let ids: Vec<String> = subscriptions::table
        .filter(subscriptions::resource_type.eq(resource_type))
        .filter(subscriptions::kind.eq(RESOURCE))
        .filter(subscriptions::status.eq(ACTIVE))
        .filter(
            subscriptions::ends_at
                .is_null()
                .or(subscriptions::ends_at.gt(now)),
        )
        .select(subscriptions::id)
        .load(conn)
        .map_err(StoreError::classify)?;
    insert_events(conn, ids.iter().map(|id| (id.as_str(), focus)), now)
}

/// Queues each sequenced entry `(patient, leaf index, appended at)` for the active
/// subscriptions to that patient's accesses made since they were registered and before
/// their end; returns how many events.
pub fn enqueue_accesses(
    conn: &mut DbConnection,
    accesses: &[(String, i64, i64)],
    now: i64,
) -> Result<usize, StoreError> {
    if accesses.is_empty() {
        return Ok(0);
    }
    let mut patients: Vec<&str> = accesses.iter().map(|(p, ..)| p.as_str()).collect();
    patients.sort_unstable();
    patients.dedup();
    let mut subscribed: Vec<(String, Option<String>, i64, Option<i64>)> = Vec::new();
    for chunk in patients.chunks(500) {
        subscribed.extend(
            subscriptions::table
                .filter(subscriptions::patient.eq_any(chunk))
                .filter(subscriptions::kind.eq(ACCESS))
                .filter(subscriptions::status.eq(ACTIVE))
                .select((
                    subscriptions::id,
                    subscriptions::patient,
                    subscriptions::created_at,
                    subscriptions::ends_at,
                ))
                .load::<(String, Option<String>, i64, Option<i64>)>(conn)
                .map_err(StoreError::classify)?,
        );
    }
    if subscribed.is_empty() {
        return Ok(0);
    }
    let events: Vec<(&str, String)> = accesses
        .iter()
        .flat_map(|(patient, index, at)| {
            subscribed
                .iter()
                .filter(move |(_, p, since, until)| {
                    p.as_deref() == Some(patient.as_str())
                        && at >= since
                        && until.is_none_or(|until| *at < until)
                })
                .map(move |(id, ..)| (id.as_str(), format!("AuditEvent/ledger-{index}")))
        })
        .collect();
    insert_events(
        conn,
        events.iter().map(|(id, focus)| (*id, focus.as_str())),
        now,
    )
}

fn insert_events<'a>(
    conn: &mut DbConnection,
    events: impl Iterator<Item = (&'a str, &'a str)>,
    now: i64,
) -> Result<usize, StoreError> {
    // One row at a time: a write queues an event per subscription to its type, rarely many.
    let mut inserted = 0;
    for (id, focus) in events {
        inserted += diesel::insert_into(subscription_events::table)
            .values((
                subscription_events::subscription_id.eq(id),
                subscription_events::focus.eq(focus),
                subscription_events::created_at.eq(now),
                subscription_events::next_attempt_at.eq(now),
            ))
            .execute(conn)
            .map_err(StoreError::classify)?;
    }
    Ok(inserted)
}

/// An event due for delivery.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = subscription_events)]
pub struct EventRow {
    pub seq: i64,
    pub subscription_id: String,
    pub focus: String,
    pub created_at: i64,
    pub attempts: i32,
    pub next_attempt_at: i64,
    pub state: String,
    pub done_at: Option<i64>,
}

/// Up to `limit` pending events due at `now`, oldest first, of subscriptions none of whose
/// events waits for a retry (notifications are delivered in order).
pub fn due(conn: &mut DbConnection, now: i64, limit: i64) -> Result<Vec<EventRow>, StoreError> {
    let waiting: Vec<String> = subscription_events::table
        .filter(subscription_events::state.eq(PENDING))
        .filter(subscription_events::next_attempt_at.gt(now))
        .select(subscription_events::subscription_id)
        .distinct()
        .load(conn)
        .map_err(StoreError::classify)?;
    subscription_events::table
        .filter(subscription_events::state.eq(PENDING))
        .filter(subscription_events::next_attempt_at.le(now))
        .filter(subscription_events::subscription_id.ne_all(waiting))
        .order(subscription_events::seq)
        .limit(limit)
        .select(EventRow::as_select())
        .load(conn)
        .map_err(StoreError::classify)
}

/// Claims a due event for one delivery until `lease_until`, so that another server process
/// on the database does not deliver it too; false when another took it first.
pub fn claim(
    conn: &mut DbConnection,
    event: &EventRow,
    lease_until: i64,
) -> Result<bool, StoreError> {
    diesel::update(
        subscription_events::table
            .find(event.seq)
            .filter(subscription_events::state.eq(PENDING))
            .filter(subscription_events::next_attempt_at.eq(event.next_attempt_at)),
    )
    .set(subscription_events::next_attempt_at.eq(lease_until))
    .execute(conn)
    .map(|updated| updated == 1)
    .map_err(StoreError::classify)
}

/// Ends an event: `delivered`, `skipped` or `dropped`.
pub fn finish(conn: &mut DbConnection, seq: i64, state: &str, now: i64) -> Result<(), StoreError> {
    diesel::update(subscription_events::table.find(seq))
        .set((
            subscription_events::state.eq(state),
            subscription_events::done_at.eq(now),
            subscription_events::attempts.eq(subscription_events::attempts + 1),
        ))
        .execute(conn)
        .map(|_| ())
        .map_err(StoreError::classify)
}

/// Records a failed attempt: the event is tried again at `retry_at`.
pub fn retry(conn: &mut DbConnection, seq: i64, retry_at: i64) -> Result<(), StoreError> {
    diesel::update(subscription_events::table.find(seq))
        .set((
            subscription_events::attempts.eq(subscription_events::attempts + 1),
            subscription_events::next_attempt_at.eq(retry_at),
        ))
        .execute(conn)
        .map(|_| ())
        .map_err(StoreError::classify)
}

/// Puts events off until `at` without counting an attempt (those behind one that failed).
pub fn postpone(conn: &mut DbConnection, seqs: &[i64], at: i64) -> Result<(), StoreError> {
    diesel::update(subscription_events::table.filter(subscription_events::seq.eq_any(seqs)))
        .set(subscription_events::next_attempt_at.eq(at))
        .execute(conn)
        .map(|_| ())
        .map_err(StoreError::classify)
}

/// Counts a subscription's consecutive failed deliveries (a success resets it); returns
/// the count.
pub fn record_outcome(conn: &mut DbConnection, id: &str, failed: bool) -> Result<i32, StoreError> {
    let target = subscriptions::table.find(id);
    if failed {
        diesel::update(target)
            .set(subscriptions::failures.eq(subscriptions::failures + 1))
            .execute(conn)
            .map_err(StoreError::classify)?;
    } else {
        diesel::update(target)
            .set(subscriptions::failures.eq(0))
            .execute(conn)
            .map_err(StoreError::classify)?;
    }
    subscriptions::table
        .find(id)
        .select(subscriptions::failures)
        .first(conn)
        .optional()
        .map(Option::unwrap_or_default)
        .map_err(StoreError::classify)
}

/// The active subscriptions whose end has passed by `now`.
pub fn ended(conn: &mut DbConnection, now: i64) -> Result<Vec<String>, StoreError> {
    subscriptions::table
        .filter(subscriptions::status.eq(ACTIVE))
        .filter(subscriptions::ends_at.le(now))
        .select(subscriptions::id)
        .load(conn)
        .map_err(StoreError::classify)
}

/// Sets a subscription's status (`error` after too many failures); its pending events are
/// dropped unless it is active.
pub fn set_status(conn: &mut DbConnection, id: &str, status: &str) -> Result<(), StoreError> {
    diesel::update(subscriptions::table.find(id))
        .set(subscriptions::status.eq(status))
        .execute(conn)
        .map_err(StoreError::classify)?;
    if status != ACTIVE {
        drop_pending(conn, id)?;
    }
    Ok(())
}

/// Drops a subscription's undelivered events.
fn drop_pending(conn: &mut DbConnection, id: &str) -> Result<(), StoreError> {
    diesel::update(
        subscription_events::table
            .filter(subscription_events::subscription_id.eq(id))
            .filter(subscription_events::state.eq(PENDING)),
    )
    .set(subscription_events::state.eq(DROPPED))
    .execute(conn)
    .map(|_| ())
    .map_err(StoreError::classify)
}
