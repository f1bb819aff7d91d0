# Shared by the gateway benchmarks (sourced, not run, from the repository root): a
# scratch directory and clean-up, free ports, waiting for a server, the nginx backends
# and proxy, the registry with the backends registered. The sourcing script sets NGINX
# (the nginx binary) before starting nginx, and adds the processes it starts to PIDS.

WORK="$(mktemp -d)"
PIDS=()
# Stops what the script started (its processes, the nginx backends and proxy) and
# removes the scratch directory, however the script ends.
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$WORK/backend.pid" ] && kill "$(cat "$WORK/backend.pid")" 2>/dev/null || true
  [ -f "$WORK/proxy.pid" ] && kill "$(cat "$WORK/proxy.pid")" 2>/dev/null || true
  sleep 0.5
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Free ports: random ones in 20000-39999 that `ss` shows nobody listening on and that no
# earlier pick of this run took.
CHOSEN=" "
free_port() {
  while :; do
    p=$(( (RANDOM % 20000) + 20000 ))
    case "$CHOSEN" in *" $p "*) continue ;; esac
    if ! ss -ltnH "sport = :$p" | grep -q .; then echo "$p"; return; fi
  done
}
pick() { # pick NAME: sets $NAME to a free port
  local p; p=$(free_port); CHOSEN="$CHOSEN$p "; printf -v "$1" '%s' "$p"
}

# detached CMD...: starts CMD in the background in a session of its own and sets
# DETACHED_PID. nginx does the same to itself when it daemonizes, and with the kernel's
# autogroup scheduling (kernel.sched_autogroup_enabled=1, the default) a session is a
# scheduling group: a proxy left in the script's session would share one group's CPU
# with wrk while nginx has a group to itself. Every server the timed scripts start goes
# through here so that all of them are scheduled alike (instruction counts do not
# depend on it). A background job of a non-interactive shell is not a process-group
# leader, so setsid does not fork and the pid is the server's own.
detached() {
  setsid "$@" &
  DETACHED_PID=$!
}

wait_http() { # wait_http URL [TENTHS]: until it answers 2xx (20 s, or TENTHS/10 s, at most)
  for _ in $(seq 1 "${2:-200}"); do curl -fsS -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "timeout waiting for $1" >&2; return 1
}

# start_backends PORT...: one nginx process (one worker) answering the same small JSON
# body on every given port; its pid file is $WORK/backend.pid.
start_backends() {
  local listen="" p
  for p in "$@"; do listen="$listen listen 127.0.0.1:$p;"; done
  cat > "$WORK/backend.conf" <<NGX
worker_processes 1;
pid $WORK/backend.pid;
error_log $WORK/backend-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { $listen
           location / { default_type application/json; return 200 '{"id":1,"name":"John Doe","email":"john@example.com","age":30}'; } }
}
NGX
  "$NGINX" -c "$WORK/backend.conf" -e "$WORK/backend-error.log"
}

# proxy_conf NAME WORKERS EXTRA PORT BACKEND_PORT...: writes $WORK/NAME.conf, nginx as
# a reverse proxy on PORT to the backends (WORKERS workers, keepalive upstream; EXTRA:
# more main-context directives), its pid file $WORK/NAME.pid.
proxy_conf() {
  local name=$1 workers=$2 extra=$3 port=$4 servers="" p; shift 4
  for p in "$@"; do servers="$servers server 127.0.0.1:$p;"; done
  cat > "$WORK/$name.conf" <<NGX
worker_processes $workers;
$extra
pid $WORK/$name.pid;
error_log $WORK/$name-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream backends {
   $servers
    keepalive 128;
  }
  server {
    listen 127.0.0.1:$port;
    location / {
      proxy_pass http://backends;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
NGX
}

# start_proxy PORT BACKEND_PORT...: nginx as a reverse proxy on PORT to the backends
# (2 workers, keepalive upstream); its pid file is $WORK/proxy.pid.
start_proxy() {
  proxy_conf proxy 2 "" "$@"
  "$NGINX" -c "$WORK/proxy.conf" -e "$WORK/proxy-error.log"
}

# start_registry BINARY PORT BACKEND_PORT...: a breakwater registry on PORT (its own
# session, added to PIDS, log in $WORK/registry.log) with the backends registered.
start_registry() {
  local bin=$1 port=$2; shift 2
  RUST_LOG=warn detached "$bin" registry --port "$port" --bind 127.0.0.1 2>"$WORK/registry.log"
  PIDS+=("$DETACHED_PID")
  wait_http "http://127.0.0.1:$port/health"
  register_backends "$port" "$@"
}

# register_backends REGISTRY_PORT BACKEND_PORT...: lists each backend in the registry
# as an instance of `bench-backend` (the service bench/gateway.toml routes to).
register_backends() {
  local rg=$1 p; shift
  for p in "$@"; do
    curl -fsS -o /dev/null -H 'content-type: application/json' \
      -d "{\"name\":\"bench-backend\",\"port\":$p,\"host\":\"127.0.0.1\",\"heartbeatInterval\":3600}" \
      "http://127.0.0.1:$rg/register"
  done
}
