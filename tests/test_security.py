"""SPEC section 8 on a live server: binding, the token, TLS, browser attacks, the headers values
are served with, and an access log that keeps values and secrets out."""

from __future__ import annotations

import base64
import hmac
import html
import http.client
import json
import os
import re
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    KVSERVER,
    START_TIMEOUT,
    Response,
    assert_no_traceback,
    parse_response,
    raw_exchange,
    read_line,
    require_service,
    wait_for,
)

import kvserver

TOKEN = "s3cret-Tok3n"
SECRET = "secretvalue"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def fetch(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    context: ssl.SSLContext | None = None,
) -> Response:
    """One request to 127.0.0.1:port on a fresh connection, over TLS when given a context."""
    if context is None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    else:
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=15, context=context)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return Response(response.status, response.headers, response.read())
    finally:
        connection.close()


def half_closed_exchange(port: int, data: bytes) -> bytes:
    """Send bytes, half-close, and return what comes back until the server closes."""
    return raw_exchange(port, data, timeout=5.0, half_close=True)


class Spawned:
    """A kvserver started by `spawn`, with its own environment or TLS options."""

    def __init__(self, process: subprocess.Popen, start_line: str, log_path: Path) -> None:
        self.process = process
        self.start_line = start_line
        self.log_path = log_path
        scheme, _, rest = start_line.partition("://")
        assert rest, f"no URL in the start line {start_line!r}"
        self.scheme = scheme.rsplit(" ", 1)[-1]
        self.port = int(rest.split("/", 1)[0].rsplit(":", 1)[1])

    def stderr(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator:
    """spawn(*args, env=None) starts `python kvserver.py --port 0 *args` and reads its start line
    with a deadline; every server started is killed at the end."""
    processes: list[subprocess.Popen] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Spawned:
        data_dir = tmp_path / f"data-{len(processes)}"
        log_path = tmp_path / f"spawned-{len(processes)}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, str(KVSERVER), "--port", "0", "--data-dir", str(data_dir), *args],
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=tmp_path,
                env=env,
            )
        processes.append(process)
        return Spawned(process, read_line(process, START_TIMEOUT), log_path)

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(15)
        if process.stdout:
            process.stdout.close()


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1, and its key."""
    openssl = shutil.which("openssl")
    if openssl is None:
        require_service("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        capture_output=True,
        timeout=60,
    )
    if made.returncode != 0:
        require_service(f"openssl could not make a certificate: {made.stderr.decode(errors='replace')}")
    return cert, key


# Binding


def test_the_server_binds_to_127_0_0_1_by_default(make_server):
    server = make_server("--quiet")
    assert "http://127.0.0.1:" in server.start_line
    listening = Path("/proc/net/tcp")
    if listening.exists():  # the socket itself, not only what the start line says
        port = f"{server.port:04X}"
        local = [line.split()[1] for line in listening.read_text().splitlines()[1:] if line.split()[3] == "0A"]
        assert f"0100007F:{port}" in local, local
        assert f"00000000:{port}" not in local
    assert server.get("/health").status == 200


# Token


@pytest.fixture
def token_server(make_live_server):
    return make_live_server(token=TOKEN)


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer wrong-token",
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN[:-1]}",
        "Bearer ",
        basic("me", "wrong-token"),
        basic(TOKEN, "wrong-token"),  # the token as user name is not the password
        basic("me", ""),
        "Basic not-base64!!",
        f"Token {TOKEN}",
        TOKEN,
        f"Digest {TOKEN}",
    ],
)
def test_a_request_without_the_right_token_is_401_with_a_basic_challenge(token_server, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    response = token_server.get("/keys", headers=headers)
    assert response.status == 401
    challenge = response.headers["WWW-Authenticate"]
    assert challenge is not None and challenge.startswith('Basic realm="kvserver"'), challenge
    problem = response.problem()
    assert TOKEN not in response.body.decode()
    assert problem["detail"]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/", None),
        ("GET", "/set?k=v", None),
        ("GET", "/get?key=k", None),
        ("GET", "/delete?key=k", None),
        ("GET", "/keys", None),
        ("GET", "/metrics", None),
        ("PUT", "/kv/k", b"v"),
        ("GET", "/kv/k", None),
        ("HEAD", "/kv/k", None),
        ("DELETE", "/kv/k", None),
        ("POST", "/RPC2", b"<?xml version='1.0'?><methodCall><methodName>keys</methodName></methodCall>"),
        ("GET", "/no-such-route", None),
    ],
)
def test_every_route_but_health_needs_the_token(token_server, method, path, body):
    response = token_server.request(method, path, body=body)
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith('Basic realm="kvserver"')
    assert token_server.get("/get?key=k", headers={"Authorization": f"Bearer {TOKEN}"}).status == 404


def test_health_needs_no_token(token_server):
    response = token_server.get("/health")
    assert response.status == 200
    assert response.json()["status"] == "ok"


def test_the_bearer_token_lets_a_client_set_and_get(token_server):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert token_server.get("/set?greeting=hello", headers=auth).status == 201
    response = token_server.get("/get?key=greeting", headers=auth)
    assert (response.status, response.body) == (200, b"hello")
    put = token_server.request("PUT", "/kv/blob", body=b"\x00\x01", headers={"Authorization": f"bearer  {TOKEN} "})
    assert put.status == 201


@pytest.mark.parametrize("user", ["me", "", "admin", "someone with spaces", TOKEN])
def test_basic_auth_with_the_token_as_password_and_any_user_name_is_accepted(token_server, user):
    auth = {"Authorization": basic(user, TOKEN)}
    assert token_server.get("/set?greeting=hello", headers=auth).status in (200, 201)
    response = token_server.get("/get?key=greeting", headers=auth)
    assert (response.status, response.body) == (200, b"hello")


def test_the_token_is_compared_with_hmac_compare_digest(monkeypatch):
    """Constant time: the token check goes through hmac.compare_digest, for Bearer and Basic alike."""
    calls: list[tuple[object, object]] = []
    real_compare = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real_compare(a, b)

    monkeypatch.setattr(kvserver.hmac, "compare_digest", spy)
    server = kvserver.KVServer(("127.0.0.1", 0), kvserver.MemoryStorage(), token=TOKEN, quiet=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        assert fetch(port, "GET", "/keys", headers={"Authorization": "Bearer wrong"}).status == 401
        assert fetch(port, "GET", "/keys", headers={"Authorization": f"Bearer {TOKEN}"}).status == 200
        assert fetch(port, "GET", "/keys", headers={"Authorization": basic("me", TOKEN)}).status == 200
    finally:
        server.shutdown()
        server.stop()
        thread.join(10)

    def text(value: object) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    compared = [{text(a), text(b)} for a, b in calls]
    assert {"wrong", TOKEN} in compared
    assert compared.count({TOKEN}) == 2, calls


def test_the_kv_token_environment_variable_sets_the_token(spawn):
    server = spawn("--quiet", env={**os.environ, "KV_TOKEN": "from-the-environment"})
    assert fetch(server.port, "GET", "/keys").status == 401
    assert fetch(server.port, "GET", "/keys", headers={"Authorization": f"Bearer {TOKEN}"}).status == 401
    response = fetch(server.port, "GET", "/keys", headers={"Authorization": "Bearer from-the-environment"})
    assert response.status == 200
    assert (
        fetch(server.port, "GET", "/keys", headers={"Authorization": basic("u", "from-the-environment")}).status == 200
    )
    assert fetch(server.port, "GET", "/health").status == 200


def test_without_a_token_or_kv_token_no_authorization_is_needed(spawn):
    env = {name: value for name, value in os.environ.items() if name != "KV_TOKEN"}
    server = spawn("--quiet", env=env)
    assert fetch(server.port, "GET", "/keys").status == 200


def test_the_token_never_appears_in_the_access_log(make_server):
    server = make_server("--token", TOKEN)
    attempts = [
        {"Authorization": f"Bearer {TOKEN}"},
        {"Authorization": basic("me", TOKEN)},
        {"Authorization": "Bearer wrong-guess-1"},
        {"Authorization": basic("me", "wrong-guess-2")},
        {"Authorization": f"Token {TOKEN}"},
        {},
    ]
    statuses = [server.get("/keys", headers=headers).status for headers in attempts]
    assert statuses == [200, 200, 401, 401, 401, 401]
    assert server.get(f"/set?stored={TOKEN}", headers=attempts[0]).status == 201  # a value is never logged
    wait_for(lambda: server.stderr().count('"GET /') >= len(attempts) + 1, what="the access log lines")
    log = server.stderr()
    for secret in [TOKEN, "wrong-guess-1", "wrong-guess-2", base64.b64encode(f"me:{TOKEN}".encode()).decode()]:
        assert secret not in log, log
    assert '"GET /keys HTTP/1.1" 401' in log


def test_a_non_loopback_bind_without_a_token_makes_one_prints_it_and_requires_it(spawn):
    env = {name: value for name, value in os.environ.items() if name != "KV_TOKEN"}
    tokens = []
    for _ in range(2):
        server = spawn("--quiet", "--bind", "0.0.0.0", env=env)
        match = re.search(r"; token required: ([A-Za-z0-9_-]+) \(", server.start_line)
        assert match, server.start_line
        token = match.group(1)
        tokens.append(token)
        assert len(token) >= 16
        assert fetch(server.port, "GET", "/keys").status == 401
        assert fetch(server.port, "GET", "/set?planted=1").status == 401
        assert fetch(server.port, "GET", "/keys", headers={"Authorization": f"Bearer {token}"}).status == 200
        assert fetch(server.port, "GET", "/keys", headers={"Authorization": basic("me", token)}).status == 200
        assert fetch(server.port, "GET", "/health").status == 200
    assert tokens[0] != tokens[1], "a new random token at each start"


def test_no_token_serves_a_non_loopback_address_without_one(spawn):
    env = {name: value for name, value in os.environ.items() if name != "KV_TOKEN"}
    server = spawn("--quiet", "--bind", "0.0.0.0", "--no-token", env=env)
    assert server.start_line.rstrip().endswith("; no token, TLS off"), server.start_line
    assert fetch(server.port, "GET", "/keys").status == 200


def test_a_token_given_for_a_non_loopback_bind_is_the_one_required(spawn):
    server = spawn("--quiet", "--bind", "0.0.0.0", env={**os.environ, "KV_TOKEN": TOKEN})
    assert "; token required, TLS off" in server.start_line and TOKEN not in server.start_line
    assert fetch(server.port, "GET", "/keys", headers={"Authorization": f"Bearer {TOKEN}"}).status == 200


# TLS


def test_tls_serves_https_with_the_given_certificate(spawn, certificate):
    cert, key = certificate
    server = spawn("--quiet", "--certfile", str(cert), "--keyfile", str(key))
    assert f"https://127.0.0.1:{server.port}/" in server.start_line
    assert server.start_line.rstrip().endswith(", TLS on"), server.start_line
    context = ssl.create_default_context(cafile=str(cert))
    created = fetch(server.port, "GET", "/set?greeting=hello%20over%20tls", context=context)
    assert created.status == 201
    response = fetch(server.port, "GET", "/get?key=greeting", context=context)
    assert (response.status, response.body) == (200, b"hello over tls")
    put = fetch(server.port, "PUT", "/kv/blob", body=b"\xff" * 100_000, context=context)
    assert put.status == 201
    assert fetch(server.port, "GET", "/kv/blob", context=context).body == b"\xff" * 100_000
    # Over TLS the server's own origin is https://
    own = {"Origin": f"https://127.0.0.1:{server.port}"}
    assert fetch(server.port, "GET", "/keys", headers=own, context=context).status == 200
    plain = {"Origin": f"http://127.0.0.1:{server.port}"}
    assert fetch(server.port, "GET", "/keys", headers=plain, context=context).status == 403


def test_a_chunked_answer_over_tls_is_whole(spawn, certificate):
    # Over plain TCP a chunk's pieces leave with writev; over TLS they are joined and sent through
    # the TLS socket: an export of more than one chunk, and an event stream, arrive whole.
    cert, key = certificate
    server = spawn("--quiet", "--certfile", str(cert), "--keyfile", str(key))
    context = ssl.create_default_context(cafile=str(cert))
    values = {f"k{n:02}": bytes([n]) * 3_000 for n in range(40)}  # 160 KB of base64: three chunks
    for key_name, value in values.items():
        assert fetch(server.port, "PUT", f"/kv/{key_name}", body=value, context=context).status == 201
    export = fetch(server.port, "GET", "/export", context=context)
    assert export.status == 200 and export.headers["Transfer-Encoding"] == "chunked"
    lines = [json.loads(line) for line in export.body.splitlines()]
    assert {line["key"]: base64.b64decode(line["value"]) for line in lines} == values
    connection = http.client.HTTPSConnection("127.0.0.1", server.port, timeout=15, context=context)
    try:
        connection.request("GET", "/events")
        stream = connection.getresponse()
        assert stream.status == 200
        assert stream.readline().startswith(b"id: ") and stream.readline() == b"\n"  # where it begins
        assert fetch(server.port, "PUT", "/kv/k00", body=b"new", context=context).status == 200
        message = [stream.readline() for _ in range(4)]
        assert message[1:2] == [b"event: put\n"] and message[3] == b"\n", message
        assert json.loads(message[2].removeprefix(b"data: "))["key"] == "k00"
    finally:
        connection.close()


def test_a_plain_http_client_on_the_tls_port_is_told_to_use_https_and_the_server_goes_on(spawn, certificate):
    cert, key = certificate
    server = spawn("--certfile", str(cert), "--keyfile", str(key))
    context = ssl.create_default_context(cafile=str(cert))
    assert fetch(server.port, "GET", "/set?greeting=hello", context=context).status == 201
    for _ in range(3):
        answer = half_closed_exchange(server.port, b"GET /get?key=greeting HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert b"hello" not in answer
        response = parse_response(answer)
        assert response.status == 400
        assert "https://" in response.problem()["detail"]
    plain = fetch(server.port, "GET", "/get?key=greeting")  # http.client, as a user's script would
    assert plain.status == 400 and "https://" in plain.problem()["detail"]
    assert server.process.poll() is None
    response = fetch(server.port, "GET", "/get?key=greeting", context=context)
    assert (response.status, response.body) == (200, b"hello")
    assert_no_traceback(server.stderr())


def test_a_client_that_never_starts_the_tls_handshake_does_not_hold_up_others(spawn, certificate):
    cert, key = certificate
    server = spawn("--quiet", "--certfile", str(cert), "--keyfile", str(key))
    context = ssl.create_default_context(cafile=str(cert))
    with socket.create_connection(("127.0.0.1", server.port), timeout=5):  # connected, silent
        started = time.monotonic()
        assert fetch(server.port, "GET", "/health", context=context).status == 200
        assert time.monotonic() - started < 3


def test_a_tls_record_broken_half_way_through_a_body_is_a_client_fault_not_a_500(spawn, certificate):
    """A record that does not decrypt (bad record MAC), sent where the rest of a PUT's body was
    due, ends that connection like a cut-off upload: nothing stored, no 500 counted, no traceback."""
    cert, key = certificate
    server = spawn("--quiet", "--certfile", str(cert), "--keyfile", str(key))
    context = ssl.create_default_context(cafile=str(cert))
    with context.wrap_socket(
        socket.create_connection(("127.0.0.1", server.port), timeout=10), server_hostname="localhost"
    ) as tls:
        tls.sendall(b"PUT /kv/broken HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        under = socket.socket(fileno=tls.fileno())  # the same connection, beneath TLS
        try:
            under.settimeout(10)
            under.sendall(b"\x17\x03\x03\x00\x10" + b"not a real record")
            for _ in range(100):  # what the server sends (a TLS alert), until it closes the connection
                if not under.recv(65536):  # (each recv waits up to 10 s)
                    break
        finally:
            under.detach()
    assert fetch(server.port, "GET", "/kv/broken", context=context).status == 404
    metrics = fetch(server.port, "GET", "/metrics", context=context).body.decode()
    assert 'status="500"' not in metrics
    assert_no_traceback(server.stderr())


@pytest.mark.parametrize("option", ["--certfile", "--keyfile"])
def test_a_certfile_without_a_keyfile_or_the_other_way_round_exits_2(tmp_path, option):
    pem = tmp_path / "only.pem"
    pem.write_text("not used")
    finished = subprocess.run(
        [sys.executable, str(KVSERVER), "--port", "0", "--data-dir", str(tmp_path / "data"), option, str(pem)],
        capture_output=True,
        timeout=30,
    )
    assert finished.returncode == 2, finished
    message = finished.stderr.decode()
    assert "--certfile" in message and "--keyfile" in message
    assert "Traceback" not in message
    assert len(message.strip().splitlines()) == 1, message


# Browser attacks


@pytest.fixture
def plain(make_live_server):
    return make_live_server()


@pytest.mark.parametrize("site", ["cross-site", "same-site"])
def test_a_cross_site_or_same_site_request_is_403_and_stores_nothing(plain, site):
    response = plain.get(f"/set?planted={SECRET}", headers={"Sec-Fetch-Site": site})
    assert response.status == 403
    assert response.problem()["detail"]
    assert plain.get("/get?key=planted").status == 404
    assert not (plain.data_dir / "planted").exists()


@pytest.mark.parametrize("second", ["cross-site", "same-site"])
def test_a_second_sec_fetch_site_field_of_another_site_is_not_lost_in_the_join(plain, second):
    """Two fields reach the routes joined ("same-origin, cross-site"), which matched neither value."""
    request = (
        f"GET /set?planted={SECRET} HTTP/1.1\r\nHost: 127.0.0.1:{plain.port}\r\n"
        f"Sec-Fetch-Site: same-origin\r\nSec-Fetch-Site: {second}\r\nConnection: close\r\n\r\n"
    ).encode()
    assert plain.raw(request).startswith(b"HTTP/1.1 403 ")
    assert plain.get("/get?key=planted").status == 404


@pytest.mark.parametrize("site", ["Cross-Site", "Same-Site"])
def test_a_cross_site_or_same_site_request_cannot_read_or_delete(plain, site):
    assert plain.get("/set?mine=kept").status == 201
    for path in ["/get?key=mine", "/delete?key=mine", "/", "/keys", "/kv/mine"]:
        response = plain.get(path, headers={"Sec-Fetch-Site": site})
        assert response.status == 403, path
        assert b"kept" not in response.body
    assert plain.request("PUT", "/kv/mine", body=b"x", headers={"Sec-Fetch-Site": site.lower()}).status == 403
    assert plain.get("/get?key=mine").body == b"kept"


@pytest.mark.parametrize("site", ["same-origin", "none"])
def test_a_same_origin_or_user_initiated_request_is_served(plain, site):
    assert plain.get("/set?mine=ok", headers={"Sec-Fetch-Site": site}).status == 201
    assert plain.get("/get?key=mine", headers={"Sec-Fetch-Site": site}).body == b"ok"


@pytest.mark.parametrize(
    "origin",
    [
        "http://evil.example",
        "null",
        "http://127.0.0.1",  # another port is another origin
        "http://127.0.0.1:1",
        "https://127.0.0.1:{port}",
        "http://localhost:{port}",  # the Host below is 127.0.0.1
        "http://127.0.0.1:{port}.evil.example",
    ],
)
def test_a_foreign_origin_is_403_and_stores_nothing(plain, origin):
    response = plain.get(f"/set?planted={SECRET}", headers={"Origin": origin.format(port=plain.port)})
    assert response.status == 403
    assert response.problem()["detail"]
    assert plain.get("/get?key=planted").status == 404


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST:{port}"])
def test_the_servers_own_origin_is_served(plain, host):
    host = host.format(port=plain.port)
    headers = {"Host": host, "Origin": f"http://{host}"}
    assert plain.get("/set?mine=ok", headers=headers).status == 201
    assert plain.get("/get?key=mine", headers=headers).body == b"ok"


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:{port}",
        "127.0.0.1.evil.example:{port}",
        "10.1.2.3:{port}",
        "[::2]",
        # Malformed values that began with a loopback name, which a parser may read as another host:
        "[::1]evil.example",
        "localhost:{port}@evil.example",
        "127.0.0.1:x{port}",
        "localhost:{port} evil.example",
    ],
)
def test_a_foreign_host_is_403_while_bound_to_loopback(plain, host):
    headers = {"Host": host.format(port=plain.port)}
    response = plain.get(f"/set?planted={SECRET}", headers=headers)
    assert response.status == 403
    assert response.problem()["detail"]
    assert plain.get("/get?key=mine", headers=headers).status == 403
    assert plain.get("/get?key=planted").status == 404


@pytest.mark.parametrize(
    "host",
    [
        "localhost:{port}",
        "127.0.0.1:{port}",
        "[::1]:{port}",
        "localhost",
        "127.0.0.1",
        "kv.localhost:{port}",
        # A name in its absolute form (RFC 6761: localhost. is localhost), as a browser sends it if typed so:
        "localhost.:{port}",
        "LocalHost.:{port}",
        "app.localhost.:{port}",
    ],
)
def test_a_loopback_host_is_served(plain, host):
    headers = {"Host": host.format(port=plain.port)}
    assert plain.get("/set?mine=ok", headers=headers).status == 201
    assert plain.get("/get?key=mine", headers=headers).body == b"ok"


def test_an_absolute_form_target_is_checked_by_its_own_host_not_the_host_field(plain):
    """RFC 9112 section 3.2.2: the server ignores Host and uses the target's authority."""
    loopback = f"127.0.0.1:{plain.port}".encode()

    def status(target: bytes, host: bytes) -> bytes:
        answer = plain.raw(b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
        return answer[9:12]

    assert status(b"http://evil.example/set?planted=1", loopback) == b"403"
    assert status(b"http://" + loopback + b"/set?served=1", b"evil.example") == b"201"
    assert status(b"HTTP://" + loopback + b"/health", loopback) == b"200"  # a scheme is case-insensitive
    assert status(b"hTTps://localhost/health", loopback) == b"200"
    assert status(b"http://localhost:1@evil.example/set?planted=3", b"evil.example") == b"400"  # user information
    assert status(b"http:///set?planted=4", loopback) == b"400"  # no host (RFC 9110 section 4.2.1)
    assert plain.get("/get?key=planted").status == 404


def test_any_host_is_served_when_bound_to_all_addresses(make_server):
    server = make_server("--quiet", "--bind", "0.0.0.0", "--no-token")
    headers = {"Host": f"kv.example.org:{server.port}"}
    assert fetch(server.port, "GET", "/set?mine=ok", headers=headers).status == 201
    response = fetch(server.port, "GET", "/get?key=mine", headers=headers)
    assert (response.status, response.body) == (200, b"ok")
    # The Origin and Sec-Fetch-Site checks still hold there.
    assert fetch(server.port, "GET", "/keys", headers={**headers, "Origin": "http://evil.example"}).status == 403
    assert fetch(server.port, "GET", "/keys", headers={**headers, "Sec-Fetch-Site": "cross-site"}).status == 403


# What values are served with

SCRIPTED = {
    "page.html": ("text/html; charset=utf-8", b"<!doctype html><script>document.title='owned'</script>"),
    "image.svg": ("image/svg+xml", b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'),
    # over 64 KiB: streamed from its file, not from memory
    "big.svg": ("image/svg+xml", b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script>' + b" " * 100_000),
    "octets": ("application/octet-stream", b"<html><script>alert(1)</script>"),
}


def assert_sandboxed(response: Response) -> None:
    assert response.headers["X-Content-Type-Options"] == "nosniff", response.headers
    assert response.headers["Content-Security-Policy"] == "sandbox", response.headers


@pytest.mark.parametrize("key", list(SCRIPTED))
def test_stored_html_and_svg_are_served_with_nosniff_and_a_sandbox_policy(plain, key):
    content_type, value = SCRIPTED[key]
    assert plain.request("PUT", f"/kv/{key}", body=value, headers={"Content-Type": content_type}).status == 201
    for method, path in [("GET", f"/kv/{key}"), ("HEAD", f"/kv/{key}"), ("GET", f"/get?key={key}")]:
        response = plain.request(method, path)
        assert response.status == 200
        assert response.headers["Content-Type"] == content_type
        assert response.body == (value if method == "GET" else b"")
        assert_sandboxed(response)
    etag = plain.get(f"/kv/{key}").headers["ETag"]
    not_modified = plain.get(f"/kv/{key}", headers={"If-None-Match": etag})
    assert not_modified.status == 304
    assert_sandboxed(not_modified)


def test_a_value_set_through_the_query_string_is_served_sandboxed(plain):
    assert plain.get("/set?page=%3Cscript%3Ealert(1)%3C/script%3E").status == 201
    response = plain.get("/get?key=page")
    assert response.body == b"<script>alert(1)</script>"
    assert_sandboxed(response)


@pytest.mark.parametrize(
    "request_line",
    [b"GET /get?key=page.html", b"GET /get?key=page.html HTTP/0.9", b"GET /kv/page.html HTTP/0.9"],
)
def test_a_value_is_never_served_without_its_headers_not_even_to_http_0_9(plain, request_line):
    content_type, value = SCRIPTED["page.html"]
    assert plain.request("PUT", "/kv/page.html", body=value, headers={"Content-Type": content_type}).status == 201
    answer = half_closed_exchange(plain.port, request_line + b"\r\nHost: 127.0.0.1\r\n\r\n")
    assert not answer.startswith(value), "the value went out bare, with no header at all"
    assert answer.startswith((b"HTTP/1.0 ", b"HTTP/1.1 ")), answer[:200]
    head = answer.partition(b"\r\n\r\n")[0].lower()
    if answer[9:12] == b"200":
        assert b"\r\nx-content-type-options: nosniff" in head
        assert b"\r\ncontent-security-policy: sandbox" in head


def test_the_html_page_escapes_every_key(plain):
    keys = ["<script>alert(1)</script>", '"><img src=x onerror=alert(2)>', "a&b'c"]
    for key in keys:
        assert plain.request("PUT", "/kv/" + urllib.parse.quote(key, safe=""), body=b"v").status == 201
    response = plain.get("/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/html")
    page = response.body.decode()
    for key in keys:
        folder = key.rpartition("/")[0]  # the page browses folders: a key with a slash is listed in its own
        listing = (
            page
            if not folder
            else plain.get(
                f"/?prefix={urllib.parse.quote(folder + '/')}", headers={"Accept": "text/html"}
            ).body.decode()
        )
        assert key not in page and key not in listing
        assert html.escape(key) in listing
    prefix = '"><script>alert(3)</script>'
    filtered = plain.get("/?prefix=" + urllib.parse.quote(prefix), headers={"Accept": "text/html"}).body.decode()
    assert prefix not in filtered and "<script>" not in filtered


# The access log


@pytest.fixture
def logged(make_server):
    return make_server()


def wait_for_log(server, text: str) -> str:
    wait_for(lambda: text in server.stderr(), what=f"{text!r} in the access log")
    return server.stderr()


def test_the_access_log_hides_values_and_shows_keys(logged):
    assert logged.get(f"/set?name={SECRET}").status == 201
    assert logged.get(f"/set?key=other&value={SECRET}2&ttl=60").status == 201
    assert logged.get("/get?key=name").body == SECRET.encode()
    assert logged.get(f"/set?key={SECRET}3").status == 201  # the first shape: key "key", value SECRET3
    assert logged.get("/keys?prefix=na&limit=5").status == 200
    assert logged.request("PUT", "/kv/photos/cat.jpg?ttl=60", body=SECRET.encode()).status == 201
    log = wait_for_log(logged, '"PUT /kv/photos/cat.jpg?ttl=60 HTTP/1.1" 201')
    assert '"GET /get?key=name HTTP/1.1" 200' in log
    assert '"GET /set?name=… HTTP/1.1" 201' in log
    assert '"GET /set?key=other&value=…&ttl=60 HTTP/1.1" 201' in log
    assert '"GET /set?key=… HTTP/1.1" 201' in log
    assert '"GET /keys?prefix=na&limit=5 HTTP/1.1" 200' in log
    assert SECRET not in log


def test_the_access_log_hides_a_value_stored_under_a_key_named_like_a_setting(logged):
    """/set?<key>=<value> stores a value whatever the key is called: prefix=, ttl=, wait=..."""
    names = ["key", "ttl", "prefix", "delimiter", "limit", "after", "wait"]
    for name in names:
        assert logged.get(f"/set?{name}={SECRET}-{name}").status in (200, 201)
    assert logged.request("PUT", "/kv/set?ttl=60", body=b"v").status == 201  # a key named "set": ttl is shown
    log = wait_for_log(logged, '"PUT /kv/set?ttl=60 HTTP/1.1" 201')
    for name in names:
        assert f'"GET /set?{name}=… HTTP/1.1"' in log
    assert SECRET not in log


def test_the_access_log_redacts_a_malformed_set_answered_400(logged):
    assert logged.get(f"/set?name={SECRET}&also={SECRET}").status == 400
    assert logged.get(f"/set?name={SECRET}&bare").status == 400
    log = wait_for_log(logged, '"GET /set?name=…&bare HTTP/1.1" 400')
    assert '"GET /set?name=…&also=… HTTP/1.1" 400' in log
    assert SECRET not in log


def test_the_access_log_redacts_a_request_line_http_server_rejects(logged):
    answer = half_closed_exchange(
        logged.port, f"GET /set?name={SECRET} HTTP/1.1 junk\r\nHost: 127.0.0.1\r\n\r\n".encode()
    )
    assert answer, "no answer"
    log = wait_for_log(logged, "GET /set?name=… HTTP/1.1 junk")
    assert SECRET not in log
    assert logged.get(f"/get?key=name&x={SECRET}").status == 400
    assert SECRET not in wait_for_log(logged, "GET /get?key=name&x=… HTTP/1.1")


def test_the_access_log_never_records_a_value_with_spaces_in_it(logged):
    answer = half_closed_exchange(logged.port, b"GET /set?name=top secret words HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400"), answer
    answer = half_closed_exchange(logged.port, b"GET /set?name=top\tsecret HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert answer, "no answer"
    assert logged.get("/set?marker=x").status == 201
    log = wait_for_log(logged, "GET /set?marker=…")
    assert "secret" not in log and "words" not in log, log


def test_the_access_log_never_records_an_over_long_request_line(logged):
    line = f"GET /set?name={SECRET}{'x' * 70_000} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    answer = half_closed_exchange(logged.port, line.encode())
    assert answer.startswith(b"HTTP/1.1 414"), answer[:200]
    assert logged.get("/set?marker=x").status == 201
    log = wait_for_log(logged, "GET /set?marker=…")
    assert SECRET not in log
    assert "xxxxxxxx" not in log


# Links another local user put in the data dir, and a token in the access log (review 12f)


def run_server_once(data_dir: Path, cwd: Path) -> tuple[int | None, str]:
    """Start kvserver on `data_dir`, let it start (or refuse to), stop it; its exit status
    (None if it had to be killed) and what it printed."""
    process = subprocess.Popen(
        [sys.executable, str(KVSERVER), "--port", "0", "--quiet", "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=cwd,
    )
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], START_TIMEOUT)
    line = process.stdout.readline().decode(errors="replace") if ready else ""
    if " serving " in line:  # (else it refused to start, and is exiting)
        process.send_signal(signal.SIGTERM)
    try:
        status: int | None = process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(15)
        status = None
    rest = process.stdout.read().decode(errors="replace")
    process.stdout.close()
    return status, line + rest


def victim_folder(tmp_path: Path) -> Path:
    """A folder of the server's user outside the data dir, with files it would miss."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_bytes(b"precious notes\n")
    (victim / "authorized_keys").write_bytes(b"ssh-ed25519 AAAA... me@home\n")
    return victim


def assert_untouched(victim: Path) -> None:
    assert sorted(path.name for path in victim.iterdir()) == ["authorized_keys", "notes.txt"]
    assert (victim / "notes.txt").read_bytes() == b"precious notes\n"
    assert (victim / "authorized_keys").read_bytes() == b"ssh-ed25519 AAAA... me@home\n"


# Symbolic links put in the data dir by another local user (a shared or pre-made data dir): the
# server may refuse to start or replace the link, but it must not delete or truncate files outside
# the data dir (SPEC 7: "no key can name a path outside the data dir"; README: Security, Storage on disk).


@pytest.mark.parametrize("name", ["lock", "tmp", "spare", "meta"])
def test_a_link_in_kvservers_own_folder_is_refused_and_what_it_points_to_untouched(tmp_path, name):
    """Followed, the lock's open emptied the file (authorized_keys here), and the clean-ups at
    start removed every file of the folder a tmp, spare or meta link pointed to."""
    victim = victim_folder(tmp_path)
    internal = tmp_path / "data" / ".kvserver"
    internal.mkdir(parents=True)
    (internal / name).symlink_to(victim / "authorized_keys" if name == "lock" else victim)
    status, output = run_server_once(tmp_path / "data", tmp_path)
    assert status == 1 and output.count("\n") == 1 and f".kvserver/{name} is a symbolic link" in output, output
    assert_untouched(victim)


def test_a_kvserver_folder_link_does_not_make_the_server_write_or_delete_outside_the_data_dir(tmp_path):
    victim = victim_folder(tmp_path)
    (victim / "tmp").mkdir()
    (victim / "tmp" / "draft.txt").write_bytes(b"a draft\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / ".kvserver").symlink_to(victim, target_is_directory=True)
    status, output = run_server_once(tmp_path / "data", tmp_path)
    assert status == 1 and output.count("\n") == 1 and "is a symbolic link" in output, output
    assert (victim / "tmp" / "draft.txt").read_bytes() == b"a draft\n"
    assert sorted(path.name for path in victim.iterdir()) == ["authorized_keys", "notes.txt", "tmp"]


# The access log never records secrets (SPEC 8: the token is "never logged"; README Security: "The
# access log never records values or secrets").


def test_the_token_sent_as_user_information_of_an_absolute_form_target_is_not_logged(make_server):
    server = make_server("--token", TOKEN)
    request = (
        f"GET http://me:{TOKEN}@localhost:{server.port}/keys HTTP/1.1\r\n"
        f"Host: localhost:{server.port}\r\nConnection: close\r\n\r\n"
    ).encode()
    answer = server.raw(request)
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    wait_for(lambda: '"GET ' in server.stderr(), what="the access log line")
    assert TOKEN not in server.stderr(), server.stderr()
    assert f"GET http://…@localhost:{server.port}/keys HTTP/1.1" in server.stderr()
