//! Rotation: the tenant policy's longest grace period, and the mark that a token's
//! revocation is a rotation's, in force only from its time on. Both default to what
//! existing rows meant (no limit; every revocation in force at once): a policy is never
//! retroactive, and no revoked token comes back.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{big_integer_null, boolean};
use sea_orm_migration::sea_orm::DbBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Tenants {
    Table,
    MaxRotationGraceSecs,
}

#[derive(DeriveIden)]
enum Tokens {
    Table,
    RevocationScheduled,
}

/// The change-feed trigger of m0002, now also watching the new column, so even a manual
/// SQL fix of it alone reaches every replica.
const TOKENS_TRIGGER: &str = "CREATE TRIGGER tokens_changed
     AFTER DELETE OR UPDATE OF id, tenant_id, kind, name, name_key,
         owner_user_id, role_name, scopes, secret_hash, created_at, created_by,
         expires_at, revoked_at, revoked_by, revoke_reason, revocation_scheduled
     ON tokens FOR EACH ROW EXECUTE FUNCTION tokend_notify_change()";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Tenants::Table)
                    .add_column(big_integer_null(Tenants::MaxRotationGraceSecs))
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Tokens::Table)
                    .add_column(boolean(Tokens::RevocationScheduled).default(false))
                    .to_owned(),
            )
            .await?;
        if manager.get_database_backend() == DbBackend::Postgres {
            let db = manager.get_connection();
            db.execute_unprepared("DROP TRIGGER tokens_changed ON tokens")
                .await?;
            db.execute_unprepared(TOKENS_TRIGGER).await?;
        }
        Ok(())
    }
}
