#!/usr/bin/env bash
# Breakwater's gateway beside nginx and beside a direct call, in one run, on this machine.
#
# Three identical backends (one nginx process answering a small JSON body on three
# ports), then for each target -- direct (one backend), nginx as a reverse proxy to the
# three (keepalive upstream, 2 workers), and the breakwater gateway with its default
# policies (routing, P2C balancing, outlier ejection, breaker, retry budget, metrics)
# discovering the three through the registry -- wrk runs at -t2 -c64 and -t1 -c1.
# Each is measured in ROUNDS rounds, nginx and the gateway taking turns going first,
# and the report gives each figure's median over the rounds (RSS: the peak) beside
# every round's own row: on a shared two-core machine one run swings by 10% or more.
# Writes bench/RESULTS.md (the gateway section) with req/s, p50, p99, RSS, each proxy's
# CPU time per request, and the ratios.
#
# Usage: bench/gateway-vs-nginx.sh [duration-seconds (default 15)] [rounds (default 3)]
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-15}"
ROUNDS="${2:-3}"
OUT=bench/RESULTS.md
. bench/lib.sh

need() { command -v "$1" >/dev/null 2>&1; }
if ! need nginx || ! need wrk; then
  echo "installing nginx and wrk from Debian..."
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light wrk >/dev/null
fi
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"

echo "building breakwater (release)..."
cargo build --release --quiet -p breakwater
BW=target/release/breakwater

for v in B1 B2 B3 NG GW RG; do pick "$v"; done
start_backends "$B1" "$B2" "$B3"
start_proxy "$NG" "$B1" "$B2" "$B3"
start_registry "$BW" "$RG" "$B1" "$B2" "$B3"
RUST_LOG=warn detached "$BW" gateway --port "$GW" --bind 127.0.0.1 --registry "http://127.0.0.1:$RG" \
  --config bench/gateway.toml 2>"$WORK/gateway.log"
GW_PID=$DETACHED_PID
PIDS+=($GW_PID)
wait_http "http://127.0.0.1:$GW/health"
wait_http "http://127.0.0.1:$GW/bench/users/1"
wait_http "http://127.0.0.1:$NG/bench/users/1"

# RSS_KB := total VmRSS of the given pids, read with shell builtins only: the sampling
# must not start processes while wrk runs (a process started every half second on two
# busy cores preempts the proxy under test often enough to show in its p99).
rss_sample() {
  local p k v _rest
  RSS_KB=0
  for p in "$@"; do
    while read -r k v _rest; do
      if [ "$k" = "VmRSS:" ]; then RSS_KB=$((RSS_KB + v)); fi
    done < "/proc/$p/status"
  done
}
# TICKS := user and system clock ticks ("u s") summed over the given pids (all their
# threads), read with shell builtins for the same reason.
cpu_ticks() {
  local p u=0 s=0 f
  for p in "$@"; do
    read -r -a f < "/proc/$p/stat"
    u=$((u + f[13])); s=$((s + f[14]))
  done
  TICKS="$u $s"
}
HZ=$(getconf CLK_TCK)
nginx_proxy_pids() { local m; m=$(cat "$WORK/proxy.pid"); echo "$m $(pgrep -P "$m" | tr '\n' ' ')"; }

# run ROUND NAME URL THREADS CONNS PIDS... -> appends
# "round name conns rps p50us p99us rsskb user_us sys_us" to $WORK/all (CPU: the
# proxy's own microseconds of user and system time per request; - for direct)
to_us() { awk -v v="$1" 'BEGIN{ n=v; gsub(/[a-z]+$/,"",n); u=v; sub(/^[0-9.]+/,"",u);
  if(u=="us")m=1; else if(u=="ms")m=1000; else if(u=="s")m=1000000; else m=1; printf "%.0f", n*m }'; }
run() {
  local round=$1 name=$2 url=$3 t=$4 c=$5; shift 5
  local peak=0 quarter i
  # RSS under load: sampled at a quarter, half and three quarters of the run.
  quarter=$((DURATION * 250))
  local before="0 0"
  if [ "$#" -gt 0 ]; then cpu_ticks "$@"; before=$TICKS; fi
  wrk -t"$t" -c"$c" -d"${DURATION}s" --latency "$url" > "$WORK/wrk.out" 2>&1 &
  local wpid=$!
  for i in 1 2 3; do
    sleep "$((quarter / 1000)).$(printf '%03d' $((quarter % 1000)))"
    if [ "$#" -gt 0 ]; then rss_sample "$@"; [ "$RSS_KB" -gt "$peak" ] && peak=$RSS_KB; fi
  done
  wait "$wpid"
  local after="0 0"
  if [ "$#" -gt 0 ]; then cpu_ticks "$@"; after=$TICKS; fi
  local rps p50 p99
  rps=$(awk '/Requests\/sec/{print $2}' "$WORK/wrk.out")
  p50=$(to_us "$(awk '$1=="50%"{print $2}' "$WORK/wrk.out")")
  p99=$(to_us "$(awk '$1=="99%"{print $2}' "$WORK/wrk.out")")
  local errs; errs=$(awk '/Non-2xx|Socket errors/{print}' "$WORK/wrk.out" | tr '\n' ' ')
  local n cpu
  n=$(awk '/requests in/{print $1}' "$WORK/wrk.out")
  cpu=$(awk -v b="$before" -v a="$after" -v n="$n" -v hz="$HZ" -v has="$#" 'BEGIN{
    split(b, x, " "); split(a, y, " ");
    if (has == 0 || n == 0) { print "- -"; exit }
    printf "%.2f %.2f", (y[1]-x[1])*1e6/hz/n, (y[2]-x[2])*1e6/hz/n }')
  echo "$round $name $c $rps $p50 $p99 $peak $cpu $errs" | tee -a "$WORK/all"
}

echo "warming up..."
wrk -t2 -c64 -d3s "http://127.0.0.1:$GW/bench/users/1" >/dev/null
wrk -t2 -c64 -d3s "http://127.0.0.1:$NG/bench/users/1" >/dev/null

echo "round name conns req/s p50us p99us rsskb user_us/req sys_us/req"
for conf in "2 64" "1 1"; do
  set -- $conf
  for r in $(seq 1 "$ROUNDS"); do
    run "$r" direct "http://127.0.0.1:$B1/bench/users/1" "$1" "$2"
    if [ $((r % 2)) -eq 1 ]; then
      run "$r" nginx   "http://127.0.0.1:$NG/bench/users/1" "$1" "$2" $(nginx_proxy_pids)
      run "$r" gateway "http://127.0.0.1:$GW/bench/users/1" "$1" "$2" "$GW_PID"
    else
      run "$r" gateway "http://127.0.0.1:$GW/bench/users/1" "$1" "$2" "$GW_PID"
      run "$r" nginx   "http://127.0.0.1:$NG/bench/users/1" "$1" "$2" $(nginx_proxy_pids)
    fi
  done
done
# One row per target and connection count: each figure's median over the rounds, and
# the peak RSS.
median() { sort -n | awk '{v[NR]=$1} END{ if (NR % 2) print v[(NR+1)/2]; else printf "%.0f\n", (v[NR/2]+v[NR/2+1])/2 }'; }
for c in 64 1; do
  for n in direct nginx gateway; do
    field() { awk -v n="$n" -v c="$c" -v f="$1" '$2==n && $3==c {print $f}' "$WORK/all"; }
    cpu() { if [ "$n" = direct ]; then echo -; else field "$1" | median; fi; }
    echo "$n $c $(field 4 | median) $(field 5 | median) $(field 6 | median) $(field 7 | sort -n | tail -1) $(cpu 8) $(cpu 9)" >> "$WORK/rows"
  done
done

# RESULTS.md: keep other sections, replace ours.
write_report() {
  local cpu kernel
  cpu=$(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo)
  kernel=$(uname -r)
  get() { awk -v n="$1" -v c="$2" -v f="$3" '$1==n && $2==c {print $f}' "$WORK/rows"; }
  ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b>0) printf "%.2f", a/b; else print "n/a" }'; }
  {
    echo "<!-- gateway-vs-nginx: begin -->"
    echo "## Gateway vs nginx vs direct"
    echo
    echo "Measured $(date -u +%Y-%m-%dT%H:%MZ) by \`bench/gateway-vs-nginx.sh $DURATION $ROUNDS\` on $(nproc) cores ($cpu), kernel $kernel, $(free -g | awk '/Mem:/{print $2}') GiB."
    echo "wrk, ${DURATION}s per run, ${ROUNDS} rounds (nginx and the gateway take turns going first), against three identical backends (one nginx process, three ports, a 64-byte JSON body)."
    echo "The first table gives each figure's median over the rounds (RSS: the peak); every round's own figures follow."
    echo "nginx: $("$NGINX" -v 2>&1 | sed 's/.*: //'), 2 workers, keepalive upstream. Gateway: \`bench/gateway.toml\` (default policies on)."
    echo "Everything (wrk, backends, proxy) shares the same $(nproc) cores; every server runs in a session (so a scheduling autogroup) of its own, as nginx puts itself."
    echo "Proxy CPU per request: the proxy's own user and system time over the run (nginx: its two workers; the gateway: its process), divided by the requests served. The kernel's loopback work is charged to whichever process is running, so part of the system time is wrk's and the backend's."
    echo
    echo "| target | connections | req/s | p50 (us) | p99 (us) | RSS under load (MB) | proxy CPU per request, user + system (us) |"
    echo "|---|---|---|---|---|---|---|"
    while read -r n c rps p50 p99 rss user sys _; do
      echo "| $n | $c | $rps | $p50 | $p99 | $(awk -v k="$rss" 'BEGIN{ if (k>0) printf "%.1f", k/1024; else print "-" }') | $(if [ "$user" = - ]; then echo -; else echo "$user + $sys"; fi) |"
    done < "$WORK/rows"
    echo
    echo "Ratios (gateway / nginx) of the medians: req/s at 64 connections **$(ratio "$(get gateway 64 3)" "$(get nginx 64 3)")** (target >= 1.0),"
    echo "p99 at 64 connections **$(ratio "$(get gateway 64 5)" "$(get nginx 64 5)")** (target <= 1.0)."
    echo "Added p50 at one connection over direct: gateway **$(( $(get gateway 1 4) - $(get direct 1 4) )) us** (target <= 25 us), nginx $(( $(get nginx 1 4) - $(get direct 1 4) )) us."
    echo "Gateway RSS under load: **$(awk -v k="$(get gateway 64 6)" 'BEGIN{printf "%.1f", k/1024}') MB** (target <= 40 MB)."
    echo
    printf 'Round by round, req/s gateway / nginx at 64 connections:'
    for r in $(seq 1 "$ROUNDS"); do
      g=$(awk -v r="$r" '$1==r && $2=="gateway" && $3==64 {print $4}' "$WORK/all")
      n=$(awk -v r="$r" '$1==r && $2=="nginx" && $3==64 {print $4}' "$WORK/all")
      printf ' %s' "$(ratio "$g" "$n")"
    done
    echo "."
    echo
    echo "| round | target | connections | req/s | p50 (us) | p99 (us) | CPU per request, user + system (us) |"
    echo "|---|---|---|---|---|---|---|"
    sort -k3,3nr -k1,1n "$WORK/all" | while read -r r n c rps p50 p99 _rss user sys _; do
      echo "| $r | $n | $c | $rps | $p50 | $p99 | $(if [ "$user" = - ]; then echo -; else echo "$user + $sys"; fi) |"
    done
    if [ -f bench/gateway-notes.md ]; then echo; cat bench/gateway-notes.md; fi
    echo "<!-- gateway-vs-nginx: end -->"
  } > "$WORK/section.md"
  touch "$OUT"
  if grep -q "<!-- gateway-vs-nginx: begin -->" "$OUT"; then
    awk -v f="$WORK/section.md" '
      /<!-- gateway-vs-nginx: begin -->/ { while ((getline l < f) > 0) print l; skip=1; next }
      /<!-- gateway-vs-nginx: end -->/ { skip=0; next }
      !skip { print }' "$OUT" > "$WORK/new.md"
    mv "$WORK/new.md" "$OUT"
  else
    { [ -s "$OUT" ] || printf '# Benchmark results\n\nEvery figure here was measured by a script in bench/ on the machine named with it.\n\n'; cat "$WORK/section.md"; } >> "$OUT"
  fi
}
write_report
echo "wrote $OUT"
