//! The `tokend` binary as operators run it: serve, migrate, bootstrap, --help.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use tokend::proto::v1 as pb;
use tokend::proto::v1::directory_service_client::DirectoryServiceClient;

use crate::helpers::{Backend, TestDatabase, fresh_database};

const TOKEND: &str = env!("CARGO_BIN_EXE_tokend");

/// `grpcurl -plaintext addr list`, when CI has pointed `GRPCURL` at grpcurl 1.8.6.
pub fn grpcurl_list(addr: SocketAddr) -> Option<String> {
    let grpcurl = std::env::var("GRPCURL").ok()?;
    let output = Command::new(grpcurl)
        .args(["-plaintext", &addr.to_string(), "list"])
        .output()
        .expect("run grpcurl");
    assert!(output.status.success(), "grpcurl list: {output:?}");
    Some(String::from_utf8_lossy(&output.stdout).into_owned())
}

pub fn tokend(dir: &std::path::Path, database_url: &str) -> Command {
    let mut command = Command::new(TOKEND);
    command
        .current_dir(dir)
        .env("TOKEND_LOG__FILTER", "warn")
        .env_remove("TOKEND_TEST_POSTGRES_URL")
        .stdin(Stdio::null());
    if !database_url.is_empty() {
        command.env("TOKEND_DATABASE_URL", database_url);
    }
    command
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A fresh database for a `tokend` process: the default SQLite file in `dir` (`url` empty:
/// the binary's own default) or a fresh PostgreSQL database.
pub struct BinaryDatabase {
    pub dir: tempfile::TempDir,
    pub url: String,
    _database: TestDatabase,
}

/// `None` when `backend` is PostgreSQL and no server is configured.
pub async fn binary_database(backend: Backend) -> Option<BinaryDatabase> {
    let dir = tempfile::tempdir().unwrap();
    let (url, database) = fresh_database(backend).await?;
    let url = if backend == Backend::Sqlite {
        String::new()
    } else {
        url
    };
    Some(BinaryDatabase {
        dir,
        url,
        _database: database,
    })
}

/// The root key `tokend bootstrap` printed on its last line of `output`'s stdout.
pub fn root_key(output: &std::process::Output) -> String {
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_owned()
}

/// `message` with `authorization: Bearer credential`.
pub fn authed<T>(message: T, credential: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let value: tonic::metadata::MetadataValue<_> = format!("Bearer {credential}").parse().unwrap();
    request.metadata_mut().insert("authorization", value);
    request
}

/// Tenant `acme`, a role `developer` with `permissions`, and alice in it, put through a
/// running binary with the root key.
pub async fn seed_acme(channel: tonic::transport::Channel, root: &str, permissions: &[&str]) {
    let mut directory = DirectoryServiceClient::new(channel);
    directory
        .put_tenant(authed(
            pb::PutTenantRequest {
                tenant: Some(pb::Tenant {
                    id: "acme".into(),
                    ..Default::default()
                }),
            },
            root,
        ))
        .await
        .unwrap();
    directory
        .put_role(authed(
            pb::PutRoleRequest {
                tenant_id: "acme".into(),
                name: "developer".into(),
                permissions: permissions.iter().map(|p| p.to_string()).collect(),
            },
            root,
        ))
        .await
        .unwrap();
    directory
        .put_member(authed(
            pb::PutMemberRequest {
                tenant_id: "acme".into(),
                user_id: "alice".into(),
                role: "developer".into(),
                groups: vec![],
            },
            root,
        ))
        .await
        .unwrap();
}

/// A personal token request for alice in acme.
pub fn alices_token(name: &str) -> pb::IssueTokenRequest {
    pb::IssueTokenRequest {
        tenant_id: "acme".into(),
        actor_user_id: "alice".into(),
        kind: pb::TokenKind::Personal.into(),
        name: name.into(),
        ..Default::default()
    }
}

pub struct KillOnDrop(pub Child);

/// Asks a running `tokend serve` to shut down, as Kubernetes does.
pub fn sigterm(process: &KillOnDrop) {
    let pid = process.0.id().to_string();
    let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(sent.success());
}

/// acme's audit events (about `token_id`, or all of the newest 200), as the root key reads
/// them.
pub async fn acme_audit(
    channel: tonic::transport::Channel,
    root: &str,
    token_id: &str,
) -> Vec<pb::AuditEvent> {
    tokend::proto::v1::audit_service_client::AuditServiceClient::new(channel)
        .list_audit_events(authed(
            pb::ListAuditEventsRequest {
                tenant_id: "acme".into(),
                token_id: token_id.into(),
                page_size: 200,
                ..Default::default()
            },
            root,
        ))
        .await
        .unwrap()
        .into_inner()
        .events
}

/// Alice's tokens in acme, as the root key lists them.
pub async fn alices_tokens(
    channel: tonic::transport::Channel,
    root: &str,
) -> pb::ListTokensResponse {
    tokend::proto::v1::token_service_client::TokenServiceClient::new(channel)
        .list_tokens(authed(
            pb::ListTokensRequest {
                tenant_id: "acme".into(),
                actor_user_id: "alice".into(),
                ..Default::default()
            },
            root,
        ))
        .await
        .unwrap()
        .into_inner()
}

/// `tokend serve` on `port` with extra settings, once it answers health.
pub async fn serve_binary(
    dir: &std::path::Path,
    url: &str,
    port: u16,
    settings: &[(&str, String)],
) -> (KillOnDrop, tonic::transport::Channel) {
    let process = KillOnDrop(
        tokend(dir, url)
            .arg("serve")
            .env("TOKEND_LISTEN", format!("127.0.0.1:{port}"))
            .envs(settings.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let channel = wait_until_serving(port).await;
    (process, channel)
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

crate::both_backends!(bootstrap_prints_the_root_key_last_and_refuses_a_second_time_via_the_binary);

async fn bootstrap_prints_the_root_key_last_and_refuses_a_second_time_via_the_binary(
    app: crate::helpers::TestApp,
) {
    // The spawned app only decides the backend; the binary gets its own fresh database.
    let Some(database) = binary_database(app.backend).await else {
        return;
    };
    let (dir, url) = (&database.dir, database.url.clone());

    let migrate = tokend(dir.path(), &url).arg("migrate").output().unwrap();
    assert!(migrate.status.success(), "{migrate:?}");

    let first = tokend(dir.path(), &url).arg("bootstrap").output().unwrap();
    assert!(first.status.success(), "{first:?}");
    let stdout = String::from_utf8(first.stdout).unwrap();
    let key = stdout.lines().last().unwrap().trim().to_owned();
    assert!(key.starts_with("tkd_key_") && key.len() == 70, "{key}");
    if app.backend == Backend::Sqlite {
        assert!(
            dir.path().join("tokend.db").exists(),
            "the default SQLite file is created"
        );
    }

    let second = tokend(dir.path(), &url).arg("bootstrap").output().unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("already"), "{stderr}");
    assert!(!String::from_utf8_lossy(&second.stdout).contains("tkd_"));

    // The printed key works against `tokend serve` on the same database.
    let port = free_port();
    let _server = KillOnDrop(
        tokend(dir.path(), &url)
            .arg("serve")
            .env("TOKEND_LISTEN", format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let channel = wait_until_serving(port).await;
    let mut tokens = tokend::proto::v1::token_service_client::TokenServiceClient::new(channel);
    let mut request = tonic::Request::new(tokend::proto::v1::IntrospectRequest {
        token: key.clone(),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    let answer = tokens.introspect(request).await.unwrap().into_inner();
    assert!(answer.active);
    assert_eq!(answer.tenant_id, "system");
}

pub async fn wait_until_serving(port: u16) -> tonic::transport::Channel {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(channel) =
            tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
                .unwrap()
                .connect()
                .await
        {
            let status = HealthClient::new(channel.clone())
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await;
            if status.is_ok() {
                return channel;
            }
        }
        assert!(
            Instant::now() < deadline,
            "tokend serve did not come up on port {port}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn every_subcommand_has_help() {
    for args in [
        vec!["--help"],
        vec!["serve", "--help"],
        vec!["migrate", "--help"],
        vec!["bootstrap", "--help"],
    ] {
        let output = Command::new(TOKEND).args(&args).output().unwrap();
        assert!(output.status.success(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&output.stdout).contains("Usage"),
            "{args:?}"
        );
    }
}

#[test]
fn a_bad_setting_is_refused_with_its_name() {
    let output = Command::new(TOKEND)
        .arg("migrate")
        .env("TOKEND_LISTEN", "nonsense")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("listen"));
}
