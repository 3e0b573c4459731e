//! The operator's client subcommands of the `tokend` binary: tokens, introspection, the
//! directory and the audit log, over gRPC against `--server`.
//!
//! The credential comes from `TOKEND_TOKEN` only: a flag would land in shell history and in
//! `ps`. A token to introspect is read from stdin for the same reason. Output is a table
//! with relative times ("5 days ago", "never"), or `--output json` for scripts.

use std::io::Read as _;
use std::time::SystemTime;

use clap::{Args, Subcommand, ValueEnum};
use prost_types::{Duration as PbDuration, Timestamp as PbTimestamp};
use serde::Serialize;
use tonic::transport::Channel;

use crate::client::Credential;
use crate::proto::v1 as pb;
use crate::proto::v1::audit_service_client::AuditServiceClient;
use crate::proto::v1::directory_service_client::DirectoryServiceClient;
use crate::proto::v1::token_service_client::TokenServiceClient;

/// Where and how a client subcommand talks to tokend.
#[derive(Debug, Args)]
pub struct Connection {
    /// tokend's gRPC address.
    #[arg(
        long,
        env = "TOKEND_SERVER",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub server: String,
    /// For an https:// server: the CA certificate(s), PEM, that signed its certificate
    /// (default: the public web roots).
    #[arg(long, env = "TOKEND_CA_FILE", value_name = "FILE", global = true)]
    pub ca_file: Option<std::path::PathBuf>,
    /// For a server that asks for client certificates (mTLS): this client's certificate,
    /// PEM; with --key-file.
    #[arg(
        long,
        env = "TOKEND_CLIENT_CERT_FILE",
        value_name = "FILE",
        global = true
    )]
    pub cert_file: Option<std::path::PathBuf>,
    /// The private key of --cert-file, PEM.
    #[arg(
        long,
        env = "TOKEND_CLIENT_KEY_FILE",
        value_name = "FILE",
        global = true
    )]
    pub key_file: Option<std::path::PathBuf>,
    /// Table for people, JSON for scripts.
    #[arg(long, value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,
}

/// How results are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns, relative times.
    Table,
    /// One JSON document, RFC 3339 times.
    Json,
}

/// Who the request acts for (`tokend.act_as` in the system tenant, or the credential itself).
#[derive(Debug, Args)]
pub struct Acting {
    /// The tenant; default: the credential's own.
    #[arg(long)]
    pub tenant: Option<String>,
    /// The user to act as; default: the credential itself.
    #[arg(long = "as", value_name = "USER")]
    pub actor: Option<String>,
}

/// `tokend token …`
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Issue a token; its secret is printed once.
    Issue {
        #[command(flatten)]
        acting: Acting,
        /// `pat` (personal access token) or `key` (API key).
        #[arg(long, value_parser = ["pat", "key"], default_value = "pat")]
        kind: String,
        /// Its name.
        #[arg(long)]
        name: String,
        /// Narrow it to these permissions (repeat).
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// The role of an API key.
        #[arg(long)]
        role: Option<String>,
        /// Lifetime, e.g. `30d`, `12h`.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<std::time::Duration>,
    },
    /// List tokens, newest first.
    List {
        #[command(flatten)]
        acting: Acting,
        /// Revoked tokens too.
        #[arg(long)]
        include_revoked: bool,
        /// Only this user's.
        #[arg(long)]
        owner: Option<String>,
        /// Only names containing this.
        #[arg(long)]
        name_contains: Option<String>,
    },
    /// Revoke a token at once.
    Revoke {
        #[command(flatten)]
        acting: Acting,
        /// The token's id or display id.
        token_id: String,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Delete a token's record (revoking it first).
    Delete {
        #[command(flatten)]
        acting: Acting,
        /// The token's id or display id.
        token_id: String,
    },
    /// Replace a token with a new one; the old one dies at once or after `--grace`.
    Rotate {
        #[command(flatten)]
        acting: Acting,
        /// The token's id or display id.
        token_id: String,
        /// How long the old token stays live, e.g. `1h`.
        #[arg(long, value_parser = humantime::parse_duration)]
        grace: Option<std::time::Duration>,
    },
}

/// `tokend directory …`
#[derive(Debug, Subcommand)]
pub enum DirectoryCommand {
    /// Tenants.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Roles of a tenant.
    #[command(subcommand)]
    Role(RoleCommand),
    /// Members of a tenant.
    #[command(subcommand)]
    Member(MemberCommand),
    /// Users.
    #[command(subcommand)]
    User(UserCommand),
}

/// `tokend directory tenant …`
#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Create a tenant, or change the settings given (the rest stay as they are).
    Put {
        /// Its id.
        id: String,
        /// Display name.
        #[arg(long)]
        name: Option<String>,
        /// `suspended` makes every token of the tenant inactive.
        #[arg(long, value_parser = ["active", "suspended"])]
        status: Option<String>,
        /// Policy: every token must expire (`true` / `false`).
        #[arg(long)]
        require_expiry: Option<bool>,
        /// Policy: the longest lifetime, e.g. `90d`.
        #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "clear_max_lifetime")]
        max_lifetime: Option<std::time::Duration>,
        /// Policy: no maximum lifetime.
        #[arg(long)]
        clear_max_lifetime: bool,
        /// Policy: the longest rotation grace, e.g. `1d` (`0s`: rotations revoke at once).
        #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "clear_max_rotation_grace")]
        max_rotation_grace: Option<std::time::Duration>,
        /// Policy: no tenant limit on rotation grace (30 days still apply).
        #[arg(long)]
        clear_max_rotation_grace: bool,
    },
    /// One tenant.
    Get {
        /// Its id.
        id: String,
    },
    /// Every tenant the credential may see.
    List,
}

/// `tokend directory role …`
#[derive(Debug, Subcommand)]
pub enum RoleCommand {
    /// Create or replace a role.
    Put {
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// The role's name.
        name: String,
        /// Its permissions (repeat).
        #[arg(long = "permission")]
        permissions: Vec<String>,
    },
    /// Delete a role.
    Delete {
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// The role's name.
        name: String,
    },
    /// The roles of a tenant.
    List {
        /// The tenant.
        #[arg(long)]
        tenant: String,
    },
}

/// `tokend directory member …`
#[derive(Debug, Subcommand)]
pub enum MemberCommand {
    /// Add or change a membership.
    Put {
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// The user.
        user: String,
        /// The member's role.
        #[arg(long)]
        role: String,
        /// Groups (repeat).
        #[arg(long = "group")]
        groups: Vec<String>,
    },
    /// Remove a membership.
    Remove {
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// The user.
        user: String,
    },
    /// The members of a tenant.
    List {
        /// The tenant.
        #[arg(long)]
        tenant: String,
    },
}

/// `tokend directory user …`
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Set a user's status everywhere.
    SetStatus {
        /// The user.
        user: String,
        /// The new status.
        #[arg(value_parser = ["active", "suspended", "removed"])]
        status: String,
    },
}

/// `tokend audit`
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Only this tenant's events (system callers see every tenant's otherwise).
    #[arg(long)]
    pub tenant: Option<String>,
    /// Only events about this token.
    #[arg(long)]
    pub token_id: Option<String>,
    /// How many, newest first.
    #[arg(long, default_value_t = 50)]
    pub limit: i32,
}

/// `tokend introspect`
#[derive(Debug, Args)]
pub struct IntrospectArgs {
    /// Permissions the answer's `allowed` checks (repeat).
    #[arg(long = "require")]
    pub required: Vec<String>,
}

/// A client subcommand, ready to run.
#[derive(Debug)]
pub enum ClientCommand {
    /// `token …`
    Token(TokenCommand),
    /// `introspect`
    Introspect(IntrospectArgs),
    /// `directory …`
    Directory(DirectoryCommand),
    /// `audit`
    Audit(AuditArgs),
}

/// A channel to `--server`, over TLS (and mTLS) for an https:// one.
async fn connect(connection: &Connection) -> anyhow::Result<Channel> {
    use anyhow::Context as _;
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let read = |flag: &str, path: &std::path::Path| {
        std::fs::read(path).with_context(|| format!("{flag}: cannot read {}", path.display()))
    };
    let mut endpoint = Channel::from_shared(connection.server.clone())
        .map_err(|_| anyhow::anyhow!("--server: not a URI like http://host:port"))?;
    let asks_for_tls = connection.ca_file.is_some()
        || connection.cert_file.is_some()
        || connection.key_file.is_some();
    if connection.server.starts_with("https://") {
        let mut tls = match &connection.ca_file {
            Some(path) => ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(read("--ca-file", path)?)),
            None => ClientTlsConfig::new().with_webpki_roots(),
        };
        match (&connection.cert_file, &connection.key_file) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(Identity::from_pem(
                    read("--cert-file", cert)?,
                    read("--key-file", key)?,
                ));
            }
            (None, None) => {}
            _ => anyhow::bail!("--cert-file and --key-file go together"),
        }
        endpoint = endpoint.tls_config(tls)?;
    } else if asks_for_tls {
        anyhow::bail!("--ca-file, --cert-file and --key-file need an https:// --server");
    }
    Ok(endpoint.connect().await?)
}

/// Runs a client subcommand; what it prints goes to stdout.
pub async fn run(connection: &Connection, command: ClientCommand) -> anyhow::Result<()> {
    let credential = std::env::var("TOKEND_TOKEN").map_err(|_| {
        anyhow::anyhow!("set TOKEND_TOKEN to your tokend token (it is never read from a flag)")
    })?;
    let with_credential = Credential::new(&credential)
        .ok_or_else(|| anyhow::anyhow!("TOKEND_TOKEN is not a token string"))?;
    let channel = connect(connection)
        .await
        .map_err(|err| anyhow::anyhow!("cannot reach tokend at {}: {err:#}", connection.server))?;
    let out = connection.output;
    let status = |err: tonic::Status| anyhow::anyhow!("{:?}: {}", err.code(), err.message());
    match command {
        ClientCommand::Token(command) => {
            let mut tokens = TokenServiceClient::with_interceptor(channel, with_credential);
            token(&mut tokens, command, out).await.map_err(status)
        }
        ClientCommand::Introspect(args) => {
            let mut tokens = TokenServiceClient::with_interceptor(channel, with_credential);
            // Typed at a terminal it would echo into the scrollback: refuse, and say how.
            if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                anyhow::bail!(
                    "pipe the token in, e.g. `tokend introspect < token.txt`; it is not read from a terminal"
                );
            }
            let mut token = String::new();
            std::io::stdin().read_to_string(&mut token)?;
            let answer = tokens
                .introspect(pb::IntrospectRequest {
                    token: token.trim().to_owned(),
                    required_permissions: args.required,
                    client_ip: String::new(),
                })
                .await
                .map_err(status)?
                .into_inner();
            print_introspection(&answer, out);
            Ok(())
        }
        ClientCommand::Directory(command) => {
            let mut directory = DirectoryServiceClient::with_interceptor(channel, with_credential);
            directory_command(&mut directory, command, out)
                .await
                .map_err(status)
        }
        ClientCommand::Audit(args) => {
            let mut audit = AuditServiceClient::with_interceptor(channel, with_credential);
            let events = audit
                .list_audit_events(pb::ListAuditEventsRequest {
                    tenant_id: args.tenant.unwrap_or_default(),
                    token_id: args.token_id.unwrap_or_default(),
                    page_size: args.limit,
                    page_token: String::new(),
                })
                .await
                .map_err(status)?
                .into_inner()
                .events;
            print_audit(&events, out);
            Ok(())
        }
    }
}

type Tokens<F> = TokenServiceClient<tonic::service::interceptor::InterceptedService<Channel, F>>;

async fn token<F>(
    tokens: &mut Tokens<F>,
    command: TokenCommand,
    out: Output,
) -> Result<(), tonic::Status>
where
    F: tonic::service::Interceptor,
{
    match command {
        TokenCommand::Issue {
            acting,
            kind,
            name,
            scopes,
            role,
            ttl,
        } => {
            let issued = tokens
                .issue_token(pb::IssueTokenRequest {
                    tenant_id: acting.tenant.unwrap_or_default(),
                    actor_user_id: acting.actor.unwrap_or_default(),
                    kind: if kind == "key" {
                        pb::TokenKind::ApiKey
                    } else {
                        pb::TokenKind::Personal
                    }
                    .into(),
                    name,
                    scopes,
                    role: role.unwrap_or_default(),
                    expires_at: None,
                    ttl: ttl.map(duration),
                })
                .await?
                .into_inner();
            let token = issued.token.unwrap_or_default();
            match out {
                Output::Json => print_json(&serde_json::json!({
                    "secret": issued.secret,
                    "token": TokenRow::from(&token),
                })),
                Output::Table => {
                    print_tokens(&[token], out);
                    println!();
                    println!(
                        "Store the secret now: it is shown only once. The last line is the secret alone."
                    );
                    println!("{}", issued.secret);
                }
            }
        }
        TokenCommand::List {
            acting,
            include_revoked,
            owner,
            name_contains,
        } => {
            let mut all = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = tokens
                    .list_tokens(pb::ListTokensRequest {
                        tenant_id: acting.tenant.clone().unwrap_or_default(),
                        actor_user_id: acting.actor.clone().unwrap_or_default(),
                        kind: 0,
                        name_contains: name_contains.clone().unwrap_or_default(),
                        include_revoked,
                        page_size: 200,
                        page_token,
                        owner_user_id: owner.clone().unwrap_or_default(),
                    })
                    .await?
                    .into_inner();
                all.extend(page.tokens);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            print_tokens(&all, out);
        }
        TokenCommand::Revoke {
            acting,
            token_id,
            reason,
        } => {
            let token = tokens
                .revoke_token(pb::RevokeTokenRequest {
                    tenant_id: acting.tenant.unwrap_or_default(),
                    actor_user_id: acting.actor.unwrap_or_default(),
                    token_id,
                    reason,
                })
                .await?
                .into_inner()
                .token
                .unwrap_or_default();
            print_tokens(&[token], out);
        }
        TokenCommand::Delete { acting, token_id } => {
            tokens
                .delete_token(pb::DeleteTokenRequest {
                    tenant_id: acting.tenant.unwrap_or_default(),
                    actor_user_id: acting.actor.unwrap_or_default(),
                    token_id: token_id.clone(),
                })
                .await?;
            match out {
                Output::Json => print_json(&serde_json::json!({ "deleted": token_id })),
                Output::Table => println!("deleted {token_id}"),
            }
        }
        TokenCommand::Rotate {
            acting,
            token_id,
            grace,
        } => {
            let rotated = tokens
                .rotate_token(pb::RotateTokenRequest {
                    tenant_id: acting.tenant.unwrap_or_default(),
                    actor_user_id: acting.actor.unwrap_or_default(),
                    token_id,
                    grace: grace.map(duration),
                })
                .await?
                .into_inner();
            let successor = rotated.token.unwrap_or_default();
            let previous = rotated.previous.unwrap_or_default();
            match out {
                Output::Json => print_json(&serde_json::json!({
                    "secret": rotated.secret,
                    "token": TokenRow::from(&successor),
                    "previous": TokenRow::from(&previous),
                })),
                Output::Table => {
                    print_tokens(&[successor, previous], out);
                    println!();
                    println!(
                        "Store the new secret now: it is shown only once. The last line is the secret alone."
                    );
                    println!("{}", rotated.secret);
                }
            }
        }
    }
    Ok(())
}

type Directory<F> =
    DirectoryServiceClient<tonic::service::interceptor::InterceptedService<Channel, F>>;

async fn directory_command<F>(
    directory: &mut Directory<F>,
    command: DirectoryCommand,
    out: Output,
) -> Result<(), tonic::Status>
where
    F: tonic::service::Interceptor,
{
    match command {
        DirectoryCommand::Tenant(TenantCommand::Put {
            id,
            name,
            status,
            require_expiry,
            max_lifetime,
            clear_max_lifetime,
            max_rotation_grace,
            clear_max_rotation_grace,
        }) => {
            // PutTenant replaces the whole tenant: start from what is there, so changing one
            // setting never reactivates a suspended tenant or drops its policy.
            let mut tenant = match directory
                .get_tenant(pb::GetTenantRequest {
                    tenant_id: id.clone(),
                })
                .await
            {
                Ok(found) => found.into_inner().tenant.unwrap_or_default(),
                Err(status) if status.code() == tonic::Code::NotFound => pb::Tenant {
                    id,
                    ..Default::default()
                },
                Err(status) => return Err(status),
            };
            let mut policy = tenant.policy.unwrap_or_default();
            if let Some(name) = name {
                tenant.name = name;
            }
            if let Some(status) = status {
                tenant.status = if status == "suspended" {
                    pb::TenantStatus::Suspended
                } else {
                    pb::TenantStatus::Active
                }
                .into();
            }
            if let Some(require) = require_expiry {
                policy.require_expiry = require;
            }
            if clear_max_lifetime {
                policy.max_lifetime = None;
            } else if let Some(max) = max_lifetime {
                policy.max_lifetime = Some(duration(max));
            }
            if clear_max_rotation_grace {
                policy.max_rotation_grace = None;
            } else if let Some(max) = max_rotation_grace {
                policy.max_rotation_grace = Some(duration(max));
            }
            tenant.policy = Some(policy);
            tenant.created_at = None;
            tenant.updated_at = None;
            let tenant = directory
                .put_tenant(pb::PutTenantRequest {
                    tenant: Some(tenant),
                })
                .await?
                .into_inner()
                .tenant
                .unwrap_or_default();
            print_tenants(&[tenant], out);
        }
        DirectoryCommand::Tenant(TenantCommand::Get { id }) => {
            let tenant = directory
                .get_tenant(pb::GetTenantRequest { tenant_id: id })
                .await?
                .into_inner()
                .tenant
                .unwrap_or_default();
            print_tenants(&[tenant], out);
        }
        DirectoryCommand::Tenant(TenantCommand::List) => {
            let tenants = directory
                .list_tenants(pb::ListTenantsRequest::default())
                .await?
                .into_inner()
                .tenants;
            print_tenants(&tenants, out);
        }
        DirectoryCommand::Role(RoleCommand::Put {
            tenant,
            name,
            permissions,
        }) => {
            let role = directory
                .put_role(pb::PutRoleRequest {
                    tenant_id: tenant,
                    name,
                    permissions,
                })
                .await?
                .into_inner()
                .role
                .unwrap_or_default();
            print_roles(&[role], out);
        }
        DirectoryCommand::Role(RoleCommand::Delete { tenant, name }) => {
            directory
                .delete_role(pb::DeleteRoleRequest {
                    tenant_id: tenant,
                    name: name.clone(),
                })
                .await?;
            done(out, "deleted", &name);
        }
        DirectoryCommand::Role(RoleCommand::List { tenant }) => {
            let roles = directory
                .list_roles(pb::ListRolesRequest { tenant_id: tenant })
                .await?
                .into_inner()
                .roles;
            print_roles(&roles, out);
        }
        DirectoryCommand::Member(MemberCommand::Put {
            tenant,
            user,
            role,
            groups,
        }) => {
            let member = directory
                .put_member(pb::PutMemberRequest {
                    tenant_id: tenant,
                    user_id: user,
                    role,
                    groups,
                })
                .await?
                .into_inner()
                .member
                .unwrap_or_default();
            print_members(&[member], out);
        }
        DirectoryCommand::Member(MemberCommand::Remove { tenant, user }) => {
            directory
                .remove_member(pb::RemoveMemberRequest {
                    tenant_id: tenant,
                    user_id: user.clone(),
                })
                .await?;
            done(out, "removed", &user);
        }
        DirectoryCommand::Member(MemberCommand::List { tenant }) => {
            let mut all = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = directory
                    .list_members(pb::ListMembersRequest {
                        tenant_id: tenant.clone(),
                        page_size: 200,
                        page_token,
                    })
                    .await?
                    .into_inner();
                all.extend(page.members);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            print_members(&all, out);
        }
        DirectoryCommand::User(UserCommand::SetStatus { user, status }) => {
            let status = match status.as_str() {
                "suspended" => pb::UserStatus::Suspended,
                "removed" => pb::UserStatus::Removed,
                _ => pb::UserStatus::Active,
            };
            directory
                .set_user_status(pb::SetUserStatusRequest {
                    user_id: user.clone(),
                    status: status.into(),
                })
                .await?;
            let word = match status {
                pb::UserStatus::Suspended => "suspended",
                pb::UserStatus::Removed => "removed",
                _ => "activated",
            };
            done(out, word, &user);
        }
    }
    Ok(())
}

fn done(out: Output, what: &str, name: &str) {
    match out {
        Output::Json => print_json(&serde_json::json!({ "done": what, "name": name })),
        Output::Table => println!("{what} {name}"),
    }
}

fn duration(d: std::time::Duration) -> PbDuration {
    PbDuration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or_default(),
    }
}

fn rfc3339(ts: &Option<PbTimestamp>) -> Option<String> {
    let ts = ts.as_ref()?;
    chrono::DateTime::from_timestamp(ts.seconds, u32::try_from(ts.nanos).unwrap_or_default())
        .map(|at| at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

/// "5 days ago", "in 3 hours", or `none`.
fn relative(ts: &Option<PbTimestamp>, none: &str) -> String {
    let Some(ts) = ts else {
        return none.to_owned();
    };
    #[allow(clippy::disallowed_methods)] // a display for people: the wall clock is the point
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let delta = ts.seconds - now;
    let span = delta.unsigned_abs();
    // Rounded, with moment.js's thresholds: 30 days less a second is "1 month", not "29 days".
    let round = |unit: u64| (span + unit / 2) / unit;
    let (n, unit) = match span {
        0..45 => return "just now".to_owned(),
        45..2700 => (round(60), "minute"),
        2700..79_200 => (round(3600), "hour"),
        79_200..2_246_400 => (round(86_400), "day"),
        2_246_400..27_648_000 => (round(2_592_000), "month"),
        _ => (round(31_536_000), "year"),
    };
    let plural = if n == 1 { "" } else { "s" };
    if delta < 0 {
        format!("{n} {unit}{plural} ago")
    } else {
        format!("in {n} {unit}{plural}")
    }
}

fn print_json(value: &impl Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| "null".to_owned())
    );
}

/// Prints rows as aligned columns under `headers`.
fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// A token as the CLI shows it.
#[derive(Serialize)]
struct TokenRow {
    id: String,
    display_id: String,
    tenant_id: String,
    kind: &'static str,
    name: String,
    owner_user_id: String,
    role: String,
    scopes: Vec<String>,
    status: &'static str,
    created_by: String,
    created_at: Option<String>,
    last_used_at: Option<String>,
    expires_at: Option<String>,
    revoked_at: Option<String>,
    revoke_reason: String,
}

impl From<&pb::TokenInfo> for TokenRow {
    fn from(t: &pb::TokenInfo) -> Self {
        Self {
            id: t.id.clone(),
            display_id: t.display_id.clone(),
            tenant_id: t.tenant_id.clone(),
            kind: if t.kind == pb::TokenKind::ApiKey as i32 {
                "key"
            } else {
                "pat"
            },
            name: t.name.clone(),
            owner_user_id: t.owner_user_id.clone(),
            role: t.role.clone(),
            scopes: t.scopes.clone(),
            status: match pb::TokenStatus::try_from(t.status) {
                Ok(pb::TokenStatus::Expired) => "expired",
                Ok(pb::TokenStatus::Revoked) => "revoked",
                _ => "active",
            },
            created_by: t.created_by.clone(),
            created_at: rfc3339(&t.created_at),
            last_used_at: rfc3339(&t.last_used_at),
            expires_at: rfc3339(&t.expires_at),
            revoked_at: rfc3339(&t.revoked_at),
            revoke_reason: t.revoke_reason.clone(),
        }
    }
}

fn print_tokens(tokens: &[pb::TokenInfo], out: Output) {
    if out == Output::Json {
        let rows: Vec<TokenRow> = tokens.iter().map(TokenRow::from).collect();
        return print_json(&rows);
    }
    let rows: Vec<Vec<String>> = tokens
        .iter()
        .map(|t| {
            let row = TokenRow::from(t);
            vec![
                row.id,
                row.name,
                row.kind.to_owned(),
                if row.owner_user_id.is_empty() {
                    format!("role {}", row.role)
                } else {
                    row.owner_user_id
                },
                row.status.to_owned(),
                relative(&t.created_at, "-"),
                relative(&t.last_used_at, "never"),
                ends(t),
            ]
        })
        .collect();
    print_table(
        &[
            "ID",
            "NAME",
            "KIND",
            "OWNER",
            "STATUS",
            "CREATED",
            "LAST USED",
            "EXPIRES",
        ],
        &rows,
    );
}

/// When a token stops working: its expiry, or the end of its rotation grace (a live token
/// with a revocation time has one), whichever comes first.
fn ends(t: &pb::TokenInfo) -> String {
    let grace = t
        .revoked_at
        .filter(|_| t.status == pb::TokenStatus::Active as i32);
    match (grace, t.expires_at) {
        (Some(end), Some(expiry)) if expiry.seconds < end.seconds => {
            relative(&Some(expiry), "never")
        }
        (Some(end), _) => format!("{} (rotated)", relative(&Some(end), "never")),
        (None, expiry) => relative(&expiry, "never"),
    }
}

fn print_introspection(answer: &pb::IntrospectResponse, out: Output) {
    if out == Output::Json {
        return print_json(&serde_json::json!({
            "active": answer.active,
            "allowed": answer.allowed,
            "token_id": answer.token_id,
            "tenant_id": answer.tenant_id,
            "subject": answer.subject,
            "permissions": answer.permissions,
            "groups": answer.groups,
            "expires_at": rfc3339(&answer.expires_at),
            "reason": pb::InactiveReason::try_from(answer.reason)
                .map(|r| r.as_str_name())
                .unwrap_or_default(),
        }));
    }
    if !answer.active {
        let reason = pb::InactiveReason::try_from(answer.reason)
            .ok()
            .filter(|r| *r != pb::InactiveReason::Unspecified)
            .map(|r| format!(" ({})", r.as_str_name()))
            .unwrap_or_default();
        println!("inactive{reason}");
        return;
    }
    print_table(
        &["FIELD", "VALUE"],
        &[
            vec!["active".into(), "yes".into()],
            vec![
                "allowed".into(),
                if answer.allowed { "yes" } else { "no" }.into(),
            ],
            vec!["token".into(), answer.display_id.clone()],
            vec!["tenant".into(), answer.tenant_id.clone()],
            vec!["subject".into(), answer.subject.clone()],
            vec!["permissions".into(), answer.permissions.join(" ")],
            vec!["groups".into(), answer.groups.join(" ")],
            vec!["expires".into(), relative(&answer.expires_at, "never")],
        ],
    );
}

fn print_tenants(tenants: &[pb::Tenant], out: Output) {
    let rows: Vec<serde_json::Value> = tenants
        .iter()
        .map(|t| {
            let policy = t.policy.unwrap_or_default();
            serde_json::json!({
                "id": t.id,
                "name": t.name,
                "status": if t.status == pb::TenantStatus::Suspended as i32 { "suspended" } else { "active" },
                "require_expiry": policy.require_expiry,
                "max_lifetime_secs": policy.max_lifetime.map(|d| d.seconds),
                "max_rotation_grace_secs": policy.max_rotation_grace.map(|d| d.seconds),
                "updated_at": rfc3339(&t.updated_at),
            })
        })
        .collect();
    if out == Output::Json {
        return print_json(&rows);
    }
    let secs = |v: &serde_json::Value| match v.as_i64() {
        None => "-".to_owned(),
        Some(s) if s % 86_400 == 0 => format!("{}d", s / 86_400),
        Some(s) if s % 3600 == 0 => format!("{}h", s / 3600),
        Some(s) => format!("{s}s"),
    };
    print_table(
        &[
            "ID",
            "NAME",
            "STATUS",
            "REQUIRE EXPIRY",
            "MAX LIFETIME",
            "MAX GRACE",
            "UPDATED",
        ],
        &tenants
            .iter()
            .zip(&rows)
            .map(|(t, r)| {
                vec![
                    t.id.clone(),
                    t.name.clone(),
                    r["status"].as_str().unwrap_or_default().to_owned(),
                    if r["require_expiry"] == true {
                        "yes"
                    } else {
                        "no"
                    }
                    .to_owned(),
                    secs(&r["max_lifetime_secs"]),
                    secs(&r["max_rotation_grace_secs"]),
                    relative(&t.updated_at, "-"),
                ]
            })
            .collect::<Vec<_>>(),
    );
}

fn print_roles(roles: &[pb::Role], out: Output) {
    if out == Output::Json {
        let rows: Vec<serde_json::Value> = roles
            .iter()
            .map(|r| serde_json::json!({ "tenant_id": r.tenant_id, "name": r.name, "permissions": r.permissions }))
            .collect();
        return print_json(&rows);
    }
    print_table(
        &["TENANT", "ROLE", "PERMISSIONS"],
        &roles
            .iter()
            .map(|r| vec![r.tenant_id.clone(), r.name.clone(), r.permissions.join(" ")])
            .collect::<Vec<_>>(),
    );
}

fn print_members(members: &[pb::Member], out: Output) {
    if out == Output::Json {
        let rows: Vec<serde_json::Value> = members
            .iter()
            .map(|m| serde_json::json!({ "tenant_id": m.tenant_id, "user_id": m.user_id, "role": m.role, "groups": m.groups }))
            .collect();
        return print_json(&rows);
    }
    print_table(
        &["TENANT", "USER", "ROLE", "GROUPS"],
        &members
            .iter()
            .map(|m| {
                vec![
                    m.tenant_id.clone(),
                    m.user_id.clone(),
                    m.role.clone(),
                    m.groups.join(" "),
                ]
            })
            .collect::<Vec<_>>(),
    );
}

fn print_audit(events: &[pb::AuditEvent], out: Output) {
    if out == Output::Json {
        let rows: Vec<serde_json::Value> = events
            .iter()
            .map(|e| {
                serde_json::json!({
                    "id": e.id,
                    "at": rfc3339(&e.at),
                    "tenant_id": e.tenant_id,
                    "actor": e.actor,
                    "caller": e.caller,
                    "action": e.action,
                    "token_id": e.token_id,
                    "detail": e.detail,
                })
            })
            .collect();
        return print_json(&rows);
    }
    print_table(
        &["WHEN", "TENANT", "ACTION", "TOKEN", "ACTOR", "CALLER"],
        &events
            .iter()
            .map(|e| {
                vec![
                    relative(&e.at, "-"),
                    e.tenant_id.clone(),
                    e.action.clone(),
                    e.token_id.clone(),
                    e.actor.clone(),
                    e.caller.clone(),
                ]
            })
            .collect::<Vec<_>>(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_people_say_them() {
        #[allow(clippy::disallowed_methods)]
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let at = |offset: i64| {
            Some(PbTimestamp {
                seconds: now + offset,
                nanos: 0,
            })
        };
        assert_eq!(relative(&None, "never"), "never");
        assert_eq!(relative(&at(-5 * 86_400 - 10), "never"), "5 days ago");
        assert_eq!(relative(&at(3 * 3600 + 30), "never"), "in 3 hours");
        assert_eq!(relative(&at(-61), "never"), "1 minute ago");
        assert_eq!(relative(&at(0), "never"), "just now");
        assert_eq!(relative(&at(30 * 86_400 - 1), "never"), "in 1 month");
    }
}
