//! PostgreSQL change feed: triggers on every table liveness depends on append the changed
//! key to `change_log` (the polling backstop) and `NOTIFY` it, with its sequence number, on
//! channel `tokend_changes`. A
//! trigger fires for any writer, so an operator's manual SQL fix is seen too. SQLite has no
//! other writers and no feed: nothing to do there.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

/// The trigger body: one JSON payload naming the changed key. The payload names a key,
/// never state: a forged NOTIFY can only evict.
const FUNCTION: &str = r#"
CREATE OR REPLACE FUNCTION tokend_notify_change() RETURNS trigger AS $$
DECLARE
  rec record;
  payload text;
  seq bigint;
BEGIN
  FOR i IN 1..2 LOOP
    IF i = 1 THEN
      IF TG_OP = 'INSERT' THEN CONTINUE; END IF;
      rec := OLD;
    ELSE
      IF TG_OP = 'DELETE' THEN CONTINUE; END IF;
      rec := NEW;
    END IF;
    IF TG_TABLE_NAME = 'tokens' THEN
      payload := json_build_object('k', 'token', 'id', rec.id)::text;
    ELSIF TG_TABLE_NAME = 'tenants' THEN
      payload := json_build_object('k', 'tenant', 'id', rec.id)::text;
    ELSIF TG_TABLE_NAME = 'users' THEN
      payload := json_build_object('k', 'user', 'id', rec.id)::text;
    ELSIF TG_TABLE_NAME = 'memberships' THEN
      payload := json_build_object('k', 'member', 'tenant', rec.tenant_id, 'user', rec.user_id)::text;
    ELSIF TG_TABLE_NAME = 'roles' THEN
      payload := json_build_object('k', 'role', 'tenant', rec.tenant_id, 'name', rec.name)::text;
    ELSE
      payload := json_build_object('k', 'all')::text;
    END IF;
    INSERT INTO change_log (payload) VALUES (payload) RETURNING change_log.seq INTO seq;
    PERFORM pg_notify('tokend_changes', seq || ' ' || payload);
  END LOOP;
  RETURN NULL;
END;
$$ LANGUAGE plpgsql;
"#;

const TRUNCATE_FUNCTION: &str = r#"
CREATE OR REPLACE FUNCTION tokend_notify_truncate() RETURNS trigger AS $$
DECLARE
  seq bigint;
BEGIN
  INSERT INTO change_log (payload) VALUES ('{"k":"all"}') RETURNING change_log.seq INTO seq;
  PERFORM pg_notify('tokend_changes', seq || ' {"k":"all"}');
  RETURN NULL;
END;
$$ LANGUAGE plpgsql;
"#;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::Postgres {
            return Ok(());
        }
        let db = manager.get_connection();
        db.execute_unprepared(
            "CREATE TABLE change_log (
                seq bigserial PRIMARY KEY,
                at timestamptz NOT NULL DEFAULT clock_timestamp(),
                payload text NOT NULL
            )",
        )
        .await?;
        db.execute_unprepared("CREATE INDEX idx_change_log_at ON change_log (at)")
            .await?;
        db.execute_unprepared(FUNCTION).await?;
        // last_used_at is left out on purpose: it plays no part in liveness, and notifying
        // every batched flush would empty every replica's cache once a minute. So are
        // inserts: a new token changes nothing any replica holds, and notifying them would
        // void every replica's remembered verdicts at the rate tokens are issued.
        db.execute_unprepared(
            "CREATE TRIGGER tokens_changed
             AFTER DELETE OR UPDATE OF id, tenant_id, kind, name, name_key,
                 owner_user_id, role_name, scopes, secret_hash, created_at, created_by,
                 expires_at, revoked_at, revoked_by, revoke_reason
             ON tokens FOR EACH ROW EXECUTE FUNCTION tokend_notify_change()",
        )
        .await?;
        for table in ["tenants", "users", "memberships", "roles"] {
            db.execute_unprepared(&format!(
                "CREATE TRIGGER {table}_changed AFTER INSERT OR UPDATE OR DELETE ON {table}
                 FOR EACH ROW EXECUTE FUNCTION tokend_notify_change()"
            ))
            .await?;
        }
        // TRUNCATE fires no row triggers: invalidate everything.
        db.execute_unprepared(TRUNCATE_FUNCTION).await?;
        for table in ["tokens", "tenants", "users", "memberships", "roles"] {
            db.execute_unprepared(&format!(
                "CREATE TRIGGER {table}_truncated AFTER TRUNCATE ON {table}
                 FOR EACH STATEMENT EXECUTE FUNCTION tokend_notify_truncate()"
            ))
            .await?;
        }
        Ok(())
    }
}
