//! `roles`: named permission sets per tenant.

use sea_orm::entity::prelude::*;

/// One role.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "roles")]
pub struct Model {
    /// The tenant.
    #[sea_orm(primary_key, auto_increment = false)]
    pub tenant_id: String,
    /// Unique in the tenant.
    #[sea_orm(primary_key, auto_increment = false)]
    pub name: String,
    /// JSON array of permission strings, sorted.
    pub permissions: String,
    /// Microseconds since the epoch.
    pub updated_at: i64,
}

/// No navigable relations: the adapter joins explicitly.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
