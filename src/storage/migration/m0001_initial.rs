//! The directory, tokens and the audit log.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Tenants {
    Table,
    Id,
    Name,
    Status,
    RequireExpiry,
    MaxLifetimeSecs,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Users {
    Table,
    Id,
    Status,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Roles {
    Table,
    TenantId,
    Name,
    Permissions,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Memberships {
    Table,
    TenantId,
    UserId,
    RoleName,
    Groups,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Tokens {
    Table,
    Id,
    TenantId,
    Kind,
    Name,
    NameKey,
    OwnerUserId,
    RoleName,
    Scopes,
    SecretHash,
    CreatedAt,
    CreatedBy,
    ExpiresAt,
    LastUsedAt,
    RevokedAt,
    RevokedBy,
    RevokeReason,
}

#[derive(DeriveIden)]
enum AuditEvents {
    Table,
    Id,
    At,
    TenantId,
    Actor,
    Caller,
    Action,
    TokenId,
    Detail,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Tenants::Table)
                    .col(text(Tenants::Id).primary_key())
                    .col(text(Tenants::Name))
                    .col(text(Tenants::Status))
                    .col(boolean(Tenants::RequireExpiry))
                    .col(big_integer_null(Tenants::MaxLifetimeSecs))
                    .col(big_integer(Tenants::CreatedAt))
                    .col(big_integer(Tenants::UpdatedAt))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Users::Table)
                    .col(text(Users::Id).primary_key())
                    .col(text(Users::Status))
                    .col(big_integer(Users::UpdatedAt))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Roles::Table)
                    .col(text(Roles::TenantId))
                    .col(text(Roles::Name))
                    .col(text(Roles::Permissions))
                    .col(big_integer(Roles::UpdatedAt))
                    .primary_key(Index::create().col(Roles::TenantId).col(Roles::Name))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_roles_tenant")
                            .from(Roles::Table, Roles::TenantId)
                            .to(Tenants::Table, Tenants::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Memberships::Table)
                    .col(text(Memberships::TenantId))
                    .col(text(Memberships::UserId))
                    .col(text(Memberships::RoleName))
                    .col(text(Memberships::Groups))
                    .col(big_integer(Memberships::UpdatedAt))
                    .primary_key(
                        Index::create()
                            .col(Memberships::TenantId)
                            .col(Memberships::UserId),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_memberships_tenant")
                            .from(Memberships::Table, Memberships::TenantId)
                            .to(Tenants::Table, Tenants::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_memberships_user")
                            .from(Memberships::Table, Memberships::UserId)
                            .to(Users::Table, Users::Id),
                    )
                    // A role cannot disappear from under its members.
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_memberships_role")
                            .from(
                                Memberships::Table,
                                (Memberships::TenantId, Memberships::RoleName),
                            )
                            .to(Roles::Table, (Roles::TenantId, Roles::Name))
                            .on_delete(ForeignKeyAction::Restrict),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_memberships_user")
                    .table(Memberships::Table)
                    .col(Memberships::UserId)
                    .to_owned(),
            )
            .await?;

        // No foreign key to roles: deleting a role must leave its API keys in place, inactive.
        manager
            .create_table(
                Table::create()
                    .table(Tokens::Table)
                    .col(text(Tokens::Id).primary_key())
                    .col(text(Tokens::TenantId))
                    .col(text(Tokens::Kind))
                    .col(text(Tokens::Name))
                    .col(text(Tokens::NameKey))
                    .col(text_null(Tokens::OwnerUserId))
                    .col(text_null(Tokens::RoleName))
                    .col(text_null(Tokens::Scopes))
                    .col(text(Tokens::SecretHash))
                    .col(big_integer(Tokens::CreatedAt))
                    .col(text(Tokens::CreatedBy))
                    .col(big_integer_null(Tokens::ExpiresAt))
                    .col(big_integer_null(Tokens::LastUsedAt))
                    .col(big_integer_null(Tokens::RevokedAt))
                    .col(text_null(Tokens::RevokedBy))
                    .col(text_null(Tokens::RevokeReason))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_tokens_tenant")
                            .from(Tokens::Table, Tokens::TenantId)
                            .to(Tenants::Table, Tenants::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        // Keyset paging of a tenant's tokens, newest first.
        manager
            .create_index(
                Index::create()
                    .name("idx_tokens_tenant_created")
                    .table(Tokens::Table)
                    .col(Tokens::TenantId)
                    .col(Tokens::CreatedAt)
                    .col(Tokens::Id)
                    .to_owned(),
            )
            .await?;
        // Name uniqueness among an owner's live tokens, and "all tokens of a user".
        manager
            .create_index(
                Index::create()
                    .name("idx_tokens_owner_name")
                    .table(Tokens::Table)
                    .col(Tokens::TenantId)
                    .col(Tokens::OwnerUserId)
                    .col(Tokens::Kind)
                    .col(Tokens::NameKey)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(AuditEvents::Table)
                    .col(big_pk_auto(AuditEvents::Id))
                    .col(big_integer(AuditEvents::At))
                    .col(text(AuditEvents::TenantId))
                    .col(text(AuditEvents::Actor))
                    .col(text(AuditEvents::Caller))
                    .col(text(AuditEvents::Action))
                    .col(text_null(AuditEvents::TokenId))
                    .col(text(AuditEvents::Detail))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_audit_tenant")
                    .table(AuditEvents::Table)
                    .col(AuditEvents::TenantId)
                    .col(AuditEvents::Id)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_audit_token")
                    .table(AuditEvents::Table)
                    .col(AuditEvents::TokenId)
                    .col(AuditEvents::Id)
                    .to_owned(),
            )
            .await?;
        Ok(())
    }
}
