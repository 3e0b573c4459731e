//! `kill -9` of a real `tokend serve`: what it acknowledged survives.

use std::process::Stdio;

use tonic::metadata::MetadataValue;

use tokend::proto::v1 as pb;
use tokend::proto::v1::directory_service_client::DirectoryServiceClient;
use tokend::proto::v1::token_service_client::TokenServiceClient;

use crate::cli::{KillOnDrop, free_port, tokend, wait_until_serving};
use crate::helpers::{Backend, TestApp, fresh_database};

crate::both_backends!(an_acknowledged_revocation_and_issue_survive_kill_9);

fn authed<T>(message: T, credential: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let value: MetadataValue<_> = format!("Bearer {credential}").parse().unwrap();
    request.metadata_mut().insert("authorization", value);
    request
}

async fn serve(
    dir: &std::path::Path,
    url: &str,
    port: u16,
) -> (KillOnDrop, tonic::transport::Channel) {
    let process = KillOnDrop(
        tokend(dir, url)
            .arg("serve")
            .env("TOKEND_LISTEN", format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let channel = wait_until_serving(port).await;
    (process, channel)
}

async fn an_acknowledged_revocation_and_issue_survive_kill_9(app: TestApp) {
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
    let bootstrap = tokend(dir.path(), &url).arg("bootstrap").output().unwrap();
    assert!(bootstrap.status.success(), "{bootstrap:?}");
    let root = String::from_utf8(bootstrap.stdout)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_owned();

    let port = free_port();
    let (mut process, channel) = serve(dir.path(), &url, port).await;
    let mut directory = DirectoryServiceClient::new(channel.clone());
    let mut tokens = TokenServiceClient::new(channel);
    directory
        .put_tenant(authed(
            pb::PutTenantRequest {
                tenant: Some(pb::Tenant {
                    id: "acme".into(),
                    ..Default::default()
                }),
            },
            &root,
        ))
        .await
        .unwrap();
    directory
        .put_role(authed(
            pb::PutRoleRequest {
                tenant_id: "acme".into(),
                name: "dev".into(),
                permissions: vec!["a:read".into()],
            },
            &root,
        ))
        .await
        .unwrap();
    directory
        .put_member(authed(
            pb::PutMemberRequest {
                tenant_id: "acme".into(),
                user_id: "alice".into(),
                role: "dev".into(),
                groups: vec![],
            },
            &root,
        ))
        .await
        .unwrap();
    let issue = |name: &str| pb::IssueTokenRequest {
        tenant_id: "acme".into(),
        actor_user_id: "alice".into(),
        kind: pb::TokenKind::Personal.into(),
        name: name.into(),
        ..Default::default()
    };
    let doomed = tokens
        .issue_token(authed(issue("doomed"), &root))
        .await
        .unwrap()
        .into_inner();
    let kept = tokens
        .issue_token(authed(issue("kept"), &root))
        .await
        .unwrap()
        .into_inner();
    tokens
        .revoke_token(authed(
            pb::RevokeTokenRequest {
                tenant_id: "acme".into(),
                actor_user_id: "alice".into(),
                token_id: doomed.token.unwrap().id,
                reason: "leaked".into(),
            },
            &root,
        ))
        .await
        .unwrap();
    // SIGKILL the moment both were acknowledged: no shutdown, no flush.
    process.0.kill().unwrap();
    process.0.wait().unwrap();

    let (_process, channel) = serve(dir.path(), &url, free_port()).await;
    let mut tokens = TokenServiceClient::new(channel);
    let introspect = |token: &str| {
        authed(
            pb::IntrospectRequest {
                token: token.into(),
                ..Default::default()
            },
            &root,
        )
    };
    let answer = tokens
        .introspect(introspect(&doomed.secret))
        .await
        .unwrap()
        .into_inner();
    assert!(
        !answer.active,
        "an acknowledged revocation survived the crash"
    );
    assert_eq!(answer.reason, pb::InactiveReason::Revoked as i32);
    let answer = tokens
        .introspect(introspect(&kept.secret))
        .await
        .unwrap()
        .into_inner();
    assert!(answer.active, "an acknowledged issue survived the crash");
}
