//! The ledger key's custody: at start-up the chain of ledger keys is brought in line with the
//! server's key (the log's first key recorded; a rotation from the previous key announced,
//! checkpointed and recorded in one transaction under the sequencer lock; any other key
//! refused), and the chain is listed with its proofs for `GET /ledger/keys`.

use std::sync::atomic::Ordering;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use crate::access::RequestContext;
use crate::clock::now_micros;
use crate::error::AppError;
use crate::ledger::checkpoint::verify_checkpoint;
use crate::ledger::key_chain::{Announcement, ListedKey, encode_all};
use crate::ledger::keys::parse_vkey;
use crate::ledger::sequencer;
use crate::ledger::{Action, LedgerKey, tree};
use crate::store::DbConnection;
use crate::store::ledger::{self as rows, DbHashStore, LedgerKeyRow};

use super::sequencing::{TxSequencerStore, index_patients};
use super::{LedgerEvent, LedgerService, to_i64, to_u64};
use crate::service::blocking;

/// What [`LedgerService::establish_key`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyEstablished {
    /// The server's key is the chain's current key.
    Current,
    /// The log had no recorded chain: its first key is recorded.
    Recorded { vkey: String },
    /// The server's key replaced the previous one from entry `first_index` on.
    Rotated { from: String, first_index: u64 },
}

impl LedgerService {
    /// Brings the chain of ledger keys in line with this server's key, before it serves. A
    /// log that never recorded its chain records the key that signed its latest checkpoint
    /// (this server's, or `previous`) as its first. When `previous` is the chain's current key,
    /// rotates: in one transaction under the sequencer lock, every pending entry is sequenced
    /// with the previous key, an entry signed by it announcing this server's key is appended
    /// and checkpointed with it too, and the new key is recorded as signing everything after
    /// that checkpoint. Any other key is refused: entries it signed would verify with no key a
    /// verifier can reach.
    pub fn establish_key(&self, previous: Option<&LedgerKey>) -> Result<KeyEstablished, AppError> {
        loop {
            let done = self.pool.write(|tx| -> Result<_, AppError> {
                if !rows::try_lock_sequencer(tx)? {
                    return Ok(None); // another process is sequencing: try again
                }
                self.establish_key_in(tx, previous).map(Some)
            })?;
            if let Some(established) = done {
                return Ok(established);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    fn establish_key_in(
        &self,
        tx: &mut DbConnection,
        previous: Option<&LedgerKey>,
    ) -> Result<KeyEstablished, AppError> {
        let ours = self.key.vkey();
        let chain = rows::ledger_keys(tx)?;
        let (current, recorded) = match chain.last() {
            Some(row) => (row.vkey.clone(), false),
            None => (self.first_key(tx, previous)?, true),
        };
        if recorded {
            rows::insert_ledger_key(
                tx,
                &LedgerKeyRow {
                    first_index: 0,
                    vkey: current.clone(),
                    announced_at: None,
                    announcement: None,
                    added_at: now_micros(),
                },
            )?;
        }
        if current == ours {
            return Ok(if recorded {
                KeyEstablished::Recorded { vkey: ours }
            } else {
                KeyEstablished::Current
            });
        }
        if let Some(retired) = chain.iter().find(|row| row.vkey == ours) {
            return Err(AppError::Unavailable(format!(
                "this server's ledger key {ours} was retired: the log has been signed by later keys \
                 since entry {}; configure the current key {current}",
                retired.first_index
            )));
        }
        match previous {
            Some(previous) if previous.vkey() == current => {
                let first_index = self.rotate_in(tx, previous)?;
                Ok(KeyEstablished::Rotated {
                    from: current,
                    first_index,
                })
            }
            _ => Err(AppError::Unavailable(refusal(&current, &ours))),
        }
    }

    /// The key a log that never recorded its chain was signed with: the one its latest
    /// checkpoint verifies with, of this server's and the previous key (this server's for a
    /// log without checkpoints).
    fn first_key(
        &self,
        tx: &mut DbConnection,
        previous: Option<&LedgerKey>,
    ) -> Result<String, AppError> {
        let ours = self.key.vkey();
        let Some(latest) = rows::latest_checkpoint(tx)? else {
            return Ok(ours);
        };
        std::iter::once(ours)
            .chain(previous.map(LedgerKey::vkey))
            .find(|vkey| verify_checkpoint(&latest.note, vkey).is_ok())
            .ok_or_else(|| {
                AppError::Unavailable(format!(
                    "the log's latest checkpoint (size {}) is signed neither by this server's \
                     ledger key {}{}; configure the key that signed it",
                    latest.tree_size,
                    self.key.vkey(),
                    previous.map_or(String::new(), |p| format!(
                        " nor by the previous key {}",
                        p.vkey()
                    ))
                ))
            })
    }

    /// The rotation itself (see [`Self::establish_key`]); returns the new key's first index.
    fn rotate_in(&self, tx: &mut DbConnection, previous: &LedgerKey) -> Result<u64, AppError> {
        let ctx = RequestContext::internal("ledger-key-rotate");
        let event = LedgerEvent::permit(Action::LedgerKeyRotate).about_key(self.key.vkey());
        let announcement = self.sign_event_with(previous, &ctx, event)?;
        let receipt = Self::store_in(tx, &announcement)?;
        let batch = sequencer::sequence_batch(
            &mut TxSequencerStore(&mut *tx),
            previous,
            usize::MAX,
            now_micros(),
        )?;
        index_patients(tx)?;
        let announced_at = rows::entry_by_receipt(tx, &receipt)?
            .and_then(|row| row.leaf_index)
            .ok_or_else(|| AppError::Internal("the key announcement was not sequenced".into()))?;
        let checkpoint = rows::latest_checkpoint(tx)?
            .filter(|row| row.tree_size == to_i64(batch.tree_size).unwrap_or(-1))
            .ok_or_else(|| {
                AppError::Internal("the key announcement was not checkpointed".into())
            })?;
        rows::insert_ledger_key(
            tx,
            &LedgerKeyRow {
                first_index: checkpoint.tree_size,
                vkey: self.key.vkey(),
                announced_at: Some(announced_at),
                announcement: Some(checkpoint.note),
                added_at: now_micros(),
            },
        )?;
        Ok(batch.tree_size)
    }

    /// Refuses to sequence with a key the chain no longer names (a server left running with
    /// a retired key): its checkpoints would verify with no key a verifier can reach. Its
    /// appends stop too, from then on.
    pub(super) fn check_still_current(&self, tx: &mut DbConnection) -> Result<(), AppError> {
        match rows::current_ledger_key(tx)? {
            Some(current) if current != self.key.vkey() => {
                self.retired.store(true, Ordering::Relaxed);
                Err(retired_error())
            }
            _ => Ok(()),
        }
    }

    /// The chain of keys, with proofs to the tree of `tree_size` entries (default: the
    /// latest checkpoint's); see [`list_keys`].
    pub async fn key_chain(&self, tree_size: Option<u64>) -> Result<Vec<ListedKey>, AppError> {
        let this = self.clone();
        blocking(move || {
            let mut conn = this.connection()?;
            let latest = to_u64(rows::tree_size(&mut conn)?)?;
            let size = tree_size.unwrap_or(latest);
            if size > latest {
                return Err(super::out_of_range(format!(
                    "tree_size {size} is beyond the latest checkpoint's {latest}"
                )));
            }
            list_keys(&mut conn, size)
        })
        .await
    }
}

/// The chain of keys as stored, with, for each rotation, the announcement entry, its
/// inclusion proof in the announcing checkpoint and that checkpoint's consistency proof to
/// the tree of `size` entries (when it is no larger).
pub fn list_keys(conn: &mut DbConnection, size: u64) -> Result<Vec<ListedKey>, AppError> {
    let chain = rows::ledger_keys(conn)?;
    let mut listed = Vec::with_capacity(chain.len());
    for row in chain {
        let first_index = to_u64(row.first_index)?;
        let announcement = match (row.announced_at, row.announcement) {
            (Some(index), Some(checkpoint)) => {
                let entry = rows::entries_at(conn, &[index])?.pop().ok_or_else(|| {
                    AppError::Internal(format!("key announcement #{index} is missing"))
                })?;
                let index = to_u64(index)?;
                let hashes = DbHashStore::new(conn);
                let inclusion = tree::inclusion_proof(&hashes, first_index, index)?;
                let consistency = (first_index <= size)
                    .then(|| tree::consistency_proof(&hashes, first_index, size))
                    .transpose()?;
                Some(Announcement {
                    index,
                    leaf_data: BASE64.encode(&entry.data),
                    checkpoint,
                    inclusion: encode_all(&inclusion),
                    consistency: consistency.as_deref().map(encode_all),
                })
            }
            _ => None,
        };
        listed.push(ListedKey {
            vkey: row.vkey,
            first_index,
            announcement,
        });
    }
    Ok(listed)
}

/// Why a server whose key is not the log's current one may not start: the same key under
/// another log origin (another FHIRLEDGER_LEDGER_ORIGIN, or another FHIRLEDGER_BASE_URL or
/// FHIRLEDGER_LISTEN it defaults from), or another key.
fn refusal(current: &str, ours: &str) -> String {
    match (parse_vkey(current), parse_vkey(ours)) {
        (Ok((log_origin, log_key)), Ok((our_origin, our_key))) if log_key == our_key => format!(
            "the log's origin is '{log_origin}' but this server's is '{our_origin}': give it the \
             server's FHIRLEDGER_LEDGER_ORIGIN (or the FHIRLEDGER_BASE_URL or FHIRLEDGER_LISTEN \
             it defaults from)"
        ),
        _ => format!(
            "the log is signed by ledger key {current}, not by this server's key {ours}; to \
             rotate to this key, set FHIRLEDGER_PREVIOUS_LEDGER_KEY_FILE to the file of key \
             {current}"
        ),
    }
}

/// What a server whose ledger key was retired answers instead of ledgering (503).
pub(super) fn retired_error() -> AppError {
    AppError::LedgerUnavailable(
        "this server's ledger key was retired by a key rotation; restart it with the current key"
            .into(),
    )
}
