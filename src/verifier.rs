//! `fhirledger verify`: an auditor's check of any fhirledger server from outside. It
//! verifies the server's checkpoint against a pinned key, checks that the log only grew
//! since the checkpoint saved last time (a consistency proof; a shrunk or forked log
//! fails), and optionally that a receipt's entry is included. With a witness policy it
//! checks a checkpoint cosigned by enough of the given witnesses instead, and bounds a
//! receipt's entry time by the witnesses' clocks.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Deserialize;

use crate::ledger::checkpoint::{VerifiedCheckpoint, decode_hash, verify_checkpoint};
use crate::ledger::cosignature::CosignatureVerifier;
use crate::ledger::entry::verify_entry;
use crate::ledger::key_chain::{KeyChain, ListedKey};
use crate::ledger::tree::{self, Hash};

/// Why verification did not succeed; the two kinds map to different exit codes.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Evidence of misbehaviour: a bad signature, a rolled-back or forked log, a proof that
    /// does not verify (exit code 1).
    #[error("VERIFICATION FAILED: {0}")]
    Failed(String),
    /// The check could not be made: network, malformed answers, missing state (exit code 2).
    #[error("could not check: {0}")]
    CouldNotCheck(String),
}

pub struct VerifyOptions {
    /// The server's base URL (the ledger API is at `<server>/ledger/…`).
    pub server: String,
    /// The pinned verifier key, `name+keyid+base64key`.
    pub vkey: String,
    /// Where the last verified checkpoint is kept between runs.
    pub state_file: Option<PathBuf>,
    pub receipt: Option<String>,
    /// A bearer token with the `ledger.read` scope (proofs and receipts need one).
    pub token: Option<String>,
    /// Witnesses whose cosignatures count (their cosignature verifier keys); empty: no
    /// witness policy.
    pub witnesses: Vec<String>,
    /// How many of them must have cosigned the checkpoint (default: all).
    pub witness_threshold: Option<usize>,
    /// How far an entry's stated time may lie outside the witnesses' bounds.
    pub time_tolerance: Duration,
}

/// K of these witnesses must cosign a checkpoint for it to count.
struct WitnessPolicy {
    verifiers: Vec<CosignatureVerifier>,
    threshold: usize,
}

impl WitnessPolicy {
    fn new(options: &VerifyOptions) -> Result<Option<Self>, VerifyError> {
        if options.witnesses.is_empty() {
            return match options.witness_threshold {
                Some(k) if k > 0 => Err(VerifyError::CouldNotCheck(
                    "--witness-threshold needs --witness keys".into(),
                )),
                _ => Ok(None),
            };
        }
        let verifiers = options
            .witnesses
            .iter()
            .map(|vkey| {
                CosignatureVerifier::from_vkey(vkey)
                    .map_err(|e| VerifyError::CouldNotCheck(format!("--witness {vkey}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let threshold = options.witness_threshold.unwrap_or(verifiers.len());
        if threshold == 0 || threshold > verifiers.len() {
            return Err(VerifyError::CouldNotCheck(format!(
                "--witness-threshold must be 1 to the {} witnesses given",
                verifiers.len()
            )));
        }
        Ok(Some(Self {
            verifiers,
            threshold,
        }))
    }

    /// The policy's witnesses that cosigned `note`, with their clocks; fails when fewer than
    /// the threshold did or when a cosignature from one of them is forged.
    fn check(&self, note: &str, what: &str) -> Result<Vec<(String, u64)>, VerifyError> {
        let parsed = signed_note::Note::from_bytes(note.as_bytes())
            .map_err(|e| VerifyError::CouldNotCheck(format!("{what}: {e}")))?;
        let list = signed_note::VerifierList::new(
            self.verifiers
                .iter()
                .map(|v| Box::new(v.clone()) as Box<dyn signed_note::Verifier>)
                .collect(),
        );
        let verified = match parsed.verify(&list) {
            Ok((verified, _)) => verified,
            Err(signed_note::NoteError::UnverifiedNote) => Vec::new(),
            Err(e) => {
                return Err(VerifyError::Failed(format!(
                    "{what}: a witness cosignature does not verify: {e}"
                )));
            }
        };
        let cosigned: Vec<(String, u64)> = verified
            .iter()
            .filter_map(|signature| {
                self.verifiers.iter().find_map(|v| {
                    v.verified_time(parsed.text(), signature)
                        .map(|time| (v.name().to_owned(), time))
                })
            })
            .collect();
        if cosigned.len() < self.threshold {
            return Err(VerifyError::Failed(format!(
                "{what} has {} valid cosignatures of the {} the witness policy requires",
                cosigned.len(),
                self.threshold
            )));
        }
        Ok(cosigned)
    }
}

#[derive(Deserialize)]
struct ProofBody {
    proof: Vec<String>,
    #[serde(default)]
    leaf_hash: Option<String>,
}

#[derive(Deserialize)]
struct KeyChainBody {
    keys: Vec<ListedKey>,
}

#[derive(Deserialize)]
struct ReceiptBody {
    index: Option<u64>,
    leaf_data: String,
}

struct Client {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
}

impl Client {
    /// Like [`Self::get`], with `None` for a 404.
    fn get_found(&self, path: &str) -> Result<Option<String>, VerifyError> {
        let url = format!("{}{path}", self.base);
        let mut request = self.agent.get(&url);
        if let Some(token) = &self.token {
            request = request.header("Authorization", &format!("Bearer {token}"));
        }
        let mut response = match request.call() {
            Ok(response) => response,
            Err(ureq::Error::StatusCode(404)) => return Ok(None),
            Err(ureq::Error::StatusCode(401 | 403)) => {
                return Err(VerifyError::CouldNotCheck(format!(
                    "GET {url}: refused; proofs and receipts need a token with the ledger.read scope (--token)"
                )));
            }
            Err(e) => return Err(VerifyError::CouldNotCheck(format!("GET {url}: {e}"))),
        };
        response
            .body_mut()
            .read_to_string()
            .map(Some)
            .map_err(|e| VerifyError::CouldNotCheck(format!("GET {url}: {e}")))
    }

    fn get(&self, path: &str) -> Result<String, VerifyError> {
        self.get_found(path)?.ok_or_else(|| {
            VerifyError::CouldNotCheck(format!("GET {}{path}: not found (404)", self.base))
        })
    }

    fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, VerifyError> {
        let text = self.get(path)?;
        serde_json::from_str(&text)
            .map_err(|e| VerifyError::CouldNotCheck(format!("{path}: unexpected answer: {e}")))
    }
}

fn decode_proof(hashes: &[String]) -> Result<Vec<Hash>, VerifyError> {
    hashes
        .iter()
        .map(|h| decode_hash(h).map_err(|e| VerifyError::CouldNotCheck(format!("proof hash: {e}"))))
        .collect()
}

/// Runs the checks; `report` receives one line per check passed.
pub fn verify(options: &VerifyOptions, report: &mut dyn FnMut(String)) -> Result<(), VerifyError> {
    KeyChain::single(&options.vkey)
        .map_err(|e| VerifyError::CouldNotCheck(format!("--vkey: {e}")))?;
    let client = Client {
        agent: ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into(),
        base: options.server.trim_end_matches('/').to_owned(),
        token: options.token.clone(),
    };

    let policy = WitnessPolicy::new(options)?;
    let note = match &policy {
        None => client.get("/ledger/checkpoint")?,
        Some(policy) => client
            .get_found(&format!(
                "/ledger/checkpoint/cosigned?cosignatures={}",
                policy.threshold
            ))?
            .ok_or_else(|| {
                VerifyError::Failed(format!(
                    "the server has no checkpoint with the {} cosignatures the witness policy requires",
                    policy.threshold
                ))
            })?,
    };
    let size = note_size(&note)?;
    let chain = key_chain(&client, &options.vkey, size, report)?;
    let current = verify_checkpoint(&note, &chain.keys.for_checkpoint(size).vkey).map_err(|e| {
        VerifyError::Failed(format!(
            "the server's checkpoint does not verify with the pinned key{}: {e}",
            if chain.keys.keys().len() > 1 {
                " or the keys it announced"
            } else {
                ""
            }
        ))
    })?;
    if !chain.keys.signed_from(&options.vkey, size) {
        return Err(VerifyError::Failed(format!(
            "the server's checkpoint (size {size}) is signed by a key older than the pinned one"
        )));
    }
    chain.check_extended_by(&current, report)?;
    report(format!(
        "checkpoint: origin {}, size {}, root {} — signature valid",
        current.origin,
        current.size,
        BASE64.encode(current.root.0)
    ));
    if let Some(policy) = &policy {
        for (name, time) in policy.check(&note, "the checkpoint")? {
            report(format!(
                "cosigned by witness {name} at {}",
                format_posix(time)
            ));
        }
    }

    if let Some(path) = &options.state_file {
        if let Some(previous) = load_state(path, &chain.keys)? {
            check_growth(&client, &previous, &current)?;
            report(format!(
                "consistent with the checkpoint of size {} saved in {}",
                previous.size,
                path.display()
            ));
        } else {
            report(format!(
                "no saved checkpoint in {}: trusting this one from now on",
                path.display()
            ));
        }
    }

    if let Some(receipt) = &options.receipt {
        let body: ReceiptBody =
            client.get_json(&format!("/ledger/receipts/{}", encode_path(receipt)))?;
        let leaf_data = BASE64
            .decode(&body.leaf_data)
            .map_err(|_| VerifyError::CouldNotCheck("receipt: leaf_data is not base64".into()))?;
        // A pending entry is signed by the current key.
        let signer = body
            .index
            .map_or_else(|| chain.keys.current(), |index| chain.keys.for_entry(index));
        let entry = verify_entry(&leaf_data, &signer.verifying).map_err(|e| {
            VerifyError::Failed(format!(
                "receipt {receipt}: the entry's signature does not verify: {e}"
            ))
        })?;
        // A genuine entry is not enough: it must be the one the receipt names.
        if entry.id != *receipt {
            return Err(VerifyError::Failed(format!(
                "receipt {receipt}: the server answered with another entry ({})",
                entry.id.chars().take(64).collect::<String>()
            )));
        }
        let index = body.index.ok_or_else(|| {
            VerifyError::CouldNotCheck(format!(
                "receipt {receipt} is not sequenced yet; retry shortly"
            ))
        })?;
        if index >= current.size {
            return Err(VerifyError::CouldNotCheck(format!(
                "receipt {receipt} (index {index}) is newer than the checkpoint (size {}); retry shortly",
                current.size
            )));
        }
        let proof: ProofBody = client.get_json(&format!(
            "/ledger/proof/inclusion?index={index}&tree_size={}",
            current.size
        ))?;
        let leaf = tree::leaf_hash(&leaf_data);
        if let Some(served) = &proof.leaf_hash
            && decode_hash(served).ok() != Some(leaf)
        {
            return Err(VerifyError::Failed(format!(
                "receipt {receipt}: the server's leaf hash is not the entry's"
            )));
        }
        tree::verify_inclusion(
            &decode_proof(&proof.proof)?,
            current.size,
            current.root,
            index,
            leaf,
        )
        .map_err(|_| {
            VerifyError::Failed(format!(
                "receipt {receipt}: entry #{index} is not in the checkpointed log"
            ))
        })?;
        report(format!(
            "receipt {receipt}: entry #{index} is included in the checkpoint of size {}",
            current.size
        ));
        if let Some(policy) = &policy {
            let entry_time = chrono::DateTime::parse_from_rfc3339(&entry.time)
                .map_err(|_| {
                    VerifyError::Failed(format!("receipt {receipt}: the entry's time is malformed"))
                })?
                .timestamp();
            let bounds = TimeBounds {
                client: &client,
                keys: &chain.keys,
                policy,
                leaf,
                current: &current,
            };
            check_entry_time(&bounds, index, entry_time, options.time_tolerance, report)?;
        }
    }

    if let Some(path) = &options.state_file {
        save_state(path, &current)?;
        report(format!(
            "saved the checkpoint of size {} to {}",
            current.size,
            path.display()
        ));
    }
    Ok(())
}

/// What bounding an entry's time takes: the server, the log's key, the witness policy, the
/// entry's leaf and the cosigned checkpoint already verified.
struct TimeBounds<'a> {
    client: &'a Client,
    keys: &'a KeyChain,
    policy: &'a WitnessPolicy,
    /// The receipt's entry's leaf hash, from the bytes whose signature was checked.
    leaf: Hash,
    current: &'a VerifiedCheckpoint,
}

/// An entry's stated time is the operator's word; the witnesses' clocks bound it. The first
/// cosigned checkpoint that includes the entry shows it existed by then (an upper bound);
/// the last that did not include it shows when the log was still without it (a lower
/// bound, loose by the time an entry waits to be sequenced). A stated time beyond either by
/// more than `tolerance` fails.
fn check_entry_time(
    bounds: &TimeBounds<'_>,
    index: u64,
    entry_time: i64,
    tolerance: Duration,
    report: &mut dyn FnMut(String),
) -> Result<(), VerifyError> {
    let tolerance = i64::try_from(tolerance.as_secs()).unwrap_or(i64::MAX);
    let k = bounds.policy.threshold;
    let covering = bounds
        .client
        .get_found(&format!(
            "/ledger/checkpoint/cosigned?cosignatures={k}&covering={index}"
        ))?
        .ok_or_else(|| {
            VerifyError::Failed(format!(
                "entry #{index} is in a cosigned checkpoint but the server has none covering it"
            ))
        })?;
    let (first, times) = bounds.cosigned(&covering, "the first cosigned checkpoint covering it")?;
    if index >= first.size {
        return Err(VerifyError::Failed(format!(
            "entry #{index}: the checkpoint served as covering it has only {} entries",
            first.size
        )));
    }
    bounds.check_included(index, &first)?;
    // Any one honest witness bounds it: the latest of their clocks.
    let upper = times.iter().map(|(_, t)| *t).max().unwrap_or(0);
    let upper = i64::try_from(upper).unwrap_or(i64::MAX);
    if entry_time > upper.saturating_add(tolerance) {
        return Err(VerifyError::Failed(format!(
            "entry #{index} states the time {}, later than the witnesses saw it in the log ({})",
            format_posix_i64(entry_time),
            format_posix_i64(upper)
        )));
    }
    report(format!(
        "entry #{index}: stated time {} is no later than {} (witnessed in the checkpoint of size {})",
        format_posix_i64(entry_time),
        format_posix_i64(upper),
        first.size
    ));
    let Some(before) = bounds.client.get_found(&format!(
        "/ledger/checkpoint/cosigned?cosignatures={k}&before={index}"
    ))?
    else {
        report(format!(
            "entry #{index}: no cosigned checkpoint precedes it (no lower bound)"
        ));
        return Ok(());
    };
    let (previous, times) = bounds.cosigned(&before, "the last cosigned checkpoint before it")?;
    if previous.size > index {
        return Err(VerifyError::Failed(format!(
            "entry #{index}: the checkpoint served as preceding it already has {} entries",
            previous.size
        )));
    }
    check_growth(bounds.client, &previous, bounds.current)?;
    let lower = times.iter().map(|(_, t)| *t).min().unwrap_or(0);
    let lower = i64::try_from(lower).unwrap_or(i64::MAX);
    if entry_time < lower.saturating_sub(tolerance) {
        return Err(VerifyError::Failed(format!(
            "entry #{index} states the time {}, earlier than the witnesses saw the log without it ({})",
            format_posix_i64(entry_time),
            format_posix_i64(lower)
        )));
    }
    report(format!(
        "entry #{index}: stated time is no earlier than {} less the tolerance (the checkpoint of size {} without it)",
        format_posix_i64(lower),
        previous.size
    ));
    Ok(())
}

impl TimeBounds<'_> {
    /// A cosigned checkpoint: the log's signature and the policy's cosignatures.
    fn cosigned(
        &self,
        note: &str,
        what: &str,
    ) -> Result<(VerifiedCheckpoint, Vec<(String, u64)>), VerifyError> {
        let signer = &self.keys.for_checkpoint(note_size(note)?).vkey;
        let checkpoint = verify_checkpoint(note, signer).map_err(|e| {
            VerifyError::Failed(format!("{what} does not verify with the pinned key: {e}"))
        })?;
        let times = self.policy.check(note, what)?;
        Ok((checkpoint, times))
    }

    /// The entry at `index` is in `checkpoint`'s tree, and that tree in the current one.
    fn check_included(
        &self,
        index: u64,
        checkpoint: &VerifiedCheckpoint,
    ) -> Result<(), VerifyError> {
        check_growth(self.client, checkpoint, self.current)?;
        let proof: ProofBody = self.client.get_json(&format!(
            "/ledger/proof/inclusion?index={index}&tree_size={}",
            checkpoint.size
        ))?;
        tree::verify_inclusion(
            &decode_proof(&proof.proof)?,
            checkpoint.size,
            checkpoint.root,
            index,
            self.leaf,
        )
        .map_err(|_| {
            VerifyError::Failed(format!(
                "entry #{index} is not in the checkpoint of size {}",
                checkpoint.size
            ))
        })
    }
}

fn format_posix(seconds: u64) -> String {
    format_posix_i64(i64::try_from(seconds).unwrap_or(i64::MAX))
}

fn format_posix_i64(seconds: i64) -> String {
    chrono::DateTime::from_timestamp(seconds, 0).map_or_else(
        || format!("{seconds} s"),
        |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    )
}

/// The tree size a checkpoint note states (its second line), before its signature is
/// checked: which key must have signed it depends on it.
fn note_size(note: &str) -> Result<u64, VerifyError> {
    note.lines()
        .nth(1)
        .and_then(|line| line.parse().ok())
        .ok_or_else(|| VerifyError::CouldNotCheck("a checkpoint without a tree size".into()))
}

/// The chain of ledger keys from the pinned one, each link verified.
struct VerifiedChain {
    keys: KeyChain,
    rotations: Vec<crate::ledger::key_chain::VerifiedRotation>,
}

/// Fetches the server's chain of keys (`GET /ledger/keys`, with proofs to the tree of `size`
/// entries) and verifies it from the pinned key; a server without the endpoint has one key.
fn key_chain(
    client: &Client,
    pinned: &str,
    size: u64,
    report: &mut dyn FnMut(String),
) -> Result<VerifiedChain, VerifyError> {
    let Some(body) = client.get_found(&format!("/ledger/keys?tree_size={size}"))? else {
        let keys = KeyChain::single(pinned)
            .map_err(|e| VerifyError::CouldNotCheck(format!("--vkey: {e}")))?;
        return Ok(VerifiedChain {
            keys,
            rotations: Vec::new(),
        });
    };
    let body: KeyChainBody = serde_json::from_str(&body)
        .map_err(|e| VerifyError::CouldNotCheck(format!("/ledger/keys: unexpected answer: {e}")))?;
    let (keys, rotations) = KeyChain::verify(&body.keys, pinned)
        .map_err(|e| VerifyError::Failed(format!("the server's chain of ledger keys: {e}")))?;
    for rotation in &rotations {
        report(format!(
            "ledger key rotated at entry #{}: announced by the key before it in entry #{}, \
             in a checkpoint it signed — link valid",
            rotation.checkpoint.size, rotation.announced_at
        ));
    }
    Ok(VerifiedChain { keys, rotations })
}

impl VerifiedChain {
    /// Every rotation within the checkpoint is in its tree: the announcement checkpoints
    /// are consistent with it.
    fn check_extended_by(
        &self,
        current: &VerifiedCheckpoint,
        report: &mut dyn FnMut(String),
    ) -> Result<(), VerifyError> {
        for rotation in &self.rotations {
            let announced = &rotation.checkpoint;
            if announced.size > current.size {
                continue;
            }
            let proof = rotation.consistency.as_deref().ok_or_else(|| {
                VerifyError::Failed(format!(
                    "the key rotation at entry #{} comes without a proof that the checkpoint extends it",
                    announced.size
                ))
            })?;
            tree::verify_consistency(proof, announced.size, announced.root, current.size, current.root)
                .map_err(|_| {
                    VerifyError::Failed(format!(
                        "the log forked: the checkpoint of size {} does not extend the one that announced the key rotation at entry #{}",
                        current.size, announced.size
                    ))
                })?;
        }
        if self
            .rotations
            .iter()
            .any(|r| r.checkpoint.size <= current.size)
        {
            report(format!(
                "the checkpoint of size {} extends every key announcement before it",
                current.size
            ));
        }
        Ok(())
    }
}

/// The new checkpoint must extend the old one.
fn check_growth(
    client: &Client,
    previous: &VerifiedCheckpoint,
    current: &VerifiedCheckpoint,
) -> Result<(), VerifyError> {
    if current.size < previous.size {
        return Err(VerifyError::Failed(format!(
            "the log was rolled back: it had {} entries, now {}",
            previous.size, current.size
        )));
    }
    if current.size == previous.size {
        return if current.root == previous.root {
            Ok(())
        } else {
            Err(VerifyError::Failed(format!(
                "the log forked: two different roots for size {}",
                current.size
            )))
        };
    }
    let proof: ProofBody = client.get_json(&format!(
        "/ledger/proof/consistency?first={}&second={}",
        previous.size, current.size
    ))?;
    tree::verify_consistency(
        &decode_proof(&proof.proof)?,
        previous.size,
        previous.root,
        current.size,
        current.root,
    )
    .map_err(|_| {
        VerifyError::Failed(format!(
            "the log forked: the checkpoint of size {} does not extend the saved one of size {}",
            current.size, previous.size
        ))
    })
}

fn load_state(path: &Path, keys: &KeyChain) -> Result<Option<VerifiedCheckpoint>, VerifyError> {
    match std::fs::read_to_string(path) {
        Ok(note) => verify_checkpoint(&note, &keys.for_checkpoint(note_size(&note)?).vkey)
            .map(Some)
            .map_err(|e| {
                VerifyError::CouldNotCheck(format!(
                    "{}: the saved checkpoint does not verify with this key: {e}",
                    path.display()
                ))
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(VerifyError::CouldNotCheck(format!(
            "{}: {e}",
            path.display()
        ))),
    }
}

/// Replaces the state file atomically (write a sibling, then rename).
fn save_state(path: &Path, checkpoint: &VerifiedCheckpoint) -> Result<(), VerifyError> {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, &checkpoint.note)
        .and_then(|()| std::fs::rename(&temporary, path))
        .map_err(|e| VerifyError::CouldNotCheck(format!("{}: {e}", path.display())))
}

fn encode_path(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
