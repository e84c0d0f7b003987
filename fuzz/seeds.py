#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets (fuzz/seeds/<target>/) from the shipped configs,
the string literals of the config tests, and hand-written inputs. Run from the repository root;
the fuzzer's corpus (fuzz/corpus/<target>/) is minimised from these and what it found."""
import glob, hashlib, os, re

def rust_strings(src):
    """Plain and raw string literals of a Rust source, unescaped (roughly: enough for seeds)."""
    out = []
    for m in re.finditer(r'r(#*)"(.*?)"\1|"((?:[^"\\]|\\.)*)"', src, re.S):
        if m.group(2) is not None:
            out.append(m.group(2))
            continue
        s = m.group(3)
        s = re.sub(r'\\\n\s*', '', s)
        s = (s.replace('\\n', '\n').replace('\\t', '\t').replace('\\r', '\r')
              .replace('\\"', '"').replace("\\'", "'").replace('\\\\', '\\'))
        out.append(s)
    return out

def write(target, data):
    d = os.path.join('fuzz', 'seeds', target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    name = hashlib.sha1(data).hexdigest()[:16]
    with open(os.path.join(d, name), 'wb') as f:
        f.write(data)

# properties
for f in glob.glob('conf/*.properties'):
    write('properties', open(f, 'rb').read())
for s in rust_strings(open('src/config/properties/tests.rs').read()):
    if re.search(r'^[A-Z_]+=', s, re.M):
        write('properties', s)
for s in [
    "ENDPOINTS=http://127.0.0.1:9001\nLISTENER_PORT=80\n",
    "\ufeffENDPOINTS=http://[::1]:8080/\nLISTENER_ADDR=::1\n",
    "ENDPOINTS=http://a,http://b\nQ_REQUEST_FORMATS=\nENABLE_UPFRONT_Q=true\n",
    "ENDPOINTS=https://127.0.0.1\nPROTO=https\nSSL_AUTO_ENABLE=true\nSSL_AUTO_DOMAIN_NAMES=a.example\nSSL_AUTO_CERTIFICATE_DIR=/tmp/c\n",
    "ENDPOINTS=http://127.0.0.1:1\nCONCURRENCY_PEAK=2000000\nMETRICS_LISTENER=0.0.0.0:9100\n",
    "ENDPOINTS=http://127.0.0.1:1\nDEFERRED_Q_REQUEST_FORMATS=POST /a/* !,ALL\nCUSTOM_RESPONSE_HEADERS=Server|X-A: b\n",
]:
    write('properties', s)

# yaml
for f in glob.glob('conf/*.yaml') + glob.glob('bench/*.yaml'):
    write('yaml', open(f, 'rb').read())
for s in rust_strings(open('src/config/yaml/tests.rs').read()):
    if re.search(r'^\s*[a-z_]+:', s, re.M):
        write('yaml', s)
for s in [
    "upstreams: [http://127.0.0.1:9001]\n",
    "listen: [127.0.0.1:1, {addr: '[::1]:2', tls: false}]\ntls: {cert: a.pem, key: b.pem}\nupstreams: [{url: https://h.example, weight: 2, tls_verify: false, sni: x}]\n",
    "upstreams: [http://a:1]\nclusters: {}\n",
    "upstreams:\n  - http://127.0.0.1:1\nupfront_queue:\n  enabled: true\n  formats: POST /e, PUT !\nresponse_headers:\n  Server: weir\n",
]:
    write('yaml', s)

# formats: the list, then `METHOD TARGET` probes
for s in [
    "POST,PUT,PATCH,DELETE\nPOST /orders\nGET /",
    "POST /orders !,POST\nPOST /orders?id=1\nPOST /orders/7\nPOST /payments",
    "ALL, GET !, ALL /health !, DELETE /admin/* !\nDELETE /admin/users/1\nGET /x\nPOST /health",
    "PUT /*\nPUT /\nPUT http://shop.example/deep?x\nPUT shop",
    "purge;post /a,b;GET /api/* !\nPURGE /cache\nPOST /a,b",
    "ALL\n\n",
    "\nPOST /",
    "GET /a/*,GET //*\nGET //x\nGET /a\nget /a/b",
]:
    write('formats', s)

# request heads
heads = [
    "GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    "GET /a?b HTTP/1.0\r\n\r\n",
    "POST /orders HTTP/1.1\r\nHost: shop.example\r\nContent-Length: 5\r\nX-Request-Id: abc-123\r\n\r\nhello",
    "POST /events HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "PUT /orders/7 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\nabc",
    "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\nabc",
    "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    "GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, x-secret, te\r\nX-Secret: 1\r\nTE: trailers\r\nKeep-Alive: 5\r\nUpgrade: h2c\r\nProxy-Authorization: Basic eA==\r\n\r\n",
    "GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 10.0.0.1\r\nX-Forwarded-For: , 10.0.0.2\r\nX-Forwarded-Proto: https\r\n\r\n",
    "GET / HTTP/1.1\r\nHost: a\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\ntracestate: a=b\r\n\r\n",
    "GET / HTTP/1.1\r\nHost: a\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\ntracestate: a=b\r\n\r\n",
    "GET / HTTP/1.1\r\nHost: a\r\ntraceparent: 01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future\r\nX-Request-Id: has space\r\n\r\n",
    "GET http://shop.example/orders?x=1 HTTP/1.1\r\nHost: shop.example\r\n\r\n",
    "GET http://shop.example/orders HTTP/1.0\r\n\r\n",
    "GET /queue HTTP/1.1\r\nHost: localhost:9100\r\n\r\n",
    "GET /status.json HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "GET /healthz HTTP/1.1\r\nHost: evil.example\r\n\r\n",
    "GET /healthz HTTP/1.1\r\nHost: [::1]:9100\r\n\r\n",
    "GET /healthz HTTP/1.1\r\nHost: METRICS.internal.\r\n\r\n",
    "DELETE /queue/dead HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer fuzz-admin-token-0123456789\r\n\r\n",
    "DELETE /queue/dead HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer wrong\r\n\r\n",
    "POST /queue HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "GET /.well-known/acme-challenge/token HTTP/1.1\r\nHost: a\r\n\r\n",
    "GET /a%20b/\xe9t\xe9 HTTP/1.1\r\nHost: a\r\nX-Obs: \xe9\r\n\r\n",
    "GET / HTTP/1.1\nHost: a\nConnection: x-a, \xe9\nX-A: 1\n\n",
    "OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
    "CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
    "PATCH /health HTTP/1.1\r\nHost: a\r\nIdempotency-Key: k\r\nContent-Length: 0\r\n\r\n",
    "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nshort",
    "GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /second HTTP/1.1\r\nHost: a\r\n\r\n",
    "GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: x\r\n\r\n",
    "HTTP/1.1 400 Bad Request\r\n\r\n",
    "\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
]
for h in heads:
    write('request_head', h.encode('latin-1'))
