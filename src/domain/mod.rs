//! Pure rules: the token format and checksum, the records, effective permissions, scope,
//! role and policy checks, expiry; and the ports (store, hasher, clock) adapters implement.
//! No transport, no storage, no I/O: everything here is testable with plain values.

pub mod error;
pub mod model;
pub mod names;
pub mod ports;
pub mod rules;
pub mod token_format;

pub use error::{Error, Result};
