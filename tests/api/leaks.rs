//! ReportLeakedToken: anyone holding a token string can kill it (SPEC §2, "Leaked-token
//! report").

use prost::Message as _;
use tonic::Code;

use tokend::domain::token_format::{TokenFormat, TokenKind};
use tokend::proto::v1 as pb;

use crate::helpers::{TestApp, assert_status};

crate::both_backends!(
    a_reported_token_is_revoked_as_leaked_and_its_tenant_audits_the_report,
    the_answer_is_the_same_whether_or_not_a_string_was_a_token,
    a_bad_report_is_named_and_revokes_nothing,
    a_report_of_a_revoked_token_keeps_its_first_revocation,
    a_full_batch_of_a_thousand_strings_is_accepted,
    a_reported_token_stays_revoked_when_its_owner_is_reactivated,
    only_the_first_well_formed_string_per_token_id_is_considered,
);

/// Alice's and bob's tenant; bob holds no tokend permission at all.
async fn acme(app: &TestApp) {
    app.tenant(
        "acme",
        &[
            ("developer", &["entities:read", "tokend.tokens.issue"]),
            ("viewer", &["entities:read"]),
            ("keymaster", &["tokend.api_keys.manage", "entities:read"]),
        ],
    )
    .await;
    app.member("acme", "alice", "developer", &[]).await;
    app.member("acme", "bob", "viewer", &[]).await;
    app.member("acme", "kim", "keymaster", &[]).await;
}

fn report(tokens: &[&str], source: &str) -> pb::ReportLeakedTokenRequest {
    pb::ReportLeakedTokenRequest {
        tokens: tokens.iter().map(|t| t.to_string()).collect(),
        source: source.into(),
    }
}

/// `token` with one character of its secret changed and the checksum made right again:
/// well-formed, a real id, the wrong secret.
fn wrong_secret(token: &str) -> String {
    let mut body = token.as_bytes()[..token.len() - 6].to_vec();
    let last = body.len() - 1;
    body[last] = if body[last] == b'a' { b'b' } else { b'a' };
    rechecksummed(String::from_utf8(body).unwrap())
}

/// `token` claiming the other kind (`pat` ⇄ `key`), checksum made right again.
fn other_kind(token: &str) -> String {
    let body = &token[..token.len() - 6];
    let body = if body.contains("_pat_") {
        body.replacen("_pat_", "_key_", 1)
    } else {
        body.replacen("_key_", "_pat_", 1)
    };
    rechecksummed(body)
}

fn rechecksummed(body: String) -> String {
    let forged = format!(
        "{body}{}",
        base62_checksum(crc32fast::hash(body.as_bytes()))
    );
    assert!(
        TokenFormat::default().parse(&forged).is_some(),
        "the forgery is well-formed"
    );
    forged
}

fn base62_checksum(mut crc: u32) -> String {
    const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut out = [b'0'; 6];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(crc % 62) as usize];
        crc /= 62;
    }
    String::from_utf8(out.to_vec()).unwrap()
}

async fn revoked_tokens_of(app: &TestApp, user: &str) -> Vec<pb::TokenInfo> {
    app.tokens(&app.root)
        .list_tokens(pb::ListTokensRequest {
            tenant_id: "acme".into(),
            actor_user_id: user.into(),
            include_revoked: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .tokens
        .into_iter()
        .filter(|t| t.status == pb::TokenStatus::Revoked as i32)
        .collect()
}

async fn a_reported_token_is_revoked_as_leaked_and_its_tenant_audits_the_report(app: TestApp) {
    acme(&app).await;
    let (alices, info) = app.pat("acme", "alice", "laptop", &[]).await;
    let (key, key_info) = app.api_key("acme", "kim", "ci", "viewer").await;
    // The reporter is in another tenant and holds no tokend permission: holding the
    // strings is what counts.
    app.tenant("globex", &[("viewer", &["entities:read"])])
        .await;
    app.member("globex", "carol", "viewer", &[]).await;
    let (carols, carols_info) = app.pat("globex", "carol", "scanner", &[]).await;
    assert!(app.introspect(&alices).await.active);

    app.tokens(&carols)
        .report_leaked_token(report(&[&alices, &key], "https://paste.example/abc"))
        .await
        .unwrap();

    for token in [&alices, &key] {
        let answer = app.introspect(token).await;
        assert!(!answer.active);
        assert_eq!(answer.reason, pb::InactiveReason::Revoked as i32);
    }
    assert!(
        app.introspect(&carols).await.active,
        "the reporter's own token lives"
    );

    let revoked = revoked_tokens_of(&app, "alice").await;
    assert_eq!(revoked.len(), 1);
    assert_eq!(revoked[0].id, info.id);
    assert_eq!(revoked[0].revoke_reason, "leaked");
    // Named by its credential's display id, which no member of acme can be mistaken for.
    assert_eq!(revoked[0].revoked_by, carols_info.display_id);

    let events = app.audit_of(&key_info.id).await;
    let report = events
        .iter()
        .find(|e| e.action == "token.revoked")
        .expect("the report is in the key's audit trail");
    assert_eq!(report.tenant_id, "acme");
    assert_eq!(report.actor, carols_info.display_id);
    assert_eq!(
        report.detail.get("reporter_tenant").map(String::as_str),
        Some("globex")
    );
    assert_eq!(
        report.detail.get("reason").map(String::as_str),
        Some("leaked")
    );
    assert_eq!(
        report.detail.get("source").map(String::as_str),
        Some("https://paste.example/abc")
    );
}

async fn the_answer_is_the_same_whether_or_not_a_string_was_a_token(app: TestApp) {
    acme(&app).await;
    let (alices, _) = app.pat("acme", "alice", "laptop", &[]).await;
    let (bobs, _) = app.pat("acme", "bob", "phone", &[]).await;
    let forged = wrong_secret(&alices);
    assert_ne!(forged, alices);

    let answer = |tokens: Vec<String>| {
        let mut client = app.tokens(&bobs);
        async move {
            let response = client
                .report_leaked_token(pb::ReportLeakedTokenRequest {
                    tokens,
                    source: "scanner".into(),
                })
                .await
                .unwrap();
            response.into_inner().encode_to_vec()
        }
    };
    // A real id with the wrong secret, or claiming the other kind, must not revoke
    // anything: ids are not secret.
    let for_forged = answer(vec![forged]).await;
    assert!(app.introspect(&alices).await.active);
    let for_other_kind = answer(vec![other_kind(&alices)]).await;
    assert!(app.introspect(&alices).await.active);
    let for_garbage = answer(vec!["not a token".into()]).await;
    let for_real = answer(vec![alices.clone()]).await;
    assert!(!app.introspect(&alices).await.active);
    assert_eq!(for_real, for_forged);
    assert_eq!(for_real, for_other_kind);
    assert_eq!(for_real, for_garbage);
}

async fn a_bad_report_is_named_and_revokes_nothing(app: TestApp) {
    acme(&app).await;
    let (alices, _) = app.pat("acme", "alice", "laptop", &[]).await;
    let (bobs, _) = app.pat("acme", "bob", "phone", &[]).await;

    let too_many: Vec<String> = std::iter::once(alices.clone())
        .chain((0..1000).map(|i| format!("garbage-{i}")))
        .collect();
    assert_status(
        app.tokens(&bobs)
            .report_leaked_token(pb::ReportLeakedTokenRequest {
                tokens: too_many,
                source: String::new(),
            })
            .await,
        Code::InvalidArgument,
        "tokens: at most 1000",
    );
    assert_status(
        app.tokens(&bobs).report_leaked_token(report(&[], "")).await,
        Code::InvalidArgument,
        "tokens",
    );
    assert_status(
        app.tokens(&bobs)
            .report_leaked_token(report(&[&alices], "line\nbreak"))
            .await,
        Code::InvalidArgument,
        "source",
    );
    // Reporting needs a credential like every call.
    assert_status(
        app.tokens_anonymous()
            .report_leaked_token(report(&[&alices], ""))
            .await,
        Code::Unauthenticated,
        "",
    );
    assert!(app.introspect(&alices).await.active, "nothing was revoked");
}

async fn a_report_of_a_revoked_token_keeps_its_first_revocation(app: TestApp) {
    acme(&app).await;
    let (alices, info) = app.pat("acme", "alice", "laptop", &[]).await;
    let (bobs, _) = app.pat("acme", "bob", "phone", &[]).await;
    app.revoke_as("acme", "alice", &info.id).await;
    app.tokens(&bobs)
        .report_leaked_token(report(&[&alices, &alices], "twice in one report"))
        .await
        .unwrap();
    let revoked = revoked_tokens_of(&app, "alice").await;
    assert_eq!(revoked.len(), 1);
    assert_eq!(revoked[0].revoked_by, "alice");
    assert_ne!(revoked[0].revoke_reason, "leaked");
    let events = app.audit_of(&info.id).await;
    let revocations = events
        .iter()
        .filter(|e| e.action == "token.revoked")
        .count();
    assert_eq!(revocations, 1, "the report added no second revocation");
}

async fn a_reported_token_stays_revoked_when_its_owner_is_reactivated(app: TestApp) {
    acme(&app).await;
    let (alices, _) = app.pat("acme", "alice", "laptop", &[]).await;
    let (bobs, _) = app.pat("acme", "bob", "phone", &[]).await;
    app.set_user_status("alice", pb::UserStatus::Suspended)
        .await;
    // Inactive (suspended owner), but still a token: the report must kill it for good.
    assert!(!app.introspect(&alices).await.active);
    app.tokens(&bobs)
        .report_leaked_token(report(&[&alices], "found while alice was away"))
        .await
        .unwrap();
    app.set_user_status("alice", pb::UserStatus::Active).await;
    let answer = app.introspect(&alices).await;
    assert!(!answer.active);
    assert_eq!(answer.reason, pb::InactiveReason::Revoked as i32);
}

async fn a_full_batch_of_a_thousand_strings_is_accepted(app: TestApp) {
    acme(&app).await;
    let (alices, _) = app.pat("acme", "alice", "laptop", &[]).await;
    let (bobs, _) = app.pat("acme", "bob", "phone", &[]).await;
    // Token-sized strings, so the request is as large as a real report of 1000 tokens.
    let format = TokenFormat::default();
    let batch: Vec<String> = (0..999)
        .map(|_| {
            let mut fake = format.generate(TokenKind::Personal).full;
            fake.pop(); // a broken checksum: never a token
            fake.push('!');
            fake
        })
        .chain(std::iter::once(alices.clone()))
        .collect();
    app.tokens(&bobs)
        .report_leaked_token(pb::ReportLeakedTokenRequest {
            tokens: batch,
            source: "bulk scan".into(),
        })
        .await
        .unwrap();
    assert!(!app.introspect(&alices).await.active);
}

/// A token has one secret, so a second well-formed string for the same id in one report can
/// only be a guess; each guess would cost an argon2 verification, so it is not tried.
async fn only_the_first_well_formed_string_per_token_id_is_considered(app: TestApp) {
    acme(&app).await;
    let (alices, _) = app.pat("acme", "alice", "laptop", &[]).await;
    let (bobs, _) = app.pat("acme", "bob", "phone", &[]).await;
    // Alice's id with other secrets (secret: the 43 characters before the 6 of the checksum).
    let guesses: Vec<String> = (0..20)
        .map(|_| {
            let other = TokenFormat::default().generate(TokenKind::Personal).full;
            let n = other.len();
            rechecksummed(format!("{}{}", &alices[..n - 49], &other[n - 49..n - 6]))
        })
        .chain(std::iter::once(alices.clone()))
        .collect();
    // Bob's credential verified once beforehand, so the count below is the report's own.
    assert!(app.introspect(&bobs).await.active);
    let verifications = app.hasher.verifications();
    app.tokens(&bobs)
        .report_leaked_token(pb::ReportLeakedTokenRequest {
            tokens: guesses,
            source: "guesses first".into(),
        })
        .await
        .unwrap();
    assert!(
        app.hasher.verifications() - verifications <= 1,
        "one verification for alice's id, however many strings name it"
    );
    assert!(
        app.introspect(&alices).await.active,
        "the real string came too late"
    );
    // Alone, it is acted on.
    app.tokens(&bobs)
        .report_leaked_token(report(&[&alices], "the real one"))
        .await
        .unwrap();
    assert!(!app.introspect(&alices).await.active);
}
