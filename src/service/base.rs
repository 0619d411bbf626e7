//! The service's base: [`ResourceService`] and the handles every part of it works
//! with (the pool, the envelope, the resource types, the ledger, the indexer), database
//! transactions, and opening a sealed version for a client. The parts built on it: the access
//! gate (`gate`), the write pipeline (`write`), the search engine (`search`), and the use
//! cases (`resources`, `bundles`, `everything`, `audit_events`).

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::crypto::{EncryptedBlob, Envelope, ResourceBinding};
use crate::error::AppError;
use crate::fhir::document::{VersionId, VersionMeta};
use crate::fhir::{ResourceId, ResourceType, ResourceTypes};
use crate::ledger::EntryResource;
use crate::store::resources::VersionRow;
use crate::store::{DbConnection, DbPool};

use super::blocking;
use super::ledger::LedgerService;
use crate::indexer::SearchIndex;

/// A resource version as returned to a client.
#[derive(Debug, Clone)]
pub struct StoredResource {
    pub resource_type: ResourceType,
    pub id: ResourceId,
    pub meta: VersionMeta,
    /// The stored JSON (decrypted).
    pub json: String,
}

/// A resource read for a client, with the compartments it is in (for its ledger entry).
#[derive(Debug, Clone)]
pub(crate) struct Disclosed {
    pub resource: StoredResource,
    /// `None` for a type outside compartments.
    pub members: Option<BTreeSet<String>>,
}

/// Services over stored resources. Cheap to clone.
#[derive(Clone)]
pub struct ResourceService {
    pub(super) pool: DbPool,
    pub(super) envelope: Arc<Envelope>,
    pub(super) types: Arc<ResourceTypes>,
    pub(super) ledger: LedgerService,
    pub(super) search: Arc<SearchIndex>,
    /// Largest resource a PATCH may produce (the request body limit: what a PUT may send).
    pub(super) max_resource_bytes: usize,
    /// How long a finished export job and its files are kept.
    pub(super) export_retention: std::time::Duration,
    /// The Subscription notifier's own connection (see `subscriptions.rs`).
    pub(super) notifier_connection: Arc<parking_lot::Mutex<Option<DbConnection>>>,
    /// The notifier's HTTP client: one pool of kept-alive connections to the endpoints.
    pub(super) notifier_agent: ureq::Agent,
}

impl ResourceService {
    pub fn new(
        pool: DbPool,
        envelope: Arc<Envelope>,
        types: Arc<ResourceTypes>,
        ledger: LedgerService,
        search: Arc<SearchIndex>,
    ) -> Self {
        Self {
            pool,
            envelope,
            types,
            ledger,
            search,
            max_resource_bytes: 16 * 1024 * 1024,
            export_retention: std::time::Duration::from_secs(3600),
            notifier_connection: Arc::default(),
            notifier_agent: super::subscriptions::notifier_agent(),
        }
    }

    /// How long finished export jobs and their files are kept.
    pub fn with_export_retention(mut self, retention: std::time::Duration) -> Self {
        self.export_retention = retention;
        self
    }

    pub(super) fn export_retention(&self) -> std::time::Duration {
        self.export_retention
    }

    /// Bounds what a PATCH may produce (the server's request body limit).
    pub fn with_max_resource_bytes(mut self, max_resource_bytes: usize) -> Self {
        self.max_resource_bytes = max_resource_bytes;
        self
    }

    /// The id of the master key records are sealed with (never the key).
    pub fn master_key_id(&self) -> String {
        self.envelope.key_id().as_str().to_owned()
    }

    pub fn search_index(&self) -> &SearchIndex {
        &self.search
    }

    pub(crate) fn ledger(&self) -> &LedgerService {
        &self.ledger
    }

    /// The database pool's connections: `(open, idle)`.
    pub fn pool_usage(&self) -> (u32, u32) {
        self.pool.usage()
    }

    /// Runs the work of an interaction that reads (and ledgers what it disclosed or refused)
    /// and answers once its entries are durable, without holding a thread while they commit:
    /// `work` gets a clone of this service whose ledger appends are held, and they join the
    /// next group commit while the request awaits it. `short` work (a read by id) runs on the
    /// calling thread when the database is local and a connection is free, sparing the hand-off
    /// to a blocking thread and back; anything else runs on one.
    pub(super) async fn disclose<T: Send + 'static>(
        &self,
        short: bool,
        work: impl FnOnce(Self) -> Result<T, AppError> + Send + 'static,
    ) -> Result<T, AppError> {
        let (ledger, deferred) = self.ledger.deferring();
        let this = Self {
            ledger,
            ..self.clone()
        };
        let result = if short && self.pool.local_reader_idle() {
            work(this)
        } else {
            blocking(move || work(this)).await
        };
        self.ledger.commit_deferred(deferred).await?;
        result
    }

    /// Resolves a type name from a URL.
    pub fn resolve_type(&self, name: &str) -> Result<ResourceType, AppError> {
        Ok(self.types.resolve(name)?)
    }

    /// Whether the database answers (for `/readyz`).
    pub async fn ping(&self) -> Result<(), AppError> {
        let this = self.clone();
        blocking(move || Ok(this.pool.ping()?)).await
    }

    pub(crate) fn connection(&self) -> Result<crate::store::PooledConnection, AppError> {
        self.pool.get().map_err(AppError::from)
    }

    /// Decrypts one version; a deletion answers 410 Gone.
    pub(super) fn open_version(
        &self,
        resource_type: &ResourceType,
        id: &ResourceId,
        row: &VersionRow,
    ) -> Result<StoredResource, AppError> {
        if row.deleted {
            return Err(AppError::Gone {
                resource: resource_type.to_string(),
                id: id.to_string(),
                version_id: row.version_id,
            });
        }
        let blob = row.blob().ok_or_else(|| AppError::Integrity {
            resource: resource_type.to_string(),
            id: id.to_string(),
            version_id: row.version_id,
        })?;
        self.open_sealed(resource_type, id, row.version_id, row.last_updated, blob)
    }

    /// Decrypts sealed content; any failure is an integrity error naming the row.
    pub(crate) fn open_sealed(
        &self,
        resource_type: &ResourceType,
        id: &ResourceId,
        version_id: VersionId,
        last_updated: i64,
        blob: EncryptedBlob,
    ) -> Result<StoredResource, AppError> {
        let integrity = || AppError::Integrity {
            resource: resource_type.to_string(),
            id: id.to_string(),
            version_id,
        };
        let binding = ResourceBinding {
            resource_type: resource_type.as_str(),
            id: id.as_str(),
            version_id: version_id.get(),
        };
        let plaintext = self
            .envelope
            .open(binding, &blob)
            .map_err(|_| integrity())?;
        let json = String::from_utf8(plaintext).map_err(|_| integrity())?;
        Ok(StoredResource {
            resource_type: resource_type.clone(),
            id: id.clone(),
            meta: VersionMeta {
                version_id,
                last_updated,
            },
            json,
        })
    }

    pub(super) fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    pub(super) fn types(&self) -> &ResourceTypes {
        &self.types
    }
}

/// Names one resource (version) in a ledger entry.
pub(crate) fn target(
    resource_type: &ResourceType,
    id: &ResourceId,
    version_id: Option<VersionId>,
) -> EntryResource {
    EntryResource {
        resource_type: resource_type.to_string(),
        id: id.to_string(),
        version_id: version_id.map(|v| v.to_string()),
        content_hash: None,
    }
}
