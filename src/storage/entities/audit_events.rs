//! `audit_events`: the append-only audit log.

use sea_orm::entity::prelude::*;

/// One event.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "audit_events")]
pub struct Model {
    /// Increasing id.
    #[sea_orm(primary_key)]
    pub id: i64,
    /// Microseconds since the epoch.
    pub at: i64,
    /// The tenant concerned.
    pub tenant_id: String,
    /// On whose behalf.
    pub actor: String,
    /// The credential's display id.
    pub caller: String,
    /// What happened.
    pub action: String,
    /// The token concerned.
    pub token_id: Option<String>,
    /// JSON object of strings.
    pub detail: String,
}

/// No navigable relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
