//! Several `tokend serve` processes on one PostgreSQL database, as in production: a change
//! made through one replica is enforced by the others on their next call.
//!
//! `PROPAGATION_TRIALS=200 cargo test --test api replicas -- --nocapture` prints the
//! revocation propagation figures the README quotes.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use tokend::proto::v1 as pb;
use tokend::proto::v1::directory_service_client::DirectoryServiceClient;
use tokend::proto::v1::token_service_client::TokenServiceClient;

use crate::helpers::{Backend, fresh_database};

const TOKEND: &str = env!("CARGO_BIN_EXE_tokend");

struct Replica {
    process: KillOnDrop,
    channel: Channel,
}

/// The replica's process, killed and reaped however the test ends.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

type Bearer =
    Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;

impl Replica {
    async fn start(database_url: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let process = KillOnDrop(
            Command::new(TOKEND)
                .arg("serve")
                .env("TOKEND_LISTEN", format!("127.0.0.1:{port}"))
                .env("TOKEND_DATABASE_URL", database_url)
                .env("TOKEND_LOG__FILTER", "warn")
                .env_remove("TOKEND_TEST_POSTGRES_URL")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(channel) = Channel::from_shared(format!("http://127.0.0.1:{port}"))
                .unwrap()
                .connect()
                .await
            {
                let status = HealthClient::new(channel.clone())
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .map(|r| r.into_inner().status);
                // Ready means the change feed is up and the caches are trusted.
                if status.ok() == Some(ServingStatus::Serving as i32) {
                    return Self { process, channel };
                }
            }
            assert!(
                Instant::now() < deadline,
                "replica on port {port} never became ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn bearer(key: &str) -> Bearer {
        let value: MetadataValue<_> = format!("Bearer {key}").parse().unwrap();
        Box::new(move |mut request: tonic::Request<()>| {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
            Ok(request)
        })
    }

    fn tokens(&self, key: &str) -> TokenServiceClient<InterceptedService<Channel, Bearer>> {
        TokenServiceClient::with_interceptor(self.channel.clone(), Self::bearer(key))
    }

    fn directory(&self, key: &str) -> DirectoryServiceClient<InterceptedService<Channel, Bearer>> {
        DirectoryServiceClient::with_interceptor(self.channel.clone(), Self::bearer(key))
    }
}

async fn introspect(replica: &Replica, root: &str, token: &str) -> pb::IntrospectResponse {
    replica
        .tokens(root)
        .introspect(pb::IntrospectRequest {
            token: token.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// Revokes alice's token `token_id` in `acme` through `replica`.
async fn revoke(replica: &Replica, root: &str, token_id: String) {
    replica
        .tokens(root)
        .revoke_token(pb::RevokeTokenRequest {
            tenant_id: "acme".into(),
            actor_user_id: "alice".into(),
            token_id,
            reason: String::new(),
        })
        .await
        .unwrap();
}

/// Polls `replica` until `done` holds; returns the time since `since` and whether the very
/// first call already held.
async fn until(
    replica: &Replica,
    root: &str,
    token: &str,
    since: Instant,
    done: impl Fn(&pb::IntrospectResponse) -> bool,
) -> (Duration, bool) {
    let bound = Duration::from_millis(500);
    let mut first = true;
    loop {
        let answer = introspect(replica, root, token).await;
        if done(&answer) {
            return (since.elapsed(), first);
        }
        first = false;
        assert!(
            since.elapsed() < bound,
            "not propagated within {bound:?}: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Bootstraps the database at `url`; returns the root key.
fn bootstrap(url: &str) -> String {
    let bootstrap = Command::new(TOKEND)
        .arg("bootstrap")
        .env("TOKEND_DATABASE_URL", url)
        .env("TOKEND_LOG__FILTER", "warn")
        .env_remove("TOKEND_TEST_POSTGRES_URL")
        .output()
        .unwrap();
    assert!(bootstrap.status.success(), "{bootstrap:?}");
    String::from_utf8(bootstrap.stdout)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .to_owned()
}

/// Tenant `acme` with roles `dev` (a:read, a:write), `viewer` (a:read) and `admin`
/// (tokend.tokens.admin); alice a dev, ada an admin.
async fn seed(dir: &mut DirectoryServiceClient<InterceptedService<Channel, Bearer>>) {
    dir.put_tenant(pb::PutTenantRequest {
        tenant: Some(pb::Tenant {
            id: "acme".into(),
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    for (name, permissions) in [
        ("dev", vec!["a:read", "a:write"]),
        ("viewer", vec!["a:read"]),
        ("admin", vec!["tokend.tokens.admin"]),
    ] {
        dir.put_role(pb::PutRoleRequest {
            tenant_id: "acme".into(),
            name: name.into(),
            permissions: permissions.into_iter().map(String::from).collect(),
        })
        .await
        .unwrap();
    }
    for (user, role) in [("alice", "dev"), ("ada", "admin")] {
        dir.put_member(pb::PutMemberRequest {
            tenant_id: "acme".into(),
            user_id: user.into(),
            role: role.into(),
            groups: vec![],
        })
        .await
        .unwrap();
    }
}

/// A fresh database, bootstrapped and seeded, with replicas A and B on it.
struct Pair {
    _database: crate::helpers::TestDatabase,
    url: String,
    root: String,
    a: Replica,
    b: Replica,
}

/// A [`Pair`]; `None` when the PostgreSQL half is not configured on this machine.
async fn seeded_pair() -> Option<Pair> {
    let (url, database) = fresh_database(Backend::Postgres).await?;
    let root = bootstrap(&url);
    let a = Replica::start(&url).await;
    let b = Replica::start(&url).await;
    seed(&mut a.directory(&root)).await;
    Some(Pair {
        _database: database,
        url,
        root,
        a,
        b,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_through_one_replica_are_enforced_by_the_other_at_once() {
    // `_database` bound (not left to `..`, which would drop the database at once), and
    // first, so it goes after the replicas.
    let Some(Pair {
        _database,
        root,
        a,
        b,
        ..
    }) = seeded_pair().await
    else {
        return;
    };
    let mut dir = a.directory(&root);
    let member = |role: &str| pb::PutMemberRequest {
        tenant_id: "acme".into(),
        user_id: "alice".into(),
        role: role.into(),
        groups: vec![],
    };
    let issue = |name: String| pb::IssueTokenRequest {
        tenant_id: "acme".into(),
        actor_user_id: "alice".into(),
        kind: pb::TokenKind::Personal.into(),
        name,
        ..Default::default()
    };

    // Revocation, many times over, to measure propagation.
    let trials: usize = std::env::var("PROPAGATION_TRIALS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(30);
    let mut times = Vec::with_capacity(trials);
    let mut writes = Vec::with_capacity(trials);
    let mut at_once = 0;
    for trial in 0..trials {
        let issued = a
            .tokens(&root)
            .issue_token(issue(format!("trial-{trial}")))
            .await
            .unwrap()
            .into_inner();
        for _ in 0..2 {
            assert!(
                introspect(&b, &root, &issued.secret).await.active,
                "warm on the other replica"
            );
        }
        let sent = Instant::now();
        revoke(&a, &root, issued.token.unwrap().id).await;
        let returned = Instant::now();
        writes.push(returned - sent);
        let (took, first) =
            until(&b, &root, &issued.secret, returned, |answer| !answer.active).await;
        times.push(took);
        at_once += usize::from(first);
    }
    times.sort();
    writes.sort();
    eprintln!(
        "RevokeToken over {trials} trials (commit and fence): p50 {:?}, p99 {:?}, max {:?}",
        percentile(&writes, 0.50),
        percentile(&writes, 0.99),
        writes[writes.len() - 1],
    );
    eprintln!(
        "revocation propagation over {trials} trials: p50 {:?}, p99 {:?}, max {:?}; inactive on the very next call in {at_once}/{trials}",
        percentile(&times, 0.50),
        percentile(&times, 0.99),
        times[times.len() - 1],
    );
    // Once RevokeToken has returned, the other replica has applied it: its very next answer
    // is inactive, every time.
    assert_eq!(
        at_once, trials,
        "a replica answered active after the revocation returned"
    );

    // Rotation through A: at once, the old token dies on B too; with a grace it lives on B
    // until a revocation through A ends the grace early.
    let rotate = |token_id: String, seconds: i64| pb::RotateTokenRequest {
        tenant_id: "acme".into(),
        actor_user_id: "alice".into(),
        token_id,
        grace: Some(prost_types::Duration { seconds, nanos: 0 }),
    };
    let old = a
        .tokens(&root)
        .issue_token(issue("deploy".into()))
        .await
        .unwrap()
        .into_inner();
    assert!(introspect(&b, &root, &old.secret).await.active);
    let rotated = a
        .tokens(&root)
        .rotate_token(rotate(old.token.unwrap().id, 0))
        .await
        .unwrap()
        .into_inner();
    until(&b, &root, &old.secret, Instant::now(), |answer| {
        !answer.active
    })
    .await;
    assert!(introspect(&b, &root, &rotated.secret).await.active);
    let graced = a
        .tokens(&root)
        .rotate_token(rotate(rotated.token.unwrap().id, 3600))
        .await
        .unwrap()
        .into_inner();
    assert!(
        introspect(&b, &root, &rotated.secret).await.active,
        "in its grace on B"
    );
    a.tokens(&root)
        .revoke_token(pb::RevokeTokenRequest {
            tenant_id: "acme".into(),
            actor_user_id: "alice".into(),
            token_id: graced.previous.unwrap().id,
            reason: "ended early".into(),
        })
        .await
        .unwrap();
    until(&b, &root, &rotated.secret, Instant::now(), |answer| {
        !answer.active
    })
    .await;
    assert!(introspect(&b, &root, &graced.secret).await.active);

    // Downgrade, suspension, reactivation and removal of the membership.
    let token = a
        .tokens(&root)
        .issue_token(issue("laptop".into()))
        .await
        .unwrap()
        .into_inner()
        .secret;
    assert_eq!(introspect(&b, &root, &token).await.permissions.len(), 2);
    dir.put_member(member("viewer")).await.unwrap();
    until(&b, &root, &token, Instant::now(), |answer| {
        answer.permissions == vec!["a:read".to_owned()]
    })
    .await;

    let status = |status: pb::UserStatus| pb::SetUserStatusRequest {
        user_id: "alice".into(),
        status: status.into(),
    };
    dir.set_user_status(status(pb::UserStatus::Suspended))
        .await
        .unwrap();
    until(&b, &root, &token, Instant::now(), |answer| !answer.active).await;
    dir.set_user_status(status(pb::UserStatus::Active))
        .await
        .unwrap();
    until(&b, &root, &token, Instant::now(), |answer| answer.active).await;

    dir.remove_member(pb::RemoveMemberRequest {
        tenant_id: "acme".into(),
        user_id: "alice".into(),
    })
    .await
    .unwrap();
    until(&b, &root, &token, Instant::now(), |answer| !answer.active).await;
}

/// Stops (SIGSTOP) the replica's process until the guard is dropped (SIGCONT).
struct Stopped(rustix::process::Pid);

impl Stopped {
    fn stop(replica: &Replica) -> Self {
        let pid = rustix::process::Pid::from_raw(replica.process.0.id() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::STOP).unwrap();
        Self(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = rustix::process::kill_process(self.0, rustix::process::Signal::CONT);
    }
}

/// The change feed's lease (`cache.feed_timeout_ms`, default 2 s): the longest a replica
/// trusts its cache after sending a heartbeat that came back.
const LEASE: Duration = Duration::from_secs(2);

/// Alice's personal token named `name` in `acme`, issued through `replica`.
async fn issue(replica: &Replica, root: &str, name: &str) -> pb::IssueTokenResponse {
    replica
        .tokens(root)
        .issue_token(pb::IssueTokenRequest {
            tenant_id: "acme".into(),
            actor_user_id: "alice".into(),
            kind: pb::TokenKind::Personal.into(),
            name: name.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// Answers every fence on the control channel with an acknowledgement in the name of every
/// replica heard, signed with a made-up tag: what any database role could NOTIFY. Counts
/// the fences.
async fn forge_acknowledgements(
    url: &str,
) -> (
    tokio::task::JoinHandle<()>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use sea_orm::sqlx::postgres::{PgListener, PgPool};
    let pool = PgPool::connect(url).await.unwrap();
    let mut listener = PgListener::connect_with(&pool).await.unwrap();
    listener.listen("tokend_control").await.unwrap();
    let fences = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = fences.clone();
    let task = tokio::spawn(async move {
        let mut replicas = std::collections::BTreeSet::new();
        while let Ok(message) = listener.recv().await {
            let fields: Vec<&str> = message.payload().split(' ').collect();
            match fields.as_slice() {
                ["H", from, ..] => {
                    replicas.insert(from.to_string());
                }
                ["F", _, nonce, ..] => {
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    for from in &replicas {
                        let forged = format!("A {from} {nonce} {}", "0".repeat(64));
                        sea_orm::sqlx::query("SELECT pg_notify('tokend_control', $1)")
                            .bind(forged)
                            .execute(&pool)
                            .await
                            .unwrap();
                    }
                }
                _ => {}
            }
        }
    });
    (task, fences)
}

/// A replica that cannot acknowledge (here: stopped) holds a revocation back until the
/// lease has run out, and not much longer; so does a second RevokeToken that finds the token
/// already revoked (the first may not be enforced yet), and a bulk revocation, once for all
/// its tokens. Forged acknowledgements do not cut the wait short. Once resumed, the replica
/// drops its trust before answering from its cache: its first answers are inactive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_waits_out_the_lease_of_a_silent_replica() {
    let Some(Pair {
        _database,
        url,
        root,
        a,
        b,
    }) = seeded_pair().await
    else {
        return;
    };
    let (forger, fences) = forge_acknowledgements(&url).await;
    let issued = issue(&a, &root, "laptop").await;
    let mut others = Vec::new();
    for name in ["phone", "ci", "tablet"] {
        others.push(issue(&a, &root, name).await.secret);
    }
    for secret in others.iter().chain([&issued.secret]) {
        assert!(introspect(&b, &root, secret).await.active, "warm on B");
    }
    // Let the forger hear both replicas' heartbeats.
    tokio::time::sleep(Duration::from_millis(1200)).await;

    let stopped = Stopped::stop(&b);
    let id = issued.token.unwrap().id;
    let started = Instant::now();
    let ((), again) = tokio::join!(revoke(&a, &root, id.clone()), async {
        // Once the first has committed (A itself answers inactive), a second finds it done.
        while introspect(&a, &root, &issued.secret).await.active {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let again = Instant::now();
        revoke(&a, &root, id.clone()).await;
        again.elapsed()
    });
    let took = started.elapsed();
    drop(stopped);
    assert!(
        took >= LEASE,
        "the revocation returned after {took:?}, before the stopped replica's lease ran out"
    );
    assert!(
        took < LEASE * 2,
        "the revocation waited {took:?} for a silent replica"
    );
    assert!(
        again >= LEASE,
        "a revocation of a token already revoked returned after {again:?}, before the \
         stopped replica's lease ran out"
    );
    assert!(
        !introspect(&b, &root, &issued.secret).await.active,
        "the stopped replica answered active after the revocation returned (it took {took:?})"
    );

    // Again, with B heard from and warm once more, for a bulk revocation.
    until_trusted(&b).await;
    for secret in &others {
        assert!(introspect(&b, &root, secret).await.active, "warm on B");
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let stopped = Stopped::stop(&b);
    let fences_before = fences.load(std::sync::atomic::Ordering::SeqCst);
    let bulk = Instant::now();
    a.tokens(&root)
        .revoke_tokens(pb::RevokeTokensRequest {
            tenant_id: "acme".into(),
            actor_user_id: "ada".into(),
            owner_user_id: "alice".into(),
            reason: "laptop stolen".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let bulk = bulk.elapsed();
    let bulk_fences = fences.load(std::sync::atomic::Ordering::SeqCst) - fences_before;
    drop(stopped);
    forger.abort();
    assert_eq!(bulk_fences, 1, "fences sent for one bulk revocation");
    assert!(
        (LEASE..LEASE * 2).contains(&bulk),
        "a bulk revocation of {} tokens took {bulk:?}: not one lease",
        others.len()
    );
    for secret in &others {
        assert!(
            !introspect(&b, &root, secret).await.active,
            "the stopped replica answered active after the bulk revocation returned"
        );
    }
}

/// Waits until `replica` reports ready (its caches trusted) again.
async fn until_trusted(replica: &Replica) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = HealthClient::new(replica.channel.clone())
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|r| r.into_inner().status);
        if status.ok() == Some(ServingStatus::Serving as i32) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the replica never became ready again"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A replica whose listener has just started has not heard the others' heartbeats yet: its
/// writes also wait for every replica the replica table saw recently, here one that stopped
/// before the new replica started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_replica_waits_for_replicas_it_has_not_heard_yet() {
    let Some(Pair {
        _database,
        url,
        root,
        a,
        b,
    }) = seeded_pair().await
    else {
        return;
    };
    let issued = issue(&a, &root, "laptop").await;
    assert!(introspect(&b, &root, &issued.secret).await.active);

    let stopped = Stopped::stop(&b);
    let c = Replica::start(&url).await;
    let started = Instant::now();
    revoke(&c, &root, issued.token.unwrap().id).await;
    let took = started.elapsed();
    drop(stopped);
    assert!(
        took >= LEASE,
        "the new replica's revocation returned after {took:?} without the stopped one"
    );
    assert!(
        !introspect(&b, &root, &issued.secret).await.active,
        "the stopped replica answered active after the revocation returned"
    );
}

/// Revocations through two replicas at once, each followed at once by a call to a third:
/// every first answer is inactive. (A fence follows its own write's commit, whatever else
/// commits around it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_revocations_through_two_replicas_are_all_enforced_at_once() {
    let Some((url, _database)) = fresh_database(Backend::Postgres).await else {
        return;
    };
    let root = bootstrap(&url);
    let a = std::sync::Arc::new(Replica::start(&url).await);
    let b = std::sync::Arc::new(Replica::start(&url).await);
    let c = std::sync::Arc::new(Replica::start(&url).await);
    seed(&mut a.directory(&root)).await;
    for round in 0..4 {
        let mut issued = Vec::new();
        for i in 0..12 {
            let token = issue(&a, &root, &format!("r{round}-{i}")).await;
            assert!(introspect(&b, &root, &token.secret).await.active);
            issued.push(token);
        }
        let mut revocations = tokio::task::JoinSet::new();
        for (i, token) in issued.into_iter().enumerate() {
            let writer = if i % 2 == 0 { &a } else { &c };
            let (writer, b, root) = (writer.clone(), b.clone(), root.clone());
            revocations.spawn(async move {
                revoke(&writer, &root, token.token.unwrap().id).await;
                introspect(&b, &root, &token.secret).await.active
            });
        }
        while let Some(still_active) = revocations.join_next().await {
            assert!(
                !still_active.unwrap(),
                "round {round}: B answered active after a revocation returned"
            );
        }
    }
}
