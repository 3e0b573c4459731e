//! [`SeaStore`]: the one store adapter, over a SeaORM connection to SQLite or PostgreSQL.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use sea_orm::Condition;
use sea_orm::Iterable;
use sea_orm::sea_query::{Expr, InsertStatement, LikeExpr, OnConflict, Query, SqliteQueryBuilder};
use sea_orm::{
    ActiveModelTrait, ActiveValue, ColumnTrait, ConnectOptions, ConnectionTrait, Database,
    DatabaseConnection, DatabaseTransaction, DbBackend, DbErr, EntityTrait, FromQueryResult,
    PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, QueryTrait, RuntimeErr, Set, SqlErr,
    Statement, TransactionTrait, sqlx,
};
use sea_orm_migration::MigratorTrait as _;

use super::convert::{self, micros};
use super::entities::{audit_events, memberships, roles, tenants, token_uses, tokens, users};
use super::fault::crash_point;
use super::migration::Migrator;
use crate::domain::model::{
    AuditEvent, AuditRecord, Member, Membership, PermissionSet, Revocation, Role, Tenant,
    Timestamp, Token, TokenState, TokenUse, User, UserInTenant,
};
use crate::domain::names::{RoleName, TenantId, UserId};
use crate::domain::ports::{AuditQuery, MAX_TOKEN_USES, Store, TokenQuery};
use crate::domain::token_format::{TokenFormat, TokenKind};
use crate::domain::{Error, Result};

/// Tokens per `last_used_at` UPDATE statement (three bound values each).
const LAST_USED_CHUNK: usize = 1000;
/// A pooled PostgreSQL connection idle at least this long is pinged before it is handed
/// out; a busier one is not (see `SeaStore::connect`).
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);
/// Token uses per upsert statement (five bound values each).
const TOKEN_USES_CHUNK: usize = 1000;

/// How to reach the database.
#[derive(Clone, Debug)]
pub struct DatabaseOptions {
    /// Upper bound on pooled connections (PostgreSQL; SQLite uses one writer connection).
    pub max_connections: u32,
    /// How long to wait for a connection before answering UNAVAILABLE.
    pub acquire_timeout: Duration,
    /// How long Introspect waits for its one read of a token's live state before answering
    /// UNAVAILABLE: a slow database must not hold every gateway's request.
    pub state_read_timeout: Duration,
    /// SQLite: IssueToken's commit waits for the disk too (see `issue_in_one_batch`).
    pub sqlite_durable_issue: bool,
}

impl Default for DatabaseOptions {
    fn default() -> Self {
        Self {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(5),
            state_read_timeout: Duration::from_secs(3),
            sqlite_durable_issue: false,
        }
    }
}

/// The store over SQLite or PostgreSQL.
#[derive(Debug)]
pub struct SeaStore {
    pub(super) db: DatabaseConnection,
    format: TokenFormat,
    token_lookups: AtomicU64,
    state_read_timeout: Duration,
    sqlite_durable_issue: bool,
}

/// `.one()` for a primary-key lookup, without the `LIMIT ?` that `.one()` adds: SQLite's
/// planner reads a bound LIMIT's value, so it re-prepares such a statement every time it
/// runs (about 70 000 instructions, three quarters of the SQLite work of an IssueToken, on
/// the core that also answers Introspect). A key selects at most one row with no limit.
trait ByKey<E: EntityTrait> {
    async fn by_key(
        self,
        db: &impl ConnectionTrait,
    ) -> std::result::Result<Option<E::Model>, DbErr>;
}

impl<E: EntityTrait> ByKey<E> for sea_orm::Select<E> {
    async fn by_key(
        self,
        db: &impl ConnectionTrait,
    ) -> std::result::Result<Option<E::Model>, DbErr> {
        Ok(self.all(db).await?.into_iter().next())
    }
}

/// Connection-level failures mean "cannot know", everything else is a bug or a conflict the
/// caller classifies.
fn db_err(err: DbErr) -> Error {
    let unavailable = match &err {
        DbErr::Conn(_) | DbErr::ConnectionAcquire(_) => true,
        DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e)) => {
            matches!(
                **e,
                sqlx::Error::Io(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::Tls(_)
                    | sqlx::Error::Protocol(_)
                    | sqlx::Error::WorkerCrashed
            ) || lost_connection(e)
        }
        _ => false,
    };
    if unavailable {
        Error::Unavailable(Box::new(err))
    } else {
        Error::internal(err)
    }
}

/// Whether the server said it dropped the connection: SQLSTATE class 08 (connection
/// exception) or 57P01–57P03 (terminated by an administrator, a crash or a restart that is
/// still starting). A restart or a DBA's `pg_terminate_backend` says so on every pooled
/// connection, and the next statement on one reads it: the database is briefly out of
/// reach, not broken.
fn lost_connection(err: &sqlx::Error) -> bool {
    let sqlx::Error::Database(err) = err else {
        return false;
    };
    err.code()
        .is_some_and(|code| code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03"))
}

impl SeaStore {
    /// Connects to `url` (`sqlite://…?mode=rwc` or `postgres://…`).
    pub async fn connect(
        url: &str,
        options: &DatabaseOptions,
        format: TokenFormat,
    ) -> Result<Self> {
        let mut connect = ConnectOptions::new(url.to_owned());
        // SQLite allows one writer; a single connection turns lock contention into queueing
        // instead of SQLITE_BUSY errors. It is the single-replica embedded mode.
        let sqlite = url.starts_with("sqlite:");
        connect
            .max_connections(if sqlite { 1 } else { options.max_connections })
            .min_connections(1)
            .acquire_timeout(options.acquire_timeout)
            .connect_timeout(options.acquire_timeout)
            .sqlx_logging(false);
        if sqlite {
            // A file opened in-process has no connection to lose: a ping before every
            // statement would only be one more round trip to the worker thread, on the
            // server's own core.
            connect.test_before_acquire(false);
        } else {
            // sqlx pings a pooled connection before every checkout by default: a second
            // network round trip on every cold Introspect. Only a connection that sat idle
            // long enough for a proxy, firewall or restarted server to have dropped it is
            // pinged; one that dies between two busy uses fails its statement, which
            // answers UNAVAILABLE and is discarded.
            connect.test_before_acquire_if_idle_for(PING_IF_IDLE_FOR);
        }
        if sqlite {
            connect.map_sqlx_sqlite_opts(|o| {
                // FULL: every commit waits for the write-ahead log to reach the disk, so
                // that no revocation is lost to a power cut. Only IssueToken may relax it,
                // for its own commit (`issue_in_one_batch`).
                o.journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                    .synchronous(sqlx::sqlite::SqliteSynchronous::Full)
                    .foreign_keys(true)
                    .busy_timeout(Duration::from_secs(5))
            });
        }
        let db = Database::connect(connect).await.map_err(db_err)?;
        Ok(Self {
            db,
            format,
            token_lookups: AtomicU64::new(0),
            state_read_timeout: options.state_read_timeout,
            sqlite_durable_issue: options.sqlite_durable_issue,
        })
    }

    /// Applies pending migrations.
    pub async fn migrate(&self) -> Result<()> {
        Migrator::up(&self.db, None).await.map_err(db_err)
    }

    /// How many token lookups by public id this store has answered; tests use it to show
    /// that malformed tokens never reach the database.
    pub fn token_lookups(&self) -> u64 {
        self.token_lookups.load(Ordering::Relaxed)
    }

    /// Whether this is PostgreSQL (several replicas possible) rather than SQLite.
    pub fn is_postgres(&self) -> bool {
        self.backend() == DbBackend::Postgres
    }

    /// The pool's connections: (open, idle, the configured maximum).
    pub fn pool_connections(&self) -> (u32, usize, u32) {
        if self.is_postgres() {
            let pool = self.db.get_postgres_connection_pool();
            (
                pool.size(),
                pool.num_idle(),
                pool.options().get_max_connections(),
            )
        } else {
            let pool = self.db.get_sqlite_connection_pool();
            (
                pool.size(),
                pool.num_idle(),
                pool.options().get_max_connections(),
            )
        }
    }

    /// Closes the pool.
    pub async fn close(self) -> Result<()> {
        self.db.close().await.map_err(db_err)
    }

    fn backend(&self) -> DbBackend {
        self.db.get_database_backend()
    }

    fn to_token(&self, m: tokens::Model) -> Result<Token> {
        convert::token(m, &|kind, id| self.format.display_id(kind, id))
    }

    async fn begin(&self) -> Result<DatabaseTransaction> {
        self.db.begin().await.map_err(db_err)
    }

    /// Runs a bulk write without keeping its prepared statement. sqlx caches every
    /// statement it prepares, per connection (up to 100), and a batch's text changes with
    /// its size: each flush of uses would leave another compiled statement of a thousand
    /// rows in every connection's cache, some 300 KiB each on SQLite (30 MB in all, a third
    /// of what 100 000 cached tokens take).
    async fn execute_uncached(&self, statement: Statement) -> Result<u64> {
        let sql = sqlx::AssertSqlSafe(statement.sql);
        let values =
            sea_query_sqlx::SqlxValues(statement.values.unwrap_or(sea_orm::Values(Vec::new())));
        // A failure is classified as any other statement's; this one is a background
        // flush, so the class only shows in its log line.
        let done = match self.backend() {
            DbBackend::Postgres => sqlx::query_with(sql, values)
                .persistent(false)
                .execute(self.db.get_postgres_connection_pool())
                .await
                .map(|done| done.rows_affected()),
            _ => sqlx::query_with(sql, values)
                .persistent(false)
                .execute(self.db.get_sqlite_connection_pool())
                .await
                .map(|done| done.rows_affected()),
        };
        done.map_err(|err| db_err(DbErr::Exec(RuntimeErr::SqlxError(Arc::new(err)))))
    }

    /// SQLite: the pooled connection's `synchronous` setting (2 = FULL), `None` on
    /// PostgreSQL. Tests use it to show that IssueToken leaves the connection durable.
    pub async fn sqlite_synchronous(&self) -> Result<Option<i64>> {
        if self.is_postgres() {
            return Ok(None);
        }
        let row = self
            .db
            .query_one_raw(Statement::from_string(
                DbBackend::Sqlite,
                "PRAGMA synchronous",
            ))
            .await
            .map_err(db_err)?
            .ok_or_else(|| Error::internal("PRAGMA synchronous returned no row"))?;
        Ok(Some(row.try_get_by_index(0).map_err(db_err)?))
    }

    /// How many prepared statements a pooled connection holds: with `max_connections` 1,
    /// all the store's. Tests use it to show that bulk writes leave none behind.
    pub async fn cached_statements(&self) -> Result<usize> {
        use sqlx::Connection as _;
        let unavailable = |err| db_err(DbErr::Conn(RuntimeErr::SqlxError(Arc::new(err))));
        Ok(match self.backend() {
            DbBackend::Postgres => self
                .db
                .get_postgres_connection_pool()
                .acquire()
                .await
                .map_err(unavailable)?
                .cached_statements_size(),
            _ => self
                .db
                .get_sqlite_connection_pool()
                .acquire()
                .await
                .map_err(unavailable)?
                .cached_statements_size(),
        })
    }
}

async fn append(txn: &DatabaseTransaction, record: &AuditRecord) -> Result<()> {
    audit_events::Entity::insert(convert::audit_row(record))
        .exec(txn)
        .await
        .map_err(db_err)?;
    Ok(())
}

async fn commit(txn: DatabaseTransaction) -> Result<()> {
    txn.commit().await.map_err(db_err)
}

/// Ends a delete: with its audit records when a row went, as a no-op (rolled back) when
/// there was nothing to delete.
async fn commit_if_deleted(
    txn: DatabaseTransaction,
    deleted: u64,
    audit: &[AuditRecord],
) -> Result<bool> {
    if deleted == 0 {
        return Ok(false);
    }
    for record in audit {
        append(&txn, record).await?;
    }
    commit(txn).await?;
    Ok(true)
}

fn owner_condition(kind: TokenKind, owner: Option<&UserId>) -> Condition {
    match (kind, owner) {
        (TokenKind::Personal, Some(owner)) => {
            Condition::all().add(tokens::Column::OwnerUserId.eq(owner.as_str()))
        }
        _ => Condition::all().add(tokens::Column::OwnerUserId.is_null()),
    }
}

/// `%` and `_` in a user's search text are literals, not wildcards.
fn like_contains(needle: &str) -> LikeExpr {
    let escaped = needle
        .replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_");
    LikeExpr::new(format!("%{escaped}%")).escape('\\')
}

/// The one query behind Introspect: the token and everything its liveness depends on.
const TOKEN_STATE_SQL: &str = "\
SELECT t.*, \
       tn.status AS x_tenant_status, \
       u.status AS x_owner_status, \
       m.user_id AS x_member_user, \
       m.role_name AS x_member_role, \
       m.groups AS x_member_groups, \
       r.name AS x_role_name, \
       r.permissions AS x_role_permissions \
FROM tokens t \
JOIN tenants tn ON tn.id = t.tenant_id \
LEFT JOIN users u ON t.kind = 'pat' AND u.id = t.owner_user_id \
LEFT JOIN memberships m ON t.kind = 'pat' AND m.tenant_id = t.tenant_id AND m.user_id = t.owner_user_id \
LEFT JOIN roles r ON r.tenant_id = t.tenant_id \
     AND r.name = CASE WHEN t.kind = 'pat' THEN m.role_name ELSE t.role_name END \
WHERE t.id = $1";

/// The `x_role_name` and `x_role_permissions` columns of a joined read: the role's
/// permissions, `None` when the join found no role.
fn joined_role_permissions(row: &sea_orm::QueryResult) -> Result<Option<PermissionSet>> {
    let get = |column: &str| row.try_get::<Option<String>>("", column).map_err(db_err);
    match get("x_role_name")? {
        Some(_) => Ok(Some(convert::permissions(
            "permissions",
            &get("x_role_permissions")?.unwrap_or_default(),
        )?)),
        None => Ok(None),
    }
}

/// A tenant and one user's standing in it ($1: the tenant, $2: the user).
const USER_IN_TENANT_SQL: &str = "\
SELECT tn.*, \
       u.status AS x_user_status, \
       m.role_name AS x_member_role, \
       r.name AS x_role_name, \
       r.permissions AS x_role_permissions \
FROM tenants tn \
LEFT JOIN users u ON u.id = $2 \
LEFT JOIN memberships m ON m.tenant_id = tn.id AND m.user_id = $2 \
LEFT JOIN roles r ON r.tenant_id = tn.id AND r.name = m.role_name \
WHERE tn.id = $1";

#[async_trait]
impl Store for SeaStore {
    async fn put_tenant(&self, tenant: &Tenant, audit: &AuditRecord) -> Result<Tenant> {
        let txn = self.begin().await?;
        tenants::Entity::insert(convert::tenant_row(tenant))
            .on_conflict(
                OnConflict::column(tenants::Column::Id)
                    .update_columns([
                        tenants::Column::Name,
                        tenants::Column::Status,
                        tenants::Column::RequireExpiry,
                        tenants::Column::MaxLifetimeSecs,
                        tenants::Column::MaxRotationGraceSecs,
                        tenants::Column::UpdatedAt,
                    ])
                    .to_owned(),
            )
            .exec(&txn)
            .await
            .map_err(db_err)?;
        append(&txn, audit).await?;
        let stored = tenants::Entity::find_by_id(tenant.id.as_str())
            .by_key(&txn)
            .await
            .map_err(db_err)?
            .ok_or_else(|| Error::internal("tenant vanished inside its own transaction"))?;
        commit(txn).await?;
        convert::tenant(stored)
    }

    async fn get_tenant(&self, id: &TenantId) -> Result<Option<Tenant>> {
        tenants::Entity::find_by_id(id.as_str())
            .by_key(&self.db)
            .await
            .map_err(db_err)?
            .map(convert::tenant)
            .transpose()
    }

    async fn list_tenants(
        &self,
        only: Option<&TenantId>,
        after: Option<&TenantId>,
        limit: u64,
    ) -> Result<Vec<Tenant>> {
        let mut query = tenants::Entity::find().order_by_asc(tenants::Column::Id);
        if let Some(only) = only {
            query = query.filter(tenants::Column::Id.eq(only.as_str()));
        }
        if let Some(after) = after {
            query = query.filter(tenants::Column::Id.gt(after.as_str()));
        }
        query
            .limit(limit)
            .all(&self.db)
            .await
            .map_err(db_err)?
            .into_iter()
            .map(convert::tenant)
            .collect()
    }

    async fn put_role(&self, role: &Role, audit: &AuditRecord) -> Result<()> {
        let txn = self.begin().await?;
        require_tenant(&txn, &role.tenant_id).await?;
        roles::Entity::insert(convert::role_row(role))
            .on_conflict(
                OnConflict::columns([roles::Column::TenantId, roles::Column::Name])
                    .update_columns([roles::Column::Permissions, roles::Column::UpdatedAt])
                    .to_owned(),
            )
            .exec(&txn)
            .await
            .map_err(db_err)?;
        append(&txn, audit).await?;
        commit(txn).await
    }

    async fn delete_role(
        &self,
        tenant: &TenantId,
        name: &RoleName,
        audit: &AuditRecord,
    ) -> Result<bool> {
        let txn = self.begin().await?;
        let holders = memberships::Entity::find()
            .filter(memberships::Column::TenantId.eq(tenant.as_str()))
            .filter(memberships::Column::RoleName.eq(name.as_str()))
            .count(&txn)
            .await
            .map_err(db_err)?;
        if holders > 0 {
            return Err(Error::FailedPrecondition(format!(
                "name: role {name} is held by {holders} member(s) of tenant {tenant}; give them another role first"
            )));
        }
        let deleted = roles::Entity::delete_by_id((tenant.to_string(), name.to_string()))
            .exec(&txn)
            .await
            .map_err(db_err)?
            .rows_affected;
        commit_if_deleted(txn, deleted, std::slice::from_ref(audit)).await
    }

    async fn get_role(&self, tenant: &TenantId, name: &RoleName) -> Result<Option<Role>> {
        roles::Entity::find_by_id((tenant.to_string(), name.to_string()))
            .by_key(&self.db)
            .await
            .map_err(db_err)?
            .map(convert::role)
            .transpose()
    }

    async fn list_roles(&self, tenant: &TenantId) -> Result<Vec<Role>> {
        roles::Entity::find()
            .filter(roles::Column::TenantId.eq(tenant.as_str()))
            .order_by_asc(roles::Column::Name)
            .all(&self.db)
            .await
            .map_err(db_err)?
            .into_iter()
            .map(convert::role)
            .collect()
    }

    async fn put_members(&self, members: &[(Member, AuditRecord)]) -> Result<()> {
        let txn = self.begin().await?;
        let mut tenants_seen = Vec::new();
        for (member, audit) in members {
            if !tenants_seen.contains(&member.tenant_id) {
                require_tenant(&txn, &member.tenant_id).await?;
                tenants_seen.push(member.tenant_id.clone());
            }
            let role =
                roles::Entity::find_by_id((member.tenant_id.to_string(), member.role.to_string()))
                    .by_key(&txn)
                    .await
                    .map_err(db_err)?;
            if role.is_none() {
                return Err(Error::NotFound(format!(
                    "role {} in tenant {}",
                    member.role, member.tenant_id
                )));
            }
            users::Entity::insert(users::ActiveModel {
                id: Set(member.user_id.to_string()),
                status: Set("active".to_owned()),
                updated_at: Set(micros(member.updated_at)),
            })
            .on_conflict_do_nothing_on([users::Column::Id])
            .exec(&txn)
            .await
            .map_err(db_err)?;
            memberships::Entity::insert(convert::member_row(member))
                .on_conflict(
                    OnConflict::columns([
                        memberships::Column::TenantId,
                        memberships::Column::UserId,
                    ])
                    .update_columns([
                        memberships::Column::RoleName,
                        memberships::Column::Groups,
                        memberships::Column::UpdatedAt,
                    ])
                    .to_owned(),
                )
                .exec(&txn)
                .await
                .map_err(db_err)?;
            append(&txn, audit).await?;
        }
        commit(txn).await
    }

    async fn remove_member(
        &self,
        tenant: &TenantId,
        user: &UserId,
        audit: &AuditRecord,
    ) -> Result<bool> {
        let txn = self.begin().await?;
        let deleted = memberships::Entity::delete_by_id((tenant.to_string(), user.to_string()))
            .exec(&txn)
            .await
            .map_err(db_err)?
            .rows_affected;
        commit_if_deleted(txn, deleted, std::slice::from_ref(audit)).await
    }

    async fn get_member(&self, tenant: &TenantId, user: &UserId) -> Result<Option<Member>> {
        memberships::Entity::find_by_id((tenant.to_string(), user.to_string()))
            .by_key(&self.db)
            .await
            .map_err(db_err)?
            .map(convert::member)
            .transpose()
    }

    async fn list_members(
        &self,
        tenant: &TenantId,
        after: Option<&UserId>,
        limit: u64,
    ) -> Result<Vec<Member>> {
        let mut query = memberships::Entity::find()
            .filter(memberships::Column::TenantId.eq(tenant.as_str()))
            .order_by_asc(memberships::Column::UserId);
        if let Some(after) = after {
            query = query.filter(memberships::Column::UserId.gt(after.as_str()));
        }
        query
            .limit(limit)
            .all(&self.db)
            .await
            .map_err(db_err)?
            .into_iter()
            .map(convert::member)
            .collect()
    }

    async fn put_user(&self, user: &User, audit: &AuditRecord) -> Result<User> {
        let txn = self.begin().await?;
        users::Entity::insert(convert::user_row(user))
            .on_conflict(
                OnConflict::column(users::Column::Id)
                    .update_columns([users::Column::Status, users::Column::UpdatedAt])
                    .to_owned(),
            )
            .exec(&txn)
            .await
            .map_err(db_err)?;
        append(&txn, audit).await?;
        commit(txn).await?;
        Ok(user.clone())
    }

    async fn get_user(&self, id: &UserId) -> Result<Option<User>> {
        users::Entity::find_by_id(id.as_str())
            .by_key(&self.db)
            .await
            .map_err(db_err)?
            .map(convert::user)
            .transpose()
    }

    async fn user_in_tenant(
        &self,
        tenant: &TenantId,
        user: &UserId,
    ) -> Result<Option<UserInTenant>> {
        let sql = match self.backend() {
            DbBackend::Postgres => USER_IN_TENANT_SQL.to_owned(),
            // SQLite numbers its parameters ?NNN.
            _ => USER_IN_TENANT_SQL.replace('$', "?"),
        };
        let statement = Statement::from_sql_and_values(
            self.backend(),
            sql,
            [tenant.as_str().into(), user.as_str().into()],
        );
        let Some(row) = self.db.query_one_raw(statement).await.map_err(db_err)? else {
            return Ok(None);
        };
        let tenant = convert::tenant(tenants::Model::from_query_result(&row, "").map_err(db_err)?)?;
        let get = |column: &str| -> Result<Option<String>> {
            row.try_get::<Option<String>>("", column).map_err(db_err)
        };
        let role_permissions = joined_role_permissions(&row)?;
        Ok(Some(UserInTenant {
            tenant,
            user_status: get("x_user_status")?
                .map(|s| convert::user_status(&s))
                .transpose()?,
            role: get("x_member_role")?.map(RoleName::from_trusted),
            role_permissions,
        }))
    }

    async fn insert_token(&self, token: &Token, audit: &AuditRecord) -> Result<()> {
        if !self.is_postgres() {
            let pool = self.db.get_sqlite_connection_pool();
            let durable = self.sqlite_durable_issue;
            return match issue_in_one_batch(pool, token, audit, durable).await? {
                true => Ok(()),
                false => Err(name_taken(token)),
            };
        }
        let txn = self.begin().await?;
        insert_token_in(&txn, token, None).await?;
        crash_point("issue.token_written");
        append(&txn, audit).await?;
        crash_point("issue.before_commit");
        commit(txn).await?;
        crash_point("issue.committed");
        Ok(())
    }

    async fn rotate_token(
        &self,
        tenant: &TenantId,
        id: &str,
        revocation: &Revocation,
        successor: &Token,
        audit: &[AuditRecord],
    ) -> Result<Token> {
        let txn = self.begin().await?;
        // Only a token still live and not already rotated: two racing rotations of one
        // token must not both leave a successor behind.
        let scheduled = set_revocation(tokens::Entity::update_many(), revocation)
            .filter(tokens::Column::Id.eq(id))
            .filter(tokens::Column::TenantId.eq(tenant.as_str()))
            .filter(tokens::Column::RevokedAt.is_null())
            .filter(
                Condition::any()
                    .add(tokens::Column::ExpiresAt.is_null())
                    .add(tokens::Column::ExpiresAt.gt(micros(successor.created_at))),
            )
            .exec(&txn)
            .await
            .map_err(db_err)?
            .rows_affected;
        if scheduled == 0 {
            let exists = tokens::Entity::find_by_id(id)
                .filter(tokens::Column::TenantId.eq(tenant.as_str()))
                .count(&txn)
                .await
                .map_err(db_err)?;
            return Err(if exists == 0 {
                Error::NotFound(format!("token {id}"))
            } else {
                Error::FailedPrecondition(format!(
                    "token_id: token {id} was revoked, rotated or expired meanwhile"
                ))
            });
        }
        insert_token_in(&txn, successor, Some(id)).await?;
        for record in audit {
            append(&txn, record).await?;
        }
        let row = tokens::Entity::find_by_id(id)
            .filter(tokens::Column::TenantId.eq(tenant.as_str()))
            .by_key(&txn)
            .await
            .map_err(db_err)?
            .ok_or_else(|| Error::internal(format!("token {id} vanished mid-rotation")))?;
        commit(txn).await?;
        self.to_token(row)
    }

    async fn token_state(&self, public_id: &str) -> Result<Option<TokenState>> {
        self.token_lookups.fetch_add(1, Ordering::Relaxed);
        let sql = match self.backend() {
            DbBackend::Postgres => TOKEN_STATE_SQL.to_owned(),
            _ => TOKEN_STATE_SQL.replace("$1", "?"),
        };
        let statement = Statement::from_sql_and_values(self.backend(), sql, [public_id.into()]);
        let read = tokio::time::timeout(self.state_read_timeout, self.db.query_one_raw(statement));
        let Some(row) = read
            .await
            .map_err(|_| {
                Error::Unavailable(
                    format!(
                        "the database did not answer within {} ms",
                        self.state_read_timeout.as_millis()
                    )
                    .into(),
                )
            })?
            .map_err(db_err)?
        else {
            return Ok(None);
        };
        let token = self.to_token(tokens::Model::from_query_result(&row, "").map_err(db_err)?)?;
        let get = |column: &str| -> Result<Option<String>> {
            row.try_get::<Option<String>>("", column).map_err(db_err)
        };
        let tenant_status = convert::tenant_status(&get("x_tenant_status")?.unwrap_or_default())?;
        let owner_status = get("x_owner_status")?
            .map(|s| convert::user_status(&s))
            .transpose()?;
        let membership = match get("x_member_user")? {
            Some(_) => Some(Membership {
                role: RoleName::from_trusted(get("x_member_role")?.unwrap_or_default()),
                groups: Arc::new(convert::groups(
                    &get("x_member_groups")?.unwrap_or_default(),
                )?),
            }),
            None => None,
        };
        let role_permissions = joined_role_permissions(&row)?;
        Ok(Some(TokenState {
            token: Arc::new(token),
            tenant_status,
            owner_status,
            membership,
            role_permissions: role_permissions.map(Arc::new),
        }))
    }

    async fn get_token(&self, tenant: &TenantId, id: &str) -> Result<Option<Token>> {
        tokens::Entity::find_by_id(id)
            .filter(tokens::Column::TenantId.eq(tenant.as_str()))
            .by_key(&self.db)
            .await
            .map_err(db_err)?
            .map(|m| self.to_token(m))
            .transpose()
    }

    async fn list_tokens(&self, q: &TokenQuery) -> Result<Vec<Token>> {
        let v = &q.visibility;
        let mut visible = Condition::any();
        if v.all {
            visible = visible.add(Expr::value(true));
        }
        if v.api_keys {
            visible = visible.add(tokens::Column::Kind.eq(TokenKind::ApiKey.marker()));
        }
        if let Some(owner) = &v.owner {
            visible = visible.add(
                Condition::all()
                    .add(tokens::Column::Kind.eq(TokenKind::Personal.marker()))
                    .add(tokens::Column::OwnerUserId.eq(owner.as_str())),
            );
        }
        if let Some(itself) = &v.itself {
            visible = visible.add(tokens::Column::Id.eq(itself.as_str()));
        }
        if !v.all && !v.api_keys && v.owner.is_none() && v.itself.is_none() {
            return Ok(Vec::new());
        }
        let mut query = tokens::Entity::find()
            .filter(tokens::Column::TenantId.eq(q.tenant_id.as_str()))
            .filter(visible)
            .order_by_desc(tokens::Column::CreatedAt)
            .order_by_desc(tokens::Column::Id);
        if let Some(kind) = q.kind {
            query = query.filter(tokens::Column::Kind.eq(kind.marker()));
        }
        if let Some(needle) = &q.name_contains {
            query = query.filter(tokens::Column::NameKey.like(like_contains(needle)));
        }
        if let Some(owner) = &q.owner {
            query = query.filter(tokens::Column::OwnerUserId.eq(owner.as_str()));
        }
        if let Some(then) = q.revoked_by_then {
            query = query.filter(
                Condition::any()
                    .add(tokens::Column::RevokedAt.is_null())
                    .add(grace_until_after(then)),
            );
        }
        if let Some((created_at, id)) = &q.after {
            let at = micros(*created_at);
            query = query.filter(
                Condition::any().add(tokens::Column::CreatedAt.lt(at)).add(
                    Condition::all()
                        .add(tokens::Column::CreatedAt.eq(at))
                        .add(tokens::Column::Id.lt(id.as_str())),
                ),
            );
        }
        query
            .limit(q.limit)
            .all(&self.db)
            .await
            .map_err(db_err)?
            .into_iter()
            .map(|m| self.to_token(m))
            .collect()
    }

    async fn revoke_token(
        &self,
        tenant: &TenantId,
        id: &str,
        revocation: &Revocation,
        audit: &AuditRecord,
    ) -> Result<Option<Token>> {
        let txn = self.begin().await?;
        let updated = set_revocation(tokens::Entity::update_many(), revocation)
            .filter(tokens::Column::Id.eq(id))
            .filter(tokens::Column::TenantId.eq(tenant.as_str()))
            .filter(
                Condition::any()
                    .add(tokens::Column::RevokedAt.is_null())
                    .add(grace_until_after(revocation.at)),
            )
            .exec(&txn)
            .await
            .map_err(db_err)?
            .rows_affected;
        crash_point("revoke.row_updated");
        if updated > 0 {
            append(&txn, audit).await?;
        }
        let row = tokens::Entity::find_by_id(id)
            .filter(tokens::Column::TenantId.eq(tenant.as_str()))
            .by_key(&txn)
            .await
            .map_err(db_err)?;
        crash_point("revoke.before_commit");
        commit(txn).await?;
        crash_point("revoke.committed");
        row.map(|m| self.to_token(m)).transpose()
    }

    async fn delete_token(
        &self,
        tenant: &TenantId,
        id: &str,
        audit: &[AuditRecord],
    ) -> Result<bool> {
        let txn = self.begin().await?;
        let deleted = tokens::Entity::delete_many()
            .filter(tokens::Column::Id.eq(id))
            .filter(tokens::Column::TenantId.eq(tenant.as_str()))
            .exec(&txn)
            .await
            .map_err(db_err)?
            .rows_affected;
        if deleted > 0 {
            token_uses::Entity::delete_many()
                .filter(token_uses::Column::TokenId.eq(id))
                .exec(&txn)
                .await
                .map_err(db_err)?;
        }
        commit_if_deleted(txn, deleted, audit).await
    }

    async fn touch_last_used(&self, used: &[(String, Timestamp)]) -> Result<()> {
        // One UPDATE per chunk: SET last_used_at = CASE id WHEN … THEN … END. Chunked because
        // a statement binds three values per token, and both databases cap the values of
        // one statement (SQLite 32 766, PostgreSQL 65 535); a busy replica's batch can be
        // larger, and one giant statement would also sit in the prepared-statement cache.
        for chunk in used.chunks(LAST_USED_CHUNK) {
            let mut case = sea_orm::sea_query::CaseStatement::new();
            for (id, at) in chunk {
                // Never backwards: another replica (or a retried chunk) may already have
                // written a later use.
                let at = micros(*at);
                let later = sea_orm::sea_query::CaseStatement::new()
                    .case(
                        Condition::any()
                            .add(tokens::Column::LastUsedAt.is_null())
                            .add(tokens::Column::LastUsedAt.lt(at)),
                        Expr::value(at),
                    )
                    .finally(Expr::col(tokens::Column::LastUsedAt));
                case = case.case(tokens::Column::Id.eq(id.as_str()), later);
            }
            let case = case.finally(Expr::col(tokens::Column::LastUsedAt));
            let update = tokens::Entity::update_many()
                .col_expr(tokens::Column::LastUsedAt, case.into())
                .filter(tokens::Column::Id.is_in(chunk.iter().map(|(id, _)| id.as_str())))
                .build(self.backend());
            self.execute_uncached(update).await?;
        }
        Ok(())
    }

    async fn record_token_uses(&self, uses: &[TokenUse]) -> Result<()> {
        // One row per pair (PostgreSQL refuses to upsert a row twice in one statement), the
        // latest use winning; in key order, so two replicas' batches lock rows in the same
        // order and cannot deadlock.
        let mut latest: BTreeMap<(&str, String, &str), &TokenUse> = BTreeMap::new();
        for used in uses {
            let ip = used.client_ip.map_or_else(String::new, |ip| ip.to_string());
            latest
                .entry((&used.token_id, ip, &used.service))
                .and_modify(|kept| {
                    if used.at > kept.at {
                        *kept = used;
                    }
                })
                .or_insert(used);
        }
        let uses: Vec<&TokenUse> = latest.into_values().collect();
        for chunk in uses.chunks(TOKEN_USES_CHUNK) {
            // Never backwards: another replica may already have written a later use.
            let later = "CASE WHEN excluded.last_at > token_uses.last_at \
                         THEN excluded.last_at ELSE token_uses.last_at END";
            let upsert =
                token_uses::Entity::insert_many(chunk.iter().map(|u| convert::token_use_row(u)))
                    .on_conflict(
                        OnConflict::columns([
                            token_uses::Column::TokenId,
                            token_uses::Column::ClientIp,
                            token_uses::Column::Service,
                        ])
                        .value(token_uses::Column::LastAt, Expr::cust(later))
                        .update_column(token_uses::Column::ServiceName)
                        .to_owned(),
                    )
                    .build(self.backend());
            self.execute_uncached(upsert).await?;
            let mut ids: Vec<&str> = chunk.iter().map(|u| u.token_id.as_str()).collect();
            ids.sort_unstable();
            ids.dedup();
            self.prune_token_uses(&ids).await?;
        }
        Ok(())
    }

    async fn token_uses(&self, token_ids: &[String]) -> Result<Vec<TokenUse>> {
        if token_ids.is_empty() {
            return Ok(Vec::new());
        }
        // The prune's order, and its bound: rows over it (a prune that failed, one not yet
        // run by another replica) are not shown.
        let rows = token_uses::Entity::find()
            .filter(token_uses::Column::TokenId.is_in(token_ids.iter().map(String::as_str)))
            .order_by_desc(token_uses::Column::LastAt)
            .order_by_desc(token_uses::Column::ClientIp)
            .order_by_desc(token_uses::Column::Service)
            .all(&self.db)
            .await
            .map_err(db_err)?;
        let mut shown: HashMap<String, usize> = HashMap::new();
        rows.into_iter()
            .filter(|row| {
                let count = shown.entry(row.token_id.clone()).or_default();
                *count += 1;
                *count <= MAX_TOKEN_USES
            })
            .map(convert::token_use)
            .collect()
    }

    async fn replace_hash(&self, id: &str, old: &str, new: &str) -> Result<bool> {
        let updated = tokens::Entity::update_many()
            .col_expr(tokens::Column::SecretHash, Expr::value(new.to_owned()))
            .filter(tokens::Column::Id.eq(id))
            .filter(tokens::Column::SecretHash.eq(old))
            .exec(&self.db)
            .await
            .map_err(db_err)?
            .rows_affected;
        Ok(updated > 0)
    }

    async fn list_audit(&self, q: &AuditQuery) -> Result<Vec<AuditEvent>> {
        let mut query = audit_events::Entity::find().order_by_desc(audit_events::Column::Id);
        if let Some(tenant) = &q.tenant_id {
            query = query.filter(audit_events::Column::TenantId.eq(tenant.as_str()));
        }
        if let Some(token) = &q.token_id {
            query = query.filter(audit_events::Column::TokenId.eq(token.as_str()));
        }
        if let Some(before) = q.before_id {
            query = query.filter(audit_events::Column::Id.lt(before));
        }
        query
            .limit(q.limit)
            .all(&self.db)
            .await
            .map_err(db_err)?
            .into_iter()
            .map(convert::audit_event)
            .collect()
    }

    async fn bootstrap(
        &self,
        tenant: &Tenant,
        role: &Role,
        token: &Token,
        audit: &AuditRecord,
    ) -> Result<()> {
        let txn = self.begin().await?;
        let exists = tenants::Entity::find_by_id(tenant.id.as_str())
            .by_key(&txn)
            .await
            .map_err(db_err)?;
        if exists.is_some() {
            return Err(Error::AlreadyExists(format!(
                "tenant {} already exists: this database is bootstrapped",
                tenant.id
            )));
        }
        let already = |e: DbErr| match e.sql_err() {
            Some(SqlErr::UniqueConstraintViolation(_)) => Error::AlreadyExists(
                "another bootstrap won the race: this database is bootstrapped".to_owned(),
            ),
            _ => db_err(e),
        };
        tenants::Entity::insert(convert::tenant_row(tenant))
            .exec(&txn)
            .await
            .map_err(already)?;
        roles::Entity::insert(convert::role_row(role))
            .exec(&txn)
            .await
            .map_err(db_err)?;
        tokens::Entity::insert(convert::token_row(token))
            .exec(&txn)
            .await
            .map_err(db_err)?;
        append(&txn, audit).await?;
        commit(txn).await
    }
}

impl SeaStore {
    /// Keeps the [`MAX_TOKEN_USES`] most recent pairs of each of `ids` (ties broken by IP
    /// and service, so every replica keeps the same ones) and drops the uses of tokens
    /// deleted since they were noted.
    async fn prune_token_uses(&self, ids: &[&str]) -> Result<()> {
        let placeholders: Vec<String> = (1..=ids.len())
            .map(|i| match self.backend() {
                DbBackend::Postgres => format!("${i}"),
                _ => "?".to_owned(),
            })
            .collect();
        let sql = format!(
            "DELETE FROM token_uses WHERE token_id IN ({}) AND (
               NOT EXISTS (SELECT 1 FROM tokens t WHERE t.id = token_uses.token_id)
               OR (SELECT COUNT(*) FROM token_uses n
                   WHERE n.token_id = token_uses.token_id
                     AND (n.last_at > token_uses.last_at
                          OR (n.last_at = token_uses.last_at
                              AND (n.client_ip > token_uses.client_ip
                                   OR (n.client_ip = token_uses.client_ip
                                       AND n.service > token_uses.service))))) >= {MAX_TOKEN_USES})",
            placeholders.join(", ")
        );
        let statement =
            Statement::from_sql_and_values(self.backend(), sql, ids.iter().map(|id| (*id).into()));
        self.execute_uncached(statement).await?;
        Ok(())
    }
}

/// An UPDATE of tokens that writes `revocation`.
fn set_revocation(
    update: sea_orm::UpdateMany<tokens::Entity>,
    revocation: &Revocation,
) -> sea_orm::UpdateMany<tokens::Entity> {
    update
        .col_expr(
            tokens::Column::RevokedAt,
            Expr::value(micros(revocation.at)),
        )
        .col_expr(
            tokens::Column::RevokedBy,
            Expr::value(revocation.by.clone()),
        )
        .col_expr(
            tokens::Column::RevokeReason,
            Expr::value(revocation.reason.clone()),
        )
        .col_expr(
            tokens::Column::RevocationScheduled,
            Expr::value(revocation.scheduled),
        )
}

/// A rotated token whose grace period lasts beyond `at`: still live then.
fn grace_until_after(at: Timestamp) -> Condition {
    Condition::all()
        .add(tokens::Column::RevocationScheduled.eq(true))
        .add(tokens::Column::RevokedAt.gt(micros(at)))
}

/// Holds, until `txn` ends, the right to check and take `token`'s name among its owner's
/// tokens of its kind. Without it two transactions issuing one name at once on PostgreSQL
/// (read committed, several connections) would both find no live token of that name and
/// both insert one. A transaction-scoped advisory lock on a 64-bit hash of the name's key
/// (its parts joined by the unit separator: PostgreSQL's text holds no NUL): two keys
/// sharing a hash only wait for each other. SQLite needs none: its one connection
/// runs one transaction at a time.
async fn lock_name(txn: &DatabaseTransaction, token: &Token) -> Result<()> {
    if txn.get_database_backend() != DbBackend::Postgres {
        return Ok(());
    }
    let key = format!(
        "tokend.token-name\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{}",
        token.tenant_id.as_str(),
        token.owner_user_id.as_ref().map_or("", UserId::as_str),
        token.kind.marker(),
        token.name.key()
    );
    txn.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
        [key.into()],
    ))
    .await
    .map_err(db_err)?;
    Ok(())
}

/// Stores `token` unless its owner has another live token of the same kind and name than
/// `predecessor` (the token it replaces, which keeps its name through a rotation's grace).
async fn insert_token_in(
    txn: &DatabaseTransaction,
    token: &Token,
    predecessor: Option<&str>,
) -> Result<()> {
    lock_name(txn, token).await?;
    // The check and the insert in one statement: one round trip fewer than counting first.
    let insert = token_insert(token, predecessor)?;
    let inserted = txn.execute(&insert).await.map_err(insert_err)?;
    if inserted.rows_affected() == 0 {
        return Err(name_taken(token));
    }
    Ok(())
}

/// `INSERT INTO tokens … SELECT … WHERE NOT EXISTS (a live token of the same owner, kind
/// and name, other than `predecessor`)`: inserts nothing when the name is taken.
fn token_insert(token: &Token, predecessor: Option<&str>) -> Result<InsertStatement> {
    let now = micros(token.created_at);
    let mut clashing = Condition::all()
        .add(tokens::Column::TenantId.eq(token.tenant_id.as_str()))
        .add(tokens::Column::Kind.eq(token.kind.marker()))
        .add(owner_condition(token.kind, token.owner_user_id.as_ref()))
        .add(tokens::Column::NameKey.eq(token.name.key()))
        .add(
            Condition::any()
                .add(tokens::Column::RevokedAt.is_null())
                .add(grace_until_after(token.created_at)),
        )
        .add(
            Condition::any()
                .add(tokens::Column::ExpiresAt.is_null())
                .add(tokens::Column::ExpiresAt.gt(now)),
        );
    if let Some(predecessor) = predecessor {
        clashing = clashing.add(tokens::Column::Id.ne(predecessor));
    }
    insert_where(
        convert::token_row(token),
        Expr::not_exists(
            Query::select()
                .expr(Expr::val(1))
                .from(tokens::Entity)
                .cond_where(clashing)
                .take(),
        ),
    )
}

/// `INSERT INTO <the row's table> (<its set columns>) SELECT <their values> WHERE
/// <condition>`: the row is written only if `condition` holds when the statement runs.
fn insert_where<A: ActiveModelTrait>(row: A, condition: Expr) -> Result<InsertStatement> {
    let (mut columns, mut values) = (Vec::new(), Vec::new());
    for column in <<A::Entity as EntityTrait>::Column as Iterable>::iter() {
        if let ActiveValue::Set(value) = row.get(column) {
            columns.push(column);
            values.push(Expr::val(value));
        }
    }
    // `take`, not `to_owned`: a statement's builders return `&mut Self`, and `to_owned`
    // deep-copies every expression in it.
    let source = Query::select().exprs(values).and_where(condition).take();
    Ok(Query::insert()
        .into_table(A::Entity::default())
        .columns(columns)
        .select_from(source)
        .map_err(|e| Error::internal(format!("insert of a row: {e}")))?
        .take())
}

fn insert_err(e: DbErr) -> Error {
    match e.sql_err() {
        // 72 random bits make an id collision a once-in-the-universe event; say so
        // plainly instead of overwriting anything.
        Some(SqlErr::UniqueConstraintViolation(_)) => {
            Error::AlreadyExists("token id collision; retry".to_owned())
        }
        _ => db_err(e),
    }
}

fn name_taken(token: &Token) -> Error {
    Error::AlreadyExists(format!(
        "name: a live token of this kind named {:?} already exists for this owner",
        token.name.as_str()
    ))
}

/// SQLite: IssueToken's transaction as one batch of statements (`BEGIN IMMEDIATE`, the
/// token's insert, its audit event's insert, `COMMIT`), sent to the database's worker
/// thread as one command instead of four round trips through a `DatabaseTransaction`.
/// Returns whether the token was inserted (false: its name is taken; the audit event's
/// insert is conditional on the token's, so nothing was written).
///
/// Unless `durable`, the batch relaxes `synchronous` to NORMAL for its own commit and sets
/// it back to FULL after it: the commit then returns without waiting for the disk (the log
/// reaches it at the next checkpoint, at the next FULL commit, which writes out everything
/// before it, or when the kernel flushes it). On a shared core that wait is what IssueToken
/// costs Introspect: its `fsync` is about 170 µs of the core's time a token on a KVM
/// guest. A crash of tokend itself loses nothing; a power cut or a kernel crash may lose
/// the newest issues, whose tokens then answer inactive. That errs towards denying a
/// token, never towards granting one; a revocation, suspension or downgrade is never
/// acknowledged before it is on disk.
async fn issue_in_one_batch(
    pool: &sqlx::SqlitePool,
    token: &Token,
    audit: &AuditRecord,
    durable: bool,
) -> Result<bool> {
    let token_insert = token_insert(token, None)?
        .returning_col(tokens::Column::Id)
        .take();
    // `changes()`: the rows the previous statement (the token's insert) wrote.
    let audit_insert = insert_where(convert::audit_row(audit), Expr::cust("changes() = 1"))?;
    let (token_sql, mut values) = token_insert.build(SqliteQueryBuilder);
    let (audit_sql, audit_values) = audit_insert.build(SqliteQueryBuilder);
    // sqlx binds a batch's `?` parameters in order across its statements.
    values.0.extend(audit_values.0);
    let transaction = format!("BEGIN IMMEDIATE; {token_sql}; {audit_sql}; COMMIT");
    let batch = match durable {
        true => transaction,
        false => format!("PRAGMA synchronous = NORMAL; {transaction}; PRAGMA synchronous = FULL"),
    };
    // The batch is one statement to the fault points: nothing of it is written before it.
    crash_point("issue.token_written");
    crash_point("issue.before_commit");
    // Spawned, so that a caller that goes away (a cancelled request) does not stop the
    // batch between its BEGIN and its COMMIT: sqlx stops a command whose receiver is gone,
    // and the connection would go back to the pool inside an open transaction.
    let pool = pool.clone();
    let id = token.id().to_owned();
    let name_key = token.name.key();
    let hash = token.secret_hash.0.to_string();
    let run = tokio::spawn(async move {
        let mut conn = CloseOnPanic(pool.acquire().await?);
        let values = sea_query_sqlx::SqlxValues(values);
        let done = sqlx::query_with(sqlx::AssertSqlSafe(batch), values)
            .fetch_all(&mut *conn.0)
            .await;
        let err = match done {
            Ok(rows) => return Ok(!rows.is_empty()),
            Err(err) => err,
        };
        // The batch stopped part-way, perhaps inside its transaction, perhaps after its
        // COMMIT and before its last PRAGMA: end the one and restore the other here, and
        // close a connection that cannot rather than pool it with either left behind.
        let reset = sqlx::raw_sql("ROLLBACK; PRAGMA synchronous = FULL")
            .execute(&mut *conn.0)
            .await;
        if reset.is_err() {
            conn.0.close_on_drop();
        }
        // Committed after all? Its id, name and hash (whose salt is its own) say so.
        let committed =
            sqlx::query("SELECT 1 FROM tokens WHERE id = ? AND name_key = ? AND secret_hash = ?")
                .bind(id)
                .bind(name_key)
                .bind(hash)
                .fetch_optional(&mut *conn.0)
                .await;
        match committed {
            Ok(Some(_)) => Ok(true),
            _ => Err(err),
        }
    });
    let inserted = run
        .await
        .map_err(|e| Error::internal(format!("token insert task: {e}")))?
        .map_err(|e| insert_err(DbErr::Exec(RuntimeErr::SqlxError(Arc::new(e)))))?;
    crash_point("issue.committed");
    Ok(inserted)
}

/// A pooled SQLite connection that is closed, not pooled, when a panic drops it: it may
/// be inside a transaction or at `synchronous = NORMAL` (see `issue_in_one_batch`).
struct CloseOnPanic(sqlx::pool::PoolConnection<sqlx::Sqlite>);

impl Drop for CloseOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.close_on_drop();
        }
    }
}

async fn require_tenant(txn: &DatabaseTransaction, tenant: &TenantId) -> Result<()> {
    let found = tenants::Entity::find_by_id(tenant.as_str())
        .by_key(txn)
        .await
        .map_err(db_err)?;
    match found {
        Some(_) => Ok(()),
        None => Err(Error::NotFound(format!("tenant {tenant}"))),
    }
}
