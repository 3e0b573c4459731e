//! The operator's client subcommands of the `tokend` binary, against a real server: each
//! one's happy path, and its message on a bad credential.

use std::process::Stdio;

use tokio::io::AsyncWriteExt as _;
use tokio::process::Command;

use crate::helpers::TestApp;

const TOKEND: &str = env!("CARGO_BIN_EXE_tokend");

crate::both_backends!(
    the_directory_subcommands_manage_tenants_roles_members_and_users,
    the_token_subcommands_cover_a_tokens_life,
    every_subcommand_names_a_bad_credential,
);

/// Runs `tokend ARGS` against the app with `credential` in TOKEND_TOKEN (if any) and
/// `stdin`; returns success, stdout and stderr.
async fn tokend(
    app: &TestApp,
    credential: Option<&str>,
    args: &[&str],
    stdin: &str,
) -> (bool, String, String) {
    let mut command = Command::new(TOKEND);
    command
        .args(args)
        .env("TOKEND_SERVER", format!("http://{}", app.addr))
        .env_remove("TOKEND_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(credential) = credential {
        command.env("TOKEND_TOKEN", credential);
    }
    let mut child = command.spawn().expect("run tokend");
    let mut input = child.stdin.take().unwrap();
    // A command that fails before reading its stdin closes it: not this test's concern.
    let _ = input.write_all(stdin.as_bytes()).await;
    drop(input);
    let output = child.wait_with_output().await.unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

async fn ok(app: &TestApp, args: &[&str]) -> String {
    let (success, stdout, stderr) = tokend(app, Some(&app.root), args, "").await;
    assert!(success, "tokend {args:?} failed: {stderr}");
    stdout
}

fn json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

async fn the_directory_subcommands_manage_tenants_roles_members_and_users(app: TestApp) {
    let out = ok(
        &app,
        &[
            "directory",
            "tenant",
            "put",
            "acme",
            "--name",
            "Acme Corp",
            "--max-lifetime",
            "90d",
        ],
    )
    .await;
    assert!(out.contains("acme") && out.contains("90d"), "{out}");
    let got = json(
        &ok(
            &app,
            &["directory", "tenant", "get", "acme", "--output", "json"],
        )
        .await,
    );
    assert_eq!(got[0]["max_lifetime_secs"], 90 * 86_400);
    let list = ok(&app, &["directory", "tenant", "list"]).await;
    assert!(
        list.contains("system") && list.contains("Acme Corp"),
        "{list}"
    );
    // Changing one setting keeps the others: a suspended tenant stays suspended.
    ok(
        &app,
        &[
            "directory",
            "tenant",
            "put",
            "acme",
            "--status",
            "suspended",
        ],
    )
    .await;
    ok(
        &app,
        &[
            "directory",
            "tenant",
            "put",
            "acme",
            "--max-rotation-grace",
            "1d",
        ],
    )
    .await;
    let got = json(
        &ok(
            &app,
            &["directory", "tenant", "get", "acme", "--output", "json"],
        )
        .await,
    );
    assert_eq!(got[0]["status"], "suspended");
    assert_eq!(got[0]["name"], "Acme Corp");
    assert_eq!(got[0]["max_lifetime_secs"], 90 * 86_400);
    assert_eq!(got[0]["max_rotation_grace_secs"], 86_400);
    ok(
        &app,
        &[
            "directory",
            "tenant",
            "put",
            "acme",
            "--status",
            "active",
            "--clear-max-rotation-grace",
        ],
    )
    .await;

    ok(
        &app,
        &[
            "directory",
            "role",
            "put",
            "--tenant",
            "acme",
            "developer",
            "--permission",
            "entities:read",
        ],
    )
    .await;
    ok(
        &app,
        &["directory", "role", "put", "--tenant", "acme", "temp"],
    )
    .await;
    ok(
        &app,
        &["directory", "role", "delete", "--tenant", "acme", "temp"],
    )
    .await;
    let roles = json(
        &ok(
            &app,
            &[
                "directory",
                "role",
                "list",
                "--tenant",
                "acme",
                "--output",
                "json",
            ],
        )
        .await,
    );
    assert_eq!(roles.as_array().unwrap().len(), 1);
    assert_eq!(roles[0]["permissions"][0], "entities:read");

    ok(
        &app,
        &[
            "directory",
            "member",
            "put",
            "--tenant",
            "acme",
            "alice",
            "--role",
            "developer",
            "--group",
            "eng",
        ],
    )
    .await;
    ok(
        &app,
        &[
            "directory",
            "member",
            "put",
            "--tenant",
            "acme",
            "bob",
            "--role",
            "developer",
        ],
    )
    .await;
    ok(
        &app,
        &["directory", "member", "remove", "--tenant", "acme", "bob"],
    )
    .await;
    let members = ok(&app, &["directory", "member", "list", "--tenant", "acme"]).await;
    assert!(
        members.contains("alice") && members.contains("eng") && !members.contains("bob"),
        "{members}"
    );

    // The tenant's policy (90 days at most) applies to what the CLI issues.
    let issued = ok(
        &app,
        &[
            "token", "issue", "--tenant", "acme", "--as", "alice", "--name", "laptop", "--ttl",
            "30d",
        ],
    )
    .await;
    let pat = issued.lines().last().unwrap().to_owned();
    ok(
        &app,
        &["directory", "user", "set-status", "alice", "suspended"],
    )
    .await;
    assert!(!app.introspect(&pat).await.active);
    ok(
        &app,
        &["directory", "user", "set-status", "alice", "active"],
    )
    .await;
    assert!(app.introspect(&pat).await.active);
}

async fn the_token_subcommands_cover_a_tokens_life(app: TestApp) {
    app.tenant("acme", &[("developer", &["entities:read"])])
        .await;
    app.member("acme", "alice", "developer", &["eng"]).await;
    let acting = ["--tenant", "acme", "--as", "alice"];

    let issued = ok(
        &app,
        &[
            &["token", "issue", "--name", "laptop", "--ttl", "30d"][..],
            &acting,
        ]
        .concat(),
    )
    .await;
    let secret = issued.lines().last().unwrap().to_owned();
    assert!(secret.starts_with("tkd_pat_"), "{issued}");
    assert!(issued.contains("in 1 month"), "{issued}");

    let listed = ok(&app, &[&["token", "list"][..], &acting].concat()).await;
    assert!(
        listed.contains("laptop") && listed.contains("never"),
        "{listed}"
    );
    let rows = json(
        &ok(
            &app,
            &[&["token", "list", "--output", "json"][..], &acting].concat(),
        )
        .await,
    );
    let id = rows[0]["id"].as_str().unwrap().to_owned();

    let (success, out, _) = tokend(
        &app,
        Some(&app.root),
        &["introspect", "--require", "entities:read"],
        &secret,
    )
    .await;
    assert!(
        success && out.contains("alice") && out.contains("entities:read"),
        "{out}"
    );

    let rotated = json(
        &ok(
            &app,
            &[
                &["token", "rotate", &id, "--grace", "1h", "--output", "json"][..],
                &acting,
            ]
            .concat(),
        )
        .await,
    );
    let new_secret = rotated["secret"].as_str().unwrap().to_owned();
    let new_id = rotated["token"]["id"].as_str().unwrap().to_owned();
    assert_eq!(rotated["previous"]["revoke_reason"], "rotated");
    // The old token still works, and the table says until when.
    let listed = ok(&app, &[&["token", "list"][..], &acting].concat()).await;
    assert!(listed.contains("in 1 hour (rotated)"), "{listed}");
    assert!(app.introspect(&new_secret).await.active);

    let revoked = ok(
        &app,
        &[
            &["token", "revoke", &new_id, "--reason", "done"][..],
            &acting,
        ]
        .concat(),
    )
    .await;
    assert!(revoked.contains("revoked"), "{revoked}");
    let (_, out, _) = tokend(&app, Some(&app.root), &["introspect"], &new_secret).await;
    assert!(out.starts_with("inactive"), "{out}");

    let deleted = ok(&app, &[&["token", "delete", &new_id][..], &acting].concat()).await;
    assert!(deleted.contains(&new_id), "{deleted}");

    let events = json(&ok(&app, &["audit", "--tenant", "acme", "--output", "json"]).await);
    let actions: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for action in [
        "token.issued",
        "token.rotated",
        "token.revoked",
        "token.deleted",
    ] {
        assert!(actions.contains(&action), "{actions:?}");
    }
}

async fn every_subcommand_names_a_bad_credential(app: TestApp) {
    let commands: [&[&str]; 17] = [
        &["token", "issue", "--name", "x"],
        &["token", "list"],
        &["token", "revoke", "AAAAAAAAAAAA"],
        &["token", "delete", "AAAAAAAAAAAA"],
        &["token", "rotate", "AAAAAAAAAAAA"],
        &["introspect"],
        &["directory", "tenant", "put", "acme"],
        &["directory", "tenant", "get", "acme"],
        &["directory", "tenant", "list"],
        &["directory", "role", "put", "--tenant", "acme", "r"],
        &["directory", "role", "delete", "--tenant", "acme", "r"],
        &["directory", "role", "list", "--tenant", "acme"],
        &[
            "directory",
            "member",
            "put",
            "--tenant",
            "acme",
            "u",
            "--role",
            "r",
        ],
        &["directory", "member", "remove", "--tenant", "acme", "u"],
        &["directory", "member", "list", "--tenant", "acme"],
        &["directory", "user", "set-status", "u", "active"],
        &["audit"],
    ];
    for args in commands {
        let (success, stdout, stderr) =
            tokend(&app, Some("tkd_key_notarealtoken"), args, "x").await;
        assert!(!success, "{args:?}: {stdout}");
        assert!(
            stderr.contains("Unauthenticated: the credential is not an active token"),
            "{args:?}: {stderr}"
        );
        let (success, _, stderr) = tokend(&app, None, args, "x").await;
        assert!(!success);
        assert!(stderr.contains("set TOKEND_TOKEN"), "{args:?}: {stderr}");
    }
}
