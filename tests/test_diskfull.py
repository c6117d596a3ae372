"""A full disk (SPEC sections 6 and 8): a write that hits ENOSPC is a 507 problem+json, leaves no
partial file, reads go on working, and writes succeed again once there is room.

The data dir lives on a 4 MiB tmpfs the test mounts, so it needs root (CI runs as root).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import KVSERVER, Response, Server, assert_no_traceback, read_http, require_service, wait_for

import kvserver

TMPFS_SIZE = 4 * 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, unmounted at the end."""
    if os.geteuid() != 0:
        require_service("needs root to mount a tmpfs")
    if shutil.which("mount") is None or shutil.which("umount") is None:
        require_service("needs mount and umount to mount a tmpfs")
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(mount_point)],
        capture_output=True,
        timeout=30,
    )
    if mounted.returncode != 0:
        require_service(f"cannot mount a tmpfs: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=30)


@pytest.fixture
def full_server(small_disk, make_server) -> Server:
    """A server whose data dir is on the small tmpfs (stopped before the tmpfs is unmounted)."""
    return make_server(data_dir=small_disk / "data")


def put_raw(server: Server, key: str, size: int) -> Response:
    """PUT `size` bytes on a raw socket, going on to read the answer even if the server stops
    reading the body half way (it answers 507 and closes)."""
    head = f"PUT /kv/{key} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {size}\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        try:
            sock.sendall(head)
            block = b"z" * 65536
            sent = 0
            while sent < size:
                sent += sock.send(block[: size - sent])
        except (BrokenPipeError, ConnectionResetError):
            pass
        return read_http(sock.makefile("rb"))


def free_bytes(path: Path) -> int:
    usage = os.statvfs(path)
    return usage.f_bavail * usage.f_frsize


def value_files(server: Server) -> set[str]:
    return {path.name for path in server.data_dir.iterdir() if not path.name.startswith(".")}


def temporary_files(server: Server) -> list[Path]:
    return list((server.data_dir / ".kvserver" / "tmp").iterdir())


def test_a_put_larger_than_the_free_space_is_507_and_leaves_nothing_behind(full_server):
    server = full_server
    assert server.get("/set?small=hello").status == 201
    assert server.request("PUT", "/kv/typed", body=b"<p>x</p>", headers={"Content-Type": "text/html"}).status == 201
    assert server.get("/set?key=timed&value=soon&ttl=3600").status == 201
    big = bytes(range(256)) * 400  # 100 KiB: read back from its file, not from memory
    assert server.request("PUT", "/kv/big", body=big).status == 201
    free_before = free_bytes(server.data_dir)

    response = put_raw(server, "huge", TMPFS_SIZE + 1024 * 1024)
    assert response.status == 507
    assert response.problem()["detail"]

    assert value_files(server) == {"small", "typed", "timed", "big"}
    wait_for(lambda: not temporary_files(server), timeout=5, what="no temporary file left")
    assert free_bytes(server.data_dir) >= free_before - 64 * 1024, "space is still taken by the failed write"
    # Reads go on working.
    assert server.get("/get?key=small").body == b"hello"
    assert server.get("/kv/typed").headers["Content-Type"] == "text/html"
    assert server.get("/get?key=timed").body == b"soon"
    assert server.get("/kv/big").body == big
    assert server.get("/kv/huge").status == 404
    assert sorted(server.get("/keys").json()["keys"]) == ["big", "small", "timed", "typed"]
    # The failed value never took room, so writes go on too.
    assert server.get("/set?after=ok").status == 201
    assert server.get("/get?key=after").body == b"ok"
    assert server.get("/health").status == 200
    assert_no_traceback(server.stderr())


def test_filling_the_disk_with_set_ends_in_507_and_every_earlier_value_survives(full_server):
    server = full_server
    connection = server.connect()  # one keep-alive connection for the hundreds of requests

    def get(path: str) -> Response:
        return server.get(path, connection=connection)

    big = bytes(range(256)) * 400
    assert server.request("PUT", "/kv/big", body=big).status == 201
    stored: dict[str, bytes] = {}
    failed = None
    for number in range(400):  # 60 KiB each: a 4 MiB disk is full well before that
        key, value = f"fill{number}", f"{number:05d}".encode() * 12_000
        response = get(f"/set?{key}={value.decode()}")
        if response.status == 507:
            failed = key
            assert response.problem()["detail"]
            break
        assert response.status == 201, response
        stored[key] = value
    assert failed is not None, "the disk never filled up"
    assert len(stored) > 10

    # Small values with a TTL need a metadata file too: fill up the last pages with them.
    for number in range(2000):
        response = get(f"/set?key=tiny{number}&value=t&ttl=3600")
        if response.status == 507:
            assert response.problem()["detail"]
            assert get(f"/get?key=tiny{number}").status == 404
            break
        assert response.status == 201, response
        stored[f"tiny{number}"] = b"t"
    else:
        pytest.fail("small writes never failed on a full disk")

    assert get(f"/get?key={failed}").status == 404
    # XML-RPC on a full disk: a Fault that says so, not a dropped connection.
    proxy = xmlrpc.client.ServerProxy(server.url + "/RPC2")
    with pytest.raises(xmlrpc.client.Fault) as fault:
        proxy.save("by-rpc", "r" * 60_000)
    assert "full" in fault.value.faultString.lower() or "space" in fault.value.faultString.lower()
    assert get("/get?key=by-rpc").status == 404
    assert value_files(server) == {"big", *stored}
    wait_for(lambda: not temporary_files(server), timeout=5, what="no temporary file left")
    for key, value in stored.items():
        assert get(f"/get?key={key}").body == value, key
    assert get("/kv/big").body == big
    assert sorted(get("/keys?limit=10000").json()["keys"]) == sorted(["big", *stored])

    # Free some space: writes succeed again.
    assert server.request("DELETE", "/kv/fill0").status == 204
    assert server.request("DELETE", "/kv/fill1").status == 204
    value = "again" * 12_000
    assert get(f"/set?again={value}").status == 201
    assert get("/get?key=again").body == value.encode()
    assert get("/health").status == 200
    assert_no_traceback(server.stderr())

    # And all of it is still there after a restart.
    server.restart()
    connection = server.connect()
    assert get("/get?key=again").body == value.encode()
    assert get(f"/get?key={failed}").status == 404
    assert get("/get?key=fill2").body == stored["fill2"]


def test_an_import_that_fills_the_disk_stops_at_that_line_and_names_it(small_disk, tmp_path):
    """`kvserver import` onto a disk that fills up half way: exit 1, one line naming the line
    that was not stored, every line before it imported whole."""
    value = b"v" * 60_000
    export = tmp_path / "export.ndjson"
    with kvserver.MemoryStorage() as source:
        for number in range(100):  # 6 MB: more than the 4 MiB disk holds
            source.put(f"key{number:03d}", value)
        with open(export, "wb") as file:
            source.export(file)
    with open(export, "rb") as stdin:
        done = subprocess.run(
            [sys.executable, str(KVSERVER), "import", "--data-dir", str(small_disk / "data")],
            stdin=stdin,
            capture_output=True,
            timeout=120,
        )
    assert done.returncode == 1
    message = done.stderr.decode().splitlines()[-1]
    stopped = re.fullmatch(r"kvserver: import stopped: line ([0-9]+) could not be stored: the disk is full .*", message)
    assert stopped, message
    assert "the lines before it were imported" in message
    with kvserver.FileStorage(small_disk / "data") as imported:
        assert list(imported) == [f"key{number:03d}" for number in range(int(stopped[1]) - 1)]
        assert all(imported.get(key) == value for key in imported)
