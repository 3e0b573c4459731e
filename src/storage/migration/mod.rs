//! Schema migrations, portable across SQLite and PostgreSQL through SeaQuery's builders.
//! Applied in order by `tokend migrate` and, unless disabled, on `tokend serve`.

use sea_orm_migration::prelude::*;

mod m0001_initial;
mod m0002_change_feed;
mod m0003_rotation;
mod m0004_token_uses;
mod m0005_replicas;

/// Every migration, oldest first.
#[derive(Debug)]
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m0001_initial::Migration),
            Box::new(m0002_change_feed::Migration),
            Box::new(m0003_rotation::Migration),
            Box::new(m0004_token_uses::Migration),
            Box::new(m0005_replicas::Migration),
        ]
    }
}
