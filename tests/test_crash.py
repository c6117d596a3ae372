"""kill -9 during concurrent writes (SPEC section 7): every acknowledged write survives, whole,
with its metadata, and no temporary file is left.

The server runs as a subprocess with files storage, with fsync and with --no-fsync (a kill
loses nothing the kernel has: only a power loss may lose the last writes). Client threads write
distinctive values, each naming its key and sequence number and ending in a checksum, by
/set and by PUT /kv/, small and large, with and without a Content-Type and a TTL. After a
bounded number of acknowledged writes the server is killed with SIGKILL, restarted on the
same data dir, and every key is checked. Three rounds.
"""

from __future__ import annotations

import hashlib
import http.client
import random
import re
import signal
import threading
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import wait_for

WRITERS = 6
KEYS_PER_WRITER = 5
ROUNDS = 3
TEXT = "text/plain; charset=utf-8"
PUT_TYPES = ["application/octet-stream", "application/x-crash-test", "text/html; charset=utf-8", "image/png"]
LARGE = 64 * 1024


def make_value(key: str, seq: int, size: int, rng: random.Random, text: bool) -> bytes:
    """A value that says which write it is and carries a checksum of itself."""
    head = f"{key}|{seq}|".encode()
    filler = bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz0123456789 ", k=size)) if text else rng.randbytes(size)
    body = head + filler
    return body + b"#" + hashlib.sha256(body).hexdigest().encode()


def parse_value(value: bytes) -> tuple[str, int]:
    """The key and sequence number a value was written with; AssertionError if it is torn."""
    body, hash_mark, checksum = value.rpartition(b"#")
    assert hash_mark, f"no checksum in a value of {len(value)} bytes: {value[:80]!r}"
    assert hashlib.sha256(body).hexdigest().encode() == checksum, f"torn value: {value[:80]!r}"
    key, seq, _ = body.decode("utf-8", "surrogateescape").split("|", 2)
    return key, int(seq)


@dataclass
class Ledger:
    """What the writers tried and what the server acknowledged, shared by all rounds."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    next_seq: dict[str, int] = field(default_factory=dict)
    attempts: dict[tuple[str, int], str] = field(default_factory=dict)  # (key, seq) -> media type
    acked: dict[str, int] = field(default_factory=dict)  # key -> highest acknowledged seq
    acked_count: int = 0
    cut_off: int = 0  # writes that failed because the server died under them


def writer(server, keys: list[str], ledger: Ledger, rng: random.Random, stop: threading.Event) -> None:
    connection = http.client.HTTPConnection(server.host, server.port, timeout=10)
    try:
        while not stop.is_set():
            key = rng.choice(keys)
            with ledger.lock:
                seq = ledger.next_seq.get(key, 0) + 1
                ledger.next_seq[key] = seq
            kind = rng.choice(["set-form", "set-form-ttl", "set-pair", "put", "put-ttl", "put-large"])
            quoted_key = urllib.parse.quote(key, safe="")
            if kind.startswith("set"):
                value = make_value(key, seq, rng.randrange(0, 3000), rng, text=True)
                content_type = TEXT
                quoted_value = urllib.parse.quote(value, safe="")
                if kind == "set-pair":
                    method, path = "GET", f"/set?{quoted_key}={quoted_value}"
                else:
                    method, path = "GET", f"/set?key={quoted_key}&value={quoted_value}"
                    if kind == "set-form-ttl":
                        path += "&ttl=3600"
                body, headers = None, {}
            else:
                size = rng.randrange(LARGE + 1, 4 * LARGE) if kind == "put-large" else rng.randrange(0, 2000)
                value = make_value(key, seq, size, rng, text=rng.random() < 0.5)
                content_type = rng.choice(PUT_TYPES)
                method, path = "PUT", f"/kv/{quoted_key}" + ("?ttl=3600" if kind == "put-ttl" else "")
                body, headers = value, {"Content-Type": content_type}
            with ledger.lock:
                ledger.attempts[key, seq] = content_type
            try:
                connection.request(method, path, body=body, headers=headers)
                response = connection.getresponse()
                response.read()
            except (OSError, http.client.HTTPException):
                with ledger.lock:
                    ledger.cut_off += 1
                return  # the server is gone
            assert response.status in (200, 201), (response.status, method, path[:100])
            with ledger.lock:
                ledger.acked[key] = max(ledger.acked.get(key, 0), seq)
                ledger.acked_count += 1
    finally:
        connection.close()


def check_after_restart(server, data_dir: Path, ledger: Ledger) -> set[str]:
    """Check every key the restarted server holds against the ledger; return the keys."""
    connection = server.connect()
    listing = server.get("/keys?limit=10000", connection=connection)
    assert listing.status == 200
    listed = set(listing.json()["keys"])
    attempted = {key for key, _ in ledger.attempts}
    assert listed <= attempted, listed - attempted
    assert set(ledger.acked) <= listed, f"acknowledged keys lost: {set(ledger.acked) - listed}"
    for key in sorted(listed):
        response = server.get(f"/kv/{urllib.parse.quote(key, safe='')}", connection=connection)
        assert response.status == 200, (key, response.status)
        value_key, seq = parse_value(response.body)
        assert value_key == key, f"the value of {key!r} was written for {value_key!r}"
        assert (key, seq) in ledger.attempts, f"{key!r} holds seq {seq}, never written"
        assert seq >= ledger.acked.get(key, 0), (
            f"{key!r} holds seq {seq}, older than the acknowledged seq {ledger.acked[key]}"
        )
        assert response.headers["Content-Type"] == ledger.attempts[key, seq], (key, seq)
        assert int(response.headers["Content-Length"]) == len(response.body)
        if "/" not in key and " " not in key:  # a plain key: its file holds exactly the value
            assert (data_dir / key).read_bytes() == response.body
    # No temporary files; every metadata file belongs to a value file.
    assert list((data_dir / ".kvserver" / "tmp").iterdir()) == []
    value_files = {path.name for path in data_dir.iterdir() if not path.name.startswith(".")}
    assert len(value_files) == len(listed)
    assert {path.name for path in (data_dir / ".kvserver" / "meta").iterdir()} <= value_files
    return listed


@pytest.mark.parametrize("options", [(), ("--no-fsync",)], ids=["fsync", "no-fsync"])
def test_acknowledged_writes_survive_kill_9_whole_and_with_their_metadata(make_server, tmp_path, options):
    data_dir = tmp_path / "data"
    ledger = Ledger()
    rng = random.Random(20240607)
    keys = [
        [f"w{number}-key{index}" for index in range(KEYS_PER_WRITER - 2)]
        + [f"w{number}/odd key ключ {index}" for index in range(2)]
        for number in range(WRITERS)
    ]
    server = make_server("--quiet", *options, data_dir=data_dir)
    for round_number in range(ROUNDS):
        stop = threading.Event()
        threads = [
            threading.Thread(
                target=writer, args=(server, keys[number], ledger, random.Random(rng.random()), stop), daemon=True
            )
            for number in range(WRITERS)
        ]
        target = ledger.acked_count + rng.randrange(60, 120)
        for thread in threads:
            thread.start()
        wait_for(
            lambda target=target, threads=threads: (
                ledger.acked_count >= target or not any(thread.is_alive() for thread in threads)
            ),
            timeout=40,
            interval=0.001,
            what=f"{target} acknowledged writes",
        )
        assert all(thread.is_alive() for thread in threads), "a writer stopped before the kill"
        assert server.stop(signal.SIGKILL) == -signal.SIGKILL
        stop.set()
        for thread in threads:
            thread.join(15)
        assert not any(thread.is_alive() for thread in threads), "a writer hung after the kill"

        server = make_server("--quiet", *options, data_dir=data_dir)
        listed = check_after_restart(server, data_dir, ledger)
        assert re.search(rf"\b{len(listed)} keys loaded", server.start_line), server.start_line
        assert ledger.acked_count >= target, f"round {round_number}: only {ledger.acked_count} writes acknowledged"
    assert ledger.cut_off >= 1, "no write was in flight at any kill"
    assert server.stop() == 0
