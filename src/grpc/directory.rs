//! `tokend.v1.DirectoryService`.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::proto::v1 as pb;
use crate::proto::v1::directory_service_server::DirectoryService;
use crate::service::{Page, Tokend};

use super::auth::caller;
use super::convert;

/// The gRPC face of the directory.
#[derive(Debug, Clone)]
pub struct DirectoryApi {
    core: Arc<Tokend>,
}

impl DirectoryApi {
    /// Serves `core`.
    pub fn new(core: Arc<Tokend>) -> Self {
        Self { core }
    }
}

#[tonic::async_trait]
impl DirectoryService for DirectoryApi {
    async fn put_tenant(
        &self,
        request: Request<pb::PutTenantRequest>,
    ) -> Result<Response<pb::PutTenantResponse>, Status> {
        let caller = caller()?;
        let (id, name, status, policy) = convert::tenant_request(request.into_inner())?;
        let tenant = self
            .core
            .put_tenant(&caller, id, name, status, policy)
            .await?;
        Ok(Response::new(pb::PutTenantResponse {
            tenant: Some(convert::tenant(&tenant)),
        }))
    }

    async fn get_tenant(
        &self,
        request: Request<pb::GetTenantRequest>,
    ) -> Result<Response<pb::GetTenantResponse>, Status> {
        let caller = caller()?;
        let id = convert::tenant_id(&request.get_ref().tenant_id)?;
        let tenant = self.core.get_tenant(&caller, &id).await?;
        Ok(Response::new(pb::GetTenantResponse {
            tenant: Some(convert::tenant(&tenant)),
        }))
    }

    async fn list_tenants(
        &self,
        request: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsResponse>, Status> {
        let caller = caller()?;
        let req = request.into_inner();
        let page = Page::parse(req.page_size, req.page_token)?;
        let (tenants, next_page_token) = self.core.list_tenants(&caller, page).await?;
        Ok(Response::new(pb::ListTenantsResponse {
            tenants: tenants.iter().map(convert::tenant).collect(),
            next_page_token,
        }))
    }

    async fn put_role(
        &self,
        request: Request<pb::PutRoleRequest>,
    ) -> Result<Response<pb::PutRoleResponse>, Status> {
        let caller = caller()?;
        let req = convert::put_role_request(request.into_inner())?;
        let role = self.core.put_role(&caller, req).await?;
        Ok(Response::new(pb::PutRoleResponse {
            role: Some(convert::role(&role)),
        }))
    }

    async fn delete_role(
        &self,
        request: Request<pb::DeleteRoleRequest>,
    ) -> Result<Response<pb::DeleteRoleResponse>, Status> {
        let caller = caller()?;
        let req = request.get_ref();
        let tenant = convert::tenant_id(&req.tenant_id)?;
        let name = convert::role_name("name", &req.name)?;
        self.core.delete_role(&caller, &tenant, &name).await?;
        Ok(Response::new(pb::DeleteRoleResponse {}))
    }

    async fn list_roles(
        &self,
        request: Request<pb::ListRolesRequest>,
    ) -> Result<Response<pb::ListRolesResponse>, Status> {
        let caller = caller()?;
        let tenant = convert::tenant_id(&request.get_ref().tenant_id)?;
        let roles = self.core.list_roles(&caller, &tenant).await?;
        Ok(Response::new(pb::ListRolesResponse {
            roles: roles.iter().map(convert::role).collect(),
        }))
    }

    async fn put_member(
        &self,
        request: Request<pb::PutMemberRequest>,
    ) -> Result<Response<pb::PutMemberResponse>, Status> {
        let caller = caller()?;
        let req = convert::put_member_request(request.into_inner())?;
        let member = self.core.put_member(&caller, req).await?;
        Ok(Response::new(pb::PutMemberResponse {
            member: Some(convert::member(&member)),
        }))
    }

    async fn put_members(
        &self,
        request: Request<pb::PutMembersRequest>,
    ) -> Result<Response<pb::PutMembersResponse>, Status> {
        let caller = caller()?;
        let (tenant, entries) = convert::put_members_request(request.into_inner())?;
        let members = self.core.put_members(&caller, &tenant, entries).await?;
        Ok(Response::new(pb::PutMembersResponse {
            members: members.iter().map(convert::member).collect(),
        }))
    }

    async fn remove_member(
        &self,
        request: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::RemoveMemberResponse>, Status> {
        let caller = caller()?;
        let req = request.get_ref();
        let tenant = convert::tenant_id(&req.tenant_id)?;
        let user = convert::user_id("user_id", &req.user_id)?;
        self.core.remove_member(&caller, &tenant, &user).await?;
        Ok(Response::new(pb::RemoveMemberResponse {}))
    }

    async fn list_members(
        &self,
        request: Request<pb::ListMembersRequest>,
    ) -> Result<Response<pb::ListMembersResponse>, Status> {
        let caller = caller()?;
        let req = request.into_inner();
        let tenant = convert::tenant_id(&req.tenant_id)?;
        let page = Page::parse(req.page_size, req.page_token)?;
        let (members, next_page_token) = self.core.list_members(&caller, &tenant, page).await?;
        Ok(Response::new(pb::ListMembersResponse {
            members: members.iter().map(convert::member).collect(),
            next_page_token,
        }))
    }

    async fn set_user_status(
        &self,
        request: Request<pb::SetUserStatusRequest>,
    ) -> Result<Response<pb::SetUserStatusResponse>, Status> {
        let caller = caller()?;
        let req = request.get_ref();
        let user = convert::user_id("user_id", &req.user_id)?;
        let status = convert::user_status(req.status)?;
        let user = self.core.set_user_status(&caller, user, status).await?;
        Ok(Response::new(pb::SetUserStatusResponse {
            user: Some(convert::user(&user)),
        }))
    }
}
