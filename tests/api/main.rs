//! Black-box tests: a real tokend on 127.0.0.1:0, a fresh database per test, talked to
//! through the generated tonic clients. Every behaviour runs on SQLite and on PostgreSQL
//! (`TOKEND_TEST_POSTGRES_URL`); see `both_backends!`.

// A panic in a test is a failed assertion with a message; unwrapping is the point here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod helpers;

mod audit;
mod auth;
mod bulk;
mod caching;
mod cli;
mod crash;
mod directory;
mod envoy;
mod feed;
mod introspect;
mod layer;
mod leaks;
mod operations;
mod operator;
mod otel;
mod replicas;
mod rotation;
mod secrets;
mod tls;
mod tokens;
mod uses;
