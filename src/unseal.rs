//! The sealed start (`serve --sealed`): until enough master key shares arrive, the listen
//! address answers every request but `/healthz` 503 with an OperationOutcome saying so, and takes shares at
//! `POST /unseal` from this machine only (`fhirledger unseal`). The key is rebuilt in memory;
//! neither it nor a share is ever written to disk.

use std::net::SocketAddr;
use std::sync::Arc;

use actix_web::{HttpRequest, HttpResponse, web};
use parking_lot::Mutex;
use serde::Serialize;

use crate::crypto::MasterKey;
use crate::crypto::shares::{Unsealed, Unsealing};
use crate::error::AppError;

/// The unseal endpoint's path.
pub const UNSEAL_PATH: &str = "/unseal";
/// Bound on a request to the unseal endpoint: a share's text is about 100 bytes.
const MAX_SHARE_BYTES: usize = 4096;

/// What `POST /unseal` answers while the server is sealed or as it unseals.
#[derive(Debug, Serialize)]
pub struct UnsealProgress {
    pub sealed: bool,
    /// Shares accepted so far.
    pub have: usize,
    /// Shares the key was split to need.
    pub need: usize,
    /// The master key id the shares belong to.
    pub key_id: Option<String>,
}

struct Gathering {
    unsealing: Unsealing,
    /// Takes the rebuilt key to the waiting start-up, once.
    done: Option<tokio::sync::oneshot::Sender<MasterKey>>,
}

fn sealed_message(unsealing: &Unsealing) -> String {
    match unsealing.need() {
        None => "the server is sealed: its master key is split into shares; give them with `fhirledger unseal` on this machine".into(),
        Some(need) => format!(
            "the server is sealed: {} more master key shares are needed; give them with `fhirledger unseal` on this machine",
            need.saturating_sub(unsealing.have())
        ),
    }
}

async fn unseal(
    gathering: web::Data<Arc<Mutex<Gathering>>>,
    req: HttpRequest,
    body: String,
) -> Result<HttpResponse, AppError> {
    let local = req.peer_addr().is_some_and(|peer| peer.ip().is_loopback());
    if !local {
        return Err(AppError::Forbidden {
            rule: "unseal-local-only",
            message: "key shares are taken only from this machine".into(),
            patients: Vec::new(),
        });
    }
    let mut gathering = gathering.lock();
    if gathering.done.is_none() {
        return Err(AppError::Conflict("the server is already unsealed".into()));
    }
    // The error names the share (its number) and why; it never repeats the share.
    let outcome = gathering
        .unsealing
        .add(&body)
        .map_err(|e| AppError::bad_request(e.to_string()))?;
    let key_id = gathering.unsealing.key_id().map(str::to_owned);
    match outcome {
        Unsealed::NeedMore { have, need } => {
            tracing::info!(have, need, "master key share accepted");
            Ok(HttpResponse::Accepted().json(UnsealProgress {
                sealed: true,
                have,
                need,
                key_id,
            }))
        }
        Unsealed::Key(key) => {
            let progress = UnsealProgress {
                sealed: false,
                have: gathering.unsealing.have(),
                need: gathering
                    .unsealing
                    .need()
                    .unwrap_or_else(|| gathering.unsealing.have()),
                key_id: Some(key.id().as_str().to_owned()),
            };
            if let Some(done) = gathering.done.take() {
                // The start-up is waiting; it cannot have gone away while this server runs.
                let _ = done.send(key);
            }
            Ok(HttpResponse::Ok().json(progress))
        }
    }
}

async fn sealed_health() -> HttpResponse {
    HttpResponse::Ok().json(crate::api::health::Health { status: "sealed" })
}

async fn sealed(gathering: web::Data<Arc<Mutex<Gathering>>>) -> Result<HttpResponse, AppError> {
    Err(AppError::Sealed(sealed_message(
        &gathering.lock().unsealing,
    )))
}

/// Serves the sealed answers on `listen` until shares rebuild the master key; returns it.
pub async fn wait_for_master_key(listen: SocketAddr) -> anyhow::Result<MasterKey> {
    let (done, key) = tokio::sync::oneshot::channel();
    let gathering = Arc::new(Mutex::new(Gathering {
        unsealing: Unsealing::default(),
        done: Some(done),
    }));
    let server = actix_web::HttpServer::new(move || {
        actix_web::App::new()
            .app_data(web::Data::new(Arc::clone(&gathering)))
            .app_data(web::PayloadConfig::new(MAX_SHARE_BYTES))
            .route(UNSEAL_PATH, web::post().to(unseal))
            // The process is up (a liveness probe must not restart it while custodians
            // gather); `/readyz`, like everything else, answers 503 until it is unsealed.
            .route("/healthz", web::get().to(sealed_health))
            .default_service(web::to(sealed))
    })
    .workers(1)
    .bind(listen)
    .map_err(|e| anyhow::anyhow!("FHIRLEDGER_LISTEN: cannot listen on {listen}: {e}"))?
    .run();
    let handle = server.handle();
    let running = actix_web::rt::spawn(server);
    tracing::warn!(
        %listen,
        "SEALED: waiting for master key shares (fhirledger unseal, on this machine); every other request answers 503"
    );
    let key = tokio::select! {
        key = key => key.map_err(|_| anyhow::anyhow!("the sealed server stopped before it was unsealed"))?,
        stopped = running => {
            stopped??;
            anyhow::bail!("stopped while sealed");
        }
    };
    handle.stop(true).await;
    tracing::info!(key_id = %key.id(), "unsealed: master key rebuilt from its shares");
    Ok(key)
}
