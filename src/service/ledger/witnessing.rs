//! Collecting witnesses' cosignatures: each round submits the latest checkpoint to every
//! configured witness (C2SP tlog-witness `add-checkpoint`) with a consistency proof from the
//! size that witness cosigned last, stores the cosignatures that verify, and keeps each
//! witness's state for `/ledger/witnesses`. It runs beside the sequencer, never in a
//! request's path: a witness that is down or slow delays only the cosigned checkpoint.

use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;
use utoipa::ToSchema;

use crate::clock::now_micros;
use crate::error::AppError;
use crate::ledger::checkpoint::encode_hash;
use crate::ledger::cosignature::CosignatureVerifier;
use crate::ledger::tree;
use crate::store::DbConnection;
use crate::store::ledger::{self as rows, CosignatureRow, DbHashStore};

use super::LedgerService;
use super::log::CurrentCheckpoint;

/// How long one submission may take before the round gives up on that witness.
const SUBMISSION_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes read of a witness's answer (a few signature lines).
const MAX_ANSWER_BYTES: u64 = 64 * 1024;

/// A witness the log submits its checkpoints to: its cosignature verifier key and URL (the
/// submission prefix; `add-checkpoint` is below it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WitnessEndpoint {
    pub verifier: CosignatureVerifier,
    pub url: String,
}

impl WitnessEndpoint {
    /// Parses `VKEY@URL` (the vkey's base64 has no `@`, so the first `@` after the key's
    /// last `+` separates them).
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let key_end = text
            .rfind('+')
            .ok_or_else(|| format!("'{text}' is not VKEY@URL"))?;
        let at = text[key_end..]
            .find('@')
            .map(|i| key_end + i)
            .ok_or_else(|| format!("'{text}' is not VKEY@URL"))?;
        let (vkey, url) = (&text[..at], &text[at + 1..]);
        let verifier = CosignatureVerifier::from_vkey(vkey).map_err(|e| e.to_string())?;
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!("witness URL '{url}' must be http:// or https://"));
        }
        Ok(Self {
            verifier,
            url: url.trim_end_matches('/').to_owned(),
        })
    }
}

/// What the log knows of one witness, as `/ledger/witnesses` shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct WitnessStatus {
    pub name: String,
    pub url: String,
    /// The witness's cosignature verifier key.
    pub vkey: String,
    /// The size of the latest checkpoint it cosigned for this log, once known.
    pub cosigned_size: Option<u64>,
    /// The witness's clock in that cosignature (POSIX seconds).
    pub cosigned_time: Option<u64>,
    /// Entries in the latest checkpoint that it has not cosigned yet.
    pub lag_entries: u64,
    /// Why the last submission failed, until one succeeds.
    pub last_error: Option<String>,
}

#[derive(Debug, Default, Clone)]
struct Known {
    cosigned_size: Option<u64>,
    cosigned_time: Option<u64>,
    last_error: Option<String>,
}

impl Known {
    /// Entries of a checkpoint of `latest` entries that the witness has not cosigned.
    fn lag(&self, latest: u64) -> u64 {
        latest.saturating_sub(self.cosigned_size.unwrap_or(0))
    }
}

/// The configured witnesses and what is known of each.
pub struct Witnesses {
    endpoints: Vec<WitnessEndpoint>,
    known: Mutex<Vec<Known>>,
    agent: ureq::Agent,
    /// A database connection of the rounds' own: under load every pooled connection is
    /// taken by requests, and a round queued behind them delayed cosigning by seconds
    /// (measured: checkpoint to cosigned p99 4.0 s with the pool, see docs/witnesses.md).
    connection: Mutex<Option<DbConnection>>,
    /// Poked by this process's sequencer when it signs a checkpoint, so that a round starts
    /// then rather than at the next tick (which added up to a tick to every cosigning).
    checkpoint_signed: tokio::sync::Notify,
}

impl Witnesses {
    pub fn new(endpoints: Vec<WitnessEndpoint>) -> Self {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(SUBMISSION_TIMEOUT))
            .http_status_as_error(false)
            .build()
            .into();
        Self {
            known: Mutex::new(vec![Known::default(); endpoints.len()]),
            endpoints,
            agent,
            connection: Mutex::new(None),
            checkpoint_signed: tokio::sync::Notify::new(),
        }
    }
}

/// How one submission ended.
enum Submission {
    Cosigned {
        size: u64,
        time: u64,
    },
    /// The witness holds another size for this log (its 409 answer).
    WitnessHolds(u64),
    Failed(String),
}

impl LedgerService {
    /// Waits until this process signs a checkpoint, or `at_most` (checkpoints signed by
    /// other processes, and witnesses that failed, are taken up then).
    pub async fn wait_for_checkpoint(&self, at_most: Duration) {
        // A timeout is the normal way out when nothing was signed.
        let _ = tokio::time::timeout(at_most, self.witnesses.checkpoint_signed.notified()).await;
    }

    /// Tells the witnessing rounds that a checkpoint was signed (kept until a round waits,
    /// so none is missed).
    pub(super) fn checkpoint_signed(&self) {
        self.witnesses.checkpoint_signed.notify_one();
    }

    /// Runs `work` on the witnessing rounds' own connection, opened on first use and again
    /// after a failure.
    fn on_witnessing_connection<T>(
        &self,
        work: impl FnOnce(&mut DbConnection) -> Result<T, AppError>,
    ) -> Result<T, AppError> {
        self.pool
            .on_own_connection(&self.witnesses.connection, work)
    }

    /// One round: the latest checkpoint to every witness that has not cosigned it, all at
    /// once, each with a consistency proof from what it cosigned last. Blocks up to the
    /// submission timeout.
    pub fn collect_cosignatures(&self) -> Result<(), AppError> {
        let Some(row) = self.on_witnessing_connection(|conn| Ok(rows::latest_checkpoint(conn)?))?
        else {
            return Ok(());
        };
        let latest = CurrentCheckpoint::try_from(row)?;
        let known = self.witnesses.known.lock().clone();
        std::thread::scope(|scope| {
            for (i, endpoint) in self.witnesses.endpoints.iter().enumerate() {
                let behind = known[i].cosigned_size.is_none_or(|size| size < latest.size);
                if behind {
                    let latest = &latest;
                    let from = known[i].cosigned_size;
                    scope.spawn(move || self.witness_round(i, endpoint, latest, from));
                }
            }
        });
        if let Some(metrics) = crate::metrics::metrics() {
            let known = self.witnesses.known.lock();
            for (endpoint, known) in self.witnesses.endpoints.iter().zip(known.iter()) {
                let lag = known.lag(latest.size);
                metrics
                    .witness_lag_entries
                    .with_label_values(&[endpoint.verifier.name()])
                    .set(i64::try_from(lag).unwrap_or(i64::MAX));
            }
        }
        Ok(())
    }

    /// Submits `latest` to one witness, once more after a 409 that names its size.
    fn witness_round(
        &self,
        i: usize,
        endpoint: &WitnessEndpoint,
        latest: &CurrentCheckpoint,
        from: Option<u64>,
    ) {
        let mut old = from.unwrap_or(0);
        let mut outcome = self.submit(endpoint, latest, old);
        if let Submission::WitnessHolds(size) = outcome
            && size != old
            && size <= latest.size
        {
            old = size;
            outcome = self.submit(endpoint, latest, old);
        }
        let mut known = self.witnesses.known.lock();
        let state = &mut known[i];
        match outcome {
            Submission::Cosigned { size, time } => {
                state.cosigned_size = Some(size);
                state.cosigned_time = Some(time);
                state.last_error = None;
            }
            Submission::WitnessHolds(size) => {
                let error = if size > latest.size {
                    format!(
                        "the witness holds a tree of {size} entries, larger than this log's {}",
                        latest.size
                    )
                } else {
                    format!("the witness holds size {size} and refused again")
                };
                state.cosigned_size = Some(size);
                report(endpoint, state, error);
            }
            Submission::Failed(error) => report(endpoint, state, error),
        }
    }

    fn submit(
        &self,
        endpoint: &WitnessEndpoint,
        latest: &CurrentCheckpoint,
        old: u64,
    ) -> Submission {
        let mut body = format!("old {old}\n");
        if old > 0 && old < latest.size {
            let proof = self.on_witnessing_connection(|conn| {
                tree::consistency_proof(&DbHashStore::new(conn), old, latest.size)
                    .map_err(AppError::from)
            });
            match proof {
                Ok(proof) => {
                    for hash in proof {
                        body.push_str(&encode_hash(&hash));
                        body.push('\n');
                    }
                }
                Err(e) => return Submission::Failed(format!("consistency proof: {e}")),
            }
        }
        body.push('\n');
        body.push_str(&latest.note);
        let url = format!("{}/add-checkpoint", endpoint.url);
        let mut response = match self
            .witnesses
            .agent
            .post(&url)
            .header("Content-Type", "text/plain; charset=utf-8")
            .send(body.as_bytes())
        {
            Ok(response) => response,
            Err(e) => return Submission::Failed(format!("POST {url}: {e}")),
        };
        let status = response.status().as_u16();
        let size_answer = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/x.tlog.size"));
        let text = match response
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER_BYTES)
            .read_to_string()
        {
            Ok(text) => text,
            Err(e) => return Submission::Failed(format!("POST {url}: {e}")),
        };
        match status {
            200 => self.store_cosignatures(endpoint, latest, &text),
            409 if size_answer => match text.trim().parse::<u64>() {
                Ok(size) => Submission::WitnessHolds(size),
                Err(_) => Submission::Failed("409 with a malformed size".into()),
            },
            _ => Submission::Failed(format!(
                "{status}: {}",
                text.lines()
                    .next()
                    .unwrap_or("")
                    .chars()
                    .take(200)
                    .collect::<String>()
            )),
        }
    }

    /// Keeps the witness's cosignature lines that verify over the checkpoint.
    fn store_cosignatures(
        &self,
        endpoint: &WitnessEndpoint,
        latest: &CurrentCheckpoint,
        answer: &str,
    ) -> Submission {
        let Ok(note) = signed_note::Note::from_bytes(latest.note.as_bytes()) else {
            return Submission::Failed("the stored checkpoint is not a note".into());
        };
        let verified = answer.lines().find_map(|line| {
            let signature = signed_note::Signature::from_bytes(line.as_bytes()).ok()?;
            let time = endpoint.verifier.verified_time(note.text(), &signature)?;
            Some((line.to_owned(), time))
        });
        let Some((line, time)) = verified else {
            return Submission::Failed("no cosignature in the answer verifies".into());
        };
        let (Ok(tree_size), Ok(witness_time)) = (i64::try_from(latest.size), i64::try_from(time))
        else {
            return Submission::Failed("size or time out of range".into());
        };
        let row = CosignatureRow {
            tree_size,
            witness: endpoint.verifier.name().to_owned(),
            signature: line,
            witness_time,
            received_at: now_micros(),
        };
        let insert =
            |conn: &mut DbConnection| rows::insert_cosignature(conn, &row).map_err(AppError::from);
        // On SQLite the round's own connection waited for the write lock behind the one
        // writer, which under load held it nearly always (rounds fell seconds behind); the
        // writer's queue takes the row into its next commit instead.
        let stored = if self.pool.has_one_writer() {
            self.pool.write(insert)
        } else {
            self.on_witnessing_connection(insert)
        };
        match stored {
            Ok(()) => Submission::Cosigned {
                size: latest.size,
                time,
            },
            Err(e) => Submission::Failed(format!("storing the cosignature: {e}")),
        }
    }

    /// What is known of each witness, with its lag behind the latest checkpoint.
    pub async fn witness_status(&self) -> Result<Vec<WitnessStatus>, AppError> {
        let this = self.clone();
        crate::service::blocking(move || this.witness_status_now()).await
    }

    fn witness_status_now(&self) -> Result<Vec<WitnessStatus>, AppError> {
        let latest = self.latest_checkpoint()?.map_or(0, |c| c.size);
        let known = self.witnesses.known.lock();
        Ok(self
            .witnesses
            .endpoints
            .iter()
            .zip(known.iter())
            .map(|(endpoint, known)| WitnessStatus {
                name: endpoint.verifier.name().to_owned(),
                url: endpoint.url.clone(),
                vkey: endpoint.verifier.vkey(),
                cosigned_size: known.cosigned_size,
                cosigned_time: known.cosigned_time,
                lag_entries: known.lag(latest),
                last_error: known.last_error.clone(),
            })
            .collect())
    }
}

/// Records a failed submission, logging it when it differs from the last one (a witness
/// that stays down is reported once, not every round).
fn report(endpoint: &WitnessEndpoint, state: &mut Known, error: String) {
    if state.last_error.as_ref() != Some(&error) {
        tracing::warn!(witness = endpoint.verifier.name(), %error, "witness did not cosign");
    }
    state.last_error = Some(error);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail by panicking")]

    use super::*;
    use crate::ledger::cosignature::WitnessKey;

    #[test]
    fn endpoints_parse_as_vkey_at_url() {
        let vkey = WitnessKey::generate("witness.example/w1")
            .unwrap()
            .verifier()
            .vkey();
        let endpoint = WitnessEndpoint::parse(&format!(" {vkey}@http://127.0.0.1:8090/ ")).unwrap();
        assert_eq!(endpoint.url, "http://127.0.0.1:8090");
        assert_eq!(endpoint.verifier.vkey(), vkey);
        assert!(WitnessEndpoint::parse(&vkey).is_err());
        assert!(WitnessEndpoint::parse(&format!("{vkey}@ftp://x")).is_err());
        assert!(WitnessEndpoint::parse("name+0000+AAAA@http://x").is_err());
    }
}
