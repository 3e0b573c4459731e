//! Where tokens were used from: a few (client IP, calling service) pairs per token. No
//! foreign key: uses are written in batches after the fact, and the writer drops those of
//! tokens deleted meanwhile instead of failing the batch.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{big_integer, text};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum TokenUses {
    Table,
    TokenId,
    ClientIp,
    Service,
    ServiceName,
    LastAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(TokenUses::Table)
                    .col(text(TokenUses::TokenId))
                    .col(text(TokenUses::ClientIp))
                    .col(text(TokenUses::Service))
                    .col(text(TokenUses::ServiceName))
                    .col(big_integer(TokenUses::LastAt))
                    .primary_key(
                        Index::create()
                            .col(TokenUses::TokenId)
                            .col(TokenUses::ClientIp)
                            .col(TokenUses::Service),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(TokenUses::Table).to_owned())
            .await
    }
}
