//! The ledger API under `/ledger`: checkpoint, verifier key, entries, receipts, proofs and
//! tiles. Everything here is public log data (entries carry no PHI).

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::request::QueryParams;
use crate::access::RequestContext;
use crate::error::AppError;
use crate::fhir::outcome::OperationOutcome;
use crate::ledger::Action;
use crate::ledger::Hash;
use crate::ledger::checkpoint::{decode_hash, encode_hash};
use crate::ledger::key_chain::ListedKey;
use crate::ledger::tiles::{TILE_WIDTH, parse_tile_path};
use crate::service::ledger::{MAX_ENTRIES_PAGE, ServedEntry, WitnessStatus};
use crate::store::ledger::CosignedCheckpoint;

/// Entries returned when `end` is not given.
const DEFAULT_ENTRIES_PAGE: u64 = 100;

/// The verifier key of the ledger.
#[derive(Debug, Serialize, ToSchema)]
pub struct LedgerKeyInfo {
    /// The log origin, which is also the note key name.
    pub name: String,
    /// C2SP signed-note verifier key: `name+keyid+base64(0x01 ‖ public key)`.
    pub vkey: String,
    /// The 4-byte note key id, hex.
    pub key_id: String,
    pub algorithm: &'static str,
    /// The raw 32-byte Ed25519 public key, base64.
    pub public_key: String,
}

/// The chain of ledger keys, with the proofs that tie each rotation to the tree of
/// `tree_size` entries.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyChainView {
    pub tree_size: u64,
    /// The log's first key, then each key a rotation brought in, in order.
    pub keys: Vec<ListedKey>,
}

/// One entry as served: `leaf_data` is the exact bytes the leaf hash covers.
#[derive(Debug, Serialize, ToSchema)]
pub struct EntryView {
    pub index: u64,
    /// Base64 of the entry's canonical bytes: the RFC 6962 leaf is SHA-256(0x00 ‖ these).
    pub leaf_data: String,
    /// The same entry, parsed.
    #[schema(value_type = Object)]
    pub entry: serde_json::Value,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EntriesPage {
    pub entries: Vec<EntryView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InclusionProof {
    pub leaf_index: u64,
    pub tree_size: u64,
    /// Base64 leaf hash.
    pub leaf_hash: String,
    /// Base64 hashes of the RFC 6962 audit path.
    pub proof: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ConsistencyProof {
    pub first: u64,
    pub second: u64,
    /// Base64 hashes of the RFC 6962 consistency proof.
    pub proof: Vec<String>,
}

/// What a receipt resolves to.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReceiptView {
    pub receipt: String,
    /// The leaf index, once the sequencer has given it one (`null` while pending).
    pub index: Option<u64>,
    pub leaf_data: String,
    #[schema(value_type = Object)]
    pub entry: serde_json::Value,
    /// Inclusion in the latest checkpoint, once sequenced.
    pub inclusion: Option<InclusionProof>,
    /// The latest checkpoint (signed note) the proof is against.
    pub checkpoint: Option<String>,
    /// The first checkpoint witnesses cosigned that includes the entry (the note with their
    /// cosignatures) and the entry's inclusion in it: the witnesses' clocks bound the
    /// entry's time. Absent until one is cosigned, or when the log has no witnesses.
    pub cosigned: Option<CosignedInclusion>,
}

/// An entry's inclusion in a checkpoint cosigned by witnesses.
#[derive(Debug, Serialize, ToSchema)]
pub struct CosignedInclusion {
    pub checkpoint: String,
    pub inclusion: InclusionProof,
}

/// An entry's index (if sequenced), base64 leaf data, and parsed form.
fn view(entry: ServedEntry) -> Result<(Option<u64>, String, serde_json::Value), AppError> {
    let parsed = serde_json::from_slice(&entry.leaf_data)
        .map_err(|e| AppError::Internal(format!("stored ledger entry is not JSON: {e}")))?;
    Ok((entry.index, BASE64.encode(&entry.leaf_data), parsed))
}

impl EntryView {
    /// A sequenced entry (the entries endpoints serve no pending ones).
    fn sequenced(entry: ServedEntry) -> Result<Self, AppError> {
        let (index, leaf_data, entry) = view(entry)?;
        Ok(Self {
            index: index.unwrap_or_default(),
            leaf_data,
            entry,
        })
    }
}

impl InclusionProof {
    fn new(leaf_index: u64, tree_size: u64, leaf: &Hash, proof: &[Hash]) -> Self {
        Self {
            leaf_index,
            tree_size,
            leaf_hash: encode_hash(leaf),
            proof: proof.iter().map(encode_hash).collect(),
        }
    }
}

fn parse_u64(query: &QueryParams, name: &str) -> Result<Option<u64>, AppError> {
    query
        .get(name)
        .map(|text| {
            text.parse::<u64>().map_err(|_| AppError::BadRequest {
                message: format!("{name} must be a non-negative integer"),
                expression: Some(name.to_owned()),
            })
        })
        .transpose()
}

fn required_u64(query: &QueryParams, name: &str) -> Result<u64, AppError> {
    parse_u64(query, name)?.ok_or_else(|| AppError::BadRequest {
        message: format!("{name} is required"),
        expression: Some(name.to_owned()),
    })
}

/// The latest signed checkpoint (C2SP tlog-checkpoint in a signed note).
#[utoipa::path(get, path = "/ledger/checkpoint", tag = "ledger",
    responses(
        (status = 200, description = "Signed checkpoint note", content_type = "text/plain", body = String),
        (status = 503, description = "Database unavailable", body = OperationOutcome),
    ))]
pub async fn checkpoint(state: web::Data<AppState>) -> Result<HttpResponse, AppError> {
    let current = state.ledger.checkpoint().await?;
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/plain; charset=utf-8"))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .body(current.note))
}

/// Most cosignatures a client may require of one checkpoint.
const MAX_REQUIRED_COSIGNATURES: u64 = 100;

/// A checkpoint cosigned by witnesses (C2SP tlog-cosignature lines after the log's
/// signature): the latest with at least `cosignatures` of them, or with `covering=I` the
/// first that includes entry I (its witnesses' clocks bound that entry's time from above),
/// or with `before=I` the last that does not.
#[utoipa::path(get, path = "/ledger/checkpoint/cosigned", tag = "ledger",
    params(
        ("cosignatures" = Option<u64>, Query, description = "Fewest cosignatures (default 1)"),
        ("covering" = Option<u64>, Query, description = "The first cosigned checkpoint including this entry index"),
        ("before" = Option<u64>, Query, description = "The last cosigned checkpoint not including this entry index"),
    ),
    responses(
        (status = 200, description = "Signed checkpoint note with cosignatures", content_type = "text/plain", body = String),
        (status = 400, description = "Malformed parameters", body = OperationOutcome),
        (status = 404, description = "No checkpoint has that many cosignatures (yet)", body = OperationOutcome),
    ))]
pub async fn cosigned_checkpoint(
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse, AppError> {
    let query = QueryParams::parse(&req, &["cosignatures", "covering", "before"])?;
    let min = parse_u64(&query, "cosignatures")?.unwrap_or(1);
    if !(1..=MAX_REQUIRED_COSIGNATURES).contains(&min) {
        return Err(AppError::BadRequest {
            message: format!("cosignatures must be 1 to {MAX_REQUIRED_COSIGNATURES}"),
            expression: Some("cosignatures".into()),
        });
    }
    let index = |name: &str| -> Result<Option<i64>, AppError> {
        parse_u64(&query, name)?
            .map(|i| {
                i64::try_from(i).map_err(|_| AppError::BadRequest {
                    message: format!("{name} is out of range"),
                    expression: Some(name.to_owned()),
                })
            })
            .transpose()
    };
    let which = match (index("covering")?, index("before")?) {
        (None, None) => CosignedCheckpoint::Latest,
        (Some(i), None) => CosignedCheckpoint::Covering(i),
        (None, Some(i)) => CosignedCheckpoint::Before(i),
        (Some(_), Some(_)) => {
            return Err(AppError::bad_request(
                "give at most one of covering and before",
            ));
        }
    };
    let (_, note) = state
        .ledger
        .cosigned_checkpoint(which, min)
        .await?
        .ok_or_else(|| {
            AppError::NotFound(format!(
                "no checkpoint {} has {min} cosignatures",
                match which {
                    CosignedCheckpoint::Latest => "yet".to_owned(),
                    CosignedCheckpoint::Covering(i) => format!("including entry {i}"),
                    CosignedCheckpoint::Before(i) => format!("before entry {i}"),
                }
            ))
        })?;
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/plain; charset=utf-8"))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .body(note))
}

/// The witnesses this log submits its checkpoints to, and how far each has cosigned.
#[utoipa::path(get, path = "/ledger/witnesses", tag = "ledger",
    responses(
        (status = 200, description = "Each witness's state", body = [WitnessStatus]),
    ))]
pub async fn witnesses(state: web::Data<AppState>) -> Result<HttpResponse, AppError> {
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(state.ledger.witness_status().await?))
}

/// The key that verifies checkpoints and entry signatures.
#[utoipa::path(get, path = "/ledger/key", tag = "ledger",
    responses((status = 200, description = "Verifier key", body = LedgerKeyInfo)))]
pub async fn key(state: web::Data<AppState>) -> HttpResponse {
    let key = state.ledger.key();
    HttpResponse::Ok().json(LedgerKeyInfo {
        name: key.name().to_owned(),
        vkey: key.vkey(),
        key_id: format!("{:08x}", key.key_id()),
        algorithm: "Ed25519",
        public_key: BASE64.encode(key.verifying_key().as_bytes()),
    })
}

/// The chain of keys that signed the log: each key after the first was announced by an entry
/// the key before it signed, in a checkpoint that key signed, whose inclusion proof and
/// consistency proof to the tree of `tree_size` entries (default: the latest checkpoint's)
/// come with it. A verifier that pinned any key of the chain follows it to the current one
/// (`fhirledger verify` does). Public: the announcements carry no PHI.
#[utoipa::path(get, path = "/ledger/keys", tag = "ledger",
    params(("tree_size" = Option<u64>, Query, description = "Prove each announcement's checkpoint consistent with the tree of this size")),
    responses(
        (status = 200, description = "The chain of ledger keys", body = KeyChainView),
        (status = 400, description = "tree_size malformed or beyond the latest checkpoint", body = OperationOutcome),
    ))]
pub async fn keys(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, AppError> {
    let query = QueryParams::parse(&req, &["tree_size"])?;
    let size = match parse_u64(&query, "tree_size")? {
        Some(size) => size,
        None => state.ledger.checkpoint().await?.size,
    };
    let keys = state.ledger.key_chain(Some(size)).await?;
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(KeyChainView {
            tree_size: size,
            keys,
        }))
}

/// Sequenced entries with `start <= index < end`, in index order (at most 1000).
#[utoipa::path(get, path = "/ledger/entries", tag = "ledger",
    params(
        ("start" = Option<u64>, Query, description = "First index (default 0)"),
        ("end" = Option<u64>, Query, description = "Index after the last (default start+100; at most start+1000)"),
    ),
    responses(
        (status = 200, description = "Entries", body = EntriesPage),
        (status = 400, description = "Malformed or inverted range", body = OperationOutcome),
    ))]
pub async fn entries(
    state: web::Data<AppState>,
    ctx: RequestContext,
    req: HttpRequest,
) -> Result<HttpResponse, AppError> {
    state
        .ledger
        .authorize_read(&ctx, Action::LedgerRead)
        .await?;
    let query = QueryParams::parse(&req, &["start", "end"])?;
    let start = parse_u64(&query, "start")?.unwrap_or(0);
    let end = parse_u64(&query, "end")?.unwrap_or(start.saturating_add(DEFAULT_ENTRIES_PAGE));
    if end < start {
        return Err(AppError::BadRequest {
            message: "end must not be below start".into(),
            expression: Some("end".into()),
        });
    }
    if end - start > MAX_ENTRIES_PAGE as u64 {
        return Err(AppError::BadRequest {
            message: format!("at most {MAX_ENTRIES_PAGE} entries per page"),
            expression: Some("end".into()),
        });
    }
    let served = state.ledger.entries(start, end).await?;
    let entries = served
        .into_iter()
        .map(EntryView::sequenced)
        .collect::<Result<Vec<_>, AppError>>()?;
    Ok(HttpResponse::Ok().json(EntriesPage { entries }))
}

/// One sequenced entry.
#[utoipa::path(get, path = "/ledger/entries/{index}", tag = "ledger",
    params(("index" = u64, Path, description = "Leaf index")),
    responses(
        (status = 200, description = "The entry", body = EntryView),
        (status = 400, description = "Malformed index", body = OperationOutcome),
        (status = 404, description = "No entry has that index yet", body = OperationOutcome),
    ))]
pub async fn entry(
    state: web::Data<AppState>,
    ctx: RequestContext,
    path: web::Path<String>,
) -> Result<HttpResponse, AppError> {
    state
        .ledger
        .authorize_read(&ctx, Action::LedgerRead)
        .await?;
    let index: u64 = path
        .parse()
        .map_err(|_| AppError::bad_request("index must be a non-negative integer"))?;
    let served = state.ledger.entries(index, index.saturating_add(1)).await?;
    let found = served
        .into_iter()
        .next()
        .ok_or_else(|| AppError::NotFound(format!("ledger entry {index}")))?;
    Ok(HttpResponse::Ok().json(EntryView::sequenced(found)?))
}

/// Resolves the receipt from a response's `X-Ledger-Entry` header: the entry, its index
/// once sequenced, and its inclusion proof in the latest checkpoint.
#[utoipa::path(get, path = "/ledger/receipts/{receipt}", tag = "ledger",
    params(("receipt" = String, Path, description = "Value of an X-Ledger-Entry header")),
    responses(
        (status = 200, description = "The entry and its proof", body = ReceiptView),
        (status = 404, description = "Unknown receipt", body = OperationOutcome),
    ))]
pub async fn receipt(
    state: web::Data<AppState>,
    ctx: RequestContext,
    path: web::Path<String>,
) -> Result<HttpResponse, AppError> {
    state
        .ledger
        .authorize_read(&ctx, Action::LedgerRead)
        .await?;
    let served = state.ledger.entry_by_receipt(path.into_inner()).await?;
    let receipt = served.receipt.clone();
    let (index, leaf_data, entry) = view(served)?;
    let (inclusion, checkpoint, cosigned) = match index {
        Some(index) => {
            let current = state.ledger.checkpoint().await?;
            let (leaf, proof) = state.ledger.inclusion_proof(index, current.size).await?;
            let inclusion = InclusionProof::new(index, current.size, &leaf, &proof);
            let cosigned = cosigned_inclusion(&state, index).await?;
            (Some(inclusion), Some(current.note), cosigned)
        }
        None => (None, None, None),
    };
    Ok(HttpResponse::Ok().json(ReceiptView {
        receipt,
        index,
        leaf_data,
        entry,
        inclusion,
        checkpoint,
        cosigned,
    }))
}

/// The first cosigned checkpoint including entry `index`, with the entry's proof in it.
async fn cosigned_inclusion(
    state: &AppState,
    index: u64,
) -> Result<Option<CosignedInclusion>, AppError> {
    let covering = i64::try_from(index)
        .map_err(|_| AppError::Internal(format!("entry index {index} out of range")))?;
    let Some((size, note)) = state
        .ledger
        .cosigned_checkpoint(CosignedCheckpoint::Covering(covering), 1)
        .await?
    else {
        return Ok(None);
    };
    let (leaf, proof) = state.ledger.inclusion_proof(index, size).await?;
    Ok(Some(CosignedInclusion {
        checkpoint: note,
        inclusion: InclusionProof::new(index, size, &leaf, &proof),
    }))
}

/// RFC 6962 audit path, by `index` or by `leaf_hash`.
#[utoipa::path(get, path = "/ledger/proof/inclusion", tag = "ledger",
    params(
        ("index" = Option<u64>, Query, description = "Leaf index (or give leaf_hash)"),
        ("leaf_hash" = Option<String>, Query, description = "Base64 leaf hash (or give index)"),
        ("tree_size" = u64, Query, description = "Tree size of a checkpoint"),
    ),
    responses(
        (status = 200, description = "Audit path", body = InclusionProof),
        (status = 400, description = "Malformed or out-of-range parameters", body = OperationOutcome),
        (status = 404, description = "No entry has that leaf hash", body = OperationOutcome),
    ))]
pub async fn inclusion_proof(
    state: web::Data<AppState>,
    ctx: RequestContext,
    req: HttpRequest,
) -> Result<HttpResponse, AppError> {
    state
        .ledger
        .authorize_read(&ctx, Action::LedgerRead)
        .await?;
    let query = QueryParams::parse(&req, &["index", "leaf_hash", "tree_size"])?;
    let tree_size = required_u64(&query, "tree_size")?;
    let index = match (parse_u64(&query, "index")?, query.get("leaf_hash")) {
        (Some(index), None) => index,
        (None, Some(text)) => {
            let leaf = decode_hash(text).map_err(|e| AppError::BadRequest {
                message: format!("leaf_hash: {e}"),
                expression: Some("leaf_hash".into()),
            })?;
            state
                .ledger
                .entry_by_leaf_hash(leaf)
                .await?
                .index
                .ok_or_else(|| AppError::NotFound("entry not sequenced".into()))?
        }
        _ => {
            return Err(AppError::bad_request(
                "give exactly one of index and leaf_hash",
            ));
        }
    };
    let (leaf, proof) = state.ledger.inclusion_proof(index, tree_size).await?;
    Ok(HttpResponse::Ok().json(InclusionProof::new(index, tree_size, &leaf, &proof)))
}

/// RFC 6962 consistency proof between two tree sizes.
#[utoipa::path(get, path = "/ledger/proof/consistency", tag = "ledger",
    params(
        ("first" = u64, Query, description = "Smaller tree size"),
        ("second" = u64, Query, description = "Larger tree size (at most the latest checkpoint's)"),
    ),
    responses(
        (status = 200, description = "Consistency proof", body = ConsistencyProof),
        (status = 400, description = "Malformed or out-of-range parameters", body = OperationOutcome),
    ))]
pub async fn consistency_proof(
    state: web::Data<AppState>,
    ctx: RequestContext,
    req: HttpRequest,
) -> Result<HttpResponse, AppError> {
    state
        .ledger
        .authorize_read(&ctx, Action::LedgerRead)
        .await?;
    let query = QueryParams::parse(&req, &["first", "second"])?;
    let first = required_u64(&query, "first")?;
    let second = required_u64(&query, "second")?;
    let proof = state.ledger.consistency_proof(first, second).await?;
    Ok(HttpResponse::Ok().json(ConsistencyProof {
        first,
        second,
        proof: proof.iter().map(encode_hash).collect(),
    }))
}

/// A C2SP tlog-tiles entry bundle: `tile/entries/<N>` or partial `tile/entries/<N>.p/<W>`,
/// for monitors and mirrors that fetch the whole log with standard tools. Entries name who
/// touched which patient's record, so a bundle needs `ledger.read` as `/ledger/entries` does.
#[utoipa::path(get, path = "/ledger/tile/entries/{N}", tag = "ledger",
    params(
        ("N" = String, Path, description = "Bundle index in x-prefixed 3-digit groups, optionally with .p/<W>"),
    ),
    responses(
        (status = 200, description = "Each entry's leaf bytes after its big-endian 16-bit length", content_type = "application/octet-stream"),
        (status = 400, description = "Malformed path", body = OperationOutcome),
        (status = 403, description = "The token lacks the ledger.read scope", body = OperationOutcome),
        (status = 404, description = "The bundle's entries are not all in the latest checkpoint", body = OperationOutcome),
        (status = 409, description = "An entry written before entries were bounded is too large for a bundle; read it at /ledger/entries/{index}", body = OperationOutcome),
    ))]
pub async fn entry_bundle(
    state: web::Data<AppState>,
    ctx: RequestContext,
    path: web::Path<String>,
) -> Result<HttpResponse, AppError> {
    state
        .ledger
        .authorize_read(&ctx, Action::LedgerRead)
        .await?;
    // An entry bundle's index is written as a level-0 tile's.
    let tile = parse_tile_path(&format!("0/{path}"))
        .map_err(|e| AppError::bad_request(e.to_string().replace("'0/", "'entries/")))?;
    let data = state.ledger.entry_bundle(tile).await?;
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "application/octet-stream"))
        .insert_header((header::CACHE_CONTROL, "private, no-cache"))
        .body(data))
}

/// A C2SP tlog-tiles hash tile: `tile/<L>/<N>` or partial `tile/<L>/<N>.p/<W>`.
#[utoipa::path(get, path = "/ledger/tile/{L}/{N}", tag = "ledger",
    params(
        ("L" = u8, Path, description = "Tile level (0–7)"),
        ("N" = String, Path, description = "Tile index in x-prefixed 3-digit groups, optionally with .p/<W>"),
    ),
    responses(
        (status = 200, description = "Concatenated 32-byte hashes", content_type = "application/octet-stream"),
        (status = 400, description = "Malformed tile path", body = OperationOutcome),
        (status = 404, description = "The tile is not in the tree yet", body = OperationOutcome),
    ))]
pub async fn tile(
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, AppError> {
    let tile = parse_tile_path(&path).map_err(|e| AppError::bad_request(e.to_string()))?;
    let data = state.ledger.tile(tile).await?;
    // Full tiles never change; partial ones are replaced by wider ones as the log grows.
    let cache = if tile.width == TILE_WIDTH {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "application/octet-stream"))
        .insert_header((header::CACHE_CONTROL, cache))
        .body(data))
}
