//! The tower layer for consuming services, inside the example tonic service of
//! `examples/inventory.rs` (this very code), checking its callers through a real tokend.

use tonic::Code;
use tonic::transport::Channel;

use tokend::client::TokendClient;
use tokend::proto::example::ListItemsRequest;
use tokend::proto::example::inventory_client::InventoryClient;

use crate::helpers::{TestApp, assert_status};

#[allow(dead_code)] // its `main` is for `cargo run --example inventory`
#[path = "../../examples/inventory.rs"]
mod inventory;

crate::both_backends!(
    the_layer_admits_live_tokens_only_and_hands_the_handler_a_principal,
    the_layer_answers_plain_http_with_401_and_a_challenge,
);

async fn list(
    port: u16,
    token: Option<&str>,
) -> Result<tokend::proto::example::ListItemsResponse, tonic::Status> {
    let channel = Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let header = token.map(|t| format!("Bearer {t}").parse().unwrap());
    let mut client =
        InventoryClient::with_interceptor(channel, move |mut request: tonic::Request<()>| {
            if let Some(header) = &header {
                request.metadata_mut().insert(
                    "authorization",
                    tonic::metadata::MetadataValue::clone(header),
                );
            }
            Ok(request)
        });
    client
        .list_items(ListItemsRequest {})
        .await
        .map(tonic::Response::into_inner)
}

async fn the_layer_admits_live_tokens_only_and_hands_the_handler_a_principal(mut app: TestApp) {
    app.tenant(
        "acme",
        &[
            ("developer", &["entities:read"]),
            ("auditor", &["reports:read"]),
        ],
    )
    .await;
    app.member("acme", "alice", "developer", &[]).await;
    app.member("acme", "bob", "auditor", &[]).await;
    // The service's own key: it may only introspect.
    app.role("system", "inventory", &["tokend.introspect"])
        .await;
    let (service_key, _) = app.system_key("inventory", "inventory").await;
    let (alices, alices_info) = app.pat("acme", "alice", "laptop", &[]).await;
    let (bobs, _) = app.pat("acme", "bob", "laptop", &[]).await;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let tokend = TokendClient::connect(&format!("http://{}", app.addr), &service_key).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let service = tokio::spawn(inventory::serve(listener, tokend, async {
        let _ = stopped.await;
    }));

    // Health is open, for probes.
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        Channel::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "example.v1.Inventory".into(),
        })
        .await
        .expect("health needs no token");

    let answer = list(port, Some(&alices)).await.expect("alice may list");
    assert_eq!(answer.tenant_id, "acme");
    assert_eq!(answer.subject, "alice");
    assert_eq!(answer.items, vec!["acme/anvil", "acme/rocket skates"]);

    assert_status(
        list(port, None).await,
        Code::Unauthenticated,
        "missing credential",
    );
    assert_status(
        list(port, Some("tkd_pat_notarealtoken")).await,
        Code::Unauthenticated,
        "not an active token",
    );
    // Live, but without the permission the handler requires.
    assert_status(
        list(port, Some(&bobs)).await,
        Code::PermissionDenied,
        "entities:read",
    );
    // No caching in the client: a revocation holds on the very next call.
    app.revoke_as("acme", "alice", &alices_info.id).await;
    assert_status(
        list(port, Some(&alices)).await,
        Code::Unauthenticated,
        "not an active token",
    );
    // tokend gone: the service cannot decide, and says so rather than letting anyone in.
    app.stop().await;
    assert_status(list(port, Some(&bobs)).await, Code::Unavailable, "retry");

    let _ = stop.send(());
    service.await.unwrap().unwrap();
}

/// The same layer around a plain HTTP service (as under axum): 401 with a challenge, and the
/// principal for the handler when the token is live.
async fn the_layer_answers_plain_http_with_401_and_a_challenge(app: TestApp) {
    use tower::{Layer as _, ServiceExt as _};

    app.tenant("acme", &[("developer", &["entities:read"])])
        .await;
    app.member("acme", "alice", "developer", &[]).await;
    app.role("system", "web", &["tokend.introspect"]).await;
    let (key, _) = app.system_key("web", "web").await;
    let (pat, _) = app.pat("acme", "alice", "laptop", &[]).await;
    let tokend = TokendClient::connect(&format!("http://{}", app.addr), &key).unwrap();
    let handler = tower::service_fn(|request: http::Request<String>| async move {
        let principal = request
            .extensions()
            .get::<tokend::client::Principal>()
            .cloned()
            .expect("the layer adds the principal");
        let seen_token = request.headers().contains_key(http::header::AUTHORIZATION);
        Ok::<_, std::convert::Infallible>(http::Response::new(format!(
            "{} {} {seen_token}",
            principal.tenant_id, principal.subject
        )))
    });
    let guarded = tokend::client::IntrospectLayer::new(tokend).layer(handler);
    let request = |token: Option<&str>| {
        let mut builder = http::Request::builder().uri("/entities");
        if let Some(token) = token {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        builder.body(String::new()).unwrap()
    };

    let response = guarded.clone().oneshot(request(Some(&pat))).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.body(), "acme alice false");

    let response = guarded.clone().oneshot(request(None)).await.unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(
        response.headers()["www-authenticate"],
        r#"Bearer realm="tokend""#
    );
    let response = guarded
        .clone()
        .oneshot(request(Some("tkd_pat_notarealtoken")))
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(
        response.headers()["www-authenticate"],
        r#"Bearer error="invalid_token""#
    );
    // A gRPC-Web caller is refused in its own framing.
    let mut grpc_web = request(None);
    grpc_web.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc-web+proto"),
    );
    let response = guarded.clone().oneshot(grpc_web).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "application/grpc-web+proto"
    );
    assert_eq!(response.headers()["grpc-status"], "16");
}
