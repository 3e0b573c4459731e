//! Where a token was used from: the last few distinct (client IP, calling service) pairs,
//! shown in ListTokens.

use chrono::TimeDelta;

use tokend::clock::Clock as _;
use tokend::domain::model::TokenUse;
use tokend::domain::names::TenantId;
use tokend::domain::ports::Store as _;
use tokend::proto::v1 as pb;

use crate::helpers::TestApp;

crate::both_backends!(
    listing_shows_where_a_token_was_used_from_and_through_which_service,
    a_service_of_another_tenant_stays_anonymous,
    only_the_latest_five_pairs_are_kept_and_a_pair_moves_forward,
    a_deleted_tokens_uses_go_with_it,
    the_flushs_bulk_writes_take_effect_and_leave_no_prepared_statement_behind,
);

async fn acme(app: &TestApp) {
    app.tenant("acme", &[("developer", &["entities:read"])])
        .await;
    app.member("acme", "alice", "developer", &[]).await;
    // A service's key, in the system tenant, that may only introspect.
    app.role("system", "gateway", &["tokend.introspect"]).await;
}

async fn introspect_from(app: &TestApp, service: &str, token: &str, ip: &str) -> bool {
    app.tokens(service)
        .introspect(pb::IntrospectRequest {
            token: token.into(),
            client_ip: ip.into(),
            ..Default::default()
        })
        .await
        .expect("introspect")
        .into_inner()
        .active
}

/// alice's token `id` as ListTokens shows it, once `wanted` uses are on record (they are
/// written in batches, every 50 ms in tests).
async fn listed_with_uses(app: &TestApp, id: &str, wanted: usize) -> pb::TokenInfo {
    for _ in 0..100 {
        let listed = app
            .list_as("acme", "alice")
            .await
            .into_iter()
            .find(|t| t.id == id)
            .expect("listed");
        if listed.recent_uses.len() >= wanted {
            return listed;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("{wanted} uses of {id} were not recorded");
}

fn pairs(info: &pb::TokenInfo) -> Vec<(String, String, String)> {
    info.recent_uses
        .iter()
        .map(|u| {
            (
                u.client_ip.clone(),
                u.service.clone(),
                u.service_name.clone(),
            )
        })
        .collect()
}

async fn listing_shows_where_a_token_was_used_from_and_through_which_service(app: TestApp) {
    acme(&app).await;
    let (pat, info) = app.pat("acme", "alice", "laptop", &[]).await;
    let (edge, edge_info) = app.system_key("edge-gateway", "gateway").await;
    let (billing, billing_info) = app.system_key("billing", "gateway").await;
    assert!(introspect_from(&app, &edge, &pat, "203.0.113.7").await);
    // The same pair again within the minute: one record.
    assert!(introspect_from(&app, &edge, &pat, "203.0.113.7").await);
    assert!(introspect_from(&app, &billing, &pat, "2001:db8::1").await);
    // An IPv4 address written as IPv6 is the IPv4 address.
    assert!(introspect_from(&app, &billing, &pat, "::ffff:198.51.100.9").await);
    // No client IP reported.
    assert!(introspect_from(&app, &edge, &pat, "").await);
    // The token as the credential of a call to tokend itself: the connection's peer.
    app.tokens(&pat)
        .list_tokens(pb::ListTokensRequest::default())
        .await
        .expect("alice lists her tokens");
    // An inactive answer records nothing.
    let (dead, dead_info) = app.pat("acme", "alice", "old", &[]).await;
    app.revoke_as("acme", "alice", &dead_info.id).await;
    assert!(!introspect_from(&app, &edge, &dead, "198.51.100.1").await);

    let listed = listed_with_uses(&app, &info.id, 5).await;
    let mut got = pairs(&listed);
    got.sort();
    assert_eq!(
        got,
        vec![
            (
                String::new(),
                edge_info.display_id.clone(),
                "edge-gateway".into()
            ),
            ("127.0.0.1".into(), String::new(), String::new()),
            (
                "198.51.100.9".into(),
                billing_info.display_id.clone(),
                "billing".into()
            ),
            (
                "2001:db8::1".into(),
                billing_info.display_id.clone(),
                "billing".into()
            ),
            (
                "203.0.113.7".into(),
                edge_info.display_id.clone(),
                "edge-gateway".into()
            ),
        ]
    );
    let now = app.clock.now().timestamp();
    for used in &listed.recent_uses {
        assert!(used.last_used_at.as_ref().unwrap().seconds <= now);
    }
    // Bad input names the field and changes nothing.
    let bad = app
        .tokens(&edge)
        .introspect(pb::IntrospectRequest {
            token: pat.clone(),
            client_ip: "not-an-ip".into(),
            ..Default::default()
        })
        .await;
    crate::helpers::assert_status(bad, tonic::Code::InvalidArgument, "client_ip");
    let mut revoked = app
        .tokens(&app.root)
        .list_tokens(pb::ListTokensRequest {
            tenant_id: "acme".into(),
            actor_user_id: "alice".into(),
            include_revoked: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .tokens;
    revoked.retain(|t| t.id == dead_info.id);
    assert!(revoked[0].recent_uses.is_empty());
}

async fn a_service_of_another_tenant_stays_anonymous(app: TestApp) {
    acme(&app).await;
    app.tenant(
        "globex",
        &[
            ("checker", &["tokend.introspect"]),
            (
                "keymaster",
                &["tokend.introspect", "tokend.api_keys.manage"],
            ),
        ],
    )
    .await;
    app.member("globex", "gus", "keymaster", &[]).await;
    let (theirs, _) = app
        .api_key("globex", "gus", "secret-project", "checker")
        .await;
    let (pat, info) = app.pat("acme", "alice", "laptop", &[]).await;
    assert!(introspect_from(&app, &theirs, &pat, "203.0.113.9").await);
    let listed = listed_with_uses(&app, &info.id, 1).await;
    assert_eq!(
        pairs(&listed),
        vec![("203.0.113.9".into(), "another-tenant".into(), String::new())]
    );
}

async fn only_the_latest_five_pairs_are_kept_and_a_pair_moves_forward(app: TestApp) {
    acme(&app).await;
    let (pat, info) = app.pat("acme", "alice", "laptop", &[]).await;
    let (edge, _) = app.system_key("edge-gateway", "gateway").await;
    for i in 1..=7 {
        assert!(introspect_from(&app, &edge, &pat, &format!("192.0.2.{i}")).await);
        // The order on record is the clock's: a minute between uses.
        listed_with_uses(&app, &info.id, i.min(5)).await;
        app.advance(TimeDelta::minutes(1));
    }
    // The oldest pair is used again, a minute later: it moves to the front.
    assert!(introspect_from(&app, &edge, &pat, "192.0.2.3").await);
    let mut listed = listed_with_uses(&app, &info.id, 5).await;
    for _ in 0..100 {
        if listed.recent_uses[0].client_ip == "192.0.2.3" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        listed = listed_with_uses(&app, &info.id, 5).await;
    }
    let ips: Vec<&str> = listed
        .recent_uses
        .iter()
        .map(|u| u.client_ip.as_str())
        .collect();
    assert_eq!(
        ips,
        vec![
            "192.0.2.3",
            "192.0.2.7",
            "192.0.2.6",
            "192.0.2.5",
            "192.0.2.4"
        ]
    );
}

async fn a_deleted_tokens_uses_go_with_it(app: TestApp) {
    acme(&app).await;
    let (pat, info) = app.pat("acme", "alice", "laptop", &[]).await;
    let (edge, _) = app.system_key("edge-gateway", "gateway").await;
    assert!(introspect_from(&app, &edge, &pat, "203.0.113.7").await);
    listed_with_uses(&app, &info.id, 1).await;
    app.tokens(&app.root)
        .delete_token(pb::DeleteTokenRequest {
            tenant_id: "acme".into(),
            actor_user_id: "alice".into(),
            token_id: info.id.clone(),
        })
        .await
        .expect("delete");
    assert!(
        app.store
            .token_uses(std::slice::from_ref(&info.id))
            .await
            .unwrap()
            .is_empty()
    );
    // A use noted before the delete and written after it (a batch in flight, another
    // replica's flush) leaves nothing behind either.
    app.store
        .record_token_uses(&[TokenUse {
            token_id: info.id.clone(),
            client_ip: None,
            service: String::new(),
            service_name: String::new(),
            at: app.clock.now(),
        }])
        .await
        .unwrap();
    assert!(
        app.store
            .token_uses(std::slice::from_ref(&info.id))
            .await
            .unwrap()
            .is_empty()
    );
}

/// The flush's bulk statements (last use, use sites, their prune) change text with their
/// batch's size. None may stay in the connection's prepared-statement cache, which would
/// otherwise keep a compiled statement of up to a thousand rows per distinct size, on every
/// connection, for the life of the process.
async fn the_flushs_bulk_writes_take_effect_and_leave_no_prepared_statement_behind(app: TestApp) {
    acme(&app).await;
    let (_, info) = app.pat("acme", "alice", "laptop", &[]).await;
    let store = tokend::storage::SeaStore::connect(
        &app.database_url,
        &tokend::storage::DatabaseOptions {
            max_connections: 1,
            ..Default::default()
        },
        tokend::domain::token_format::TokenFormat::new("tkd").unwrap(),
    )
    .await
    .unwrap();
    // A cached statement first, so that the connection has run what a store runs.
    let tenant = TenantId::from_trusted("acme".into());
    store.get_token(&tenant, &info.id).await.unwrap();
    let before = store.cached_statements().await.unwrap();

    let at = app.clock.now();
    for size in 1..=12 {
        let mut used: Vec<(String, tokend::domain::model::Timestamp)> =
            (1..size).map(|i| (format!("nosuchtoken{i}"), at)).collect();
        used.push((info.id.clone(), at));
        store.touch_last_used(&used).await.unwrap();
        let uses: Vec<TokenUse> = (0..size)
            .map(|i| TokenUse {
                token_id: info.id.clone(),
                client_ip: Some(format!("10.0.0.{i}").parse().unwrap()),
                service: format!("svc{size}"),
                service_name: String::new(),
                at: at + TimeDelta::milliseconds(i64::from(size * 100 + i)),
            })
            .collect();
        store.record_token_uses(&uses).await.unwrap();
    }

    let cached = store.cached_statements().await.unwrap();
    assert!(
        cached <= before,
        "36 bulk statements of 12 sizes left {cached} prepared statements cached (from {before})"
    );
    // They did what they are for: the last use is on record, and the five newest sites.
    let token = store.get_token(&tenant, &info.id).await.unwrap().unwrap();
    assert_eq!(
        token.last_used_at.map(|t| t.timestamp_millis()),
        Some(at.timestamp_millis())
    );
    let kept = store
        .token_uses(std::slice::from_ref(&info.id))
        .await
        .unwrap();
    assert_eq!(kept.len(), 5, "{kept:?}");
    assert!(kept.iter().all(|u| u.service == "svc12"), "{kept:?}");
    // And the prune ran: listing shows five whatever is stored, so count the rows.
    let stored = app
        .count(&format!(
            "SELECT COUNT(*) FROM token_uses WHERE token_id = '{}'",
            info.id
        ))
        .await;
    assert_eq!(stored, 5);
    store.close().await.unwrap();
}
