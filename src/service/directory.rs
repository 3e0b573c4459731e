//! The directory the identity system pushes in: tenants, roles, memberships, user status.
//!
//! Isolation rule: a caller outside the system tenant only ever sees its own tenant. Any
//! other tenant id is answered NOT_FOUND, exactly as a tenant that does not exist.

use std::collections::{BTreeMap, BTreeSet};

use crate::domain::model::{
    Member, PermissionSet, Role, Tenant, TenantStatus, TokenPolicy, User, UserStatus,
};
use crate::domain::names::{BuiltinPermission, Group, RoleName, TenantId, UserId};
use crate::domain::rules;
use crate::domain::{Error, Result};

use super::Tokend;
use super::caller::Caller;
use super::paging::{self, Page};

/// A validated PutRole request.
#[derive(Clone, Debug)]
pub struct PutRole {
    /// The tenant.
    pub tenant_id: TenantId,
    /// The role's name.
    pub name: RoleName,
    /// Its permissions.
    pub permissions: PermissionSet,
}

/// A validated PutMember request.
#[derive(Clone, Debug)]
pub struct PutMember {
    /// The tenant.
    pub tenant_id: TenantId,
    /// The user.
    pub user_id: UserId,
    /// The role to hold.
    pub role: RoleName,
    /// Visibility groups.
    pub groups: BTreeSet<Group>,
}

const TENANTS_LIST: &str = "tenants";
/// Memberships one PutMembers call may carry.
const MAX_BATCH: usize = 500;
const MEMBERS_LIST: &str = "members";

impl Tokend {
    /// Refuses unless the caller holds `permission` and may reach `tenant`.
    fn directory_access(
        &self,
        caller: &Caller,
        tenant: &TenantId,
        permission: BuiltinPermission,
    ) -> Result<()> {
        if !caller.is_system() && tenant != caller.tenant_id() {
            return Err(Error::NotFound(format!("tenant {tenant}")));
        }
        caller.require(permission)
    }

    /// Refuses a system-wide change from outside the system tenant.
    fn system_only(&self, caller: &Caller, what: &str) -> Result<()> {
        if !caller.is_system() {
            return Err(Error::PermissionDenied(format!(
                "{what} needs {} in the system tenant",
                rules::DIRECTORY_WRITE
            )));
        }
        caller.require(rules::DIRECTORY_WRITE)
    }

    /// Nobody can hand out tokend's own permissions that they do not hold: that would be a
    /// way to grant oneself administration. The system tenant's operators are trusted with
    /// other tenants, but not to raise themselves inside the system tenant.
    fn check_reserved_grants(
        &self,
        caller: &Caller,
        tenant: &TenantId,
        field: &str,
        granted: &PermissionSet,
    ) -> Result<()> {
        if caller.is_system() && !tenant.is_system() {
            return Ok(());
        }
        let reserved: PermissionSet = granted
            .iter()
            .filter(|p| p.is_reserved())
            .cloned()
            .collect();
        rules::require_subset(field, &reserved, caller.permissions(), "the caller")
    }

    /// Taking a member out of a role strips its `tokend.*` rights: only someone who holds
    /// them may do that.
    async fn check_demotion(
        &self,
        caller: &Caller,
        tenant: &TenantId,
        user: &UserId,
    ) -> Result<()> {
        let Some(member) = self.store.get_member(tenant, user).await? else {
            return Ok(());
        };
        if let Some(role) = self.store.get_role(tenant, &member.role).await? {
            self.check_reserved_grants(caller, tenant, "user_id", &role.permissions)?;
        }
        Ok(())
    }

    /// Creates or replaces a tenant.
    pub async fn put_tenant(
        &self,
        caller: &Caller,
        id: TenantId,
        name: String,
        status: TenantStatus,
        policy: TokenPolicy,
    ) -> Result<Tenant> {
        self.system_only(caller, "putting a tenant")?;
        if id.is_system() && status != TenantStatus::Active {
            return Err(Error::FailedPrecondition(
                "tenant.status: the system tenant cannot be suspended".to_owned(),
            ));
        }
        let now = self.clock.now();
        let tenant = Tenant {
            id,
            name,
            status,
            policy,
            created_at: now,
            updated_at: now,
        };
        let mut audit = self.audit(&tenant.id, caller.subject().label(), caller, "tenant.put");
        audit.detail.extend(BTreeMap::from([
            (
                "status".to_owned(),
                format!("{:?}", tenant.status).to_lowercase(),
            ),
            (
                "require_expiry".to_owned(),
                tenant.policy.require_expiry.to_string(),
            ),
            (
                "max_lifetime_secs".to_owned(),
                tenant
                    .policy
                    .max_lifetime
                    .map_or_else(String::new, |d| d.num_seconds().to_string()),
            ),
            (
                "max_rotation_grace_secs".to_owned(),
                tenant
                    .policy
                    .max_rotation_grace
                    .map_or_else(String::new, |d| d.num_seconds().to_string()),
            ),
        ]));
        self.store.put_tenant(&tenant, &audit).await
    }

    /// One tenant.
    pub async fn get_tenant(&self, caller: &Caller, id: &TenantId) -> Result<Tenant> {
        self.directory_access(caller, id, rules::DIRECTORY_READ)?;
        self.store
            .get_tenant(id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("tenant {id}")))
    }

    /// The tenants the caller may read.
    pub async fn list_tenants(&self, caller: &Caller, page: Page) -> Result<(Vec<Tenant>, String)> {
        caller.require(rules::DIRECTORY_READ)?;
        let after = page
            .cursor(TENANTS_LIST)?
            .map(|c| TenantId::parse("page_token", &c))
            .transpose()?;
        let only = (!caller.is_system()).then_some(caller.tenant_id());
        let rows = self
            .store
            .list_tenants(only, after.as_ref(), page.size + 1)
            .await?;
        let (tenants, more) = paging::split_page(rows, page.size);
        let next = match (more, tenants.last()) {
            (true, Some(last)) => paging::next_token(TENANTS_LIST, last.id.as_str()),
            _ => String::new(),
        };
        Ok((tenants, next))
    }

    /// Creates or replaces a role.
    pub async fn put_role(&self, caller: &Caller, req: PutRole) -> Result<Role> {
        self.directory_access(caller, &req.tenant_id, rules::DIRECTORY_WRITE)?;
        self.check_reserved_grants(caller, &req.tenant_id, "permissions", &req.permissions)?;
        // Shrinking a role takes rights from its holders: as sensitive as granting them.
        if let Some(existing) = self.store.get_role(&req.tenant_id, &req.name).await? {
            self.check_reserved_grants(caller, &req.tenant_id, "name", &existing.permissions)?;
        }
        let role = Role {
            tenant_id: req.tenant_id,
            name: req.name,
            permissions: req.permissions,
            updated_at: self.clock.now(),
        };
        let mut audit = self.audit(
            &role.tenant_id,
            caller.subject().label(),
            caller,
            "role.put",
        );
        let list: Vec<&str> = role.permissions.iter().map(|p| p.as_str()).collect();
        audit.detail.extend(BTreeMap::from([
            ("role".to_owned(), role.name.to_string()),
            ("permissions".to_owned(), list.join(" ")),
        ]));
        self.store.put_role(&role, &audit).await?;
        Ok(role)
    }

    /// Deletes a role no member holds.
    pub async fn delete_role(
        &self,
        caller: &Caller,
        tenant: &TenantId,
        name: &RoleName,
    ) -> Result<()> {
        self.directory_access(caller, tenant, rules::DIRECTORY_WRITE)?;
        if tenant.is_system() && name.as_str() == super::bootstrap::ADMIN_ROLE {
            return Err(Error::FailedPrecondition(
                "name: the system tenant's admin role backs the root key and cannot be deleted"
                    .to_owned(),
            ));
        }
        if let Some(existing) = self.store.get_role(tenant, name).await? {
            self.check_reserved_grants(caller, tenant, "name", &existing.permissions)?;
        }
        let mut audit = self.audit(tenant, caller.subject().label(), caller, "role.deleted");
        audit
            .detail
            .extend(BTreeMap::from([("role".to_owned(), name.to_string())]));
        if !self.store.delete_role(tenant, name, &audit).await? {
            return Err(Error::NotFound(format!("role {name} in tenant {tenant}")));
        }
        Ok(())
    }

    /// A tenant's roles.
    pub async fn list_roles(&self, caller: &Caller, tenant: &TenantId) -> Result<Vec<Role>> {
        self.directory_access(caller, tenant, rules::DIRECTORY_READ)?;
        if self.store.get_tenant(tenant).await?.is_none() {
            return Err(Error::NotFound(format!("tenant {tenant}")));
        }
        self.store.list_roles(tenant).await
    }

    /// Creates or replaces a membership.
    pub async fn put_member(&self, caller: &Caller, req: PutMember) -> Result<Member> {
        let tenant = req.tenant_id.clone();
        let mut stored = self.put_members(caller, &tenant, vec![req]).await?;
        stored
            .pop()
            .ok_or_else(|| Error::internal("a one-member batch stored nothing"))
    }

    /// Creates or replaces many memberships of one tenant, all or none: what a directory sync
    /// pushes. Bad entries are named by their index.
    pub async fn put_members(
        &self,
        caller: &Caller,
        tenant: &TenantId,
        batch: Vec<PutMember>,
    ) -> Result<Vec<Member>> {
        self.directory_access(caller, tenant, rules::DIRECTORY_WRITE)?;
        if batch.len() > MAX_BATCH {
            return Err(Error::invalid(
                "members",
                format!("at most {MAX_BATCH} entries"),
            ));
        }
        let single = batch.len() == 1;
        let field = |i: usize, name: &str| {
            if single {
                name.to_owned()
            } else {
                format!("members[{i}].{name}")
            }
        };
        let now = self.clock.now();
        let mut writes = Vec::with_capacity(batch.len());
        for (i, req) in batch.into_iter().enumerate() {
            let Some(role) = self.store.get_role(tenant, &req.role).await? else {
                return Err(Error::NotFound(format!(
                    "{}: role {} in tenant {tenant}",
                    field(i, "role"),
                    req.role
                )));
            };
            self.check_reserved_grants(caller, tenant, &field(i, "role"), &role.permissions)?;
            self.check_demotion(caller, tenant, &req.user_id).await?;
            let member = Member {
                tenant_id: req.tenant_id,
                user_id: req.user_id,
                role: req.role,
                groups: req.groups,
                updated_at: now,
            };
            let mut audit = self.audit(tenant, caller.subject().label(), caller, "member.put");
            let groups: Vec<&str> = member.groups.iter().map(|g| g.as_str()).collect();
            audit.detail.extend(BTreeMap::from([
                ("user".to_owned(), member.user_id.to_string()),
                ("role".to_owned(), member.role.to_string()),
                ("groups".to_owned(), groups.join(",")),
            ]));
            writes.push((member, audit));
        }
        self.store.put_members(&writes).await?;
        Ok(writes.into_iter().map(|(member, _)| member).collect())
    }

    /// Removes a membership.
    pub async fn remove_member(
        &self,
        caller: &Caller,
        tenant: &TenantId,
        user: &UserId,
    ) -> Result<()> {
        self.directory_access(caller, tenant, rules::DIRECTORY_WRITE)?;
        self.check_demotion(caller, tenant, user).await?;
        let mut audit = self.audit(tenant, caller.subject().label(), caller, "member.removed");
        audit
            .detail
            .extend(BTreeMap::from([("user".to_owned(), user.to_string())]));
        if !self.store.remove_member(tenant, user, &audit).await? {
            return Err(Error::NotFound(format!("member {user} of tenant {tenant}")));
        }
        Ok(())
    }

    /// A page of a tenant's members.
    pub async fn list_members(
        &self,
        caller: &Caller,
        tenant: &TenantId,
        page: Page,
    ) -> Result<(Vec<Member>, String)> {
        self.directory_access(caller, tenant, rules::DIRECTORY_READ)?;
        let after = page
            .cursor(MEMBERS_LIST)?
            .map(|c| UserId::parse("page_token", &c))
            .transpose()?;
        let rows = self
            .store
            .list_members(tenant, after.as_ref(), page.size + 1)
            .await?;
        let (members, more) = paging::split_page(rows, page.size);
        let next = match (more, members.last()) {
            (true, Some(last)) => paging::next_token(MEMBERS_LIST, last.user_id.as_str()),
            _ => String::new(),
        };
        Ok((members, next))
    }

    /// Sets a user's global status.
    pub async fn set_user_status(
        &self,
        caller: &Caller,
        user: UserId,
        status: UserStatus,
    ) -> Result<User> {
        self.system_only(caller, "setting a user's status")?;
        let user = User {
            id: user,
            status,
            updated_at: self.clock.now(),
        };
        let mut audit = self.audit(
            &TenantId::system(),
            caller.subject().label(),
            caller,
            "user.status_set",
        );
        audit.detail.extend(BTreeMap::from([
            ("user".to_owned(), user.id.to_string()),
            ("status".to_owned(), format!("{status:?}").to_lowercase()),
        ]));
        self.store.put_user(&user, &audit).await
    }
}
