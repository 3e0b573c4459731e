//! `users`: people and their global status.

use sea_orm::entity::prelude::*;

/// One user.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "users")]
pub struct Model {
    /// Id at the identity provider.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    /// `active`, `suspended` or `removed`.
    pub status: String,
    /// Microseconds since the epoch.
    pub updated_at: i64,
}

/// No navigable relations: the adapter joins explicitly.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
