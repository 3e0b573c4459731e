//! The SeaORM adapter of [`crate::domain::ports::Store`], its entities and migrations. The
//! only module that imports `sea_orm`; the same code serves SQLite and PostgreSQL.

mod convert;
pub mod entities;
mod fault;
mod feed;
mod fence;
pub mod migration;
mod store;

pub use feed::{ChangeFeed, FeedTiming};
pub use store::{DatabaseOptions, SeaStore};
