//! Storage: the diesel schema, migrations, connections (PostgreSQL and SQLite through one
//! [`DbConnection`]) and the queries. It handles ciphertext only, never plaintext content.
//!
//! Every function here is blocking; the service layer runs them on the blocking thread pool.
//!
//! The files form layers; each uses only files of the layers before it:
//! 1. `dialect` (every difference between SQLite's SQL and PostgreSQL's), `error`
//!    ([`StoreError`]), [`schema`];
//! 2. `database`: the URL, the connection over both backends, opening one;
//! 3. `entry_codec`, `sqlite_writer`, `statistics`, [`migrations`];
//! 4. [`connection`]: the pool the services use;
//! 5. the queries: [`resources`], [`ledger`], [`search`], [`imports`], [`exports`].

pub mod connection;
mod database;
mod dialect;
mod entry_codec;
mod error;
pub mod exports;
pub mod imports;
pub mod ledger;
pub mod migrations;
pub mod resources;
pub mod rewrap;
pub mod schema;
pub mod search;
mod sqlite_writer;
mod statistics;
pub mod subscriptions;

pub use connection::{DbPool, PooledConnection};
pub use database::{DatabaseUrl, DbConnection};
pub use dialect::{Backend, Dialect};
pub use error::StoreError;
