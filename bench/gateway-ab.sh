#!/usr/bin/env bash
# Two gateway builds side by side: req/s and CPU per request, in alternating pairs.
#
# The same three backends (one nginx process, three ports) and one registry serve both
# builds, each run as a gateway on its own port with bench/gateway.toml; nginx (2
# workers, keepalive upstream) runs beside them as the reference. Then, PAIRS times,
# each build in turn (the order swapped every pair) gets `wrk -t2 -c64 -d<secs>s` after
# a 2 s warm-up, while its user and system CPU ticks are read from /proc/<pid>/stat.
# CPU per request = ticks / requests; it moves much less than req/s when the machine
# is not quiet, so it is what an A/B of a hot-path change compares.
#
# Usage: bench/gateway-ab.sh BINARY_A BINARY_B [pairs (default 5)] [seconds (default 6)]
# CONFIG_A / CONFIG_B (environment) give each build its own config file instead of
# bench/gateway.toml, to measure a policy's cost with one binary.
# Prints one line per run and the medians. Writes nothing to the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
A="$1"; B="$2"; PAIRS="${3:-5}"; SECS="${4:-6}"
. bench/lib.sh
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
command -v wrk >/dev/null || { echo "wrk is missing: run bench/gateway-vs-nginx.sh once (it installs it)" >&2; exit 1; }

for v in B1 B2 B3 NG RG GA GB; do pick "$v"; done
start_backends "$B1" "$B2" "$B3"
start_proxy "$NG" "$B1" "$B2" "$B3"
start_registry "$A" "$RG" "$B1" "$B2" "$B3"
start_gw() { # binary port config: sets DETACHED_PID
  RUST_LOG=warn detached "$1" gateway --port "$2" --bind 127.0.0.1 --registry "http://127.0.0.1:$RG" \
    --config "$3" >/dev/null 2>"$WORK/gateway-$2.log"
}
start_gw "$A" "$GA" "${CONFIG_A:-bench/gateway.toml}"; PA=$DETACHED_PID; PIDS+=("$PA")
start_gw "$B" "$GB" "${CONFIG_B:-bench/gateway.toml}"; PB=$DETACHED_PID; PIDS+=("$PB")
wait_http "http://127.0.0.1:$GA/bench/users/1"
wait_http "http://127.0.0.1:$GB/bench/users/1"

# user ticks, system ticks and context switches (voluntary + not) summed over the
# given processes and all their threads.
counters() {
  local p u s c
  u=0; s=0; c=0
  for p in "$@"; do
    read -r a b < <(awk '{print $14, $15}' "/proc/$p/stat")
    u=$((u + a)); s=$((s + b))
    c=$((c + $(cat /proc/"$p"/task/*/status | awk '/ctxt_switches/{n+=$2} END{print n+0}')))
  done
  echo "$u $s $c"
}
HZ=$(getconf CLK_TCK)
measure() { # label port pid...
  local label=$1 port=$2; shift 2
  wrk -t2 -c64 -d2s "http://127.0.0.1:$port/bench/users/1" >/dev/null
  read -r u0 s0 c0 < <(counters "$@")
  wrk -t2 -c64 -d"${SECS}s" --latency "http://127.0.0.1:$port/bench/users/1" > "$WORK/wrk.out"
  read -r u1 s1 c1 < <(counters "$@")
  local rps n p99
  rps=$(awk '/Requests\/sec/{print $2}' "$WORK/wrk.out")
  n=$(awk '/requests in/{print $1}' "$WORK/wrk.out")
  p99=$(awk '$1=="99%"{print $2}' "$WORK/wrk.out")
  awk -v l="$label" -v r="$rps" -v n="$n" -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v c=$((c1 - c0)) \
    -v hz="$HZ" -v ld="$(cut -d' ' -f1 /proc/loadavg)" -v p99="$p99" \
    'BEGIN{ printf "%s %.0f %.2f %.2f %.3f %s %s\n", l, r, u*1e6/hz/n, s*1e6/hz/n, c/n, ld, p99 }' | tee -a "$WORK/rows"
}
nginx_workers() { pgrep -P "$(cat "$WORK/proxy.pid")" | tr '\n' ' '; }
echo "build req/s user_us/req sys_us/req switches/req load1 p99"
for i in $(seq 1 "$PAIRS"); do
  if [ $((i % 2)) -eq 1 ]; then measure A "$GA" "$PA"; measure B "$GB" "$PB"
  else measure B "$GB" "$PB"; measure A "$GA" "$PA"; fi
  if [ "$i" -eq 1 ] || [ "$i" -eq "$PAIRS" ]; then measure nginx "$NG" $(nginx_workers); fi
done
echo "medians (req/s, user us, sys us, switches per request):"
for l in A B nginx; do
  awk -v l="$l" '$1==l' "$WORK/rows" | sort -k2 -n | awk '{r[NR]=$2} END{printf "%s req/s %s", "'"$l"'", r[int((NR+1)/2)]}'
  for f in 3 4 5; do
    awk -v l="$l" -v f="$f" '$1==l{print $f}' "$WORK/rows" | sort -n | awk '{v[NR]=$1} END{printf " %s", v[int((NR+1)/2)]}'
  done
  echo
done
