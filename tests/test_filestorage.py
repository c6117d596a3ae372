"""FileStorage on disk (SPEC section 7): file names, metadata, start-up, locking, crash states.

These tests look at the bytes in the data dir, and build by hand the states that the
FileStorage docstring says a crash can leave.
"""

from __future__ import annotations

import contextlib
import dis
import errno
import fcntl
import functools
import gc
import inspect
import json
import os
import re
import socket
import stat as stat_module
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import KVSERVER, wait_for
from test_group_commit import interrupt_before, traced

import kvserver

TEXT = "text/plain; charset=utf-8"
BINARY = "application/octet-stream"
LARGE = 200 * 1024  # over the 64 KiB FileStorage keeps in memory

ODD_KEYS = [
    "../x",
    "../../x",
    "/etc/passwd",
    "..",
    ".",
    "a/b",
    "a/../../b",
    ".hidden",
    "~",
    "~root",
    "%2e%2e%2fx",
    "%2E",
    "a%2Fb",
    "a\\b",
    "C:\\x",
    "nul",
    "con.txt",
    " ",
    "ключ",
    "k" * 255,
    "k" * 256,
    "k" * 1024,
    "é" * 512,
    "/" * 1024,
    "%" * 1024,
    "." * 1024,
]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def store(data_dir: Path) -> Iterator[kvserver.FileStorage]:
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        yield store


def value_files(data_dir: Path) -> dict[str, bytes]:
    """Every file at the top of the data dir but the hidden ones, by name."""
    return {path.name: path.read_bytes() for path in data_dir.iterdir() if not path.name.startswith(".")}


def meta_names(data_dir: Path) -> set[str]:
    return {path.name for path in (data_dir / ".kvserver" / "meta").iterdir()}


def tmp_names(data_dir: Path) -> set[str]:
    return {path.name for path in (data_dir / ".kvserver" / "tmp").iterdir()}


def spares(data_dir: Path) -> list[bytes]:
    """What the files in .kvserver/spare hold, in order."""
    return sorted(path.read_bytes() for path in (data_dir / ".kvserver" / "spare").iterdir())


def etag_of(path: Path) -> str:
    """The fingerprint FileStorage gives a value file: its size and modification time."""
    file_stat = path.stat()
    return f"{file_stat.st_size:x}-{file_stat.st_mtime_ns:x}"


def place(path: Path, data: bytes, stamp_ns: int | None = None) -> str:
    """Write a file as a crash or a person might leave it, and return its fingerprint."""
    path.write_bytes(data)
    if stamp_ns is not None:
        os.utime(path, ns=(stamp_ns, stamp_ns))
    return etag_of(path)


def record(key: str, content_type: str, expires_at: float | None = None) -> dict:
    return {"key": key, "content_type": content_type, "expires_at": expires_at}


# File names


def test_a_plain_key_is_a_file_of_that_name_holding_exactly_the_bytes(store, data_dir):
    store.put("greeting", b"hello", content_type=TEXT)
    store.put("Binary_file-1.bin", b"\x00\xff\x80", content_type=BINARY)
    assert value_files(data_dir) == {"greeting": b"hello", "Binary_file-1.bin": b"\x00\xff\x80"}
    # Their metadata is what the bytes suggest, so nothing else is written.
    assert meta_names(data_dir) == set()
    assert tmp_names(data_dir) == set()


def test_a_rewrite_replaces_the_bytes_in_the_same_file(store, data_dir):
    store.put("greeting", b"hello", content_type=TEXT)
    store.put("greeting", b"hi", content_type=TEXT)
    assert value_files(data_dir) == {"greeting": b"hi"}
    store.delete("greeting")
    assert value_files(data_dir) == {}
    assert meta_names(data_dir) == set()


def test_a_large_value_is_a_file_holding_exactly_the_bytes(store, data_dir):
    value = os.urandom(LARGE)
    store.put("big", value)
    assert value_files(data_dir) == {"big": value}


@pytest.mark.parametrize("fsync", [True, False])
def test_a_large_value_starts_going_to_disk_as_it_arrives_when_writes_are_fsynced(data_dir, monkeypatch, fsync):
    # With fsync, the writeback of every _WRITEBACK_STEP bytes begins at once, so that the disk
    # works while the rest arrives and the fsync at the end has little left to write. Without
    # fsync the kernel writes when it will (but for small files: the metadata's, here).
    step, pieces = kvserver._WRITEBACK_STEP, []
    started: list[tuple[int, int, int]] = []  # (bytes arrived, offset, length)

    def posix_fadvise(fd: int, offset: int, length: int, advice: int) -> None:
        assert advice == os.POSIX_FADV_DONTNEED
        if os.fstat(fd).st_size > kvserver.SMALL_VALUE:
            started.append((sum(map(len, pieces)), offset, length))

    class Arriving:  # 2.5 steps, an eighth of a step at a time
        def read(self, size: int) -> bytes:
            if len(pieces) == 20:
                return b""
            pieces.append(bytes([len(pieces)]) * (step // 8))
            return pieces[-1]

    monkeypatch.setattr(kvserver.os, "posix_fadvise", posix_fadvise, raising=False)
    with kvserver.FileStorage(data_dir, fsync=fsync) as store:
        store.put_file("big", Arriving())
    assert value_files(data_dir) == {"big": b"".join(pieces)}
    assert started == ([(step, 0, step), (2 * step, step, step)] if fsync else [])


def test_a_large_value_given_in_one_piece_goes_to_disk_a_step_at_a_time_too(data_dir, monkeypatch):
    step, started = kvserver._WRITEBACK_STEP, []

    def posix_fadvise(fd: int, offset: int, length: int, advice: int) -> None:
        started.append((offset, length))

    monkeypatch.setattr(kvserver.os, "posix_fadvise", posix_fadvise, raising=False)
    value = os.urandom(2 * step + step // 2)
    with kvserver.FileStorage(data_dir, fsync=True) as store:
        store.put("big", value)
    assert value_files(data_dir) == {"big": value}
    assert started == [(0, step), (step, step)]


@pytest.mark.parametrize("how", ["put", "put_file"])
def test_a_large_value_is_written_a_chunk_at_a_time(data_dir, monkeypatch, tmp_path, how):
    # Writes of more than CHUNK put the value into the page cache in large folios, which on a
    # virtual machine that hands free memory back to its host come from that memory, at a page
    # fault on the host for every page (a 1 GiB PUT took up to 3.6 s in 1 MiB writes, 0.84 s in
    # 64 KiB ones).
    sizes: list[int] = []
    write = os.write

    def recording_write(fd: int, data: memoryview) -> int:
        sizes.append(len(data))
        return write(fd, data)

    value = os.urandom(kvserver.BUFFER + kvserver.CHUNK // 2)
    source = tmp_path / "source"
    source.write_bytes(value)
    monkeypatch.setattr(kvserver.os, "write", recording_write)
    with kvserver.FileStorage(data_dir, fsync=True) as store:
        if how == "put":
            store.put("big", value)
        else:
            store.put_file("big", str(source))
    assert value_files(data_dir) == {"big": value}
    assert max(sizes) == kvserver.CHUNK  # (the metadata file, of a few bytes, is written too)


def test_a_file_system_that_refuses_the_writeback_advice_still_stores_a_large_value(data_dir, monkeypatch):
    def posix_fadvise(fd: int, offset: int, length: int, advice: int) -> None:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(kvserver.os, "posix_fadvise", posix_fadvise, raising=False)
    value = os.urandom(2 * kvserver._WRITEBACK_STEP + 1)
    with kvserver.FileStorage(data_dir, fsync=True) as store:
        store.put("big", value)
        assert store.get("big") == value
    assert value_files(data_dir) == {"big": value}


@pytest.mark.parametrize("key", ODD_KEYS, ids=range(len(ODD_KEYS)))
def test_a_key_that_is_not_plain_is_escaped_into_one_file_inside_the_data_dir(store, data_dir, tmp_path, key):
    # Guard first, so that a regression cannot write over a real file such as /etc/passwd.
    target = Path(os.path.normpath(os.path.join(store.path, kvserver._file_name(key))))
    assert target.parent == data_dir, f"{key!r} would be stored at {target}"
    value = b"value of " + key.encode()
    store.put(key, value)
    [(name, data)] = value_files(data_dir).items()
    assert data == value
    plain = re.fullmatch(r"[A-Za-z0-9._-]{1,255}", key) and not key.startswith(".")
    assert (name == key) == bool(plain), name
    assert len(name.encode()) <= 255
    assert (data_dir / name).is_file()
    assert not name.startswith(".")
    assert "/" not in name and "\\" not in name
    # Nothing was written anywhere else: the temp dir holds only the data dir.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data"]
    assert [path.name for path in data_dir.iterdir() if path.is_dir()] == [".kvserver"]
    assert store.get(key) == value


def test_every_file_name_is_at_most_255_bytes_and_every_key_survives_a_reopen(data_dir):
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        for key in ODD_KEYS:
            store.put(key, key.encode() * 2)
    names = [path.name for path in data_dir.iterdir()] + sorted(meta_names(data_dir))
    assert all(len(name.encode()) <= 255 for name in names), [name for name in names if len(name.encode()) > 255]
    assert len(value_files(data_dir)) == len(ODD_KEYS)
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        assert store.keys() == sorted(ODD_KEYS)
        for key in ODD_KEYS:
            assert store.get(key) == key.encode() * 2
            assert store.stat(key).content_type == BINARY


def test_keys_of_1024_bytes_are_stored_and_survive_a_reopen(data_dir):
    keys = ["k" * 1024, "é" * 512, "🔑" * 256, "k" * 1023 + "/"]
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        for key in keys:
            store.put(key, key.encode()[:10], content_type=TEXT)
        store.put("k" * 1024, os.urandom(LARGE))  # large values of long keys too
        big = store.get("k" * 1024)
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        assert sorted(store) == sorted(keys)
        assert store.get("k" * 1024) == big
        for key in keys[1:]:
            assert store.get(key) == key.encode()[:10]
            assert store.stat(key).content_type == TEXT
    assert all(len(path.name.encode()) <= 255 for path in data_dir.iterdir())


def test_keys_that_differ_only_in_escaping_get_different_files(store, data_dir):
    keys = ["a b", "a%20b", "a+b", "a%2520b", ".a", "%2Ea", "~", "%7E", "k" * 300, "k" * 301]
    for key in keys:
        store.put(key, key.encode())
    assert len(value_files(data_dir)) == len(keys)
    for key in keys:
        assert store.get(key) == key.encode()


# Metadata


def test_media_type_and_ttl_survive_a_reopen(data_dir):
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        store.put("html", b"<p>hi</p>", content_type="text/html; charset=utf-8")
        store.put("text-as-bytes", b"plain words")  # application/octet-stream, though UTF-8
        store.put("binary-as-text", b"\xff\xfe", content_type=TEXT)
        store.put("ttl", b"v", ttl=3600)
        store.put("big-json", b"[" + b"1," * LARGE + b"1]", content_type="application/json")
        before = {key: store.stat(key) for key in store}
    assert before["ttl"].expires_at is not None
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        assert {key: store.stat(key) for key in store} == before
        assert store.get("binary-as-text") == b"\xff\xfe"


def test_a_rewrite_without_metadata_removes_the_metadata_file(data_dir):
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        store.put("k", b"v", content_type="text/html", ttl=3600)
        assert meta_names(data_dir) == {"k"}
        store.put("k", b"v", content_type=TEXT)
        assert meta_names(data_dir) == set()
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        assert store.stat("k").content_type == TEXT
        assert store.stat("k").expires_at is None


def test_a_delete_removes_the_value_file_and_its_metadata(store, data_dir):
    store.put("k", b"v", content_type="text/html", ttl=3600)
    store.put("k" * 1024, b"v")
    store.delete("k")
    store.delete("k" * 1024)
    assert value_files(data_dir) == {}
    assert meta_names(data_dir) == set()


def test_expired_keys_are_gone_after_a_reopen_and_their_files_removed(data_dir):
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        store.put("short", b"v", ttl=1)
        store.put("short" * 200, b"v" * LARGE, ttl=1)
        store.put("long", b"w", ttl=3600)
        expires_at = max(store.stat("short").expires_at, store.stat("short" * 200).expires_at)
    assert len(value_files(data_dir)) == 3
    wait_for(lambda: time.time() > expires_at, timeout=5, interval=0.05, what="the TTL to pass")
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        assert store.keys() == ["long"]
        assert "short" not in store
        with pytest.raises(KeyError):
            store.get("short" * 200)
        assert len(store) == 1
        assert value_files(data_dir) == {"long": b"w"}
        assert meta_names(data_dir) == {"long"}


def test_listing_and_counting_an_expired_key_leave_the_disk_as_it_was(store, data_dir):
    store.put("short", b"v", ttl=1)
    wait_for(lambda: store.keys() == [], timeout=5, interval=0.05, what="the key to expire")
    assert len(store) == 0
    assert "short" not in store
    assert value_files(data_dir) == {"short": b"v"}
    assert meta_names(data_dir) == {"short"}


def test_an_expired_key_swept_away_leaves_no_files(store, data_dir):
    store.put("short", b"v", ttl=1)
    store.put("short" * 200, b"v" * LARGE, ttl=1)
    store.put("long", b"w", ttl=3600)
    wait_for(lambda: store.keys() == ["long"], timeout=5, interval=0.05, what="the keys to expire")
    assert store.sweep() == 2
    assert value_files(data_dir) == {"long": b"w"}
    assert meta_names(data_dir) == {"long"}


# Files put there by hand


def test_hand_placed_files_load_as_values_with_a_sniffed_media_type(data_dir):
    data_dir.mkdir()
    (data_dir / "name").write_bytes(b"Guido")
    (data_dir / "utf8").write_bytes("grüße 🔑".encode())
    (data_dir / "empty").write_bytes(b"")
    (data_dir / "binary").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    (data_dir / "latin1").write_bytes("grüße".encode("latin-1"))
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        assert store.keys() == ["binary", "empty", "latin1", "name", "utf8"]
        assert store.get("name") == b"Guido"
        assert store.get("utf8") == "grüße 🔑".encode()
        assert store.get("binary") == b"\x89PNG\r\n\x1a\n\x00\xff"
        assert {key: store.stat(key).content_type for key in store} == {
            "name": TEXT,
            "utf8": TEXT,
            "empty": TEXT,
            "binary": BINARY,
            "latin1": BINARY,
        }
        assert store.stat("name").size == 5
        assert store.stat("name").etag == etag_of(data_dir / "name")


def test_large_hand_placed_files_load_as_values_with_a_sniffed_media_type(data_dir):
    data_dir.mkdir()
    # A two-byte character across the 64 KiB boundary where a reader in chunks would cut it.
    text = b"a" * (64 * 1024 - 1) + "é".encode() + "ключ".encode() * 30_000
    binary = text + b"\xff"
    (data_dir / "text").write_bytes(text)
    (data_dir / "binary").write_bytes(binary)
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        assert store.stat("text").content_type == TEXT
        assert store.stat("binary").content_type == BINARY
        assert store.stat("text").size == len(text)
        assert store.get("text") == text
        assert store.get("binary") == binary
        etags = {key: store.stat(key).etag for key in store}
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        assert {key: store.stat(key).etag for key in store} == etags


def test_a_hand_placed_file_can_be_replaced_and_deleted_through_the_store(data_dir):
    data_dir.mkdir()
    (data_dir / "name").write_bytes(b"Guido")
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        etag = store.stat("name").etag
        store.put("name", b"Barry", if_match=etag, content_type=TEXT)
        assert (data_dir / "name").read_bytes() == b"Barry"
        store.delete("name")
    assert not (data_dir / "name").exists()


def test_hand_placed_files_whose_names_are_not_keys_and_folders_are_skipped_with_a_warning(data_dir, capsys):
    data_dir.mkdir()
    (data_dir / "good").write_bytes(b"kept")
    foreign = ["hello world", "café", "a~b", "%zz", "50%", "%2", "a%2Db", "%+not-a-hash"]
    for name in foreign:
        (data_dir / name).write_bytes(b"foreign")
    (data_dir / "sub").mkdir()
    (data_dir / "sub" / "inner").write_bytes(b"nested")
    (data_dir / "empty-folder").mkdir()
    os.symlink("/etc/hostname", data_dir / "link")
    capsys.readouterr()
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        assert store.keys() == ["good"]
        assert store.get("good") == b"kept"
    err = capsys.readouterr().err
    lines = err.splitlines()
    skipped = [*foreign, "sub", "empty-folder", "link"]
    assert len(lines) == len(skipped), err
    assert all(line.startswith("kvserver: skipping ") for line in lines), err
    for name in skipped:
        assert len([line for line in lines if f"data/{name}" in line]) == 1, (name, err)
    assert "Traceback" not in err
    # Nothing was removed or changed.
    assert (data_dir / "sub" / "inner").read_bytes() == b"nested"
    assert (data_dir / "hello world").read_bytes() == b"foreign"


def test_a_hand_placed_file_whose_name_is_not_utf8_is_skipped_with_a_warning(data_dir, capsys):
    data_dir.mkdir()
    (data_dir / "good").write_bytes(b"kept")
    (data_dir / os.fsdecode(b"latin1-\xe9t\xe9")).write_bytes(b"a name from another encoding")
    capsys.readouterr()
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        assert store.keys() == ["good"]
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("kvserver: skipping ")
    assert "latin1-" in line


def test_dotfiles_are_ignored_silently(data_dir, capsys):
    data_dir.mkdir()
    (data_dir / ".gitkeep").write_bytes(b"")
    (data_dir / ".DS_Store").write_bytes(b"\x00\x01")
    (data_dir / ".git").mkdir()
    capsys.readouterr()
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        assert store.keys() == []
        store.put(".gitkeep", b"a key, not the file")
        assert store.get(".gitkeep") == b"a key, not the file"
    assert capsys.readouterr().err == ""
    assert (data_dir / ".gitkeep").read_bytes() == b""
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        assert store.keys() == [".gitkeep"]
        assert store.get(".gitkeep") == b"a key, not the file"
    assert capsys.readouterr().err == ""


def test_leftover_temporary_files_are_removed_at_open(data_dir):
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        store.put("k", b"v")
    tmp = data_dir / ".kvserver" / "tmp"
    (tmp / "tmpabc123").write_bytes(b"half a value")
    (tmp / "tmpdef456").write_bytes(b"x" * LARGE)
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        assert tmp_names(data_dir) == set()
        assert store.keys() == ["k"]


def test_no_temporary_file_remains_after_writes_deletes_and_a_failed_write(store, data_dir):
    store.put("a", b"v" * LARGE, content_type="x/y", ttl=60)
    store.put("a", b"w")
    store.delete("a")

    def cut_off():
        yield b"x" * LARGE
        raise ConnectionResetError

    with pytest.raises(ConnectionResetError):
        store.write("b", cut_off())
    with pytest.raises(kvserver.PreconditionFailed):
        store.put("c", b"v" * LARGE, if_match="nope")
    assert tmp_names(data_dir) == set()
    assert value_files(data_dir) == {}


def test_a_missing_data_dir_is_created(tmp_path):
    path = tmp_path / "a" / "b" / "data"
    with kvserver.FileStorage(path, fsync=False) as store:
        store.put("k", b"v")
    assert (path / "k").read_bytes() == b"v"


# Locking


def test_a_second_storage_on_the_same_data_dir_is_refused_until_the_first_is_closed(data_dir):
    first = kvserver.FileStorage(data_dir, fsync=False)
    first.put("k", b"v")
    with pytest.raises(kvserver.DataDirLocked):
        kvserver.FileStorage(data_dir, fsync=False)
    with pytest.raises(kvserver.DataDirLocked):
        kvserver.FileStorage(str(data_dir) + "/", fsync=True)
    with pytest.raises(kvserver.DataDirLocked):
        kvserver.open_storage(f"files:{data_dir}")
    assert first.get("k") == b"v"  # the failed attempts harmed nothing
    first.close()
    with kvserver.FileStorage(data_dir, fsync=False) as second:
        assert second.get("k") == b"v"


def test_the_lock_holds_against_another_process(data_dir):
    import subprocess

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, kvserver; s = kvserver.FileStorage(sys.argv[1]); print('locked', flush=True); sys.stdin.read()",  # noqa: E501
            str(data_dir),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=Path(kvserver.__file__).parent,
    )
    try:
        assert holder.stdout.readline() == b"locked\n"
        with pytest.raises(kvserver.DataDirLocked):
            kvserver.FileStorage(data_dir, fsync=False)
    finally:
        holder.stdin.close()  # the holder exits, and the lock goes with it
        holder.wait(10)
        holder.stdout.close()
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        assert store.keys() == []


# Large values


def test_large_values_are_not_held_in_memory_and_are_read_from_disk(store, data_dir):
    large = os.urandom(LARGE)
    store.put("big", large)
    store.put("edge", b"e" * (64 * 1024))
    store.put("over", b"o" * (64 * 1024 + 1))
    store.put("small", b"s")
    assert store._index.get("big").data is None
    assert store._index.get("over").data is None
    assert store._index.get("edge").data == b"e" * (64 * 1024)
    assert store._index.get("small").data == b"s"
    # Change the file behind the store's back, keeping its size: a read shows the disk.
    with open(data_dir / "big", "r+b") as file:
        file.write(b"CHANGED ON DISK")
    assert store.get("big") == b"CHANGED ON DISK" + large[15:]
    with store.open("big") as opened:
        assert os.path.samefile(opened.name, data_dir / "big")


def test_large_values_are_not_preloaded_at_open(data_dir):
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        store.put("big", b"b" * LARGE, content_type="x/y")
    (data_dir / "hand-placed").write_bytes(b"h" * LARGE)
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        assert store._index.get("big").data is None
        assert store._index.get("hand-placed").data is None
        assert store.get("big") == b"b" * LARGE
        assert store.get("hand-placed") == b"h" * LARGE
        assert store.stat("big").content_type == "x/y"


def test_a_large_value_file_removed_by_hand_reads_as_absent(store, data_dir):
    store.put("big", b"b" * LARGE)
    (data_dir / "big").unlink()
    with pytest.raises(KeyError):
        store.get("big")


def test_a_large_value_file_whose_size_changed_by_hand_is_an_error_not_a_short_read(store, data_dir):
    store.put("big", b"b" * LARGE)
    (data_dir / "big").write_bytes(b"short")
    with pytest.raises(RuntimeError, match="changed while the server ran"):
        store.get("big")
    assert store.stat("big").size == LARGE  # the index is left as it was, for a restart to put right


def test_a_symbolic_link_put_in_a_large_values_place_is_not_followed(store, data_dir, tmp_path):
    """A link to a file of the same size, that only the server's user may read, was served as the value."""
    store.put("big", b"b" * LARGE)
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * LARGE)
    (data_dir / "big").unlink()
    (data_dir / "big").symlink_to(secret)
    with pytest.raises(RuntimeError, match="big is now a symbolic link: it was changed while the server ran"):
        store.get("big")


def test_a_fifo_put_in_a_large_values_place_is_refused_without_waiting(store, data_dir):
    """Opened as a value's file, it waited for a writer for good, holding the key's lock: every
    later read or write of the key waited behind it."""
    store.put("big", b"b" * LARGE)
    (data_dir / "big").unlink()
    os.mkfifo(data_dir / "big")
    outcome: list[object] = []

    def read() -> None:
        try:
            outcome.append(store.get("big"))
        except RuntimeError as error:
            outcome.append(error)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(5)
    if reader.is_alive():  # let it go: a writer's open ends its wait
        os.close(os.open(data_dir / "big", os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("reading a key whose file became a FIFO waited for a writer")
    [error] = outcome
    assert "big is no longer a regular file: it was changed while the server ran" in str(error)


def test_a_unix_socket_put_in_a_large_values_place_is_refused_as_not_a_regular_file(store, data_dir, monkeypatch):
    """open(2) refuses a socket (Linux: ENXIO, BSD: EOPNOTSUPP), which came out as a bare
    OSError (a 500 over HTTP)."""
    store.put("big", b"b" * LARGE)
    (data_dir / "big").unlink()
    monkeypatch.chdir(data_dir)  # (a socket's path is at most about 100 bytes)
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind("big")
        with pytest.raises(RuntimeError, match="big is no longer a regular file: it was changed while the server ran"):
            store.get("big")


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_folder_put_in_a_large_values_place_is_refused_and_leaks_no_descriptor(store, data_dir):
    """It opened, then os.fdopen refused it and left the descriptor open: one leaked a read."""
    store.put("big", b"b" * LARGE)
    (data_dir / "big").unlink()
    (data_dir / "big").mkdir()
    before = open_descriptors()
    for _ in range(20):
        with pytest.raises(RuntimeError, match="big is no longer a regular file"):
            store.get("big")
    assert open_descriptors() == before


# Durability


def test_with_fsync_a_write_syncs_the_file_and_the_folder(data_dir, monkeypatch):
    synced: list[bool] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(stat_module.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    with kvserver.FileStorage(data_dir, fsync=True) as store:
        monkeypatch.setattr(os, "fsync", recording_fsync)
        store.put("k", b"v", content_type=TEXT)
        assert False in synced, "the value file was not fsynced"
        assert True in synced, "the data dir was not fsynced"
        synced.clear()
        store.put("k", b"v", content_type="text/html")  # with a metadata file
        assert synced.count(False) >= 2, "the value and the metadata file are fsynced"
        assert synced.count(True) >= 2, "the meta folder and the data dir are fsynced"
        synced.clear()
        store.delete("k")
        assert True in synced, "the data dir was not fsynced after a delete"


def test_without_fsync_nothing_is_synced(data_dir, monkeypatch):
    synced = []
    monkeypatch.setattr(os, "fsync", synced.append)
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        store.put("k", b"v", content_type="text/html")
        store.delete("k")
    assert synced == []


# Swapped files: a small value's file is swapped out and rewritten by a later write (without
# fsync, zeroed first once its swap is synced, or else emptied)


def inode(path: Path) -> int:
    return path.stat().st_ino


def test_with_fsync_a_small_value_is_swapped_out_and_its_file_rewritten_by_the_next_write(data_dir):
    with kvserver.FileStorage(data_dir, fsync=True) as store:
        store.put("k", b"a long first value", content_type=TEXT)
        first = inode(data_dir / "k")
        store.put("k", b"second", content_type=TEXT)
        assert value_files(data_dir) == {"k": b"second"}
        [spare] = (data_dir / ".kvserver" / "spare").iterdir()
        assert (spare.read_bytes(), inode(spare)) == (b"a long first value", first)
        assert tmp_names(data_dir) == set()
        store.put("k", b"3", content_type=TEXT)  # shorter than what the spare held: cut to size
        assert value_files(data_dir) == {"k": b"3"}
        assert inode(data_dir / "k") == first
        assert spares(data_dir) == [b"second"]
        assert etag_of(data_dir / "k") == store.stat("k").etag.strip('"')
    with kvserver.FileStorage(data_dir, fsync=True) as store:
        assert (store.get("k"), store.stat("k").content_type) == (b"3", TEXT)
        assert (tmp_names(data_dir), spares(data_dir)) == (set(), [])


def logged(calls: list[tuple[str, tuple]], name: str, real):
    def call(*args):
        calls.append((name, args))
        return real(*args)

    return call


WRITE_CALLS = ((os, "ftruncate"), (os, "write"), (os, "posix_fadvise"), (kvserver, "_exchange"))
WRITE_CALLS += ((kvserver, "_zero_blocks"), (os, "fsync"))


def log_write_calls(monkeypatch, calls: list[tuple[str, tuple]]) -> None:
    for module, name in WRITE_CALLS:
        monkeypatch.setattr(module, name, logged(calls, name, getattr(module, name)))


def without_zeroing(monkeypatch) -> None:
    """Make the file system one that cannot zero blocks (as tmpfs), for stores opened from now."""

    def unsupported(fd: int, length: int, block_size: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(kvserver, "_zero_blocks", unsupported)


def sync_each_spare(monkeypatch) -> None:
    """Without fsync, have the next write that comes for a spare fsync the folder for the one
    waiting (not SPARE_BATCH of them), in stores opened from now or open."""
    monkeypatch.setattr(kvserver, "SPARE_BATCH", 1)


FS_IOC_FIEMAP = 0xC020660B
FIEMAP_EXTENT_UNWRITTEN = 0x800


def extents(fd: int) -> list[tuple[int, int, int, int]]:
    """A file's extents (the FIEMAP ioctl): logical and physical offset, length, flags."""
    count = 16
    request = struct.pack("=QQLLLL", 0, 2**64 - 1, 0, 0, count, 0) + bytes(56 * count)  # struct fiemap
    answer = fcntl.ioctl(fd, FS_IOC_FIEMAP, request)
    mapped = struct.unpack_from("=L", answer, 20)[0]
    return [struct.unpack_from("=QQQ16xL12x", answer, 32 + 56 * i) for i in range(mapped)]  # struct fiemap_extent


def test_zero_blocks_makes_a_files_blocks_read_as_zeros_where_they_are(tmp_path):
    """What lets a write without fsync rewrite a spare: its old bytes read as zeros until new
    ones are on disk (the blocks are unwritten), and no block is freed (on a disk mounted with
    `discard`, a discard each) or taken; the last block is whole, not zeroed in memory (its old
    bytes would stay on disk)."""
    if kvserver._file_system_type(tmp_path) != "ext4":
        pytest.skip(f"{tmp_path} is not on ext4 (XFS, say, frees a zeroed file's blocks and takes others)")
    path = tmp_path / "file"
    path.write_bytes(os.urandom(5000))  # a block and part of the next
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)  # its blocks taken and written
        try:
            before = extents(fd)
            kvserver._zero_blocks(fd, 5000, os.statvfs(path).f_frsize)
        except OSError as error:
            if error.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS):
                pytest.skip(f"the system cannot zero blocks, or map them: {error}")
            raise
        after = extents(fd)
        assert sum(length for _, _, length, _ in after) == sum(length for _, _, length, _ in before) > 0
        assert {physical for _, physical, _, _ in after} == {physical for _, physical, _, _ in before}
        assert all(flags & FIEMAP_EXTENT_UNWRITTEN for *_, flags in after), after
        assert os.fstat(fd).st_size == 5000
        assert path.read_bytes() == bytes(5000)
    finally:
        os.close(fd)


def test_without_fsync_a_swapped_out_file_is_zeroed_and_rewritten_once_a_folder_fsync_covers_its_swap(
    data_dir, monkeypatch
):
    """Until the swap that took it out of place is on disk, its old blocks may still be the
    key's value after a power loss: they are rewritten only after a folder fsync that began
    after that swap, and zeroed first (they read as zeros until the new bytes are on disk, not
    as another key's value); the new bytes begin to go to disk before the swap that shows them
    does (a new file's too)."""
    first_value = b"a first value over a block long" * 200  # 6,200 bytes
    sync_each_spare(monkeypatch)
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        store.put("k", first_value, content_type=TEXT)
        first = inode(data_dir / "k")
        calls: list[tuple[str, tuple]] = []
        log_write_calls(monkeypatch, calls)
        store.put("k", b"second", content_type=TEXT)  # no spare yet: a new file
        assert [name for name, _ in calls] == ["write", "posix_fadvise", "_exchange"]
        assert calls[1][1][1:] == (0, 6, os.POSIX_FADV_DONTNEED)  # its writeback begun
        [spare] = (data_dir / ".kvserver" / "spare").iterdir()
        assert (spare.read_bytes(), inode(spare)) == (first_value, first)
        calls.clear()
        synced: list[bool] = []  # whether each fsync was of the data dir, the folder of the swap
        logged_fsync = os.fsync
        monkeypatch.setattr(
            os, "fsync", lambda fd: synced.append(os.path.samestat(os.fstat(fd), os.stat(data_dir))) or logged_fsync(fd)
        )
        store.put("k", b"3", content_type=TEXT)
        assert synced == [True]
        assert [(name, args[1:]) for name, args in calls] == [
            ("fsync", ()),  # after the swap
            ("_zero_blocks", (6200, os.statvfs(data_dir).f_frsize)),  # the old bytes, in whole blocks
            ("write", (b"3",)),
            ("ftruncate", (1,)),  # cut to size
            ("posix_fadvise", (0, 1, os.POSIX_FADV_DONTNEED)),
            ("_exchange", (str(data_dir / "k"),)),
        ]
        assert (value_files(data_dir), inode(data_dir / "k")) == ({"k": b"3"}, first)
        assert spares(data_dir) == [b"second"]
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        assert (store.get("k"), store.stat("k").content_type) == (b"3", TEXT)
        assert (tmp_names(data_dir), spares(data_dir)) == (set(), [])


def test_without_fsync_where_blocks_cannot_be_zeroed_a_swapped_out_file_is_emptied_before_it_is_rewritten(
    data_dir, monkeypatch
):
    """The emptied file's new bytes go to new blocks, so its swap need not be synced first:
    no folder is fsynced."""
    without_zeroing(monkeypatch)
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        store.put("k", b"a long first value", content_type=TEXT)
        first = inode(data_dir / "k")
        calls: list[tuple[str, tuple]] = []
        log_write_calls(monkeypatch, calls)
        store.put("k", b"second", content_type=TEXT)  # no spare yet: a new file
        assert [name for name, _ in calls] == ["write", "posix_fadvise", "_exchange"]
        [spare] = (data_dir / ".kvserver" / "spare").iterdir()
        assert (spare.read_bytes(), inode(spare)) == (b"a long first value", first)
        calls.clear()
        store.put("k", b"3", content_type=TEXT)
        assert [name for name, _ in calls] == ["ftruncate", "write", "posix_fadvise", "_exchange"]
        assert calls[0][1][1:] == (0,)  # emptied
        assert calls[2][1][1:] == (0, 1, os.POSIX_FADV_DONTNEED)
        assert (value_files(data_dir), inode(data_dir / "k")) == ({"k": b"3"}, first)
        assert spares(data_dir) == [b"second"]
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        assert (store.get("k"), store.stat("k").content_type) == (b"3", TEXT)
        assert (tmp_names(data_dir), spares(data_dir)) == (set(), [])


def test_without_fsync_writes_make_new_files_until_a_batch_of_spares_waits_and_then_fsync_the_folder_for_it(
    data_dir, monkeypatch
):
    monkeypatch.setattr(kvserver, "SPARE_BATCH", 2)
    calls: list[tuple[str, tuple]] = []
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        log_write_calls(monkeypatch, calls)
        store.put("a", b"a1", content_type=TEXT)
        store.put("a", b"a2", content_type=TEXT)  # swaps: a1's file waits
        store.put("b", b"b1", content_type=TEXT)  # one spare waits: a new file
        store.put("b", b"b2", content_type=TEXT)  # b1's file waits too
        assert {"fsync", "_zero_blocks", "ftruncate"}.isdisjoint(name for name, _ in calls)
        assert spares(data_dir) == [b"a1", b"b1"]
        calls.clear()
        store.put("c", b"c1", content_type=TEXT)  # two wait: a folder fsync for them, then it takes one
        assert [name for name, _ in calls][:3] == ["fsync", "_zero_blocks", "write"]
        calls.clear()
        store.put("c", b"c2", content_type=TEXT)  # the other, zeroed without another fsync
        assert [name for name, _ in calls][:2] == ["_zero_blocks", "write"]
        assert "fsync" not in [name for name, _ in calls]
        assert value_files(data_dir) == {"a": b"a2", "b": b"b2", "c": b"c2"}
        assert spares(data_dir) == [b"c1"]  # (waiting)


def test_without_fsync_a_spare_swapped_out_while_its_folder_fsync_runs_waits_for_the_next(data_dir, monkeypatch):
    """Only an fsync that begins after a swap makes it durable."""
    sync_each_spare(monkeypatch)
    real_fsync = os.fsync
    running, release = threading.Event(), threading.Event()

    def slow_fsync(fd: int) -> None:
        running.set()
        assert release.wait(10)
        real_fsync(fd)

    with kvserver.FileStorage(data_dir, fsync=False) as store:
        for key in ("a", "b"):
            store.put(key, key.encode() + b"1", content_type=TEXT)
        store.put("a", b"a2", content_type=TEXT)  # a1's file waits
        monkeypatch.setattr(os, "fsync", slow_fsync)
        syncing = threading.Thread(target=lambda: store.put("c", b"c1", content_type=TEXT))  # fsyncs for a1's file
        syncing.start()
        assert running.wait(10)
        store.put("b", b"b2", content_type=TEXT)  # a new file: b1's file is swapped out while the fsync runs
        release.set()
        syncing.join(10)
        assert not syncing.is_alive()
        assert value_files(data_dir) == {"a": b"a2", "b": b"b2", "c": b"c1"}  # c1 in a1's file
        assert [Path(path).read_bytes() for path in store._spares._waiting] == [b"b1"]
        assert store._spares._ready == []


@pytest.mark.parametrize("kind", ["no-extents", "large", "holey"])
def test_without_fsync_a_spare_that_cannot_or_should_not_be_zeroed_is_emptied(data_dir, monkeypatch, kind):
    """ext4 cannot zero blocks in a file without extents (as ext3 made them); a file put by
    hand in a small value's place may be large, or have holes, for which zeroing takes blocks."""
    sync_each_spare(monkeypatch)
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        store.put("k", b"small", content_type=TEXT)
        if kind == "no-extents":

            def unsupported(fd: int, length: int, block_size: int) -> None:
                raise OSError(errno.EOPNOTSUPP, "Operation not supported")

            monkeypatch.setattr(kvserver, "_zero_blocks", unsupported)
        else:  # (by hand, in place of the file the server knows)
            with open(data_dir / "k", "r+b") as file:
                file.truncate(kvserver.SMALL_VALUE + 1 if kind == "large" else 60_000)
        store.put("k", b"second", content_type=TEXT)  # swaps the file out
        calls: list[tuple[str, tuple]] = []
        log_write_calls(monkeypatch, calls)
        store.put("other", b"value", content_type=TEXT)
        tried = kind == "no-extents"  # (the others are not even tried)
        writes = [(name, args[1:]) for name, args in calls if name != "fsync"]  # (the folder's, first)
        assert [name for name, _ in writes][: 2 + tried] == ["_zero_blocks"] * tried + ["ftruncate", "write"]
        assert writes[tried] == ("ftruncate", (0,))
        assert value_files(data_dir) == {"k": b"second", "other": b"value"}


def test_without_fsync_spares_are_zeroed_only_on_ext4_and_xfs(data_dir, monkeypatch):
    """The argument that a zeroed block cannot show its old bytes after a power loss is made
    for those two; elsewhere a spare is emptied."""
    assert kvserver._file_system_type("/proc") == "proc"
    monkeypatch.setattr(kvserver, "_file_system_type", lambda path: "btrfs")
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        store.put("k", b"one", content_type=TEXT)
        store.put("k", b"two", content_type=TEXT)
        path, durable = store._spares.take() or ("", True)
        assert (Path(path).read_bytes(), durable) == (b"one", False)  # at once, to be emptied


def test_a_store_dropped_without_close_releases_the_data_dir_and_its_descriptors(data_dir, monkeypatch):
    """As a file does."""
    sync_each_spare(monkeypatch)
    descriptors = open_descriptors()
    store = kvserver.FileStorage(data_dir, fsync=False)
    for value in (b"one", b"two", b"three", b"four"):  # (a folder fsync for spares among them)
        store.put("k", value, content_type=TEXT)
    del store
    gc.collect()
    assert open_descriptors() == descriptors
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        assert store.get("k") == b"four"


@pytest.mark.parametrize("end", [KeyboardInterrupt, lambda: OSError(errno.EMFILE, "Too many open files")])
def test_without_fsync_spares_whose_folder_fsync_does_not_happen_are_removed(data_dir, monkeypatch, end):
    """An interrupt during the fsync, or no descriptor for it: their swaps are not known to be
    durable, so they must not be rewritten; the next batch is synced as usual."""
    sync_each_spare(monkeypatch)
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        store.put("k", b"one", content_type=TEXT)
        store.put("k", b"two", content_type=TEXT)  # one's file waits
        real_open = os.open

        def failing_open(path, flags, *args):
            if flags & os.O_DIRECTORY:
                raise end()
            return real_open(path, flags, *args)

        monkeypatch.setattr(os, "open", failing_open)
        if end is KeyboardInterrupt:
            with pytest.raises(KeyboardInterrupt):
                store.put("k", b"three", content_type=TEXT)
        else:
            store.put("k", b"three", content_type=TEXT)  # in a new file
        assert spares(data_dir) == [] if end is KeyboardInterrupt else [b"two"]
        assert (store._spares._ready, store._spares._syncing, store._spares.failed) == ([], False, False)
        monkeypatch.setattr(os, "open", real_open)
        calls: list[tuple[str, tuple]] = []
        log_write_calls(monkeypatch, calls)
        store.put("k", b"four", content_type=TEXT)
        store.put("k", b"five", content_type=TEXT)  # a batch synced, and a spare zeroed
        assert "_zero_blocks" in [name for name, _ in calls]
        assert value_files(data_dir) == {"k": b"five"}


def test_without_fsync_metadata_is_never_written_into_a_zeroed_spare(data_dir, monkeypatch):
    """A metadata file that came back as zeros after a power loss would lose its key's media
    type, TTL or name: ext4 writes bytes into new blocks before it commits the rename that shows
    them, not bytes into zeroed ones."""
    monkeypatch.setattr(kvserver, "SPARE_BATCH", 2)
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        for key in ("a", "b"):
            store.put(key, key.encode() + b"1", content_type=TEXT)
            store.put(key, key.encode() + b"2", content_type=TEXT)  # two spares wait
        calls: list[tuple[str, tuple]] = []
        log_write_calls(monkeypatch, calls)
        store.put("m", b"not a png", content_type="image/png")  # a value, and a metadata file: a spare each
        assert [name for name, _ in calls if name in ("_zero_blocks", "ftruncate")] == ["_zero_blocks", "ftruncate"]
        metadata_write = next(args for name, args in calls if name == "write" and b"image/png" in bytes(args[1]))
        assert calls.index(("ftruncate", calls[[name for name, _ in calls].index("ftruncate")][1])) < calls.index(
            ("write", metadata_write)
        )
        assert spares(data_dir) == []
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        assert (store.get("m"), store.stat("m").content_type) == (b"not a png", "image/png")


def test_without_fsync_spares_whose_folder_fsync_failed_are_removed_and_none_is_kept_after(data_dir, monkeypatch):
    """Their swaps may never be on disk: a power loss could put any of them back in place."""
    sync_each_spare(monkeypatch)
    with kvserver.FileStorage(data_dir, fsync=False) as store:

        def failing_fsync(fd: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(os, "fsync", failing_fsync)
        store.put("k", b"one", content_type=TEXT)
        store.put("k", b"two", content_type=TEXT)  # one's file waits
        assert spares(data_dir) == [b"one"]
        calls: list[tuple[str, tuple]] = []
        log_write_calls(monkeypatch, calls)
        store.put("k", b"three", content_type=TEXT)  # the folder fsync for it fails: a new file
        assert store._spares.failed
        assert spares(data_dir) == []
        for value in (b"four", b"five"):
            store.put("k", value, content_type=TEXT)
            assert spares(data_dir) == []
        assert [name for name, _ in calls][:2] == ["fsync", "write"]  # (the fsync raised)
        assert {name for name, _ in calls} == {"fsync", "write", "posix_fadvise", "_exchange"}  # nothing rewritten
        assert value_files(data_dir) == {"k": b"five"}
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        assert store.get("k") == b"five"


@pytest.mark.parametrize("size", [kvserver.SMALL_VALUE, kvserver.SMALL_VALUE + 1], ids=["small", "large"])
@pytest.mark.parametrize("fsync", [True, False])
def test_a_large_value_replacing_a_small_one_is_swapped_in_only_with_fsync(data_dir, monkeypatch, fsync, size):
    """Without fsync, a swap may show only bytes whose writeback has begun: a small value's
    begins at once, a large value's when the kernel writes it (ext4 begins it for a file
    renamed over another)."""
    value = os.urandom(size)
    begun: list[int] = []  # the sizes of the files whose writeback began at once

    def posix_fadvise(fd: int, offset: int, length: int, advice: int) -> None:
        begun.append(os.fstat(fd).st_size)

    with kvserver.FileStorage(data_dir, fsync=fsync) as store:
        store.put("k", b"small", content_type=TEXT)
        monkeypatch.setattr(kvserver.os, "posix_fadvise", posix_fadvise, raising=False)
        store.put("k", value, content_type=TEXT)
        assert value_files(data_dir) == {"k": value}
        swapped = fsync or size <= kvserver.SMALL_VALUE
        assert spares(data_dir) == ([b"small"] if swapped else [])
        assert (size in begun) == (not fsync and size <= kvserver.SMALL_VALUE)
    with kvserver.FileStorage(data_dir, fsync=fsync) as store:
        assert store.get("k") == value


@pytest.mark.parametrize(
    ("fsync", "failure"),  # (with fsync a spare is rewritten in place, neither zeroed nor emptied first)
    [(True, "cut-off"), (False, "cut-off"), (False, "emptying")],
    ids=["fsync-cut-off", "no-fsync-cut-off", "no-fsync-emptying"],
)
def test_a_write_that_fails_in_a_spare_leaves_neither_it_nor_a_temporary_file(data_dir, monkeypatch, fsync, failure):
    sync_each_spare(monkeypatch)
    with kvserver.FileStorage(data_dir, fsync=fsync) as store:
        store.put("k", b"one")
        store.put("k", b"two")
        assert spares(data_dir) == [b"one"]
        descriptors = open_descriptors()

        def cut_off():
            yield b"half a val"
            raise ConnectionResetError

        def failing(*args: object) -> None:
            raise OSError(errno.EIO, "Input/output error")

        if failure == "emptying":  # (after its blocks could not be zeroed)
            monkeypatch.setattr(kvserver, "_zero_blocks", failing)
            monkeypatch.setattr(os, "ftruncate", failing)
        with pytest.raises(OSError):  # (ConnectionResetError is one)
            store.write("other", cut_off() if failure == "cut-off" else b"value")
        assert (tmp_names(data_dir), spares(data_dir)) == (set(), [])
        assert value_files(data_dir) == {"k": b"two"}
        assert open_descriptors() == descriptors


def test_without_ctypes_writes_rename_instead_of_swapping(data_dir):
    """Some builds of Python have no ctypes; kvserver needs nothing but the standard library."""
    script = (
        "import sys; sys.modules['ctypes'] = None  # import ctypes raises ImportError\n"
        "import kvserver\n"
        f"with kvserver.FileStorage({str(data_dir)!r}, fsync=True) as store:\n"
        "    store.put('k', b'one'); store.put('k', b'two')\n"
        "    print(store.get('k'), store._swaps)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=KVSERVER.parent, capture_output=True, text=True, timeout=60
    )
    assert result.stdout == "b'two' False\n", result.stderr
    assert value_files(data_dir) == {"k": b"two"}


@pytest.mark.parametrize("fsync", [True, False])
def test_a_file_with_a_second_hard_link_is_never_rewritten(data_dir, fsync):
    data_dir.mkdir(parents=True)
    (data_dir / "a").write_bytes(b"shared value")
    os.link(data_dir / "a", data_dir / "b")  # as a deduplicating tool, or a `cp -al` snapshot, leaves them
    os.link(data_dir / "a", data_dir.parent / "snapshot")
    with kvserver.FileStorage(data_dir, fsync=fsync) as store:
        store.put("a", b"new a")  # swaps the shared file out
        for n in range(3):
            store.put(f"other{n}", b"first")
            store.put(f"other{n}", b"second %d" % n)
        assert value_files(data_dir)["b"] == b"shared value"
    assert (data_dir.parent / "snapshot").read_bytes() == b"shared value"
    with kvserver.FileStorage(data_dir, fsync=fsync) as store:
        assert (store.get("a"), store.get("b")) == (b"new a", b"shared value")


@pytest.mark.parametrize("fsync", [True, False])
def test_a_symbolic_link_put_in_a_keys_place_is_not_written_through(data_dir, tmp_path, fsync):
    outside = tmp_path / "outside"
    outside.write_bytes(b"not the server's")
    with kvserver.FileStorage(data_dir, fsync=fsync) as store:
        store.put("k", b"one")
        (data_dir / "k").unlink()
        (data_dir / "k").symlink_to(outside)  # by hand, while the store is open
        store.put("k", b"two")  # swaps the link out
        store.put("other", b"first")
        store.put("other", b"second")
        assert value_files(data_dir) == {"k": b"two", "other": b"second"}
    assert outside.read_bytes() == b"not the server's"


def trace_folder_changes(monkeypatch, data_dir: Path, gate: threading.Event | None = None) -> list[tuple[str, str]]:
    """Log, in order, the removals and renames in the data dir's top folder and in its metadata
    folder, and the beginning and end of each fsync of the top folder (which waits for `gate`,
    if given, before it begins)."""
    log: list[tuple[str, str]] = []
    real_fsync, real_unlink, real_replace = os.fsync, os.unlink, os.replace
    top, meta = str(data_dir), str(data_dir / ".kvserver" / "meta")

    def where(path) -> str:
        folder = os.path.dirname(os.fspath(path))
        return "top" if folder == top else "meta" if folder == meta else ""

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}") != top:
            return real_fsync(fd)
        if gate is not None:
            gate.wait(10)
        log.append(("fsync begins", "top"))
        real_fsync(fd)
        log.append(("fsync ends", "top"))

    def unlink(path):
        real_unlink(path)
        log.append(("unlink", where(path)))

    def replace(source, target):
        real_replace(source, target)
        log.append(("replace", where(target)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "unlink", unlink)
    monkeypatch.setattr(os, "replace", replace)
    return log


def durable_before(log: list[tuple[str, str]], change: tuple[str, str], then: tuple[str, str]) -> bool:
    """Whether an fsync of the top folder that began after `change` ended before `then`."""
    after = log[log.index(change) :]
    before_then = after[: after.index(then)] if then in after else after
    began = before_then.index(("fsync begins", "top")) if ("fsync begins", "top") in before_then else len(after)
    return ("fsync ends", "top") in before_then[began:]


def test_an_expired_value_removed_at_start_is_durably_gone_before_its_metadata_goes(data_dir, monkeypatch):
    """Else a power loss could bring the value back without its metadata: with no TTL, forever."""
    with kvserver.FileStorage(data_dir, fsync=True) as store:
        store.put("k", b"<old/>", content_type="text/html", ttl=1)
        expires_at = store.stat("k").expires_at
    wait_for(lambda: time.time() > expires_at, what="the value's expiry")
    log = trace_folder_changes(monkeypatch, data_dir)
    with kvserver.FileStorage(data_dir, fsync=True) as store:
        assert "k" not in store
    assert durable_before(log, ("unlink", "top"), ("unlink", "meta")), log


def test_a_write_after_a_sweep_replaces_the_metadata_only_once_the_swept_value_is_durably_gone(data_dir, monkeypatch):
    with kvserver.FileStorage(data_dir, fsync=True) as store:
        store.put("k", b"<old/>", content_type="text/html", ttl=1)
        expires_at = store.stat("k").expires_at
        wait_for(lambda: time.time() > expires_at, what="the value's expiry")
        gate = threading.Event()
        log = trace_folder_changes(monkeypatch, data_dir, gate)
        sweeper = threading.Thread(target=store.sweep)  # its folder fsync waits for the gate
        sweeper.start()
        wait_for(lambda: ("unlink", "top") in log, what="the sweep's removal")
        writer = threading.Thread(target=store.put, args=("k", b"<new/>"), kwargs={"content_type": "text/html"})
        writer.start()
        wait_for(  # it may not replace the metadata yet: it waits for the swept value's removal to be durable
            lambda: ("replace", "meta") in log or store._values_synced._parked,
            what="the write to replace the metadata or to wait",
        )
        gate.set()
        for thread in (sweeper, writer):
            thread.join(10)
        assert store.get("k") == b"<new/>"
    assert durable_before(log, ("unlink", "top"), ("replace", "meta")), log


def test_a_folder_put_in_a_keys_place_is_kept_and_does_not_stop_the_next_start(data_dir, capfd):
    with kvserver.FileStorage(data_dir, fsync=True) as store:
        store.put("k", b"one")
        (data_dir / "k").unlink()
        (data_dir / "k").mkdir()  # by hand, while the store is open
        (data_dir / "k" / "notes.txt").write_bytes(b"someone's file")
        store.put("k", b"two")  # swaps the folder out
        store.put("other", b"first")
        store.put("other", b"second")  # a spare is wanted: the folder is not one
    with kvserver.FileStorage(data_dir, fsync=True) as store:
        assert (store.get("k"), store.get("other")) == (b"two", b"second")
        for n in range(4):  # temporary files and spares take the names the folder had
            store.put(f"new{n}", b"first")
            store.put(f"new{n}", b"second")
        for folder in ("tmp", "spare"):
            assert all(path.is_file() for path in (data_dir / ".kvserver" / folder).iterdir())
        assert len(list((data_dir / ".kvserver" / "spare").iterdir())) >= 1
    [kept] = (data_dir / ".kvserver" / "kept").glob("*/notes.txt")
    assert kept.read_bytes() == b"someone's file"
    assert f"to {kept.parent}: a folder put by hand where kvserver keeps a file" in capfd.readouterr().err


def test_a_fifo_put_in_a_keys_place_does_not_make_a_later_write_wait_for_a_reader(data_dir):
    store = kvserver.FileStorage(data_dir, fsync=True)
    store.put("k", b"one")
    (data_dir / "k").unlink()
    os.mkfifo(data_dir / "k")  # by hand, while the store is open
    store.put("k", b"two")  # swaps the FIFO out
    writer = threading.Thread(target=store.put, args=("other", b"value"), daemon=True)
    writer.start()
    writer.join(10)
    if writer.is_alive():  # let it end: a reader opens the FIFO
        [fifo] = (data_dir / ".kvserver" / "spare").iterdir()
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
        writer.join(10)
        pytest.fail("a write waited for a reader of a FIFO put in a key's place")
    assert value_files(data_dir) == {"k": b"two", "other": b"value"}
    store.close()


def test_after_a_folder_fsync_fails_no_swapped_out_file_is_rewritten(data_dir, monkeypatch):
    real_fsync = os.fsync
    failures = [OSError(errno.EIO, "Input/output error")]

    def failing_fsync(fd):
        if stat_module.S_ISDIR(os.fstat(fd).st_mode) and failures:
            raise failures.pop()
        real_fsync(fd)

    with kvserver.FileStorage(data_dir, fsync=True) as store:
        store.put("k", b"one", content_type=TEXT)
        monkeypatch.setattr(os, "fsync", failing_fsync)
        with pytest.raises(OSError, match="Input/output"):
            store.put("k", b"two", content_type=TEXT)  # its swap may not be durable
        store.put("k", b"three", content_type=TEXT)
        store.put("k", b"four", content_type=TEXT)
        assert (tmp_names(data_dir), spares(data_dir)) == (set(), [])
        assert value_files(data_dir) == {"k": b"four"}


def test_a_write_whose_fsync_wait_is_interrupted_keeps_no_spare(data_dir, monkeypatch):
    with kvserver.FileStorage(data_dir, fsync=True) as store:
        store.put("k", b"one", content_type=TEXT)

        def interrupted(ticket):
            raise KeyboardInterrupt  # before any fsync covered the swap

        monkeypatch.setattr(store._values_synced, "wait", interrupted)
        with pytest.raises(KeyboardInterrupt):
            store.put("k", b"two", content_type=TEXT)
        assert (tmp_names(data_dir), spares(data_dir), store._spares.take()) == (set(), [], None)


@pytest.mark.parametrize("fsync", [True, False])
def test_a_large_value_being_read_is_never_rewritten_by_later_writes(data_dir, fsync):
    large = os.urandom(LARGE)
    with kvserver.FileStorage(data_dir, fsync=fsync) as store:
        store.put("big", large)
        with store.open("big") as reader:
            for n in range(5):  # large to small, then small to small: spares go round
                store.put("big", b"small %d" % n)
                store.put("other", b"other %d" % n)
            assert reader.read() == large
        assert store.get("big") == b"small 4"


@pytest.mark.parametrize("fsync", [True, False])
def test_without_a_way_to_swap_each_write_renames_a_new_file(data_dir, monkeypatch, fsync):
    monkeypatch.setattr(kvserver, "_renameat2", None)  # not Linux, or an old C library
    with kvserver.FileStorage(data_dir, fsync=fsync) as store:
        inodes = set()
        for n in range(5):
            store.put("k", b"value %d" % n, content_type=TEXT)
            inodes.add(inode(data_dir / "k"))
            assert value_files(data_dir) == {"k": b"value %d" % n}
            assert (tmp_names(data_dir), spares(data_dir)) == (set(), [])
    assert len(inodes) >= 2  # a freed inode may come back, but not every time


@pytest.mark.parametrize("fsync", [True, False])
def test_concurrent_writers_leave_every_file_whole_and_few_spares(data_dir, monkeypatch, fsync):
    values = [b"x" * size for size in (1, 7, 300, 4097, 65536)]  # spares of every size meet every value
    monkeypatch.setattr(kvserver, "SPARE_BATCH", 4)
    with kvserver.FileStorage(data_dir, fsync=fsync) as store:

        def writer(worker: int) -> None:
            for n in range(60):
                store.put(f"k{(worker + n) % 12}", values[(worker * 7 + n) % len(values)] + b"%d" % worker)

        threads = [threading.Thread(target=writer, args=(worker,)) for worker in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert value_files(data_dir) == {key: store.get(key) for key in store}
        assert tmp_names(data_dir) == set()
        # One for each writer at most; without fsync, a batch waiting for a folder fsync and one
        # ready (each a few more, for the writers that come meanwhile).
        assert len(spares(data_dir)) <= 8 + (0 if fsync else 2 * (kvserver.SPARE_BATCH + 8))
        expected = {key: (store.get(key), store.stat(key)) for key in store}
    with kvserver.FileStorage(data_dir, fsync=fsync) as store:
        assert {key: (store.get(key), store.stat(key)) for key in store} == expected


# Crash states, built by hand as the FileStorage docstring describes them


def crash_stamp() -> int:
    """A modification time no earlier write used."""
    return time.time_ns() + 10**9


@pytest.mark.parametrize("key", ["page", "a page/with an escaped name", "k" * 1024])
def test_crash_after_the_metadata_is_written_and_before_the_rename_gives_the_old_value(data_dir, key):
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        store.put(key, b"<old/>", content_type="text/html")
        old = store.stat(key)
    name = kvserver._file_name(key)
    # The new value, written and stamped in tmp, and metadata knowing both versions.
    new_etag = place(data_dir / ".kvserver" / "tmp" / "tmpnew", b"new png bytes", crash_stamp())
    records = {new_etag: record(key, "image/png"), old.etag: record(key, "text/html")}
    (data_dir / ".kvserver" / "meta" / name).write_text(json.dumps(records))
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        assert store.keys() == [key]
        assert store.get(key) == b"<old/>"
        assert store.stat(key) == old
        assert tmp_names(data_dir) == set()
        assert value_files(data_dir) == {name: b"<old/>"}


@pytest.mark.parametrize("key", ["page", "a page/with an escaped name", "k" * 1024])
def test_crash_after_the_rename_gives_the_new_value_with_its_metadata(data_dir, key):
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        store.put(key, b"<old/>", content_type="text/html", ttl=3600)
        old = store.stat(key)
    name = kvserver._file_name(key)
    new_etag = place(data_dir / name, b"new png bytes", crash_stamp())  # renamed over the old file
    expires_at = time.time() + 7200
    records = {new_etag: record(key, "image/png", expires_at), old.etag: record(key, "text/html", old.expires_at)}
    (data_dir / ".kvserver" / "meta" / name).write_text(json.dumps(records))
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        assert store.keys() == [key]
        assert store.get(key) == b"new png bytes"
        assert store.stat(key) == kvserver.Stat(13, "image/png", new_etag, expires_at)


def test_crash_with_old_and_new_records_and_a_large_new_value_gives_the_new_value(data_dir):
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        store.put("big", b"o" * LARGE, content_type="text/old")
        old = store.stat("big")
    new_etag = place(data_dir / "big", b"n" * (LARGE + 1), crash_stamp())
    records = {new_etag: record("big", "text/new"), old.etag: record("big", "text/old")}
    (data_dir / ".kvserver" / "meta" / "big").write_text(json.dumps(records))
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        assert store.stat("big").content_type == "text/new"
        assert store.get("big") == b"n" * (LARGE + 1)


def test_a_stale_metadata_file_beside_a_renamed_value_is_ignored_and_removed(data_dir):
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        store.put("k", b"<old/>", content_type="text/html", ttl=1)
        old = store.stat("k")
    # The new value needed no metadata: renamed in place, crash before its stale metadata went.
    new_etag = place(data_dir / "k", b"new text", crash_stamp())
    assert meta_names(data_dir) == {"k"}
    # Wait until the stale record's TTL has passed: it must not take the new value with it.
    wait_for(lambda: time.time() > old.expires_at, timeout=5, interval=0.05, what="the old TTL to pass")
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        assert store.keys() == ["k"]
        assert store.get("k") == b"new text"
        assert store.stat("k") == kvserver.Stat(8, TEXT, new_etag, None)
        assert meta_names(data_dir) == set()
    assert value_files(data_dir) == {"k": b"new text"}


def test_a_metadata_file_that_matches_no_value_file_is_removed(data_dir):
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        store.put("deleted", b"v", content_type="text/html")
        store.put("kept", b"v", content_type="text/html")
    # A delete that removed the value file and crashed before removing the metadata.
    (data_dir / "deleted").unlink()
    (data_dir / ".kvserver" / "meta" / "orphan").write_text(json.dumps({"1-1": record("orphan", "x/y")}))
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        assert store.keys() == ["kept"]
        assert meta_names(data_dir) == {"kept"}
        assert store.stat("kept").content_type == "text/html"
    assert value_files(data_dir) == {"kept": b"v"}


def test_a_fifo_a_folder_or_a_link_in_the_metadata_folder_is_skipped_with_a_warning_and_left(data_dir, capsys):
    """Opened as a metadata file, a FIFO stalled the start for good, and a folder stopped it."""
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        store.put("plain", b"<p>hi</p>", content_type="text/html")
        store.put("fifo", b"<p>hi</p>", content_type="text/html")
    meta = data_dir / ".kvserver" / "meta"
    (meta / "fifo").unlink()
    os.mkfifo(meta / "fifo")  # in the place of a value's metadata file
    (meta / "folder").mkdir()
    (meta / "link").symlink_to(meta / "plain")
    capsys.readouterr()
    opened: list[kvserver.FileStorage] = []
    opening = threading.Thread(target=lambda: opened.append(kvserver.FileStorage(data_dir, fsync=False)))
    opening.start()
    opening.join(10)
    if opening.is_alive():  # let the thread go: it waits for a writer to the FIFO
        with open(meta / "fifo", "wb"):
            pass
        opening.join(10)
        pytest.fail("the start was stalled by the FIFO in .kvserver/meta")
    with opened[0] as store:
        assert store.keys() == ["fifo", "plain"]
        assert store.stat("plain").content_type == "text/html"
        assert store.stat("fifo").content_type == kvserver.TEXT_CONTENT_TYPE  # as a value without metadata
    lines = capsys.readouterr().err.splitlines()
    assert sorted(lines) == [
        f"kvserver: skipping {meta / name}: not a regular file" for name in ("fifo", "folder", "link")
    ], lines
    assert stat_module.S_ISFIFO((meta / "fifo").lstat().st_mode)  # left as they were
    assert (meta / "folder").is_dir() and (meta / "link").is_symlink()


def test_a_start_that_cannot_read_a_file_names_it(data_dir, monkeypatch, capsys):
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        store.put("k", b"v")

    def refused(path: str, size: int) -> bytes:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)

    monkeypatch.setattr(kvserver, "_read_small_file", refused)
    with pytest.raises(SystemExit) as exited:
        kvserver.main(["--data-dir", str(data_dir), "--port", "0"])
    assert exited.value.code == 1
    assert capsys.readouterr().err == (
        f"kvserver: cannot use data dir {data_dir}: {os.strerror(errno.EACCES)}: {data_dir / 'k'}\n"
    )


def test_the_data_dir_and_kvservers_folders_it_makes_are_its_users_alone(tmp_path):
    """Value files are 0600; the names of the keys are in file names, so the folders that hold
    them are 0700 (as etcd makes its data dir). A data dir that exists keeps its mode."""
    with kvserver.FileStorage(tmp_path / "new" / "data", fsync=False) as store:
        store.put("k", b"v")
    for folder in ("", ".kvserver", ".kvserver/tmp", ".kvserver/spare", ".kvserver/meta"):
        assert stat_module.S_IMODE((tmp_path / "new" / "data" / folder).stat().st_mode) == 0o700, folder
    (tmp_path / "given").mkdir(mode=0o755)
    os.chmod(tmp_path / "given", 0o755)
    with kvserver.FileStorage(tmp_path / "given", fsync=False):
        pass
    assert stat_module.S_IMODE((tmp_path / "given").stat().st_mode) == 0o755
    assert stat_module.S_IMODE((tmp_path / "given" / ".kvserver").stat().st_mode) == 0o700


def test_a_value_file_of_a_hashed_name_without_its_record_is_skipped_not_guessed(data_dir, capsys):
    key = "k" * 1024
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        store.put(key, b"v")
    name = kvserver._file_name(key)
    (data_dir / ".kvserver" / "meta" / name).unlink()
    capsys.readouterr()
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        assert store.keys() == []
    assert name in capsys.readouterr().err


def test_a_hashed_name_value_whose_time_changed_keeps_its_key_from_its_metadata(data_dir, capsys):
    """A copy without -a resets modification times, so no record matches the file any more: its
    key, which only the metadata file holds, was lost, and the metadata file removed with it."""
    key = "k" * 1024
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        store.put(key, b"<p>v</p>", content_type="text/html", ttl=3600)
        expires_at = store.stat(key).expires_at
    name = kvserver._file_name(key)
    os.utime(data_dir / name, ns=(10**18, 10**18))  # as cp without -a leaves it: another time
    capsys.readouterr()
    for _ in range(2):  # the key is still there at the start after
        with kvserver.FileStorage(data_dir, fsync=False) as store:
            assert store.keys() == [key]
            assert store.get(key) == b"<p>v</p>"
            assert store.stat(key).content_type == "text/html"  # its metadata's, as its TTL
            assert store.stat(key).expires_at == expires_at
        [line] = capsys.readouterr().err.splitlines()
        assert name in line and "copied without -a?" in line, line
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        store.put(key, b"<p>w</p>", content_type="text/html")  # a write puts it right
    capsys.readouterr()
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        assert store.stat(key).content_type == "text/html"
    assert capsys.readouterr().err == ""


def test_a_hashed_name_value_whose_time_changed_does_not_outlive_every_ttl_its_metadata_knows(data_dir):
    """It is one of the versions its records know: when all of them have expired, it has (it
    came back with no TTL, for good: a session token, say)."""
    key = "k" * 1024
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        store.put(key, b"secret", ttl=1)
        expires_at = store.stat(key).expires_at
    name = kvserver._file_name(key)
    os.utime(data_dir / name, ns=(10**18, 10**18))  # as cp without -a leaves it: another time
    wait_for(lambda: time.time() > expires_at + 0.05, timeout=10, what="the TTL to pass")
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        assert store.keys() == []
    assert not (data_dir / name).exists() and meta_names(data_dir) == set()


def test_a_folder_in_meta_in_a_keys_metadata_place_is_kept_aside_when_a_write_or_delete_needs_it(data_dir, capsys):
    """Skipped at start and left there, it made every write of the key that needs metadata fail
    (IsADirectoryError, a 500), and a delete fail after removing the value."""
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        store.put("big", b"b" * LARGE)  # large: it has a metadata file
    meta = data_dir / ".kvserver" / "meta" / "big"
    meta.unlink()
    meta.mkdir()
    (meta / "note").write_bytes(b"mine")
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        assert store.keys() == ["big"]
        store.put("big", b"c" * LARGE)
        assert store.get("big") == b"c" * LARGE
        [kept] = (data_dir / ".kvserver" / "kept").iterdir()
        assert (kept / "note").read_bytes() == b"mine"
        meta.unlink()
        meta.mkdir()
        store.delete("big")
        assert store.keys() == [] and not meta.exists()
        store.put("big", b"v", ttl=3600)  # a small value with a TTL has metadata too
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        assert store.stat("big").expires_at is not None
    assert len(list((data_dir / ".kvserver" / "kept").iterdir())) == 2
    assert capsys.readouterr().err.count("a folder put by hand where kvserver keeps a file") == 2


# Crash states made by a real crash: a child process dies at every step of one write


# Every call that changes the disk: a crash can come before or after each.
CRASH_POINTS = [(os, name) for name in ("write", "ftruncate", "utime", "fsync", "replace", "unlink")]
CRASH_POINTS += [(kvserver, "_exchange"), (kvserver, "_zero_blocks")]


def run_until_crash(data_dir: Path, step: int, action, expire_first: float | None = None, fsync: bool = True) -> bool:
    """Fork a child that opens the store and runs `action(store)`, dying at the `step`-th
    file-system call that changes the disk; True if the child got through without dying."""
    pid = os.fork()
    if pid == 0:  # the child: never returns
        status = 3
        try:
            store = kvserver.FileStorage(data_dir, fsync=fsync)
            if expire_first is not None:
                while time.time() <= expire_first:
                    time.sleep(0.01)
            calls = 0

            def dying(real):
                def call(*args, **kwargs):
                    nonlocal calls
                    calls += 1
                    if calls == step:
                        os._exit(9)  # like kill -9: no cleanup, no flush
                    return real(*args, **kwargs)

                return call

            for module, name in CRASH_POINTS:
                setattr(module, name, dying(getattr(module, name)))
            action(store)
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    deadline = time.monotonic() + 20
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError("the crashing child did not finish in 20 s")
        time.sleep(0.005)
    code = os.waitstatus_to_exitcode(status)
    assert code in (0, 9), f"the child failed with {code}"
    return code == 0


OLD_NEW = {
    "text-to-text": (dict(data=b"old", content_type=TEXT), dict(data=b"new", content_type=TEXT)),
    "text-to-html": (dict(data=b"old", content_type=TEXT), dict(data=b"<new/>", content_type="text/html")),
    "html-to-text": (dict(data=b"<old/>", content_type="text/html"), dict(data=b"new", content_type=TEXT)),
    "html-to-png": (dict(data=b"<old/>", content_type="text/html"), dict(data=b"png", content_type="image/png")),
    "ttl-to-none": (dict(data=b"old", content_type=TEXT, ttl=3600), dict(data=b"new", content_type=TEXT)),
    "small-to-large": (dict(data=b"old", content_type=TEXT), dict(data=b"n" * LARGE, content_type="x/large")),
    "large-to-small": (dict(data=b"o" * LARGE, content_type="x/large"), dict(data=b"new", content_type=TEXT)),
    "absent-to-html": (None, dict(data=b"<new/>", content_type="text/html")),
    "html-to-deleted": (dict(data=b"<old/>", content_type="text/html"), None),
}


@pytest.mark.parametrize("fsync", [True, False])
@pytest.mark.parametrize("key", ["k", "a key/escaped", "k" * 1024], ids=["plain", "escaped", "hashed"])
@pytest.mark.parametrize("change", list(OLD_NEW.values()), ids=list(OLD_NEW))
def test_a_crash_at_any_step_of_a_write_leaves_the_old_or_the_new_value_with_its_metadata(tmp_path, key, change, fsync):
    old, new = change

    def action(store):
        if new is None:
            store.delete(key)
        else:
            store.put(key, new["data"], content_type=new["content_type"])

    outcomes = []
    for step in range(1, 30):
        data_dir = tmp_path / f"step-{step}"
        with kvserver.FileStorage(data_dir, fsync=False) as store:
            store.put("other", b"untouched", content_type="text/other")
            if old is not None:
                store.put(key, old["data"], content_type=old["content_type"], ttl=old.get("ttl"))
            before = {name: store.stat(name) for name in store}
        finished = run_until_crash(data_dir, step, action, fsync=fsync)
        with kvserver.FileStorage(data_dir, fsync=False) as store:
            assert store.get("other") == b"untouched"
            assert store.stat("other") == before["other"]
            if key not in store:
                assert new is None or old is None, f"step {step}: the key vanished"
                outcomes.append("absent")
            elif key in before and store.stat(key) == before[key]:
                assert store.get(key) == old["data"], f"step {step}"
                outcomes.append("old")
            else:
                assert new is not None, f"step {step}: {store.stat(key)} is neither the old value nor absent"
                stat = store.stat(key)
                assert store.get(key) == new["data"], f"step {step}"
                assert (stat.size, stat.content_type, stat.expires_at) == (
                    len(new["data"]),
                    new["content_type"],
                    None,
                ), f"step {step}"
                outcomes.append("new")
            assert tmp_names(data_dir) == set(), f"step {step}"
            # Every metadata file left belongs to a value file that is there.
            assert meta_names(data_dir) <= set(value_files(data_dir)), f"step {step}"
        if finished:
            break
    else:
        raise AssertionError("the write never finished")
    # The crashes hit before and after the write took effect, and the finished write took it.
    assert outcomes[0] == ("absent" if old is None else "old"), outcomes
    assert outcomes[-1] == ("absent" if new is None else "new"), outcomes
    assert len(outcomes) >= 3, outcomes


@pytest.mark.parametrize(
    ("fsync", "zeroing"),
    [(True, True), (False, False), (False, True)],
    ids=["fsync", "no-fsync-empty", "no-fsync-zero"],
)
def test_a_crash_at_any_step_of_writes_that_rewrite_swapped_out_files_leaves_a_whole_value(
    tmp_path, monkeypatch, fsync, zeroing
):
    values = [b"the old value", b"two", b"the third value", b"4"]  # each write after the first reuses a file
    sync_each_spare(monkeypatch)  # (without fsync where spares are zeroed, a write would make a new file)
    if not zeroing:
        without_zeroing(monkeypatch)

    def action(store):
        for value in values[1:]:
            store.put("k", value, content_type=TEXT)

    outcomes = []
    for step in range(1, 60):
        data_dir = tmp_path / f"step-{step}"
        with kvserver.FileStorage(data_dir, fsync=False) as store:
            store.put("k", values[0], content_type=TEXT)
        finished = run_until_crash(data_dir, step, action, fsync=fsync)
        with kvserver.FileStorage(data_dir, fsync=False) as store:
            value = store.get("k")
            assert value in values, f"step {step}: {value!r}"
            assert store.stat("k").size == len(value)
            assert value_files(data_dir) == {"k": value}
            assert tmp_names(data_dir) == set()
            outcomes.append(values.index(value))
        if finished:
            break
    else:
        raise AssertionError("the writes never finished")
    assert outcomes == sorted(outcomes), "a crash brought an older value back"
    assert set(outcomes) == {0, 1, 2, 3}


@pytest.mark.parametrize("fsync", [True, False])
def test_a_crash_at_any_step_of_writes_whose_metadata_takes_swapped_out_files_leaves_each_key_whole(tmp_path, fsync):
    writes = [("k", b"<x/>", "text/html"), ("k", b"plain", TEXT), ("k", b"<y/>", "text/html"), ("a", b"a3", TEXT)]
    writes.append(("k", b"zz", "image/png"))

    def action(store):
        for key, value, content_type in writes:
            store.put(key, value, content_type=content_type)

    for step in range(1, 200):
        data_dir = tmp_path / f"step-{step}"
        with kvserver.FileStorage(data_dir, fsync=fsync) as store:
            for key in ("a", "b"):  # (so that spares exist for the values and the metadata)
                store.put(key, key.encode() + b"1", content_type=TEXT)
                store.put(key, key.encode() + b"2", content_type=TEXT)
            store.put("k", b"old", content_type=TEXT)
        finished = run_until_crash(data_dir, step, action, fsync=fsync)
        with kvserver.FileStorage(data_dir, fsync=fsync) as store:
            k = (store.get("k"), store.stat("k").content_type)
            assert k in [(b"old", TEXT), *((v, t) for key, v, t in writes if key == "k")], f"step {step}: {k!r}"
            assert (store.get("a") in (b"a2", b"a3"), store.get("b")) == (True, b"b2"), f"step {step}"
            assert (tmp_names(data_dir), spares(data_dir)) == (set(), []), f"step {step}"
            assert meta_names(data_dir) <= set(value_files(data_dir)), f"step {step}"
        if finished:
            break
    else:
        raise AssertionError("the writes never finished")


def test_a_crash_while_rewriting_a_key_whose_ttl_just_passed_does_not_bring_the_old_value_back(data_dir):
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        store.put("k", b"old", content_type=TEXT, ttl=1)
        expires_at = store.stat("k").expires_at

    def action(store):
        store.put("k", b"<new/>", content_type="text/html")

    for step in range(1, 30):
        finished = run_until_crash(data_dir, step, action, expire_first=expires_at)
        with kvserver.FileStorage(data_dir, fsync=False) as store:
            if "k" in store:
                assert store.get("k") == b"<new/>", f"step {step}: the expired value came back"
                assert store.stat("k").content_type == "text/html"
                store.delete("k")
            store.put("k", b"old", content_type=TEXT, ttl=1)
            expires_at = store.stat("k").expires_at
        if finished:
            break
    else:
        raise AssertionError("the write never finished")


# An interrupt between two steps of a write or a delete (KeyboardInterrupt, which a program that
# embeds the storage gets in its main thread): what the running store serves is what a restart
# finds, whichever step it lands before.


def code_lines(function) -> list[object]:
    """The lines of `function` that run code, as pytest parameters named by their text."""
    source, first = inspect.getsourcelines(function)
    lines = sorted({line for _, line in dis.findlinestarts(function.__code__) if line and line > first})
    return [
        pytest.param(function, line, id=f"{function.__name__}:{source[line - first].strip()[:40]}") for line in lines
    ]


def view(store: kvserver.Storage) -> dict[str, object]:
    """Each key with what reading it gives (bytes, media type, ETag), or the name of its error."""
    seen: dict[str, object] = {}
    for key in store.keys():
        try:
            stat, body = store.fetch(key)
            with body:
                seen[key] = (body.read(), stat.content_type, stat.etag)
        except Exception as error:
            seen[key] = type(error).__name__
    return seen


@pytest.mark.parametrize(
    ("size", "content_type"),
    [(5, TEXT), (5, "old/type"), (kvserver.SMALL_VALUE + 1, "old/type")],
    ids=["small-swapped", "small-with-metadata", "large-renamed"],
)
@pytest.mark.parametrize(
    ("function", "line"),
    [
        *code_lines(kvserver.FileStorage._write),
        *code_lines(kvserver.FileStorage._move_into_place),
        *code_lines(kvserver.FileStorage._replace),
    ],
)
def test_an_interrupt_before_any_step_of_a_write_leaves_the_store_serving_what_a_restart_finds(
    data_dir, size, content_type, function, line
):
    with kvserver.FileStorage(data_dir) as store:
        store.put("k", b"o" * size, content_type=content_type)
        store.put("k", b"p" * size, content_type=content_type)  # (so that a spare exists)
        watch = store.watch("k")
        with contextlib.suppress(KeyboardInterrupt):
            put = functools.partial(store.put, "k", b"n" * size, content_type="new/type")
            traced(interrupt_before(function.__code__, line), put)
        running = view(store)
        events = [(event.type, event.key, event.stat and event.stat.etag) for event in watch.wait(0)]
        store.put("after", b"a")  # writes go on
    with kvserver.FileStorage(data_dir) as again:
        restarted = view(again)
    value, media_type, etag = running["k"]
    if value == b"p" * size:  # the write did not happen: nothing to tell the watch
        assert (media_type, events) == (content_type, [])
    else:  # it did: the watch hears of it once
        assert (value, media_type, events) == (b"n" * size, "new/type", [("put", "k", etag)])
    del restarted["after"]
    assert running == restarted


@pytest.mark.parametrize("size", [5, kvserver.SMALL_VALUE + 1], ids=["small", "large"])
@pytest.mark.parametrize(("function", "line"), code_lines(kvserver.FileStorage._unlink))
def test_an_interrupt_before_any_step_of_a_delete_leaves_the_store_serving_what_a_restart_finds(
    data_dir, size, function, line
):
    with kvserver.FileStorage(data_dir) as store:
        store.put("k", b"v" * size)
        watch = store.watch("k")
        with contextlib.suppress(KeyboardInterrupt):
            traced(interrupt_before(function.__code__, line), store.delete, "k")
        running = view(store)
        events = [(event.type, event.key) for event in watch.wait(0)]
    with kvserver.FileStorage(data_dir) as again:
        assert running == view(again)
    assert events == ([] if running else [("delete", "k")])


# Found by review of the on-disk format (12g)
def test_the_warning_for_a_file_whose_name_holds_a_newline_is_one_line(tmp_path: Path, capsys) -> None:
    # SPEC 7: hand-placed files whose names are not keys are "skipped with a one-line warning".
    # A name may hold any byte but '/' and NUL: a newline in it must not start a second line
    # (here one that reads like another warning of kvserver's), nor an escape sequence reach
    # the terminal as it is.
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "good").write_bytes(b"kept")
    (data_dir / "bad\nkvserver: skipping forged: its name is not a key").write_bytes(b"x")
    (data_dir / "esc\x1b[2Jape").write_bytes(b"x")
    capsys.readouterr()
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        assert store.keys() == ["good"]
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 2, err  # one line per file skipped
    assert all(line.startswith("kvserver: skipping ") and "data/" in line for line in lines), err
    assert "\x1b" not in err, err


def test_a_folder_in_the_place_of_a_long_plain_key_is_moved_to_kept(tmp_path: Path, capsys) -> None:
    # README: "a folder put in a key's place by hand, skipped with a warning at start, is moved to
    # .kvserver/kept/ with a warning naming it when a write of that key needs the place"; and names
    # never pass 255 bytes. A plain key of 240 bytes is its own name; kept/ names it
    # "<19-digit stamp>-<name>", 260 bytes: the rename fails with ENAMETOOLONG, so every write of
    # the key fails for ever.
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    key = "a" * 240
    (data_dir / key).mkdir()
    (data_dir / key / "inner").write_bytes(b"hand-made")
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        store.put(key, b"value")
        assert store.get(key) == b"value"
    assert (data_dir / key).read_bytes() == b"value"
    kept = list((data_dir / ".kvserver" / "kept").iterdir())
    assert len(kept) == 1
    assert (kept[0] / "inner").read_bytes() == b"hand-made"
    assert len(os.fsencode(kept[0].name)) <= 255


def test_a_deleted_key_does_not_come_back_from_a_metadata_file_a_hand_edit_broke(tmp_path: Path) -> None:
    # A metadata file names the key of its value file, but the name is not checked against the
    # file: a record of .kvserver/meta/x that says key "y" (a hand edit) makes the value of file x
    # load as key "y". Deleting "y" then removes file "y" (there is none) and leaves file x and its
    # metadata, so the next start serves "y" again: what a restart loads is not what the running
    # store served. A record whose key does not give its file's name should be ignored, like any
    # damaged metadata file ("its value loads with derived metadata").
    data_dir = tmp_path / "data"
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        store.put("x", b"{}", content_type="application/json")
    meta = data_dir / ".kvserver" / "meta" / "x"
    records = json.loads(meta.read_bytes())
    for record in records.values():
        record["key"] = "y"
    meta.write_text(json.dumps(records))
    os.utime(meta)  # (a hand edit)
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        for key in store.keys():
            store.delete(key)
        assert store.keys() == []
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        assert store.keys() == [], "a deleted key came back at restart"


def test_a_metadata_file_whose_expiry_a_hand_edit_made_true_does_not_delete_the_value(tmp_path: Path, capsys) -> None:
    # _read_metadata takes a metadata file it did not write as damaged ("none if it is damaged
    # (written by hand ...), so that its value loads with derived metadata"), checking that
    # expires_at is a number or null. But JSON true passes as an int (bool is one in Python): it
    # loads as an expiry of 1 (1970), and the start removes the value file for good.
    data_dir = tmp_path / "data"
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        store.put("x", b"{}", content_type="application/json", ttl=3600)
    meta = data_dir / ".kvserver" / "meta" / "x"
    records = json.loads(meta.read_bytes())
    for record in records.values():
        record["expires_at"] = True
    meta.write_text(json.dumps(records))
    with kvserver.FileStorage(data_dir, fsync=False) as store:
        assert (data_dir / "x").exists(), "a hand-broken metadata file made the start delete the value"
        assert store.get("x") == b"{}"
