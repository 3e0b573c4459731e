//! The `tokend` binary as operators run it: serve, migrate, bootstrap, --help.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::helpers::{Backend, fresh_database};

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

pub struct KillOnDrop(pub Child);

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
    let dir = tempfile::tempdir().unwrap();
    let Some((url, _database)) = fresh_database(app.backend).await else {
        return;
    };
    let url = if app.backend == Backend::Sqlite {
        String::new()
    } else {
        url
    };

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
