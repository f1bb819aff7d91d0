#!/usr/bin/env bash
# Distributed rate-limit decisions per second against the local Redis: the
# breakwater-resilience Redis limiter (one Lua script per decision, GCRA and fixed
# window) from 2 limiter instances x 32 concurrent callers, pipelined on each instance's
# multiplexed connection; beside redis-benchmark's C client doing the baselines (PING,
# and an EVAL of INCR) on the same server with the same concurrency. Written to
# bench/RESULTS.md. Target: >= 20,000 decisions/s.
#
# Usage: bench/redis-rate-limit.sh [seconds-per-scenario]   (default 5)
# Env: REDIS_URL (default redis://127.0.0.1:6379), CONCURRENCY (64), INSTANCES (2).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${1:-5}"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
export CONCURRENCY="${CONCURRENCY:-64}"
export INSTANCES="${INSTANCES:-2}"
OUT=bench/RESULTS.md
LOG="$(mktemp)"
trap 'rm -f "$LOG" "$LOG.section"' EXIT

hostport="${REDIS_URL#redis://}"; hostport="${hostport%%/*}"
RHOST="${hostport%%:*}"; RPORT="${hostport##*:}"; [ "$RPORT" = "$hostport" ] && RPORT=6379
redis-cli -h "$RHOST" -p "$RPORT" ping >/dev/null || { echo "no Redis at $REDIS_URL" >&2; exit 1; }
VERSION="$(redis-cli -h "$RHOST" -p "$RPORT" info server | awk -F: '/^redis_version/{print $2}' | tr -d '\r')"

cargo build -q --profile bench -p breakwater-resilience --features redis --bench redis_rate_limit
BENCH_SECONDS="$SECS" cargo bench -q -p breakwater-resilience --features redis --bench redis_rate_limit 2>/dev/null | grep '^| ' | tee "$LOG"

# Baselines: the same server driven by redis-benchmark (C, pipelining off, same
# connection count) for the plainest command and for a one-command script.
N=$((20000 * SECS))
base() { redis-benchmark -h "$RHOST" -p "$RPORT" -c "$CONCURRENCY" -n "$N" -q "$@" 2>/dev/null | tr '\r' '\n' | awk '/requests per second/{for(i=1;i<=NF;i++) if ($i ~ /^[0-9.]+$/ && $(i+1) == "requests") {print $i; exit}}'; }
PING_RPS="$(base -t ping_mbulk)"
EVAL_RPS="$(base -r 10000 eval "return redis.call('incr', KEYS[1])" 1 bw-bench-baseline:__rand_int__)"
redis-cli -h "$RHOST" -p "$RPORT" --scan --pattern 'bw-bench-baseline:*' | xargs -r -n 500 redis-cli -h "$RHOST" -p "$RPORT" del >/dev/null

{
  echo "<!-- redis-rate-limit: begin -->"
  echo "## Distributed rate limit on Redis"
  echo
  echo "Measured $(date -u +%Y-%m-%dT%H:%MZ) by \`bench/redis-rate-limit.sh $SECS\` on $(nproc) cores ($(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo)), Redis $VERSION on the same machine."
  echo "\`RedisRateLimiter::check\` (crates/resilience, feature \`redis\`) in a closed loop for $SECS s per row: one Lua script (EVALSHA) per decision,"
  echo "$CONCURRENCY concurrent callers over $INSTANCES limiter instances, each instance one multiplexed connection that pipelines its callers' calls."
  echo "Latency is per decision, in microseconds."
  echo
  echo "| scenario | instances x callers | decisions/s | admitted | p50 µs | p99 µs | max µs | fallbacks |"
  echo "|---|---|---|---|---|---|---|---|"
  cat "$LOG"
  echo
  echo "Baselines on the same server, redis-benchmark with $CONCURRENCY connections, no pipelining:"
  echo "PING ${PING_RPS:-?} req/s; \`EVAL \"return redis.call('incr', KEYS[1])\"\` ${EVAL_RPS:-?} req/s."
  echo
  echo "Target: >= 20,000 decisions/s."
  echo "<!-- redis-rate-limit: end -->"
} > "$LOG.section"

touch "$OUT"
if grep -q "<!-- redis-rate-limit: begin -->" "$OUT"; then
  awk -v f="$LOG.section" '
    /<!-- redis-rate-limit: begin -->/ { while ((getline l < f) > 0) print l; skip=1; next }
    /<!-- redis-rate-limit: end -->/ { skip=0; next }
    !skip { print }' "$OUT" > "$OUT.new" && mv "$OUT.new" "$OUT"
else
  { [ -s "$OUT" ] || printf '# Benchmark results\n\nEvery figure here was measured by a script in bench/ on the machine named with it.\n\n'; cat "$LOG.section"; echo; } >> "$OUT"
fi
echo "wrote $OUT"
