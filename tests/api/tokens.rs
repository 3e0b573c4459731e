//! Issue, list, revoke and delete: the lifecycle rules of SPEC §2.

use std::collections::BTreeSet;

use chrono::TimeDelta;
use tonic::Code;

use tokend::proto::v1 as pb;

use crate::helpers::{TestApp, assert_status, strings};

crate::both_backends!(
    issuing_returns_the_secret_once_and_lists_show_only_the_display_id,
    personal_scopes_must_be_within_the_owners_permissions,
    an_api_key_needs_the_manage_permission_and_a_role_within_the_creators,
    a_narrowed_token_cannot_mint_a_broader_one,
    names_are_unique_among_an_owners_live_tokens,
    a_name_issued_many_times_at_once_is_issued_once,
    an_issue_writes_all_or_nothing_and_leaves_the_database_durable,
    lists_are_newest_first_filtered_by_name_and_paged_by_keyset,
    revoked_tokens_are_listed_only_when_asked_for,
    revoke_is_idempotent_and_keeps_the_record,
    delete_removes_the_record_and_the_audit_log_keeps_its_events,
    another_users_token_is_not_found_on_every_rpc_that_takes_an_id,
    a_tokens_admin_lists_and_revokes_any_token_of_its_tenant,
    tenant_policy_and_expiry_rules_are_enforced_at_issue,
    a_personal_token_stays_bound_to_its_tenant,
    bad_issue_input_is_named_and_changes_nothing,
);

async fn acme(app: &TestApp) {
    app.tenant(
        "acme",
        &[
            (
                "developer",
                &["entities:read", "entities:write", "tokend.tokens.issue"],
            ),
            ("viewer", &["entities:read"]),
            (
                "keymaster",
                &["tokend.api_keys.manage", "entities:read", "entities:write"],
            ),
            ("admin", &["tokend.tokens.admin", "entities:read"]),
        ],
    )
    .await;
    app.member("acme", "alice", "developer", &["eng"]).await;
    app.member("acme", "bob", "viewer", &[]).await;
}

fn issue(name: &str) -> pb::IssueTokenRequest {
    pb::IssueTokenRequest {
        kind: pb::TokenKind::Personal.into(),
        name: name.into(),
        ..Default::default()
    }
}

fn as_user(tenant: &str, user: &str, mut req: pb::IssueTokenRequest) -> pb::IssueTokenRequest {
    req.tenant_id = tenant.into();
    req.actor_user_id = user.into();
    req
}

async fn list(app: &TestApp, credential: &str, req: pb::ListTokensRequest) -> Vec<pb::TokenInfo> {
    app.tokens(credential)
        .list_tokens(req)
        .await
        .expect("list tokens")
        .into_inner()
        .tokens
}

async fn list_as(app: &TestApp, tenant: &str, user: &str) -> Vec<pb::TokenInfo> {
    list(
        app,
        &app.root,
        pb::ListTokensRequest {
            tenant_id: tenant.into(),
            actor_user_id: user.into(),
            include_revoked: true,
            ..Default::default()
        },
    )
    .await
}

async fn issuing_returns_the_secret_once_and_lists_show_only_the_display_id(app: TestApp) {
    acme(&app).await;
    let (secret, info) = app.pat("acme", "alice", "laptop", &[]).await;
    assert!(secret.starts_with(&format!("{}_", info.display_id)));
    assert!(info.display_id.starts_with("tkd_pat_"));
    assert_eq!(info.owner_user_id, "alice");
    assert_eq!(info.created_by, "alice");
    assert_eq!(info.status, pb::TokenStatus::Active as i32);
    assert!(info.last_used_at.is_none());

    let listed = list_as(&app, "acme", "alice").await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0], info);
    let debug = format!("{listed:?}");
    assert!(!debug.contains(&secret[info.display_id.len() + 1..]));
    assert!(!debug.contains("argon2"));

    // Using it records its last use, to the minute.
    assert!(app.introspect(&secret).await.active);
    let mut used = None;
    for _ in 0..50 {
        used = list_as(&app, "acme", "alice").await[0].last_used_at;
        if used.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(used.is_some(), "last_used_at is recorded");
}

async fn personal_scopes_must_be_within_the_owners_permissions(app: TestApp) {
    acme(&app).await;
    let mut req = as_user("acme", "bob", issue("wide"));
    req.scopes = vec![
        "entities:read".into(),
        "entities:write".into(),
        "billing:admin".into(),
    ];
    let result = app.tokens(&app.root).issue_token(req).await;
    assert_status(
        result,
        Code::PermissionDenied,
        "billing:admin, entities:write",
    );
    assert!(
        list_as(&app, "acme", "bob").await.is_empty(),
        "nothing was created"
    );

    let mut req = as_user("acme", "bob", issue("narrow"));
    req.scopes = vec!["entities:read".into()];
    app.tokens(&app.root).issue_token(req).await.unwrap();
}

async fn an_api_key_needs_the_manage_permission_and_a_role_within_the_creators(app: TestApp) {
    acme(&app).await;
    app.member("acme", "kim", "keymaster", &[]).await;
    let key = |user: &str, role: &str| {
        let mut req = as_user("acme", user, issue("robot"));
        req.kind = pb::TokenKind::ApiKey.into();
        req.role = role.into();
        req
    };
    // Without tokend.api_keys.manage.
    let result = app
        .tokens(&app.root)
        .issue_token(key("alice", "viewer"))
        .await;
    assert_status(result, Code::PermissionDenied, "tokend.api_keys.manage");
    // A role carrying what the creator lacks.
    let result = app
        .tokens(&app.root)
        .issue_token(key("kim", "developer"))
        .await;
    assert_status(
        result,
        Code::PermissionDenied,
        "role: kim lacks tokend.tokens.issue",
    );
    // An unknown role.
    let result = app.tokens(&app.root).issue_token(key("kim", "ghost")).await;
    assert_status(result, Code::NotFound, "role ghost");
    // A role within the creator's.
    let issued = app
        .tokens(&app.root)
        .issue_token(key("kim", "viewer"))
        .await
        .unwrap()
        .into_inner();
    let info = issued.token.unwrap();
    assert!(info.display_id.starts_with("tkd_key_"));
    assert_eq!(info.owner_user_id, "");
    assert_eq!(info.role, "viewer");
    // A personal token takes no role; an API key needs one.
    let mut req = as_user("acme", "alice", issue("x"));
    req.role = "viewer".into();
    assert_status(
        app.tokens(&app.root).issue_token(req).await,
        Code::InvalidArgument,
        "role",
    );
    assert_status(
        app.tokens(&app.root).issue_token(key("kim", "")).await,
        Code::InvalidArgument,
        "role",
    );
}

async fn a_narrowed_token_cannot_mint_a_broader_one(app: TestApp) {
    acme(&app).await;
    let (narrow, _) = app
        .pat(
            "acme",
            "alice",
            "narrow",
            &["entities:read", "tokend.tokens.issue"],
        )
        .await;
    let minter = app.tokens(&narrow);

    let mut wider = issue("wider");
    wider.scopes = vec!["entities:write".into()];
    assert_status(
        minter.clone().issue_token(wider).await,
        Code::PermissionDenied,
        "entities:write",
    );

    // No scopes would inherit everything alice has: broader than the credential.
    assert_status(
        minter.clone().issue_token(issue("everything")).await,
        Code::PermissionDenied,
        "scopes",
    );

    let mut within = issue("within");
    within.scopes = vec!["entities:read".into()];
    let minted = minter
        .clone()
        .issue_token(within)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        app.introspect(&minted.secret).await.permissions,
        strings(&["entities:read"])
    );

    // A token without tokend.tokens.issue cannot mint at all.
    let (plain, _) = app.pat("acme", "alice", "plain", &["entities:read"]).await;
    let mut req = issue("child");
    req.scopes = vec!["entities:read".into()];
    assert_status(
        app.tokens(&plain).issue_token(req).await,
        Code::PermissionDenied,
        "tokend.tokens.issue",
    );

    // An unscoped token with the permission mints an unscoped one of equal breadth.
    let (full, _) = app.pat("acme", "alice", "full", &[]).await;
    let minted = app
        .tokens(&full)
        .issue_token(issue("child"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(minted.token.unwrap().owner_user_id, "alice");
}

/// The store's IssueToken write (on SQLite one batch of statements that relaxes
/// `synchronous` for its own commit only): a token and its audit event, or neither; and
/// whatever happened, the connection is left out of any transaction and back at FULL, so
/// that the next revocation waits for the disk.
async fn an_issue_writes_all_or_nothing_and_leaves_the_database_durable(app: TestApp) {
    use tokend::domain::token_format::TokenFormat;

    acme(&app).await;
    let format = TokenFormat::new("tkd").unwrap();
    for durable in [false, true] {
        let store = tokend::storage::SeaStore::connect(
            &app.database_url,
            &tokend::storage::DatabaseOptions {
                max_connections: 1,
                sqlite_durable_issue: durable,
                ..Default::default()
            },
            format.clone(),
        )
        .await
        .unwrap();
        issue_all_or_nothing(&app, &store, &format, &format!("durable-{durable}")).await;
    }
}

async fn issue_all_or_nothing(
    app: &TestApp,
    store: &tokend::storage::SeaStore,
    format: &tokend::domain::token_format::TokenFormat,
    prefix: &str,
) {
    use tokend::clock::Clock as _;
    use tokend::domain::model::{AuditRecord, SecretHash, Token};
    use tokend::domain::names::{TenantId, TokenName, UserId};
    use tokend::domain::ports::{AuditQuery, Store as _};
    use tokend::domain::token_format::TokenKind;

    let acme_id = TenantId::from_trusted("acme".into());
    let now = app.clock.now();
    let token = |name: &str| Token {
        display_id: format.generate(TokenKind::Personal).display_id,
        tenant_id: acme_id.clone(),
        kind: TokenKind::Personal,
        name: TokenName::parse("name", &format!("{prefix} {name}")).unwrap(),
        owner_user_id: Some(UserId::from_trusted("alice".into())),
        role: None,
        scopes: None,
        secret_hash: SecretHash("$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaA".into()),
        created_at: now,
        created_by: "alice".into(),
        expires_at: None,
        last_used_at: None,
        revocation: None,
    };
    let audit = |token: &Token| AuditRecord {
        at: now,
        tenant_id: acme_id.clone(),
        actor: "alice".into(),
        caller: "test".into(),
        action: "token.issued".into(),
        token_id: Some(token.id().to_owned()),
        detail: [("name".to_owned(), token.name.as_str().to_owned())].into(),
    };
    let events = |token: &Token| {
        let query = AuditQuery {
            tenant_id: Some(acme_id.clone()),
            token_id: Some(token.id().to_owned()),
            before_id: None,
            limit: 10,
        };
        async move { store.list_audit(&query).await.unwrap() }
    };
    let durable = async || {
        if app.backend == crate::helpers::Backend::Sqlite {
            assert_eq!(
                store.sqlite_synchronous().await.unwrap(),
                Some(2),
                "synchronous"
            );
        }
    };

    // Each value in its column: the batch binds its parameters across two statements.
    let first = token("batch");
    store.insert_token(&first, &audit(&first)).await.unwrap();
    let stored = store
        .get_token(&acme_id, first.id())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            &stored.display_id,
            stored.name.as_str(),
            &stored.owner_user_id
        ),
        (&first.display_id, first.name.as_str(), &first.owner_user_id)
    );
    assert_eq!(
        (stored.created_by.as_str(), &*stored.secret_hash.0),
        ("alice", &*first.secret_hash.0)
    );
    let logged = events(&first).await;
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert_eq!(
        (
            logged[0].record.action.as_str(),
            logged[0].record.caller.as_str()
        ),
        ("token.issued", "test")
    );
    assert_eq!(
        logged[0].record.detail.get("name"),
        Some(&first.name.as_str().to_owned())
    );
    durable().await;

    // The name taken: neither the token nor its event.
    let clash = token("batch");
    let err = store
        .insert_token(&clash, &audit(&clash))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("name"), "{err}");
    assert!(
        store
            .get_token(&acme_id, clash.id())
            .await
            .unwrap()
            .is_none()
    );
    assert!(events(&clash).await.is_empty());
    durable().await;

    // A statement failing inside the transaction (the id taken): nothing of it stays.
    let mut collision = token("another name");
    collision.display_id = first.display_id.clone();
    let err = store
        .insert_token(&collision, &audit(&collision))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("id collision"), "{err}");
    assert_eq!(events(&first).await.len(), 1);
    durable().await;

    // And the connection is not left inside a transaction: the next issue commits.
    let next = token("after");
    store.insert_token(&next, &audit(&next)).await.unwrap();
    assert!(
        store
            .get_token(&acme_id, next.id())
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(events(&next).await.len(), 1);
    durable().await;
}

async fn a_name_issued_many_times_at_once_is_issued_once(app: TestApp) {
    acme(&app).await;
    for round in 0..12 {
        let name = format!("racer-{round}");
        let calls = (0..8).map(|_| {
            let mut tokens = app.tokens(&app.root);
            let request = as_user("acme", "alice", issue(&name));
            async move { tokens.issue_token(request).await }
        });
        let results = futures::future::join_all(calls).await;
        let issued = results.iter().filter(|result| result.is_ok()).count();
        assert_eq!(
            issued, 1,
            "{name}: {issued} live tokens issued with one name"
        );
        for result in results.into_iter().filter_map(Result::err) {
            assert_eq!(result.code(), Code::AlreadyExists, "{name}: {result:?}");
        }
    }
    let listed = list(
        &app,
        &app.root,
        pb::ListTokensRequest {
            tenant_id: "acme".into(),
            actor_user_id: "alice".into(),
            page_size: 100,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(listed.len(), 12);
}

async fn names_are_unique_among_an_owners_live_tokens(app: TestApp) {
    acme(&app).await;
    let (_, first) = app.pat("acme", "alice", "Laptop", &[]).await;
    let result = app
        .tokens(&app.root)
        .issue_token(as_user("acme", "alice", issue("laptop")))
        .await;
    assert_status(result, Code::AlreadyExists, "name");
    // Another owner may use the name.
    app.pat("acme", "bob", "laptop", &[]).await;
    // A revoked token frees its name.
    app.tokens(&app.root)
        .revoke_token(pb::RevokeTokenRequest {
            tenant_id: "acme".into(),
            actor_user_id: "alice".into(),
            token_id: first.id,
            reason: String::new(),
        })
        .await
        .unwrap();
    app.pat("acme", "alice", "laptop", &[]).await;
    // NFC: a decomposed spelling is the same name.
    app.pat("acme", "alice", "Caf\u{e9}", &[]).await;
    let result = app
        .tokens(&app.root)
        .issue_token(as_user("acme", "alice", issue("Cafe\u{301}")))
        .await;
    assert_status(result, Code::AlreadyExists, "name");
}

async fn lists_are_newest_first_filtered_by_name_and_paged_by_keyset(app: TestApp) {
    acme(&app).await;
    let mut issued = Vec::new();
    for i in 0..7 {
        let name = if i % 2 == 0 {
            format!("deploy-{i}")
        } else {
            format!("laptop-{i}")
        };
        issued.push(app.pat("acme", "alice", &name, &[]).await.1);
        app.advance(TimeDelta::seconds(1));
    }
    let newest_first: Vec<String> = issued.iter().rev().map(|t| t.id.clone()).collect();

    let mut seen = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = app
            .tokens(&app.root)
            .list_tokens(pb::ListTokensRequest {
                tenant_id: "acme".into(),
                actor_user_id: "alice".into(),
                page_size: 3,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.tokens.len() <= 3);
        seen.extend(page.tokens.into_iter().map(|t| t.id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(seen, newest_first);

    let filtered = list(
        &app,
        &app.root,
        pb::ListTokensRequest {
            tenant_id: "acme".into(),
            actor_user_id: "alice".into(),
            name_contains: "DEPLOY".into(),
            ..Default::default()
        },
    )
    .await;
    let names: Vec<String> = filtered.iter().map(|t| t.name.clone()).collect();
    assert_eq!(names, vec!["deploy-6", "deploy-4", "deploy-2", "deploy-0"]);

    // Wildcards in the filter are literals.
    let none = list(
        &app,
        &app.root,
        pb::ListTokensRequest {
            tenant_id: "acme".into(),
            actor_user_id: "alice".into(),
            name_contains: "%".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(none.is_empty());

    let only_keys = list(
        &app,
        &app.root,
        pb::ListTokensRequest {
            tenant_id: "acme".into(),
            actor_user_id: "alice".into(),
            kind: pb::TokenKind::ApiKey.into(),
            ..Default::default()
        },
    )
    .await;
    assert!(only_keys.is_empty());

    let result = app
        .tokens(&app.root)
        .list_tokens(pb::ListTokensRequest {
            tenant_id: "acme".into(),
            actor_user_id: "alice".into(),
            page_size: 500,
            ..Default::default()
        })
        .await;
    assert_status(result, Code::InvalidArgument, "page_size");
    let result = app
        .tokens(&app.root)
        .list_tokens(pb::ListTokensRequest {
            tenant_id: "acme".into(),
            actor_user_id: "alice".into(),
            page_token: "not-a-token".into(),
            ..Default::default()
        })
        .await;
    assert_status(result, Code::InvalidArgument, "page_token");
}

async fn revoked_tokens_are_listed_only_when_asked_for(app: TestApp) {
    acme(&app).await;
    let (_, keep) = app.pat("acme", "alice", "keep", &[]).await;
    let (_, gone) = app.pat("acme", "alice", "gone", &[]).await;
    app.tokens(&app.root)
        .revoke_token(pb::RevokeTokenRequest {
            tenant_id: "acme".into(),
            actor_user_id: "alice".into(),
            token_id: gone.id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap();
    let default = list(
        &app,
        &app.root,
        pb::ListTokensRequest {
            tenant_id: "acme".into(),
            actor_user_id: "alice".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        default.iter().map(|t| t.id.clone()).collect::<Vec<_>>(),
        vec![keep.id]
    );
    let all = list_as(&app, "acme", "alice").await;
    assert_eq!(all.len(), 2);
    assert!(
        all.iter()
            .any(|t| t.id == gone.id && t.status == pb::TokenStatus::Revoked as i32)
    );
}

async fn revoke_is_idempotent_and_keeps_the_record(app: TestApp) {
    acme(&app).await;
    let (_, info) = app.pat("acme", "alice", "laptop", &[]).await;
    let revoke = |reason: &str| pb::RevokeTokenRequest {
        tenant_id: "acme".into(),
        actor_user_id: "alice".into(),
        token_id: info.display_id.clone(), // display ids are accepted too
        reason: reason.into(),
    };
    let first = app
        .tokens(&app.root)
        .revoke_token(revoke("lost laptop"))
        .await
        .unwrap()
        .into_inner()
        .token
        .unwrap();
    assert_eq!(first.status, pb::TokenStatus::Revoked as i32);
    assert_eq!(first.revoked_by, "alice");
    assert_eq!(first.revoke_reason, "lost laptop");
    assert!(first.revoked_at.is_some());

    app.advance(TimeDelta::minutes(5));
    let again = app
        .tokens(&app.root)
        .revoke_token(revoke("again"))
        .await
        .unwrap()
        .into_inner()
        .token
        .unwrap();
    assert_eq!(again, first, "a second revocation changes nothing");

    let events = app.audit_of(&info.id).await;
    let revocations = events
        .iter()
        .filter(|e| e.action == "token.revoked")
        .count();
    assert_eq!(revocations, 1);
}

async fn delete_removes_the_record_and_the_audit_log_keeps_its_events(app: TestApp) {
    acme(&app).await;
    let (token, info) = app.pat("acme", "alice", "laptop", &[]).await;
    app.tokens(&token)
        .delete_token(pb::DeleteTokenRequest {
            token_id: info.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(list_as(&app, "acme", "alice").await.is_empty());
    assert!(!app.introspect(&token).await.active);
    let result = app
        .tokens(&app.root)
        .delete_token(pb::DeleteTokenRequest {
            tenant_id: "acme".into(),
            actor_user_id: "alice".into(),
            token_id: info.id.clone(),
        })
        .await;
    assert_status(result, Code::NotFound, "token");

    let events = app.audit_of(&info.id).await;
    let actions: Vec<&str> = events.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        vec!["token.deleted", "token.revoked", "token.issued"]
    );
}

async fn another_users_token_is_not_found_on_every_rpc_that_takes_an_id(app: TestApp) {
    acme(&app).await;
    let (alice_token, alice_info) = app.pat("acme", "alice", "laptop", &[]).await;
    let (bob_token, _) = app.pat("acme", "bob", "laptop", &[]).await;
    let nonexistent = "AAAAAAAAAAAA";
    for id in [alice_info.id.as_str(), nonexistent] {
        let revoke = app
            .tokens(&bob_token)
            .revoke_token(pb::RevokeTokenRequest {
                token_id: id.into(),
                ..Default::default()
            })
            .await;
        assert_status(revoke, Code::NotFound, &format!("token {id}"));
        let delete = app
            .tokens(&bob_token)
            .delete_token(pb::DeleteTokenRequest {
                token_id: id.into(),
                ..Default::default()
            })
            .await;
        assert_status(delete, Code::NotFound, &format!("token {id}"));
        let audit = app
            .audit(&bob_token)
            .list_audit_events(pb::ListAuditEventsRequest {
                token_id: id.into(),
                ..Default::default()
            })
            .await;
        assert_eq!(audit.unwrap_err().code(), Code::PermissionDenied);
    }
    let seen = list(
        &app,
        &bob_token,
        pb::ListTokensRequest {
            include_revoked: true,
            ..Default::default()
        },
    )
    .await;
    assert!(seen.iter().all(|t| t.owner_user_id == "bob"));
    assert!(
        app.introspect(&alice_token).await.active,
        "alice's token is untouched"
    );
}

async fn a_tokens_admin_lists_and_revokes_any_token_of_its_tenant(app: TestApp) {
    acme(&app).await;
    app.member("acme", "ada", "admin", &[]).await;
    app.member("acme", "kim", "keymaster", &[]).await;
    let (alice_token, alice_info) = app.pat("acme", "alice", "laptop", &[]).await;
    app.pat("acme", "bob", "laptop", &[]).await;
    let (_, key) = app.api_key("acme", "kim", "deploy", "viewer").await;

    let everything = list_as(&app, "acme", "ada").await;
    let ids: BTreeSet<String> = everything.iter().map(|t| t.id.clone()).collect();
    assert_eq!(ids.len(), 3);
    assert!(ids.contains(&key.id) && ids.contains(&alice_info.id));

    let only_alice = list(
        &app,
        &app.root,
        pb::ListTokensRequest {
            tenant_id: "acme".into(),
            actor_user_id: "ada".into(),
            owner_user_id: "alice".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(only_alice.len(), 1);

    app.tokens(&app.root)
        .revoke_token(pb::RevokeTokenRequest {
            tenant_id: "acme".into(),
            actor_user_id: "ada".into(),
            token_id: alice_info.id,
            reason: "incident 42".into(),
        })
        .await
        .unwrap();
    assert!(!app.introspect(&alice_token).await.active);

    // Deleting erases the record: an admin may revoke other users' tokens, not delete them.
    let (_, bobs) = app.pat("acme", "bob", "phone", &[]).await;
    let result = app
        .tokens(&app.root)
        .delete_token(pb::DeleteTokenRequest {
            tenant_id: "acme".into(),
            actor_user_id: "ada".into(),
            token_id: bobs.id.clone(),
        })
        .await;
    assert_status(result, Code::NotFound, &bobs.id);

    // The key manager sees the tenant's API keys but not people's tokens.
    let kims = list_as(&app, "acme", "kim").await;
    assert_eq!(
        kims.iter().map(|t| t.id.clone()).collect::<Vec<_>>(),
        vec![key.id]
    );
}

async fn tenant_policy_and_expiry_rules_are_enforced_at_issue(app: TestApp) {
    acme(&app).await;
    app.put_tenant(pb::Tenant {
        id: "acme".into(),
        policy: Some(pb::TokenPolicy {
            require_expiry: true,
            max_lifetime: Some(prost_types::Duration {
                seconds: 86_400 * 30,
                nanos: 0,
            }),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await;
    let never = app
        .tokens(&app.root)
        .issue_token(as_user("acme", "alice", issue("forever")))
        .await;
    assert_status(never, Code::FailedPrecondition, "policy require_expiry");

    let mut too_long = as_user("acme", "alice", issue("long"));
    too_long.ttl = Some(prost_types::Duration {
        seconds: 86_400 * 31,
        nanos: 0,
    });
    assert_status(
        app.tokens(&app.root).issue_token(too_long).await,
        Code::FailedPrecondition,
        "policy max_lifetime",
    );

    let mut past = as_user("acme", "alice", issue("past"));
    past.expires_at = Some(prost_types::Timestamp {
        seconds: 1_000_000_000,
        nanos: 0,
    });
    assert_status(
        app.tokens(&app.root).issue_token(past).await,
        Code::InvalidArgument,
        "expires_at",
    );

    let mut both = as_user("acme", "alice", issue("both"));
    both.ttl = Some(prost_types::Duration {
        seconds: 60,
        nanos: 0,
    });
    both.expires_at = Some(prost_types::Timestamp {
        seconds: 4_000_000_000,
        nanos: 0,
    });
    assert_status(
        app.tokens(&app.root).issue_token(both).await,
        Code::InvalidArgument,
        "ttl",
    );

    let mut fine = as_user("acme", "alice", issue("fine"));
    fine.ttl = Some(prost_types::Duration {
        seconds: 86_400 * 30,
        nanos: 0,
    });
    let info = app
        .tokens(&app.root)
        .issue_token(fine)
        .await
        .unwrap()
        .into_inner()
        .token
        .unwrap();
    assert!(info.expires_at.is_some());
    assert!(
        list_as(&app, "acme", "alice").await.len() == 1,
        "refused requests created nothing"
    );
}

async fn a_personal_token_stays_bound_to_its_tenant(app: TestApp) {
    acme(&app).await;
    app.tenant(
        "globex",
        &[("developer", &["entities:read", "tokend.tokens.issue"])],
    )
    .await;
    app.member("globex", "alice", "developer", &[]).await;
    let (acme_token, _) = app.pat("acme", "alice", "laptop", &[]).await;

    // Used in another tenant, it is refused; its answer names only its own tenant.
    let mut req = issue("elsewhere");
    req.tenant_id = "globex".into();
    assert_status(
        app.tokens(&acme_token).issue_token(req).await,
        Code::PermissionDenied,
        "tenant_id",
    );
    let result = app
        .tokens(&acme_token)
        .list_tokens(pb::ListTokensRequest {
            tenant_id: "globex".into(),
            ..Default::default()
        })
        .await;
    assert_status(result, Code::PermissionDenied, "bound to tenant acme");
    assert_eq!(app.introspect(&acme_token).await.tenant_id, "acme");

    // Removing alice from acme kills the acme token even though she is live in globex.
    app.remove_member("acme", "alice").await;
    assert!(!app.introspect(&acme_token).await.active);
}

async fn bad_issue_input_is_named_and_changes_nothing(app: TestApp) {
    acme(&app).await;
    let cases: Vec<(pb::IssueTokenRequest, &str)> = vec![
        (as_user("acme", "alice", issue("")), "name"),
        (as_user("acme", "alice", issue(&"n".repeat(101))), "name"),
        (as_user("acme", "alice", issue("bidi\u{202e}txt")), "name"),
        (as_user("acme", "alice", issue("tab\tname")), "name"),
        (as_user("acme", "al\nice", issue("x")), "actor_user_id"),
        (as_user("ac me", "alice", issue("x")), "tenant_id"),
        (
            pb::IssueTokenRequest {
                kind: 7,
                ..as_user("acme", "alice", issue("x"))
            },
            "kind",
        ),
        (
            pb::IssueTokenRequest {
                scopes: vec!["ok".into(), "not ok".into()],
                ..as_user("acme", "alice", issue("x"))
            },
            "scopes[1]",
        ),
    ];
    for (req, field) in cases {
        let result = app.tokens(&app.root).issue_token(req).await;
        assert_status(result, Code::InvalidArgument, field);
    }
    assert!(list_as(&app, "acme", "alice").await.is_empty());
}
