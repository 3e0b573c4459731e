//! The audit log.

use tonic::Code;

use tokend::proto::v1 as pb;

use crate::helpers::{TestApp, assert_status};

crate::both_backends!(
    every_change_is_audited_with_actor_and_caller,
    a_tenant_reads_only_its_own_audit_log,
    audit_events_are_paged_newest_first,
);

async fn every_change_is_audited_with_actor_and_caller(app: TestApp) {
    app.tenant("acme", &[("dev", &["entities:read"])]).await;
    app.member("acme", "alice", "dev", &[]).await;
    let (token, info) = app.pat("acme", "alice", "laptop", &[]).await;
    app.tokens(&token)
        .revoke_token(pb::RevokeTokenRequest {
            token_id: info.id.clone(),
            reason: "done".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let events = app
        .audit(&app.root)
        .list_audit_events(pb::ListAuditEventsRequest {
            tenant_id: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let actions: Vec<&str> = events.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        vec![
            "token.revoked",
            "token.issued",
            "member.put",
            "role.put",
            "tenant.put"
        ]
    );
    let root_display = app.root[..20].to_owned();

    let revoked = &events[0];
    assert_eq!(revoked.actor, "alice");
    assert_eq!(
        revoked.caller, info.display_id,
        "alice revoked it with the token itself"
    );
    assert_eq!(revoked.token_id, info.id);
    assert_eq!(
        revoked.detail.get("reason").map(String::as_str),
        Some("done")
    );

    let issued = &events[1];
    assert_eq!(issued.actor, "alice", "issued on alice's behalf");
    assert_eq!(issued.caller, root_display, "by the root key");
    assert_eq!(
        issued.detail.get("name").map(String::as_str),
        Some("laptop")
    );
    let everything = format!("{events:?}");
    assert!(
        !everything.contains(&token[21..]),
        "no secret in the audit log"
    );
}

async fn a_tenant_reads_only_its_own_audit_log(app: TestApp) {
    app.tenant("acme", &[("auditor", &["tokend.audit.read"])])
        .await;
    app.tenant("globex", &[("dev", &[])]).await;
    app.member("acme", "aud", "auditor", &[]).await;
    app.member("globex", "gina", "dev", &[]).await;
    app.pat("globex", "gina", "laptop", &[]).await;
    let (auditor, _) = app.pat("acme", "aud", "audit", &[]).await;
    let events = app
        .audit(&auditor)
        .list_audit_events(pb::ListAuditEventsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(!events.is_empty());
    assert!(events.iter().all(|e| e.tenant_id == "acme"));
    let result = app
        .audit(&auditor)
        .list_audit_events(pb::ListAuditEventsRequest {
            tenant_id: "globex".into(),
            ..Default::default()
        })
        .await;
    assert_status(result, Code::NotFound, "tenant globex");
    // The system tenant reads every tenant's.
    let all = app
        .audit(&app.root)
        .list_audit_events(pb::ListAuditEventsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(all.iter().any(|e| e.tenant_id == "globex"));
}

async fn audit_events_are_paged_newest_first(app: TestApp) {
    app.tenant("acme", &[]).await;
    for i in 0..5 {
        app.role("acme", &format!("r{i}"), &[]).await;
    }
    let mut ids = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = app
            .audit(&app.root)
            .list_audit_events(pb::ListAuditEventsRequest {
                tenant_id: "acme".into(),
                page_size: 2,
                page_token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        ids.extend(page.events.iter().map(|e| e.id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(ids.len(), 6);
    assert!(ids.windows(2).all(|w| w[0] > w[1]));
}
