//! The tonic services, the proto ⇄ domain conversions, the error → status map and the
//! caller-authentication layer. The only module that imports tonic.

pub mod audit;
pub mod auth;
pub mod connection;
pub mod convert;
pub mod directory;
pub mod ext_authz;
pub mod hot;
pub mod observe;
pub mod status;
pub mod token;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt as _;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Server, ServerTlsConfig};
use tonic_health::server::HealthReporter;

use crate::domain::ports::Clock;
use crate::proto::v1::audit_service_server::AuditServiceServer;
use crate::proto::v1::directory_service_server::DirectoryServiceServer;
use crate::proto::v1::token_service_server::TokenServiceServer;
use crate::service::Tokend;

/// The largest request message the directory and audit services accept. Their biggest
/// legitimate request (a role with 256 permissions of 128 characters) is about 34 KiB.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// The same for TokenService, whose biggest legitimate request is a leak report of 1000
/// token strings (under 80 KiB with the longest prefix).
pub const MAX_TOKEN_MESSAGE_BYTES: usize = 96 * 1024;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Reflection could not be built from the descriptor sets.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The transport failed.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// How long a TLS handshake may take.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// After the drain deadline's UNAVAILABLE answers, how long connections get to close.
const AFTER_CUT: Duration = Duration::from_secs(2);

/// The health "service" a liveness probe asks for: SERVING for as long as the process
/// serves at all, unlike the overall status, which follows readiness.
pub const LIVENESS: &str = "liveness";

/// The health "service" a readiness probe asks for: SERVING from the first time the
/// caches are trusted until shutdown begins.
pub const READINESS: &str = "readiness";

/// How the server runs, beyond what it serves.
#[derive(Debug)]
pub struct ServeOptions {
    /// TLS (and client-certificate verification) on the gRPC port.
    pub tls: Option<ServerTlsConfig>,
    /// After shutdown is asked for, how long in-flight calls may run.
    pub drain: Duration,
    /// A plaintext port serving only health, for probes that cannot speak TLS.
    pub health_listener: Option<TcpListener>,
}

/// Marks every tokend service SERVING (or not) in gRPC health.
pub async fn set_serving(health: &HealthReporter, serving: bool) {
    macro_rules! each {
        ($($svc:ty),*) => {$(
            if serving { health.set_serving::<$svc>().await } else { health.set_not_serving::<$svc>().await }
        )*};
    }
    each!(
        TokenServiceServer<token::TokenApi>,
        DirectoryServiceServer<directory::DirectoryApi>,
        AuditServiceServer<audit::AuditApi>
    );
    let overall = if serving {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    };
    health.set_service_status("", overall).await;
}

/// Serves every service on `listener` until `shutdown` resolves, then drains in-flight
/// calls.
pub async fn serve(
    listener: TcpListener,
    core: Arc<Tokend>,
    clock: Arc<dyn Clock>,
    health: (
        HealthReporter,
        tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    ),
    mut ready: tokio::sync::watch::Receiver<bool>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let (reporter, health_service) = health;
    // A bad certificate or key stops here, before anything is spawned or reported.
    let mut builder = Server::builder();
    let tls = options.tls.is_some();
    if let Some(tls) = options.tls {
        // A client that opens a connection and never finishes the handshake is let go.
        builder = builder.tls_config(tls.timeout(TLS_HANDSHAKE_TIMEOUT))?;
    }
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(crate::proto::ENVOY_FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    // grpcurl 1.8 speaks only v1alpha.
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(crate::proto::ENVOY_FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    // Ready means the caches are trusted: on PostgreSQL, once the change feed is up. Until
    // then (and whenever it is lost) calls still work, reading through to the database, but
    // a load balancer should prefer replicas that are ready.
    //
    // `READINESS` is the probe's view: it turns SERVING the first time the caches are
    // trusted and stays so until shutdown. A database blip untrusts every replica's cache
    // at once; taking them all out of the Service then would turn a slower path into an
    // outage.
    let initially = *ready.borrow_and_update();
    set_serving(&reporter, initially).await;
    let status = |serving: bool| {
        if serving {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        }
    };
    reporter
        .set_service_status(READINESS, status(initially))
        .await;
    reporter
        .set_service_status(LIVENESS, tonic_health::ServingStatus::Serving)
        .await;
    let readiness = {
        let reporter = reporter.clone();
        tokio::spawn(async move {
            let mut ever = initially;
            while ready.changed().await.is_ok() {
                let now = *ready.borrow_and_update();
                set_serving(&reporter, now).await;
                if now && !ever {
                    ever = true;
                    reporter.set_service_status(READINESS, status(true)).await;
                }
            }
        })
    };
    let (stopping, stopped) = tokio::sync::watch::channel(false);
    // Up until the main server has drained: probes see NOT_SERVING, then nothing.
    let health_only = options.health_listener.map(|listener| {
        tokio::spawn(
            Server::builder()
                .add_service(health_service.clone())
                .serve_with_incoming(TcpIncoming::from(listener)),
        )
    });
    let (cut, cut_watch) = tokio::sync::watch::channel(false);
    let tokens = TokenServiceServer::new(token::TokenApi::new(Arc::clone(&core), clock))
        .max_decoding_message_size(MAX_TOKEN_MESSAGE_BYTES);
    let check = envoy_types::ext_authz::v3::pb::AuthorizationServer::new(
        ext_authz::ExtAuthzApi::new(Arc::clone(&core)),
    )
    // A Check carries the user's whole request head (cookies included): Envoy's
    // own header limit is 60 KiB, and a refusal here would be a 503, not a decision.
    .max_decoding_message_size(ext_authz::MAX_CHECK_BYTES);
    let serving = builder
        // Observe labels each call (method, request id, the caller's trace) with a span or
        // on the lines it logs, counts and times it.
        .layer(observe::ObserveLayer::new(cut_watch))
        // Authentication wraps every service; it lets health and reflection through.
        .layer(auth::AuthLayer::new(Arc::clone(&core), tls))
        // Introspect and Check skip the router, inside authentication.
        .layer(hot::HotLayer::new(tokens.clone(), check.clone()))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(tokens)
        .add_service(check)
        .add_service(
            DirectoryServiceServer::new(directory::DirectoryApi::new(Arc::clone(&core)))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            AuditServiceServer::new(audit::AuditApi::new(core))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        // Without TCP_NODELAY a small response can sit out a 40 ms delayed-ACK round.
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .map_ok(connection::Connection::new),
            async {
                shutdown.await;
                readiness.abort();
                set_serving(&reporter, false).await;
                reporter
                    .set_service_status(READINESS, tonic_health::ServingStatus::NotServing)
                    .await;
                let _ = stopping.send(true);
            },
        );
    tokio::pin!(serving);
    // The listener closes at once; calls already running get `drain` to finish. Those
    // still running then are answered UNAVAILABLE, which lets their connections close (a
    // write cut short is one transaction: committed whole or not at all, and a retry finds
    // out which, as names are unique).
    let mut deadline = stopped;
    let result = tokio::select! {
        served = &mut serving => served.map_err(ServeError::from),
        () = async {
            let _ = deadline.wait_for(|stop| *stop).await;
            tokio::time::sleep(options.drain).await;
        } => {
            tracing::warn!(
                drain_ms = options.drain.as_millis() as u64,
                "calls still running at the drain deadline; answering them UNAVAILABLE"
            );
            let _ = cut.send(true);
            match tokio::time::timeout(AFTER_CUT, &mut serving).await {
                Ok(served) => served.map_err(ServeError::from),
                Err(_) => {
                    tracing::warn!("connections still open after the drain; leaving them");
                    Ok(())
                }
            }
        }
    };
    if let Some(health_only) = health_only {
        health_only.abort();
    }
    result
}
