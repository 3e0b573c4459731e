//! RotateToken: a successor with the same shape, the old token revoked at once or when a
//! grace period ends, rights checked afresh, bounded by the tenant's policy.

use chrono::TimeDelta;
use tonic::Code;

use tokend::clock::Clock as _;
use tokend::proto::v1 as pb;

use crate::helpers::{TestApp, assert_status};

crate::both_backends!(
    both_tokens_live_until_the_grace_ends_then_only_the_successor,
    a_rotation_without_grace_revokes_at_once_and_only_once,
    a_token_may_rotate_itself_and_keeps_its_narrowing,
    rotating_someone_elses_token_is_not_found,
    rotating_an_api_key_rechecks_the_rotators_rights,
    a_rotation_obeys_the_tenant_policy_and_bad_input_changes_nothing,
    revoking_a_token_in_its_grace_ends_it_at_once,
);

async fn acme(app: &TestApp) {
    app.tenant(
        "acme",
        &[
            ("developer", &["entities:read", "tokend.tokens.issue"]),
            ("keymaster", &["tokend.api_keys.manage", "entities:read"]),
            (
                "keyadmin",
                &[
                    "tokend.api_keys.manage",
                    "entities:read",
                    "tokend.tokens.issue",
                ],
            ),
            ("admin", &["tokend.tokens.admin", "entities:read"]),
            ("viewer", &["entities:read"]),
        ],
    )
    .await;
    app.member("acme", "alice", "developer", &[]).await;
    app.member("acme", "bob", "developer", &[]).await;
    app.member("acme", "kim", "keymaster", &[]).await;
    app.member("acme", "kai", "keyadmin", &[]).await;
    app.member("acme", "ada", "admin", &[]).await;
}

/// A rotation of `id` in acme by `user`, through the root key's act_as.
fn rotate_as(user: &str, id: &str, grace: Option<TimeDelta>) -> pb::RotateTokenRequest {
    pb::RotateTokenRequest {
        tenant_id: "acme".into(),
        actor_user_id: user.into(),
        token_id: id.into(),
        grace: grace.map(|g| prost_types::Duration {
            seconds: g.num_seconds(),
            nanos: 0,
        }),
    }
}

async fn rotate(app: &TestApp, req: pb::RotateTokenRequest) -> pb::RotateTokenResponse {
    app.tokens(&app.root)
        .rotate_token(req)
        .await
        .expect("rotate")
        .into_inner()
}

/// A personal token for `user` that lives `days`.
async fn pat_for_days(app: &TestApp, user: &str, name: &str, days: i64) -> (String, pb::TokenInfo) {
    let issued = app
        .tokens(&app.root)
        .issue_token(pb::IssueTokenRequest {
            tenant_id: "acme".into(),
            actor_user_id: user.into(),
            kind: pb::TokenKind::Personal.into(),
            name: name.into(),
            ttl: Some(prost_types::Duration {
                seconds: days * 86_400,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .expect("issue")
        .into_inner();
    (issued.secret, issued.token.unwrap())
}

fn seconds(ts: &Option<prost_types::Timestamp>) -> i64 {
    ts.as_ref().expect("a timestamp").seconds
}

fn ids(tokens: &[pb::TokenInfo]) -> Vec<String> {
    let mut ids: Vec<String> = tokens.iter().map(|t| t.id.clone()).collect();
    ids.sort();
    ids
}

async fn both_tokens_live_until_the_grace_ends_then_only_the_successor(app: TestApp) {
    acme(&app).await;
    let (old, old_info) = pat_for_days(&app, "alice", "deploy", 30).await;
    app.advance(TimeDelta::days(10));
    // Warm: the remembered verdict must not outlive the grace.
    assert!(app.introspect(&old).await.active);

    let rotated = rotate(
        &app,
        rotate_as("alice", &old_info.id, Some(TimeDelta::hours(1))),
    )
    .await;
    let now = app.clock.now().timestamp();
    let new_info = rotated.token.unwrap();
    let previous = rotated.previous.unwrap();
    let new = rotated.secret;
    assert_ne!(new_info.id, old_info.id);
    assert_eq!(new_info.name, "deploy");
    assert_eq!(new_info.owner_user_id, "alice");
    assert_eq!(new_info.kind, old_info.kind);
    // The original 30-day lifetime again, from now.
    assert_eq!(seconds(&new_info.expires_at), now + 30 * 86_400);
    assert_eq!(previous.status, pb::TokenStatus::Active as i32);
    assert_eq!(seconds(&previous.revoked_at), now + 3600);
    assert_eq!(previous.revoke_reason, "rotated");

    // Both live, the old one announcing its end.
    let answer = app.introspect(&old).await;
    assert!(answer.active);
    assert_eq!(seconds(&answer.expires_at), now + 3600);
    assert!(app.introspect(&new).await.active);
    assert_eq!(
        ids(&app.list_as("acme", "alice").await),
        ids(&[old_info.clone(), new_info.clone()])
    );

    // A second before the end, remembered; a second later, no longer live.
    app.advance(TimeDelta::minutes(60) - TimeDelta::seconds(1));
    assert!(app.introspect(&old).await.active);
    app.advance(TimeDelta::seconds(1));
    let answer = app.introspect(&old).await;
    assert!(!answer.active);
    assert_eq!(answer.reason, pb::InactiveReason::Revoked as i32);
    assert!(app.introspect(&new).await.active);
    assert_eq!(
        ids(&app.list_as("acme", "alice").await),
        vec![new_info.id.clone()]
    );

    // The audit trail links both ends.
    let rotated_event = app
        .audit_of(&old_info.id)
        .await
        .into_iter()
        .find(|e| e.action == "token.rotated")
        .expect("a token.rotated event");
    assert_eq!(rotated_event.actor, "alice");
    assert_eq!(rotated_event.detail["successor"], new_info.id);
    assert_eq!(rotated_event.detail["grace_secs"], "3600");
    let issued_event = app
        .audit_of(&new_info.id)
        .await
        .into_iter()
        .find(|e| e.action == "token.issued")
        .expect("a token.issued event");
    assert_eq!(issued_event.detail["predecessor"], old_info.id);
}

async fn a_rotation_without_grace_revokes_at_once_and_only_once(app: TestApp) {
    acme(&app).await;
    let (old, old_info) = app.pat("acme", "alice", "laptop", &[]).await;
    assert!(app.introspect(&old).await.active);
    let rotated = rotate(&app, rotate_as("alice", &old_info.id, None)).await;
    let answer = app.introspect(&old).await;
    assert_eq!(answer.reason, pb::InactiveReason::Revoked as i32);
    assert!(app.introspect(&rotated.secret).await.active);
    let previous = rotated.previous.unwrap();
    assert_eq!(previous.status, pb::TokenStatus::Revoked as i32);
    assert_eq!(previous.revoked_by, "alice");
    // A token that never expired yields one that never expires.
    assert!(rotated.token.unwrap().expires_at.is_none());

    // A dead token cannot be rotated back to life.
    assert_status(
        app.tokens(&app.root)
            .rotate_token(rotate_as("alice", &old_info.id, None))
            .await,
        Code::FailedPrecondition,
        "is revoked",
    );
    // Nor can a token in its grace period be rotated twice (two successors).
    let (other, other_info) = app.pat("acme", "alice", "phone", &[]).await;
    let successor = rotate(
        &app,
        rotate_as("alice", &other_info.id, Some(TimeDelta::minutes(5))),
    )
    .await
    .token
    .unwrap();
    assert_status(
        app.tokens(&app.root)
            .rotate_token(rotate_as("alice", &other_info.id, None))
            .await,
        Code::FailedPrecondition,
        "already rotated",
    );
    assert!(app.introspect(&other).await.active);
    let phones: Vec<_> = app
        .list_as("acme", "alice")
        .await
        .into_iter()
        .filter(|t| t.name == "phone")
        .collect();
    assert_eq!(phones.len(), 2, "the original and one successor");
    // The original still holds its name in its grace, even with its successor gone.
    app.revoke_as("acme", "alice", &successor.id).await;
    assert_status(
        app.tokens(&app.root)
            .issue_token(pb::IssueTokenRequest {
                tenant_id: "acme".into(),
                actor_user_id: "alice".into(),
                kind: pb::TokenKind::Personal.into(),
                name: "phone".into(),
                ..Default::default()
            })
            .await,
        Code::AlreadyExists,
        "phone",
    );

    // An expired token stays expired.
    let (_, short) = pat_for_days(&app, "alice", "short", 1).await;
    app.advance(TimeDelta::days(2));
    assert_status(
        app.tokens(&app.root)
            .rotate_token(rotate_as("alice", &short.id, None))
            .await,
        Code::FailedPrecondition,
        "is expired",
    );
}

async fn a_token_may_rotate_itself_and_keeps_its_narrowing(app: TestApp) {
    acme(&app).await;
    // Narrowed to entities:read: it lacks tokend.tokens.issue, yet may replace itself, if
    // it dies at once (a thief's rotation must not leave the owner's copy quietly working).
    let (narrow, narrow_info) = app.pat("acme", "alice", "reader", &["entities:read"]).await;
    assert_status(
        app.tokens(&narrow)
            .rotate_token(pb::RotateTokenRequest {
                token_id: narrow_info.id.clone(),
                grace: Some(prost_types::Duration {
                    seconds: 60,
                    nanos: 0,
                }),
                ..Default::default()
            })
            .await,
        Code::PermissionDenied,
        "tokend.tokens.issue",
    );
    let rotated = app
        .tokens(&narrow)
        .rotate_token(pb::RotateTokenRequest {
            token_id: narrow_info.id.clone(),
            ..Default::default()
        })
        .await
        .expect("self-rotation")
        .into_inner();
    let successor = rotated.token.unwrap();
    assert_eq!(successor.scopes, vec!["entities:read".to_owned()]);
    // Minted by the credential, not by alice in person.
    assert_eq!(successor.created_by, narrow_info.display_id);
    let answer = app.introspect(&rotated.secret).await;
    assert!(answer.active);
    assert_eq!(answer.permissions, vec!["entities:read".to_owned()]);
    assert_eq!(answer.scopes, vec!["entities:read".to_owned()]);
    // Revoked at once: the credential that asked is now dead.
    assert!(!app.introspect(&narrow).await.active);

    // The successor can do the same, and nothing more: rotating the owner's other,
    // un-narrowed token would mint something broader than itself.
    let (_, wide_info) = app.pat("acme", "alice", "wide", &[]).await;
    assert_status(
        app.tokens(&rotated.secret)
            .rotate_token(pb::RotateTokenRequest {
                token_id: wide_info.id.clone(),
                ..Default::default()
            })
            .await,
        Code::PermissionDenied,
        "tokend.tokens.issue",
    );
    // An un-narrowed personal token with tokend.tokens.issue may rotate its owner's others.
    let (wide, _) = app.pat("acme", "alice", "cli", &[]).await;
    let again = app
        .tokens(&wide)
        .rotate_token(pb::RotateTokenRequest {
            token_id: successor.id.clone(),
            ..Default::default()
        })
        .await
        .expect("rotation of an owner's other token")
        .into_inner();
    assert_eq!(
        again.token.unwrap().scopes,
        vec!["entities:read".to_owned()]
    );
}

async fn rotating_someone_elses_token_is_not_found(app: TestApp) {
    acme(&app).await;
    let (alices, alices_info) = app.pat("acme", "alice", "laptop", &[]).await;
    let (_, key_info) = app.api_key("acme", "kim", "ci", "viewer").await;
    let (bobs, _) = app.pat("acme", "bob", "laptop", &[]).await;
    for (actor, id) in [
        ("bob", &alices_info.id),
        // tokend.tokens.admin lists and revokes anyone's tokens, but does not mint them.
        ("ada", &alices_info.id),
        ("alice", &key_info.id),
    ] {
        assert_status(
            app.tokens(&app.root)
                .rotate_token(rotate_as(actor, id, None))
                .await,
            Code::NotFound,
            "token",
        );
    }
    assert_status(
        app.tokens(&bobs)
            .rotate_token(pb::RotateTokenRequest {
                token_id: alices_info.id.clone(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "token",
    );
    assert!(app.introspect(&alices).await.active, "untouched");
    assert_eq!(app.list_as("acme", "alice").await.len(), 1);
}

async fn rotating_an_api_key_rechecks_the_rotators_rights(app: TestApp) {
    acme(&app).await;
    let (viewer_key, viewer_info) = app.api_key("acme", "kim", "ci", "viewer").await;
    let rotated = rotate(&app, rotate_as("kim", &viewer_info.id, None)).await;
    let successor = rotated.token.unwrap();
    assert_eq!(successor.role, "viewer");
    assert_eq!(successor.kind, pb::TokenKind::ApiKey as i32);
    assert!(!app.introspect(&viewer_key).await.active);
    let answer = app.introspect(&rotated.secret).await;
    assert_eq!(answer.subject, successor.id, "a key speaks for itself");

    // A key bound to a role kim does not hold: kim may list it, not re-mint it.
    let (dev_key, dev_info) = app.api_key("acme", "kai", "deployer", "developer").await;
    assert_status(
        app.tokens(&app.root)
            .rotate_token(rotate_as("kim", &dev_info.id, None))
            .await,
        Code::PermissionDenied,
        "role: kim lacks tokend.tokens.issue",
    );
    assert!(app.introspect(&dev_key).await.active, "untouched");

    // The key itself needs no tokend.api_keys.manage to rotate itself at once; keeping
    // itself alive beside its successor takes the rights to issue such a key.
    let with_grace = pb::RotateTokenRequest {
        token_id: dev_info.id.clone(),
        grace: Some(prost_types::Duration {
            seconds: 60,
            nanos: 0,
        }),
        ..Default::default()
    };
    assert_status(
        app.tokens(&dev_key).rotate_token(with_grace).await,
        Code::PermissionDenied,
        "tokend.api_keys.manage",
    );
    let own = app
        .tokens(&dev_key)
        .rotate_token(pb::RotateTokenRequest {
            token_id: dev_info.id.clone(),
            ..Default::default()
        })
        .await
        .expect("a key rotating itself")
        .into_inner();
    assert_eq!(own.token.unwrap().role, "developer");
    assert!(!app.introspect(&dev_key).await.active);
    assert!(app.introspect(&own.secret).await.active);
}

async fn a_rotation_obeys_the_tenant_policy_and_bad_input_changes_nothing(app: TestApp) {
    acme(&app).await;
    let (forever, forever_info) = app.pat("acme", "alice", "forever", &[]).await;
    let (_, month_info) = pat_for_days(&app, "alice", "month", 30).await;
    app.put_tenant(pb::Tenant {
        id: "acme".into(),
        policy: Some(pb::TokenPolicy {
            require_expiry: true,
            max_lifetime: None,
            max_rotation_grace: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
        }),
        ..Default::default()
    })
    .await;
    // Never retroactive: the token issued before the policy still works.
    assert!(app.introspect(&forever).await.active);
    assert_status(
        app.tokens(&app.root)
            .rotate_token(rotate_as("alice", &forever_info.id, None))
            .await,
        Code::FailedPrecondition,
        "policy require_expiry",
    );
    assert_status(
        app.tokens(&app.root)
            .rotate_token(rotate_as(
                "alice",
                &month_info.id,
                Some(TimeDelta::hours(2)),
            ))
            .await,
        Code::FailedPrecondition,
        "policy max_rotation_grace",
    );
    for (grace, rule) in [
        (-1, "grace: must be between 0 and 30 days"),
        (31 * 86_400, "grace: must be between 0 and 30 days"),
    ] {
        let mut req = rotate_as("alice", &month_info.id, None);
        req.grace = Some(prost_types::Duration {
            seconds: grace,
            nanos: 0,
        });
        assert_status(
            app.tokens(&app.root).rotate_token(req).await,
            Code::InvalidArgument,
            rule,
        );
    }
    // None of the refusals changed anything.
    assert_eq!(app.list_as("acme", "alice").await.len(), 2);

    // A maximum lifetime set since clamps the successor's.
    app.put_tenant(pb::Tenant {
        id: "acme".into(),
        policy: Some(pb::TokenPolicy {
            max_lifetime: Some(prost_types::Duration {
                seconds: 7 * 86_400,
                nanos: 0,
            }),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await;
    let clamped = rotate(&app, rotate_as("alice", &month_info.id, None)).await;
    assert_eq!(
        seconds(&clamped.token.unwrap().expires_at),
        app.clock.now().timestamp() + 7 * 86_400
    );
    let clamped = rotate(&app, rotate_as("alice", &forever_info.id, None)).await;
    assert_eq!(
        seconds(&clamped.token.unwrap().expires_at),
        app.clock.now().timestamp() + 7 * 86_400
    );
}

async fn revoking_a_token_in_its_grace_ends_it_at_once(app: TestApp) {
    acme(&app).await;
    let (old, old_info) = app.pat("acme", "alice", "laptop", &[]).await;
    let (bulk, bulk_info) = app.pat("acme", "alice", "phone", &[]).await;
    for info in [&old_info, &bulk_info] {
        rotate(
            &app,
            rotate_as("alice", &info.id, Some(TimeDelta::hours(1))),
        )
        .await;
    }
    assert!(app.introspect(&old).await.active);
    assert!(app.introspect(&bulk).await.active);

    let revoked = app
        .tokens(&app.root)
        .revoke_token(pb::RevokeTokenRequest {
            tenant_id: "acme".into(),
            actor_user_id: "alice".into(),
            token_id: old_info.id.clone(),
            reason: "laptop stolen".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .token
        .unwrap();
    assert_eq!(revoked.status, pb::TokenStatus::Revoked as i32);
    assert_eq!(revoked.revoke_reason, "laptop stolen");
    assert_eq!(seconds(&revoked.revoked_at), app.clock.now().timestamp());
    assert!(!app.introspect(&old).await.active);

    // Incident response reaches tokens in their grace too.
    let ids = app
        .tokens(&app.root)
        .revoke_tokens(pb::RevokeTokensRequest {
            tenant_id: "acme".into(),
            actor_user_id: "ada".into(),
            owner_user_id: "alice".into(),
            reason: "incident".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token_ids;
    assert!(ids.contains(&bulk_info.id), "{ids:?}");
    assert!(!app.introspect(&bulk).await.active);
}
