//! Storage: the diesel schema, migrations, connections (PostgreSQL and SQLite through one
//! [`DbConnection`]) and the queries. It handles ciphertext only, never plaintext content.
//!
//! Every function here is blocking; the service layer runs them on the blocking thread pool.

pub mod connection;
mod database;
mod entry_codec;
mod error;
pub mod ledger;
pub mod migrations;
pub mod resources;
pub mod schema;
pub mod search;
mod sqlite_writer;
mod statistics;

pub use connection::{DbPool, PooledConnection};
pub use database::{Backend, DatabaseUrl, DbConnection};
pub use error::StoreError;
