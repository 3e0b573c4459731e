//! `kill -9` of a real `tokend serve`: what it acknowledged survives, and a write killed
//! anywhere inside it leaves all of it or none of it (crash points: `TOKEND_CRASH_AT`, debug
//! builds only).

use tokend::proto::v1 as pb;
use tokend::proto::v1::token_service_client::TokenServiceClient;

use crate::cli::{
    acme_audit, alices_token, alices_tokens, authed, binary_database, free_port, root_key,
    seed_acme, serve_binary, tokend,
};
use crate::helpers::TestApp;

crate::both_backends!(
    an_acknowledged_revocation_and_issue_survive_kill_9,
    a_write_killed_at_any_point_is_all_or_nothing
);

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

fn introspect_request(token: &str, root: &str) -> tonic::Request<pb::IntrospectRequest> {
    authed(
        pb::IntrospectRequest {
            token: token.into(),
            ..Default::default()
        },
        root,
    )
}

/// The audit events of acme whose action is `action` and whose detail names `name`.
async fn audited(
    channel: tonic::transport::Channel,
    root: &str,
    action: &str,
    name: &str,
) -> usize {
    acme_audit(channel, root, "")
        .await
        .iter()
        .filter(|e| e.action == action && e.detail.get("name").map(String::as_str) == Some(name))
        .count()
}

/// Runs `write` against a server that aborts at `point`, and waits for it to die.
async fn crash_during<F, Fut>(dir: &std::path::Path, url: &str, point: &str, write: F)
where
    F: FnOnce(tonic::transport::Channel) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let (mut process, channel) = serve_binary(
        dir,
        url,
        free_port(),
        &[("TOKEND_CRASH_AT", point.to_owned())],
    )
    .await;
    assert!(!write(channel).await, "{point}: the write was acknowledged");
    let status = tokio::task::spawn_blocking(move || process.0.wait().unwrap())
        .await
        .unwrap();
    assert!(!status.success(), "{point}: the server did not die");
}

async fn a_write_killed_at_any_point_is_all_or_nothing(app: TestApp) {
    let Some(database) = binary_database(app.backend).await else {
        return;
    };
    let (dir, url) = (database.dir.path(), database.url.as_str());
    let root = root_key(&tokend(dir, url).arg("bootstrap").output().unwrap());
    {
        let (_process, channel) = serve_binary(dir, url, free_port(), &[]).await;
        seed_acme(channel, &root, &["a:read"]).await;
    }

    // IssueToken: killed before its commit, nothing of it is left; killed after, all of it.
    for (point, committed) in [
        ("issue.token_written", false),
        ("issue.before_commit", false),
        ("issue.committed", true),
    ] {
        crash_during(dir, url, point, |channel| {
            let root = root.clone();
            async move {
                TokenServiceClient::new(channel)
                    .issue_token(authed(alices_token(point), &root))
                    .await
                    .is_ok()
            }
        })
        .await;
        let (_process, channel) = serve_binary(dir, url, free_port(), &[]).await;
        let listed = alices_tokens(channel.clone(), &root).await;
        let rows = listed.tokens.iter().filter(|t| t.name == point).count();
        let events = audited(channel, &root, "token.issued", point).await;
        let expected = usize::from(committed);
        assert_eq!(
            (rows, events),
            (expected, expected),
            "{point}: token rows, audit events"
        );
    }

    // RevokeToken: the same for a revocation and its audit event.
    for (point, committed) in [
        ("revoke.row_updated", false),
        ("revoke.before_commit", false),
        ("revoke.committed", true),
    ] {
        let name = format!("victim-{point}");
        let issued = {
            let (_process, channel) = serve_binary(dir, url, free_port(), &[]).await;
            TokenServiceClient::new(channel)
                .issue_token(authed(alices_token(&name), &root))
                .await
                .unwrap()
                .into_inner()
        };
        let id = issued.token.unwrap().id;
        crash_during(dir, url, point, |channel| {
            let root = root.clone();
            async move {
                TokenServiceClient::new(channel)
                    .revoke_token(authed(
                        pb::RevokeTokenRequest {
                            tenant_id: "acme".into(),
                            actor_user_id: "alice".into(),
                            token_id: id,
                            reason: "crash test".into(),
                        },
                        &root,
                    ))
                    .await
                    .is_ok()
            }
        })
        .await;
        let (_process, channel) = serve_binary(dir, url, free_port(), &[]).await;
        let answer = TokenServiceClient::new(channel.clone())
            .introspect(introspect_request(&issued.secret, &root))
            .await
            .unwrap()
            .into_inner();
        let events = audited(channel, &root, "token.revoked", &name).await;
        assert_eq!(
            (answer.active, events),
            (!committed, usize::from(committed)),
            "{point}: (still active, revocation events)"
        );
    }
}
