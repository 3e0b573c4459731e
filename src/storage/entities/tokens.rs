//! `tokens`: personal access tokens and API keys. The secret itself is never stored.

use sea_orm::entity::prelude::*;

/// One token.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "tokens")]
pub struct Model {
    /// The public id embedded in the token string.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    /// The tenant it is bound to.
    pub tenant_id: String,
    /// `pat` or `key`.
    pub kind: String,
    /// As given, NFC-normalised.
    pub name: String,
    /// Lower-cased name, for uniqueness and search.
    pub name_key: String,
    /// The owner of a personal token.
    pub owner_user_id: Option<String>,
    /// The role of an API key.
    pub role_name: Option<String>,
    /// JSON array of scopes; NULL = not narrowed.
    pub scopes: Option<String>,
    /// argon2id PHC string of the secret part.
    pub secret_hash: String,
    /// Microseconds since the epoch.
    pub created_at: i64,
    /// A user id or an API key's display id.
    pub created_by: String,
    /// Microseconds since the epoch.
    pub expires_at: Option<i64>,
    /// Microseconds since the epoch.
    pub last_used_at: Option<i64>,
    /// Microseconds since the epoch.
    pub revoked_at: Option<i64>,
    /// A user id or a token's display id.
    pub revoked_by: Option<String>,
    /// Free text.
    pub revoke_reason: Option<String>,
    /// The revocation is a rotation's, in force from `revoked_at` on; otherwise any
    /// revocation is in force at once.
    pub revocation_scheduled: bool,
}

/// No navigable relations: the adapter joins explicitly.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
