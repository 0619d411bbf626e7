//! The witness (`fhirledger witness`): a small server that cosigns the checkpoints of the
//! logs it follows (C2SP tlog-witness `add-checkpoint`, `cosignature/v1`) once each is
//! consistent with the last one it cosigned, and keeps that last checkpoint on disk so it
//! never cosigns two different trees of one size, across restarts too.
//!
//! Whoever runs it (a second hospital, a regulator, a patient-advocacy group) needs nothing
//! from the log's operator but the log's verifier key; the log needs nothing from it but its
//! URL and cosignature verifier key.

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, web};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use signed_note::{Note, StandardVerifier, VerifierList};
use tlog_tiles::Checkpoint;

use crate::ledger::checkpoint::{decode_hash, encode_hash};
use crate::ledger::cosignature::WitnessKey;
use crate::ledger::tree::{self, Hash};

/// The file, in the witness's directory, holding the latest cosigned checkpoint per log.
pub const STATE_FILE: &str = "witness-state.json";
/// Most consistency-proof lines a request may carry (tlog-witness: a client sends at most 63).
const MAX_PROOF_LINES: usize = 63;
/// Bound on a request body: an old-size line, 63 proof lines and a checkpoint with a few
/// signatures fit in a fraction of it.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Why a checkpoint was not cosigned; each is one status of the tlog-witness protocol.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("this witness does not follow the log '{0}'")]
    UnknownLog(String),
    #[error("no signature on the checkpoint verifies with the log's key")]
    NotSigned,
    /// The old size is not the size of the latest checkpoint cosigned for the log.
    #[error("the latest checkpoint cosigned for this log has size {latest}")]
    OldSizeMismatch { latest: u64 },
    /// A tree of the size already cosigned, with another root: the log forked.
    #[error("a checkpoint of size {size} with another root hash was cosigned: the log forked")]
    Fork { size: u64 },
    #[error("the consistency proof does not verify against the latest cosigned checkpoint")]
    Inconsistent,
    #[error("the witness cannot record its state: {0}")]
    Storage(String),
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Malformed(_) => StatusCode::BAD_REQUEST,
            Self::UnknownLog(_) => StatusCode::NOT_FOUND,
            Self::NotSigned => StatusCode::FORBIDDEN,
            Self::OldSizeMismatch { .. } | Self::Fork { .. } => StatusCode::CONFLICT,
            Self::Inconsistent => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// The latest checkpoint cosigned for one log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Cosigned {
    size: u64,
    root: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct State {
    logs: BTreeMap<String, Cosigned>,
}

/// A witness: its key, the logs it follows (origin → the log's verifier keys: more than one
/// while a log rotates its key) and its state.
pub struct Witness {
    key: WitnessKey,
    logs: HashMap<String, Vec<String>>,
    state_path: PathBuf,
    /// Held from reading the latest size to persisting the new one, so two requests cannot
    /// interleave and roll a log back (tlog-witness's race).
    state: Mutex<State>,
}

impl Witness {
    /// A witness keeping its state in `dir` (created if missing), following the logs whose
    /// verifier keys are `log_vkeys` (the origin is each key's name). Several keys of one
    /// log (its key before and after a rotation) each sign checkpoints the witness accepts;
    /// consistency with what it cosigned last holds across them.
    pub fn open(key: WitnessKey, log_vkeys: &[String], dir: &Path) -> Result<Self, String> {
        let mut logs: HashMap<String, Vec<String>> = HashMap::new();
        for vkey in log_vkeys {
            let verifier =
                StandardVerifier::new(vkey).map_err(|e| format!("log key '{vkey}': {e}"))?;
            let origin = signed_note::Verifier::name(&verifier).to_owned();
            let keys = logs.entry(origin).or_default();
            if !keys.contains(vkey) {
                keys.push(vkey.clone());
            }
        }
        crate::config::ensure_private_dir(dir).map_err(|e| e.to_string())?;
        let state_path = dir.join(STATE_FILE);
        let state = match std::fs::read(&state_path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| format!("{}: {e}", state_path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(format!("{}: {e}", state_path.display())),
        };
        Ok(Self {
            key,
            logs,
            state_path,
            state: Mutex::new(state),
        })
    }

    /// The size of the latest checkpoint cosigned for `origin` (0 when none was).
    pub fn latest_size(&self, origin: &str) -> u64 {
        self.state.lock().logs.get(origin).map_or(0, |c| c.size)
    }

    /// Handles an `add-checkpoint` body at `now` (POSIX seconds): the cosignature lines
    /// when the checkpoint is signed by a log this witness follows and consistent with the
    /// latest it cosigned for that log, which it then records before answering.
    pub fn add_checkpoint(&self, body: &[u8], now: u64) -> Result<String, Refusal> {
        let request = AddCheckpoint::parse(body)?;
        let note = Note::from_bytes(request.checkpoint)
            .map_err(|e| Refusal::Malformed(format!("checkpoint note: {e}")))?;
        let checkpoint = Checkpoint::from_bytes(note.text())
            .map_err(|e| Refusal::Malformed(format!("checkpoint: {e}")))?;
        let origin = checkpoint.origin().to_owned();
        let vkeys = self
            .logs
            .get(&origin)
            .ok_or_else(|| Refusal::UnknownLog(origin.clone()))?;
        let verifiers = vkeys
            .iter()
            .map(|vkey| {
                StandardVerifier::new(vkey)
                    .map(|v| Box::new(v) as Box<dyn signed_note::Verifier>)
                    .map_err(|_| Refusal::NotSigned)
            })
            .collect::<Result<Vec<_>, _>>()?;
        note.verify(&VerifierList::new(verifiers))
            .map_err(|_| Refusal::NotSigned)?;
        let (size, root) = (checkpoint.size(), *checkpoint.hash());
        if request.old_size > size {
            return Err(Refusal::Malformed(format!(
                "old size {} is larger than the checkpoint's {size}",
                request.old_size
            )));
        }

        let mut state = self.state.lock();
        let latest = state.logs.get(&origin).cloned();
        let latest_size = latest.as_ref().map_or(0, |c| c.size);
        if request.old_size != latest_size {
            return Err(Refusal::OldSizeMismatch {
                latest: latest_size,
            });
        }
        match &latest {
            // The tree it cosigned last, again: cosigned again; another root: a fork.
            Some(latest) if latest.size == size && decode_hash(&latest.root).ok() != Some(root) => {
                tracing::warn!(%origin, size, "refused a forked checkpoint");
                return Err(Refusal::Fork { size });
            }
            Some(latest) if latest.size == size => {}
            Some(latest) => {
                let latest_root = decode_hash(&latest.root)
                    .map_err(|e| Refusal::Storage(format!("stored root: {e}")))?;
                tree::verify_consistency(&request.proof, latest.size, latest_root, size, root)
                    .map_err(|_| {
                        tracing::warn!(%origin, size, "refused an inconsistent checkpoint");
                        Refusal::Inconsistent
                    })?;
            }
            None if !request.proof.is_empty() => {
                return Err(Refusal::Malformed(
                    "the consistency proof from size 0 must be empty".into(),
                ));
            }
            None => {}
        }
        let mut next = state.clone();
        next.logs.insert(
            origin,
            Cosigned {
                size,
                root: encode_hash(&root),
            },
        );
        persist(&self.state_path, &next).map_err(|e| Refusal::Storage(e.to_string()))?;
        *state = next;
        drop(state);
        self.key
            .cosign(note.text(), now)
            .map_err(|e| Refusal::Storage(e.to_string()))
    }
}

/// An `add-checkpoint` request body: `old <size>`, up to 63 base64 proof hashes, an empty
/// line, then the signed checkpoint.
struct AddCheckpoint<'a> {
    old_size: u64,
    proof: Vec<Hash>,
    checkpoint: &'a [u8],
}

impl<'a> AddCheckpoint<'a> {
    fn parse(body: &'a [u8]) -> Result<Self, Refusal> {
        let malformed = |why: &str| Refusal::Malformed(why.to_owned());
        let text = std::str::from_utf8(body).map_err(|_| malformed("the body is not UTF-8"))?;
        let (head, checkpoint) = text
            .split_once("\n\n")
            .ok_or_else(|| malformed("no empty line before the checkpoint"))?;
        let mut lines = head.split('\n');
        let old = lines
            .next()
            .and_then(|line| line.strip_prefix("old "))
            .ok_or_else(|| malformed("the first line must be 'old <size>'"))?;
        let canonical =
            old == "0" || (!old.starts_with('0') && old.bytes().all(|b| b.is_ascii_digit()));
        let old_size = old
            .parse::<u64>()
            .ok()
            .filter(|_| canonical)
            .ok_or_else(|| malformed("the old size must be a decimal without leading zeroes"))?;
        let proof = lines
            .map(|line| {
                decode_hash(line).map_err(|_| malformed("a proof line is not a base64 hash"))
            })
            .collect::<Result<Vec<Hash>, Refusal>>()?;
        if proof.len() > MAX_PROOF_LINES {
            return Err(malformed("more than 63 consistency proof lines"));
        }
        Ok(Self {
            old_size,
            proof,
            checkpoint: checkpoint.as_bytes(),
        })
    }
}

/// Writes the state beside its file and renames it into place, syncing both, so a crash
/// leaves the old state or the new one, never a torn one and never a cosignature whose
/// state was not on disk first.
fn persist(path: &Path, state: &State) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
    let temporary = path.with_extension("json.new");
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn now_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn add_checkpoint(witness: web::Data<Arc<Witness>>, body: web::Bytes) -> HttpResponse {
    let witness = Arc::clone(&witness);
    // Checking, persisting (an fsync) and signing block: off the async workers.
    let answer = web::block(move || witness.add_checkpoint(&body, now_seconds()))
        .await
        .unwrap_or_else(|e| Err(Refusal::Storage(e.to_string())));
    match answer {
        Ok(lines) => HttpResponse::Ok()
            .content_type("text/plain; charset=utf-8")
            .body(lines),
        Err(Refusal::OldSizeMismatch { latest }) => HttpResponse::Conflict()
            .content_type("text/x.tlog.size")
            .body(format!("{latest}\n")),
        Err(refusal) => HttpResponse::build(refusal.status())
            .content_type("text/plain; charset=utf-8")
            .body(format!("{refusal}\n")),
    }
}

/// The witness's routes: `POST /add-checkpoint` (the submission prefix is the root).
pub fn configure(witness: Arc<Witness>) -> impl FnOnce(&mut web::ServiceConfig) {
    move |config| {
        config
            .app_data(web::Data::new(witness))
            .app_data(web::PayloadConfig::new(MAX_REQUEST_BYTES))
            .route("/add-checkpoint", web::post().to(add_checkpoint));
    }
}

/// Serves the witness on `listen` until SIGTERM or SIGINT.
pub async fn serve(witness: Arc<Witness>, listen: std::net::SocketAddr) -> std::io::Result<()> {
    actix_web::HttpServer::new(move || {
        actix_web::App::new().configure(configure(Arc::clone(&witness)))
    })
    .bind(listen)?
    .run()
    .await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail by panicking")]

    use super::*;
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as BASE64;

    #[test]
    fn request_bodies_parse_by_the_protocol() {
        let hash = BASE64.encode([1u8; 32]);
        let body = format!("old 5\n{hash}\n{hash}\n\nlog\n9\n{hash}\n\n— log sig\n");
        let parsed = AddCheckpoint::parse(body.as_bytes()).unwrap();
        assert_eq!(parsed.old_size, 5);
        assert_eq!(parsed.proof.len(), 2);
        assert!(parsed.checkpoint.starts_with(b"log\n9\n"));

        for bad in [
            "old 05\n\nx".to_owned(),
            "old -1\n\nx".to_owned(),
            "new 5\n\nx".to_owned(),
            "old 5\nnot-a-hash\n\nx".to_owned(),
            "old 5\nno empty line".to_owned(),
            format!("old 5\n{}\nx", format!("{hash}\n").repeat(64)),
        ] {
            assert!(
                matches!(
                    AddCheckpoint::parse(bad.as_bytes()),
                    Err(Refusal::Malformed(_))
                ),
                "{bad:?}"
            );
        }
        assert_eq!(AddCheckpoint::parse(b"old 0\n\nx").unwrap().old_size, 0);
    }
}
