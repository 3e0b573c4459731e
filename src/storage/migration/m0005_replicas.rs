//! What the write fence needs (PostgreSQL only; see `storage::fence`):
//!
//! - `tokend_replicas`: every replica's id, its lease, and when its last heartbeat was sent,
//!   written in the same statement as the heartbeat. A replica whose listener has just (re)connected
//!   has not yet heard everyone's heartbeats, so its writes wait for every replica seen here
//!   recently.
//! - `tokend_feed_key`: the key that signs heartbeats, fences and acknowledgements. Any
//!   database role may NOTIFY on any channel; only roles that can read this table can sign,
//!   so a forged acknowledgement cannot cut a write's wait short.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::Postgres {
            return Ok(());
        }
        let db = manager.get_connection();
        db.execute_unprepared(
            "CREATE TABLE tokend_replicas (
                id text PRIMARY KEY,
                seen timestamptz NOT NULL DEFAULT clock_timestamp(),
                lease_ms bigint NOT NULL
            )",
        )
        .await?;
        // The key is made by the first replica that starts (from the operating system's
        // random source), not here: a migration's SQL has no strong random source without
        // an extension.
        db.execute_unprepared(
            "CREATE TABLE tokend_feed_key (
                id smallint PRIMARY KEY CHECK (id = 1),
                key text NOT NULL
            )",
        )
        .await?;
        // Tables are private to their owner by default; say so, in case the database's
        // default privileges grant more.
        db.execute_unprepared("REVOKE ALL ON tokend_feed_key, tokend_replicas FROM PUBLIC")
            .await?;
        Ok(())
    }
}
