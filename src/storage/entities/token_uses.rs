//! `token_uses`: the few most recent distinct (client IP, calling service) pairs a token was
//! used from. Not part of liveness: no change-feed trigger.

use sea_orm::entity::prelude::*;

/// One pair and when it was last seen.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "token_uses")]
pub struct Model {
    /// The token's public id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub token_id: String,
    /// The end user's IP as reported; empty = not reported.
    #[sea_orm(primary_key, auto_increment = false)]
    pub client_ip: String,
    /// Display id of the introspecting credential; empty = the token called tokend itself.
    #[sea_orm(primary_key, auto_increment = false)]
    pub service: String,
    /// That credential's name.
    pub service_name: String,
    /// Microseconds since the epoch.
    pub last_at: i64,
}

/// No navigable relations: the adapter joins explicitly.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
