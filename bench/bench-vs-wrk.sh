#!/usr/bin/env bash
# `breakwater bench` beside wrk against the same target in one run: the load tool must
# not be the bottleneck (target: its req/s within 10% of wrk's). The target is one nginx
# worker answering a small JSON body, the fastest server at hand.
#
# Usage: bench/bench-vs-wrk.sh [duration-seconds]   (default 10)
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-10}"
OUT=bench/RESULTS.md
WORK="$(mktemp -d)"
cleanup() {
  [ -f "$WORK/target.pid" ] && kill "$(cat "$WORK/target.pid")" 2>/dev/null || true
  sleep 0.3
  rm -rf "$WORK"
}
trap cleanup EXIT

if ! command -v nginx >/dev/null 2>&1 || ! command -v wrk >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light wrk >/dev/null
fi
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
cargo build --release --quiet -p breakwater
BW=target/release/breakwater

while :; do
  PORT=$(( (RANDOM % 20000) + 20000 ))
  ss -ltnH "sport = :$PORT" | grep -q . || break
done
cat > "$WORK/target.conf" <<NGX
worker_processes 1;
pid $WORK/target.pid;
error_log $WORK/error.log warn;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$PORT;
    location / { default_type application/json; return 200 '{"id":1,"name":"John Doe"}'; } } }
NGX
"$NGINX" -c "$WORK/target.conf" -e "$WORK/error.log"
URL="http://127.0.0.1:$PORT/users/1"
for _ in $(seq 1 50); do curl -fsS -o /dev/null "$URL" && break; sleep 0.1; done

ROWS=()
for c in 64 10; do
  wrk -t2 -c"$c" -d"${DURATION}s" --latency "$URL" > "$WORK/wrk.out"
  wrk_rps=$(awk '/^Requests\/sec/{print $2}' "$WORK/wrk.out")
  "$BW" bench "$URL" -c "$c" -d "${DURATION}s" --json --no-progress > "$WORK/bw.json"
  bw_rps=$(python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["requests_per_second"], 2))' "$WORK/bw.json" 2>/dev/null \
    || sed -n 's/.*"requests_per_second":\([0-9.]*\).*/\1/p' "$WORK/bw.json")
  ratio=$(awk -v a="$bw_rps" -v b="$wrk_rps" 'BEGIN{printf "%.2f", a/b}')
  echo "connections=$c wrk=$wrk_rps bench=$bw_rps ratio=$ratio"
  ROWS+=("| $c | $wrk_rps | $bw_rps | $ratio |")
done

{
  echo "<!-- bench-vs-wrk: begin -->"
  echo "## \`breakwater bench\` vs wrk"
  echo
  echo "Measured $(date -u +%Y-%m-%dT%H:%MZ) by \`bench/bench-vs-wrk.sh $DURATION\` on $(nproc) cores ($(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo)),"
  echo "against one nginx worker answering a small JSON body; wrk -t2, breakwater bench with the same connection count, ${DURATION}s each."
  echo
  echo "| connections | wrk req/s | breakwater bench req/s | ratio |"
  echo "|---|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
  echo
  echo "Target: breakwater bench within 10% of wrk (ratio >= 0.90)."
  echo "<!-- bench-vs-wrk: end -->"
} > "$WORK/section.md"
touch "$OUT"
if grep -q "<!-- bench-vs-wrk: begin -->" "$OUT"; then
  awk -v f="$WORK/section.md" '
    /<!-- bench-vs-wrk: begin -->/ { while ((getline l < f) > 0) print l; skip=1; next }
    /<!-- bench-vs-wrk: end -->/ { skip=0; next }
    !skip { print }' "$OUT" > "$WORK/new.md" && mv "$WORK/new.md" "$OUT"
else
  { echo; cat "$WORK/section.md"; } >> "$OUT"
fi
echo "wrote $OUT"
