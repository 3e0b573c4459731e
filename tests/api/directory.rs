//! The directory (SPEC §4) and tenant isolation.

use tonic::Code;

use tokend::proto::v1 as pb;

use crate::helpers::{TestApp, assert_status, strings};

crate::both_backends!(
    tenants_roles_and_members_round_trip,
    a_tenant_caller_reaches_only_its_own_tenant,
    a_role_held_by_members_cannot_be_deleted,
    tenant_admins_cannot_grant_tokend_permissions_they_lack,
    system_wide_changes_need_the_system_tenant,
    bad_directory_input_is_named_and_changes_nothing,
    members_are_paged_by_user_id,
    a_sync_puts_many_members_at_once_all_or_none,
);

async fn tenants_roles_and_members_round_trip(app: TestApp) {
    let stored = app
        .put_tenant(pb::Tenant {
            id: "acme".into(),
            name: "Acme Corp".into(),
            policy: Some(pb::TokenPolicy {
                require_expiry: true,
                max_lifetime: Some(prost_types::Duration {
                    seconds: 3600,
                    nanos: 0,
                }),
                max_rotation_grace: Some(prost_types::Duration {
                    seconds: 600,
                    nanos: 0,
                }),
            }),
            ..Default::default()
        })
        .await;
    assert_eq!(stored.status, pb::TenantStatus::Active as i32);
    let mut dir = app.directory(&app.root);
    let got = dir
        .get_tenant(pb::GetTenantRequest {
            tenant_id: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .tenant
        .unwrap();
    assert_eq!(got.name, "Acme Corp");
    let policy = got.policy.unwrap();
    assert_eq!(policy.max_lifetime.unwrap().seconds, 3600);
    assert_eq!(policy.max_rotation_grace.unwrap().seconds, 600);
    let tenants = dir
        .list_tenants(pb::ListTenantsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tenants;
    let ids: Vec<&str> = tenants.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids, vec!["acme", "system"]);

    app.role("acme", "dev", &["b:write", "a:read", "a:read"])
        .await;
    let roles = dir
        .list_roles(pb::ListRolesRequest {
            tenant_id: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .roles;
    assert_eq!(roles.len(), 1);
    assert_eq!(roles[0].permissions, strings(&["a:read", "b:write"]));

    app.member("acme", "alice", "dev", &["z", "a", "a"]).await;
    let members = dir
        .list_members(pb::ListMembersRequest {
            tenant_id: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .members;
    assert_eq!(members.len(), 1);
    assert_eq!(members[0].groups, strings(&["a", "z"]));

    let result = dir
        .put_member(pb::PutMemberRequest {
            tenant_id: "acme".into(),
            user_id: "bob".into(),
            role: "ghost".into(),
            groups: vec![],
        })
        .await;
    assert_status(result, Code::NotFound, "role ghost");
    let result = dir
        .put_role(pb::PutRoleRequest {
            tenant_id: "nowhere".into(),
            name: "x".into(),
            permissions: vec![],
        })
        .await;
    assert_status(result, Code::NotFound, "tenant nowhere");
    let result = dir
        .remove_member(pb::RemoveMemberRequest {
            tenant_id: "acme".into(),
            user_id: "nobody".into(),
        })
        .await;
    assert_status(result, Code::NotFound, "nobody");
}

async fn a_tenant_caller_reaches_only_its_own_tenant(app: TestApp) {
    app.tenant(
        "acme",
        &[(
            "admin",
            &[
                "tokend.directory.read",
                "tokend.directory.write",
                "tokend.audit.read",
            ],
        )],
    )
    .await;
    app.tenant("globex", &[("admin", &["entities:read"])]).await;
    app.member("acme", "ada", "admin", &[]).await;
    let (ada, _) = app.pat("acme", "ada", "admin", &[]).await;
    let mut dir = app.directory(&ada);

    // Another tenant answers exactly as a tenant that does not exist.
    for tenant in ["globex", "does-not-exist"] {
        let msg = format!("tenant {tenant}");
        assert_status(
            dir.get_tenant(pb::GetTenantRequest {
                tenant_id: tenant.into(),
            })
            .await,
            Code::NotFound,
            &msg,
        );
        assert_status(
            dir.list_roles(pb::ListRolesRequest {
                tenant_id: tenant.into(),
            })
            .await,
            Code::NotFound,
            &msg,
        );
        assert_status(
            dir.list_members(pb::ListMembersRequest {
                tenant_id: tenant.into(),
                ..Default::default()
            })
            .await,
            Code::NotFound,
            &msg,
        );
        assert_status(
            dir.put_role(pb::PutRoleRequest {
                tenant_id: tenant.into(),
                name: "x".into(),
                permissions: vec![],
            })
            .await,
            Code::NotFound,
            &msg,
        );
        assert_status(
            dir.put_member(pb::PutMemberRequest {
                tenant_id: tenant.into(),
                user_id: "u".into(),
                role: "admin".into(),
                groups: vec![],
            })
            .await,
            Code::NotFound,
            &msg,
        );
        assert_status(
            app.audit(&ada)
                .list_audit_events(pb::ListAuditEventsRequest {
                    tenant_id: tenant.into(),
                    ..Default::default()
                })
                .await,
            Code::NotFound,
            &msg,
        );
    }
    let tenants = dir
        .list_tenants(pb::ListTenantsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tenants;
    assert_eq!(
        tenants.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(),
        vec!["acme"]
    );
    // Its own tenant works.
    dir.put_role(pb::PutRoleRequest {
        tenant_id: "acme".into(),
        name: "viewer".into(),
        permissions: vec!["a:read".into()],
    })
    .await
    .unwrap();
}

async fn a_role_held_by_members_cannot_be_deleted(app: TestApp) {
    app.tenant("acme", &[("dev", &["a:read"])]).await;
    app.member("acme", "alice", "dev", &[]).await;
    let mut dir = app.directory(&app.root);
    let result = dir
        .delete_role(pb::DeleteRoleRequest {
            tenant_id: "acme".into(),
            name: "dev".into(),
        })
        .await;
    assert_status(result, Code::FailedPrecondition, "held by 1 member");
    app.remove_member("acme", "alice").await;
    dir.delete_role(pb::DeleteRoleRequest {
        tenant_id: "acme".into(),
        name: "dev".into(),
    })
    .await
    .unwrap();
    let result = dir
        .delete_role(pb::DeleteRoleRequest {
            tenant_id: "acme".into(),
            name: "dev".into(),
        })
        .await;
    assert_status(result, Code::NotFound, "role dev");
}

async fn tenant_admins_cannot_grant_tokend_permissions_they_lack(app: TestApp) {
    app.tenant(
        "acme",
        &[
            (
                "diradmin",
                &["tokend.directory.write", "tokend.directory.read"],
            ),
            ("superuser", &["tokend.tokens.admin"]),
        ],
    )
    .await;
    app.member("acme", "dan", "diradmin", &[]).await;
    let (dan, _) = app.pat("acme", "dan", "admin", &[]).await;
    let mut dir = app.directory(&dan);
    let result = dir
        .put_role(pb::PutRoleRequest {
            tenant_id: "acme".into(),
            name: "escalate".into(),
            permissions: vec!["tokend.tokens.admin".into(), "entities:read".into()],
        })
        .await;
    assert_status(result, Code::PermissionDenied, "tokend.tokens.admin");
    let result = dir
        .put_member(pb::PutMemberRequest {
            tenant_id: "acme".into(),
            user_id: "dan".into(),
            role: "superuser".into(),
            groups: vec![],
        })
        .await;
    assert_status(result, Code::PermissionDenied, "tokend.tokens.admin");
    // Application permissions and its own tokend permissions are fine to grant.
    dir.put_role(pb::PutRoleRequest {
        tenant_id: "acme".into(),
        name: "reader".into(),
        permissions: vec!["entities:read".into(), "tokend.directory.read".into()],
    })
    .await
    .unwrap();
}

async fn system_wide_changes_need_the_system_tenant(app: TestApp) {
    app.tenant(
        "acme",
        &[(
            "diradmin",
            &["tokend.directory.write", "tokend.directory.read"],
        )],
    )
    .await;
    app.member("acme", "dan", "diradmin", &[]).await;
    let (dan, _) = app.pat("acme", "dan", "admin", &[]).await;
    let mut dir = app.directory(&dan);
    let result = dir
        .put_tenant(pb::PutTenantRequest {
            tenant: Some(pb::Tenant {
                id: "acme".into(),
                ..Default::default()
            }),
        })
        .await;
    assert_status(result, Code::PermissionDenied, "system tenant");
    let result = dir
        .set_user_status(pb::SetUserStatusRequest {
            user_id: "dan".into(),
            status: pb::UserStatus::Active.into(),
        })
        .await;
    assert_status(result, Code::PermissionDenied, "system tenant");
    let result = app
        .directory(&app.root)
        .put_tenant(pb::PutTenantRequest {
            tenant: Some(pb::Tenant {
                id: "system".into(),
                status: pb::TenantStatus::Suspended.into(),
                ..Default::default()
            }),
        })
        .await;
    assert_status(
        result,
        Code::FailedPrecondition,
        "system tenant cannot be suspended",
    );
}

async fn bad_directory_input_is_named_and_changes_nothing(app: TestApp) {
    let mut dir = app.directory(&app.root);
    let tenant = |id: &str| pb::PutTenantRequest {
        tenant: Some(pb::Tenant {
            id: id.into(),
            ..Default::default()
        }),
    };
    assert_status(
        dir.put_tenant(tenant("")).await,
        Code::InvalidArgument,
        "tenant.id",
    );
    assert_status(
        dir.put_tenant(tenant("a b")).await,
        Code::InvalidArgument,
        "tenant.id",
    );
    assert_status(
        dir.put_tenant(tenant(&"t".repeat(129))).await,
        Code::InvalidArgument,
        "tenant.id",
    );
    assert_status(
        dir.put_tenant(pb::PutTenantRequest { tenant: None }).await,
        Code::InvalidArgument,
        "tenant",
    );
    let bad_policy = pb::PutTenantRequest {
        tenant: Some(pb::Tenant {
            id: "acme".into(),
            policy: Some(pb::TokenPolicy {
                require_expiry: false,
                max_lifetime: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 5,
                }),
                max_rotation_grace: None,
            }),
            ..Default::default()
        }),
    };
    assert_status(
        dir.put_tenant(bad_policy).await,
        Code::InvalidArgument,
        "tenant.policy.max_lifetime",
    );
    let long_grace = pb::PutTenantRequest {
        tenant: Some(pb::Tenant {
            id: "acme".into(),
            policy: Some(pb::TokenPolicy {
                max_rotation_grace: Some(prost_types::Duration {
                    seconds: 86_400 * 31,
                    nanos: 0,
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    };
    assert_status(
        dir.put_tenant(long_grace).await,
        Code::InvalidArgument,
        "tenant.policy.max_rotation_grace: must be between 0 and 30 days",
    );
    let tenants = dir
        .list_tenants(pb::ListTenantsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tenants;
    assert_eq!(tenants.len(), 1, "only the system tenant exists");

    app.tenant("acme", &[]).await;
    let role = |name: &str, perms: &[&str]| pb::PutRoleRequest {
        tenant_id: "acme".into(),
        name: name.into(),
        permissions: perms.iter().map(|p| p.to_string()).collect(),
    };
    assert_status(
        dir.put_role(role("", &[])).await,
        Code::InvalidArgument,
        "name",
    );
    assert_status(
        dir.put_role(role("a/b", &[])).await,
        Code::InvalidArgument,
        "name",
    );
    assert_status(
        dir.put_role(role("ok", &["fine", "DROP TABLE;"])).await,
        Code::InvalidArgument,
        "permissions[1]",
    );
    let many: Vec<String> = (0..257).map(|i| format!("p{i}")).collect();
    let result = dir
        .put_role(pb::PutRoleRequest {
            tenant_id: "acme".into(),
            name: "big".into(),
            permissions: many,
        })
        .await;
    assert_status(result, Code::InvalidArgument, "permissions: at most 256");
    let member = |user: &str, groups: &[&str]| pb::PutMemberRequest {
        tenant_id: "acme".into(),
        user_id: user.into(),
        role: "r".into(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
    };
    assert_status(
        dir.put_member(member("", &[])).await,
        Code::InvalidArgument,
        "user_id",
    );
    assert_status(
        dir.put_member(member("u", &["ok", "bad\u{0007}"])).await,
        Code::InvalidArgument,
        "groups[1]",
    );
    assert_status(
        dir.set_user_status(pb::SetUserStatusRequest {
            user_id: "u".into(),
            status: 0,
        })
        .await,
        Code::InvalidArgument,
        "status",
    );
    assert_status(
        dir.list_tenants(pb::ListTenantsRequest {
            page_size: -1,
            page_token: String::new(),
        })
        .await,
        Code::InvalidArgument,
        "page_size",
    );
    let roles = dir
        .list_roles(pb::ListRolesRequest {
            tenant_id: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .roles;
    assert!(roles.is_empty());

    // An oversized message is refused before it is parsed.
    let huge = pb::PutRoleRequest {
        tenant_id: "acme".into(),
        name: "x".into(),
        permissions: vec!["a".repeat(70_000)],
    };
    assert_eq!(
        dir.put_role(huge).await.unwrap_err().code(),
        Code::OutOfRange
    );
}

async fn members_are_paged_by_user_id(app: TestApp) {
    app.tenant("acme", &[("dev", &[])]).await;
    for user in ["carol", "alice", "erin", "bob", "dave"] {
        app.member("acme", user, "dev", &[]).await;
    }
    let mut dir = app.directory(&app.root);
    let mut seen = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = dir
            .list_members(pb::ListMembersRequest {
                tenant_id: "acme".into(),
                page_size: 2,
                page_token,
            })
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.members.into_iter().map(|m| m.user_id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(seen, vec!["alice", "bob", "carol", "dave", "erin"]);
}

mod system_tenant {
    use super::*;

    crate::both_backends!(a_system_directory_writer_cannot_raise_itself_or_lock_out_the_root_key,);

    async fn a_system_directory_writer_cannot_raise_itself_or_lock_out_the_root_key(app: TestApp) {
        app.role(
            "system",
            "sync",
            &[
                "tokend.directory.write",
                "tokend.directory.read",
                "tokend.api_keys.manage",
            ],
        )
        .await;
        let sync = app
            .tokens(&app.root)
            .issue_token(pb::IssueTokenRequest {
                kind: pb::TokenKind::ApiKey.into(),
                name: "sync".into(),
                role: "sync".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .secret;
        let mut dir = app.directory(&sync);
        let raise = pb::PutRoleRequest {
            tenant_id: "system".into(),
            name: "sync".into(),
            permissions: vec!["tokend.directory.write".into(), "tokend.act_as".into()],
        };
        assert_status(
            dir.put_role(raise).await,
            Code::PermissionDenied,
            "tokend.act_as",
        );
        let shrink_admin = pb::PutRoleRequest {
            tenant_id: "system".into(),
            name: "admin".into(),
            permissions: vec![],
        };
        assert_status(
            dir.put_role(shrink_admin).await,
            Code::PermissionDenied,
            "tokend.act_as",
        );
        let delete_admin = pb::DeleteRoleRequest {
            tenant_id: "system".into(),
            name: "admin".into(),
        };
        assert_status(
            dir.delete_role(delete_admin.clone()).await,
            Code::FailedPrecondition,
            "root key",
        );
        assert_status(
            app.directory(&app.root).delete_role(delete_admin).await,
            Code::FailedPrecondition,
            "root key",
        );
        // Other tenants are the system operators' to run.
        dir.put_tenant(pb::PutTenantRequest {
            tenant: Some(pb::Tenant {
                id: "acme".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
        dir.put_role(pb::PutRoleRequest {
            tenant_id: "acme".into(),
            name: "admin".into(),
            permissions: vec!["tokend.tokens.admin".into()],
        })
        .await
        .unwrap();
        assert!(
            app.introspect(&app.root).await.active,
            "the root key still works"
        );
    }
}

async fn a_sync_puts_many_members_at_once_all_or_none(app: TestApp) {
    app.tenant("acme", &[("dev", &["a:read"]), ("ops", &["a:write"])])
        .await;
    let entry = |user: &str, role: &str| pb::MemberEntry {
        user_id: user.into(),
        role: role.into(),
        groups: vec!["g".into()],
    };
    let mut dir = app.directory(&app.root);
    let stored = dir
        .put_members(pb::PutMembersRequest {
            tenant_id: "acme".into(),
            members: (0..120)
                .map(|i| {
                    entry(
                        &format!("user{i:03}"),
                        if i % 2 == 0 { "dev" } else { "ops" },
                    )
                })
                .collect(),
        })
        .await
        .unwrap()
        .into_inner()
        .members;
    assert_eq!(stored.len(), 120);
    let (token, _) = app.pat("acme", "user007", "laptop", &[]).await;
    assert_eq!(
        app.introspect(&token).await.permissions,
        strings(&["a:write"])
    );

    // One bad entry: nothing of the batch is stored, and the entry is named.
    let result = dir
        .put_members(pb::PutMembersRequest {
            tenant_id: "acme".into(),
            members: vec![entry("user007", "dev"), entry("newcomer", "ghost")],
        })
        .await;
    assert_status(result, Code::NotFound, "members[1].role");
    let result = dir
        .put_members(pb::PutMembersRequest {
            tenant_id: "acme".into(),
            members: vec![entry("ok", "dev"), entry("", "dev")],
        })
        .await;
    assert_status(result, Code::InvalidArgument, "members[1].user_id");
    assert_eq!(
        app.introspect(&token).await.permissions,
        strings(&["a:write"]),
        "user007 unchanged"
    );
    let result = dir
        .put_members(pb::PutMembersRequest {
            tenant_id: "acme".into(),
            members: vec![],
        })
        .await;
    assert_status(result, Code::InvalidArgument, "members");
}
