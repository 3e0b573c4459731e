//! SeaORM entities, one per table. Timestamps are stored as microseconds since the Unix
//! epoch in BIGINT columns: the same type, ordering and precision on SQLite and PostgreSQL.
//! Lists (permissions, scopes, groups, audit details) are JSON text.

pub mod audit_events;
pub mod memberships;
pub mod roles;
pub mod tenants;
pub mod token_uses;
pub mod tokens;
pub mod users;
