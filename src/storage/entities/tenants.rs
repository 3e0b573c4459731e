//! `tenants`: organisations and their token policy.

use sea_orm::entity::prelude::*;

/// One tenant.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "tenants")]
pub struct Model {
    /// External id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    /// Display name.
    pub name: String,
    /// `active` or `suspended`.
    pub status: String,
    /// Policy: every token must expire.
    pub require_expiry: bool,
    /// Policy: longest lifetime in seconds.
    pub max_lifetime_secs: Option<i64>,
    /// Policy: longest rotation grace in seconds.
    pub max_rotation_grace_secs: Option<i64>,
    /// Microseconds since the epoch.
    pub created_at: i64,
    /// Microseconds since the epoch.
    pub updated_at: i64,
}

/// No navigable relations: the adapter joins explicitly.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
