#!/usr/bin/env bash
# Checks deploy/ against a real system: starts `breakwater up` on its default ports and
# Prometheus with deploy/prometheus/prometheus.yml, sends some traffic (with two users
# instances and analytics stopped, so breakers and retries have something to show), then
# evaluates every query of every Grafana dashboard in deploy/grafana/ and fails if one is
# rejected by Prometheus, if a component serving /metrics is not scraped, or if the
# breaker-state panel has no series. Needs `prometheus` (Debian: apt-get install
# prometheus) and python3; builds nothing, so run `cargo build -p breakwater-cli` first.
#
#   deploy/verify.sh [path/to/breakwater]
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
bin="${1:-$here/../target/debug/breakwater}"
work="$(mktemp -d)"
up_pid=""
prom_pid=""

stop() {
  # Interrupting `up` stops every process it started.
  [[ -n "$up_pid" ]] && kill -INT "$up_pid" 2>/dev/null && wait "$up_pid" 2>/dev/null || true
  [[ -n "$prom_pid" ]] && kill "$prom_pid" 2>/dev/null && wait "$prom_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap stop EXIT

command -v prometheus >/dev/null || { echo "prometheus not found (apt-get install prometheus)" >&2; exit 2; }
[[ -x "$bin" ]] || { echo "no breakwater binary at $bin" >&2; exit 2; }

"$bin" up --data-dir "$work/data" >"$work/up.log" 2>&1 &
up_pid=$!
for _ in $(seq 1 120); do
  grep -q "Ctrl-C stops everything" "$work/up.log" && break
  kill -0 "$up_pid" 2>/dev/null || { cat "$work/up.log" >&2; exit 1; }
  sleep 0.5
done
if grep -q "is taken" "$work/up.log"; then
  echo "a default port is taken, so prometheus.yml's targets would miss: free it first" >&2
  grep "is taken" "$work/up.log" >&2
  exit 1
fi

prometheus --config.file="$here/prometheus/prometheus.yml" --storage.tsdb.path="$work/prom" \
  --web.listen-address=127.0.0.1:9090 >"$work/prom.log" 2>&1 &
prom_pid=$!

# Stop two users instances and analytics by pid as `up` printed them.
for name in users-1 users-2 analytics-1; do
  pid="$(awk -v n="$name" '$1 == n { print $3 }' "$work/up.log" | tail -1)"
  [[ -n "$pid" ]] && kill "$pid" 2>/dev/null || true
done
for _ in $(seq 1 100); do
  for path in /users /users-with-orders /api/external-data /api/metrics/summary; do
    curl -s -o /dev/null --max-time 5 "http://127.0.0.1:8000$path" || true
  done
done
# Two scrape intervals after the traffic, so the rates cover it.
sleep 11

python3 - "$here/grafana" <<'PY'
import glob, json, sys, urllib.parse, urllib.request

def query(expr):
    url = "http://127.0.0.1:9090/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)["data"]["result"]

failures = []
targets = json.load(urllib.request.urlopen("http://127.0.0.1:9090/api/v1/targets", timeout=10))
for t in targets["data"]["activeTargets"]:
    print(f'{t["health"]:7} {t["labels"]["job"]:10} {t["scrapeUrl"]} {t["lastError"]}')
    if t["labels"]["job"] in ("gateway", "data") and t["health"] != "up":
        failures.append(f'{t["scrapeUrl"]} not scraped: {t["lastError"]}')

for path in sorted(glob.glob(sys.argv[1] + "/*.json")):
    dash = json.load(open(path))
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "1m").replace("$gateway", ".*")
            try:
                n = len(query(expr))
            except Exception as e:  # a 400 from Prometheus names the parse error
                failures.append(f'{panel["title"]}: {e}')
                continue
            print(f'{n:3} series  {panel["title"]} / {target["legendFormat"]}')
            if panel["title"] == "Circuit breaker state" and n == 0:
                failures.append("breaker state panel has no series")

for f in failures:
    print("FAIL", f)
sys.exit(1 if failures else 0)
PY
echo "deploy/ verified"
