"""Strict message framing (RFC 9112): what the server refuses, and that nothing of it runs.

Each malformed message is sent raw on a fresh connection with a canary request pipelined behind
it. The server must answer the message alone (the expected status, as problem+json, with
`Connection: close`), close the connection, carry out neither the message nor the canary, and
store nothing. Many inputs come from public bug reports of other HTTP servers (request
smuggling); the rest are the rules of RFC 9112 one by one.
"""

from __future__ import annotations

import http.client
import itertools
import re
import socket
import time
import urllib.request
import xmlrpc.client

import pytest
from conftest import LiveServer, parse_response

HOST = b"Host: 127.0.0.1\r\n"
STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3}) ")
_canaries = itertools.count()


def refused(live_server: LiveServer, message: bytes) -> tuple[int, bytes]:
    """Send `message` with a canary /set behind it; check that exactly one answer came, that
    it closed the connection, and that neither the canary nor anything else was stored.
    Return the answer's status and body."""
    canary = f"canary{next(_canaries)}"
    canary_request = b"GET /set?" + canary.encode() + b"=1 HTTP/1.1\r\n" + HOST + b"\r\n"
    received = live_server.raw(message + canary_request, timeout=5)
    assert len(STATUS_LINE.findall(received)) == 1, f"not exactly one answer: {received[:400]!r}"
    response = parse_response(received)
    assert response.headers["Connection"] == "close", received[:400]
    response.problem()
    assert list(live_server.storage) == [], f"stored {list(live_server.storage)} from {message!r}"
    return response.status, response.body


@pytest.fixture(autouse=True)
def empty_store(live_server: LiveServer):
    for key in list(live_server.storage):
        live_server.storage.delete(key)
    yield
    for key in list(live_server.storage):
        live_server.storage.delete(key)


def set_request(head_fields: bytes = HOST, version: bytes = b"HTTP/1.1", body: bytes = b"") -> bytes:
    """A /set of key `planted` with the given header fields: refused, it must store nothing."""
    return b"GET /set?planted=1 " + version + b"\r\n" + head_fields + b"\r\n" + body


def put_request(head_fields: bytes, body: bytes) -> bytes:
    return b"PUT /kv/planted HTTP/1.1\r\n" + HOST + head_fields + b"\r\n" + body


# Each case: a malformed message, and the status it is answered with.
MALFORMED = {
    # A field line without a colon: http.client stopped there and read the rest as a second request.
    "field line without a colon": (
        b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Junk\r\nContent-Length: 50\r\n\r\n"
        b"GET /set?smuggled=1 HTTP/1.1\r\nHost: localhost\r\n\r\n",
        400,
    ),
    "space before the colon": (
        b"GET /health HTTP/1.1\r\nHost: localhost\r\nContent-Length : 49\r\n\r\n"
        b"GET /set?smuggled=1 HTTP/1.1\r\nHost: localhost\r\n\r\n",
        400,
    ),
    "tab before the colon": (set_request(HOST + b"X-Field\t: 1\r\n"), 400),
    "whitespace inside a field name": (set_request(HOST + b"X Field: 1\r\n"), 400),
    "a field name that is not a token": (set_request(HOST + b"X(Field): 1\r\n"), 400),
    "an empty field name": (set_request(HOST + b": 1\r\n"), 400),
    "junk line before Host": (set_request(b"X-Junk\r\n" + HOST), 400),
    "junk line before Origin": (set_request(HOST + b"X-Junk\r\nOrigin: http://evil.example\r\n"), 400),
    "junk line before Sec-Fetch-Site": (set_request(HOST + b"X-Junk\r\nSec-Fetch-Site: cross-site\r\n"), 400),
    "obs-fold": (set_request(HOST + b"X-Folded: a\r\n b\r\n"), 400),
    "obs-fold with a tab": (set_request(HOST + b"X-Folded: a\r\n\tb\r\n"), 400),
    "NUL in a field value": (set_request(HOST + b"X-Field: a\x00b\r\n"), 400),
    "CR in a field value": (set_request(HOST + b"X-Field: a\rb\r\n"), 400),
    "bare LF ending a field line": (set_request(HOST + b"X-Field: a\nX-Other: b\r\n"), 400),
    "vertical tab in a field value": (set_request(HOST + b"X-Field: \x0bvalue\r\n"), 400),
    "DEL in a field value": (set_request(HOST + b"X-Field: a\x7fb\r\n"), 400),
    "HTTP/1.1 without Host": (set_request(b""), 400),
    "two Host fields": (set_request(HOST + b"Host: localhost\r\n"), 400),
    "two Host fields, HTTP/1.0": (set_request(HOST + b"Host: localhost\r\n", b"HTTP/1.0"), 400),
    # Content-Length: one run of digits, once.
    "Content-Length with NBSP": (put_request(b"Content-Length: \xa05\r\n", b"hello"), 400),
    "Content-Length with a file separator": (put_request(b"Content-Length: \x1c5\r\n", b"hello"), 400),
    "Content-Length with a plus sign": (put_request(b"Content-Length: +5\r\n", b"hello"), 400),
    "Content-Length with an underscore": (put_request(b"Content-Length: 0_5\r\n", b"hello"), 400),
    "Content-Length in Arabic-Indic digits": (put_request("Content-Length: ٥\r\n".encode(), b"hello"), 400),
    "Content-Length in superscript digits": (put_request(b"Content-Length: \xb2\r\n", b"hi"), 400),
    "Content-Length as hex": (put_request(b"Content-Length: 0x5\r\n", b"hello"), 400),
    "Content-Length negative": (put_request(b"Content-Length: -5\r\n", b"hello"), 400),
    "Content-Length empty": (put_request(b"Content-Length: \r\n", b"hello"), 400),
    "Content-Length with a space inside": (put_request(b"Content-Length: 5 5\r\n", b"hello"), 400),
    "Content-Length as a list": (put_request(b"Content-Length: 5, 5\r\n", b"hello"), 400),
    "Content-Length twice, equal": (put_request(b"Content-Length: 5\r\nContent-Length: 5\r\n", b"hello"), 400),
    "Content-Length twice, conflicting": (
        put_request(b"Content-Length: 0\r\nContent-Length: 5\r\n", b"hello"),
        400,
    ),
    "Content-Length beyond any limit": (put_request(b"Content-Length: 9999999999999999999999\r\n", b"hi"), 413),
    # Transfer-Encoding
    "Content-Length and Transfer-Encoding": (
        put_request(b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
        400,
    ),
    "Transfer-Encoding on HTTP/1.0": (
        b"PUT /kv/planted HTTP/1.0\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        400,
    ),
    "chunked, then a second field identity": (
        put_request(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
        501,
    ),
    "a vertical tab before chunked": (
        put_request(b"Transfer-Encoding: \x0bchunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
        400,
    ),
    "chunked named twice": (put_request(b"Transfer-Encoding: chunked, chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"), 400),
    "chunked named twice in two fields": (
        put_request(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
        400,
    ),
    "chunked not last": (put_request(b"Transfer-Encoding: chunked, gzip\r\n", b"5\r\nhello\r\n0\r\n\r\n"), 501),
    "an unknown coding": (put_request(b"Transfer-Encoding: gzip\r\n", b"5\r\nhello\r\n0\r\n\r\n"), 501),
    "an empty coding": (put_request(b"Transfer-Encoding: , chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"), 400),
    "a coding with a parameter": (put_request(b"Transfer-Encoding: chunked;q=1\r\n", b"5\r\nhello\r\n0\r\n\r\n"), 400),
    "chunked on a route that reads no body": (set_request(HOST + b"Transfer-Encoding: chunked, chunked\r\n"), 400),
    # Chunked bodies
    "bare LF in a chunk line": (put_request(b"Transfer-Encoding: chunked\r\n", b"3;x\nabc\r\n0\r\n\r\n"), 400),
    "bare LF after chunk data": (put_request(b"Transfer-Encoding: chunked\r\n", b"3\r\nabc\n0\r\n\r\n"), 400),
    "chunk data longer than its size": (put_request(b"Transfer-Encoding: chunked\r\n", b"3\r\nabcd\r\n0\r\n\r\n"), 400),
    "a chunk size that is not hex": (put_request(b"Transfer-Encoding: chunked\r\n", b"zz\r\nabc\r\n0\r\n\r\n"), 400),
    "a chunk size with a sign": (put_request(b"Transfer-Encoding: chunked\r\n", b"+3\r\nabc\r\n0\r\n\r\n"), 400),
    "a chunk size with 0x": (put_request(b"Transfer-Encoding: chunked\r\n", b"0x3\r\nabc\r\n0\r\n\r\n"), 400),
    "a chunk size after whitespace": (put_request(b"Transfer-Encoding: chunked\r\n", b" 3\r\nabc\r\n0\r\n\r\n"), 400),
    "an empty chunk-size line": (put_request(b"Transfer-Encoding: chunked\r\n", b"\r\nabc\r\n0\r\n\r\n"), 400),
    "a chunk size of 16 hex digits": (
        put_request(b"Transfer-Encoding: chunked\r\n", b"1000000000000000\r\nabc\r\n0\r\n\r\n"),
        400,
    ),
    "an over-long chunk extension": (
        put_request(b"Transfer-Encoding: chunked\r\n", b"3;x=" + b"y" * 10_000 + b"\r\nabc\r\n0\r\n\r\n"),
        400,
    ),
    "a chunk extension that is not a token": (
        put_request(b"Transfer-Encoding: chunked\r\n", b"3;(x)\r\nabc\r\n0\r\n\r\n"),
        400,
    ),
    "a trailer line without a colon": (
        put_request(b"Transfer-Encoding: chunked\r\n", b"3\r\nabc\r\n0\r\nX-Junk\r\n\r\n"),
        400,
    ),
    # Request lines
    "a request line without a version": (b"GET /health\r\n" + HOST + b"\r\n", 400),
    "a request line of one word": (b"GET\r\n" + HOST + b"\r\n", 400),
    "a request line with two spaces": (b"GET  /set?planted=1 HTTP/1.1\r\n" + HOST + b"\r\n", 400),
    "a request line with a tab": (b"GET\t/set?planted=1\tHTTP/1.1\r\n" + HOST + b"\r\n", 400),
    "a request line with four parts": (b"GET /set?planted=1 HTTP/1.1 junk\r\n" + HOST + b"\r\n", 400),
    "a request line ending in a bare LF": (b"GET /set?planted=1 HTTP/1.1\n" + HOST + b"\r\n", 400),
    "a lower-case version": (b"GET /set?planted=1 http/1.1\r\n" + HOST + b"\r\n", 400),
    "a version of two digits": (b"GET /set?planted=1 HTTP/1.10\r\n" + HOST + b"\r\n", 400),
    "HTTP/2.0": (b"GET /set?planted=1 HTTP/2.0\r\n" + HOST + b"\r\n", 505),
    "HTTP/0.9": (b"GET /set?planted=1 HTTP/0.9\r\n" + HOST + b"\r\n", 505),
    "a method that is not a token": (b"G(E)T /set?planted=1 HTTP/1.1\r\n" + HOST + b"\r\n", 400),
    "raw non-ASCII bytes in the target": (b"GET /set?planted=\xff HTTP/1.1\r\n" + HOST + b"\r\n", 400),
    "an unknown method": (b"BREW /set?planted=1 HTTP/1.1\r\n" + HOST + b"\r\n", 501),
}


@pytest.mark.parametrize(("message", "status"), MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_message_is_refused_and_nothing_of_it_or_after_it_is_carried_out(live_server, message, status):
    answered, body = refused(live_server, message)
    assert answered == status, body


def test_a_junk_line_before_if_match_does_not_turn_a_conditional_delete_into_an_unconditional_one(live_server):
    live_server.storage.put("acct", b"balance")
    canary = b"GET /set?canary=1 HTTP/1.1\r\n" + HOST + b"\r\n"
    message = b"DELETE /kv/acct HTTP/1.1\r\n" + HOST + b'X-Junk\r\nIf-Match: "stale"\r\n\r\n'
    response = parse_response(live_server.raw(message + canary, timeout=5))
    assert response.status == 400
    assert live_server.storage.get("acct") == b"balance"
    assert "canary" not in live_server.storage


@pytest.mark.parametrize(
    "field_line",
    [b"X:" + b" " * 65_000 + b"\x00\r\n", b"X:" + b" \t" * 30_000 + b"a\x00\r\n", b"X:" + b" " * 70_000 + b"\r\n"],
    ids=["spaces then NUL", "blanks then NUL", "spaces to the limit"],
)
def test_a_field_line_made_to_backtrack_is_refused_at_once_and_stalls_no_one(live_server, field_line):
    """Matching a field line takes time linear in its length: no line can hold the GIL for seconds."""
    started = time.monotonic()
    received = live_server.raw(b"GET /set?planted=1 HTTP/1.1\r\n" + HOST + field_line + b"\r\n", timeout=10)
    assert parse_response(received).status in (400, 431)
    assert time.monotonic() - started < 1.0, f"took {time.monotonic() - started:.1f} s"
    assert "planted" not in live_server.storage


def test_leading_zeros_of_a_chunk_size_are_read(live_server):
    body = b"0000000000000000003\r\nabc\r\n0\r\n\r\n"
    message = b"PUT /kv/zeros HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n" + body
    assert parse_response(live_server.raw(message, timeout=5, half_close=True)).status == 201
    assert live_server.storage.get("zeros") == b"abc"


@pytest.mark.parametrize("zeros", [1, 18, 40])
def test_leading_zeros_of_a_content_length_are_read(live_server, zeros):
    """Content-Length = 1*DIGIT (RFC 9110 section 8.6): leading zeros do not make a length larger."""
    length = b"0" * zeros + b"3"
    message = b"PUT /kv/zeros HTTP/1.1\r\n" + HOST + b"Content-Length: " + length + b"\r\n\r\nabc"
    assert parse_response(live_server.raw(message, timeout=5, half_close=True)).status == 201
    assert live_server.storage.get("zeros") == b"abc"


def test_a_malformed_head_is_answered_at_once_not_after_the_head_deadline(live_server):
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", live_server.port), timeout=5) as sock:
        sock.sendall(b"GET /health\r\n")  # no version; the client then waits
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert time.monotonic() - started < 2


@pytest.mark.parametrize(
    ("head", "status"),
    [(b"HEAD /health HTTP/1.1\r\n" + HOST + b"X-Junk\r\n", b"400"), (b"HEAD /health HTTP/2.0\r\n" + HOST, b"505")],
    ids=["bad-field", "version"],
)
def test_a_head_request_that_is_refused_is_answered_without_content(live_server, head, status):
    """RFC 9110 section 9.3.2: no answer to HEAD has content, a refusal of its head neither."""
    canary = b"GET /set?canary=1 HTTP/1.1\r\n" + HOST + b"\r\n"
    received = live_server.raw(head + b"\r\n" + canary, timeout=5)
    head, separator, content = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 " + status + b" ") and b"\r\nConnection: close" in head, received
    assert b"\r\nContent-Type: application/problem+json" in head
    assert (separator, content) == (b"\r\n\r\n", b"")
    assert list(live_server.storage) == []


def test_the_detail_of_a_refusal_names_what_was_wrong(live_server):
    _, body = refused(live_server, set_request(HOST + b"X-Junk\r\n"))
    assert "colon" in body.decode()
    _, body = refused(live_server, put_request(b"Content-Length: +5\r\n", b"hello"))
    assert "digits" in body.decode()
    _, body = refused(live_server, put_request(b"Transfer-Encoding: chunked\r\n", b"3;x\nabc\r\n0\r\n\r\n"))
    assert "CRLF" in body.decode()


# Requests the client never finished: cut off (EOF) at every byte of the head.

CUT_OFF = {
    "a /set": b"GET /set?key=k&value=hello HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Longer: yes\r\n\r\n",
    "a conditional DELETE": b'DELETE /kv/acct HTTP/1.1\r\nHost: 127.0.0.1\r\nIf-Match: "stale"\r\n\r\n',
    "a PUT": b"PUT /kv/k HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n\r\nhello",
    "a chunked PUT": (
        b"PUT /kv/k HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    ),
}


@pytest.mark.parametrize("request_bytes", CUT_OFF.values(), ids=CUT_OFF.keys())
def test_a_request_cut_off_at_any_byte_is_never_carried_out(live_server, request_bytes):
    live_server.storage.put("acct", b"balance")
    for end in range(len(request_bytes)):
        received = live_server.raw(request_bytes[:end], timeout=5, half_close=True)
        assert STATUS_LINE.findall(received) in ([], [b"400"]), (end, received[:300])
        assert sorted(live_server.storage) == ["acct"], f"cut after {end} bytes: {sorted(live_server.storage)}"
        assert live_server.storage.get("acct") == b"balance"
    # The whole request is carried out (the conditional DELETE fails its precondition).
    status = parse_response(live_server.raw(request_bytes, timeout=5, half_close=True)).status
    assert status in (200, 201, 412)


# Well-formed traffic keeps working.


def test_empty_lines_before_a_request_line_are_skipped(live_server):
    request = b"\r\n\r\nGET /health HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n"  # (closed: no wait for quiet)
    response = parse_response(live_server.raw(request, timeout=5))
    assert response.status == 200


def test_pipelined_requests_are_answered_in_order_on_one_connection(live_server):
    requests = (
        b"".join(b"GET /set?p%d=v%d HTTP/1.1\r\n" % (n, n) + HOST + b"\r\n" for n in range(5))
        + b"GET /keys HTTP/1.1\r\n"
        + HOST
        + b"Connection: close\r\n\r\n"
    )
    received = live_server.raw(requests, timeout=5)
    assert [int(status) for status in STATUS_LINE.findall(received)] == [201] * 5 + [200]
    assert received.rstrip().endswith(b'"next": null}') or b'"p4"' in received
    assert sorted(live_server.storage) == [f"p{n}" for n in range(5)]


def test_an_http_1_0_client_with_keep_alive_keeps_its_connection(live_server):
    with socket.create_connection(("127.0.0.1", live_server.port), timeout=5) as sock:
        for _ in range(2):
            sock.sendall(b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(4096)
            assert head.startswith(b"HTTP/1.1 200 ") and b"Connection: keep-alive" in head


def test_an_http_1_0_request_without_keep_alive_is_answered_and_closed(live_server):
    received = live_server.raw(b"GET /health HTTP/1.0\r\n\r\n", timeout=5)
    response = parse_response(received)
    assert response.status == 200 and response.headers["Connection"] == "close"


@pytest.mark.parametrize("version", [b"HTTP/1.0", b"HTTP/1.1"])
def test_connection_close_ends_the_connection_whatever_else_the_field_says(live_server, version):
    """RFC 9112 section 9.3: with the close option the connection does not persist."""
    received = live_server.raw(
        b"GET /health " + version + b"\r\n" + HOST + b"Connection: keep-alive, close\r\n\r\n", timeout=5
    )
    response = parse_response(received)
    assert response.status == 200 and response.headers["Connection"] == "close"


def test_field_names_match_without_regard_to_case_and_values_are_trimmed_of_space_and_tab(live_server):
    message = (
        b"PUT /kv/k HTTP/1.1\r\nhOsT: 127.0.0.1\r\ncontent-LENGTH:\t 5 \t\r\nCONTENT-TYPE: text/x-a\r\n"
        b"cOnNeCtIoN: close\r\n\r\nhello"
    )
    assert parse_response(live_server.raw(message + b"", timeout=2)).status == 201
    assert live_server.storage.stat("k").content_type == "text/x-a"


def test_http_client_urllib_and_xmlrpc_client_work_against_the_strict_parser(live_server):
    connection = http.client.HTTPConnection("127.0.0.1", live_server.port, timeout=5)
    connection.request("PUT", "/kv/via-http-client", body=iter([b"chunk one, ", b"chunk two"]))  # chunked
    assert connection.getresponse().read() and live_server.storage.get("via-http-client") == b"chunk one, chunk two"
    connection.close()
    with urllib.request.urlopen(f"http://127.0.0.1:{live_server.port}/get?key=via-http-client", timeout=5) as answer:
        assert answer.read() == b"chunk one, chunk two"
    proxy = xmlrpc.client.ServerProxy(f"http://127.0.0.1:{live_server.port}")
    proxy.save("via-xmlrpc", "yes")
    assert proxy.load("via-xmlrpc") == "yes"


def test_field_values_are_trimmed_of_space_and_tab_only_so_a_disguised_origin_is_refused(live_server):
    """NBSP (obs-text in Latin-1) is part of the value, as RFC 9112 reads it: not whitespace."""
    host = b"127.0.0.1:%d" % live_server.port
    fields = b"Host: " + host + b"\r\nOrigin: \xa0http://" + host + b"\r\nConnection: close\r\n"
    received = live_server.raw(b"GET /set?planted=1 HTTP/1.1\r\n" + fields + b"\r\n")
    assert parse_response(received).status == 403
    assert "planted" not in live_server.storage
