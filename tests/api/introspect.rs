//! Introspect: live effective permissions on every call (SPEC §3).

use chrono::TimeDelta;
use tonic::Code;

use tokend::proto::v1 as pb;

use crate::helpers::{TestApp, assert_status, strings};

crate::both_backends!(
    a_live_personal_token_carries_its_live_permissions_groups_and_scopes,
    a_role_downgrade_shrinks_permissions_on_the_next_introspect,
    suspension_makes_personal_tokens_inactive_and_reactivation_restores_them,
    membership_removal_makes_personal_tokens_inactive_and_readding_restores_them,
    user_removal_makes_personal_tokens_inactive,
    tenant_suspension_makes_every_token_of_the_tenant_inactive,
    an_api_key_survives_its_creators_removal,
    deleting_its_role_makes_an_api_key_inactive,
    expired_tokens_are_inactive,
    an_expiry_is_judged_when_the_token_arrives_not_when_the_call_began,
    revoked_tokens_are_inactive_at_once,
    garbage_and_bad_checksum_strings_are_inactive_without_a_database_query,
    a_wrong_secret_for_a_real_token_id_is_inactive,
    an_inactive_answer_carries_nothing_and_reasons_need_their_permission,
    required_permissions_are_answered_with_allowed,
    introspect_needs_the_introspect_permission,
    bad_introspect_input_is_named,
);

async fn acme(app: &TestApp) {
    app.tenant(
        "acme",
        &[
            (
                "developer",
                &["entities:read", "entities:write", "reports.export"],
            ),
            ("viewer", &["entities:read"]),
        ],
    )
    .await;
    app.member("acme", "alice", "developer", &["eng", "berlin"])
        .await;
}

async fn a_live_personal_token_carries_its_live_permissions_groups_and_scopes(app: TestApp) {
    acme(&app).await;
    let (full, info) = app.pat("acme", "alice", "laptop", &[]).await;
    let (narrow, _) = app
        .pat("acme", "alice", "ci", &["entities:read", "reports.export"])
        .await;

    let answer = app.introspect(&full).await;
    assert!(answer.active);
    assert_eq!(answer.token_id, info.id);
    assert_eq!(answer.display_id, info.display_id);
    assert_eq!(answer.tenant_id, "acme");
    assert_eq!(answer.subject, "alice");
    assert_eq!(answer.name, "laptop");
    assert_eq!(answer.kind, pb::TokenKind::Personal as i32);
    assert_eq!(
        answer.permissions,
        strings(&["entities:read", "entities:write", "reports.export"])
    );
    assert_eq!(answer.groups, strings(&["berlin", "eng"]));
    assert!(answer.scopes.is_empty());
    assert!(answer.issued_at.is_some());
    assert!(answer.expires_at.is_none());

    let answer = app.introspect(&narrow).await;
    assert_eq!(
        answer.permissions,
        strings(&["entities:read", "reports.export"])
    );
    assert_eq!(answer.scopes, strings(&["entities:read", "reports.export"]));
}

async fn a_role_downgrade_shrinks_permissions_on_the_next_introspect(app: TestApp) {
    acme(&app).await;
    let (token, _) = app
        .pat(
            "acme",
            "alice",
            "laptop",
            &["entities:write", "entities:read"],
        )
        .await;
    assert_eq!(app.introspect(&token).await.permissions.len(), 2);

    app.member("acme", "alice", "viewer", &["eng"]).await;
    let answer = app.introspect(&token).await;
    assert!(answer.active);
    assert_eq!(answer.permissions, strings(&["entities:read"]));
    assert_eq!(answer.groups, strings(&["eng"]));

    // Changing the role itself counts too.
    app.role("acme", "viewer", &[]).await;
    assert!(app.introspect(&token).await.permissions.is_empty());
}

async fn suspension_makes_personal_tokens_inactive_and_reactivation_restores_them(app: TestApp) {
    acme(&app).await;
    let (token, _) = app.pat("acme", "alice", "laptop", &[]).await;

    app.set_user_status("alice", pb::UserStatus::Suspended)
        .await;
    let answer = app.introspect(&token).await;
    assert!(!answer.active);
    assert_eq!(answer.reason, pb::InactiveReason::OwnerSuspended as i32);

    app.set_user_status("alice", pb::UserStatus::Active).await;
    assert!(app.introspect(&token).await.active);
}

async fn membership_removal_makes_personal_tokens_inactive_and_readding_restores_them(
    app: TestApp,
) {
    acme(&app).await;
    let (token, _) = app.pat("acme", "alice", "laptop", &[]).await;

    app.remove_member("acme", "alice").await;
    let answer = app.introspect(&token).await;
    assert!(!answer.active);
    assert_eq!(answer.reason, pb::InactiveReason::NotAMember as i32);

    app.member("acme", "alice", "viewer", &[]).await;
    let answer = app.introspect(&token).await;
    assert!(answer.active);
    assert_eq!(answer.permissions, strings(&["entities:read"]));
}

async fn user_removal_makes_personal_tokens_inactive(app: TestApp) {
    acme(&app).await;
    let (token, _) = app.pat("acme", "alice", "laptop", &[]).await;
    app.set_user_status("alice", pb::UserStatus::Removed).await;
    let answer = app.introspect(&token).await;
    assert!(!answer.active);
    assert_eq!(answer.reason, pb::InactiveReason::OwnerRemoved as i32);
}

async fn tenant_suspension_makes_every_token_of_the_tenant_inactive(app: TestApp) {
    acme(&app).await;
    app.role(
        "acme",
        "keymaster",
        &["tokend.api_keys.manage", "entities:read"],
    )
    .await;
    app.member("acme", "kim", "keymaster", &[]).await;
    let (pat, _) = app.pat("acme", "alice", "laptop", &[]).await;
    let (key, _) = app.api_key("acme", "kim", "deploy", "viewer").await;

    app.put_tenant(pb::Tenant {
        id: "acme".into(),
        status: pb::TenantStatus::Suspended.into(),
        ..Default::default()
    })
    .await;
    for token in [&pat, &key] {
        let answer = app.introspect(token).await;
        assert!(!answer.active);
        assert_eq!(answer.reason, pb::InactiveReason::TenantSuspended as i32);
    }
    // Nor can new tokens be issued there.
    let result = app
        .tokens(&app.root)
        .issue_token(pb::IssueTokenRequest {
            tenant_id: "acme".into(),
            actor_user_id: "alice".into(),
            kind: pb::TokenKind::Personal.into(),
            name: "another".into(),
            ..Default::default()
        })
        .await;
    assert_status(result, Code::FailedPrecondition, "suspended");

    app.put_tenant(pb::Tenant {
        id: "acme".into(),
        ..Default::default()
    })
    .await;
    assert!(app.introspect(&pat).await.active);
    assert!(app.introspect(&key).await.active);
}

async fn an_api_key_survives_its_creators_removal(app: TestApp) {
    acme(&app).await;
    app.role(
        "acme",
        "keymaster",
        &["tokend.api_keys.manage", "entities:read"],
    )
    .await;
    app.member("acme", "kim", "keymaster", &[]).await;
    let (key, info) = app.api_key("acme", "kim", "deploy", "viewer").await;
    assert_eq!(info.created_by, "kim");
    assert_eq!(info.role, "viewer");

    app.remove_member("acme", "kim").await;
    app.set_user_status("kim", pb::UserStatus::Removed).await;
    let answer = app.introspect(&key).await;
    assert!(answer.active);
    assert_eq!(answer.kind, pb::TokenKind::ApiKey as i32);
    assert_eq!(answer.subject, info.id);
    assert_eq!(answer.permissions, strings(&["entities:read"]));
    assert!(answer.groups.is_empty());
}

async fn deleting_its_role_makes_an_api_key_inactive(app: TestApp) {
    acme(&app).await;
    app.role(
        "acme",
        "keymaster",
        &["tokend.api_keys.manage", "entities:read"],
    )
    .await;
    app.role("acme", "robot", &["entities:read"]).await;
    app.member("acme", "kim", "keymaster", &[]).await;
    let (key, _) = app.api_key("acme", "kim", "deploy", "robot").await;
    app.directory(&app.root)
        .delete_role(pb::DeleteRoleRequest {
            tenant_id: "acme".into(),
            name: "robot".into(),
        })
        .await
        .unwrap();
    let answer = app.introspect(&key).await;
    assert!(!answer.active);
    assert_eq!(answer.reason, pb::InactiveReason::RoleDeleted as i32);
}

/// alice's personal token, expiring in an hour.
async fn short_lived(app: &TestApp) -> pb::IssueTokenResponse {
    app.tokens(&app.root)
        .issue_token(pb::IssueTokenRequest {
            tenant_id: "acme".into(),
            actor_user_id: "alice".into(),
            kind: pb::TokenKind::Personal.into(),
            name: "short-lived".into(),
            ttl: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

async fn expired_tokens_are_inactive(app: TestApp) {
    acme(&app).await;
    let issued = short_lived(&app).await;
    let answer = app.introspect(&issued.secret).await;
    assert!(answer.active);
    assert!(answer.expires_at.is_some());

    app.advance(TimeDelta::seconds(3599));
    assert!(app.introspect(&issued.secret).await.active);
    app.advance(TimeDelta::seconds(1));
    let answer = app.introspect(&issued.secret).await;
    assert!(!answer.active);
    assert_eq!(answer.reason, pb::InactiveReason::Expired as i32);

    let listed = app.list_as("acme", "alice").await;
    assert_eq!(listed[0].status, pb::TokenStatus::Expired as i32);
}

/// A call's headers (and its caller's credential) can come long before its body, the token
/// asked about: expiry is judged at the time of the answer, not of the authentication.
async fn an_expiry_is_judged_when_the_token_arrives_not_when_the_call_began(app: TestApp) {
    use prost::Message as _;
    acme(&app).await;
    let issued = short_lived(&app).await;
    assert!(app.introspect(&issued.secret).await.active);

    let tcp = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let request = http::Request::post(format!(
        "http://{}/tokend.v1.TokenService/Introspect",
        app.addr
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .header("authorization", format!("Bearer {}", app.root))
    .body(())
    .unwrap();
    let (response, mut body) = client.send_request(request, false).unwrap();
    // Time for the server to take the headers and authenticate the caller. Were it to take
    // longer, the test would pass whatever the code does, never fail for nothing.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    app.advance(TimeDelta::seconds(3600));
    let message = pb::IntrospectRequest {
        token: issued.secret.clone(),
        ..Default::default()
    }
    .encode_to_vec();
    let mut frame = vec![0];
    frame.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(&message);
    body.send_data(bytes::Bytes::from(frame), true).unwrap();

    let mut received = response.await.unwrap().into_body();
    let mut data = Vec::new();
    while let Some(chunk) = received.data().await {
        let chunk = chunk.unwrap();
        let _ = received.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = received.trailers().await.unwrap().unwrap();
    assert_eq!(trailers["grpc-status"], "0", "{trailers:?}");
    let answer = pb::IntrospectResponse::decode(&data[5..]).unwrap();
    assert!(!answer.active, "judged at the time the call began");
    assert_eq!(answer.reason, pb::InactiveReason::Expired as i32);
}

async fn revoked_tokens_are_inactive_at_once(app: TestApp) {
    acme(&app).await;
    let (token, info) = app.pat("acme", "alice", "laptop", &[]).await;
    assert!(app.introspect(&token).await.active);
    // A token may always revoke itself; the very next Introspect sees it.
    app.tokens(&token)
        .revoke_token(pb::RevokeTokenRequest {
            token_id: info.id,
            ..Default::default()
        })
        .await
        .unwrap();
    let answer = app.introspect(&token).await;
    assert!(!answer.active);
    assert_eq!(answer.reason, pb::InactiveReason::Revoked as i32);
}

async fn garbage_and_bad_checksum_strings_are_inactive_without_a_database_query(app: TestApp) {
    acme(&app).await;
    let (token, _) = app.pat("acme", "alice", "laptop", &[]).await;
    let mut bad_checksum = token.clone().into_bytes();
    let last = bad_checksum.len() - 1;
    bad_checksum[last] = if bad_checksum[last] == b'a' {
        b'b'
    } else {
        b'a'
    };
    let bad_checksum = String::from_utf8(bad_checksum).unwrap();
    let candidates = [
        String::new(),
        "garbage".to_owned(),
        "tkd_pat_".to_owned(),
        bad_checksum,
        token[..token.len() - 1].to_owned(),
        format!("Bearer {token}"),
        token.to_uppercase(),
        "x".repeat(10_000),
    ];
    // What authenticating the caller costs, whatever the caches hold: the baseline.
    let auth_only = lookups_during(&app, async {
        app.directory(&app.root)
            .list_tenants(pb::ListTenantsRequest::default())
            .await
            .unwrap();
    })
    .await;
    for candidate in &candidates {
        let lookups = lookups_during(&app, async {
            let answer = app.introspect(candidate).await;
            assert!(!answer.active, "{candidate:.20}");
            assert_eq!(answer.reason, pb::InactiveReason::Malformed as i32);
        })
        .await;
        assert_eq!(
            lookups, auth_only,
            "a malformed string reached the database: {candidate:.20}"
        );
    }
    // A well-formed token of an id never seen costs one lookup: the counter's control.
    let unknown = well_formed_unknown_token();
    let lookups = lookups_during(&app, async {
        assert!(!app.introspect(&unknown).await.active);
    })
    .await;
    assert_eq!(lookups, auth_only + 1);
}

async fn lookups_during(app: &TestApp, call: impl std::future::Future<Output = ()>) -> u64 {
    let before = app.store.token_lookups();
    call.await;
    app.store.token_lookups() - before
}

/// A string with a valid shape and checksum whose id no token has.
pub(crate) fn well_formed_unknown_token() -> String {
    let random =
        uuid::Uuid::new_v4().simple().to_string() + &uuid::Uuid::new_v4().simple().to_string();
    let body = format!("tkd_pat_{}_{}", &random[..12], &random[12..55]);
    format!("{body}{}", checksum(&body))
}

async fn a_wrong_secret_for_a_real_token_id_is_inactive(app: TestApp) {
    acme(&app).await;
    let (token, _) = app.pat("acme", "alice", "laptop", &[]).await;
    let (other, _) = app.pat("acme", "alice", "other", &[]).await;
    let forged = forge(&token, &other);
    let answer = app.introspect(&forged).await;
    assert!(!answer.active);
    assert_eq!(answer.reason, pb::InactiveReason::Unknown as i32);
    // The real token is not locked out by the attempt.
    assert!(app.introspect(&token).await.active);
}

/// `token`'s public id with `other`'s secret and a valid checksum: a forgery that passes
/// every offline check.
pub fn forge(token: &str, other: &str) -> String {
    let display_len = "tkd_pat_".len() + 12 + 1;
    forge_with_secret(token, &other[display_len..other.len() - 6])
}

/// `token`'s id with `secret` instead of its own, under a valid checksum.
pub fn forge_with_secret(token: &str, secret: &str) -> String {
    let display_len = "tkd_pat_".len() + 12 + 1;
    let body = format!("{}{secret}", &token[..display_len]);
    format!("{body}{}", checksum(&body))
}

fn checksum(body: &str) -> String {
    const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut crc = crc32(body.as_bytes());
    let mut out = [b'0'; 6];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(crc % 62) as usize];
        crc /= 62;
    }
    String::from_utf8(out.to_vec()).unwrap()
}

/// CRC-32 (IEEE), written out here so the test does not trust the code under test.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

async fn an_inactive_answer_carries_nothing_and_reasons_need_their_permission(app: TestApp) {
    acme(&app).await;
    app.tenant("gateway", &[("gateway", &["tokend.introspect"])])
        .await;
    app.member("gateway", "gw", "gateway", &[]).await;
    let (gateway, _) = app.pat("gateway", "gw", "gw", &[]).await;
    let (token, info) = app.pat("acme", "alice", "laptop", &[]).await;
    app.tokens(&app.root)
        .revoke_token(pb::RevokeTokenRequest {
            tenant_id: "acme".into(),
            actor_user_id: "alice".into(),
            token_id: info.id,
            reason: "test".into(),
        })
        .await
        .unwrap();

    let plain = app
        .tokens(&gateway)
        .introspect(pb::IntrospectRequest {
            token: token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        plain,
        pb::IntrospectResponse::default(),
        "nothing but active = false"
    );

    let trusted = app.introspect(&token).await;
    assert_eq!(
        trusted,
        pb::IntrospectResponse {
            reason: pb::InactiveReason::Revoked as i32,
            ..Default::default()
        }
    );
}

async fn required_permissions_are_answered_with_allowed(app: TestApp) {
    acme(&app).await;
    let (token, _) = app.pat("acme", "alice", "laptop", &["entities:read"]).await;
    assert!(
        app.introspect_requiring(&token, &["entities:read"])
            .await
            .allowed
    );
    assert!(app.introspect_requiring(&token, &[]).await.allowed);
    let answer = app
        .introspect_requiring(&token, &["entities:read", "entities:write"])
        .await;
    assert!(answer.active && !answer.allowed);
    assert!(!app.introspect_requiring("garbage", &[]).await.allowed);
}

async fn introspect_needs_the_introspect_permission(app: TestApp) {
    acme(&app).await;
    let (token, _) = app.pat("acme", "alice", "laptop", &[]).await;
    let result = app
        .tokens(&token)
        .introspect(pb::IntrospectRequest {
            token: token.clone(),
            ..Default::default()
        })
        .await;
    assert_status(result, Code::PermissionDenied, "tokend.introspect");
}

async fn bad_introspect_input_is_named(app: TestApp) {
    let result = app
        .tokens(&app.root)
        .introspect(pb::IntrospectRequest {
            token: "x".into(),
            required_permissions: vec!["has space".into()],
            client_ip: String::new(),
        })
        .await;
    assert_status(result, Code::InvalidArgument, "required_permissions[0]");
    let result = app
        .tokens(&app.root)
        .introspect(pb::IntrospectRequest {
            token: "x".into(),
            required_permissions: vec![],
            client_ip: "not-an-ip".into(),
        })
        .await;
    assert_status(result, Code::InvalidArgument, "client_ip");
    // Introspect skips tonic's router (its own route, for speed), but not TokenService's
    // message limit: past it the call is refused before it is parsed, where without the
    // limit it would be answered (inactive, malformed).
    let result = app
        .tokens(&app.root)
        .introspect(pb::IntrospectRequest {
            token: "x".repeat(tokend::grpc::MAX_TOKEN_MESSAGE_BYTES + 1),
            required_permissions: vec![],
            client_ip: String::new(),
        })
        .await;
    assert_eq!(result.unwrap_err().code(), Code::OutOfRange);
}
