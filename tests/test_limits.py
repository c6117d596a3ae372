"""SPEC section 8, "limits hold under abuse", in raw bytes: request line, header count and size,
slow and idle clients, stalled bodies, and the connection cap.

The slow-client scenarios take 10 to 30 s each, so one module-scoped server runs them all in
parallel from the first test that needs them; each test then checks its own scenario.
"""

from __future__ import annotations

import concurrent.futures
import re
import select
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Response, Server, parse_response, raw_exchange_timed, read_http, wait_for

HOST = b"Host: 127.0.0.1\r\n"


def exchange(server: Server, data: bytes, timeout: float = 5.0) -> Response:
    """Send bytes, half-close, and parse what comes back."""
    received = server.raw(data, timeout=timeout, half_close=True)
    return parse_response(received)


def open_connections(server: Server) -> int:
    """The server's kvserver_open_connections gauge (counting the connection that asks)."""
    metrics = server.get("/metrics").body.decode()
    return int(float(re.search(r"^kvserver_open_connections (\S+)$", metrics, re.MULTILINE).group(1)))


def health_is_served(server: Server) -> None:
    response = server.get("/health")
    assert response.status == 200, response


# Slow clients, in parallel on one server


@dataclass
class Outcome:
    seconds: float  # from the scenario's start to the server closing the connection
    received: bytes


def _closed_or_answered(sock: socket.socket, received: bytearray) -> bool:
    """Read what is there; True once the server closed the connection."""
    try:
        chunk = sock.recv(65536)
    except (ConnectionResetError, TimeoutError):
        return True
    received += chunk
    return not chunk


def slow_head(port: int) -> Outcome:
    """A request line, then a header trickled one byte every 0.5 s, for at most 20 s."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        received = bytearray()
        started = time.monotonic()
        sock.sendall(b"GET /set?slowloris=planted HTTP/1.1\r\n" + HOST + b"X-Slow: ")
        while time.monotonic() - started < 20:
            readable, _, _ = select.select([sock], [], [], 0.5)
            if readable and _closed_or_answered(sock, received):
                return Outcome(time.monotonic() - started, bytes(received))
            try:
                sock.sendall(b"x")
            except (BrokenPipeError, ConnectionResetError):
                return Outcome(time.monotonic() - started, bytes(received))
        return Outcome(time.monotonic() - started, bytes(received))


def idle_keep_alive(port: int) -> Outcome:
    """One request on a keep-alive connection, then silence until the server closes (at most 25 s)."""
    with socket.create_connection(("127.0.0.1", port), timeout=25) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\n" + HOST + b"\r\n")
        first = read_http(sock.makefile("rb"))
        started = time.monotonic()
        assert first.status == 200 and first.headers["Connection"] != "close", first
        rest = bytearray()
        while not _closed_or_answered(sock, rest) and time.monotonic() - started < 25:
            pass
        return Outcome(time.monotonic() - started, bytes(rest))


def stalled_body(port: int) -> Outcome:
    """A PUT that promises 1000 bytes, sends 10 and stops; wait at most 40 s for the close."""
    with socket.create_connection(("127.0.0.1", port), timeout=40) as sock:
        sock.sendall(b"PUT /kv/stalled HTTP/1.1\r\n" + HOST + b"Content-Length: 1000\r\n\r\n" + b"0123456789")
        started = time.monotonic()
        received = bytearray()
        while not _closed_or_answered(sock, received) and time.monotonic() - started < 40:
            pass
        return Outcome(time.monotonic() - started, bytes(received))


BIG_ANSWER = 64 * 1024 * 1024  # far more than loopback's socket buffers hold


def stalled_reader(port: int) -> Outcome:
    """A GET of a big value whose answer is never read: after 40 s, what arrives until the close."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(b"GET /kv/big-answer HTTP/1.1\r\n" + HOST + b"\r\n")
        started = time.monotonic()
        while time.monotonic() - started < 40:  # not reading: the server's sends stall
            time.sleep(0.5)
        received = bytearray()
        while not _closed_or_answered(sock, received) and len(received) < BIG_ANSWER + 4096:
            pass
        return Outcome(time.monotonic() - started, bytes(received))


SLOW_ANSWER = 32 * 1024 * 1024  # more than the socket buffers hold, so the server's sends block


def slow_reader(port: int) -> Outcome:
    """A GET of a big value read at about 10 KB/s for 45 s, then at full speed: all of it."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /kv/slow-answer HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n")
        started = time.monotonic()
        received = bytearray()
        while time.monotonic() - started < 45:  # a slow but steady reader: bytes keep moving
            chunk = sock.recv(1024)
            if not chunk:
                break
            received += chunk
            time.sleep(0.05)
        while chunk := sock.recv(65536):
            received += chunk
        return Outcome(time.monotonic() - started, bytes(received))


@pytest.fixture(scope="module")
def slow_clients(tmp_path_factory) -> Iterator[tuple[Server, dict[str, concurrent.futures.Future]]]:
    folder = tmp_path_factory.mktemp("slow")
    server = Server(["--data-dir", str(folder / "data"), "--quiet"], folder / "data", folder / "server.log").start()
    with (folder / "big").open("wb") as big:
        big.truncate(BIG_ANSWER)
    with (folder / "big").open("rb") as big:
        assert server.request("PUT", "/kv/big-answer", body=big).status == 201
    assert server.request("PUT", "/kv/slow-answer", body=b"s" * SLOW_ANSWER).status == 201
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=5)
    futures = {
        "head": pool.submit(slow_head, server.port),
        "idle": pool.submit(idle_keep_alive, server.port),
        "body": pool.submit(stalled_body, server.port),
        "reader": pool.submit(stalled_reader, server.port),
        "slow reader": pool.submit(slow_reader, server.port),
    }
    yield server, futures
    for future in futures.values():
        future.cancel()
    pool.shutdown(wait=True)
    server.stop()


def test_a_request_head_not_complete_within_10_s_is_cut_off(slow_clients):
    server, futures = slow_clients
    # Meanwhile others are served at once.
    started = time.monotonic()
    health_is_served(server)
    assert time.monotonic() - started < 2
    outcome = futures["head"].result(timeout=30)
    assert outcome.seconds < 13.5, f"still connected {outcome.seconds:.1f} s after the first byte"
    assert outcome.seconds > 9, f"cut off after only {outcome.seconds:.1f} s; the head deadline is 10 s"
    if outcome.received:
        assert parse_response(outcome.received).status == 408, outcome.received
    # A request cut off before its head was complete is not carried out. Its connection is
    # counted until the server is done with it: of the five slow clients, at most the idle,
    # stalled-body, stalled-reader and slow-reader ones are still open, plus the connection asking.
    wait_for(lambda: open_connections(server) <= 5, timeout=10, what="the cut-off connection to be done with")
    assert server.get("/get?key=slowloris").status == 404
    health_is_served(server)


def test_an_idle_keep_alive_connection_is_closed_after_15_s(slow_clients):
    server, futures = slow_clients
    outcome = futures["idle"].result(timeout=40)
    assert outcome.seconds < 20, f"an idle connection stayed open {outcome.seconds:.1f} s"
    assert outcome.seconds > 13, f"an idle connection was closed after only {outcome.seconds:.1f} s"
    assert outcome.received == b"", outcome.received
    health_is_served(server)


def test_a_body_with_no_byte_for_30_s_is_abandoned_and_stores_nothing(slow_clients):
    # The slowest test here (about 30 s, in parallel with the two above).
    server, futures = slow_clients
    outcome = futures["body"].result(timeout=60)
    assert outcome.seconds < 36, f"a stalled body held its connection {outcome.seconds:.1f} s"
    assert outcome.seconds > 27, f"a stalled body was abandoned after only {outcome.seconds:.1f} s"
    if outcome.received:
        assert parse_response(outcome.received).status == 408, outcome.received
    assert server.get("/kv/stalled").status == 404
    assert not (server.data_dir / "stalled").exists()
    assert list((server.data_dir / ".kvserver" / "tmp").iterdir()) == []
    health_is_served(server)


def test_an_answer_the_client_stops_reading_is_abandoned_after_30_s(slow_clients):
    server, futures = slow_clients
    outcome = futures["reader"].result(timeout=90)
    head, _, body = outcome.received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), outcome.received[:200]
    assert len(body) < BIG_ANSWER, "the whole answer arrived: the server never stalled"
    # The connection's thread is free again: only the connection asking is open, besides the
    # stalled body's if it is still there.
    wait_for(lambda: open_connections(server) <= 2, timeout=10, what="the stalled reader's connection to close")
    health_is_served(server)


def test_an_answer_read_slowly_but_steadily_is_not_cut_off(slow_clients):
    _, futures = slow_clients
    outcome = futures["slow reader"].result(timeout=120)
    head, _, body = outcome.received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), outcome.received[:200]
    assert len(body) == SLOW_ANSWER, f"cut off after {len(body)} of {SLOW_ANSWER} bytes, {outcome.seconds:.0f} s in"
    assert body == b"s" * SLOW_ANSWER


# Request line


def test_a_request_line_over_64_kib_is_414_pointing_to_put(server):
    line = b"GET /set?big=" + b"v" * 70_000 + b" HTTP/1.1\r\n"
    response = exchange(server, line + HOST + b"\r\n")
    assert response.status == 414
    assert "PUT /kv/" in response.problem()["detail"]
    assert server.get("/get?key=big").status == 404
    health_is_served(server)


def test_a_request_line_just_under_64_kib_is_served(server):
    value = "v" * 65_000
    assert server.get(f"/set?big={value}").status == 201
    assert server.get("/get?key=big").body == value.encode()


# Headers


def test_101_header_fields_are_431(server):
    fields = b"".join(b"X-Field-%d: %d\r\n" % (number, number) for number in range(100))
    response = exchange(server, b"GET /health HTTP/1.1\r\n" + HOST + fields + b"\r\n")
    assert response.status == 431
    assert response.problem()["detail"]
    health_is_served(server)


def test_100_header_fields_are_served(server):
    fields = b"".join(b"X-Field-%d: %d\r\n" % (number, number) for number in range(99))
    response = exchange(server, b"GET /health HTTP/1.1\r\n" + HOST + fields + b"\r\n")
    assert response.status == 200


def test_header_fields_totalling_over_64_kib_are_431(server):
    fields = b"".join(b"X-Big-%d: %s\r\n" % (number, b"h" * 4096) for number in range(20))
    response = exchange(server, b"GET /set?planted=1 HTTP/1.1\r\n" + HOST + fields + b"\r\n")
    assert response.status == 431
    assert response.problem()["detail"]
    assert server.get("/get?key=planted").status == 404
    health_is_served(server)


def test_header_fields_totalling_under_64_kib_are_served(server):
    fields = b"".join(b"X-Big-%d: %s\r\n" % (number, b"h" * 4096) for number in range(15))
    response = exchange(server, b"GET /health HTTP/1.1\r\n" + HOST + fields + b"\r\n")
    assert response.status == 200


def test_one_header_line_over_64_kib_is_431(server):
    response = exchange(server, b"GET /health HTTP/1.1\r\n" + HOST + b"X-Huge: " + b"h" * 70_000 + b"\r\n\r\n")
    assert response.status == 431
    assert response.problem()["detail"]
    health_is_served(server)


# Bodies


@pytest.fixture
def small_values(make_live_server):
    return make_live_server(max_value=1024)


def test_a_declared_length_over_max_value_is_413_before_any_100_continue(small_values):
    server = small_values
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"PUT /kv/big HTTP/1.1\r\n" + HOST + b"Content-Length: 1025\r\nExpect: 100-continue\r\n\r\n")
        response = read_http(sock.makefile("rb"))
    assert response.status == 413
    assert "1024" in response.problem()["detail"]
    assert server.get("/kv/big").status == 404


def test_a_value_of_exactly_max_value_is_stored(small_values):
    assert small_values.request("PUT", "/kv/edge", body=b"e" * 1024).status == 201
    assert small_values.get("/set?edge2=" + "e" * 1024).status == 201


def test_a_chunked_body_over_max_value_is_413_and_stores_nothing(small_values):
    server = small_values
    chunks = b"".join(b"200\r\n" + b"c" * 512 + b"\r\n" for _ in range(4)) + b"0\r\n\r\n"
    request = b"PUT /kv/big HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n" + chunks
    response = exchange(server, request)
    assert response.status == 413
    assert response.problem()["detail"]
    assert server.get("/kv/big").status == 404
    wait_for(lambda: not list((server.data_dir / ".kvserver" / "tmp").iterdir()), timeout=5, what="no temporary file")


def test_a_set_value_over_max_value_is_413_and_stores_nothing(small_values):
    response = small_values.get("/set?big=" + "v" * 1025)
    assert response.status == 413
    assert response.problem()["detail"]
    assert small_values.get("/get?key=big").status == 404


# The connection cap


def open_idle(server: Server, count: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(count)]


def thread_count(server: Server) -> int:
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    return int(re.search(r"^Threads:\s+(\d+)", status, re.MULTILINE).group(1))


def test_beyond_max_connections_a_client_gets_503_at_once_and_is_served_once_others_leave(make_live_server):
    server = make_live_server(max_connections=4)
    idle = open_idle(server, 4)
    try:
        started = time.monotonic()
        received, went_quiet = raw_exchange_timed(server.port, b"", timeout=1.0)
        elapsed = time.monotonic() - started
        assert received, "the fifth connection got no answer within 1 s"
        assert not went_quiet and elapsed < 1.0, "the fifth connection was not closed within 1 s"
        response = parse_response(received)
        assert response.status == 503
        assert response.problem()["detail"]
        # The four admitted connections are still served.
        idle[0].sendall(b"GET /health HTTP/1.1\r\n" + HOST + b"\r\n")
        idle[0].settimeout(5)
        answer = idle[0].recv(65536)
        assert answer.startswith(b"HTTP/1.1 200"), answer
    finally:
        for sock in idle:
            sock.close()
    wait_for(lambda: server.get("/health").status == 200, timeout=5, what="a connection slot to free up")
    for _ in range(5):
        health_is_served(server)


def test_refused_connections_start_no_threads(make_server):
    server = make_server("--quiet", "--max-connections", "4")
    idle = open_idle(server, 4)
    try:
        health = b"GET /health HTTP/1.1\r\n" + HOST + b"\r\n"
        for sock in idle:  # each is served, so each has its thread
            sock.sendall(health)
            assert read_http(sock.makefile("rb")).status == 200
        admitted = thread_count(server)
        peak = admitted
        for _ in range(100):
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as refused:
                assert refused.recv(65536).startswith(b"HTTP/1.1 503")
            peak = max(peak, thread_count(server))
        assert peak <= admitted + 2, f"{admitted} threads with 4 connections, {peak} while refusing 100 more"
    finally:
        for sock in idle:
            sock.close()
    wait_for(lambda: server.get("/health").status == 200, timeout=5, what="a connection slot to free up")
