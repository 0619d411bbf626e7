//! The index key's custody: the check that a server searches with the key its blind index
//! was built with, and the rotation to a new key (`fhirledger keys rotate-index`), which
//! rebuilds every live resource's index rows and presence digests, resumably, and is
//! ledgered when it starts (`index-key-rotate`) and when the old key is retired.

use crate::access::RequestContext;
use crate::crypto::BlindIndexKey;
use crate::crypto::blind_index::MAX_PREFIX_CHARS;
use crate::error::AppError;
use crate::ledger::Action;
use crate::store::search as index;

use super::ResourceService;
use super::ledger::LedgerEvent;

/// Live resources sampled to tell whether a key built an index that never recorded its key.
const KEY_SAMPLE: i64 = 20;

/// What a finished rotation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexRekey {
    pub old_key: String,
    pub new_key: String,
    /// Resources whose index rows were rewritten by this run (a resumed run counts its own).
    pub rebuilt: u64,
    /// Whether this run continued one that had stopped.
    pub resumed: bool,
}

impl ResourceService {
    /// Refuses to serve with an index key other than the one the index was built with:
    /// every search would find nothing and every conditional create would duplicate. A
    /// database that never recorded its key (written before the record existed) records the
    /// configured one, once a sample of its resources shows that key built their digests.
    pub fn check_index_key(&self) -> Result<(), AppError> {
        let configured = self.search_index().key_id();
        let mut conn = self.connection()?;
        let state = index::index_key_state(&mut conn)?;
        if let Some(target) = &state.rekey_to {
            return Err(AppError::Unavailable(format!(
                "the search index is being rebuilt for index key {target} and the rebuild has not \
                 finished; run `fhirledger keys rotate-index` again with the same keys to finish it"
            )));
        }
        match &state.built_with {
            Some(built_with) if *built_with == configured => Ok(()),
            Some(built_with) => Err(AppError::Unavailable(format!(
                "the search index was built with index key {built_with}, but the configured \
                 FHIRLEDGER_INDEX_KEY(_FILE) is key {configured}: searches would find nothing. \
                 Configure the key the index was built with; to change it, run \
                 `fhirledger keys rotate-index --new-key-file PATH` with the current key configured"
            ))),
            None => {
                let sample = index::presence_sample(&mut conn, KEY_SAMPLE)?;
                let matches = sample.iter().any(|(resource_type, presence)| {
                    self.search_index()
                        .presence_digests(resource_type)
                        .iter()
                        .any(|digest| {
                            presence
                                .chunks(digest.len())
                                .any(|d| d == digest.as_slice())
                        })
                });
                if !sample.is_empty() && !matches {
                    return Err(AppError::Unavailable(format!(
                        "the configured index key {configured} did not build this database's \
                         search index (none of {} sampled resources carries its digests); \
                         configure the key it was built with",
                        sample.len()
                    )));
                }
                index::adopt_index_key(&mut conn, &configured)?;
                let state = index::index_key_state(&mut conn)?;
                match state.built_with {
                    Some(built_with) if built_with == configured => Ok(()),
                    _ => Err(AppError::Unavailable(
                        "another server recorded a different index key at the same time".into(),
                    )),
                }
            }
        }
    }

    /// Rebuilds the search index for `new_key` (run while no server writes to the database):
    /// every live resource's index rows and presence digests are rewritten with it, a batch
    /// per transaction, recording how far the rebuild got, so that running it again after an
    /// interruption continues there. The configured key must be the one the index was built
    /// with. When it returns, the index is `new_key`'s and servers must be started with it.
    pub fn rotate_index_key(&self, new_key: BlindIndexKey) -> Result<IndexRekey, AppError> {
        let old_key = self.search_index().key_id();
        let new_index = self.search_index().with_key(new_key);
        let new_key = new_index.key_id();
        if new_key == old_key {
            return Err(AppError::bad_request(
                "the new index key is the key already in use",
            ));
        }
        let state = index::index_key_state(&mut *self.connection()?)?;
        if state
            .built_with
            .as_deref()
            .is_some_and(|built| built != old_key)
        {
            return Err(AppError::bad_request(format!(
                "the configured index key {old_key} is not the one the index was built with ({}); \
                 configure that key as FHIRLEDGER_INDEX_KEY_FILE",
                state.built_with.unwrap_or_default()
            )));
        }
        let (resumed, after) = match &state.rekey_to {
            Some(target) if *target == new_key => (true, state.rekeyed_through),
            Some(target) => {
                return Err(AppError::bad_request(format!(
                    "a rebuild for index key {target} has not finished; finish it with that key \
                     before rotating to another"
                )));
            }
            None => (false, 0),
        };
        if !resumed {
            let ctx = RequestContext::internal("index-key-rotate");
            self.transact("the search index", |tx| {
                index::begin_rekey(tx, &new_key)?;
                Ok(())
            })?;
            self.ledger.append(
                &ctx,
                LedgerEvent::permit(Action::IndexKeyRotate).about_key(&new_key),
            )?;
        }
        tracing::info!(%old_key, %new_key, after, resumed, "rebuilding the search index for a new index key");
        let rebuilt = self.rebuild_index(&new_index, after, index::set_rekeyed_through)?;
        self.transact("the search index", |tx| {
            index::finish_rekey(tx, i32::try_from(MAX_PREFIX_CHARS).unwrap_or(i32::MAX))?;
            Ok(())
        })?;
        self.ledger.append(
            &RequestContext::internal("key-retire"),
            LedgerEvent::permit(Action::KeyRetire).about_key(&old_key),
        )?;
        self.ledger.sequence_pending()?;
        Ok(IndexRekey {
            old_key,
            new_key,
            rebuilt,
            resumed,
        })
    }
}
