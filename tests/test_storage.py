"""The storage contract of SPEC sections 2 and 7, one test class run against every backend.

Modelled on simplekv's tests/basic_store.py: `StorageContract` holds every test and each
backend is a short subclass that supplies the `store` fixture.
"""

from __future__ import annotations

import array
import io
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import race_compare_and_set, race_create_only, wait_for

import kvserver

GOOD_KEYS = {
    "plain": "greeting",
    "unicode": "schlüssel-ключ-鍵-🔑",
    "spaces": "a key with spaces",
    "slash": "a/b/c",
    "leading-slash": "/etc/passwd",
    "dotdot": "..",
    "dotdot-path": "../x",
    "dot": ".",
    "percent": "100%25 %zz %",
    "hidden": ".hidden",
    "tilde": "~user",
    "ascii-1024": "k" * 1024,
    "multibyte-1024": "é" * 512,
}

BAD_KEYS = {
    "empty": "",
    "1025-bytes": "k" * 1025,
    "1025-bytes-multibyte": "é" * 512 + "k",
    "nul": "a\x00b",
    "unit-separator": "a\x1fb",
    "newline": "a\nb",
    "delete-char": "a\x7fb",
    "lone-surrogate": "a\ud800b",
    "noncharacter-fffe": "a\ufffeb",
    "noncharacter-ffff": "\uffff",
    "bytes": b"key",
    "int": 1,
    "none": None,
}

VALUES = {
    "empty": b"",
    "text": b"hello",
    "binary": bytes(range(256)) * 4,
    "large": bytes(range(251)) * 400,  # about 98 KiB: over FileStorage's 64 KiB in-memory limit
}

# Every public method that takes a key, called with that key.
KEY_TAKERS = {
    "put": lambda store, key, tmp: store.put(key, b"v"),
    "get": lambda store, key, tmp: store.get(key),
    "delete": lambda store, key, tmp: store.delete(key),
    "stat": lambda store, key, tmp: store.stat(key),
    "open": lambda store, key, tmp: store.open(key),
    "put_file-path": lambda store, key, tmp: store.put_file(key, str(tmp)),
    "put_file-object": lambda store, key, tmp: store.put_file(key, io.BytesIO(b"v")),
    "get_file-path": lambda store, key, tmp: store.get_file(key, str(tmp.parent / "out")),
    "get_file-object": lambda store, key, tmp: store.get_file(key, io.BytesIO()),
    "write": lambda store, key, tmp: store.write(key, b"v"),
    "remove": lambda store, key, tmp: store.remove(key),
    "fetch": lambda store, key, tmp: store.fetch(key),
}

TTL_DEADLINE = 5.0  # seconds a ttl=1 value may take to disappear


@pytest.fixture(params=list(GOOD_KEYS.values()), ids=list(GOOD_KEYS))
def key(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=list(BAD_KEYS.values()), ids=list(BAD_KEYS))
def bad_key(request: pytest.FixtureRequest) -> object:
    return request.param


@pytest.fixture(params=list(VALUES.values()), ids=list(VALUES))
def value(request: pytest.FixtureRequest) -> bytes:
    return request.param


@pytest.fixture
def source_file(tmp_path: Path) -> Path:
    path = tmp_path / "source.bin"
    path.write_bytes(b"v")
    return path


class StorageContract:
    """What every storage promises; subclasses supply `store`."""

    @pytest.fixture
    def store(self) -> Iterator[kvserver.Storage]:
        raise NotImplementedError

    # Keys

    def test_put_returns_the_key_and_get_gives_the_bytes_back(self, store, key, value):
        assert store.put(key, value) == key
        assert store.get(key) == value

    def test_a_missing_key_is_a_key_error_from_get_stat_open_and_fetch(self, store, key):
        with pytest.raises(KeyError):
            store.get(key)
        with pytest.raises(KeyError):
            store.stat(key)
        with pytest.raises(KeyError):
            store.open(key)
        with pytest.raises(KeyError):
            store.fetch(key)
        with pytest.raises(KeyError):
            store.get_file(key, io.BytesIO())

    @pytest.mark.parametrize("method", list(KEY_TAKERS.values()), ids=list(KEY_TAKERS))
    def test_an_invalid_key_is_a_value_error_everywhere_a_key_is_taken(self, store, bad_key, method, source_file):
        store.put("other", b"untouched")
        with pytest.raises(ValueError):
            method(store, bad_key, source_file)
        assert store.keys() == ["other"]
        assert store.get("other") == b"untouched"

    def test_membership_of_an_invalid_key_raises_value_error(self, store, bad_key):
        with pytest.raises(ValueError):
            bad_key in store  # noqa: B015

    def test_delete_removes_the_key(self, store, key):
        store.put(key, b"v")
        store.delete(key)
        assert key not in store
        with pytest.raises(KeyError):
            store.get(key)
        assert store.keys() == []

    def test_delete_of_an_absent_key_is_silent(self, store, key):
        assert store.delete(key) is None
        store.put(key, b"v")
        store.delete(key)
        assert store.delete(key) is None

    def test_remove_says_whether_there_was_a_value(self, store, key):
        assert store.remove(key) is False
        store.put(key, b"v")
        assert store.remove(key) is True
        assert store.remove(key) is False

    def test_put_replaces_the_value(self, store, key):
        store.put(key, b"first")
        store.put(key, b"second")
        assert store.get(key) == b"second"
        assert store.stat(key).size == 6
        assert list(store) == [key]

    def test_write_says_whether_the_key_is_new(self, store, key):
        stat, created = store.write(key, b"one")
        assert created is True
        assert stat == store.stat(key)
        stat, created = store.write(key, b"two")
        assert created is False
        assert stat == store.stat(key)

    def test_in_iter_keys_and_len_see_every_key(self, store):
        keys = list(GOOD_KEYS.values())
        for index, key in enumerate(keys):
            store.put(key, str(index).encode())
        assert all(key in store for key in keys)
        assert "absent" not in store
        assert len(store) == len(keys)
        assert list(store) == sorted(keys)
        assert store.keys() == sorted(keys)
        assert list(store.iter_keys()) == sorted(keys)
        for index, key in enumerate(keys):
            assert store.get(key) == str(index).encode()

    def test_keys_are_in_code_point_order(self, store):
        keys = ["b", "a", "B", "é", "aa", "a b", "z", "ä", "\U0001f511", "\ufffd", "10", "9", "~", "_"]
        for key in keys:
            store.put(key, b"")
        # Code-point order, not UTF-16 or locale order: U+FFFD comes before U+1F511.
        expected = ["10", "9", "B", "_", "a", "a b", "aa", "b", "z", "~", "ä", "é", "\ufffd", "\U0001f511"]
        assert store.keys() == expected
        assert list(store) == expected

    def test_keys_with_a_prefix_lists_only_the_keys_that_start_with_it(self, store):
        for key in ["user/1", "user/2", "user", "users", "group/1", "us", "üser/1"]:
            store.put(key, b"")
        assert store.keys(prefix="user/") == ["user/1", "user/2"]
        assert store.keys("user") == ["user", "user/1", "user/2", "users"]
        assert store.keys("ü") == ["üser/1"]
        assert store.keys("nothing") == []
        assert list(store.iter_keys("group")) == ["group/1"]
        assert store.keys("") == store.keys()

    # Streams and files

    def test_open_reads_the_value(self, store, key, value):
        store.put(key, value)
        with store.open(key) as file:
            assert file.read() == value

    def test_an_open_value_keeps_its_bytes_when_the_key_is_rewritten(self, store):
        large = b"a" * 200_000
        store.put("k", large)
        with store.open("k") as file:
            head = file.read(10)
            store.put("k", b"b" * 200_000)
            assert head + file.read() == large
        assert store.get("k") == b"b" * 200_000

    def test_put_file_with_a_path_stores_the_file(self, store, key, value, tmp_path):
        path = tmp_path / "in.bin"
        path.write_bytes(value)
        assert store.put_file(key, str(path)) == key
        assert store.get(key) == value
        store.delete(key)
        assert store.put_file(key, path) == key  # os.PathLike too
        assert store.get(key) == value

    def test_put_file_with_a_file_object_stores_what_it_reads(self, store, key, value):
        assert store.put_file(key, io.BytesIO(value)) == key
        assert store.get(key) == value
        assert store.stat(key).size == len(value)

    def test_get_file_with_a_path_writes_the_value_into_it(self, store, key, value, tmp_path):
        store.put(key, value)
        path = tmp_path / "out.bin"
        path.write_bytes(b"old content that must be replaced " * 10_000)
        assert store.get_file(key, str(path)) == key
        assert path.read_bytes() == value

    def test_get_file_with_a_file_object_writes_the_value_into_it(self, store, key, value):
        store.put(key, value)
        target = io.BytesIO()
        assert store.get_file(key, target) == key
        assert target.getvalue() == value

    def test_write_takes_an_iterable_of_chunks(self, store):
        chunks = [b"a" * 40_000, b"b" * 40_000, b"", b"c"]
        stat, _ = store.write("k", iter(chunks))
        assert stat.size == 80_001
        assert store.get("k") == b"".join(chunks)

    def test_write_takes_chunks_that_are_views_of_one_reused_buffer(self, store):
        buffer = bytearray(100_000)

        def pieces():
            for letter in b"abc":
                buffer[:] = bytes([letter]) * len(buffer)
                yield memoryview(buffer)

        stat, _ = store.write("k", pieces())
        assert stat.size == 300_000
        assert store.get("k") == b"a" * 100_000 + b"b" * 100_000 + b"c" * 100_000

    def test_a_value_larger_than_the_read_buffer_is_stored_whole_from_a_file_object(self, store):
        value = os.urandom(kvserver.BUFFER * 2 + 12345)
        store.put_file("k", io.BytesIO(value))
        assert store.get("k") == value
        assert store.stat("k").size == len(value)

    def test_write_takes_an_object_that_only_reads_into_a_buffer_in_small_bites(self, store):
        class Trickle:
            """Fills at most 1,000 bytes per call, as a socket may."""

            def __init__(self, data: bytes) -> None:
                self.data = data

            def readinto(self, buffer: memoryview) -> int:
                count = min(len(buffer), 1000, len(self.data))
                buffer[:count] = self.data[:count]
                self.data = self.data[count:]
                return count

        value = os.urandom(70_000)
        stat, created = store.write("k", Trickle(value), content_type="x/y")
        assert (stat.size, created) == (70_000, True)
        assert store.get("k") == value

    def test_a_memoryview_of_wider_items_is_stored_as_its_bytes(self, store):
        numbers = array.array("i", range(1000))
        store.put("k", memoryview(numbers))
        assert store.get("k") == numbers.tobytes()
        assert store.stat("k").size == len(numbers.tobytes())

    def test_a_source_that_fails_half_way_stores_nothing(self, store):
        store.put("k", b"old")

        def cut_off():
            yield b"x" * 100_000
            raise ConnectionResetError("client went away")

        with pytest.raises(ConnectionResetError):
            store.write("k", cut_off())
        with pytest.raises(ConnectionResetError):
            store.write("new", cut_off())
        assert store.get("k") == b"old"
        assert store.keys() == ["k"]

    def test_a_value_that_is_not_bytes_is_a_value_error(self, store):
        with pytest.raises(ValueError):
            store.put("k", "text")
        with pytest.raises(ValueError):
            store.put("k", None)
        assert "k" not in store

    # Media type

    def test_the_media_type_defaults_to_octet_stream(self, store, key):
        store.put(key, b"plain text")
        assert store.stat(key).content_type == "application/octet-stream"
        store.put_file(key, io.BytesIO(b"more text"))
        assert store.stat(key).content_type == "application/octet-stream"

    def test_an_explicit_media_type_is_kept(self, store, key):
        store.put(key, b"<p>hi</p>", content_type="text/html; charset=utf-8")
        assert store.stat(key).content_type == "text/html; charset=utf-8"
        store.put_file(key, io.BytesIO(b"{}"), content_type="application/json")
        assert store.stat(key).content_type == "application/json"
        assert store.fetch(key)[0].content_type == "application/json"

    def test_a_media_type_of_max_media_type_characters_is_kept(self, store):
        content_type = "text/plain; x=" + "y" * (kvserver.MAX_MEDIA_TYPE - 14)
        store.put("k", b"v", content_type=content_type)
        assert store.stat("k").content_type == content_type

    @pytest.mark.parametrize(
        "content_type",
        ["", " text/html", "text/html ", "\ttext/html", "text/html\xa0", "tëxt/plain", None, "t/x" * 342],
    )
    def test_a_media_type_that_cannot_be_sent_back_as_a_content_type_is_a_value_error(self, store, content_type):
        store.put("k", b"untouched", content_type="text/plain")
        with pytest.raises(ValueError, match="media type"):
            store.put("k", b"new", content_type=content_type)
        assert (store.get("k"), store.stat("k").content_type) == (b"untouched", "text/plain")

    # Stat

    def test_stat_gives_size_media_type_etag_and_expiry(self, store, key, value):
        store.put(key, value, content_type="image/png")
        stat = store.stat(key)
        assert isinstance(stat, kvserver.Stat)
        assert stat.size == len(value)
        assert stat.content_type == "image/png"
        assert isinstance(stat.etag, str) and stat.etag
        assert '"' not in stat.etag
        assert stat.expires_at is None

    def test_stat_gives_the_expiry_of_a_value_with_a_ttl(self, store):
        before = time.time()
        store.put("k", b"v", ttl=60)
        after = time.time()
        expires_at = store.stat("k").expires_at
        assert expires_at is not None
        assert before + 60 <= expires_at <= after + 60

    def test_fetch_gives_the_stat_and_the_bytes_of_one_version(self, store, value):
        store.put("k", value, content_type="x/y")
        stat, body = store.fetch("k")
        with body:  # a binary file, whatever the value's size
            assert body.read() == value
        assert stat == store.stat("k")

    # TTL

    def test_a_value_with_a_ttl_disappears_everywhere_once_it_passes(self, store):
        keys = list(GOOD_KEYS.values())
        for key in keys:
            store.put(key, b"short-lived", ttl=1)
        store.put("forever", b"stays")
        assert all(key in store for key in keys)
        assert store.get(keys[0]) == b"short-lived"
        wait_for(lambda: store.keys() == ["forever"], timeout=TTL_DEADLINE, interval=0.05, what="ttl=1 keys to expire")
        for key in keys:
            assert key not in store
            with pytest.raises(KeyError):
                store.get(key)
            with pytest.raises(KeyError):
                store.stat(key)
            with pytest.raises(KeyError):
                store.open(key)
        assert list(store) == ["forever"]
        assert len(store) == 1
        assert store.get("forever") == b"stays"

    def test_len_and_in_drop_an_expired_key_before_any_listing(self, store):
        store.put("k", b"v", ttl=1)
        store.put("forever", b"stays")
        assert len(store) == 2
        wait_for(lambda: len(store) == 1, timeout=TTL_DEADLINE, interval=0.05, what="len to drop the expired key")
        assert "k" not in store
        with pytest.raises(KeyError):
            store.get("k")

    def test_an_expired_key_can_be_written_again_as_new(self, store):
        store.put("k", b"old", ttl=1)
        wait_for(lambda: store.keys() == [], timeout=TTL_DEADLINE, interval=0.05, what="the ttl=1 key to expire")
        stat, created = store.write("k", b"new")
        assert created is True
        assert store.get("k") == b"new"
        assert stat.expires_at is None

    def test_listing_and_counting_leave_out_an_expired_key_and_a_sweep_removes_it(self, store):
        store.put("k", b"old", ttl=1)
        store.put("forever", b"stays")
        wait_for(lambda: "k" not in store, timeout=TTL_DEADLINE, interval=0.05, what="the key to expire")
        assert store.keys() == ["forever"]
        assert store.totals() == (1, 5)
        assert store.sweep() in (0, 1)  # 0: the backend (Redis) removed it itself
        assert store.sweep() == 0
        assert store.keys() == ["forever"]
        assert store.totals() == (1, 5)

    def test_a_sweep_never_removes_a_value_written_after_the_old_one_expired(self, store):
        store.put("k", b"old", ttl=1)
        wait_for(lambda: len(store) == 0, timeout=TTL_DEADLINE, interval=0.05, what="the key to expire")
        store.put("k", b"fresh")  # after the count saw the old value expire
        assert store.sweep() == 0
        assert store.get("k") == b"fresh"
        assert store.keys() == ["k"]
        assert store.totals() == (1, 5)

    def test_sweeping_while_expired_keys_are_written_again_keeps_every_new_value(self, store):
        keys = [f"k{number}" for number in range(40)]
        for key in keys:
            store.put(key, b"old", ttl=1)
        wait_for(lambda: len(store) == 0, timeout=TTL_DEADLINE, interval=0.05, what="the keys to expire")
        stop = threading.Event()

        def sweep_all_the_time() -> None:
            while not stop.is_set():
                store.sweep()

        sweeper = threading.Thread(target=sweep_all_the_time)
        sweeper.start()
        try:
            for key in keys:
                store.put(key, b"new " + key.encode())
        finally:
            stop.set()
            sweeper.join(60)
        store.sweep()
        assert {key: store.get(key) for key in store} == {key: b"new " + key.encode() for key in keys}
        assert store.totals() == (len(keys), sum(len(b"new " + key.encode()) for key in keys))

    @pytest.mark.parametrize("ttl", [0, -1, 1.5, True, False, "60", 60.0])
    def test_a_ttl_that_is_not_a_positive_whole_number_is_a_value_error(self, store, ttl):
        store.put("k", b"old")
        with pytest.raises(ValueError):
            store.put("k", b"new", ttl=ttl)
        with pytest.raises(ValueError):
            store.put_file("other", io.BytesIO(b"new"), ttl=ttl)
        assert store.get("k") == b"old"
        assert store.stat("k").expires_at is None
        assert store.keys() == ["k"]

    def test_a_write_without_a_ttl_clears_an_earlier_ttl(self, store):
        store.put("k", b"v", ttl=1)
        store.put("k", b"v")
        store.put("sentinel", b"s", ttl=1)  # written later, so it expires no earlier than the first TTL
        assert store.stat("k").expires_at is None
        wait_for(lambda: "sentinel" not in store, timeout=TTL_DEADLINE, interval=0.05, what="the sentinel to expire")
        assert store.get("k") == b"v"
        assert store.keys() == ["k"]

    def test_a_write_with_a_ttl_replaces_the_old_ttl(self, store):
        store.put("k", b"v", ttl=3600)
        store.put("k", b"w", ttl=1)
        wait_for(lambda: "k" not in store, timeout=TTL_DEADLINE, interval=0.05, what="the new ttl to apply")

    # ETag

    def test_the_etag_changes_on_every_write(self, store, key):
        writes = [
            lambda: store.put(key, b"one"),
            lambda: store.put(key, b"two"),
            lambda: store.put(key, b"two"),  # the same bytes again
            lambda: store.put(key, b"two", content_type="text/plain"),  # only the media type changed
            lambda: store.put_file(key, io.BytesIO(b"two"), content_type="text/plain"),
            lambda: store.put(key, b"two", content_type="text/plain", ttl=60),  # only the TTL changed
            lambda: store.delete(key) or store.put(key, b"one"),
        ]
        etags = []
        for write in writes:
            write()
            etags.append(store.stat(key).etag)
        assert len(set(etags)) == len(etags), etags

    def test_the_etag_stays_the_same_while_nothing_is_written(self, store, key):
        stat, _ = store.write(key, b"v" * 100_000)
        assert store.stat(key).etag == stat.etag
        store.put("other", b"x")
        store.get(key)
        assert store.stat(key).etag == stat.etag

    def test_same_bytes_under_two_keys_have_distinct_etags(self, store):
        store.put("a", b"same")
        store.put("b", b"same")
        assert store.stat("a").etag != store.stat("b").etag

    # Compare-and-set

    def test_check_precondition_says_before_a_write_what_the_write_would_find(self, store):
        store.check_precondition("k")
        store.check_precondition("k", if_none_match=True)
        with pytest.raises(kvserver.PreconditionFailed):
            store.check_precondition("k", if_match="*")
        etag = store.write("k", b"v")[0].etag
        store.check_precondition("k", if_match=etag)
        store.check_precondition("k", if_match="*")
        with pytest.raises(kvserver.PreconditionFailed):
            store.check_precondition("k", if_none_match=True)
        with pytest.raises(kvserver.PreconditionFailed):
            store.check_precondition("k", if_match="1-1")
        with pytest.raises(ValueError):
            store.check_precondition("", if_match="*")
        assert store.get("k") == b"v"

    def test_if_match_with_the_current_etag_writes(self, store, key):
        store.put(key, b"one")
        etag = store.stat(key).etag
        assert store.put(key, b"two", if_match=etag) == key
        assert store.get(key) == b"two"
        assert store.stat(key).etag != etag

    def test_if_match_with_a_stale_etag_fails_and_changes_nothing(self, store, key):
        store.put(key, b"one")
        stale = store.stat(key).etag
        store.put(key, b"two", content_type="text/x")
        current = store.stat(key)
        with pytest.raises(kvserver.PreconditionFailed):
            store.put(key, b"three", if_match=stale)
        with pytest.raises(kvserver.PreconditionFailed):
            store.put(key, b"three", if_match="not-an-etag")
        with pytest.raises(kvserver.PreconditionFailed):
            store.put_file(key, io.BytesIO(b"three" * 30_000), if_match=stale)
        assert store.get(key) == b"two"
        assert store.stat(key) == current

    def test_if_match_star_needs_some_value(self, store):
        with pytest.raises(kvserver.PreconditionFailed):
            store.put("k", b"v", if_match="*")
        store.put("k", b"v")
        store.put("k", b"w", if_match="*")
        assert store.get("k") == b"w"

    def test_if_match_on_an_absent_key_fails(self, store, key):
        store.put(key, b"one")
        etag = store.stat(key).etag
        store.delete(key)
        with pytest.raises(kvserver.PreconditionFailed):
            store.put(key, b"two", if_match=etag)
        assert key not in store
        assert store.keys() == []

    def test_if_none_match_fails_when_the_key_is_present(self, store, key):
        store.put(key, b"one", content_type="text/a")
        before = store.stat(key)
        with pytest.raises(kvserver.PreconditionFailed):
            store.put(key, b"two", if_none_match=True)
        assert store.get(key) == b"one"
        assert store.stat(key) == before

    def test_if_none_match_writes_when_the_key_is_absent(self, store, key):
        assert store.put(key, b"one", if_none_match=True) == key
        assert store.get(key) == b"one"

    def test_if_none_match_writes_when_the_key_has_expired(self, store):
        store.put("k", b"old", ttl=1)
        wait_for(lambda: "k" not in store, timeout=TTL_DEADLINE, interval=0.05, what="the ttl=1 key to expire")
        store.put("k", b"new", if_none_match=True)
        assert store.get("k") == b"new"

    def test_delete_with_the_current_etag_removes_the_key(self, store, key):
        store.put(key, b"one")
        store.delete(key, if_match=store.stat(key).etag)
        assert key not in store

    def test_delete_with_a_stale_etag_fails_and_keeps_the_value(self, store, key):
        store.put(key, b"one")
        stale = store.stat(key).etag
        store.put(key, b"two")
        with pytest.raises(kvserver.PreconditionFailed):
            store.delete(key, if_match=stale)
        with pytest.raises(kvserver.PreconditionFailed):
            store.remove(key, if_match=stale)
        assert store.get(key) == b"two"

    def test_delete_with_if_match_on_an_absent_key_fails(self, store):
        with pytest.raises(kvserver.PreconditionFailed):
            store.delete("absent", if_match="1-1")

    def test_concurrent_compare_and_set_lets_exactly_one_writer_win_each_round(self, store):
        race_compare_and_set([store] * 16, rounds=12)

    def test_concurrent_if_none_match_creates_the_key_once(self, store):
        race_create_only([store] * 16)

    # repr and close

    def test_repr_rebuilds_the_store(self, store):
        text = repr(store)
        assert type(store).__name__ in text
        store.close()  # a FileStorage holds its data dir until it is closed
        with eval(text, vars(kvserver)) as rebuilt:
            assert type(rebuilt) is type(store)
            assert repr(rebuilt) == text

    def test_the_store_is_a_context_manager_that_closes_it(self, store):
        with store as entered:
            assert entered is store
            store.put("k", b"v")
        self.assert_closed(store)

    def test_keys_pages_in_order_with_after_and_limit(self, store):
        names = [f"k{i:02d}" for i in range(25)] + ["other"]
        for name in names:
            store.put(name, b"v")
        pages, after = [], None
        while page := store.keys("k", after=after, limit=10):
            pages.append(page)
            after = page[-1]
        assert [len(page) for page in pages] == [10, 10, 5]
        assert [key for page in pages for key in page] == sorted(name for name in names if name.startswith("k"))
        assert store.keys(after="k24") == ["other"]
        assert store.keys(after="k055", limit=2) == ["k06", "k07"]  # after need not exist

    @pytest.mark.parametrize(
        "arguments",
        [
            {"limit": 0},
            {"limit": -1},
            {"limit": True},
            {"after": 5},
            {"prefix": "\ud800"},  # a lone surrogate, which no key holds (every backend alike)
            {"after": "a\udfff"},
            {"delimiter": "\ud800"},
        ],
    )
    def test_keys_with_a_bad_after_or_limit_is_a_value_error(self, store, arguments):
        with pytest.raises(ValueError):
            store.keys(**arguments)

    def test_the_listing_follows_every_key_that_comes_and_goes(self, store):
        expected: set[str] = set()
        for step in range(60):
            key = f"key{step * 7 % 23}"
            if key in expected:
                store.delete(key)
                expected.discard(key)
            else:
                store.put(key, b"v")
                expected.add(key)
            assert store.keys() == sorted(expected)
            assert store.keys("key1") == sorted(k for k in expected if k.startswith("key1"))

    def test_listing_while_other_threads_add_and_remove_keys_ends_with_exactly_the_live_keys(self, store):
        stop = threading.Event()
        errors: list[BaseException] = []

        def churn(thread: int) -> None:
            try:
                for step in range(150):
                    store.put(f"t{thread}-{step}", b"v")
                    if step % 3:
                        store.delete(f"t{thread}-{step - 1}")
            except BaseException as error:
                errors.append(error)

        def list_all_the_time() -> None:
            while not stop.is_set():
                store.keys()

        lister = threading.Thread(target=list_all_the_time)
        lister.start()
        writers = [threading.Thread(target=churn, args=(thread,)) for thread in range(4)]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join(60)
        stop.set()
        lister.join(60)
        assert not errors
        expected = {f"t{t}-{s}" for t in range(4) for s in range(150)} - {
            f"t{t}-{s - 1}" for t in range(4) for s in range(150) if s % 3
        }
        assert store.keys() == sorted(expected)
        assert len(store) == len(expected)

    @pytest.mark.parametrize(
        "use",
        [
            lambda store: store.get("k"),
            lambda store: store.put("k", b"w"),
            lambda store: store.put_file("k", io.BytesIO(b"w")),
            lambda store: store.delete("k"),
            lambda store: store.stat("k"),
            lambda store: store.keys(),
            lambda store: len(store),
            lambda store: "k" in store,
            lambda store: store.sweep(),
            lambda store: store.__enter__(),  # a `with` block, as a closed file refuses one
        ],
        ids=["get", "put", "put_file", "delete", "stat", "keys", "len", "in", "sweep", "with"],
    )
    def test_a_closed_store_refuses_to_be_used_with_value_error(self, store, use):
        store.put("k", b"v")
        store.close()
        with pytest.raises(ValueError, match="closed"):
            use(store)

    def assert_closed(self, store: kvserver.Storage) -> None:
        """Backends with something to release check here that it was."""


class TestMemoryStorage(StorageContract):
    @pytest.fixture
    def store(self) -> Iterator[kvserver.Storage]:
        with kvserver.MemoryStorage() as store:
            yield store


class FileStorageContract(StorageContract):
    """The contract, plus what a FileStorage promises across a reopen."""

    fsync = False

    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[kvserver.Storage]:
        with kvserver.FileStorage(tmp_path / "data", fsync=self.fsync) as store:
            yield store

    @staticmethod
    def reopen(store: kvserver.FileStorage) -> kvserver.FileStorage:
        store.close()
        return kvserver.FileStorage(store.path, fsync=store.fsync)

    def assert_closed(self, store: kvserver.Storage) -> None:
        assert isinstance(store, kvserver.FileStorage)
        with kvserver.FileStorage(store.path) as again:  # the lock is free
            assert again.get("k") == b"v"

    def test_repr_names_the_path_and_the_fsync_setting(self, store, tmp_path):
        assert repr(store) == f"FileStorage({str(tmp_path / 'data')!r}, fsync={self.fsync!r})"

    def test_the_rebuilt_store_holds_the_same_values(self, store):
        store.put("k", b"v", content_type="text/x")
        store.close()
        with eval(repr(store), vars(kvserver)) as rebuilt:
            assert rebuilt.get("k") == b"v"
            assert rebuilt.stat("k").content_type == "text/x"
            assert rebuilt.fsync is self.fsync

    def test_values_and_their_etags_survive_a_reopen(self, store, key, value):
        store.put(key, value, content_type="application/x-thing")
        store.put("text", b"plain text", content_type="text/plain; charset=utf-8")
        before = {name: store.stat(name) for name in store}
        with self.reopen(store) as reopened:
            assert reopened.get(key) == value
            assert reopened.get("text") == b"plain text"
            assert {name: reopened.stat(name) for name in reopened} == before

    def test_an_etag_read_before_a_reopen_still_works_for_compare_and_set(self, store, key):
        store.put(key, b"one")
        etag = store.stat(key).etag
        with self.reopen(store) as reopened:
            reopened.put(key, b"two", if_match=etag)
            assert reopened.get(key) == b"two"
            with pytest.raises(kvserver.PreconditionFailed):
                reopened.put(key, b"three", if_match=etag)

    def test_etags_made_after_a_reopen_are_new(self, store):
        store.put("k", b"same")
        seen = {store.stat("k").etag}
        for _ in range(3):
            store = self.reopen(store)
            store.put("k", b"same")
            assert store.stat("k").etag not in seen
            seen.add(store.stat("k").etag)
        store.close()


class TestFileStorage(FileStorageContract):
    fsync = False


class TestFileStorageWithFsync(FileStorageContract):
    fsync = True


def test_storage_is_abstract_and_a_backend_must_implement_its_four_hooks():
    with pytest.raises(TypeError):
        kvserver.Storage()  # type: ignore[abstract]

    class Incomplete(kvserver.Storage):
        kind, location = "incomplete", "nowhere"

        def _fetch(self, key):
            raise KeyError(key)

    with pytest.raises(TypeError, match="_delete"):
        Incomplete()
