#!/usr/bin/env bash
# User-space instructions per proxied request of one or more gateway builds, counted
# by valgrind's callgrind: the same count for the same binary and requests whatever
# else the machine is doing, so a hot-path change can be judged on a busy machine
# where req/s and CPU time swing by 10% between runs.
#
# For each binary: one nginx backend, a registry and the gateway (bench/gateway.toml)
# under callgrind, `wrk -t1 -c8 -d10s` through it (CONNS=n for another connection
# count), then the gateway stops and the count is divided by the requests wrk
# finished. Prints, per binary, instructions per request and the part of them in
# memcpy (large futures being moved). Kernel time is not counted: for that, use
# bench/gateway-ab.sh.
#
# Usage: bench/gateway-instructions.sh BINARY... (release builds with debug line
# tables, as the workspace's release profile makes them). CG_KEEP=PREFIX keeps each
# binary's callgrind output as PREFIX.<binary name>. The word `nginx` in place of a
# binary counts nginx as a reverse proxy the same way (one worker process, no master,
# keepalive upstream to the same backend): the reference count to compare with.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "valgrind is missing (apt-get install valgrind)" >&2; exit 1; }
command -v wrk >/dev/null || { echo "wrk is missing: run bench/gateway-vs-nginx.sh once (it installs it)" >&2; exit 1; }
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
. bench/lib.sh

pick B1
start_backends "$B1"

printf '%-40s %12s %14s %8s\n' binary requests instr/request memcpy
for BIN in "$@"; do
  if [ "$BIN" = nginx ]; then
    pick PX
    proxy_conf cg-proxy 1 "daemon off; master_process off;" "$PX" "$B1"
    valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.out" \
      "$NGINX" -c "$WORK/cg-proxy.conf" -e "$WORK/cg-proxy-error.log" 2>"$WORK/valgrind.log" &
    GP=$!; PIDS+=("$GP")
    wait_http "http://127.0.0.1:$PX/bench/users/1" 600
    wrk -t1 -c"${CONNS:-8}" -d10s "http://127.0.0.1:$PX/bench/users/1" > "$WORK/wrk.out"
    # nginx without a master finishes its requests and exits on SIGQUIT.
    kill -QUIT "$GP"; wait "$GP" || true
    [ -n "${CG_KEEP:-}" ] && cp "$WORK/cg.out" "$CG_KEEP.nginx"
  else
    pick RG; pick GW
    RUST_LOG=warn "$BIN" registry --port "$RG" --bind 127.0.0.1 >/dev/null 2>&1 &
    RP=$!; PIDS+=("$RP")
    wait_http "http://127.0.0.1:$RG/health"
    register_backends "$RG" "$B1"
    RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.out" \
      "$BIN" gateway --port "$GW" --bind 127.0.0.1 --registry "http://127.0.0.1:$RG" \
      --config bench/gateway.toml >/dev/null 2>"$WORK/valgrind.log" &
    GP=$!; PIDS+=("$GP")
    # A gateway under callgrind takes a while to start.
    wait_http "http://127.0.0.1:$GW/bench/users/1" 600
    wrk -t1 -c"${CONNS:-8}" -d10s "http://127.0.0.1:$GW/bench/users/1" > "$WORK/wrk.out"
    kill -INT "$GP"; wait "$GP" || true
    [ -n "${CG_KEEP:-}" ] && cp "$WORK/cg.out" "$CG_KEEP.$(basename "$BIN")"
    kill "$RP"; wait "$RP" 2>/dev/null || true
  fi
  n=$(awk '/requests in/{print $1}' "$WORK/wrk.out")
  total=$(callgrind_annotate "$WORK/cg.out" 2>/dev/null | awk '/PROGRAM TOTALS/{gsub(",","",$1); print $1}')
  copy=$(callgrind_annotate "$WORK/cg.out" 2>/dev/null | awk '/__memcpy|__memmove/{gsub(",","",$1); s+=$1} END{print s+0}')
  awk -v b="$BIN" -v n="$n" -v t="$total" -v c="$copy" \
    'BEGIN{ printf "%-40s %12d %14.0f %7.0f%%\n", b, n, t/n, 100*c/t }'
done
