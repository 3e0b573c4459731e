//! No secret anywhere: every log line `tokend` writes (at trace level, its dependencies'
//! included) during a full scenario is searched for token secrets, argon2 hashes and the
//! pepper.

use std::process::Stdio;

use tonic::transport::Channel;

use tokend::proto::v1 as pb;
use tokend::proto::v1::token_service_client::TokenServiceClient;

use crate::cli::{
    KillOnDrop, alices_token, authed, binary_database, free_port, root_key, seed_acme, tokend,
    wait_until_serving,
};
use crate::helpers::TestApp;

crate::both_backends!(no_secret_hash_or_pepper_reaches_any_log_line);

/// The secret part of a token string: what follows its display id.
fn secret_part(token: &str) -> &str {
    let display_len = "tkd_pat_".len() + 12;
    &token[display_len + 1..]
}

async fn no_secret_hash_or_pepper_reaches_any_log_line(app: TestApp) {
    // The spawned app only decides the backend; the binary gets its own fresh database.
    let Some(database) = binary_database(app.backend).await else {
        return;
    };
    let (dir, url) = (database.dir.path(), database.url.as_str());
    let pepper = "pepper-Zq8vX2mN5rT1wY7kB3cD9fG4hJ6lP0sA";
    let with_logs = |command: &mut std::process::Command| {
        command
            .env("TOKEND_PEPPER", pepper)
            .env("TOKEND_LOG__FILTER", "trace");
    };

    let mut bootstrap = tokend(dir, url);
    with_logs(&mut bootstrap);
    let bootstrap = bootstrap.arg("bootstrap").output().unwrap();
    let root = root_key(&bootstrap);
    let stdout = String::from_utf8_lossy(&bootstrap.stdout).into_owned();
    let mut logs = String::from_utf8_lossy(&bootstrap.stderr).into_owned();
    // Printing the root key once is bootstrap's job; anything else it prints is searched.
    logs.push_str(stdout.trim_end().trim_end_matches(root.as_str()));

    let port = free_port();
    let log_file = dir.join("serve.log");
    let mut serve = tokend(dir, url);
    with_logs(&mut serve);
    let server = KillOnDrop(
        serve
            .arg("serve")
            .env("TOKEND_LISTEN", format!("127.0.0.1:{port}"))
            .env("TOKEND_LAST_USED_FLUSH_MS", "50")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_file).unwrap())
            .spawn()
            .unwrap(),
    );
    let channel: Channel = wait_until_serving(port).await;
    seed_acme(
        channel.clone(),
        &root,
        &["entities:read", "tokend.tokens.issue"],
    )
    .await;
    let mut tokens = TokenServiceClient::new(channel);
    let pat = tokens
        .issue_token(authed(alices_token("laptop"), &root))
        .await
        .unwrap()
        .into_inner();
    let mut secrets = vec![root.clone(), pat.secret.clone()];
    let introspect = |token: &str| pb::IntrospectRequest {
        token: token.into(),
        required_permissions: vec!["entities:read".into()],
        client_ip: "203.0.113.7".into(),
    };
    // Live, wrong secret, garbage; the PAT as a credential, a bad credential.
    let mut wrong = pat.secret.clone();
    wrong.replace_range(30..31, if &wrong[30..31] == "A" { "B" } else { "A" });
    for candidate in [pat.secret.as_str(), wrong.as_str(), "tkd_pat_garbage"] {
        tokens
            .introspect(authed(introspect(candidate), &root))
            .await
            .unwrap();
    }
    tokens
        .list_tokens(authed(pb::ListTokensRequest::default(), &pat.secret))
        .await
        .unwrap();
    assert!(
        tokens
            .list_tokens(authed(pb::ListTokensRequest::default(), &wrong))
            .await
            .is_err()
    );
    // Rotation, a leak report, a revocation, a key.
    let rotated = tokens
        .rotate_token(authed(
            pb::RotateTokenRequest {
                token_id: pat.token.unwrap().id,
                grace: Some(prost_types::Duration {
                    seconds: 60,
                    nanos: 0,
                }),
                ..Default::default()
            },
            &pat.secret,
        ))
        .await
        .unwrap()
        .into_inner();
    secrets.push(rotated.secret.clone());
    tokens
        .report_leaked_token(authed(
            pb::ReportLeakedTokenRequest {
                tokens: vec![rotated.secret.clone(), wrong.clone()],
                source: "a paste".into(),
            },
            &root,
        ))
        .await
        .unwrap();
    let key = tokens
        .issue_token(authed(
            pb::IssueTokenRequest {
                tenant_id: "system".into(),
                kind: pb::TokenKind::ApiKey.into(),
                name: "gateway".into(),
                role: "admin".into(),
                ..Default::default()
            },
            &root,
        ))
        .await
        .unwrap()
        .into_inner();
    secrets.push(key.secret.clone());
    tokens
        .revoke_token(authed(
            pb::RevokeTokenRequest {
                token_id: key.token.unwrap().id,
                reason: "done".into(),
                ..Default::default()
            },
            &root,
        ))
        .await
        .unwrap();
    // Let a batch of last uses be written.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    drop(server);

    logs.push_str(&std::fs::read_to_string(&log_file).unwrap());
    assert!(
        logs.contains("issued a token") && logs.contains("rotated a token"),
        "the scenario was logged: {logs}"
    );
    assert!(logs.contains("TRACE"), "trace lines were captured");
    for secret in &secrets {
        assert!(
            !logs.contains(secret_part(secret)),
            "a token secret was logged"
        );
    }
    assert!(
        !logs.contains(secret_part(&wrong)),
        "a guessed secret was logged"
    );
    assert!(!logs.contains("$argon2"), "a hash was logged");
    assert!(!logs.contains(pepper), "the pepper was logged");
}
