//! Traces through a real OTLP receiver (tests/otel/receiver.py on PyPI `grpcio` and
//! `opentelemetry-proto`, run by the interpreter `TOKEND_TEST_OTLP_PYTHON` names; skipped,
//! and said so, without it; `.ci/run` always provides it): an Introspect span joins the
//! caller's trace, carries method, status, tenant and token display id and no secret; the
//! JSON log lines of the call carry the same trace id and a request id.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use tokend::proto::v1 as pb;
use tokend::proto::v1::token_service_client::TokenServiceClient;

use crate::cli::{
    KillOnDrop, alices_token, authed, binary_database, free_port, root_key, seed_acme, sigterm,
    tokend, wait_until_serving,
};
use crate::helpers::TestApp;

crate::both_backends!(an_introspect_span_joins_the_callers_trace_and_carries_no_secret);

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";
const UNSAMPLED_TRACE: &str = "5cf92f3577b34da6a3ce929d0e0e4737";
const ANONYMOUS_TRACE: &str = "6df92f3577b34da6a3ce929d0e0e4738";

fn introspect(token: &str, root: &str, traceparent: &str) -> tonic::Request<pb::IntrospectRequest> {
    let mut request = authed(
        pb::IntrospectRequest {
            token: token.into(),
            ..Default::default()
        },
        root,
    );
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().unwrap());
    request
}

async fn an_introspect_span_joins_the_callers_trace_and_carries_no_secret(app: TestApp) {
    let Some(python) = std::env::var_os("TOKEND_TEST_OTLP_PYTHON") else {
        eprintln!("TOKEND_TEST_OTLP_PYTHON is not set: the OTLP test is skipped");
        return;
    };
    let Some(database) = binary_database(app.backend).await else {
        return;
    };
    let (dir, url) = (database.dir.path(), database.url.as_str());
    let spans_file = dir.join("spans.jsonl");
    let mut receiver = KillOnDrop(
        Command::new(python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/otel/receiver.py"
            ))
            .arg(&spans_file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut first_line = String::new();
    BufReader::new(receiver.0.stdout.take().unwrap())
        .read_line(&mut first_line)
        .unwrap();
    let receiver_port: u16 = first_line.trim().parse().unwrap();

    let root = root_key(&tokend(dir, url).arg("bootstrap").output().unwrap());
    let port = free_port();
    let log_file = dir.join("tokend.log");
    let mut server = KillOnDrop(
        tokend(dir, url)
            .arg("serve")
            .env("TOKEND_LISTEN", format!("127.0.0.1:{port}"))
            .env(
                "TOKEND_OTEL__ENDPOINT",
                format!("http://127.0.0.1:{receiver_port}"),
            )
            // Every trace that starts here is kept: the exporter's own calls would show.
            .env("TOKEND_OTEL__SAMPLE_RATIO", "1")
            .env("TOKEND_LOG__FORMAT", "json")
            .env("TOKEND_LOG__FILTER", "info,tokend=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_file).unwrap())
            .spawn()
            .unwrap(),
    );
    let channel = wait_until_serving(port).await;
    seed_acme(channel.clone(), &root, &["a:read"]).await;
    let mut tokens = TokenServiceClient::new(channel);
    let issued = tokens
        .issue_token(authed(alices_token("traced"), &root))
        .await
        .unwrap()
        .into_inner();
    let display_id = issued.token.unwrap().display_id;

    let sampled = format!("00-{TRACE}-{PARENT}-01");
    let answer = tokens
        .introspect(introspect(&issued.secret, &root, &sampled))
        .await
        .unwrap();
    assert!(answer.into_inner().active);
    // A wrong secret for the same token: an inactive verdict, logged at debug in the call.
    let mut wrong = issued.secret.clone();
    let last = wrong.pop().unwrap();
    wrong.push(if last == 'A' { 'B' } else { 'A' });
    let answer = tokens
        .introspect(introspect(&wrong, &root, &sampled))
        .await
        .unwrap();
    assert!(!answer.into_inner().active);
    // Without a credential: refused, and the span says so.
    let mut anonymous = tonic::Request::new(pb::IntrospectRequest {
        token: issued.secret.clone(),
        ..Default::default()
    });
    anonymous.metadata_mut().insert(
        "traceparent",
        format!("00-{ANONYMOUS_TRACE}-{PARENT}-01").parse().unwrap(),
    );
    anonymous
        .metadata_mut()
        .insert("tracestate", "vendor=opaque-caller-data".parse().unwrap());
    let refused = tokens.introspect(anonymous).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let unsampled = format!("00-{UNSAMPLED_TRACE}-{PARENT}-00");
    tokens
        .introspect(introspect(&issued.secret, &root, &unsampled))
        .await
        .unwrap();

    // SIGTERM: the batch still queued is exported before the process exits.
    sigterm(&server);
    let status = tokio::task::spawn_blocking(move || server.0.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let spans: Vec<Value> = loop {
        let text = std::fs::read_to_string(&spans_file).unwrap_or_default();
        let spans: Vec<Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        let ours = spans.iter().filter(|s| s["trace_id"] == TRACE).count();
        if ours >= 2 || Instant::now() > deadline {
            break spans;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    drop(receiver);

    // Only tokend's server spans: none of the exporter's own gRPC calls (client spans,
    // or spans of tonic and h2 internals) ever reached the exporter.
    for span in &spans {
        assert_eq!(span["kind"], 2, "not a server span: {span}");
        let name = span["name"].as_str().unwrap();
        assert!(
            name.starts_with("/tokend.v1.") || name.starts_with("/grpc.health.v1."),
            "{span}"
        );
    }
    let introspections: Vec<&Value> = spans.iter().filter(|s| s["trace_id"] == TRACE).collect();
    assert_eq!(introspections.len(), 2, "{spans:#?}");
    for span in &introspections {
        assert_eq!(span["trace_id"], TRACE, "joined the caller's trace: {span}");
        assert_eq!(span["parent_span_id"], PARENT, "{span}");
        assert_eq!(span["kind"], 2, "SPAN_KIND_SERVER: {span}");
        let attributes = &span["attributes"];
        assert_eq!(attributes["rpc.system"], "grpc", "{span}");
        assert_eq!(attributes["code"], "OK", "{span}");
        assert_eq!(
            attributes["tenant"], "system",
            "the caller's tenant: {span}"
        );
        assert!(
            attributes["request_id"].as_str().unwrap().len() == 32,
            "{span}"
        );
        assert_eq!(span["resource"]["service.name"], "tokend", "{span}");
    }
    let live = introspections
        .iter()
        .find(|s| s["attributes"]["token"] == display_id.as_str())
        .expect("the live verdict names the token by display id");
    assert_eq!(live["attributes"]["token_tenant"], "acme");
    // The refused call: its code, and none of the caller's tracestate carried along.
    let refused = spans
        .iter()
        .find(|s| s["trace_id"] == ANONYMOUS_TRACE)
        .expect("the refused call's span");
    assert_eq!(
        refused["attributes"]["code"], "UNAUTHENTICATED",
        "{refused}"
    );
    assert_eq!(refused["trace_state"], "", "{refused}");
    // No span of the unsampled trace, and nothing secret anywhere in what was exported
    // (names, attributes, events, status messages).
    assert!(!spans.iter().any(|s| s["trace_id"] == UNSAMPLED_TRACE));
    let exported = serde_json::to_string(&spans).unwrap();
    for secret in [issued.secret.as_str(), wrong.as_str(), root.as_str()] {
        let tail = &secret[secret.len() - 20..];
        assert!(!exported.contains(tail), "a secret reached the exporter");
    }

    // The log lines of the call carry its request id and the caller's trace id.
    let logs = std::fs::read_to_string(&log_file).unwrap();
    let inactive: Value = logs
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|line| line["message"] == "introspected an inactive token")
        .unwrap_or_else(|| panic!("no debug line of the inactive verdict in:\n{logs}"));
    assert_eq!(inactive["span"]["trace_id"], TRACE, "{inactive}");
    assert_eq!(
        inactive["span"]["request_id"].as_str().unwrap().len(),
        32,
        "{inactive}"
    );
    assert_eq!(
        inactive["span"]["method"],
        "/tokend.v1.TokenService/Introspect"
    );
    for secret in [issued.secret.as_str(), wrong.as_str(), root.as_str()] {
        assert!(!logs.contains(&secret[secret.len() - 20..]));
    }
}
