//! Code generated from `proto/tokend/v1/*.proto` by `build.rs`.

/// `tokend.v1`: messages, clients and servers.
#[allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    missing_debug_implementations
)]
pub mod v1 {
    tonic::include_proto!("tokend.v1");
}

/// The encoded descriptor set of every tokend proto, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tokend_descriptor.bin"));

/// The descriptors of the subset of Envoy's ext_authz API tokend serves, for reflection
/// (grpcurl) only; the service is built on `envoy-types`.
pub const ENVOY_FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/envoy_descriptor.bin"));

/// The path (`/package.Service/Method`) of every method tokend serves: its own, Envoy's
/// Check, and gRPC health.
pub fn served_paths() -> Vec<String> {
    use prost::Message as _;
    [
        FILE_DESCRIPTOR_SET,
        ENVOY_FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
    ]
    .into_iter()
    .filter_map(|bytes| prost_types::FileDescriptorSet::decode(bytes).ok())
    .flat_map(|set| set.file)
    .flat_map(|file| {
        let package = file.package().to_owned();
        file.service.into_iter().flat_map(move |service| {
            let prefix = format!("/{package}.{}/", service.name());
            service
                .method
                .into_iter()
                .map(move |method| format!("{prefix}{}", method.name()))
        })
    })
    .collect()
}

/// `example.v1`: the example service guarded by [`crate::client::IntrospectLayer`] in
/// `examples/inventory.rs`. Not tokend's API; tokend never serves it.
#[allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    missing_debug_implementations
)]
#[doc(hidden)]
pub mod example {
    tonic::include_proto!("example.v1");
}
