//! Start-up: open the database, run migrations, assemble the services, start the ledger
//! sequencer and run the HTTP server until SIGTERM/SIGINT (actix finishes requests in
//! flight first).

use std::sync::Arc;
use std::time::Duration;

use actix_web::HttpServer;

use jsonwebtoken::jwk::JwkSet;

use crate::access::TokenVerifier;
use crate::access::local_issuer::LocalIssuer;
use crate::access::smart::SmartAuthorization;
use crate::api::{AppState, build_app};
use crate::config::ServeArgs;
use crate::crypto::{BlindIndexKey, Envelope, MasterKey};
use crate::fhir::ResourceTypes;
use crate::fhir::capability::{
    CapabilityInputs, capability_statement, describe_bulk_export, describe_search,
};
use crate::fhir::document::format_instant;
use crate::fhir::search_params::SearchParamRegistry;
use crate::indexer::SearchIndex;
use crate::ledger::LedgerKey;
use crate::service::ResourceService;
use crate::service::ledger::{KeyEstablished, LedgerService, SequencerOptions, WitnessEndpoint};
use crate::store::{DatabaseUrl, connection, migrations};

/// How often the export runner looks for queued jobs.
const EXPORT_POLL: Duration = Duration::from_millis(500);
/// How often due Subscription notifications are looked for (accesses are sequenced every
/// ledger interval first, so a notification leaves within about the two together).
const NOTIFY_POLL: Duration = Duration::from_millis(100);
/// Time between two pages of a master key rotation's re-wrapping.
const REWRAP_PAUSE: Duration = Duration::from_millis(20);

/// What the services need besides the database and keys.
#[derive(Debug, Clone)]
pub struct StateOptions {
    pub base_url: String,
    pub max_body_bytes: usize,
    pub pool_size: u32,
    pub ledger_batch_size: i64,
    /// Refusals of unauthenticated requests one address may have per minute.
    pub auth_failures_per_minute: u32,
    /// Issuers whose tokens are accepted, with their published keys.
    pub trusted_issuers: Vec<(String, JwkSet)>,
    /// The trusted identity provider's SMART endpoints, when configured.
    pub smart: Option<SmartAuthorization>,
    /// Browser origins allowed by CORS; empty: no CORS headers.
    pub cors_origins: Vec<String>,
    /// How long a finished bulk export's files are kept.
    pub export_retention: Duration,
    pub witnesses: Vec<WitnessEndpoint>,
    /// Previous master keys of a rotation in progress.
    pub previous_master_keys: Arc<Vec<MasterKey>>,
    /// The outgoing key of a ledger key rotation (see [`LedgerService::establish_key`]).
    pub previous_ledger_key: Option<LedgerKey>,
    /// Opened for index maintenance (`keys rotate-index`): the index key is not checked
    /// against the one the index was built with, which the maintenance itself changes.
    pub index_maintenance: bool,
}

impl StateOptions {
    /// The options `serve`'s configuration gives.
    pub fn from_args(args: &ServeArgs) -> anyhow::Result<Self> {
        Ok(Self {
            base_url: args.resolved_base_url(),
            max_body_bytes: args.max_body_bytes,
            pool_size: args.db_pool_size,
            ledger_batch_size: args.ledger_batch_size,
            auth_failures_per_minute: args.auth_failures_per_minute,
            trusted_issuers: args.load_trusted_issuers()?,
            smart: args.smart_authorization()?,
            cors_origins: args.cors_origins(),
            export_retention: Duration::from_secs(args.export_retention_secs),
            witnesses: args.witnesses.clone(),
            previous_master_keys: Arc::new(args.load_previous_master_keys()?),
            previous_ledger_key: args.load_previous_ledger_key()?,
            index_maintenance: false,
        })
    }
}

/// The keys a server runs with.
pub struct Keys {
    pub master: MasterKey,
    pub ledger: LedgerKey,
    /// Key of the search blind index.
    pub index: BlindIndexKey,
    /// The local token issuer, when the server trusts it.
    pub local_issuer: Option<LocalIssuer>,
}

/// Opens the database, applies pending migrations and assembles the application state.
pub fn prepare_state(
    database_url: &DatabaseUrl,
    keys: Keys,
    options: &StateOptions,
) -> anyhow::Result<AppState> {
    let pool = connection::build_pool(database_url, options.pool_size)?;
    let applied = migrations::run_pending(&mut *pool.get()?)?;
    if applied > 0 {
        tracing::info!(applied, "database migrations applied");
    }
    let types = Arc::new(ResourceTypes::load()?);
    let mut statement = capability_statement(
        &types,
        &CapabilityInputs {
            base_url: &options.base_url,
            software_version: env!("CARGO_PKG_VERSION"),
            date: &format_instant(crate::clock::now_micros()),
            oauth: options
                .smart
                .as_ref()
                .map(SmartAuthorization::oauth_endpoints),
            cors: !options.cors_origins.is_empty(),
        },
    );
    let ledger = LedgerService::new(
        pool.clone(),
        Arc::new(keys.ledger),
        SequencerOptions {
            batch_size: options.ledger_batch_size,
        },
    )
    .with_auth_failure_limit(options.auth_failures_per_minute)
    .with_witnesses(options.witnesses.clone());
    match ledger.establish_key(options.previous_ledger_key.as_ref())? {
        KeyEstablished::Current => {}
        KeyEstablished::Recorded { vkey } => {
            tracing::info!(%vkey, "ledger key recorded as the first of the log's key chain");
        }
        KeyEstablished::Rotated { from, first_index } => tracing::warn!(
            %from,
            to = %ledger.key().vkey(),
            first_index,
            "LEDGER KEY ROTATED: the previous key announced this one and signs nothing more; \
             remove FHIRLEDGER_PREVIOUS_LEDGER_KEY_FILE and destroy the previous key once \
             verifiers have the chain"
        ),
    }
    let search = SearchIndex::new(
        SearchParamRegistry::load()?,
        keys.index,
        format!("{}/fhir", options.base_url),
    );
    describe_search(&mut statement, search.registry(), search.plan());
    describe_bulk_export(&mut statement);
    let resources = ResourceService::new(
        pool,
        Arc::new(
            Envelope::new(keys.master).with_previous(
                options
                    .previous_master_keys
                    .iter()
                    .map(MasterKey::duplicate)
                    .collect(),
            ),
        ),
        types,
        ledger.clone(),
        Arc::new(search),
    )
    .with_max_resource_bytes(options.max_body_bytes)
    .with_export_retention(options.export_retention);
    // Index maintenance rebuilds the whole index itself, with the new key.
    if !options.index_maintenance {
        resources.check_index_key()?;
        let moved = resources.move_presence_digests()?;
        resources.widen_prefixes()?;
        if moved > 0 {
            tracing::info!(
                resources = moved,
                "presence digests moved into the resources table"
            );
        }
    }
    let (tokens, local_jwks) = token_verifier(options, keys.local_issuer.as_ref())?;
    Ok(AppState {
        tokens: Arc::new(tokens),
        local_jwks,
        resources,
        ledger,
        base_url: Arc::from(options.base_url.as_str()),
        max_body_bytes: options.max_body_bytes,
        capability_statement: Arc::from(statement.to_string()),
        smart: options.smart.clone().map(Arc::new),
        cors_origins: options.cors_origins.clone().into(),
    })
}

/// The token verifier: tokens are meant for the base URL or the FHIR base under it, and
/// come from a configured issuer or the local one.
fn token_verifier(
    options: &StateOptions,
    local_issuer: Option<&LocalIssuer>,
) -> anyhow::Result<(TokenVerifier, Option<Arc<str>>)> {
    let base = options.base_url.trim_end_matches('/');
    let mut verifier = TokenVerifier::new(vec![base.to_owned(), format!("{base}/fhir")]);
    for (issuer, jwks) in &options.trusted_issuers {
        verifier
            .trust(issuer, jwks)
            .map_err(|e| anyhow::anyhow!("FHIRLEDGER_TRUSTED_ISSUERS: {e}"))?;
    }
    let local_jwks = match local_issuer {
        Some(local) => {
            let jwks = local.jwks();
            verifier
                .trust_local(local)
                .map_err(|e| anyhow::anyhow!("local issuer: {e}"))?;
            Some(Arc::from(serde_json::to_string(&jwks)?.as_str()))
        }
        None => None,
    };
    Ok((verifier, local_jwks))
}

/// Runs the sequencer every `interval` until the process ends. Several processes may run
/// it against one database: the database lock lets one of them sequence at a time.
pub fn spawn_sequencer(ledger: LedgerService, interval: Duration) {
    spawn_periodic("ledger sequencing", interval, move || {
        // Refusals that cannot be ledgered now are tried again next time; they must not
        // hold up sequencing.
        if let Err(error) = ledger.flush_refusals(false) {
            tracing::warn!(%error, "refusal counts not ledgered; retrying");
        }
        ledger.sequence_pending().map(|_| ())
    });
}

/// Submits each new checkpoint to the configured witnesses as soon as this process's
/// sequencer signs it, and every `interval` at the latest (checkpoints of other processes,
/// witnesses that failed); a round waits for the slowest witness, up to its timeout.
pub fn spawn_witnessing(ledger: LedgerService, interval: Duration) {
    actix_web::rt::spawn(async move {
        loop {
            ledger.wait_for_checkpoint(interval).await;
            let round = ledger.clone();
            match tokio::task::spawn_blocking(move || round.collect_cosignatures()).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::warn!(%error, "witness cosigning failed; retrying"),
                Err(error) => tracing::error!(%error, "witness cosigning task failed"),
            }
        }
    });
}

/// Re-wraps a rotation's data keys a page at a time until none is left (a pause between
/// pages keeps the writer free for requests).
pub fn spawn_rewrapper(
    resources: ResourceService,
    progress: Arc<crate::service::rotation::RotationProgress>,
) {
    spawn_periodic("master key rotation", REWRAP_PAUSE, move || {
        resources.rewrap_page(&progress).map(|_| ())
    });
}

/// Runs bulk export jobs (deleting those whose files expired as it goes) every `interval`
/// until the process ends. One job at a time per process, each page its own transaction,
/// so that exports share the database with interactive requests; several processes on one
/// database take jobs from one queue.
/// Delivers Subscription notifications every `interval` (a round waits briefly for its
/// posts; one to an endpoint that hangs records itself when it ends).
pub fn spawn_notifier(resources: ResourceService, interval: Duration) {
    spawn_periodic("subscription delivery", interval, move || {
        resources.deliver_notifications().map(|_| ())
    });
}

pub fn spawn_export_runner(resources: ResourceService, interval: Duration) {
    spawn_periodic("export runner", interval, move || {
        resources.run_export_jobs().map(|_| ())
    });
}

/// Runs blocking `work` on the blocking pool every `interval` (a late tick waits rather
/// than bunching up), logging a failure and trying again next time.
fn spawn_periodic<F>(what: &'static str, interval: Duration, work: F)
where
    F: Fn() -> Result<(), crate::error::AppError> + Clone + Send + 'static,
{
    actix_web::rt::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            match tokio::task::spawn_blocking(work.clone()).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::warn!(%error, "{what} failed; retrying"),
                Err(error) => tracing::error!(%error, "{what} task failed"),
            }
        }
    });
}

/// `fhirledger serve`.
pub async fn serve(args: ServeArgs, keys: Keys) -> anyhow::Result<()> {
    let database_url = args.database.resolved_database_url();
    let options = StateOptions::from_args(&args)?;
    let state = tokio::task::spawn_blocking({
        let database_url = database_url.clone();
        move || prepare_state(&database_url, keys, &options)
    })
    .await??;
    spawn_sequencer(
        state.ledger.clone(),
        Duration::from_millis(args.ledger_interval_ms),
    );
    spawn_export_runner(state.resources.clone(), EXPORT_POLL);
    spawn_notifier(state.resources.clone(), NOTIFY_POLL);
    let rotation = tokio::task::spawn_blocking({
        let resources = state.resources.clone();
        move || resources.start_rotation()
    })
    .await??;
    if let Some(progress) = rotation {
        spawn_rewrapper(state.resources.clone(), progress);
    }
    if args.sealed {
        let ledger = state.ledger.clone();
        let key_id = state.resources.master_key_id();
        tokio::task::spawn_blocking(move || {
            let ctx = crate::access::RequestContext::internal("unseal");
            ledger.append(
                &ctx,
                crate::service::ledger::LedgerEvent::permit(crate::ledger::Action::KeyUnseal)
                    .about_key(key_id),
            )
        })
        .await??;
    }
    if !args.witnesses.is_empty() {
        spawn_witnessing(
            state.ledger.clone(),
            Duration::from_millis(args.ledger_interval_ms),
        );
    }
    let ledger_at_exit = state.ledger.clone();

    let mut server = HttpServer::new(move || build_app(state.clone()))
        .shutdown_timeout(args.shutdown_timeout)
        .client_request_timeout(Duration::from_secs(60));
    if let Some(workers) = args.workers {
        server = server.workers(workers);
    }
    let server = server.bind(args.address.listen).map_err(|e| {
        anyhow::anyhow!(
            "FHIRLEDGER_LISTEN: cannot listen on {}: {e}",
            args.address.listen
        )
    })?;
    tracing::info!(listen = %args.address.listen, backend = ?database_url.backend(), "fhirledger serving FHIR R4 at /fhir");
    server.run().await?;
    // The refusals counted since the last interval are evidence too.
    let ledger = ledger_at_exit;
    match tokio::task::spawn_blocking(move || ledger.flush_refusals(true)).await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => tracing::error!(%error, "refusals of the last interval not ledgered"),
        Err(error) => tracing::error!(%error, "refusals of the last interval not ledgered"),
    }
    tracing::info!("fhirledger stopped");
    Ok(())
}
