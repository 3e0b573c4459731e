//! A service that uses tokend without knowing anything about tokens: one layer on its tonic
//! server, and `principal.require(..)` in its handler.
//!
//! ```sh
//! TOKEND_URL=http://127.0.0.1:50051 TOKEND_TOKEN=tkd_key_… cargo run --example inventory
//! ```
//!
//! `TOKEND_TOKEN` is the service's own key (it needs `tokend.introspect`). The service
//! listens on `INVENTORY_LISTEN` (default `127.0.0.1:50061`); its callers send their own
//! tokens as `authorization: Bearer …`. `tests/api/layer.rs` runs this very code against a
//! real tokend.

use std::future::Future;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

use tokend::client::{IntrospectLayer, Principal, TokendClient};
use tokend::proto::example::inventory_server::{Inventory, InventoryServer};
use tokend::proto::example::{ListItemsRequest, ListItemsResponse};

/// The handlers: plain tonic, reading the caller from the request.
#[derive(Debug, Default)]
pub struct Items;

#[tonic::async_trait]
impl Inventory for Items {
    async fn list_items(
        &self,
        request: Request<ListItemsRequest>,
    ) -> Result<Response<ListItemsResponse>, Status> {
        // The layer put it there; without the layer this is a programming error.
        let principal = request
            .extensions()
            .get::<Principal>()
            .ok_or_else(|| Status::internal("no principal: is the IntrospectLayer installed?"))?;
        principal.require("entities:read")?;
        // A real service would query its database, scoped to the principal's tenant.
        let items = ["anvil", "rocket skates"]
            .iter()
            .map(|item| format!("{}/{item}", principal.tenant_id))
            .collect();
        Ok(Response::new(ListItemsResponse {
            tenant_id: principal.tenant_id.clone(),
            subject: principal.subject.clone(),
            items,
        }))
    }
}

/// Serves the inventory on `listener`, every call checked through `tokend`, until
/// `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    tokend: TokendClient,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    // Health stays open for the orchestrator's probes; everything else needs a live token.
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<InventoryServer<Items>>().await;
    tonic::transport::Server::builder()
        .layer(IntrospectLayer::new(tokend).open_paths(["/grpc.health.v1.Health/"]))
        .add_service(health_service)
        .add_service(InventoryServer::new(Items))
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), shutdown)
        .await
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("TOKEND_URL").unwrap_or_else(|_| "http://127.0.0.1:50051".into());
    let token = std::env::var("TOKEND_TOKEN")
        .map_err(|_| anyhow::anyhow!("set TOKEND_TOKEN to this service's tokend key"))?;
    let listen = std::env::var("INVENTORY_LISTEN").unwrap_or_else(|_| "127.0.0.1:50061".into());
    let tokend = TokendClient::connect(&url, &token)?;
    let listener = TcpListener::bind(&listen).await?;
    eprintln!("inventory listening on {listen}, checking tokens with {url}");
    serve(listener, tokend, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
