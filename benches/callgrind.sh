#!/usr/bin/env bash
# Instructions per warm Introspect: tokend against the no-op ceiling, counted by callgrind.
#
# Rates and CPU times on a shared machine move with its other tenants; an instruction count
# does not (the same binary, inputs and environment give the same total). Each server runs
# alone under `valgrind --tool=callgrind` (the bench binary's BENCH_SERVE mode), h2load sends
# it CALLGRIND_WARMUP calls, the counters are zeroed, then CALLGRIND_CALLS calls are counted:
# everything the server process executes in user space while answering them (HTTP/2, gRPC,
# tokend's own work, the allocator). Kernel work (the socket calls) is not counted.
#
#   bash benches/callgrind.sh          # needs valgrind and h2load (nghttp2-client)
#   CALLGRIND_GARBAGE=1 bash benches/callgrind.sh   # a garbage token, against the ceiling
#                                                   # answering `active = false`
#   BENCH_METRICS=1 bash benches/callgrind.sh       # with the Prometheus recorder installed
#   CALLGRIND_KEEP=dir bash benches/callgrind.sh    # keeps both profiles in dir, for
#                                                   # callgrind_annotate (per function)
set -euo pipefail
cd "$(dirname "$0")/.."
calls=${CALLGRIND_CALLS:-20000}
warmup=${CALLGRIND_WARMUP:-2000}
for tool in valgrind callgrind_control h2load; do
  command -v "$tool" >/dev/null || { echo "callgrind.sh: $tool is needed" >&2; exit 1; }
done
bin=$(cargo bench --bench introspect --no-run 2>&1 | grep -o '[^ (]*/deps/introspect-[0-9a-f]*' | tail -n1)
[[ -x "$bin" ]] || { echo "callgrind.sh: cannot find the bench binary" >&2; exit 1; }
if [[ -n "${CALLGRIND_KEEP:-}" ]]; then
  work=$CALLGRIND_KEEP
  mkdir -p "$work"
  rm -f "$work"/*.stdin "$work"/*.callgrind*
else
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
fi

# Instructions per call for one server: $1 = tokend | ceiling | ceiling-inactive.
count() {
  local which=$1 out="$work/$1.callgrind"
  mkfifo "$work/$which.stdin"
  # Pinned like the benchmark's servers (core 0), without the benchmark's own re-exec.
  env -u BENCH_NO_LOGS TOKEND_BENCH_PINNED=1 BENCH_SERVE="$which" taskset -c 0 \
    valgrind --tool=callgrind --callgrind-out-file="$out" "$bin" --bench \
    <"$work/$which.stdin" >"$work/$which.stdout" 2>"$work/$which.stderr" &
  local pid=$!
  exec 9>"$work/$which.stdin"
  local line=""
  for _ in $(seq 600); do
    line=$(head -n1 "$work/$which.stdout" 2>/dev/null || true)
    [[ -n "$line" ]] && break
    sleep 0.2
  done
  [[ -n "$line" ]] || { cat "$work/$which.stderr" >&2; exit 1; }
  local addr key body
  read -r addr key body <<<"$line"
  if [[ -n "${CALLGRIND_GARBAGE:-}" ]]; then
    # Introspect of "garbage": a gRPC frame holding IntrospectRequest { token: "garbage" }.
    body="$work/garbage.body"
    printf '\x00\x00\x00\x00\x09\x0a\x07garbage' >"$body"
  fi
  load() {
    taskset -c 1 h2load -n"$1" -c8 -m8 -t1 -d "$body" \
      -H 'content-type: application/grpc' -H 'te: trailers' \
      -H "authorization: Bearer $key" \
      "http://$addr/tokend.v1.TokenService/Introspect" | grep -q "$1 2xx" \
      || { echo "callgrind.sh: not every call to $which succeeded" >&2; exit 1; }
  }
  load "$warmup"
  callgrind_control -z "$pid" >/dev/null 2>&1
  load "$calls"
  callgrind_control -d "$pid" >/dev/null 2>&1
  exec 9>&-
  wait "$pid" || true
  # The dump taken right after the counted calls is the first numbered one.
  local total
  total=$(grep -h '^totals:\|^summary:' "$out.1" | head -n1 | awk '{print $2}')
  echo $((total / calls))
}

tokend=$(count tokend)
kind=warm
if [[ -n "${CALLGRIND_GARBAGE:-}" ]]; then
  kind=garbage
  ceiling=$(count ceiling-inactive)
else
  ceiling=$(count ceiling)
fi
echo "instructions per $kind Introspect ($calls calls, 64 in flight, with the log subscriber):"
echo "  tokend  $tokend"
echo "  ceiling $ceiling"
awk -v t="$tokend" -v c="$ceiling" 'BEGIN { printf "  ratio   %.3f×\n", t / c }'
