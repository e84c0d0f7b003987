#!/usr/bin/env bash
# Slow-client attacks against weir, nginx and HAProxy, side by side in one run.
#
#   bench/slowhttp.sh [--weir CMD] [--conns N] [--secs S] [--modes "H B"] [--body BYTES]
#                     [--only NAME]
#
# For each proxy (nginx, HAProxy, weir; each on 127.0.0.1:18090 over two nginx upstreams on
# :18081/:18082, as in shared/bench/peers.sh) and each slowhttptest mode (-H slow headers a.k.a.
# Slowloris, -B slow body a.k.a. R-U-Dead-Yet), it runs slowhttptest with N connections (3000)
# for S seconds (30) and, from the same address, one probe GET every 0.2 s (each allowed 2 s).
# Prints, per proxy and mode, the probes answered 200 out of those sent. --body sets the
# Content-Length the slow-body mode announces (4096; above weir's max_buffered_body the body
# streams to a node and holds a concurrency slot), --only runs one proxy.
# weir runs with its default limits (bench/weir-slowhttp.yaml). Needs slowhttptest nginx
# haproxy curl (apt-get install -y slowhttptest nginx haproxy curl). Loopback only; every loop
# is bounded.
set -euo pipefail
cd "$(dirname "$0")/.."

CONNS=3000 SECS=30 MODES="H B" BODY=4096 ONLY=""
WEIR="target/release/weir run -c bench/weir-slowhttp.yaml"
while [ $# -gt 0 ]; do
  case "$1" in
    --weir) WEIR="$2"; shift 2 ;;
    --conns) CONNS="$2"; shift 2 ;;
    --secs) SECS="$2"; shift 2 ;;
    --modes) MODES="$2"; shift 2 ;;
    --body) BODY="$2"; shift 2 ;;
    --only) ONLY="$2"; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
for t in slowhttptest nginx haproxy curl; do
  command -v "$t" >/dev/null || { echo "missing $t: apt-get install -y slowhttptest nginx haproxy curl" >&2; exit 2; }
done
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

W=$(mktemp -d /tmp/slowhttp.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

wait_port() { for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }
wait_closed() { for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null || return 0; sleep 0.1; done; return 1; }

mkdir -p "$W/up" "$W/nginx" "$W/haproxy"
cat >"$W/up/nginx.conf" <<EOF
worker_processes 1; daemon off; pid $W/up/nginx.pid; error_log $W/up/error.log warn;
events { worker_connections 8192; }
http { access_log off; keepalive_requests 1000000;
  client_body_temp_path $W/up; proxy_temp_path $W/up; fastcgi_temp_path $W/up; uwsgi_temp_path $W/up; scgi_temp_path $W/up;
  server { listen 127.0.0.1:18081; location / { return 200 "hello from upstream\n"; } }
  server { listen 127.0.0.1:18082; location / { return 200 "hello from upstream\n"; } } }
EOF
nginx -c "$W/up/nginx.conf" -p "$W/up" & PIDS+=($!)
wait_port 18081; wait_port 18082

# The peers as peers.sh runs them, with room for the attack's connections.
cat >"$W/nginx/nginx.conf" <<EOF
worker_processes 1; daemon off; pid $W/nginx/nginx.pid; error_log $W/nginx/error.log warn;
events { worker_connections 8192; }
http { access_log off; keepalive_requests 1000000;
  client_body_temp_path $W/nginx; proxy_temp_path $W/nginx; fastcgi_temp_path $W/nginx; uwsgi_temp_path $W/nginx; scgi_temp_path $W/nginx;
  upstream cluster { server 127.0.0.1:18081; server 127.0.0.1:18082; keepalive 128; }
  server { listen 127.0.0.1:18090;
    location / { proxy_pass http://cluster; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
EOF
cat >"$W/haproxy/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn 8000
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server 5s
  timeout http-request 10s
frontend fe
  bind 127.0.0.1:18090
  default_backend be
backend be
  balance roundrobin
  server s1 127.0.0.1:18081
  server s2 127.0.0.1:18082
EOF

declare -a NAMES=(nginx haproxy weir)
declare -a CMDS=("nginx -c $W/nginx/nginx.conf -p $W/nginx" "haproxy -f $W/haproxy/haproxy.cfg -db" "$WEIR")

# Probes every 0.2 s for $1 seconds; prints "ok sent".
probe() {
  local end=$((SECONDS + $1)) ok=0 sent=0 code
  while [ $SECONDS -lt $end ]; do
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 http://127.0.0.1:18090/ || true)
    sent=$((sent + 1)); [ "$code" = 200 ] && ok=$((ok + 1))
    sleep 0.2
  done
  echo "$ok $sent"
}

printf '%-8s %-22s %8s %8s %6s\n' proxy mode ok sent share
for i in "${!NAMES[@]}"; do
  name=${NAMES[$i]}
  [ -n "$ONLY" ] && [ "$ONLY" != "$name" ] && continue
  for mode in $MODES; do
    wait_closed 18090
    $(echo "${CMDS[$i]}") >"$W/$name.$mode.log" 2>&1 & pid=$!; PIDS+=($pid)
    wait_port 18090
    slowhttptest -"$mode" -c "$CONNS" -r 500 -l "$SECS" -i 10 -p 3 -s "$BODY" \
      -u http://127.0.0.1:18090/ >"$W/slowhttptest.$name.$mode.log" 2>&1 & att=$!
    sleep 3 # let the attack open its connections first
    read -r ok sent < <(probe $((SECS - 5)))
    wait $att || true
    kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true
    label=$([ "$mode" = H ] && echo "slow headers (-H)" || echo "slow body (-B)")
    printf '%-8s %-22s %8s %8s %5s%%\n' "$name" "$label" "$ok" "$sent" "$((100 * ok / (sent > 0 ? sent : 1)))"
  done
done
echo "logs: $W"
