//! The Introspect caches: warm calls cost nothing but the gRPC stack, and no cached answer
//! outlives a change.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokend::clock::Clock as _;
use tokend::domain::ports::Store as _;
use tokend::proto::v1 as pb;

use crate::helpers::{Backend, TestApp, slow_argon2, spawn_app_with};

crate::both_backends!(
    a_warm_introspect_costs_no_query_and_no_argon2,
    a_stampede_on_a_cold_token_costs_one_argon2_and_a_repeated_wrong_secret_none,
    a_flood_of_distinct_wrong_secrets_for_a_real_id_locks_nothing_out,
    a_revocation_beats_a_warm_cache_on_the_very_next_call,
    no_introspect_after_a_revocation_returned_answers_active_under_concurrent_load,
    last_use_is_recorded_in_batches,
    a_recomputed_verdict_does_not_record_a_use_again_within_the_minute,
    a_last_use_batch_larger_than_a_statement_can_bind_is_written_and_never_moves_back,
    a_hash_with_old_parameters_is_upgraded_once_and_the_token_keeps_working,
);

async fn acme(app: &TestApp) {
    app.tenant(
        "acme",
        &[("dev", &["a:read", "a:write"]), ("viewer", &["a:read"])],
    )
    .await;
    app.member("acme", "alice", "dev", &["eng"]).await;
}

async fn a_warm_introspect_costs_no_query_and_no_argon2(app: TestApp) {
    acme(&app).await;
    let (token, _) = app.pat("acme", "alice", "laptop", &[]).await;
    assert!(
        app.introspect(&token).await.active,
        "first sight fills the caches"
    );

    let (queries, verifications) = (app.store.token_lookups(), app.hasher.verifications());
    for _ in 0..50 {
        assert!(app.introspect(&token).await.active);
    }
    assert_eq!(
        app.store.token_lookups() - queries,
        0,
        "database lookups per warm call"
    );
    assert_eq!(
        app.hasher.verifications() - verifications,
        0,
        "argon2 calls per warm call"
    );
}

async fn a_revocation_beats_a_warm_cache_on_the_very_next_call(app: TestApp) {
    acme(&app).await;
    let (token, info) = app.pat("acme", "alice", "laptop", &[]).await;
    for _ in 0..3 {
        assert!(app.introspect(&token).await.active);
    }
    app.member("acme", "alice", "viewer", &[]).await;
    assert_eq!(
        app.introspect(&token).await.permissions,
        vec!["a:read".to_owned()]
    );
    app.revoke_as("acme", "alice", &info.id).await;
    assert!(!app.introspect(&token).await.active);
}

async fn no_introspect_after_a_revocation_returned_answers_active_under_concurrent_load(
    app: TestApp,
) {
    acme(&app).await;
    for round in 0..5 {
        let (token, info) = app
            .pat("acme", "alice", &format!("round-{round}"), &[])
            .await;
        let revoked = Arc::new(AtomicBool::new(false));
        // Introspect in a loop on two tasks, so cache fills race the revocation.
        let mut workers = Vec::new();
        for _ in 0..2 {
            let mut client = app.tokens(&app.root);
            let token = token.clone();
            let revoked = Arc::clone(&revoked);
            workers.push(tokio::spawn(async move {
                for _ in 0..40 {
                    // Read the flag before the call: a call that started after the
                    // revocation returned must not answer active.
                    let after = revoked.load(Ordering::SeqCst);
                    let answer = client
                        .introspect(pb::IntrospectRequest {
                            token: token.clone(),
                            ..Default::default()
                        })
                        .await
                        .unwrap()
                        .into_inner();
                    assert!(
                        !(after && answer.active),
                        "active after the revocation returned"
                    );
                }
            }));
        }
        tokio::time::sleep(std::time::Duration::from_millis(5 * round)).await;
        app.revoke_as("acme", "alice", &info.id).await;
        revoked.store(true, Ordering::SeqCst);
        for worker in workers {
            worker.await.unwrap();
        }
        assert!(!app.introspect(&token).await.active);
    }
}

async fn last_use_is_recorded_in_batches(app: TestApp) {
    acme(&app).await;
    let (token, _) = app.pat("acme", "alice", "laptop", &[]).await;
    for _ in 0..20 {
        assert!(app.introspect(&token).await.active);
    }
    let mut last_used = None;
    for _ in 0..100 {
        let listed = app.list_as("acme", "alice").await;
        last_used = listed[0].last_used_at;
        if last_used.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let last_used = last_used.expect("the batch was written");
    let now = app.clock.now();
    assert!(
        (now.timestamp() - last_used.seconds).abs() <= 60,
        "precise to the minute"
    );
}

/// `n` concurrent Introspects of `token`, each on its own client; their `active` answers.
async fn at_once(app: &TestApp, token: &str, n: usize) -> Vec<bool> {
    let calls = (0..n).map(|_| {
        let mut client = app.tokens(&app.root);
        let token = token.to_owned();
        async move {
            client
                .introspect(pb::IntrospectRequest {
                    token,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .active
        }
    });
    futures::future::join_all(calls).await
}

async fn a_flood_of_distinct_wrong_secrets_for_a_real_id_locks_nothing_out(app: TestApp) {
    use rand::Rng as _;
    acme(&app).await;
    let (token, _) = app.pat("acme", "alice", "laptop", &[]).await;
    let (cold, _) = app.pat("acme", "alice", "phone", &[]).await;
    assert!(app.introspect(&token).await.active);
    let secret_len = token.len() - ("tkd_pat_".len() + 12 + 1) - 6;

    // 128 distinct wrong secrets for the real id, 16 in flight: each is a real argon2
    // verification (nothing to remember), none passes, and there is no per-id lockout.
    let before = app.hasher.verifications();
    for _ in 0..8 {
        let calls = (0..16).map(|_| {
            let secret: String = rand::rng()
                .sample_iter(rand::distr::Alphanumeric)
                .take(secret_len)
                .map(char::from)
                .collect();
            let forged = crate::introspect::forge_with_secret(&token, &secret);
            let mut client = app.tokens(&app.root);
            async move {
                client
                    .introspect(pb::IntrospectRequest {
                        token: forged,
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner()
            }
        });
        for answer in futures::future::join_all(calls).await {
            assert!(!answer.active);
        }
    }
    assert_eq!(
        app.hasher.verifications() - before,
        128,
        "one verification per distinct guess"
    );

    // The real token: still active, from its cache (no verification); another token of the
    // same owner, never seen before, verifies as usual.
    let before = app.hasher.verifications();
    assert!(
        app.introspect(&token).await.active,
        "the real token was locked out"
    );
    assert_eq!(app.hasher.verifications() - before, 0);
    assert!(app.introspect(&cold).await.active);
    assert_eq!(app.hasher.verifications() - before, 1);
}

async fn a_stampede_on_a_cold_token_costs_one_argon2_and_a_repeated_wrong_secret_none(
    app: TestApp,
) {
    acme(&app).await;
    let (token, _) = app.pat("acme", "alice", "laptop", &[]).await;
    app.introspect("warm up the caller").await;
    let before = app.hasher.verifications();
    assert!(
        at_once(&app, &token, 16)
            .await
            .into_iter()
            .all(|active| active)
    );
    assert_eq!(
        app.hasher.verifications() - before,
        1,
        "one verification for sixteen first sights"
    );

    // The right id with a wrong secret, sixteen at once and then again one by one: argon2
    // once (the waiters behind a failed verification find it rejected), then remembered.
    let (other, _) = app.pat("acme", "alice", "phone", &[]).await;
    let forged = crate::introspect::forge(&token, &other);
    let before = app.hasher.verifications();
    assert!(
        at_once(&app, &forged, 16)
            .await
            .into_iter()
            .all(|active| !active)
    );
    for _ in 0..5 {
        assert!(!app.introspect(&forged).await.active);
    }
    assert_eq!(
        app.hasher.verifications() - before,
        1,
        "a wrong secret, concurrent or repeated, is hashed once"
    );
    assert!(
        app.introspect(&token).await.active,
        "and the real token is not locked out"
    );
}

/// Alice's token `id`'s last use on record, in Unix seconds, as ListTokens shows it.
async fn last_use_of(app: &TestApp, id: &str) -> Option<i64> {
    app.list_as("acme", "alice")
        .await
        .iter()
        .find(|t| t.id == id)
        .and_then(|t| t.last_used_at)
        .map(|at| at.seconds)
}

/// A busy replica's batch can hold more tokens than one statement may bind values (three per
/// token; SQLite allows 32 766, PostgreSQL 65 535): it is written, not refused.
async fn a_last_use_batch_larger_than_a_statement_can_bind_is_written_and_never_moves_back(
    app: TestApp,
) {
    acme(&app).await;
    // Never introspected, so only this batch can give it a last use.
    let (_, info) = app.pat("acme", "alice", "laptop", &[]).await;
    let now = app.clock.now();
    let mut batch: Vec<_> = (0..30_000).map(|i| (format!("{i:012}"), now)).collect();
    batch.push((info.id.clone(), now));
    app.store.touch_last_used(&batch).await.unwrap();
    let last_use = || last_use_of(&app, &info.id);
    let seen = last_use()
        .await
        .expect("the real token in the batch got its last use");
    assert!((now.timestamp() - seen).abs() <= 60);

    // An older use arriving later (another replica's flush, a retried chunk) does not move
    // it back.
    let earlier = now - chrono::TimeDelta::minutes(10);
    app.store
        .touch_last_used(&[(info.id.clone(), earlier)])
        .await
        .unwrap();
    assert_eq!(last_use().await, Some(seen));
}

/// A hot token whose verdict is recomputed (any write anywhere voids remembered verdicts) is
/// not written again within the minute: the new verdict carries the old one's last use.
async fn a_recomputed_verdict_does_not_record_a_use_again_within_the_minute(app: TestApp) {
    acme(&app).await;
    let (token, info) = app.pat("acme", "alice", "laptop", &[]).await;
    assert!(app.introspect(&token).await.active);
    let first = app.clock.now().timestamp();
    let last_use = || last_use_of(&app, &info.id);
    for _ in 0..100 {
        if last_use().await.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(last_use().await, Some(first));

    // Void every remembered verdict, then use the token again 10 s later.
    app.tenant("other", &[("viewer", &["a:read"])]).await;
    app.advance(chrono::TimeDelta::seconds(10));
    assert!(app.introspect(&token).await.active);
    // Several flush intervals (50 ms in tests) later, the first use is still the one on
    // record: the row the cache holds predates the flush, and only the carried use knows.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(last_use().await, Some(first));
}

/// The stored PHC string of token `id`.
async fn stored_hash(app: &TestApp, id: &str) -> String {
    app.store
        .token_state(id)
        .await
        .unwrap()
        .expect("the token exists")
        .token
        .secret_hash
        .0
        .to_string()
}

/// A token whose hash was made with older (cheaper) argon2 parameters is rehashed with the
/// current ones on its next successful verification, once, and keeps working throughout.
async fn a_hash_with_old_parameters_is_upgraded_once_and_the_token_keeps_working(app: TestApp) {
    use tokend::domain::ports::SecretHasher as _;
    use tokend::hashing::{Argon2Hasher, Argon2Settings};

    acme(&app).await;
    let (token, info) = app.pat("acme", "alice", "laptop", &[]).await;
    let current = stored_hash(&app, &info.id).await;
    // The secret is what lies between the display id's `_` and the 6-character checksum.
    let secret = &token[info.display_id.len() + 1..token.len() - 6];
    let old_settings = Argon2Settings {
        memory_kib: 32,
        ..Argon2Settings::default()
    };
    let old = Argon2Hasher::new(&old_settings, None)
        .unwrap()
        .hash(secret.to_owned().into())
        .await
        .unwrap();
    assert!(old.contains("m=32,"));
    // Written behind the caches' back before the token was ever introspected, as a row
    // from an older release would be.
    assert!(
        app.store
            .replace_hash(&info.id, &current, &old)
            .await
            .unwrap()
    );

    assert!(
        app.introspect(&token).await.active,
        "the old hash still verifies"
    );
    let mut upgraded = stored_hash(&app, &info.id).await;
    for _ in 0..100 {
        if upgraded != old {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        upgraded = stored_hash(&app, &info.id).await;
    }
    assert_ne!(upgraded, old, "the hash was upgraded");
    assert!(!upgraded.contains("m=32,"), "{upgraded}");
    assert!(upgraded.starts_with("$argon2id$"));

    // Keeps working, and is not upgraded again.
    for _ in 0..5 {
        assert!(app.introspect(&token).await.active);
    }
    let verifications = app.hasher.verifications();
    for _ in 0..5 {
        assert!(app.introspect(&token).await.active);
    }
    assert_eq!(app.hasher.verifications(), verifications, "warm again");
    assert_eq!(stored_hash(&app, &info.id).await, upgraded, "upgraded once");
}

/// A call that read a token's state just before a revocation, and was still verifying the
/// secret (first sight: argon2, made slow here) when the revocation returned, answers
/// inactive: it decides again after an invalidation that landed meanwhile.
async fn a_call_deciding_across_a_revocation_answers_inactive(backend: Backend) {
    let Some(app) = spawn_app_with(backend, slow_argon2).await else {
        return;
    };
    acme(&app).await;
    let (token, info) = app.pat("acme", "alice", "laptop", &[]).await;
    let touched = || {
        app.core
            .redecisions(tokend::introspect::Redecision::Touched)
    };
    let before = touched();
    let call = app.first_sight_deciding(token).await;
    app.revoke_as("acme", "alice", &info.id).await;
    assert!(
        !call.is_finished(),
        "the call finished before the revocation returned: argon2 was not slow enough"
    );
    assert!(
        !call.await.unwrap().unwrap().into_inner().active,
        "a call answered active after the revocation returned"
    );
    assert!(touched() > before, "the decision was made again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_deciding_across_a_revocation_answers_inactive_sqlite() {
    a_call_deciding_across_a_revocation_answers_inactive(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_deciding_across_a_revocation_answers_inactive_postgres() {
    a_call_deciding_across_a_revocation_answers_inactive(Backend::Postgres).await;
}

/// A first sight whose argon2 verification outlasts the lease (how long a write waits for a
/// replica that cannot acknowledge it) decides again from fresh state before it answers
/// "active": what it read may predate a revocation that has since returned. PostgreSQL
/// only: the lease belongs to the change feed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_that_outlives_the_lease_is_made_again_before_answering() {
    const LEASE_MS: u64 = 300;
    let slow_argon2_short_lease = |settings: &mut tokend::config::Settings| {
        slow_argon2(settings);
        settings.cache.feed_timeout_ms = LEASE_MS;
        settings.cache.feed_heartbeat_ms = 50;
    };
    let Some(app) = spawn_app_with(Backend::Postgres, slow_argon2_short_lease).await else {
        return;
    };
    acme(&app).await;
    let (token, _) = app.pat("acme", "alice", "laptop", &[]).await;
    let outlived = || {
        app.core
            .redecisions(tokend::introspect::Redecision::Outlived)
    };
    let before = outlived();

    let started = std::time::Instant::now();
    let answer = app.introspect(&token).await;
    let took = started.elapsed();

    assert!(
        took >= std::time::Duration::from_millis(LEASE_MS),
        "the first sight took {took:?}, within the lease: argon2 was not slow enough"
    );
    assert!(answer.active, "nothing changed: the token is still live");
    assert!(
        outlived() > before,
        "a decision read {took:?} ago was answered without being made again"
    );
}
