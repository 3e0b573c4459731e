//! What operators watch and do to a real `tokend serve`: the Prometheus endpoint moves
//! as calls are made, calls carry request ids, and SIGTERM drains in-flight calls,
//! refuses new ones and writes the last uses before exit.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use tokend::proto::v1 as pb;
use tokend::proto::v1::token_service_client::TokenServiceClient;

use crate::cli::{
    KillOnDrop, alices_token, alices_tokens, authed, binary_database, free_port, root_key,
    seed_acme, serve_binary, sigterm, tokend, wait_until_serving,
};
use crate::helpers::{Backend, TestApp};

crate::both_backends!(
    metrics_move_as_calls_are_made,
    log_lines_written_in_a_call_carry_its_method_and_request_id,
    sigterm_drains_in_flight_calls_refuses_new_ones_and_records_last_uses,
    a_call_outlasting_the_drain_deadline_is_answered_unavailable
);

/// `GET path` over HTTP/1.0: (status line, body).
async fn http_get(port: u16, method: &str, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream
        .write_all(format!("{method} {path} HTTP/1.0\r\nHost: tokend\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

/// Every sample of a scrape: `name{labels}` (labels as rendered) → value.
async fn scrape(port: u16) -> HashMap<String, f64> {
    let (status, body) = http_get(port, "GET", "/metrics").await;
    assert!(status.contains("200"), "{status}");
    body.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').unwrap();
            (series.to_owned(), value.parse().unwrap())
        })
        .collect()
}

/// The sum of the samples of `name` whose labels include every one of `labels`.
fn sum(samples: &HashMap<String, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|(series, _)| {
            let (series_name, rest) = series.split_once('{').unwrap_or((series, ""));
            series_name == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|(_, value)| value)
        .sum()
}

fn introspect(token: &str, credential: &str) -> tonic::Request<pb::IntrospectRequest> {
    authed(
        pb::IntrospectRequest {
            token: token.into(),
            ..Default::default()
        },
        credential,
    )
}

const INTROSPECT: &str = "/tokend.v1.TokenService/Introspect";

/// Waits until more than `before` argon2 verifications have begun: a slow call is running.
async fn until_argon2_runs(metrics_port: u16, before: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while sum(
        &scrape(metrics_port).await,
        "tokend_argon2_verifications_total",
        &[],
    ) <= before
    {
        assert!(
            Instant::now() < deadline,
            "the slow call never reached argon2"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn metrics_move_as_calls_are_made(app: TestApp) {
    let Some(database) = binary_database(app.backend).await else {
        return;
    };
    let (dir, url) = (database.dir.path(), database.url.as_str());
    let root = root_key(&tokend(dir, url).arg("bootstrap").output().unwrap());
    let metrics_port = free_port();
    let (_process, channel) = serve_binary(
        dir,
        url,
        free_port(),
        &[
            (
                "TOKEND_METRICS__LISTEN",
                format!("127.0.0.1:{metrics_port}"),
            ),
            ("TOKEND_LAST_USED_FLUSH_MS", "50".into()),
        ],
    )
    .await;
    seed_acme(channel.clone(), &root, &["a:read"]).await;
    let mut tokens = TokenServiceClient::new(channel.clone());
    let secret = tokens
        .issue_token(authed(alices_token("laptop"), &root))
        .await
        .unwrap()
        .into_inner()
        .secret;

    let before = scrape(metrics_port).await;
    // Cold (one argon2 verification), then warm, then garbage, an unknown id, then no
    // credential at all.
    for _ in 0..2 {
        let answer = tokens.introspect(introspect(&secret, &root)).await.unwrap();
        assert!(answer.into_inner().active);
    }
    let garbage = tokens.introspect(introspect("tkd_pat_nope", &root)).await;
    assert!(!garbage.unwrap().into_inner().active);
    let unknown = super::introspect::well_formed_unknown_token();
    let unknown = tokens.introspect(introspect(&unknown, &root)).await;
    assert!(!unknown.unwrap().into_inner().active);
    let anonymous = tokens
        .introspect(tonic::Request::new(pb::IntrospectRequest {
            token: secret.clone(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), tonic::Code::Unauthenticated);
    // The last uses are flushed every 50 ms here.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = scrape(metrics_port).await;

    let moved = |name: &str, labels: &[(&str, &str)]| {
        sum(&after, name, labels) - sum(&before, name, labels)
    };
    let ok = [("method", INTROSPECT), ("code", "OK")];
    assert_eq!(moved("tokend_grpc_requests_total", &ok), 4.0);
    assert_eq!(
        moved(
            "tokend_grpc_requests_total",
            &[("method", INTROSPECT), ("code", "UNAUTHENTICATED")]
        ),
        1.0
    );
    assert_eq!(
        moved("tokend_grpc_request_duration_seconds_count", &ok),
        4.0
    );
    assert!(moved("tokend_grpc_request_duration_seconds_sum", &ok) > 0.0);
    assert_eq!(
        moved("tokend_introspect_total", &[("result", "active")]),
        2.0,
        "verdicts of Introspect calls only, not of callers' credentials"
    );
    assert_eq!(
        moved(
            "tokend_introspect_total",
            &[("result", "inactive"), ("reason", "malformed")]
        ),
        1.0
    );
    // Each reason its own series.
    assert_eq!(
        moved(
            "tokend_introspect_total",
            &[("result", "inactive"), ("reason", "unknown")]
        ),
        1.0
    );
    assert_eq!(moved("tokend_argon2_verifications_total", &[]), 1.0);
    assert_eq!(
        moved("tokend_argon2_verify_duration_seconds_count", &[]),
        1.0
    );
    assert!(moved("tokend_cache_lookups_total", &[]) >= 1.0);
    assert!(sum(&after, "tokend_cache_entries", &[("cache", "verified")]) >= 2.0);
    assert!(sum(&after, "tokend_cache_entries", &[("cache", "live_state")]) >= 1.0);
    assert!(moved("tokend_last_used_flushed_total", &[]) >= 1.0);
    assert!(sum(&after, "tokend_last_used_flush_duration_seconds_count", &[]) >= 1.0);
    assert!(sum(&after, "tokend_db_pool_connections", &[("state", "max")]) >= 1.0);
    assert!(after.contains_key("tokend_db_pool_connections{state=\"idle\"}"));
    assert_eq!(sum(&after, "tokend_cache_trusted", &[]), 1.0);
    if app.backend == Backend::Postgres {
        assert_eq!(sum(&after, "tokend_change_feed_listening", &[]), 1.0);
        // Heartbeats go out every 500 ms and come back to the listener that sent them.
        let deadline = Instant::now() + Duration::from_secs(10);
        while sum(
            &scrape(metrics_port).await,
            "tokend_invalidation_lag_seconds_count",
            &[],
        ) < 1.0
        {
            assert!(Instant::now() < deadline, "no invalidation lag recorded");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // A path no service serves is counted as `other`: callers cannot mint series.
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let unknown = grpc
        .unary(
            tonic::Request::new(pb::IntrospectRequest::default()),
            http::uri::PathAndQuery::from_static("/made.up.Service/Anything"),
            tonic_prost::ProstCodec::<pb::IntrospectRequest, pb::IntrospectResponse>::default(),
        )
        .await;
    assert_eq!(unknown.unwrap_err().code(), tonic::Code::Unimplemented);
    let text = http_get(metrics_port, "GET", "/metrics").await.1;
    assert!(text.contains("# HELP tokend_grpc_requests_total"), "{text}");
    assert!(!text.contains("made.up"), "a caller's path became a label");
    let samples = scrape(metrics_port).await;
    assert_eq!(
        sum(
            &samples,
            "tokend_grpc_requests_total",
            &[("method", "other"), ("code", "UNIMPLEMENTED")]
        ),
        1.0
    );
    assert!(http_get(metrics_port, "GET", "/").await.0.contains("404"));
    assert!(
        http_get(metrics_port, "POST", "/metrics")
            .await
            .0
            .contains("405")
    );

    // Request ids: the caller's is echoed; a call without one gets one of ours, echoed
    // when there is something to look it up by (here: a failed call), not on a silent
    // success.
    let mut request = introspect(&secret, &root);
    request
        .metadata_mut()
        .insert("x-request-id", "checkout-7f3a".parse().unwrap());
    let answer = tokens.introspect(request).await.unwrap();
    assert_eq!(
        answer.metadata().get("x-request-id").unwrap(),
        "checkout-7f3a"
    );
    let answer = tokens.introspect(introspect(&secret, &root)).await.unwrap();
    assert!(answer.metadata().get("x-request-id").is_none());
    let refused = tokens
        .introspect(tonic::Request::new(pb::IntrospectRequest {
            token: secret.clone(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    let made = refused
        .metadata()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap();
    assert_eq!(made.len(), 32, "{made}");
    assert!(made.bytes().all(|b| b.is_ascii_hexdigit()), "{made}");
}

async fn health(port: u16, service: &str) -> i32 {
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

const SERVING: i32 = 1;
const NOT_SERVING: i32 = 2;

async fn sigterm_drains_in_flight_calls_refuses_new_ones_and_records_last_uses(app: TestApp) {
    let Some(database) = binary_database(app.backend).await else {
        return;
    };
    let (dir, url) = (database.dir.path(), database.url.as_str());
    let root = root_key(&tokend(dir, url).arg("bootstrap").output().unwrap());
    let (port, health_port, metrics_port) = (free_port(), free_port(), free_port());
    // A costly hash keeps a cold Introspect in flight for a while; last uses would be
    // written only after an hour, so only the shutdown writes them.
    let (mut process, channel) = serve_binary(
        dir,
        url,
        port,
        &[
            ("TOKEND_ARGON2__MEMORY_KIB", "65536".into()),
            ("TOKEND_ARGON2__ITERATIONS", "24".into()),
            ("TOKEND_LAST_USED_FLUSH_MS", "3600000".into()),
            ("TOKEND_DRAIN_TIMEOUT_MS", "20000".into()),
            ("TOKEND_HEALTH_LISTEN", format!("127.0.0.1:{health_port}")),
            (
                "TOKEND_METRICS__LISTEN",
                format!("127.0.0.1:{metrics_port}"),
            ),
        ],
    )
    .await;
    seed_acme(channel.clone(), &root, &["a:read"]).await;
    let mut tokens = TokenServiceClient::new(channel.clone());
    let issuer = tokens.clone();
    let issue = |name: &'static str| {
        let mut tokens = issuer.clone();
        let root = root.clone();
        async move {
            tokens
                .issue_token(authed(alices_token(name), &root))
                .await
                .unwrap()
                .into_inner()
        }
    };
    let used = issue("used-before").await;
    let slow = issue("in-flight").await;
    assert!(
        tokens
            .introspect(introspect(&used.secret, &root))
            .await
            .unwrap()
            .into_inner()
            .active
    );
    assert_eq!(health(health_port, "").await, SERVING);
    assert_eq!(health(health_port, "liveness").await, SERVING);
    assert_eq!(health(health_port, "readiness").await, SERVING);

    // A call whose caller gives up first is counted, not lost: as DEADLINE_EXCEEDED when the
    // server had held it for the whole deadline, as CANCELLED when the caller's reset came
    // sooner by the server's clock (which starts when the call arrives, after the caller's:
    // on a loaded machine the request can take longer to arrive than the reset).
    let impatient = issue("impatient").await;
    let mut request = introspect(&impatient.secret, &root);
    request.set_timeout(Duration::from_millis(100));
    let status = tokens.introspect(request).await.unwrap_err();
    assert!(
        matches!(
            status.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{status:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let exceeded = [("method", INTROSPECT), ("code", "DEADLINE_EXCEEDED")];
    let cancelled = [("method", INTROSPECT), ("code", "CANCELLED")];
    let abandoned = |metrics: &HashMap<String, f64>| {
        sum(metrics, "tokend_grpc_requests_total", &exceeded)
            + sum(metrics, "tokend_grpc_requests_total", &cancelled)
    };
    while abandoned(&scrape(metrics_port).await) < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the abandoned call was not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A cold Introspect: its argon2 verification is running when SIGTERM arrives.
    let verifications = sum(
        &scrape(metrics_port).await,
        "tokend_argon2_verifications_total",
        &[],
    );
    let in_flight = tokio::spawn({
        let (mut tokens, request) = (tokens.clone(), introspect(&slow.secret, &root));
        async move { tokens.introspect(request).await }
    });
    until_argon2_runs(metrics_port, verifications).await;
    sigterm(&process);
    let signalled = Instant::now();

    // Draining: not ready, still alive, and the listener is closed to new connections.
    let deadline = Instant::now() + Duration::from_secs(5);
    while health(health_port, "readiness").await != NOT_SERVING {
        assert!(Instant::now() < deadline, "still ready after SIGTERM");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(health(health_port, "").await, NOT_SERVING);
    assert_eq!(health(health_port, "liveness").await, SERVING);
    let refused = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await;
    assert!(
        refused.is_err(),
        "a new connection was accepted while draining"
    );
    assert!(
        !in_flight.is_finished(),
        "the in-flight call finished before the drain could be observed; make its hash costlier"
    );

    // The call that was running completes with its real answer.
    let answer = in_flight.await.unwrap().unwrap().into_inner();
    assert!(answer.active);
    let status = tokio::task::spawn_blocking(move || process.0.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    eprintln!(
        "drained and exited {} ms after SIGTERM",
        signalled.elapsed().as_millis()
    );

    // Both uses (the one before and the one drained) were written on the way out.
    let (_process, channel) = serve_binary(dir, url, free_port(), &[]).await;
    let listed = alices_tokens(channel, &root).await;
    for name in ["used-before", "in-flight"] {
        let token = listed.tokens.iter().find(|t| t.name == name).unwrap();
        assert!(
            token.last_used_at.is_some(),
            "{name}: last use lost at shutdown"
        );
    }
}

async fn a_call_outlasting_the_drain_deadline_is_answered_unavailable(app: TestApp) {
    let Some(database) = binary_database(app.backend).await else {
        return;
    };
    let (dir, url) = (database.dir.path(), database.url.as_str());
    let root = root_key(&tokend(dir, url).arg("bootstrap").output().unwrap());
    let metrics_port = free_port();
    let (mut process, channel) = serve_binary(
        dir,
        url,
        free_port(),
        &[
            ("TOKEND_ARGON2__MEMORY_KIB", "65536".into()),
            ("TOKEND_ARGON2__ITERATIONS", "24".into()),
            ("TOKEND_DRAIN_TIMEOUT_MS", "100".into()),
            (
                "TOKEND_METRICS__LISTEN",
                format!("127.0.0.1:{metrics_port}"),
            ),
        ],
    )
    .await;
    seed_acme(channel.clone(), &root, &["a:read"]).await;
    let mut tokens = TokenServiceClient::new(channel);
    let slow = tokens
        .issue_token(authed(alices_token("slow"), &root))
        .await
        .unwrap()
        .into_inner();
    let in_flight = tokio::spawn({
        let (mut tokens, request) = (tokens.clone(), introspect(&slow.secret, &root));
        async move { tokens.introspect(request).await }
    });
    until_argon2_runs(metrics_port, 0.0).await;
    sigterm(&process);

    // Its hash takes far longer than the 100 ms drain: the call is told to go elsewhere,
    // rather than held until the orchestrator's SIGKILL drops it without an answer.
    let status = in_flight.await.unwrap().unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shutting down"), "{status:?}");
    let exited = tokio::task::spawn_blocking(move || process.0.wait().unwrap())
        .await
        .unwrap();
    assert!(exited.success(), "{exited:?}");
}

#[tokio::test]
async fn sigterm_while_starting_stops_at_once_and_cleanly() {
    // A database that accepts connections and never answers: `serve` is stuck starting.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            open.push(stream);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let mut process = crate::cli::KillOnDrop(
        tokend(
            dir.path(),
            &format!("postgres://postgres@127.0.0.1:{port}/tokend"),
        )
        .arg("serve")
        .env("TOKEND_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("TOKEND_DATABASE__ACQUIRE_TIMEOUT_MS", "60000")
        .env("TOKEND_LOG__FILTER", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap(),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    sigterm(&process);
    // As a container's PID 1 an unhandled SIGTERM would be ignored until the grace period
    // ran out; here (not PID 1) it would kill the process. Either way not a clean exit.
    let status = tokio::task::spawn_blocking(move || {
        let status = process.0.wait().unwrap();
        let mut stderr = String::new();
        std::io::Read::read_to_string(process.0.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        (status, stderr)
    })
    .await
    .unwrap();
    held.abort();
    assert!(status.0.success(), "{status:?}");
    assert!(status.1.contains("stopped before serving"), "{}", status.1);
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// At info, with no spans exported, a call has no span: the lines it logs must still say
/// which call wrote them, in either log format, and the id they carry is the one echoed.
async fn log_lines_written_in_a_call_carry_its_method_and_request_id(app: TestApp) {
    let Some(database) = binary_database(app.backend).await else {
        return;
    };
    let (dir, url) = (database.dir.path(), database.url.as_str());
    let root = root_key(&tokend(dir, url).arg("bootstrap").output().unwrap());
    for format in ["json", "text"] {
        let log_file = dir.join(format!("tokend-{format}.log"));
        let port = free_port();
        let process = KillOnDrop(
            tokend(dir, url)
                .arg("serve")
                .env("TOKEND_LISTEN", format!("127.0.0.1:{port}"))
                .env("TOKEND_LOG__FORMAT", format)
                .env("TOKEND_LOG__FILTER", "info")
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(&log_file).unwrap())
                .spawn()
                .unwrap(),
        );
        let channel = wait_until_serving(port).await;
        if format == "json" {
            seed_acme(channel.clone(), &root, &["a:read"]).await;
        }
        let mut tokens = TokenServiceClient::new(channel);
        // IssueToken logs "issued a token": once with the caller's id, once with ours.
        let mut request = authed(alices_token(&format!("{format}-named")), &root);
        request
            .metadata_mut()
            .insert("x-request-id", "issue-\"42\"".parse().unwrap());
        let named = tokens.issue_token(request).await.unwrap();
        assert_eq!(
            named.metadata().get("x-request-id").unwrap(),
            "issue-\"42\""
        );
        let unnamed = tokens
            .issue_token(authed(alices_token(&format!("{format}-unnamed")), &root))
            .await
            .unwrap();
        let ours = unnamed
            .metadata()
            .get("x-request-id")
            .unwrap_or_else(|| {
                panic!(
                    "an id that reached the log is echoed:\n{}",
                    std::fs::read_to_string(&log_file).unwrap()
                )
            })
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(ours.len(), 32, "{ours}");
        // A refused credential is logged at info in the call that presented it.
        let mut forged = root.clone();
        forged.replace_range(25..26, if &forged[25..26] == "A" { "B" } else { "A" });
        // With the caller's trace context: its trace id goes on the line too.
        let mut request = introspect(&named.into_inner().secret, &forged);
        request.metadata_mut().insert(
            "traceparent",
            format!("00-{TRACE}-00f067aa0ba902b7-01").parse().unwrap(),
        );
        let refused = tokens.introspect(request).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        let refused_id = refused
            .metadata()
            .get("x-request-id")
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        drop(process);

        let logs = std::fs::read_to_string(&log_file).unwrap();
        let issued: Vec<&str> = logs
            .lines()
            .filter(|line| line.contains("issued a token"))
            .collect();
        assert_eq!(issued.len(), 2, "{logs}");
        let refusal = logs
            .lines()
            .find(|line| line.contains("refused an inactive credential"))
            .unwrap_or_else(|| panic!("no refusal logged in:\n{logs}"));
        let issue = "/tokend.v1.TokenService/IssueToken";
        let introspect_method = "/tokend.v1.TokenService/Introspect";
        if format == "json" {
            let parse = |line: &str| serde_json::from_str::<serde_json::Value>(line).unwrap();
            let (first, second, refusal) = (parse(issued[0]), parse(issued[1]), parse(refusal));
            assert_eq!(first["span"]["method"], issue, "{first}");
            assert_eq!(first["span"]["request_id"], "issue-\"42\"", "{first}");
            assert_eq!(second["span"]["request_id"], ours.as_str(), "{second}");
            assert_eq!(refusal["span"]["method"], introspect_method, "{refusal}");
            assert_eq!(
                refusal["span"]["request_id"],
                refused_id.as_str(),
                "{refusal}"
            );
            assert_eq!(refusal["reason"], "malformed", "{refusal}");
            assert_eq!(refusal["span"]["trace_id"], TRACE, "{refusal}");
        } else {
            // A caller's id with a quote in it is quoted and escaped in text.
            assert!(
                issued[0].ends_with(&format!(r#"method={issue} request_id="issue-\"42\"""#)),
                "{logs}"
            );
            assert!(
                issued[1].ends_with(&format!("method={issue} request_id={ours}")),
                "{logs}"
            );
            assert!(
                refusal.ends_with(&format!(
                    "method={introspect_method} request_id={refused_id} trace_id={TRACE}"
                )),
                "{logs}"
            );
        }
        // Lines outside any call carry no call's labels.
        let serving = logs
            .lines()
            .find(|line| line.contains("tokend is serving"))
            .unwrap();
        assert!(!serving.contains("request_id"), "{serving}");
        assert!(!logs.contains(&root[root.len() - 20..]));
    }
}
