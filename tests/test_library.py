"""kvserver as a Python storage library (SPEC section 7), as a user meets it.

The backend contract (put/get/delete/keys, TTL, ETag, compare-and-set, for every backend) lives
in test_storage.py. Here: the import, `open_storage`, the SPEC snippet, code written for
simplekv, big files streamed without being held in memory, threads, the data-dir lock, and a
data dir shared with a kvserver started afterwards.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import tracemalloc
import urllib.parse
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import KVSERVER

import kvserver
from kvserver import FileStorage, MemoryStorage, PreconditionFailed, Stat, open_storage

MiB = 1024 * 1024
BIG_SIZE = 256 * MiB
PEAK_LIMIT = 16 * MiB


@pytest.fixture(params=["memory", "files"])
def store(request, tmp_path) -> Iterator[kvserver.Storage]:
    """Each backend, as a user makes it; closed at the end."""
    made = MemoryStorage() if request.param == "memory" else FileStorage(tmp_path / "store")
    with made:
        yield made


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


def make_file(path: Path, size: int) -> str:
    """A file of `size` bytes made on disk a MiB at a time (no two MiB alike); its SHA-256."""
    block = os.urandom(MiB)
    digest = hashlib.sha256()
    with open(path, "wb") as file:
        for number in range(size // MiB):
            chunk = number.to_bytes(8, "big") + block[8:]
            file.write(chunk)
            digest.update(chunk)
    return digest.hexdigest()


def peak_memory(action) -> int:
    """Bytes of Python memory `action()` allocated at its peak, over what was held before."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        action()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - before


# Importing it


def test_the_public_names_import_from_kvserver():
    from kvserver import FileStorage, MemoryStorage, PreconditionFailed, Stat, open_storage  # noqa: F401

    for name in ["FileStorage", "MemoryStorage", "PreconditionFailed", "Stat", "open_storage"]:
        assert name in kvserver.__all__
        assert getattr(kvserver, name).__doc__, f"{name} has no docstring"


@pytest.mark.parametrize(
    "method",
    ["get", "put", "put_file", "get_file", "open", "delete", "keys", "iter_keys", "stat", "close"],
)
def test_every_public_storage_method_has_a_docstring(method):
    assert getattr(kvserver.Storage, method).__doc__


def test_precondition_failed_and_a_missing_key_are_ordinary_exceptions():
    assert issubclass(PreconditionFailed, Exception)
    store = MemoryStorage()
    with pytest.raises(KeyError) as info:
        store.get("absent")
    assert info.type is KeyError  # `except KeyError` and dict-like code catch it
    assert info.value.args == ("absent",)


# open_storage


def test_open_storage_memory_is_a_fresh_memory_storage():
    first, second = open_storage("memory"), open_storage("memory")
    assert type(first) is MemoryStorage
    first.put("k", b"v")
    assert "k" not in second


def test_open_storage_files_is_a_file_storage_in_dot_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open_storage("files") as store:
        assert type(store) is FileStorage
        store.put("greeting", b"hello")
    assert (tmp_path / "data" / "greeting").read_bytes() == b"hello"


def test_open_storage_files_with_a_path_is_a_file_storage_there(tmp_path):
    where = tmp_path / "some where" / "deeper"
    with open_storage(f"files:{where}") as store:
        assert type(store) is FileStorage
        assert Path(store.path) == where
        store.put("greeting", b"hello")
    assert (where / "greeting").read_bytes() == b"hello"


def test_open_storage_files_with_a_relative_path_is_relative_to_the_working_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open_storage("files:rel/dir") as store:
        store.put("k", b"v")
    assert (tmp_path / "rel" / "dir" / "k").read_bytes() == b"v"


@pytest.mark.parametrize("spec", ["", "disk", "mem", "Memory", "memory:extra", "s3://bucket/x", "file:./data"])
def test_open_storage_with_a_bad_spec_raises_value_error_listing_the_good_ones(spec):
    with pytest.raises(ValueError) as info:
        open_storage(spec)
    message = str(info.value)
    assert repr(spec) in message or spec in message
    assert "memory" in message
    assert "files:" in message


def test_the_storages_have_reprs_that_say_what_they_are(tmp_path):
    assert repr(MemoryStorage()) == "MemoryStorage()"
    with FileStorage(tmp_path / "d") as store:
        assert repr(store) == f"FileStorage({str(tmp_path / 'd')!r}, fsync=True)"


# The SPEC section 7 snippet, line by line (only paths adapted)


def test_the_spec_snippet_runs_against_file_storage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    big_source = tmp_path / "big-source"
    big_source.write_bytes(b"B" * (200 * 1024))
    fileobj = io.BytesIO()

    from kvserver import FileStorage, MemoryStorage, RedisStorage, open_storage  # noqa: F401

    store = FileStorage("./data")  # or open_storage("files:./data")
    assert store.put("greeting", b"hello") == "greeting"  # returns the key
    with pytest.raises(ValueError):  # ValueError on a bad key
        store.put("bad\x00key", b"hello")
    assert store.get("greeting") == b"hello"
    with pytest.raises(KeyError):  # KeyError if absent
        store.get("absent")
    assert "greeting" in store
    assert list(store) == ["greeting"]
    assert store.keys(prefix="gr") == ["greeting"]
    assert store.open("greeting").read() == b"hello"
    assert store.put_file("big", str(big_source)) == "big"
    assert store.get_file("big", fileobj) == "big"
    assert fileobj.getvalue() == big_source.read_bytes()
    store.delete("greeting")
    store.delete("greeting")  # no error if absent
    assert "greeting" not in store
    assert store.put("k", b"v", content_type="text/plain", ttl=60) == "k"
    stat = store.stat("k")  # .size .content_type .etag .expires_at; KeyError if absent
    assert isinstance(stat, Stat)
    assert (stat.size, stat.content_type) == (1, "text/plain")
    assert isinstance(stat.etag, str) and stat.etag
    assert stat.expires_at is not None
    with pytest.raises(KeyError):
        store.stat("absent")
    etag = stat.etag
    store.put("k", b"w", if_match=etag)  # compare-and-set
    with pytest.raises(PreconditionFailed):  # ... kvserver.PreconditionFailed if it fails
        store.put("k", b"x", if_match=etag)
    assert store.get("k") == b"w"
    with pytest.raises(kvserver.PreconditionFailed):
        store.put("k", b"w", if_none_match=True)  # "k" exists
    store.put("new", b"w", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        store.delete("k", if_match=etag)  # stale
    store.delete("k", if_match=store.stat("k").etag)
    assert "k" not in store
    store.close()  # releases the data-dir lock; also a context manager
    with FileStorage("./data") as again:
        assert again.keys() == ["big", "new"]


# Code written for simplekv works unchanged


def test_simplekv_style_code_works_unchanged(store, tmp_path):
    assert store.put("key1", b"hello") == "key1"
    assert store.get("key1") == b"hello"
    with pytest.raises(KeyError):
        store.get("key2")
    assert "key1" in store
    assert "key2" not in store
    store.delete("key2")  # absent: no error
    assert store.put("key2", b"world") == "key2"
    assert sorted(store.keys()) == ["key1", "key2"]
    iterator = store.iter_keys()
    assert iter(iterator) is iterator
    assert sorted(iterator) == ["key1", "key2"]
    assert sorted(store) == ["key1", "key2"]
    with store.open("key2") as file:
        assert file.read() == b"world"
    store.delete("key1")
    assert "key1" not in store
    assert list(store) == ["key2"]


def test_open_of_a_missing_key_raises_key_error(store):
    with pytest.raises(KeyError):
        store.open("absent")


def test_open_gives_a_file_object_that_reads_in_parts(store):
    store.put("k", b"0123456789")
    with store.open("k") as file:
        assert file.read(3) == b"012"
        assert file.read(3) == b"345"
        assert file.read() == b"6789"
        assert file.read() == b""


@pytest.mark.parametrize(
    "call",
    [
        lambda store: store.get(""),
        lambda store: store.put("", b"v"),
        lambda store: store.put("a\x00b", b"v"),
        lambda store: store.put("x" * 1025, b"v"),
        lambda store: store.put(b"bytes-key", b"v"),
        lambda store: store.delete("\n"),
        lambda store: store.open(""),
        lambda store: store.put_file("", io.BytesIO(b"v")),
        lambda store: store.get_file("", io.BytesIO()),
        lambda store: store.stat("\x7f"),
    ],
    ids=["get", "put-empty", "put-nul", "put-1025", "put-bytes-key", "delete", "open", "put_file", "get_file", "stat"],
)
def test_every_method_raises_value_error_on_a_bad_key_and_stores_nothing(store, call):
    with pytest.raises(ValueError, match=r"\S"):
        call(store)
    assert store.keys() == []


def test_membership_of_a_bad_key_raises_value_error_as_in_simplekv(store):
    # simplekv's __contains__: "Raises ValueError if the key is not valid"; SPEC section 2 and 7.
    with pytest.raises(ValueError):
        _ = "" in store
    with pytest.raises(ValueError):
        _ = "a\x00b" in store


def test_put_of_a_str_value_is_refused_and_stores_nothing(store):
    with pytest.raises((TypeError, ValueError), match="bytes"):
        store.put("k", "a str")  # type: ignore[arg-type]
    assert "k" not in store


def test_put_file_takes_a_path_as_str_or_path_and_leaves_the_source(store, tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"\x00from a file\xff")
    assert store.put_file("by-str", str(source)) == "by-str"
    assert store.put_file("by-path", source) == "by-path"
    assert store.get("by-str") == store.get("by-path") == b"\x00from a file\xff"
    assert source.read_bytes() == b"\x00from a file\xff"


def test_put_file_takes_a_binary_file_object_and_reads_it_from_where_it_is(store, tmp_path):
    assert store.put_file("k", io.BytesIO(b"from memory")) == "k"
    assert store.get("k") == b"from memory"
    source = tmp_path / "source.bin"
    source.write_bytes(b"skip:the rest")
    with open(source, "rb") as file:
        file.read(5)
        store.put_file("rest", file)
    assert store.get("rest") == b"the rest"


def test_put_file_takes_the_metadata_keywords_too(store):
    store.put_file("page", io.BytesIO(b"<p>hi</p>"), content_type="text/html", ttl=3600)
    stat = store.stat("page")
    assert (stat.size, stat.content_type) == (9, "text/html")
    assert stat.expires_at is not None


def test_get_file_writes_to_a_new_file_named_by_a_path(store, tmp_path):
    store.put("k", b"\x00\x01 value")
    target = tmp_path / "out.bin"
    assert store.get_file("k", str(target)) == "k"
    assert target.read_bytes() == b"\x00\x01 value"
    target.write_bytes(b"old contents that are longer")
    store.get_file("k", target)
    assert target.read_bytes() == b"\x00\x01 value"


def test_get_file_writes_to_a_file_object_where_it_is(store):
    store.put("k", b"value")
    target = io.BytesIO()
    target.write(b"head:")
    assert store.get_file("k", target) == "k"
    assert target.getvalue() == b"head:value"


def test_get_file_of_a_missing_key_raises_key_error_and_creates_no_file(store, tmp_path):
    target = tmp_path / "never.bin"
    with pytest.raises(KeyError):
        store.get_file("absent", target)
    assert not target.exists()
    buffer = io.BytesIO()
    with pytest.raises(KeyError):
        store.get_file("absent", buffer)
    assert buffer.getvalue() == b""


# Big files, streamed


@pytest.fixture(scope="module")
def big_file(tmp_path_factory) -> tuple[Path, str]:
    """A 256 MiB file, made once for the module, with its SHA-256."""
    path = tmp_path_factory.mktemp("big") / "big.bin"
    digest = make_file(path, BIG_SIZE)
    yield path, digest
    path.unlink()


def test_file_storage_puts_and_gets_a_256_mib_file_by_path_without_holding_it_in_memory(big_file, tmp_path):
    source, digest = big_file
    target = tmp_path / "copy.bin"
    with FileStorage(tmp_path / "store") as store:
        peak = peak_memory(lambda: store.put_file("big", source))
        assert peak < PEAK_LIMIT, f"put_file(path) peaked at {peak / MiB:.1f} MiB"
        assert store.stat("big").size == BIG_SIZE
        peak = peak_memory(lambda: store.get_file("big", target))
        assert peak < PEAK_LIMIT, f"get_file(path) peaked at {peak / MiB:.1f} MiB"
        assert not os.listdir(tmp_path / "store" / ".kvserver" / "tmp")
    assert sha256_of(target) == digest
    assert sha256_of(tmp_path / "store" / "big") == digest  # one file per key, the bytes exactly


def test_file_storage_puts_and_gets_a_256_mib_file_by_file_object_without_holding_it_in_memory(big_file, tmp_path):
    source, digest = big_file
    target = tmp_path / "copy.bin"
    with FileStorage(tmp_path / "store") as store:
        with open(source, "rb") as file:
            peak = peak_memory(lambda: store.put_file("big", file, content_type="video/mp4"))
        assert peak < PEAK_LIMIT, f"put_file(file object) peaked at {peak / MiB:.1f} MiB"
        with open(target, "wb") as file:
            peak = peak_memory(lambda: store.get_file("big", file))
        assert peak < PEAK_LIMIT, f"get_file(file object) peaked at {peak / MiB:.1f} MiB"

        def read_in_parts():
            with store.open("big") as value:
                digest_of_open = hashlib.sha256()
                while part := value.read(MiB):
                    digest_of_open.update(part)
            return digest_of_open.hexdigest()

        result = []
        peak = peak_memory(lambda: result.append(read_in_parts()))
        assert peak < PEAK_LIMIT, f"reading open() in parts peaked at {peak / MiB:.1f} MiB"
        assert result == [digest]
        assert store.stat("big").content_type == "video/mp4"
    assert sha256_of(target) == digest


def test_memory_storage_puts_and_gets_a_large_file_whole(tmp_path):
    source = tmp_path / "source.bin"
    digest = make_file(source, 8 * MiB)
    store = MemoryStorage()
    store.put_file("by-path", source)
    with open(source, "rb") as file:
        store.put_file("by-object", file)
    store.get_file("by-path", tmp_path / "out-path.bin")
    with open(tmp_path / "out-object.bin", "wb") as file:
        store.get_file("by-object", file)
    assert sha256_of(tmp_path / "out-path.bin") == digest
    assert sha256_of(tmp_path / "out-object.bin") == digest
    assert store.stat("by-path").size == store.stat("by-object").size == 8 * MiB


def test_a_put_file_whose_source_fails_half_way_stores_nothing(store):
    class Breaks(io.RawIOBase):
        def __init__(self):
            self.sent = 0

        def readable(self):
            return True

        def readinto(self, buffer):
            if self.sent >= 300_000:
                raise OSError("the source broke off")
            buffer[: len(buffer)] = b"x" * len(buffer)
            self.sent += len(buffer)
            return len(buffer)

    store.put("k", b"old")
    with pytest.raises(OSError, match="broke off"):
        store.put_file("k", io.BufferedReader(Breaks()))
    assert store.get("k") == b"old"
    with pytest.raises(OSError, match="broke off"):
        store.put_file("new", io.BufferedReader(Breaks()))
    assert "new" not in store


# Threads


THREADS = 8
ROUNDS = 200


def run_in_threads(work) -> list:
    """Run `work(thread_number)` in THREADS threads started together; their results, or their first error."""
    start = threading.Barrier(THREADS, timeout=10)

    def started(number):
        start.wait()
        return work(number)

    with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
        futures = [pool.submit(started, number) for number in range(THREADS)]
        return [future.result(timeout=60) for future in futures]


def shared_value(thread: int, round_: int) -> bytes:
    """A value whose every part names its writer, some of them over 64 KiB (held on disk)."""
    part = f"<{thread}:{round_}>".encode()
    return part * (8000 if round_ % 20 == 0 else 10)


def assert_whole(value: bytes) -> None:
    """A shared value is one writer's, whole: not torn, not mixed."""
    part = value[: value.index(b">") + 1]
    assert value == part * (len(value) // len(part)), value[:80]
    assert len(value) // len(part) in (10, 8000)


def test_the_library_used_from_several_threads_at_once_stays_consistent(store):
    def work(thread):
        for round_ in range(ROUNDS):
            own = f"thread-{thread}/{round_ % 20}"
            value = f"{thread}:{round_}".encode()
            assert store.put(own, value) == own
            assert store.get(own) == value  # no one else writes it
            shared = f"shared/{round_ % 10}"
            store.put(shared, shared_value(thread, round_))
            assert_whole(store.get(shared))
            assert own in store
            with store.open(shared) as file:
                assert_whole(file.read())
            if round_ % 50 == 0:
                keys = store.keys(f"thread-{thread}/")
                assert keys == sorted(keys) and own in keys
        return thread

    assert run_in_threads(work) == list(range(THREADS))
    for thread in range(THREADS):
        assert store.keys(f"thread-{thread}/") == sorted(f"thread-{thread}/{n}" for n in range(20))
        for n in range(20):
            assert store.get(f"thread-{thread}/{n}") == f"{thread}:{ROUNDS - 20 + n}".encode()
    for n in range(10):
        value = store.get(f"shared/{n}")
        assert_whole(value)
        writer, round_ = map(int, value[1 : value.index(b">")].split(b":"))
        assert writer in range(THREADS) and round_ == ROUNDS - 10 + n  # its writer's last write
        assert store.stat(f"shared/{n}").size == len(value)
    assert len(store.keys()) == THREADS * 20 + 10


def test_compare_and_set_from_several_threads_loses_no_increment(store):
    store.put("counter", b"0")
    increments = 25

    def work(thread):
        retries = 0
        for _ in range(increments):
            while True:
                etag = store.stat("counter").etag
                count = int(store.get("counter"))
                try:
                    store.put("counter", str(count + 1).encode(), if_match=etag)
                    break
                except PreconditionFailed:
                    retries += 1
        return retries

    run_in_threads(work)
    assert store.get("counter") == str(THREADS * increments).encode()


def test_create_only_puts_from_several_threads_let_exactly_one_win(store):
    def work(thread):
        try:
            store.put("leader", str(thread).encode(), if_none_match=True)
            return thread
        except PreconditionFailed:
            return None

    winners = [thread for thread in run_in_threads(work) if thread is not None]
    assert len(winners) == 1
    assert store.get("leader") == str(winners[0]).encode()


# The data-dir lock


def test_a_file_storage_holds_its_data_dir_until_closed(tmp_path):
    store = FileStorage(tmp_path / "d")
    with pytest.raises(kvserver.DataDirLocked, match="in use"):
        FileStorage(tmp_path / "d")
    store.close()
    with FileStorage(tmp_path / "d"):
        pass


def test_a_file_storage_used_as_a_context_manager_releases_the_lock_at_the_end(tmp_path):
    with FileStorage(tmp_path / "d") as store:
        assert isinstance(store, FileStorage)
        store.put("k", b"v")
        with pytest.raises(kvserver.DataDirLocked):
            FileStorage(tmp_path / "d")
    with FileStorage(tmp_path / "d") as again:
        assert again.get("k") == b"v"


def test_a_file_storage_context_releases_the_lock_when_the_block_raises(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), FileStorage(tmp_path / "d") as store:
        store.put("k", b"v")
        raise RuntimeError("boom")
    with FileStorage(tmp_path / "d") as again:
        assert again.get("k") == b"v"


def test_closing_twice_is_harmless(tmp_path):
    store = FileStorage(tmp_path / "d")
    store.close()
    store.close()
    MemoryStorage().close()


def test_a_kvserver_will_not_start_on_a_data_dir_a_library_store_holds(tmp_path):
    with FileStorage(tmp_path / "d"):
        result = subprocess.run(
            [sys.executable, str(KVSERVER), "--port", "0", "--quiet", "--data-dir", str(tmp_path / "d")],
            capture_output=True,
            text=True,
            timeout=15,
        )
    assert result.returncode == 1
    assert "in use" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# One data dir, the library and then a server


LIBRARY_VALUES = [
    # key, value, content type, what XML-RPC loads
    ("greeting", b"hello", "text/plain; charset=utf-8", "hello"),
    ("config/ports", b"[4050, 5100, 5200]", "application/json", [4050, 5100, 5200]),
    ("blob", b"\x00\xff\xfe", "application/octet-stream", xmlrpc.client.Binary(b"\x00\xff\xfe")),
    ("page.html", b"<h1>hi</h1>", "text/html", "<h1>hi</h1>"),
    ("ключ with space/..", "värde".encode(), "text/plain; charset=utf-8", "värde"),
    ("big", bytes(range(256)) * 1024, "application/octet-stream", xmlrpc.client.Binary(bytes(range(256)) * 1024)),
    ("utf8 but bytes", b"plain", "application/octet-stream", xmlrpc.client.Binary(b"plain")),
]


def test_values_written_by_the_library_are_served_by_a_kvserver_started_on_the_same_data_dir(
    tmp_path, make_live_server
):
    data_dir = tmp_path / "data"
    etags = {}
    with FileStorage(data_dir) as store:
        for key, value, content_type, _ in LIBRARY_VALUES:
            store.put(key, value, content_type=content_type)
            etags[key] = store.stat(key).etag
        store.put("expiring", b"soon", ttl=3600)
        store.put("deleted", b"gone")
        store.delete("deleted")
    server = make_live_server(data_dir=data_dir)
    keys = sorted([key for key, *_ in LIBRARY_VALUES] + ["expiring"])
    assert server.get("/keys").json() == {"keys": keys, "next": None}
    for key, value, content_type, _ in LIBRARY_VALUES:
        response = server.get("/kv/" + urllib.parse.quote(key, safe=""))
        assert response.status == 200, key
        assert response.body == value, key
        assert response.headers["Content-Type"] == content_type, key
        assert response.headers["ETag"] == f'"{etags[key]}"', key
    assert server.get("/get?key=expiring").body == b"soon"
    assert server.get("/get?key=deleted").status == 404
    with xmlrpc.client.ServerProxy(server.url) as rpc:
        for key, _, _, loaded in LIBRARY_VALUES:
            assert rpc.load(key) == loaded, key


def test_values_written_through_a_kvserver_are_read_by_the_library_after_it_stops(tmp_path, make_server):
    data_dir = tmp_path / "data"
    server = make_server("--quiet", data_dir=data_dir)
    server.get("/set?greeting=hello")
    server.request("PUT", "/kv/doc", body=b'{"a": 1}', headers={"Content-Type": "application/json"})
    etag = server.get("/kv/doc").headers["ETag"].strip('"')
    with xmlrpc.client.ServerProxy(server.url) as rpc:
        rpc.save("ports", [4050, 5100, 5200])
    assert server.stop() == 0
    with FileStorage(data_dir) as store:
        assert store.keys() == ["doc", "greeting", "ports"]
        assert store.get("greeting") == b"hello"
        assert store.stat("doc").content_type == "application/json"
        assert store.stat("doc").etag == etag
        assert json.loads(store.get("ports")) == [4050, 5100, 5200]


def test_a_non_blocking_source_with_no_bytes_ready_stores_nothing(store):
    """readinto() answers None when a non-blocking file has no bytes yet: that is not the end
    of the value, whose first part would be stored as if it were all of it (found by review)."""
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    os.write(write_end, b"abc")  # "def" is still to come
    try:
        with open(read_end, "rb", buffering=0) as source, pytest.raises(ValueError, match="non-blocking"):
            store.put_file("k", source)
    finally:
        os.close(write_end)
    assert "k" not in store


@pytest.mark.parametrize("source", [123, None, 1.5])
def test_a_source_that_holds_no_value_is_a_value_error(store, source):
    with pytest.raises(ValueError, match="a value is bytes"):
        store.write("k", source)
    assert "k" not in store


def test_a_memoryview_with_gaps_stores_the_bytes_it_shows(store):
    store.put("k", memoryview(b"abcdef")[::2])
    assert store.get("k") == b"ace"
