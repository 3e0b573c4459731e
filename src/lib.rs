//! tokend issues, lists, revokes and introspects personal access tokens and organisation
//! API keys for a multi-tenant product, over gRPC.
//!
//! The map, in the direction data flows:
//!
//! - [`domain`]: pure rules — token format and checksum, records, effective permissions,
//!   scope / role / policy checks, expiry — and the ports (store, hasher, clock). No I/O.
//! - [`service`]: the use cases (issue, list, revoke, delete, introspect, directory, audit,
//!   bootstrap) over the ports; who the caller is and on whose behalf it acts.
//! - [`introspect`]: the hot path: parse → checksum → lookup → argon2 → live rules.
//! - [`hashing`]: argon2id on a bounded blocking pool.
//! - [`storage`]: SeaORM entities, migrations and the store adapter, for SQLite and
//!   PostgreSQL alike; the only module that imports `sea_orm`.
//! - [`grpc`]: tonic services, proto ⇄ domain conversion, the error → status map, the
//!   authentication layer; the only module that imports `tonic`.
//! - [`proto`]: code generated from `proto/tokend/v1`.
//! - [`config`]: layered settings (defaults → TOML → `TOKEND_*`), secrets as `SecretString`.
//! - [`clock`]: the only reader of the wall clock.
//! - [`telemetry`]: the log subscriber.
//! - [`app`]: wires everything: `App::build`, `App::local_addr`, `App::run_until`.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod app;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod domain;
pub mod grpc;
pub mod hashing;
pub mod introspect;
pub mod lent;
pub mod proto;
pub mod service;
pub mod storage;
pub mod telemetry;

pub use app::App;
