"""Backup, restore and moving between storages (SPEC sections 1, 4 and 7, issue 17): the export format,
`Storage.export` / `Storage.import_`, `GET /export`, `POST /import`, and `kvserver export` /
`kvserver import`; round trips between every pair of backends, a bad line, an export taken while
writes go on, and a 1 GiB value with the memory of the server and of the command line measured.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import http.client
import io
import itertools
import json
import os
import pty
import random
import select
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import KVSERVER, Server, wait_for
from test_readme import console_examples
from test_redis import redis_db, redis_server  # noqa: F401  (the fixtures redis_url uses)

import kvserver

MiB = 1024 * 1024
GiB = 1024 * MiB

SAMPLE = {  # key: (value, media type, ttl)
    "greeting": (b"hello", "text/plain; charset=utf-8", None),
    "app/prod/db url": (b"postgres://db", "text/plain", 3600),
    "empty": (b"", "application/octet-stream", None),
    "bytes": (bytes(range(256)), "application/octet-stream", None),
    "large/🔑 ключ": (bytes(range(251)) * 400, "image/png", 7200),  # over 64 KiB: streamed from a file
    "json": (b'{"a": [1, 2]}', "application/json", None),
    "\U0010fffd end": (b"x", "text/x-odd; charset=utf-8", 60),
}


def fill(store: kvserver.Storage) -> None:
    for key, (value, content_type, ttl) in SAMPLE.items():
        store.put(key, value, content_type=content_type, ttl=ttl)


def contents(store: kvserver.Storage) -> dict[str, tuple[bytes, str, float | None]]:
    result = {}
    for key in store:
        stat, body = store.fetch(key)
        with body:
            data = body.read()
        result[key] = (data, stat.content_type, stat.expires_at)
    return result


def assert_same(copy: kvserver.Storage, original: dict[str, tuple[bytes, str, float | None]]) -> None:
    """The same keys, bytes and media types, and the same expiry within a second."""
    copied = contents(copy)
    assert sorted(copied) == sorted(original)
    for key, (data, content_type, expires_at) in original.items():
        assert copied[key][:2] == (data, content_type), key
        if expires_at is None:
            assert copied[key][2] is None, key
        else:
            assert copied[key][2] is not None and abs(copied[key][2] - expires_at) <= 1.0, key


def exported(store: kvserver.Storage, prefix: str = "") -> bytes:
    out = io.BytesIO()
    store.export(out, prefix)
    return out.getvalue()


def line(key: str, value: bytes, content_type: str = "text/plain", expires_at: object = None) -> bytes:
    """One line of the export format, as kvserver writes it."""
    head = json.dumps({"key": key, "content_type": content_type, "expires_at": expires_at}, ensure_ascii=False)
    return head[:-1].encode() + b', "value": "' + base64.b64encode(value) + b'"}\n'


@pytest.fixture
def redis_url(redis_db) -> str:  # noqa: F811  (the fixture imported above)
    """An empty Redis of its own, started for these tests (see test_redis)."""
    return redis_db.url()


@pytest.fixture
def memory() -> Iterator[kvserver.Storage]:
    with kvserver.MemoryStorage() as store:
        yield store


# The format, from the library


def test_export_writes_a_line_per_key_in_code_point_order_with_the_fields_in_order(memory):
    memory.put("b", b"\xff\x00", content_type="application/octet-stream")
    memory.put("a/é", b"text", content_type="text/plain")
    memory.put("A", b"")
    memory.put("z", b"v", ttl=100)
    expires_at = memory.stat("z").expires_at
    assert exported(memory) == (
        b'{"key": "A", "content_type": "application/octet-stream", "expires_at": null, "value": ""}\n'
        b'{"key": "a/\xc3\xa9", "content_type": "text/plain", "expires_at": null, "value": "dGV4dA=="}\n'
        b'{"key": "b", "content_type": "application/octet-stream", "expires_at": null, "value": "/wA="}\n'
        + b'{"key": "z", "content_type": "application/octet-stream", "expires_at": %b, "value": "dg=="}\n'
        % repr(expires_at).encode()
    )
    assert exported(memory, prefix="a/") == line("a/é", b"text")


def test_export_returns_the_count_and_leaves_out_expired_keys(memory):
    memory.put("stays", b"v")
    memory.put("goes", b"v", ttl=1)
    time.sleep(1.1)  # the TTL must pass; no event to wait for in a MemoryStorage
    out = io.BytesIO()
    assert memory.export(out) == 1
    assert out.getvalue() == line("stays", b"v", "application/octet-stream")


def test_a_large_value_is_exported_whole_in_base64_without_padding_inside(tmp_path):
    value = os.urandom(3 * kvserver.CHUNK + 1)  # blocks of base64, then a padded end
    with kvserver.FileStorage(tmp_path / "data", fsync=False) as files:
        files.put("big", value)
        document = json.loads(exported(files))
    assert base64.b64decode(document["value"], validate=True) == value


def test_import_stores_each_line_whole_with_its_media_type_and_ttl(memory):
    memory.put("greeting", b"old", content_type="text/old", ttl=5)
    later = time.time() + 100.5
    data = line("greeting", b"new", "text/plain") + line("timed", b"t", "text/x", later)
    assert memory.import_(io.BytesIO(data)) == (2, 0)
    assert memory.get("greeting") == b"new"
    assert memory.stat("greeting").content_type == "text/plain"
    assert memory.stat("greeting").expires_at is None, "an import replaces the metadata too"
    expires_at = memory.stat("timed").expires_at
    assert expires_at is not None and later <= expires_at <= later + 1


def test_import_skips_and_counts_lines_whose_expiry_has_passed(memory):
    data = line("old", b"v", expires_at=time.time() - 1) + line("new", b"v") + line("ancient", b"v", expires_at=0)
    assert memory.import_(io.BytesIO(data)) == (1, 2)
    assert list(memory) == ["new"]


def test_import_reads_compact_json_crlf_blank_lines_and_a_last_line_without_newline(memory):
    data = (
        b'{"key":"a","content_type":"t/a","expires_at":null,"value":"YQ=="}\r\n'
        b"\n  \n"
        b'{ "key" : "b" , "content_type" : "t/b" , "expires_at" : 1e20 , "value" : "Yg==" }'
    )
    with pytest.raises(ValueError, match=r"line 4: .*TTL"):  # 1e20 is too far ahead for a TTL
        memory.import_(io.BytesIO(data))
    assert memory.get("a") == b"a"
    assert memory.import_(io.BytesIO(data.replace(b"1e20", b"null"))) == (2, 0)
    assert memory.get("b") == b"b"


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 4096])
def test_import_parses_the_same_whatever_the_chunks_it_is_given(memory, size):
    source = kvserver.MemoryStorage()
    fill(source)
    data = exported(source)
    chunks = (data[start : start + size] for start in range(0, len(data), size))
    assert memory.import_(chunks) == (len(SAMPLE), 0)
    assert_same(memory, contents(source))


@pytest.mark.parametrize("size", [1, 2, 3, 5, 4096])
def test_import_takes_slashes_escaped_as_json_may_escape_them_whatever_the_chunks(memory, size):
    """PHP's json_encode writes '/' as '\\/' by default, in the value's base64 too."""
    value = bytes(range(256)) * 3  # its base64 holds many '/'
    data = line("a/b", value, "image/png").replace(b"/", b"\\/")
    assert data.count(b"\\/") > 10
    chunks = (data[start : start + size] for start in range(0, len(data), size))
    assert memory.import_(chunks) == (1, 0)
    assert memory.get("a/b") == value
    assert memory.stat("a/b").content_type == "image/png"


GOOD = line("first", b"stored")
BAD_LINES = {
    "not-json": b"hello\n",
    "empty-object": b"{}\n",
    "fields-out-of-order": b'{"content_type": "t", "key": "k", "expires_at": null, "value": ""}\n',
    "missing-field": b'{"key": "k", "content_type": "t", "value": ""}\n',
    "extra-field": b'{"key": "k", "content_type": "t", "expires_at": null, "value": "", "etag": "x"}\n',
    "key-not-a-string": b'{"key": 1, "content_type": "t", "expires_at": null, "value": ""}\n',
    "bad-escape": b'{"key": "\\x", "content_type": "t", "expires_at": null, "value": ""}\n',
    "invalid-key": b'{"key": "a\\nb", "content_type": "t", "expires_at": null, "value": ""}\n',
    "empty-key": b'{"key": "", "content_type": "t", "expires_at": null, "value": ""}\n',
    "bad-media-type": b'{"key": "k", "content_type": "t\\u00e9", "expires_at": null, "value": ""}\n',
    "empty-media-type": b'{"key": "k", "content_type": "", "expires_at": null, "value": ""}\n',
    "media-type-with-spaces-around": b'{"key": "k", "content_type": " t ", "expires_at": null, "value": ""}\n',
    "media-type-too-long": b'{"key": "k", "content_type": "' + b"t" * 1025 + b'", "expires_at": null, "value": ""}\n',
    "expires-at-text": b'{"key": "k", "content_type": "t", "expires_at": "soon", "value": ""}\n',
    "not-base64": b'{"key": "k", "content_type": "t", "expires_at": null, "value": "a*b="}\n',
    "backslash-in-base64": b'{"key": "k", "content_type": "t", "expires_at": null, "value": "YW\\\\Jj"}\n',
    "base64-cut": b'{"key": "k", "content_type": "t", "expires_at": null, "value": "YWJ"}\n',
    "padding-inside": b'{"key": "k", "content_type": "t", "expires_at": null, "value": "YQ==YWJj"}\n',
    "no-closing-brace": b'{"key": "k", "content_type": "t", "expires_at": null, "value": "YQ=="\n',
    "text-after": b'{"key": "k", "content_type": "t", "expires_at": null, "value": "YQ=="} x\n',
    "two-objects": b'{"key": "k", "content_type": "t", "expires_at": null, "value": "YQ=="}{}\n',
    "cut-in-value": b'{"key": "k", "content_type": "t", "expires_at": null, "value": "YWJj',
    "cut-after-value": b'{"key": "k", "content_type": "t", "expires_at": null, "value": "YWJj"',
    "cut-in-head": b'{"key": "k", "content_ty',
}


@pytest.mark.parametrize("bad", list(BAD_LINES.values()), ids=list(BAD_LINES))
def test_a_bad_line_stops_the_import_there_naming_its_line_and_storing_nothing_of_it(memory, bad):
    data = GOOD + b"\n" + bad + line("after", b"never")
    with pytest.raises(ValueError, match=r"^line 3: ") as raised:
        memory.import_(io.BytesIO(data))
    assert "the lines before it were imported" in str(raised.value)
    assert list(memory) == ["first"]


class RefusingStorage(kvserver.MemoryStorage):
    """A store that cannot take key "b": its write raises `refusal`, as a full disk or Redis would."""

    def __init__(self, refusal: Exception) -> None:
        super().__init__()
        self.refusal = refusal

    def _write(self, key, new, precondition):
        if key == "b":
            raise self.refusal
        return super()._write(key, new, precondition)


@pytest.mark.parametrize(
    ("refusal", "raised", "says"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), kvserver.StorageFull, "the disk is full"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), kvserver.StorageFull, "the disk is full"),
        (kvserver.StorageFull("Redis is out of memory"), kvserver.StorageFull, "Redis is out of memory"),
        (kvserver.StorageUnavailable("cannot reach Redis"), kvserver.StorageUnavailable, "cannot reach Redis"),
    ],
    ids=["ENOSPC", "EDQUOT", "redis-full", "redis-unreachable"],
)
def test_a_storage_that_cannot_take_a_line_stops_the_import_there_naming_it(refusal, raised, says):
    """The lines before it stay imported, so an answer that says nothing was stored, or does not
    say where the import stopped, would leave the user guessing what to import again."""
    store = RefusingStorage(refusal)
    with pytest.raises(raised) as stopped:
        store.import_(io.BytesIO(line("a", b"1") + line("b", b"2") + line("c", b"3")))
    message = str(stopped.value)
    assert message.startswith("line 2 could not be stored: ") and says in message, message
    assert (
        message.endswith("the lines before it were imported") or "free space and import the lines from 2 on" in message
    )
    assert list(store) == ["a"]


def test_an_error_of_the_progress_callback_is_its_own_not_the_line_s():
    """The line was stored; a full disk under the caller's own progress log is not the import's."""
    store = kvserver.MemoryStorage()
    full = OSError(errno.ENOSPC, "No space left on device")

    def progress(lines: int, size: int) -> None:
        raise full

    with pytest.raises(OSError) as raised:
        store.import_(io.BytesIO(line("a", b"1")), progress=progress)
    assert raised.value is full
    assert store.get("a") == b"1"


def test_any_other_error_of_the_disk_names_the_line_too():
    """An OSError of its own kind (EIO here), from the error the storage raised."""
    store = RefusingStorage(OSError(errno.EIO, "Input/output error"))
    with pytest.raises(OSError) as stopped:
        store.import_(io.BytesIO(line("a", b"1") + line("b", b"2")))
    assert stopped.value.errno == errno.EIO and stopped.value.__cause__ is store.refusal
    assert stopped.value.strerror == "line 2 could not be stored: Input/output error; the lines before it were imported"
    assert list(store) == ["a"]


def test_a_full_disk_in_post_import_is_a_507_naming_the_line():
    server = kvserver.KVServer(("127.0.0.1", 0), RefusingStorage(OSError(errno.ENOSPC, "full")), quiet=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
        connection.request("POST", "/import", body=line("a", b"1") + line("b", b"2") + line("c", b"3"))
        response = connection.getresponse()
        detail = json.loads(response.read())["detail"]
        connection.close()
        assert response.status == 507
        assert detail.startswith("line 2 could not be stored: the disk is full"), detail
        assert "the lines before it were imported" in detail and "nothing was stored" not in detail
        assert list(server.storage) == ["a"]
    finally:
        server.shutdown()
        server.stop()
        thread.join(10)


def test_a_value_over_max_value_is_a_bad_line(memory):
    with pytest.raises(ValueError, match="line 2: the value is over 3 bytes"):
        memory.import_(io.BytesIO(line("small", b"abc") + line("big", b"abcd")), max_value=3)
    assert list(memory) == ["small"]


def test_a_cut_off_value_leaves_no_temporary_file_and_keeps_the_old_value(tmp_path):
    with kvserver.FileStorage(tmp_path / "data", fsync=False) as files:
        files.put("k", b"old")
        cut = line("k", os.urandom(200_000))[:150_000]
        with pytest.raises(ValueError, match="line 1: the line is cut off inside its value"):
            files.import_(io.BytesIO(cut))
        assert files.get("k") == b"old"
        assert list((tmp_path / "data" / ".kvserver" / "tmp").iterdir()) == []


# Round trips between every pair of backends


def test_a_store_goes_from_files_to_redis_to_memory_to_files_unchanged(tmp_path, redis_url):
    with kvserver.FileStorage(tmp_path / "first", fsync=False) as first:
        fill(first)
        original = contents(first)
        chain = [first]
        with (
            kvserver.RedisStorage(redis_url) as redis_store,
            kvserver.MemoryStorage() as memory_store,
            kvserver.FileStorage(tmp_path / "last", fsync=False) as last,
        ):
            chain += [redis_store, memory_store, last]
            for source, target in itertools.pairwise(chain):
                assert target.import_(io.BytesIO(exported(source))) == (len(SAMPLE), 0)
                assert_same(target, original)
            with kvserver.FileStorage(tmp_path / "back", fsync=False) as back:  # and files to files directly
                back.import_(io.BytesIO(exported(redis_store)))
                assert_same(back, original)
            first.close()
            last.close()
            with kvserver.FileStorage(tmp_path / "last", fsync=False) as reopened:
                assert_same(reopened, original)


@pytest.mark.parametrize(("source_kind", "target_kind"), [("memory", "redis"), ("redis", "files"), ("files", "memory")])
def test_each_pair_of_backends_round_trips(tmp_path, redis_url, source_kind, target_kind):
    def open_kind(kind: str, name: str) -> kvserver.Storage:
        if kind == "redis":
            return kvserver.RedisStorage(redis_url, prefix=f"{name}:")
        return kvserver.open_storage(f"files:{tmp_path / name}" if kind == "files" else kind, fsync=False)

    with open_kind(source_kind, "source") as source, open_kind(target_kind, "target") as target:
        fill(source)
        target.import_(io.BytesIO(exported(source)))
        assert_same(target, contents(source))
        source.delete("greeting")
        source.import_(io.BytesIO(exported(target)))
        assert_same(source, contents(target))


@pytest.mark.parametrize(
    ("stored", "read"), [("", "application/octet-stream"), (" text/html ", "text/html"), ("\ttext/html", "text/html")]
)
@pytest.mark.parametrize("kind", ["files", "redis"])
def test_a_media_type_an_earlier_version_stored_as_given_reads_as_one_import_takes(
    tmp_path, redis_url, kind, stored, read
):
    # Earlier versions stored a media type as given, empty or with space around it, which
    # import (and every write) now refuse: a backup of such a store stopped at that key. An
    # empty one now reads as application/octet-stream, one with space around it trimmed.
    if kind == "files":
        with kvserver.FileStorage(tmp_path / "old", fsync=False) as old:
            old.put("k", b"\x00value", content_type="x/placeholder")  # (a media type of its own: a metadata file)
        [metadata] = (tmp_path / "old" / ".kvserver" / "meta").iterdir()
        metadata.write_text(metadata.read_text().replace("x/placeholder", json.dumps(stored)[1:-1]))
        store: kvserver.Storage = kvserver.FileStorage(tmp_path / "old", fsync=False)
    else:
        store = kvserver.RedisStorage(redis_url)
        store.put("k", b"\x00value", content_type="x/placeholder")
        store._client.hset(store._name("k"), "type", stored)
    with store, kvserver.MemoryStorage() as copy:
        assert store.stat("k").content_type == read
        assert copy.import_(io.BytesIO(exported(store))) == (1, 0)
        assert (copy.get("k"), copy.stat("k").content_type) == (b"\x00value", read)
    if kind == "redis":  # and its event, in the stream's history
        fields = {b"type": b"put", b"key": b"k", b"size": b"6", b"content_type": stored.encode(), b"etag": b"6-1"}
        event = kvserver.RedisStorage._event(b"1-0", {**fields, b"expires": b""})
        assert event.stat is not None and event.stat.content_type == read


# Over HTTP


def test_get_export_streams_ndjson_in_chunks(server: Server):
    for key, (value, content_type, ttl) in SAMPLE.items():
        query = f"?ttl={ttl}" if ttl else ""
        path = f"/kv/{urllib.parse.quote(key, safe='')}{query}"
        assert server.request("PUT", path, value, {"Content-Type": content_type}).status == 201
    response = server.get("/export")
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/x-ndjson"
    assert response.headers["Transfer-Encoding"] == "chunked"
    with kvserver.MemoryStorage() as copy:
        assert copy.import_(io.BytesIO(response.body)) == (len(SAMPLE), 0)
        assert sorted(copy) == sorted(SAMPLE)
        for key, (value, content_type, _) in SAMPLE.items():
            assert (copy.get(key), copy.stat(key).content_type) == (value, content_type)
    only = server.get("/export?prefix=app%2F")
    assert [json.loads(text)["key"] for text in only.body.splitlines()] == ["app/prod/db url"]
    head = server.request("HEAD", "/export")
    assert (head.status, head.body) == (200, b"")
    assert server.get("/export?prefix=a&limit=1").status == 400


def test_a_chunked_answer_goes_on_where_a_short_writev_stopped(server: Server, monkeypatch):
    """A writev that a signal cuts short has written some of its pieces, maybe part of one: the
    rest follows, in order. (Here every call writes at most 7 bytes, and takes 2 pieces at most.
    Chunks of CHUNK bytes or less are joined instead: the export is 160 KB.)"""
    for n in range(40):
        assert server.request("PUT", f"/kv/k{n}", bytes([n]) * 3_000).status == 201
    whole = server.get("/export").body
    calls = []

    def short_writev(fd: int, buffers: list) -> int:
        calls.append(len(buffers))
        return os.write(fd, bytes(buffers[0])[:7])

    monkeypatch.setattr(kvserver.os, "writev", short_writev)
    monkeypatch.setattr(kvserver, "_IOV_MAX", 2)
    assert server.get("/export").body == whole
    assert len(calls) > kvserver.CHUNK // 7 and max(calls) == 2


def test_post_import_answers_the_counts_with_a_length_or_chunked(server: Server):
    later = time.time() + 60
    data = line("a", b"1") + line("gone", b"2", expires_at=1.5) + line("b/c", b"3", "application/json", later)
    response = server.request("POST", "/import", data, {"Content-Type": "application/x-ndjson"})
    assert (response.status, response.json()) == (200, {"imported": 2, "skipped": 1})
    assert response.headers["Content-Type"] == "application/json"
    connection = server.connect()
    connection.request("POST", "/import", body=iter([data[:10], data[10:]]), encode_chunked=True)
    answer = connection.getresponse()
    assert (answer.status, json.loads(answer.read())) == (200, {"imported": 2, "skipped": 1})
    got = server.get("/kv/b%2Fc")
    assert (got.body, got.headers["Content-Type"]) == (b"3", "application/json")
    expires_at = json.loads(server.get("/export?prefix=b").body)["expires_at"]
    assert later <= expires_at <= later + 1
    assert server.get("/keys").json() == {"keys": ["a", "b/c"], "next": None}


def test_a_bad_line_in_post_import_is_a_400_naming_it_and_the_lines_before_stay(server: Server):
    data = line("one", b"1") + line("two", b"2") + b'{"key": "three", "value": "Mw=="}\n' + line("four", b"4")
    response = server.request("POST", "/import", data)
    assert response.status == 400
    detail = response.problem()["detail"]
    assert detail.startswith("line 3: "), detail
    assert server.get("/keys").json() == {"keys": ["one", "two"], "next": None}


def test_post_import_needs_a_body_and_takes_no_query(server: Server):
    request = b"POST /import HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"  # (closed: no wait for quiet)
    assert server.raw(request).startswith(b"HTTP/1.1 411 ")
    assert server.request("POST", "/import?x=1", b"").status == 400
    assert server.get("/import").status == 405


def test_a_value_over_max_value_in_post_import_is_a_400(make_live_server):
    small = make_live_server(max_value=4)
    response = small.request("POST", "/import", line("ok", b"1234") + line("big", b"12345"))
    assert response.status == 400
    assert response.problem()["detail"].startswith("line 2: the value is over 4 bytes")


def test_an_export_taken_while_writes_go_on_imports_cleanly_with_every_value_whole(server: Server):
    """Writers rewrite and delete keys with values that say their own size (some over 64 KiB, so
    streamed from files) while exports run; every export must import, each value one version."""

    def value_of(version: int) -> bytes:
        size = random.choice([10, 1000, 70_000, 150_000]) + version % 7
        return bytes([size % 251]) * size

    stop = threading.Event()
    errors: list[str] = []

    def writer(number: int) -> None:
        connection = server.connect()
        deadline = time.monotonic() + 60
        version = 0
        while not stop.is_set() and time.monotonic() < deadline and version < 5000:
            version += 1
            key = f"k{number}-{version % 10}"
            if version % 9 == 0:
                response = server.request("DELETE", f"/kv/{key}", connection=connection)
            else:
                response = server.request("PUT", f"/kv/{key}", value_of(version), connection=connection)
            if response.status not in (200, 201, 204, 404):
                errors.append(f"{response.status} {response.body[:200]!r}")

    threads = [threading.Thread(target=writer, args=(number,)) for number in range(3)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.3)  # some keys exist before the first export
        for _ in range(5):
            response = server.get("/export")
            assert response.status == 200
            with kvserver.MemoryStorage() as copy:
                imported, skipped = copy.import_(io.BytesIO(response.body))
                assert imported > 0 and skipped == 0
                for key in copy:
                    value = copy.get(key)
                    assert value == bytes([len(value) % 251]) * len(value), f"{key} is not one whole version"
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert errors == []


# The command line


def run(*args: str, stdin: bytes = b"", timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, str(KVSERVER), *args], input=stdin, capture_output=True, timeout=timeout)


def test_kvserver_export_and_import_copy_a_data_dir_with_a_progress_line(tmp_path):
    with kvserver.FileStorage(tmp_path / "source", fsync=False) as source:
        fill(source)
        original = contents(source)
    out = run("export", "--data-dir", str(tmp_path / "source"))
    assert out.returncode == 0, out.stderr
    assert out.stderr.decode().startswith(f"kvserver: exported {len(SAMPLE)} keys (")
    assert len(out.stdout.splitlines()) == len(SAMPLE)
    target = tmp_path / "new" / "target"  # a missing data dir is created
    done = run("import", "--data-dir", str(target), "--no-fsync", stdin=out.stdout)
    assert done.returncode == 0, done.stderr
    assert done.stderr.decode().startswith(f"kvserver: imported {len(SAMPLE)} keys (")
    assert "skipped 0 already expired" in done.stderr.decode()
    with kvserver.FileStorage(target) as copy:
        assert_same(copy, original)
    prefixed = run("export", "--data-dir", str(tmp_path / "source"), "--prefix", "app/")
    assert [json.loads(text)["key"] for text in prefixed.stdout.splitlines()] == ["app/prod/db url"]


def test_kvserver_import_moves_a_data_dir_into_redis(tmp_path, redis_url):
    with kvserver.FileStorage(tmp_path / "data", fsync=False) as source:
        fill(source)
        original = contents(source)
    out = run("export", "--data-dir", str(tmp_path / "data"))
    done = run("import", "--storage", redis_url, stdin=out.stdout)
    assert done.returncode == 0, done.stderr
    with kvserver.RedisStorage(redis_url) as redis_store:
        assert_same(redis_store, original)
    back = run("export", "--storage", redis_url)
    assert [json.loads(text)["key"] for text in back.stdout.splitlines()] == sorted(SAMPLE)


def test_kvserver_export_refuses_a_data_dir_a_running_server_holds_and_points_to_get_export(server: Server):
    server.get("/set?k=v")
    out = run("export", "--data-dir", str(server.data_dir))
    assert out.returncode == 1
    assert out.stdout == b""
    message = out.stderr.decode()
    assert message.count("\n") == 1 and "in use by another kvserver" in message and "/export" in message


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["export", "--data-dir", "missing"], 1, "no data dir missing to export"),
        (["import", "--prefix", "a"], 2, "--prefix goes with kvserver export"),
        (["--prefix", "a"], 2, "--prefix goes with kvserver export"),
        (["export", "--storage", "memory"], 2, "need files or redis storage"),
        (["export", "--storage", "nowhere"], 2, "--storage takes files, memory, or a redis://, rediss:// or unix://"),
        (["import", "--storage", "redis://127.0.0.1:1/0"], 1, "cannot reach Redis"),
    ],
)
def test_kvserver_export_and_import_fail_with_one_line_and_the_exit_status(tmp_path, args, status, message):
    done = subprocess.run(
        [sys.executable, str(KVSERVER), *args], capture_output=True, timeout=60, cwd=tmp_path, input=b""
    )
    assert done.returncode == status, done.stderr
    assert done.stderr.decode().count("\n") == 1 and message in done.stderr.decode(), done.stderr
    assert b"Traceback" not in done.stderr


def test_kvserver_import_stops_at_a_bad_line_with_exit_1_naming_it(tmp_path):
    done = run("import", "--data-dir", str(tmp_path / "data"), stdin=line("a", b"1") + b"oops\n" + line("b", b"2"))
    assert done.returncode == 1
    assert done.stderr.decode().startswith("kvserver: import stopped at line 2: ")
    with kvserver.FileStorage(tmp_path / "data") as copy:
        assert list(copy) == ["a"]


def test_kvserver_export_stops_with_one_line_naming_a_key_whose_file_another_program_changed(tmp_path):
    with kvserver.FileStorage(tmp_path / "data", fsync=False) as store:
        store.put("a", b"a" * MiB)  # its base64 overfills the pipe: the export waits on it while b changes
        store.put("b", b"b" * (kvserver.SMALL_VALUE + 1))  # read from its file when exported
    export = subprocess.Popen(
        [sys.executable, str(KVSERVER), "export", "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,  # read(1) reads one byte, not a buffer's worth that communicate() would miss
    )
    first = export.stdout.read(1)  # the export is under way, on key a
    with open(tmp_path / "data" / "b", "ab") as file:
        file.write(b"more\n")
    out, err = export.communicate(timeout=60)
    assert export.returncode == 1
    assert [json.loads(text)["key"] for text in (first + out).splitlines()] == ["a"]
    assert err.decode() == (
        f"kvserver: export stopped at key 'b': its file in {tmp_path / 'data'} was changed by another program "
        "during the export; run the export again once nothing else writes there\n"
    )


@pytest.mark.parametrize("storage", ["files", "redis"])
def test_kvserver_export_refuses_a_prefix_that_is_not_utf_8_with_exit_2(tmp_path, request, storage):
    where = ["--data-dir", str(tmp_path)] if storage == "files" else ["--storage", request.getfixturevalue("redis_url")]
    done = run("export", *where, "--prefix", os.fsdecode(b"app/\xff"))
    assert done.returncode == 2
    assert done.stdout == b""
    assert done.stderr == b"kvserver: --prefix takes UTF-8 text, not the bytes b'app/\\xff'\n"


@pytest.mark.parametrize(
    ("command", "redirection", "message"),
    [
        ("export", ">&-", "export needs its output (stdout) open"),
        ("import", "<&-", "import needs its input (stdin) open"),
    ],
)
def test_kvserver_export_and_import_with_their_stream_closed_exit_1_with_one_line(
    tmp_path, command, redirection, message
):
    (tmp_path / "data").mkdir()
    script = f'"$0" "$1" {command} --data-dir data {redirection}'
    done = subprocess.run(["bash", "-c", script, sys.executable, str(KVSERVER)], capture_output=True, cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.decode() == f"kvserver: {message}, and it is closed\n"
    assert list((tmp_path / "data").iterdir()) == []  # not even opened


def test_kvserver_import_from_a_terminal_exits_1_at_once_rather_than_wait_for_typed_lines(tmp_path):
    controller, terminal = pty.openpty()
    try:
        done = subprocess.run(
            [sys.executable, str(KVSERVER), "import", "--data-dir", "data"],
            stdin=terminal,
            capture_output=True,
            cwd=tmp_path,
            timeout=15,
        )
    finally:
        os.close(terminal)
        os.close(controller)
    assert done.returncode == 1
    assert done.stderr.decode() == (
        "kvserver: import reads an export from its input (stdin), which is a terminal: pipe one in or use < file\n"
    )
    assert not (tmp_path / "data").exists()  # not even opened


def test_kvserver_export_with_stderr_closed_still_exports_every_key_and_only_them(tmp_path):
    with kvserver.FileStorage(tmp_path / "data", fsync=False) as source:
        fill(source)
    script = '"$0" "$1" export --data-dir data 2>&-'
    done = subprocess.run(["bash", "-c", script, sys.executable, str(KVSERVER)], capture_output=True, cwd=tmp_path)
    assert done.returncode == 0
    assert [json.loads(text)["key"] for text in done.stdout.splitlines()] == sorted(SAMPLE)


@pytest.mark.parametrize(
    "args",
    [
        ["import", "--max-value", "1"],
        ["import", "--port", "5"],
        ["import", "--token", "secret"],
        ["import", "--no-token"],
        ["import", "-q"],
        ["export", "--no-fsync"],
        ["export", "--bind", "::1"],
        ["export", "--max-connections=9"],
        ["export", "--certfile", "c.pem", "--keyfile", "k.pem"],
    ],
)
def test_kvserver_export_and_import_refuse_an_option_that_does_not_apply_with_exit_2(tmp_path, args):
    (tmp_path / "data").mkdir()
    with kvserver.FileStorage(tmp_path / "data") as store:
        store.put("k", b"v")
    done = run(*args, "--data-dir", str(tmp_path / "data"), stdin=line("new", b"v"))
    assert done.returncode == 2
    assert done.stdout == b""
    option = {"-q": "--quiet"}.get(args[1], args[1].partition("=")[0])
    assert done.stderr.decode() == f"kvserver: {option} does not go with kvserver {args[0]}; see kvserver --help\n"
    with kvserver.FileStorage(tmp_path / "data") as store:
        assert list(store) == ["k"]


def test_the_readme_pipeline_into_redis_fails_when_its_export_fails(tmp_path, redis_url):
    """Run as the README shows it, in a folder without ./data: the export fails, the import
    takes its empty output well, and the pipeline must still fail."""
    [example] = [example for example in console_examples() if "| kvserver import" in str(example)]
    commands = [command.command for command in example.commands if not command.starts_server]
    assert "| kvserver import" in commands[-1]
    script = "\n".join([f'kvserver() {{ "{sys.executable}" "{KVSERVER}" "$@"; }}', *commands])
    done = subprocess.run(
        ["bash", "-c", script.replace("redis://localhost:6379/0", redis_url)], capture_output=True, cwd=tmp_path
    )
    assert b"kvserver: no data dir ./data to export\n" in done.stderr
    assert done.returncode == 1


# A 1 GiB value: memory stays flat in the server and in the command line


def vm_bytes(pid: int, field: str) -> int:
    for text in Path(f"/proc/{pid}/status").read_text().splitlines():
        if text.startswith(field + ":"):
            return int(text.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def sparse_store(path: Path, size: int) -> Path:
    """A data dir holding key "big" of `size` zero bytes in a sparse file (no disk written) and a small key."""
    path.mkdir(parents=True)
    with open(path / "big", "wb") as file:
        file.truncate(size)
    (path / "small").write_bytes(b"hello")
    return path


def assert_zeros(path: Path, size: int) -> None:
    assert path.stat().st_size == size
    zeros = bytes(16 * MiB)
    with open(path, "rb") as file:
        while block := file.read(len(zeros)):
            assert block == zeros[: len(block)]


def transfer(source: Server, target: Server) -> dict:
    """GET /export from one server streamed straight into POST /import of the other."""
    exporting = source.connect(timeout=300)
    exporting.request("GET", "/export")
    response = exporting.getresponse()
    assert response.status == 200
    importing = http.client.HTTPConnection(target.host, target.port, timeout=300)
    importing.request("POST", "/import", body=iter(lambda: response.read(MiB), b""), encode_chunked=True)
    answer = importing.getresponse()
    body = answer.read()
    importing.close()
    assert answer.status == 200, body
    return json.loads(body)


@pytest.mark.timeout(600)
def test_a_1_gib_value_goes_through_get_export_and_post_import_with_flat_server_memory(tmp_path, make_server):
    source = make_server("--quiet", "--no-fsync", data_dir=sparse_store(tmp_path / "source", GiB))
    target = make_server("--quiet", "--no-fsync", data_dir=tmp_path / "target")
    warm_up = make_server("--quiet", "--no-fsync", data_dir=sparse_store(tmp_path / "warm", 8 * MiB))
    assert transfer(warm_up, target) == {"imported": 2, "skipped": 0}  # what any transfer allocates
    servers = {"exporting": source.process.pid, "importing": target.process.pid}
    before = {name: vm_bytes(pid, "VmRSS") for name, pid in servers.items()}
    assert transfer(source, target) == {"imported": 2, "skipped": 0}
    for name, pid in servers.items():
        growth = vm_bytes(pid, "VmHWM") - before[name]
        assert growth < 32 * MiB, f"the {name} server's peak RSS rose by {growth / MiB:.1f} MiB"
    head = target.request("HEAD", "/kv/big")
    assert (head.status, head.headers["Content-Length"]) == (200, str(GiB))
    assert target.get("/get?key=small").body == b"hello"
    assert_zeros(target.data_dir / "big", GiB)


def peak_rss_of_pipeline(source: Path, target: Path) -> tuple[int, int]:
    """Run `kvserver export` piped into `kvserver import` and return each one's peak RSS in bytes."""
    exporter = subprocess.Popen(
        [sys.executable, str(KVSERVER), "export", "--data-dir", str(source)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    importer = subprocess.Popen(
        [sys.executable, str(KVSERVER), "import", "--data-dir", str(target), "--no-fsync"],
        stdin=exporter.stdout,
        stderr=subprocess.PIPE,
    )
    assert exporter.stdout is not None and importer.stderr is not None
    exporter.stdout.close()  # the importer holds the pipe now
    peaks = []
    for process in (exporter, importer):
        _, status, usage = os.wait4(process.pid, 0)  # the rusage of this one child
        process.returncode = os.waitstatus_to_exitcode(status)
        assert process.returncode == 0, importer.stderr.read()
        peaks.append(usage.ru_maxrss * 1024)
    importer.stderr.close()
    return peaks[0], peaks[1]


@pytest.mark.timeout(600)
def test_a_1_gib_value_goes_through_kvserver_export_and_import_with_flat_memory(tmp_path):
    small = peak_rss_of_pipeline(sparse_store(tmp_path / "small", 8 * MiB), tmp_path / "small-copy")
    big = peak_rss_of_pipeline(sparse_store(tmp_path / "big", GiB), tmp_path / "big-copy")
    for name, before, after in zip(("export", "import"), small, big, strict=True):
        assert after - before < 32 * MiB, f"kvserver {name}'s peak RSS rose by {(after - before) / MiB:.1f} MiB"
    assert_zeros(tmp_path / "big-copy" / "big", GiB)


# Found by review: an expired line, options at their defaults, a failure after the progress
# line, a data dir in use, a folder put by hand in a key's place


def export_line(key: str, content_type: str, expires_at: str, value: str = "YQ==") -> bytes:
    """A line of the export format, its fields as given (JSON escapes and all)."""
    fields = f'"key": "{key}", "content_type": "{content_type}", "expires_at": {expires_at}, "value": "{value}"'
    return f"{{{fields}}}\n".encode()


@pytest.mark.parametrize(
    ("key", "content_type"),
    [("", "text/plain"), ("a\\nb", "text/plain"), ("k", ""), ("k", " t "), ("k", "t\\u00e9")],
    ids=["empty-key", "control-character-key", "empty-media-type", "spaced-media-type", "non-ascii-media-type"],
)
def test_an_expired_line_with_a_bad_key_or_media_type_is_a_bad_line_not_a_skipped_one(key, content_type):
    """Only its value was checked: it was counted as skipped, and the import went on."""
    lines = export_line("first", "text/plain", "null") + export_line(key, content_type, "1")
    with kvserver.MemoryStorage() as store:
        with pytest.raises(ValueError, match=r"^line 2: "):
            store.import_(io.BytesIO(lines + export_line("after", "text/plain", "null")))
        assert list(store) == ["first"]


@pytest.mark.parametrize(
    "args",
    [
        ["import", "--max-value", "1G"],
        ["import", "--port", "4000"],
        ["export", "--bind", "127.0.0.1"],
        ["export", "--max-connections", "256"],
    ],
)
def test_an_option_that_does_not_apply_is_refused_even_at_its_default_value(tmp_path, args):
    """import --max-value 1G looked like a limit and did nothing."""
    (tmp_path / "data").mkdir()
    done = subprocess.run(
        [sys.executable, str(KVSERVER), *args, "--data-dir", str(tmp_path / "data")],
        input=export_line("k", "text/plain", "null"),
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.decode() == f"kvserver: {args[1]} does not go with kvserver {args[0]}; see kvserver --help\n"


def test_an_import_that_stops_after_its_progress_line_showed_says_so_on_a_line_of_its_own(tmp_path):
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, str(KVSERVER), "import", "--data-dir", str(tmp_path / "data"), "--no-fsync"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=terminal,
    )
    os.close(terminal)
    output = b""

    def read_for(seconds: float) -> None:
        nonlocal output
        ready, _, _ = select.select([controller], [], [], seconds)
        if ready:
            with contextlib.suppress(OSError):  # EIO: the terminal's other end is closed
                output += os.read(controller, 4096)

    try:
        assert process.stdin is not None
        process.stdin.write(export_line("a", "text/plain", "null"))
        process.stdin.flush()
        lock = tmp_path / "data" / ".kvserver" / "lock"
        wait_for(lock.exists, timeout=30, what="the import to open its storage")  # (its progress starts then)
        shown = time.monotonic() + 0.7  # the progress line is shown once an import has run half a second
        while (left := shown - time.monotonic()) > 0:
            read_for(left)
        process.stdin.write(b"not a line\n")
        process.stdin.close()  # (the import reads up to 1 MiB before it stores: both lines come now)
        assert process.wait(30) == 1
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and b"stopped" not in output:
            read_for(0.2)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        os.close(controller)
    text = output.decode().replace("\r\n", "\n")  # (a terminal's newline)
    assert "kvserver: imported 1 key (1 byte)\nkvserver: import stopped at line 2: " in text, repr(text)


def test_kvserver_import_into_a_data_dir_a_server_holds_points_to_post_import(make_server):
    server = make_server("--quiet")
    done = subprocess.run(
        [sys.executable, str(KVSERVER), "import", "--data-dir", str(server.data_dir)],
        input=export_line("k", "text/plain", "null"),
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 1
    message = done.stderr.decode()
    assert message.count("\n") == 1 and "in use by another kvserver" in message, message
    assert "curl -T <export> -X POST http://<host>:<port>/import" in message, message


@pytest.mark.parametrize("fsync", [True, False], ids=["fsync", "no-fsync"])
def test_a_key_whose_place_a_folder_put_by_hand_holds_is_stored_and_the_folder_kept(tmp_path, fsync):
    """The folder is skipped at start; a write of its key moved it to .kvserver/kept/ rather
    than failing for ever with IsADirectoryError (an import said only "Is a directory")."""
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "notes.txt").write_bytes(b"someone's file")
    lines = b"".join(export_line(key, "text/plain", "null") for key in ("a", "sub", "c"))
    command = [sys.executable, str(KVSERVER), "import", "--data-dir", str(data), *([] if fsync else ["--no-fsync"])]
    done = subprocess.run(command, input=lines, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    with kvserver.FileStorage(data) as store:
        assert list(store) == ["a", "c", "sub"] and store.get("sub") == b"a"
    [kept] = (data / ".kvserver" / "kept").iterdir()
    assert kept.name.endswith("-sub") and (kept / "notes.txt").read_bytes() == b"someone's file"
