//! Caller authentication and `tokend.*` permissions (SPEC §5).

use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use tokend::proto::v1 as pb;

use crate::helpers::{TestApp, assert_status, pat_request};

crate::both_backends!(
    calls_without_a_valid_credential_are_unauthenticated,
    a_revoked_or_suspended_credential_is_refused_on_its_next_call,
    acting_as_another_user_needs_act_as_in_the_system_tenant,
    acting_as_a_user_needs_a_live_member_of_a_live_tenant_and_grants_that_members_role,
    a_token_can_always_list_revoke_and_delete_its_owners_tokens_itself_included,
    health_and_reflection_need_no_credential,
    credentials_taking_turns_on_one_connection_each_act_as_themselves,
    a_connections_remembered_verdict_yields_to_changes_made_elsewhere,
);

async fn acme(app: &TestApp) {
    app.tenant(
        "acme",
        &[
            (
                "developer",
                &["entities:read", "tokend.act_as", "tokend.tokens.issue"],
            ),
            ("viewer", &["entities:read"]),
        ],
    )
    .await;
    app.member("acme", "alice", "developer", &[]).await;
    app.member("acme", "bob", "viewer", &[]).await;
}

async fn calls_without_a_valid_credential_are_unauthenticated(app: TestApp) {
    let result = app
        .tokens_anonymous()
        .list_tokens(pb::ListTokensRequest::default())
        .await;
    assert_status(result, Code::Unauthenticated, "missing credential");
    for bad in [
        "garbage",
        "tkd_key_AAAAAAAAAAAA_x",
        &app.root[..app.root.len() - 1],
    ] {
        let result = app
            .tokens(bad)
            .list_tokens(pb::ListTokensRequest::default())
            .await;
        assert_status(result, Code::Unauthenticated, "not an active token");
    }
    // The header's bytes reach the token parser unchecked as text: bytes that are not
    // UTF-8 are no token, however they came. The scheme is matched in either case, and
    // surrounding blanks are not part of the token.
    let with_header = |value: &[u8]| {
        let mut request = tonic::Request::new(pb::ListTokensRequest::default());
        request.metadata_mut().insert(
            "authorization",
            tonic::metadata::MetadataValue::try_from(value).expect("a header value"),
        );
        request
    };
    for bad in [
        &b"Bearer tkd_key_\xff\xfe"[..],
        b"Bearer \xc3\xa9",
        b"Basic xyz",
    ] {
        let result = app.tokens_anonymous().list_tokens(with_header(bad)).await;
        let status = result.expect_err("refused");
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    }
    for good in [
        format!("bearer {}", app.root),
        format!("Bearer {}\t", app.root),
    ] {
        app.tokens_anonymous()
            .list_tokens(with_header(good.as_bytes()))
            .await
            .unwrap_or_else(|status| panic!("{good:?}: {status:?}"));
    }
    let result = app
        .directory("x")
        .list_tenants(pb::ListTenantsRequest::default())
        .await;
    assert_eq!(result.unwrap_err().code(), Code::Unauthenticated);
    let result = app
        .audit("x")
        .list_audit_events(pb::ListAuditEventsRequest::default())
        .await;
    assert_eq!(result.unwrap_err().code(), Code::Unauthenticated);
}

async fn a_revoked_or_suspended_credential_is_refused_on_its_next_call(app: TestApp) {
    acme(&app).await;
    let (token, info) = app.pat("acme", "bob", "laptop", &[]).await;
    app.tokens(&token)
        .list_tokens(pb::ListTokensRequest::default())
        .await
        .unwrap();

    app.set_user_status("bob", pb::UserStatus::Suspended).await;
    let result = app
        .tokens(&token)
        .list_tokens(pb::ListTokensRequest::default())
        .await;
    assert_status(result, Code::Unauthenticated, "not an active token");
    app.set_user_status("bob", pb::UserStatus::Active).await;

    app.tokens(&token)
        .revoke_token(pb::RevokeTokenRequest {
            token_id: info.id,
            ..Default::default()
        })
        .await
        .unwrap();
    let result = app
        .tokens(&token)
        .list_tokens(pb::ListTokensRequest::default())
        .await;
    assert_status(result, Code::Unauthenticated, "not an active token");
}

async fn acting_as_another_user_needs_act_as_in_the_system_tenant(app: TestApp) {
    acme(&app).await;
    // alice holds tokend.act_as, but in acme: it means nothing outside the system tenant.
    let (alice, _) = app.pat("acme", "alice", "laptop", &[]).await;
    let result = app
        .tokens(&alice)
        .issue_token(pb::IssueTokenRequest {
            tenant_id: "acme".into(),
            actor_user_id: "bob".into(),
            kind: pb::TokenKind::Personal.into(),
            name: "for bob".into(),
            ..Default::default()
        })
        .await;
    assert_status(result, Code::PermissionDenied, "actor_user_id");
    let result = app
        .tokens(&alice)
        .list_tokens(pb::ListTokensRequest {
            actor_user_id: "bob".into(),
            ..Default::default()
        })
        .await;
    assert_status(result, Code::PermissionDenied, "tokend.act_as");

    // Naming oneself is acting as oneself.
    app.tokens(&alice)
        .list_tokens(pb::ListTokensRequest {
            actor_user_id: "alice".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    // The root key (system tenant) may act, but only for live members.
    let result = app
        .tokens(&app.root)
        .issue_token(pb::IssueTokenRequest {
            tenant_id: "acme".into(),
            actor_user_id: "stranger".into(),
            kind: pb::TokenKind::Personal.into(),
            name: "x".into(),
            ..Default::default()
        })
        .await;
    assert_status(result, Code::FailedPrecondition, "stranger");
    // An API key cannot own a personal token.
    let result = app
        .tokens(&app.root)
        .issue_token(pb::IssueTokenRequest {
            kind: pb::TokenKind::Personal.into(),
            name: "x".into(),
            ..Default::default()
        })
        .await;
    assert_status(result, Code::PermissionDenied, "API key cannot own");
    // Naming another tenant without a user to act as is a malformed request.
    let result = app
        .tokens(&app.root)
        .list_tokens(pb::ListTokensRequest {
            tenant_id: "acme".into(),
            ..Default::default()
        })
        .await;
    assert_status(result, Code::InvalidArgument, "actor_user_id");
    // act_as never reaches into the system tenant: that would make an act_as-only key a
    // tokend administrator.
    app.role("system", "backend", &["tokend.act_as"]).await;
    app.role(
        "system",
        "operator",
        &["tokend.tokens.admin", "tokend.directory.write"],
    )
    .await;
    app.member("system", "ops", "operator", &[]).await;
    let backend = app
        .tokens(&app.root)
        .issue_token(pb::IssueTokenRequest {
            kind: pb::TokenKind::ApiKey.into(),
            name: "web-backend".into(),
            role: "backend".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .secret;
    let result = app
        .tokens(&backend)
        .issue_token(pb::IssueTokenRequest {
            tenant_id: "system".into(),
            actor_user_id: "ops".into(),
            kind: pb::TokenKind::Personal.into(),
            name: "escalate".into(),
            ..Default::default()
        })
        .await;
    assert_status(result, Code::PermissionDenied, "system tenant");
}

/// Acting as a user reads the tenant, the user and the membership's role in one query:
/// each way of failing that standing refuses with its own status and changes nothing, and
/// the role's permissions as they are now are what the request may use.
async fn acting_as_a_user_needs_a_live_member_of_a_live_tenant_and_grants_that_members_role(
    app: TestApp,
) {
    acme(&app).await;
    app.tenant("globex", &[("viewer", &["entities:read"])])
        .await;
    app.member("globex", "carol", "viewer", &[]).await;
    app.member("acme", "dave", "viewer", &[]).await;
    app.set_user_status("bob", pb::UserStatus::Suspended).await;
    let issue = |tenant: &str, user: &str, scopes: &[&str], name: &str| {
        pat_request(tenant, user, name, scopes)
    };
    let root = app.tokens(&app.root);
    let tokens_in =
        |tenant: &str| format!("SELECT COUNT(*) FROM tokens WHERE tenant_id = '{tenant}'");

    for (tenant, user, scopes, code, message) in [
        ("nowhere", "dave", &[][..], Code::NotFound, "tenant nowhere"),
        (
            "acme",
            "nobody",
            &[],
            Code::FailedPrecondition,
            "user nobody is not active",
        ),
        (
            "acme",
            "bob",
            &[],
            Code::FailedPrecondition,
            "user bob is not active",
        ),
        // carol is active, but in globex only.
        (
            "acme",
            "carol",
            &[],
            Code::FailedPrecondition,
            "user carol is not a member of tenant acme",
        ),
        // dave's role in acme (viewer) is what bounds the request, not the root key's rights.
        (
            "acme",
            "dave",
            &["entities:write"],
            Code::PermissionDenied,
            "user dave",
        ),
    ] {
        let result = root
            .clone()
            .issue_token(issue(tenant, user, scopes, "x"))
            .await;
        assert_status(result, code, message);
    }
    let result = root
        .clone()
        .issue_token(pb::IssueTokenRequest {
            tenant_id: "acme".into(),
            actor_user_id: "dave".into(),
            kind: pb::TokenKind::ApiKey.into(),
            name: "x".into(),
            role: "viewer".into(),
            ..Default::default()
        })
        .await;
    assert_status(result, Code::PermissionDenied, "tokend.api_keys.manage");
    assert_eq!(
        app.count(&tokens_in("acme")).await,
        0,
        "a refusal issued a token"
    );

    root.clone()
        .issue_token(issue("acme", "dave", &["entities:read"], "reader"))
        .await
        .expect("within dave's role");
    // The role as it is now: granted a permission, dave may use it at once.
    app.role("acme", "viewer", &["entities:read", "entities:write"])
        .await;
    root.clone()
        .issue_token(issue("acme", "dave", &["entities:write"], "writer"))
        .await
        .expect("within dave's widened role");

    let names = |tokens: Vec<pb::TokenInfo>| {
        let mut names: Vec<String> = tokens.into_iter().map(|t| t.name).collect();
        names.sort();
        names
    };
    assert_eq!(
        names(app.list_as("acme", "dave").await),
        ["reader", "writer"]
    );

    let status = |status: pb::TenantStatus| pb::Tenant {
        id: "acme".into(),
        name: "Tenant acme".into(),
        status: status.into(),
        ..Default::default()
    };
    app.put_tenant(status(pb::TenantStatus::Suspended)).await;
    let result = root
        .clone()
        .issue_token(issue("acme", "dave", &[], "late"))
        .await;
    assert_status(result, Code::FailedPrecondition, "tenant acme is suspended");
    app.put_tenant(status(pb::TenantStatus::Active)).await;
    assert_eq!(
        names(app.list_as("acme", "dave").await),
        ["reader", "writer"]
    );
    assert_eq!(app.count(&tokens_in("acme")).await, 2);
    assert_eq!(app.count(&tokens_in("globex")).await, 0);
}

async fn a_token_can_always_list_revoke_and_delete_its_owners_tokens_itself_included(app: TestApp) {
    acme(&app).await;
    let (bob, bob_info) = app.pat("acme", "bob", "laptop", &[]).await;
    let (_, other) = app.pat("acme", "bob", "phone", &[]).await;
    let listed = app
        .tokens(&bob)
        .list_tokens(pb::ListTokensRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tokens;
    assert_eq!(listed.len(), 2);
    app.tokens(&bob)
        .delete_token(pb::DeleteTokenRequest {
            token_id: other.id,
            ..Default::default()
        })
        .await
        .unwrap();
    app.tokens(&bob)
        .revoke_token(pb::RevokeTokenRequest {
            token_id: bob_info.id,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!app.introspect(&bob).await.active);
}

async fn health_and_reflection_need_no_credential(app: TestApp) {
    let mut health = HealthClient::new(app.channel());
    for service in [
        "",
        "tokend.v1.TokenService",
        "tokend.v1.DirectoryService",
        "tokend.v1.AuditService",
    ] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service}");
    }
    let services = crate::cli::grpcurl_list(app.addr);
    if let Some(services) = services {
        for expected in [
            "tokend.v1.TokenService",
            "tokend.v1.DirectoryService",
            "tokend.v1.AuditService",
            "grpc.health.v1.Health",
            "envoy.service.auth.v3.Authorization",
        ] {
            assert!(services.contains(expected), "{expected} in {services}");
        }
    }
}

/// Every client of the test app shares one HTTP/2 connection, and the connection remembers
/// the credential it last checked: credentials taking turns on it must each be themselves,
/// a string differing from the remembered one only in its last character must not pass for
/// it, and a credential revoked between two of its calls is refused on the next.
async fn credentials_taking_turns_on_one_connection_each_act_as_themselves(app: TestApp) {
    acme(&app).await;
    let (alice, _) = app.pat("acme", "alice", "laptop", &[]).await;
    let (bob, bob_info) = app.pat("acme", "bob", "laptop", &[]).await;
    let owners = |credential: &str| {
        let mut tokens = app.tokens(credential);
        async move {
            let listed = tokens
                .list_tokens(pb::ListTokensRequest::default())
                .await
                .map(|r| r.into_inner().tokens);
            listed.map(|tokens| {
                tokens
                    .into_iter()
                    .map(|t| t.owner_user_id)
                    .collect::<std::collections::BTreeSet<_>>()
            })
        }
    };
    for _ in 0..3 {
        for (credential, owner) in [(&alice, "alice"), (&bob, "bob")] {
            let seen = owners(credential).await.unwrap();
            assert_eq!(seen, [owner.to_owned()].into(), "as {owner}");
        }
    }

    let mut altered = alice.clone();
    let last = altered.pop().unwrap();
    altered.push(if last == 'A' { 'B' } else { 'A' });
    assert_eq!(
        owners(&alice).await.unwrap().len(),
        1,
        "alice is remembered"
    );
    assert_eq!(
        owners(&altered).await.unwrap_err().code(),
        Code::Unauthenticated,
        "a string one character off the remembered credential"
    );

    assert!(owners(&bob).await.is_ok());
    app.revoke_as("acme", "bob", &bob_info.id).await;
    assert_eq!(
        owners(&bob).await.unwrap_err().code(),
        Code::Unauthenticated,
        "a credential revoked since its last call on this connection"
    );
}

/// A connection keeps its credential's verdict; a revocation or a role downgrade made
/// through another connection holds on its very next call.
async fn a_connections_remembered_verdict_yields_to_changes_made_elsewhere(app: TestApp) {
    acme(&app).await;
    let (alice, _) = app.pat("acme", "alice", "laptop", &[]).await;
    let (bob, bob_info) = app.pat("acme", "bob", "laptop", &[]).await;
    let mut as_alice = app.tokens_on_a_connection_of_its_own(&alice).await;
    let mut as_bob = app.tokens_on_a_connection_of_its_own(&bob).await;
    // The first call decides, the second keeps the shared verdict, the third is answered
    // from the connection's copy.
    for _ in 0..3 {
        for client in [&mut as_alice, &mut as_bob] {
            client
                .list_tokens(pb::ListTokensRequest::default())
                .await
                .unwrap();
        }
    }

    app.revoke_as("acme", "bob", &bob_info.id).await;
    let result = as_bob.list_tokens(pb::ListTokensRequest::default()).await;
    assert_status(result, Code::Unauthenticated, "not an active token");

    as_alice
        .issue_token(pat_request("acme", "alice", "before", &[]))
        .await
        .unwrap();
    for _ in 0..2 {
        as_alice
            .list_tokens(pb::ListTokensRequest::default())
            .await
            .unwrap();
    }
    app.member("acme", "alice", "viewer", &[]).await;
    let result = as_alice
        .issue_token(pat_request("acme", "alice", "after", &[]))
        .await;
    assert_status(result, Code::PermissionDenied, "tokend.tokens.issue");
}
