//! TLS and mutual TLS on a real `tokend serve`, with certificates the test makes: a
//! plaintext client or one that does not trust the server is refused; under mTLS a client
//! without a certificate, or with one from another CA, is refused, and the subject of an
//! accepted certificate is in the audit events of its calls.

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, SanType,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use tokend::proto::v1 as pb;
use tokend::proto::v1::token_service_client::TokenServiceClient;

use crate::cli::{
    KillOnDrop, acme_audit, alices_token, alices_tokens, authed, binary_database, free_port,
    root_key, seed_acme, tokend, wait_until_serving,
};
use crate::helpers::TestApp;

crate::both_backends!(
    tls_serves_trusting_clients_and_refuses_plaintext,
    mtls_refuses_clients_without_a_trusted_certificate_and_audits_the_subject,
    optional_client_certificates_are_recorded_when_given
);

/// A CA with a server certificate for `localhost` and a client certificate.
struct Pki {
    ca: String,
    server: (String, String),
    client: (String, String),
}

fn make_pki(client_name: &str) -> Pki {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "tokend test CA");
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |names: Vec<String>, cn: &str, usage: ExtendedKeyUsagePurpose| {
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        if usage == ExtendedKeyUsagePurpose::ClientAuth {
            // A workload identity, as SPIFFE issues them.
            let uri = format!("spiffe://acme.test/{cn}");
            params
                .subject_alt_names
                .push(SanType::URI(uri.as_str().try_into().unwrap()));
        }
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    Pki {
        server: leaf(
            vec!["localhost".into()],
            "tokend",
            ExtendedKeyUsagePurpose::ServerAuth,
        ),
        client: leaf(vec![], client_name, ExtendedKeyUsagePurpose::ClientAuth),
        ca: ca.pem(),
    }
}

/// `tokend serve` with TLS from `pki` (and mTLS when `mutual`); health stays plaintext on
/// its own port, as kubelet probes need.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ClientCerts {
    NotAsked,
    Required,
    Optional,
}

async fn serve_tls(
    dir: &std::path::Path,
    url: &str,
    pki: &Pki,
    clients: ClientCerts,
) -> (KillOnDrop, u16) {
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let (port, health_port) = (free_port(), free_port());
    let mut command = tokend(dir, url);
    command
        .arg("serve")
        .env("TOKEND_LISTEN", format!("127.0.0.1:{port}"))
        .env("TOKEND_HEALTH_LISTEN", format!("127.0.0.1:{health_port}"))
        .env("TOKEND_TLS__CERT_FILE", write("server.pem", &pki.server.0))
        .env("TOKEND_TLS__KEY_FILE", write("server.key", &pki.server.1))
        .env("TOKEND_LAST_USED_FLUSH_MS", "50")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    if clients != ClientCerts::NotAsked {
        command.env(
            "TOKEND_TLS__CLIENT_CA_FILE",
            write("clients-ca.pem", &pki.ca),
        );
    }
    if clients == ClientCerts::Optional {
        command.env("TOKEND_TLS__CLIENT_AUTH_OPTIONAL", "true");
    }
    let process = KillOnDrop(command.spawn().unwrap());
    wait_until_serving(health_port).await;
    (process, port)
}

/// A client trusting `ca`, presenting `identity` if given.
async fn connect(
    port: u16,
    ca: &str,
    identity: Option<&(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

async fn introspect_root(channel: Channel, root: &str) -> Result<bool, tonic::Status> {
    let request = authed(
        pb::IntrospectRequest {
            token: root.into(),
            ..Default::default()
        },
        root,
    );
    Ok(TokenServiceClient::new(channel)
        .introspect(request)
        .await?
        .into_inner()
        .active)
}

/// Whether a call over a fresh connection with this setup is answered.
async fn answered(port: u16, ca: &str, identity: Option<&(String, String)>, root: &str) -> bool {
    match connect(port, ca, identity).await {
        Ok(channel) => introspect_root(channel, root).await.is_ok(),
        Err(_) => false,
    }
}

async fn tls_serves_trusting_clients_and_refuses_plaintext(app: TestApp) {
    // A key that is not a key stops startup, naming the setting, before anything listens.
    {
        let Some(database) = binary_database(app.backend).await else {
            return;
        };
        let (dir, url) = (database.dir.path(), database.url.as_str());
        std::fs::write(dir.join("c.pem"), "not a certificate").unwrap();
        let refused = tokend(dir, url)
            .arg("serve")
            .env("TOKEND_LISTEN", format!("127.0.0.1:{}", free_port()))
            .env("TOKEND_TLS__CERT_FILE", dir.join("c.pem"))
            .env("TOKEND_TLS__KEY_FILE", dir.join("c.pem"))
            .output()
            .unwrap();
        assert!(!refused.status.success());
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(stderr.contains("tls:"), "{stderr}");
    }
    let Some(database) = binary_database(app.backend).await else {
        return;
    };
    let (dir, url) = (database.dir.path(), database.url.as_str());
    let root = root_key(&tokend(dir, url).arg("bootstrap").output().unwrap());
    let pki = make_pki("unused");
    let (_process, port) = serve_tls(dir, url, &pki, ClientCerts::NotAsked).await;

    assert!(answered(port, &pki.ca, None, &root).await);
    let channel = connect(port, &pki.ca, None).await.unwrap();
    assert!(introspect_root(channel, &root).await.unwrap());

    // Plaintext HTTP/2 to the TLS port gets no answer.
    let plaintext = Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = plaintext {
        assert!(introspect_root(channel, &root).await.is_err());
    }
    // A client that does not trust the server's CA does not talk to it.
    let stranger = make_pki("unused");
    assert!(!answered(port, &stranger.ca, None, &root).await);
}

async fn mtls_refuses_clients_without_a_trusted_certificate_and_audits_the_subject(app: TestApp) {
    let Some(database) = binary_database(app.backend).await else {
        return;
    };
    let (dir, url) = (database.dir.path(), database.url.as_str());
    let root = root_key(&tokend(dir, url).arg("bootstrap").output().unwrap());
    let pki = make_pki("inventory-service");
    let (_process, port) = serve_tls(dir, url, &pki, ClientCerts::Required).await;

    // No client certificate, or one from a CA tokend does not trust: refused, even with a
    // valid credential.
    assert!(!answered(port, &pki.ca, None, &root).await);
    let impostor = make_pki("inventory-service");
    assert!(!answered(port, &pki.ca, Some(&impostor.client), &root).await);

    // The right certificate: calls work, and what they change names it in the audit log.
    let channel = connect(port, &pki.ca, Some(&pki.client)).await.unwrap();
    assert!(introspect_root(channel.clone(), &root).await.unwrap());
    seed_acme(channel.clone(), &root, &["a:read"]).await;
    let issued = TokenServiceClient::new(channel.clone())
        .issue_token(authed(alices_token("over-mtls"), &root))
        .await
        .unwrap()
        .into_inner();
    let token_id = issued.token.unwrap().id;
    let issued_event = issued_event(channel, &root, &token_id).await;
    assert_eq!(
        issued_event
            .detail
            .get("client_certificate")
            .map(String::as_str),
        Some("CN=inventory-service"),
        "{issued_event:?}"
    );
    assert_eq!(
        issued_event
            .detail
            .get("client_certificate_uri")
            .map(String::as_str),
        Some("spiffe://acme.test/inventory-service"),
        "{issued_event:?}"
    );

    // The operator CLI speaks mTLS too; without its certificate it is refused.
    let file = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let (ca, cert, key) = (
        file("cli-ca.pem", &pki.ca),
        file("cli.pem", &pki.client.0),
        file("cli.key", &pki.client.1),
    );
    let server = format!("https://localhost:{port}");
    let cli = |with_cert: bool| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_tokend"));
        command
            .args(["--server", &server, "--ca-file", &ca, "--output", "json"])
            .args(["audit", "--tenant", "acme"])
            .env("TOKEND_TOKEN", &root)
            .stdin(std::process::Stdio::null());
        if with_cert {
            command.args(["--cert-file", &cert, "--key-file", &key]);
        }
        command.output().unwrap()
    };
    let listed = cli(true);
    assert!(listed.status.success(), "{listed:?}");
    assert!(String::from_utf8_lossy(&listed.stdout).contains("token.issued"));
    let refused = cli(false);
    assert!(!refused.status.success(), "{refused:?}");
}

/// The `token.issued` event of `token_id` in acme.
async fn issued_event(channel: Channel, root: &str, token_id: &str) -> pb::AuditEvent {
    acme_audit(channel, root, token_id)
        .await
        .into_iter()
        .find(|e| e.action == "token.issued")
        .unwrap()
}

async fn optional_client_certificates_are_recorded_when_given(app: TestApp) {
    let Some(database) = binary_database(app.backend).await else {
        return;
    };
    let (dir, url) = (database.dir.path(), database.url.as_str());
    let root = root_key(&tokend(dir, url).arg("bootstrap").output().unwrap());
    let pki = make_pki("billing-service");
    let (_process, port) = serve_tls(dir, url, &pki, ClientCerts::Optional).await;

    // Without a certificate: served, and nothing claims a certificate identity.
    let plain = connect(port, &pki.ca, None).await.unwrap();
    seed_acme(plain.clone(), &root, &["a:read"]).await;
    let without = TokenServiceClient::new(plain.clone())
        .issue_token(authed(alices_token("no-cert"), &root))
        .await
        .unwrap()
        .into_inner();
    let event = issued_event(plain.clone(), &root, &without.token.unwrap().id).await;
    assert!(
        !event.detail.contains_key("client_certificate"),
        "{event:?}"
    );

    // With one: its subject is recorded.
    let with_cert = connect(port, &pki.ca, Some(&pki.client)).await.unwrap();
    let with = TokenServiceClient::new(with_cert.clone())
        .issue_token(authed(alices_token("with-cert"), &root))
        .await
        .unwrap()
        .into_inner();
    let event = issued_event(with_cert, &root, &with.token.unwrap().id).await;
    assert_eq!(
        event.detail.get("client_certificate").map(String::as_str),
        Some("CN=billing-service")
    );

    // Over TLS the connection's peer is still known: alice's token, used as a credential
    // (for a call it may not make), shows where it was used from.
    let request = authed(
        pb::IntrospectRequest {
            token: with.secret.clone(),
            ..Default::default()
        },
        &with.secret,
    );
    let _ = TokenServiceClient::new(plain.clone())
        .introspect(request)
        .await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let listed = alices_tokens(plain.clone(), &root).await;
        let token = listed
            .tokens
            .iter()
            .find(|t| t.name == "with-cert")
            .unwrap();
        if let Some(used) = token.recent_uses.first() {
            assert_eq!(used.client_ip, "127.0.0.1", "{used:?}");
            assert_eq!(used.service, "", "{used:?}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no use recorded over TLS"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
