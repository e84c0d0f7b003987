#!/usr/bin/env bash
# TLS termination, weir next to nginx, with the layout of shared/bench/peers.sh: upstreams
# (one nginx worker, two ports) and wrk on CPU 0, the proxy under test alone on CPU 1 with one
# worker thread, listening on https://127.0.0.1:18443 with the same ECDSA P-256 certificate.
#
#   bench/tls.sh [--weir target/release/weir] [--duration S] [--conns N] [--rounds N]
#
# Two loads per proxy: "keepalive" (N connections, many requests each: record-layer cost) and
# "handshake" (Connection: close, so every request is a new TCP + full TLS 1.3 handshake).
# Prints the median requests/s of the rounds. Needs wrk nginx openssl. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."

WEIR=target/release/weir DUR=10 CONNS=64 ROUNDS=3
while [ $# -gt 0 ]; do
  case "$1" in
    --weir) WEIR="$2"; shift 2 ;;
    --duration) DUR="$2"; shift 2 ;;
    --conns) CONNS="$2"; shift 2 ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
for t in wrk nginx openssl taskset; do
  command -v "$t" >/dev/null || { echo "missing $t" >&2; exit 2; }
done

W=$(mktemp -d /tmp/weir-tls-bench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
wait_port() { for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }
wait_closed() { for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null || return 0; sleep 0.1; done; return 1; }

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
  -keyout "$W/key.pem" -out "$W/cert.pem" 2>/dev/null

mkdir -p "$W/up" "$W/nginx"
cat >"$W/up/nginx.conf" <<EOF
worker_processes 1; daemon off; pid $W/up/nginx.pid; error_log $W/up/error.log warn;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  client_body_temp_path $W/up; proxy_temp_path $W/up; fastcgi_temp_path $W/up; uwsgi_temp_path $W/up; scgi_temp_path $W/up;
  server { listen 127.0.0.1:18081; location / { return 200 "hello from upstream\n"; } }
  server { listen 127.0.0.1:18082; location / { return 200 "hello from upstream\n"; } } }
EOF
taskset -c 0 nginx -c "$W/up/nginx.conf" -p "$W/up" & PIDS+=($!)
wait_port 18081; wait_port 18082

cat >"$W/nginx/nginx.conf" <<EOF
worker_processes 1; daemon off; pid $W/nginx/nginx.pid; error_log $W/nginx/error.log warn;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  client_body_temp_path $W/nginx; proxy_temp_path $W/nginx; fastcgi_temp_path $W/nginx; uwsgi_temp_path $W/nginx; scgi_temp_path $W/nginx;
  upstream cluster { server 127.0.0.1:18081; server 127.0.0.1:18082; keepalive 128; }
  server { listen 127.0.0.1:18443 ssl http2;
    ssl_certificate $W/cert.pem; ssl_certificate_key $W/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache off; ssl_session_tickets off;
    location / { proxy_pass http://cluster; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
EOF
cat >"$W/weir.yaml" <<EOF
listen: 127.0.0.1:18443
tls: {cert: $W/cert.pem, key: $W/key.pem}
upstreams: [http://127.0.0.1:18081, http://127.0.0.1:18082]
admin: {listen: off}
log: {level: warn, access: off, error_file: off}
server: {threads: 1, pid_file: $W/weir.pid, upgrade_sock: $W/weir-upgrade.sock}
EOF

# wrk's -H needs "Name: value" with the space; a script avoids quoting it through $1.
echo 'wrk.headers["Connection"] = "close"' >"$W/close.lua"
measure() { # $1 extra wrk args; prints requests/s
  # shellcheck disable=SC2086
  local out; out=$(taskset -c 0 wrk -t1 -c"$CONNS" -d"${DUR}s" $1 "https://127.0.0.1:18443/" 2>&1)
  echo "$out" >>"$W/wrk.log"
  awk '/Requests\/sec/ {print $2}' <<<"$out"
}

: >"$W/results"
for _ in $(seq 1 "$ROUNDS"); do
  for name in nginx weir; do
    wait_closed 18443 || { echo "port 18443 is busy" >&2; exit 2; }
    case $name in
      nginx) taskset -c 1 nginx -c "$W/nginx/nginx.conf" -p "$W/nginx" >"$W/nginx.out" 2>&1 & pid=$! ;;
      weir) taskset -c 1 "$WEIR" run -c "$W/weir.yaml" >"$W/weir.out" 2>&1 & pid=$! ;;
    esac
    PIDS+=("$pid")
    wait_port 18443
    curl -fsSk "https://127.0.0.1:18443/" >/dev/null || echo "warning: $name first request failed" >&2
    echo "$name keepalive $(measure "")" >>"$W/results"
    echo "$name handshake $(measure "-s $W/close.lua")" >>"$W/results"
    kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true
  done
done
python3 - "$W/results" <<'EOF'
import sys, statistics as st, collections
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    name, load, rps = line.split()
    rows[(name, load)].append(float(rps or 0))
print(f"{'proxy':8} {'load':10} {'median req/s':>12}  rounds")
for (name, load), v in sorted(rows.items()):
    print(f"{name:8} {load:10} {st.median(v):12.0f}  {', '.join(f'{x:.0f}' for x in v)}")
for load in ("keepalive", "handshake"):
    w, n = rows.get(("weir", load)), rows.get(("nginx", load))
    if w and n and st.median(n) > 0:
        print(f"weir/nginx {load}: {st.median(w) / st.median(n):.2f}")
EOF
echo "raw: $W" >&2
