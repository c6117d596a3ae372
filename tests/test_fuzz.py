"""Malformed requests in bulk, over raw sockets (SPEC sections 6 and 8).

A seeded generator makes a few thousand broken requests: random bytes, broken request lines, bad
percent escapes, NUL bytes, bad Content-Length and chunk sizes, absolute URIs, traversal paths,
unknown methods and versions, bad header lines. Each must get a 4xx (501 for an unknown method,
505 for a version), a 2xx if it happens to be valid, or a close without a byte: never a 500, never
a bare body without a status line. At the end the server is alive, logged no traceback, and wrote
nothing outside its data dir.
"""

from __future__ import annotations

import concurrent.futures
import random
import re
from collections.abc import Callable

import pytest
from conftest import assert_no_traceback, raw_exchange_timed, wait_for

REQUESTS = 3000
SEED = 1234
STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3}) [^\r\n]*\r\n")

Generator = Callable[[random.Random], tuple[str, bytes]]


def _host(rng: random.Random) -> bytes:
    return rng.choice([b"Host: 127.0.0.1\r\n", b"Host: localhost\r\n", b""])


def _request(method: bytes, target: bytes, headers: bytes = b"", body: bytes = b"", version=b"HTTP/1.1") -> bytes:
    return method + b" " + target + b" " + version + b"\r\n" + headers + b"\r\n" + body


def random_bytes(rng: random.Random) -> tuple[str, bytes]:
    data = rng.randbytes(rng.randint(1, 400))
    return "random bytes", data + rng.choice([b"", b"\r\n", b"\r\n\r\n"])


BROKEN_LINES = [
    b"",
    b"GET",
    b"GET /health",
    b"GET  /health  HTTP/1.1",
    b"GET /health HTTP/1.1 extra",
    b"GET /health HTTP/",
    b"GET /health HTTP/1",
    b"GET /health HTTP/1.1.1",
    b"GET /health HTTP/a.b",
    b"GET /health http/1.1",
    b"GET /health HTTP/1.10000000000",
    b"GET /health HTTP/01.1",
    b"GET /health HTTP/-1.1",
    b"GET\t/health\tHTTP/1.1",
    b" GET /health HTTP/1.1",
    b"GET /health HTTP/1.1 ",
    b"/health HTTP/1.1",
    b"GET HTTP/1.1",
    b"GET /set?a=b c d HTTP/1.1",
    b"\xff\xfe /health HTTP/1.1",
    b"GET /\xff\xfe HTTP/1.1",
    b"GET * HTTP/1.1",
    b"OPTIONS * HTTP/1.1",
    b"GET ? HTTP/1.1",
    b"GET /? HTTP/1.1",
    b"GET /set?&&& HTTP/1.1",
    b"GET /set?=== HTTP/1.1",
    b"GET //health HTTP/1.1",
    b"GET /health# HTTP/1.1",
]


def broken_request_line(rng: random.Random) -> tuple[str, bytes]:
    line = rng.choice(BROKEN_LINES)
    return "broken request line", line + b"\r\n" + _host(rng) + b"\r\n"


ESCAPED_TARGETS = [
    b"/set?%zz=1",
    b"/set?k=%zz",
    b"/set?k=%",
    b"/set?k=%f",
    b"/set?%=v",
    b"/set?key=%ff%fe&value=x",
    b"/set?key=k&value=%ff%fe",
    b"/set?%ff%fe=%ff%fe",
    b"/set?key=%C0%AF&value=1",
    b"/set?key=%ED%A0%80&value=1",
    b"/get?key=%ff%fe",
    b"/get?key=%zz",
    b"/get?key=%",
    b"/kv/%ff%fe",
    b"/kv/%zz",
    b"/kv/%",
    b"/kv/%2",
    b"/keys?prefix=%ff",
    b"/keys?after=%zz",
    b"/keys?limit=%31%30",
    b"/delete?key=%00",
    b"/delete?key=%ff",
    b"/%zz",
    b"/%ff%fe",
]


def bad_escapes(rng: random.Random) -> tuple[str, bytes]:
    target = rng.choice(ESCAPED_TARGETS)
    method = b"PUT" if target.startswith(b"/kv/") and rng.random() < 0.5 else b"GET"
    body = b"value" if method == b"PUT" else b""
    headers = _host(rng) + (b"Content-Length: 5\r\n" if body else b"")
    return "bad escapes", _request(method, target, headers, body)


NUL_REQUESTS = [
    _request(b"GET", b"/kv/a\x00b"),
    _request(b"PUT", b"/kv/a\x00b", b"Content-Length: 1\r\n", b"x"),
    _request(b"GET", b"/set?a\x00=b"),
    _request(b"GET", b"/set?a=b\x00"),
    _request(b"GET", b"/get?key=%00"),
    _request(b"GET", b"/set?key=%00&value=1"),
    _request(b"PUT", b"/kv/%00", b"Content-Length: 1\r\n", b"x"),
    _request(b"GET", b"/health", b"X-A: a\x00b\r\n"),
    _request(b"GET", b"/health", b"X\x00A: b\r\n"),
    _request(b"PUT", b"/kv/nul", b"Content-Type: text/\x00html\r\nContent-Length: 1\r\n", b"x"),
    _request(b"GET\x00", b"/health"),
    _request(b"GET", b"/health", version=b"HTTP/1.1\x00"),
    b"\x00" * 64 + b"\r\n\r\n",
]


def nul_bytes(rng: random.Random) -> tuple[str, bytes]:
    return "NUL bytes", rng.choice(NUL_REQUESTS)


CONTENT_LENGTHS = [
    b"Content-Length: -1\r\n",
    b"Content-Length: -0\r\n",
    b"Content-Length: 99999999999999999999999999\r\n",
    b"Content-Length: 18446744073709551616\r\n",
    b"Content-Length: abc\r\n",
    b"Content-Length: 1, 2\r\n",
    b"Content-Length: 5\r\nContent-Length: 6\r\n",
    b"Content-Length: 5\r\nContent-Length: 5\r\n",
    b"Content-Length: +5\r\n",
    b"Content-Length:  5 \r\n",
    b"Content-Length: 0x10\r\n",
    b"Content-Length: 5e3\r\n",
    b"Content-Length: \r\n",
    b"Content-Length: 1_0\r\n",
    b"Content-Length: \xd9\xa5\r\n",  # an Arabic-Indic digit five
    b"Content-Length: 100\r\n",  # longer than the body sent
    b"Content-Length: 2\r\n",  # shorter than the body sent
    b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
    b"",  # none at all
]


def bad_content_length(rng: random.Random) -> tuple[str, bytes]:
    target = rng.choice([b"/kv/cl", b"/kv/cl?ttl=5", b"/RPC2", b"/set?k=v", b"/health"])
    method = b"POST" if target == b"/RPC2" else b"PUT" if target.startswith(b"/kv/") else b"GET"
    return "bad Content-Length", _request(method, target, _host(rng) + rng.choice(CONTENT_LENGTHS), b"hello")


CHUNKED_BODIES = [
    b"zz\r\nhello\r\n0\r\n\r\n",
    b"-1\r\nhello\r\n0\r\n\r\n",
    b"ffffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
    b"fffffffffffffff\r\nhello\r\n0\r\n\r\n",
    b"5;ext=1\r\nhello\r\n0\r\n\r\n",
    b"5\r\nhello0\r\n\r\n",
    b"3\r\nhello\r\n0\r\n\r\n",
    b"5\r\nhel",
    b"0x5\r\nhello\r\n0\r\n\r\n",
    b" 5\r\nhello\r\n0\r\n\r\n",
    b"\r\n",
    b"5\r\nhello\r\n",
    b"5\r\nhello\r\n0\r\nTrailer: x\r\n\r\n",
    b"5\r\nhello\r\n0\r\n" + b"T: x\r\n" * 200 + b"\r\n",
    b"1" * 2000 + b"\r\n",
]

TRANSFER_ENCODINGS = [
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: gzip\r\n",
    b"Transfer-Encoding: chunked, chunked\r\n",
    b"Transfer-Encoding: gzip, chunked\r\n",
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: \r\n",
]


def bad_chunks(rng: random.Random) -> tuple[str, bytes]:
    target = rng.choice([b"/kv/chunked", b"/RPC2"])
    method = b"POST" if target == b"/RPC2" else b"PUT"
    headers = _host(rng) + rng.choice(TRANSFER_ENCODINGS)
    return "bad chunks", _request(method, target, headers, rng.choice(CHUNKED_BODIES))


ABSOLUTE_TARGETS = [
    (b"GET", b"http://x/get?key=a"),
    (b"GET", b"https://evil.example/kv/a"),
    (b"GET", b"http://x"),
    (b"GET", b"http://"),
    (b"GET", b"http:/"),
    (b"GET", b"http:///health"),
    (b"GET", b"http://x/set?absolute=1"),
    (b"PUT", b"http://x/kv/absolute"),
    (b"GET", b"http://x/../../escape"),
    (b"GET", b"ftp://x/health"),
    (b"GET", b"x/health"),
    (b"CONNECT", b"example.com:443"),
    (b"GET", b"//x/health"),
]


def absolute_uri(rng: random.Random) -> tuple[str, bytes]:
    method, target = rng.choice(ABSOLUTE_TARGETS)
    body = b"x" if method == b"PUT" else b""
    headers = _host(rng) + (b"Content-Length: 1\r\n" if body else b"")
    return "absolute URI", _request(method, target, headers, body)


TRAVERSALS = [
    b"/kv/../../etc/passwd",
    b"/kv/%2e%2e%2f%2e%2e%2fescape",
    b"/kv/..%2f..%2fescape",
    b"/kv/..%2F..%2F..%2Fescape",
    b"/kv/%2e%2e/%2e%2e/escape",
    b"/kv/../escape",
    b"/kv/..",
    b"/kv/.",
    b"/kv/%2e",
    b"/kv/%2e%2e",
    b"/kv/...",
    b"/kv/.kvserver",
    b"/kv/.kvserver%2flock",
    b"/kv/.kvserver/lock",
    b"/kv/%2ekvserver%2ftmp%2fx",
    b"/kv/.kvserver/meta/x",
    b"/kv//escape",
    b"/kv/%2fescape",
    b"/kv/%5c..%5c..%5cescape",
    b"/kv/..\\..\\escape",
    b"/kv/a/../../../escape",
    b"/kv/~",
    b"/kv/" + b"..%2f" * 40 + b"escape",
    b"/kv/" + b"x" * 1024,
    b"/kv/" + b"%2e" * 300,
]


def traversal(rng: random.Random) -> tuple[str, bytes]:
    roll = rng.random()
    if roll < 0.1:
        key = rng.choice([b"..%2F..%2Fescape", b"%2e%2e%2f%2e%2e%2fescape", b"../escape", b".kvserver%2Flock"])
        return "traversal", _request(b"GET", b"/set?key=" + key + b"&value=1", _host(rng))
    target = rng.choice(TRAVERSALS)
    if roll < 0.6:
        body = b"planted"
        headers = _host(rng) + b"Content-Length: 7\r\n"
        return "traversal", _request(b"PUT", target, headers, body)
    method = rng.choice([b"GET", b"HEAD", b"DELETE"])
    return "traversal", _request(method, target, _host(rng))


UNKNOWN_METHODS = [b"BREW", b"FOO", b"PROPFIND", b"MKCOL", b"get", b"Get", b"LINK", b"X" * 200]


def unknown_method(rng: random.Random) -> tuple[str, bytes]:
    method = rng.choice(UNKNOWN_METHODS)
    target = rng.choice([b"/health", b"/kv/a", b"/set?a=b", b"/", b"/nowhere"])
    return "unknown method", _request(method, target, b"Host: 127.0.0.1\r\n")


VERSIONS = [b"HTTP/0.9", b"HTTP/2.0", b"HTTP/3.0", b"HTTP/2", b"HTTP/9.9", b"HTTP/1.0", b"HTTP/1.1", b"HTTP/1.9"]


def odd_version(rng: random.Random) -> tuple[str, bytes]:
    target = rng.choice([b"/health", b"/get?key=a", b"/set?version=1", b"/"])
    return "odd version", _request(b"GET", target, _host(rng), version=rng.choice(VERSIONS))


HEADER_LINES = [
    b"NoColonHere\r\n",
    b" folded continuation\r\n",
    b"\tfolded: tab\r\n",
    b"X-A : b\r\n",
    b": empty name\r\n",
    b"X-A:\r\n",
    b"X-A\r\n",
    b"X-A: b\rX-B: c\r\n",
    b"X-A: b\nX-B: c\n",
    b"Content-Type: text/plain\r\n" * 3,
    b"Host: a\r\nHost: b\r\n",
    b"Host: evil.example\r\n",
    b"Origin: null\r\n",
    b"Sec-Fetch-Site: cross-site\r\n",
    b"Authorization: Bearer x\r\n",
    b"If-Match: garbage\r\n",
    b'If-None-Match: "a", W/"b", garbage\r\n',
    b"Expect: 100-continue\r\n",
    b"Expect: nonsense\r\n",
    b"Connection: close, keep-alive, upgrade\r\n",
    b"Accept: text/html;q=x\r\n",
    b"Accept: text/html;q=1e999\r\n",
    b"Range: bytes=-5\r\n",
    b"X-Long-Name-" + b"n" * 5000 + b": v\r\n",
    b"X" * 70_000 + b": v\r\n",
    b"X-Long-Value: " + b"v" * 70_000 + b"\r\n",
    b"\xff\xfe: \xff\xfe\r\n",
]


def bad_header(rng: random.Random) -> tuple[str, bytes]:
    lines = b"".join(rng.choice(HEADER_LINES) for _ in range(rng.randint(1, 3)))
    method, target, body = rng.choice(
        [(b"GET", b"/health", b""), (b"GET", b"/", b""), (b"GET", b"/set?h=1", b""), (b"PUT", b"/kv/h", b"value")]
    )
    length = b"Content-Length: %d\r\n" % len(body) if body else b""
    return "bad header line", _request(method, target, _host(rng) + lines + length, body)


VALID = [
    _request(b"GET", b"/health", b"Host: 127.0.0.1\r\n"),
    _request(b"GET", b"/set?valid=1", b"Host: 127.0.0.1\r\n"),
    _request(b"GET", b"/set?key=two%20words&value=%00%01%ff&ttl=60"),
    _request(b"GET", b"/get?key=valid"),
    _request(b"GET", b"/keys?prefix=v&limit=2"),
    _request(b"GET", b"/keys?limit=0"),
    _request(b"GET", b"/"),
    _request(b"GET", b"/", b"Accept: text/html\r\n"),
    _request(b"PUT", b"/kv/a%2Fb", b"Content-Length: 3\r\n", b"abc"),
    _request(b"PUT", b"/kv/chunked-ok", b"Transfer-Encoding: chunked\r\n", b"3\r\nabc\r\n0\r\n\r\n"),
    _request(b"GET", b"/kv/a%2Fb"),
    _request(b"HEAD", b"/kv/a%2Fb"),
    _request(b"DELETE", b"/kv/nothing-here"),
    _request(b"PATCH", b"/kv/a"),
    _request(b"POST", b"/RPC2", b"Content-Length: 9\r\n", b"<broken/>"),
    _request(b"GET", b"/metrics"),
    _request(b"GET", b"/delete?key=valid"),
]


def mostly_valid(rng: random.Random) -> tuple[str, bytes]:
    return "valid or nearly", rng.choice(VALID)


def mutated(rng: random.Random) -> tuple[str, bytes]:
    """A valid request with a few bytes flipped, dropped or duplicated."""
    data = bytearray(rng.choice(VALID))
    for _ in range(rng.randint(1, 4)):
        position = rng.randrange(len(data))
        action = rng.random()
        if action < 0.4:
            data[position] = rng.randrange(256)
        elif action < 0.7:
            del data[position]
        else:
            data[position:position] = data[position : position + rng.randint(1, 8)]
    return "mutated", bytes(data)


GENERATORS: list[Generator] = [
    random_bytes,
    broken_request_line,
    bad_escapes,
    nul_bytes,
    bad_content_length,
    bad_chunks,
    absolute_uri,
    traversal,
    unknown_method,
    odd_version,
    bad_header,
    mostly_valid,
    mutated,
]


def malformed_requests(count: int, seed: int) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    return [rng.choice(GENERATORS)(rng) for _ in range(count)]


def verdict(kind: str, received: bytes, hung: bool) -> str | None:
    """What is wrong with the server's answer, or None."""
    if hung:
        return f"no answer and no close within the timeout (got {received[:80]!r})"
    if not received:
        return None
    if b"Traceback" in received:
        return "a traceback reached the client"
    while received.startswith((b"HTTP/1.1 100 ", b"HTTP/1.0 100 ")) and b"\r\n\r\n" in received:
        received = received.partition(b"\r\n\r\n")[2]  # an interim 100 Continue
    match = STATUS_LINE.match(received)
    if not match:
        return f"no status line: {received[:120]!r}"
    status = int(match.group(1))
    if kind == "unknown method" and status != 501:
        return f"{status} for an unknown method, not 501"
    if not (200 <= status < 300 or 400 <= status < 500 or status in (501, 505)):
        return f"status {status}"
    for later in re.finditer(rb"\r\nHTTP/1\.[01] (5\d\d) ", received):
        if later.group(1) not in (b"501", b"505"):
            return f"a later response is {later.group(1).decode()}"
    return None


@pytest.fixture
def fuzz_server(make_server, tmp_path):
    """A server whose data dir is nested three folders deep in folders that hold nothing else,
    so that a write up to three levels outside it shows."""
    data_dir = tmp_path / "l1" / "l2" / "l3" / "data"
    data_dir.parent.mkdir(parents=True)
    return make_server("--max-value", "1M", data_dir=data_dir)


def test_thousands_of_malformed_requests_get_4xx_or_a_close_and_never_a_500(fuzz_server):
    server = fuzz_server
    requests = malformed_requests(REQUESTS, SEED)
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(
            pool.map(
                lambda request: raw_exchange_timed(server.port, request[1], timeout=5.0, half_close=True), requests
            )
        )
    failures: dict[str, list[str]] = {}
    for (kind, data), (received, hung) in zip(requests, answers, strict=True):
        if (problem := verdict(kind, received, hung)) is not None:
            failures.setdefault(problem.split(":")[0], []).append(f"{kind}: {data[:100]!r} -> {problem[:200]}")
    report = "".join(
        f"\n{len(examples)} x {name}:\n  " + "\n  ".join(examples[:5]) for name, examples in failures.items()
    )
    assert not failures, f"{sum(map(len, failures.values()))} of {len(requests)} requests went wrong:{report}"

    assert server.process.poll() is None, "the server died"
    response = server.get("/health")
    assert response.status == 200 and response.json()["status"] == "ok"
    log = server.stderr()
    assert "Traceback" not in log, log[log.index("Traceback") - 500 : log.index("Traceback") + 2000]
    assert " 500 " not in log


def test_malformed_requests_write_nothing_outside_the_data_dir(fuzz_server, tmp_path):
    server = fuzz_server
    requests = [
        request
        for request in malformed_requests(REQUESTS, SEED + 1)
        if request[0] in ("traversal", "absolute URI", "bad escapes", "NUL bytes", "mutated")
    ]
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        list(
            pool.map(
                lambda request: raw_exchange_timed(server.port, request[1], timeout=5.0, half_close=True), requests
            )
        )
    assert server.get("/health").status == 200
    data = server.data_dir
    assert sorted(path.name for path in (tmp_path / "l1").iterdir()) == ["l2"]
    assert sorted(path.name for path in (tmp_path / "l1" / "l2").iterdir()) == ["l3"]
    assert sorted(path.name for path in (tmp_path / "l1" / "l2" / "l3").iterdir()) == ["data"]
    internal = data / ".kvserver"
    allowed_folders = {data, internal, internal / "tmp", internal / "spare", internal / "meta"}
    for path in data.rglob("*"):
        if path.is_dir():
            assert path in allowed_folders, f"a folder in the data dir: {path}"
        else:
            assert path.parent in allowed_folders, f"a file outside the data dir's two levels: {path}"
            assert not path.is_symlink(), path
    assert [path.name for path in data.iterdir() if path.name.startswith(".")] == [".kvserver"]
    assert sorted(path.name for path in internal.iterdir()) == ["lock", "meta", "spare", "tmp"]
    assert (internal / "lock").stat().st_size == 0, "a value was written over the lock file"
    wait_for(lambda: not list((internal / "tmp").iterdir()), timeout=5, what="the temporary folder to empty")
    # Some traversal keys were stored, as keys: they read back from inside the data dir.
    response = server.get("/kv/%2e%2e%2f%2e%2e%2fescape")
    assert response.status in (200, 404)
    if response.status == 200:
        assert response.body in (b"planted", b"1")
    keys = server.get("/keys?limit=10000").json()["keys"]
    assert any(".." in key for key in keys), keys


@pytest.mark.parametrize(
    ("line", "statuses"),
    [
        (b"GET /set?name=secretvalue HTTP/1.1 junk", {400}),
        (b"GET /health HTTP/2.0", {505}),
        (b"GET /health HTTP/3.0", {505}),
        (b"GET /health HTTP/0.9", {200, 400, 505}),
        (b"GET /health HTTP/a.b", {400}),
        (b"PUT /health", {400, 505}),
        (b"GET /health", {200, 400, 505}),
        (b"\x00\x01garbage", {400}),
    ],
)
def test_a_request_line_http_server_rejects_is_answered_with_a_status_line_and_problem_json(server, line, statuses):
    received = server.raw(line + b"\r\nHost: 127.0.0.1\r\n\r\n", timeout=5, half_close=True)
    match = STATUS_LINE.match(received)
    assert match, f"no status line in the answer to {line!r}: {received[:200]!r}"
    assert int(match.group(1)) in statuses
    if int(match.group(1)) >= 400:
        assert b"\r\nContent-Type: application/problem+json\r\n" in received


@pytest.mark.parametrize("content_type", [b"text/\x00html", b"text/plain\x01", b"a\x7fb"])
def test_a_content_type_with_a_control_character_is_400_not_500(server, content_type, capfd):
    request = _request(b"PUT", b"/kv/typed", b"Content-Type: " + content_type + b"\r\nContent-Length: 1\r\n", b"x")
    received = server.raw(request, timeout=5, half_close=True)
    assert received.startswith(b"HTTP/1.1 400 "), received[:300]
    assert server.get("/kv/typed").status == 404
    assert_no_traceback(capfd.readouterr().err)


def test_the_generator_is_seeded_and_covers_every_kind():
    first, second = malformed_requests(500, SEED), malformed_requests(500, SEED)
    assert first == second
    assert {kind for kind, _ in first} == {generator(random.Random(0))[0] for generator in GENERATORS}
    assert len({data for _, data in malformed_requests(REQUESTS, SEED)}) > REQUESTS // 4
