//! RevokeTokens: incident response over many tokens of one tenant.

use chrono::TimeDelta;
use tonic::Code;

use tokend::clock::Clock as _;
use tokend::proto::v1 as pb;

use crate::helpers::{TestApp, assert_status};

crate::both_backends!(
    revoking_a_users_tokens_leaves_everyone_elses_alone,
    revoking_by_issue_time_spares_later_tokens,
    a_bulk_revocation_needs_tokens_admin_and_a_scope,
    revoking_all_of_a_tenant_stays_inside_it,
    a_bulk_revocation_pages_through_more_tokens_than_one_page,
);

async fn acme(app: &TestApp) {
    app.tenant(
        "acme",
        &[
            ("developer", &["entities:read", "tokend.tokens.issue"]),
            ("keymaster", &["tokend.api_keys.manage", "entities:read"]),
            ("admin", &["tokend.tokens.admin", "entities:read"]),
            ("viewer", &["entities:read"]),
        ],
    )
    .await;
    app.member("acme", "alice", "developer", &[]).await;
    app.member("acme", "bob", "developer", &[]).await;
    app.member("acme", "kim", "keymaster", &[]).await;
    app.member("acme", "ada", "admin", &[]).await;
}

/// A bulk revocation by ada (tokend.tokens.admin in acme), through the root key's act_as.
fn by_ada(tenant: &str) -> pb::RevokeTokensRequest {
    pb::RevokeTokensRequest {
        tenant_id: tenant.into(),
        actor_user_id: "ada".into(),
        reason: "incident 42".into(),
        ..Default::default()
    }
}

async fn revoke_many(app: &TestApp, req: pb::RevokeTokensRequest) -> Vec<String> {
    let mut ids = app
        .tokens(&app.root)
        .revoke_tokens(req)
        .await
        .unwrap()
        .into_inner()
        .token_ids;
    ids.sort();
    ids
}

async fn revoking_a_users_tokens_leaves_everyone_elses_alone(app: TestApp) {
    acme(&app).await;
    let (laptop, laptop_info) = app.pat("acme", "alice", "laptop", &[]).await;
    let (phone, phone_info) = app.pat("acme", "alice", "phone", &[]).await;
    let (bobs, _) = app.pat("acme", "bob", "laptop", &[]).await;
    let (key, _) = app.api_key("acme", "kim", "ci", "viewer").await;
    for token in [&laptop, &phone, &bobs, &key] {
        assert!(
            app.introspect(token).await.active,
            "warm before the revocation"
        );
    }

    let revoked = revoke_many(
        &app,
        pb::RevokeTokensRequest {
            owner_user_id: "alice".into(),
            ..by_ada("acme")
        },
    )
    .await;
    let mut expected = vec![laptop_info.id.clone(), phone_info.id.clone()];
    expected.sort();
    assert_eq!(revoked, expected);
    // Effective at once, warm caches notwithstanding.
    for token in [&laptop, &phone] {
        let answer = app.introspect(token).await;
        assert_eq!(answer.reason, pb::InactiveReason::Revoked as i32);
    }
    assert!(app.introspect(&bobs).await.active);
    assert!(app.introspect(&key).await.active);

    // One audit event per token, naming the actor and the reason.
    for id in &expected {
        let events = app.audit_of(id).await;
        let revocations: Vec<_> = events
            .iter()
            .filter(|e| e.action == "token.revoked")
            .collect();
        assert_eq!(revocations.len(), 1);
        assert_eq!(revocations[0].actor, "ada");
        assert_eq!(
            revocations[0].detail.get("reason").map(String::as_str),
            Some("incident 42")
        );
    }
    // A second run finds nothing left to revoke.
    let again = revoke_many(
        &app,
        pb::RevokeTokensRequest {
            owner_user_id: "alice".into(),
            ..by_ada("acme")
        },
    )
    .await;
    assert!(again.is_empty());
}

async fn revoking_by_issue_time_spares_later_tokens(app: TestApp) {
    acme(&app).await;
    let (old, old_info) = app.pat("acme", "alice", "old", &[]).await;
    app.advance(TimeDelta::hours(1));
    let cutoff = app.clock.now();
    app.advance(TimeDelta::hours(1));
    let (new, _) = app.pat("acme", "alice", "new", &[]).await;
    let revoked = revoke_many(
        &app,
        pb::RevokeTokensRequest {
            issued_before: Some(prost_types::Timestamp {
                seconds: cutoff.timestamp(),
                nanos: 0,
            }),
            ..by_ada("acme")
        },
    )
    .await;
    assert_eq!(revoked, vec![old_info.id]);
    assert!(!app.introspect(&old).await.active);
    assert!(app.introspect(&new).await.active);
}

async fn a_bulk_revocation_needs_tokens_admin_and_a_scope(app: TestApp) {
    acme(&app).await;
    let (alices, _) = app.pat("acme", "alice", "laptop", &[]).await;
    assert_status(
        app.tokens(&app.root)
            .revoke_tokens(pb::RevokeTokensRequest {
                actor_user_id: "bob".into(),
                all: true,
                ..by_ada("acme")
            })
            .await,
        Code::PermissionDenied,
        "tokend.tokens.admin",
    );
    let refused = |req: pb::RevokeTokensRequest, needle: &'static str| {
        let mut client = app.tokens(&app.root);
        async move {
            assert_status(
                client.revoke_tokens(req).await,
                Code::InvalidArgument,
                needle,
            )
        }
    };
    refused(
        by_ada("acme"),
        "all: set owner_user_id, issued_before, or all = true",
    )
    .await;
    refused(
        pb::RevokeTokensRequest {
            all: true,
            reason: "bad\u{7}reason".into(),
            ..by_ada("acme")
        },
        "reason",
    )
    .await;
    refused(
        pb::RevokeTokensRequest {
            all: true,
            owner_user_id: "alice".into(),
            ..by_ada("acme")
        },
        "all: must not be combined",
    )
    .await;
    assert!(app.introspect(&alices).await.active, "nothing was revoked");
}

async fn revoking_all_of_a_tenant_stays_inside_it(app: TestApp) {
    acme(&app).await;
    app.tenant("globex", &[("developer", &["entities:read"])])
        .await;
    app.member("globex", "alice", "developer", &[]).await;
    let (acme_pat, _) = app.pat("acme", "alice", "laptop", &[]).await;
    let (acme_key, _) = app.api_key("acme", "kim", "ci", "viewer").await;
    let (globex_pat, _) = app.pat("globex", "alice", "laptop", &[]).await;
    let revoked = revoke_many(
        &app,
        pb::RevokeTokensRequest {
            all: true,
            ..by_ada("acme")
        },
    )
    .await;
    assert_eq!(revoked.len(), 2);
    assert!(!app.introspect(&acme_pat).await.active);
    assert!(!app.introspect(&acme_key).await.active);
    assert!(app.introspect(&globex_pat).await.active);
}

/// More tokens than one page of the scan (500): none is left behind.
async fn a_bulk_revocation_pages_through_more_tokens_than_one_page(app: TestApp) {
    acme(&app).await;
    let mut secrets = Vec::new();
    for chunk in (0..520).collect::<Vec<_>>().chunks(20) {
        let issued = futures::future::join_all(chunk.iter().map(|i| {
            let name = format!("t{i}");
            let app = &app;
            async move { app.pat("acme", "alice", &name, &[]).await }
        }))
        .await;
        secrets.extend(issued.into_iter().map(|(secret, _)| secret));
    }
    let revoked = revoke_many(
        &app,
        pb::RevokeTokensRequest {
            owner_user_id: "alice".into(),
            ..by_ada("acme")
        },
    )
    .await;
    assert_eq!(revoked.len(), 520);
    assert!(
        !app.introspect(&secrets[0]).await.active,
        "the oldest, on the last page"
    );
    assert!(!app.introspect(&secrets[519]).await.active);
    assert!(app.list_as("acme", "alice").await.is_empty());
}
