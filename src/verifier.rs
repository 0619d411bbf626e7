//! `fhirledger verify`: an auditor's check of any fhirledger server from outside. It
//! verifies the server's checkpoint against a pinned key, checks that the log only grew
//! since the checkpoint saved last time (a consistency proof; a shrunk or forked log
//! fails), and optionally that a receipt's entry is included.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Deserialize;

use crate::ledger::checkpoint::{VerifiedCheckpoint, decode_hash, verify_checkpoint};
use crate::ledger::entry::verify_entry;
use crate::ledger::keys::parse_vkey;
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
}

#[derive(Deserialize)]
struct ProofBody {
    proof: Vec<String>,
    #[serde(default)]
    leaf_hash: Option<String>,
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
    fn get(&self, path: &str) -> Result<String, VerifyError> {
        let url = format!("{}{path}", self.base);
        let mut request = self.agent.get(&url);
        if let Some(token) = &self.token {
            request = request.header("Authorization", &format!("Bearer {token}"));
        }
        let mut response = request.call().map_err(|e| match e {
            ureq::Error::StatusCode(401 | 403) => VerifyError::CouldNotCheck(format!(
                "GET {url}: refused; proofs and receipts need a token with the ledger.read scope (--token)"
            )),
            e => VerifyError::CouldNotCheck(format!("GET {url}: {e}")),
        })?;
        response
            .body_mut()
            .read_to_string()
            .map_err(|e| VerifyError::CouldNotCheck(format!("GET {url}: {e}")))
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
    let (_, public_key) = parse_vkey(&options.vkey)
        .map_err(|e| VerifyError::CouldNotCheck(format!("--vkey: {e}")))?;
    let client = Client {
        agent: ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into(),
        base: options.server.trim_end_matches('/').to_owned(),
        token: options.token.clone(),
    };

    let note = client.get("/ledger/checkpoint")?;
    let current = verify_checkpoint(&note, &options.vkey).map_err(|e| {
        VerifyError::Failed(format!(
            "the server's checkpoint does not verify with the pinned key: {e}"
        ))
    })?;
    report(format!(
        "checkpoint: origin {}, size {}, root {} — signature valid",
        current.origin,
        current.size,
        BASE64.encode(current.root.0)
    ));

    if let Some(path) = &options.state_file {
        if let Some(previous) = load_state(path, &options.vkey)? {
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
        let entry = verify_entry(&leaf_data, &public_key).map_err(|e| {
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

fn load_state(path: &Path, vkey: &str) -> Result<Option<VerifiedCheckpoint>, VerifyError> {
    match std::fs::read_to_string(path) {
        Ok(note) => verify_checkpoint(&note, vkey).map(Some).map_err(|e| {
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
