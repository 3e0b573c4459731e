//! `kill -9` of a real `tokend serve`: what it acknowledged survives.

use tokend::proto::v1 as pb;
use tokend::proto::v1::token_service_client::TokenServiceClient;

use crate::cli::{
    alices_token, authed, binary_database, free_port, root_key, seed_acme, serve_binary, tokend,
};
use crate::helpers::TestApp;

crate::both_backends!(an_acknowledged_revocation_and_issue_survive_kill_9);

async fn an_acknowledged_revocation_and_issue_survive_kill_9(app: TestApp) {
    // The spawned app only decides the backend; the binary gets its own fresh database.
    let Some(database) = binary_database(app.backend).await else {
        return;
    };
    let (dir, url) = (database.dir.path(), database.url.as_str());
    let root = root_key(&tokend(dir, url).arg("bootstrap").output().unwrap());

    let (mut process, channel) = serve_binary(dir, url, free_port(), &[]).await;
    seed_acme(channel.clone(), &root, &["a:read"]).await;
    let mut tokens = TokenServiceClient::new(channel);
    let doomed = tokens
        .issue_token(authed(alices_token("doomed"), &root))
        .await
        .unwrap()
        .into_inner();
    let kept = tokens
        .issue_token(authed(alices_token("kept"), &root))
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

    let (_process, channel) = serve_binary(dir, url, free_port(), &[]).await;
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
