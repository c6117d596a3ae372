"""Watching for changes (SPEC sections 4 and 7, issue 18): `Storage.watch`, the event stream
`GET /events` and the long-poll `GET /kv/<key>?wait=<s>`.

The library tests run one contract against each backend; the HTTP tests run real kvserver
processes and read their streams from real sockets.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import re
import signal
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import test_redis
from conftest import LiveServer, Server, wait_for
from test_redis import RedisServer
from test_storage import TTL_DEADLINE

import kvserver

redis_server, redis_db, make_redis = test_redis.redis_server, test_redis.redis_db, test_redis.make_redis  # fixtures

EXPIRY_DEADLINE = 2.0  # SPEC: an expire event within two seconds of the key's time
PROMPT = 0.1  # a waiting request answers within this many seconds of a change
AT_ONCE = 1.0  # an answer that does not wait (or no longer) comes well within this many seconds


def order(revision: str) -> tuple[int, ...]:
    return kvserver.revision_order(revision)


# The library: Storage.watch


class WatchContract:
    """What every backend's `watch` does; a subclass supplies the `store` fixture."""

    def test_a_watch_yields_puts_deletes_and_expiries_in_the_order_they_took_effect(self, store):
        with store.watch(timeout=10) as watch:
            store.put("a", b"1", content_type="text/plain")
            store.put("b", b"22", ttl=1)
            store.delete("a")
            wait_for(lambda: "b" not in store, timeout=TTL_DEADLINE, what="the ttl=1 value to expire")
            store.sweep()  # (a server sweeps twice a second)
            events = [next(watch) for _ in range(4)]
        assert [(event.type, event.key) for event in events] == [
            ("put", "a"),
            ("put", "b"),
            ("delete", "a"),
            ("expire", "b"),
        ]
        assert events[0].stat == kvserver.Stat(1, "text/plain", events[0].stat.etag, None)
        assert events[1].stat.size == 2 and events[1].stat.expires_at is not None
        assert events[2].stat is None and events[3].stat is None
        revisions = [order(event.revision) for event in events]
        assert revisions == sorted(revisions) and len(set(revisions)) == 4

    def test_a_sweep_announces_each_expired_value_once(self, store):
        with store.watch(timeout=30) as watch:
            store.put("short", b"v", ttl=1)
            store.put("long", b"v", ttl=600)
            wait_for(lambda: "short" not in store, timeout=TTL_DEADLINE, what="the ttl=1 value to expire")
            store.sweep()
            store.sweep()
            assert [(event.type, event.key) for event in (next(watch) for _ in range(3))] == [
                ("put", "short"),
                ("put", "long"),
                ("expire", "short"),
            ]
            assert watch.wait(0.3) == []

    def test_a_write_over_a_value_that_expired_unswept_announces_the_expiry_first(self, store):
        with store.watch(timeout=30) as watch:
            store.put("k", b"old", ttl=1)
            wait_for(lambda: "k" not in store, timeout=TTL_DEADLINE, what="the ttl=1 value to expire")
            store.put("k", b"new")
            store.sweep()
            assert [(event.type, event.stat and event.stat.size) for event in (next(watch) for _ in range(3))] == [
                ("put", 3),
                ("expire", None),
                ("put", 3),
            ]
            assert watch.wait(0.3) == []

    def test_a_watch_sees_only_the_keys_under_its_prefix(self, store):
        with store.watch("app/", timeout=10) as watch:
            for key in ("other", "app/a", "app", "app/b/c"):
                store.put(key, b"v")
            assert [next(watch).key for _ in range(2)] == ["app/a", "app/b/c"]

    def test_a_watch_from_a_revision_yields_every_change_after_it_once(self, store):
        with store.watch(timeout=10) as watch:
            for n in range(5):
                store.put(f"k{n}", b"v")
            events = [next(watch) for _ in range(5)]
        with store.watch(after=events[1].revision, timeout=0.5) as resumed:
            assert list(resumed) == events[2:]

    def test_a_watch_from_a_revision_before_the_history_begins_starts_with_a_reset(self, store):
        with store.watch(timeout=10) as watch:
            store.put("k", b"v")
            latest = next(watch).revision
        with store.watch(after="1", timeout=0.5) as resumed:
            assert list(resumed) == [kvserver.Event(latest, "reset", None, None)]

    def test_a_watch_without_a_revision_starts_with_the_first_change_after_the_call(self, store):
        store.put("before", b"v")
        watch = store.watch(timeout=10)
        store.put("after", b"v")
        assert next(watch).key == "after"

    def test_a_watch_with_no_time_left_yields_what_has_come_already(self, store):
        with store.watch(timeout=10) as watch:
            store.put("a", b"1")
            first = next(watch).revision
        store.put("b", b"2")
        store.put("c", b"3")
        wait_for(lambda: len(list(store.watch(after=first, timeout=0))) == 2, what="the events to be there")
        assert [event.key for event in store.watch(after=first, timeout=0)] == ["b", "c"]

    def test_a_watch_ends_after_its_timeout(self, store):
        started = time.monotonic()
        assert list(store.watch(timeout=0.3)) == []
        assert 0.3 <= time.monotonic() - started < 2

    def test_close_from_another_thread_ends_the_iteration_at_once(self, store):
        watch = store.watch()
        threading.Timer(0.2, watch.close).start()
        started = time.monotonic()
        assert list(watch) == []
        assert time.monotonic() - started < 2

    @pytest.mark.parametrize("after", ["", "abc", "1-2-3", "-1", "1.5", 12])
    def test_a_revision_that_is_not_one_is_a_value_error(self, store, after):
        with pytest.raises(ValueError):
            store.watch(after=after)

    @pytest.mark.parametrize("timeout", [-1, "1", True, float("nan")])
    def test_a_bad_timeout_is_a_value_error(self, store, timeout):
        with pytest.raises(ValueError):
            store.watch(timeout=timeout)
        with store.watch() as watch, pytest.raises(ValueError):
            watch.wait(timeout)

    @pytest.mark.parametrize("timeout", [float("inf"), 1e10])
    def test_a_timeout_beyond_what_threads_wait_for_waits_for_the_change(self, store, timeout):
        """threading's waits end by TIMEOUT_MAX (about 9.2e9 s): a longer one is no limit, not an OverflowError."""
        with store.watch(timeout=timeout) as watch:
            writer = threading.Timer(0.2, store.put, ("a", b"x"))
            writer.start()
            try:
                event = next(watch)
                assert (event.type, event.key) == ("put", "a")
                writer = threading.Timer(0.2, store.put, ("b", b"x"))
                writer.start()
                assert [(event.type, event.key) for event in watch.wait(timeout)] == [("put", "b")]
            finally:
                writer.join(5)


class TestMemoryStorage(WatchContract):
    @pytest.fixture
    def store(self) -> Iterator[kvserver.Storage]:
        with kvserver.MemoryStorage() as store:
            yield store


class TestFileStorage(WatchContract):
    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[kvserver.Storage]:
        with kvserver.FileStorage(tmp_path / "data", fsync=False) as store:
            yield store


class TestRedisStorage(WatchContract):
    @pytest.fixture
    def store(self, redis_db: RedisServer) -> Iterator[kvserver.Storage]:
        with kvserver.RedisStorage(redis_db.url()) as store:
            yield store

    def test_a_watch_from_a_revision_before_the_history_begins_starts_with_a_reset(self, store, redis_db):
        # (the history is the stream, which remembers every change until it is trimmed)
        with store.watch(timeout=10) as watch:
            store.put("k", b"v")
            first = next(watch).revision
        store.put("k", b"w")
        with redis_db.client() as client:  # trimmed to the last entry, as if by many writes
            client.xtrim(b"kvserver:\xffevents", maxlen=1, approximate=False)
        with kvserver.RedisStorage(redis_db.url()) as other, other.watch(after=first, timeout=0.5) as resumed:
            [reset] = list(resumed)
        assert reset.type == "reset" and order(reset.revision) > order(first)


def test_a_redis_storage_resumes_from_a_revision_another_process_gave(redis_db):
    with kvserver.RedisStorage(redis_db.url()) as one, one.watch(timeout=10) as watch:
        one.put("a", b"1")
        first = next(watch)
        one.put("b", b"2")
        one.delete("a")
        later = [next(watch), next(watch)]
    with kvserver.RedisStorage(redis_db.url()) as two, two.watch(after=first.revision, timeout=0.5) as resumed:
        assert list(resumed) == later


def test_a_watch_more_than_the_history_behind_gets_a_reset_and_goes_on_from_there():
    with kvserver.MemoryStorage() as store:
        watch = store.watch()
        for n in range(kvserver.HISTORY + 1):
            store.put(f"k{n}", b"v")
        [reset] = watch.wait(0)
        assert reset.type == "reset" and reset.key is None
        assert watch.wait(0) == []
        store.put("next", b"v")
        [event] = watch.wait(0)
        assert event.key == "next" and order(event.revision) > order(reset.revision)


def pieces_sent(watch: kvserver.Watch) -> list[bytes]:
    """The pieces of event-stream messages a stream sends for what `watch` has ready."""
    return [piece for pieces in watch.wait_messages(0) for piece in pieces]


def drain(watch: kvserver.Watch) -> bytes:
    """Every event-stream message a watch has ready, as a stream sends them."""
    return b"".join(pieces_sent(watch))


def test_streams_send_the_same_messages_and_each_event_is_formatted_once(monkeypatch):
    made: list[kvserver.Event] = []
    real = kvserver._event_message
    monkeypatch.setattr(kvserver, "_event_message", lambda event: made.append(event) or real(event))
    with kvserver.MemoryStorage() as store:
        library, streams, evens = store.watch(), [store.watch() for _ in range(3)], store.watch("even/")
        for n in range(30):
            store.put(f"{('odd', 'even')[n % 2 == 0]}/{n}", b"v")
        store.delete("even/0")
        sent = [drain(stream) for stream in streams]
        sent_even = drain(evens)
        events = library.wait(0)
    assert len(events) == 31
    assert sent == [b"".join(map(real, events))] * 3
    assert sent_even == b"".join(real(event) for event in events if event.key.startswith("even/"))
    assert made == events  # once each, for every stream


def test_a_message_made_for_an_event_the_ring_no_longer_holds_is_not_kept_for_its_slot():
    feed = kvserver._ChangeFeed(capacity=4)
    old = kvserver.Watch(feed, "", None, None)
    for key in "abc":
        feed.publish("delete", key)
    batch = feed.read(old, 0)  # a, b, c, whose messages no stream has made yet
    new, library = kvserver.Watch(feed, "", None, None), kvserver.Watch(feed, "", None, None)
    for key in "wxyz":  # w, x, y, z now fill the ring, in the slots of a, b, c too
        feed.publish("put", key)
    assert b"".join(feed.messages(batch)) == b"".join(map(kvserver._event_message, batch.events))
    assert drain(new) == b"".join(map(kvserver._event_message, library.wait(0)))
    assert drain(new) == b""


def test_streams_send_each_page_of_messages_joined_once_and_it_goes_when_its_first_event_does(monkeypatch):
    monkeypatch.setattr(kvserver, "_PAGE", 2)
    monkeypatch.setattr(kvserver, "_WATCH_BATCH", 4)
    feed = kvserver._ChangeFeed(capacity=8)
    first, second, library = (kvserver.Watch(feed, "", None, None) for _ in range(3))

    def messages() -> bytes:  # of every event the library's watch has not read yet
        return b"".join(map(kvserver._event_message, itertools.chain(*iter(lambda: library.wait(0), []))))

    feed.publish("delete", "z")  # event 0, the first each watch reads (it checks that it began before it)
    assert pieces_sent(first) == pieces_sent(second) == [messages()]
    for key in "abcde":  # events 1-5: 1 on its own, then pages 2 and 4
        feed.publish("delete", key)
    sent = pieces_sent(first)
    assert b"".join(sent) == messages()
    assert len(sent) == 3 and sorted(feed._pages) == [2, 4]
    again = pieces_sent(second)
    assert again[0] == sent[0] and again[1] is sent[1] and again[2] is sent[2]
    for key in "fghij":  # events 6-10: events 0-2 leave the ring, and page 2 with them
        feed.publish("delete", key)
    sent = pieces_sent(first)  # pages 6 and 8, then 10 on its own
    assert b"".join(sent) == messages()
    assert len(sent) == 3 and sorted(feed._pages) == [4, 6, 8]


def test_a_stream_reads_a_batch_once_it_sent_the_one_before_and_stops_at_what_had_come(monkeypatch):
    # One batch in memory at a time, and a write for every batch sent cannot keep a send going.
    monkeypatch.setattr(kvserver, "_PAGE", 1)
    monkeypatch.setattr(kvserver, "_WATCH_BATCH", 1)
    feed = kvserver._ChangeFeed(capacity=64)
    watch = kvserver.Watch(feed, "", None, None)
    feed.publish("delete", "first")
    assert len(pieces_sent(watch)) == 1
    for key in "abc":  # events 1-3
        feed.publish("delete", key)
    batches = watch.wait_messages(0)
    assert watch._next == 2  # the first batch is read, not the others
    sent = []
    for pieces in batches:
        sent += pieces
        feed.publish("delete", f"late {len(sent)}")
    assert watch._next == 4 and b"".join(sent).count(b"event: delete") == 3
    assert drain(watch).count(b"event: delete") == 3  # the late ones, with the next send


def test_a_page_whose_first_event_left_the_ring_before_a_stream_sends_it_is_not_kept(monkeypatch):
    monkeypatch.setattr(kvserver, "_PAGE", 2)
    feed = kvserver._ChangeFeed(capacity=4)
    old = kvserver.Watch(feed, "", None, None)
    feed.publish("delete", "z")
    assert len(feed.read(old, 0).events) == 1  # (the first each watch reads is checked for its start)
    for key in "abc":
        feed.publish("delete", key)
    batch = feed.read(old, 0)  # event 1, and page 2
    for key in "wxyz":  # the ring now holds events 4-7
        feed.publish("put", key)
    assert b"".join(feed.messages(batch)) == b"".join(map(kvserver._event_message, batch.events))
    assert feed._pages == {}


def test_a_stream_more_than_the_ring_behind_sends_a_reset_then_goes_on_across_its_end():
    feed = kvserver._ChangeFeed(capacity=4)
    behind, library = kvserver.Watch(feed, "", None, None), kvserver.Watch(feed, "", None, None)
    for key in "abcde":
        feed.publish("delete", key)
    [reset] = library.wait(0)
    assert reset.type == "reset"
    assert drain(behind) == kvserver._event_message(reset)
    for key in "fgh":  # wrapping around the ring's end
        feed.publish("put", key)
    assert drain(behind) == b"".join(map(kvserver._event_message, library.wait(0)))


def test_a_gap_resets_a_watch_that_had_read_everything_and_was_not_waiting():
    feed = kvserver._ChangeFeed(capacity=8)
    for n in range(3):
        feed.publish("put", f"k{n}", None, revision=f"{n + 1}-0")
    watch = kvserver.Watch(feed, "", None, None)  # caught up, and not waiting (a stream in its pause)
    feed.gap("10-0")
    assert [(event.type, event.revision) for event in watch.wait(0)] == [("reset", "10-0")]
    feed.publish("put", "x", None, revision="11-0")
    assert [(event.type, event.key) for event in watch.wait(0)] == [("put", "x")]


@pytest.mark.parametrize("prefix", ["", "k"])
@pytest.mark.parametrize(
    ("after", "newest", "gap", "read", "expected"),
    [
        (None, "4-0", None, range(3, 7), ["k5", "k6"]),  # a new watch: from after the source's newest
        ("3-0", "4-0", None, range(3, 7), ["k4", "k5", "k6"]),  # resumed from a revision the feed has not read
        ("4-0", "4-0", None, range(3, 7), ["k5", "k6"]),
        ("9-0", "4-0", None, range(3, 7), ["reset 4-0", "k5", "k6"]),  # no such revision: reset at the newest
        ("0-5", "4-0", None, range(3, 7), ["reset 4-0", "k5", "k6"]),  # forgotten
        (None, "4-0", "4-0", range(4, 7), ["k5", "k6"]),  # a gap only in what it skips
        ("4-0", "5-0", "4-0", range(4, 7), ["k5", "k6"]),
        (None, "4-0", "6-0", range(6, 8), ["reset 7-0"]),  # a gap in what it asked for
        (None, "12-0", None, range(3, 14), ["k13"]),  # more than the ring (8) behind, all of it skipped
        ("11-0", "12-0", None, range(3, 14), ["k12", "k13"]),
        ("4-0", "12-0", None, range(3, 14), ["reset 13-0"]),  # more than the ring behind what it asked for
    ],
)
def test_a_watch_on_a_feed_behind_its_source_skips_what_came_before_it_and_no_more(
    prefix, after, newest, gap, read, expected
):
    """A feed read from elsewhere (Redis) may not have the source's newest change yet: a watch
    made then skips the changes up to that one (or up to its `after`) as the feed reads them,
    without a reset for a gap in them or for their number, and sees each later one once."""
    feed = kvserver._ChangeFeed(lambda: ("1-0", []), capacity=8)
    feed.publish("put", "k2", None, revision="2-0")
    watch = kvserver.Watch(feed, prefix, after, None, newest=newest)
    if gap is not None:
        feed.gap(gap)  # the source was trimmed past the feed: it reads on from `gap`
    for n in read:
        feed.publish("put", f"k{n}", None, revision=f"{n}-0")
    events = []
    for _ in range(10):
        events += watch.wait(0)
    assert [f"reset {event.revision}" if event.type == "reset" else event.key for event in events] == expected


@pytest.mark.parametrize(("read", "reset_at"), [("waiting", "6-0"), ("between", "6-0"), ("after", "7-0")])
def test_after_a_gap_a_watch_gets_a_reset_and_then_only_the_changes_after_its_revision(read, reset_at):
    """The change of the gap's revision, which the reader publishes next, is in the listing
    the reset calls for: a watch goes on after it, whether it was waiting at the gap, read
    between the gap and that change, or read after it (nothing twice)."""
    feed = kvserver._ChangeFeed(lambda: ("1-0", []), capacity=4)
    feed.publish("put", "k2", None, revision="2-0")
    watch = kvserver.Watch(feed, "", None, None)
    events: list[kvserver.Event] = []
    waiting = threading.Thread(target=lambda: events.extend(watch.wait(10)))
    if read == "waiting":
        waiting.start()
        wait_for(lambda: watch in feed._waiting.get("", ()), what="the watch to wait")
    feed.gap("6-0")  # the source lost 3-0 to 5-0
    if read == "between":
        events += watch.wait(0)
    feed.publish("put", "k6", None, revision="6-0")
    feed.publish("put", "k7", None, revision="7-0")
    if read == "waiting":
        waiting.join(10)
    for _ in range(3):
        events += watch.wait(0)
    reset, *following = events
    assert (reset.type, reset.revision) == ("reset", reset_at)
    assert [event.key for event in following] == (["k7"] if reset_at == "6-0" else [])


def test_a_watch_under_a_prefix_is_not_reset_by_more_than_the_history_of_other_keys():
    with kvserver.MemoryStorage() as store:
        watch = store.watch("mine/")
        waiting = threading.Thread(target=lambda: events.extend(watch.wait(10)))
        events: list[kvserver.Event] = []
        waiting.start()
        wait_for(lambda: watch in store._feed._waiting.get("mine/", ()), what="the watch to wait")
        for n in range(kvserver.HISTORY + 1):
            store.put(f"other/{n}", b"v")
        store.put("mine/a", b"v")
        waiting.join(10)
        assert [(event.type, event.key) for event in events] == [("put", "mine/a")]


def test_a_redis_watch_gets_a_reset_when_redis_comes_back_without_the_changes(tmp_path: Path):
    test_redis._require_redis()
    redis = RedisServer(tmp_path).start()  # no persistence: a restart loses everything
    try:
        with kvserver.RedisStorage(redis.url()) as store, store.watch(timeout=30) as watch:
            store.put("a", b"1")
            assert next(watch).key == "a"
            redis.kill()
            redis.start(same_port=True)

            def put_b() -> bool:
                with contextlib.suppress(kvserver.StorageUnavailable):
                    return bool(store.put("b", b"2"))
                return False

            wait_for(put_b, timeout=10, what="Redis to take a write again")
            reset = next(watch)  # (at b's revision, the first after the loss: b is in the listing it calls for)
            store.put("c", b"3")
            following = next(watch)
        assert [(event.type, event.key) for event in (reset, following)] == [("reset", None), ("put", "c")]
        assert order(reset.revision) < order(following.revision)
    finally:
        redis.stop()


def test_a_watch_that_waited_in_vain_under_its_prefix_sees_the_next_change_under_it():
    with kvserver.MemoryStorage() as store:
        watch = store.watch("mine/")
        store.put("other/1", b"v")  # before the wait: read and skipped by it
        timer = threading.Timer(0.1, lambda: store.put("other/2", b"v"))  # during it
        timer.start()
        assert watch.wait(0.3) == []
        store.put("mine/a", b"v")
        assert [event.key for event in watch.wait(0)] == ["mine/a"]


@pytest.mark.parametrize("kind", ["memory", "files"])
def test_a_change_made_by_someone_who_saw_another_comes_after_it(kind, tmp_path, monkeypatch):
    """A write becomes visible and takes its revision in one step: a second write made after a
    reader saw the first waits for the first's event. (Before, a thread switch between the index
    and the publication gave the second write the smaller revision: found by review, held open
    here with a hook.)"""
    store = kvserver.MemoryStorage() if kind == "memory" else kvserver.FileStorage(tmp_path / "data", fsync=False)
    announce, held, go_on = kvserver._announce, threading.Event(), threading.Event()

    def slow_announce(feed, key, previous, entry):
        if key == "job":
            held.set()
            assert go_on.wait(10)
        announce(feed, key, previous, entry)

    monkeypatch.setattr(kvserver, "_announce", slow_announce)
    with store, store.watch("", timeout=10) as watch:
        first = threading.Thread(target=store.put, args=("job", b"data"), daemon=True)
        first.start()
        assert held.wait(10)
        assert store.get("job") == b"data"  # visible: a reader sees it ...
        second = threading.Thread(target=store.put, args=("ready", b"1"), daemon=True)
        second.start()  # ... and writes another key
        second.join(1.0)  # (it waits for the first's publication: not done within the second)
        go_on.set()
        for thread in (first, second):
            thread.join(10)
        assert [event.key for event in itertools.islice(watch, 2)] == ["job", "ready"]


def test_closing_the_storage_ends_its_watches():
    store = kvserver.MemoryStorage()
    watch = store.watch()
    threading.Timer(0.2, store.close).start()
    assert list(watch) == []


def test_a_watch_whose_iteration_ended_stays_ended_and_wait_still_reads_on():
    """Python's iterator protocol: once StopIteration, always. (A second loop over a watch whose
    time was up yielded the changes made since.)"""
    with kvserver.MemoryStorage() as store, store.watch("", timeout=0.1) as watch:
        assert list(watch) == []
        store.put("k", b"v")
        assert list(watch) == []
        with pytest.raises(StopIteration):
            next(watch)
        assert [(event.type, event.key) for event in watch.wait(1)] == [("put", "k")]


def test_a_watch_made_after_another_watchs_after_misses_nothing_between_them():
    """watch.after is the revision a watch gives the changes after, even if it gave none."""
    with kvserver.MemoryStorage() as store:
        store.put("before", b"v")
        with store.watch() as first:
            latest = first.after
        store.put("between", b"v")
        with store.watch(after=latest, timeout=0.5) as second:
            assert second.after == latest
            assert [event.key for event in second] == ["between"]
        with store.watch(timeout=0.1) as third:
            assert order(third.after) > order(latest)
            assert list(third) == []


def test_a_watch_never_gives_the_change_of_its_own_after_revision():
    """Between the Redis reader's gap(R) and its publication of R, the feed's last revision is
    R; a watch made then started after R and was still given R's change: a stream opened then
    sent id: R alone, then R, and a client that dropped in between resumed after R without it.
    (The reader's calls, on a real feed.)"""
    feed = kvserver._ChangeFeed(lambda: ("1-0", []))
    feed.publish("put", "a", None, "2-0")
    feed.gap("5-0")  # the reader found entry 5-0 after trimmed ones: it publishes 5-0 next
    watch = kvserver.Watch(feed, "", None, 0.5, "3-0")  # its XREVRANGE ran before 5-0 was written
    feed.publish("put", "k", None, "5-0")
    assert watch.after == "5-0"
    assert watch.wait(0.2) == []
    feed.publish("put", "later", None, "6-0")
    assert [event.revision for event in watch.wait(1)] == ["6-0"]


def test_a_watch_after_a_gaps_revision_or_reset_at_it_does_not_get_that_revisions_change_too():
    """Just after gap(R), R's change is still to be published: a watch made then with after=R
    (a client that has R) got R's change again, and one whose `after` the feed forgot got a
    reset at R and then R's change, which the listing the reset asks for holds already."""
    feed = kvserver._ChangeFeed(lambda: ("1-0", []))
    feed.publish("put", "a", None, "2-0")
    feed.gap("5-0")
    resumed = kvserver.Watch(feed, "", "5-0", 0.5, "5-0")
    forgotten = kvserver.Watch(feed, "", "1-5", 0.5, None)  # before the floor
    feed.publish("put", "k", None, "5-0")
    feed.publish("put", "later", None, "6-0")
    assert [event.revision for event in resumed.wait(1)] == ["6-0"]
    assert [(event.type, event.revision) for event in forgotten.wait(1)] == [("reset", "5-0")]
    assert [(event.type, event.revision) for event in forgotten.wait(1)] == [("put", "6-0")]


def test_revisions_of_a_files_storage_grow_across_a_restart(tmp_path: Path):
    with kvserver.FileStorage(tmp_path, fsync=False) as store, store.watch(timeout=10) as watch:
        store.put("k", b"v")
        store.delete("k")
        before = [next(watch).revision for _ in range(2)]
    with kvserver.FileStorage(tmp_path, fsync=False) as store:
        resumed = store.watch(after=before[-1], timeout=10)
        store.put("k", b"w")
        assert next(resumed).type == "reset"  # the new process does not remember the first one's changes
        event = next(resumed)
    assert event.key == "k" and order(event.revision) > order(before[-1])


def test_a_revision_after_a_restart_follows_the_last_removal_even_with_the_clock_set_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # A delete leaves no file; the data dir's modification time, which the removal set, dates it.
    # A folder dated an hour ahead is a clock set back an hour since that removal.
    monkeypatch.setattr(kvserver, "_last_stamp", kvserver._last_stamp)  # (restored after: stamps are per process)
    with kvserver.FileStorage(tmp_path, fsync=False) as store:
        store.put("k", b"v")
        store.delete("k")
    an_hour_ahead = time.time_ns() + 3600 * 10**9
    os.utime(tmp_path, ns=(an_hour_ahead, an_hour_ahead))
    with kvserver.FileStorage(tmp_path, fsync=False) as store, store.watch(timeout=10) as watch:
        store.put("k", b"w")
        assert int(next(watch).revision) > an_hour_ahead


def test_a_key_with_a_ttl_loaded_at_start_expires_with_an_event(tmp_path: Path):
    with kvserver.FileStorage(tmp_path, fsync=False) as store:
        store.put("short", b"v", ttl=1)
    with kvserver.FileStorage(tmp_path, fsync=False) as store, store.watch(timeout=10) as watch:
        wait_for(lambda: "short" not in store, timeout=TTL_DEADLINE, what="the ttl=1 value to expire")
        store.sweep()
        event = next(watch)
        assert (event.type, event.key) == ("expire", "short")
        assert not (tmp_path / "short").exists()


# HTTP: a reader of Server-Sent Events


@dataclass
class Message:
    id: str | None = None
    event: str = "message"
    data: str = ""
    comments: list[str] = field(default_factory=list)

    def json(self):
        return json.loads(self.data)


class EventStream:
    """GET /events read on a real socket: `next()` gives each message (comments included)."""

    def __init__(self, server: Server, path: str = "/events", headers: dict[str, str] | None = None, timeout=10.0):
        self.connection = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
        self.connection.request("GET", path, headers=headers or {})
        self.response = self.connection.getresponse()

    def next(self) -> Message:
        message = Message()
        while True:
            line = self.response.readline()
            assert line.endswith(b"\n"), f"the stream ended: {line!r}"
            line = line.decode().rstrip("\n")
            if not line:
                return message
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if not name:
                message.comments.append(value)
            elif name == "data":
                message.data += value
            else:
                setattr(message, name, value)

    def events(self, count: int) -> list[Message]:
        """The next `count` messages that are events: those with data, as an EventSource
        dispatches them (comments, and the opening id: line alone, skipped)."""
        messages = []
        while len(messages) < count:
            message = self.next()
            if message.data:
                messages.append(message)
        return messages

    def close(self) -> None:
        self.connection.close()


@pytest.fixture(params=["memory", "files", "redis"])
def any_server(request, make_server) -> Server:
    """A quiet kvserver on memory, files (without fsync: many writes, none for durability) or Redis storage."""
    if request.param == "redis":
        return make_server("--quiet", "--storage", request.getfixturevalue("redis_db").url())
    return make_server("--quiet", "--storage", request.param, *["--no-fsync"] * (request.param == "files"))


@pytest.fixture
def streams() -> Iterator[list[EventStream]]:
    """Event streams to close at the end."""
    opened: list[EventStream] = []
    yield opened
    for stream in opened:
        stream.close()


def open_stream(streams: list[EventStream], server: Server, path: str = "/events", **kwargs) -> EventStream:
    stream = EventStream(server, path, **kwargs)
    streams.append(stream)
    return stream


def put(server: Server, key: str, body: bytes = b"v", connection=None) -> str:
    response = server.request("PUT", f"/kv/{urllib.parse.quote(key)}", body, connection=connection)
    assert response.status in (200, 201), response.body
    return response.headers["ETag"].strip('"')


def test_the_stream_is_text_event_stream_with_an_event_for_each_change(any_server, streams):
    stream = open_stream(streams, any_server)
    assert stream.response.status == 200
    assert stream.response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert stream.response.headers["Cache-Control"] == "no-cache"
    assert stream.response.headers["Transfer-Encoding"] == "chunked"
    etag = put(any_server, "schlüssel", b"wert")
    any_server.get("/set?key=short&value=v&ttl=1")
    assert any_server.request("DELETE", "/kv/schl%C3%BCssel").status == 204
    messages = stream.events(4)
    assert [(message.event, message.json()) for message in messages] == [
        ("put", {"key": "schlüssel", "etag": etag, "size": 4, "content_type": "application/octet-stream"}),
        (
            "put",
            {"key": "short", "etag": messages[1].json()["etag"], "size": 1, "content_type": kvserver.TEXT_CONTENT_TYPE},
        ),
        ("delete", {"key": "schlüssel"}),
        ("expire", {"key": "short"}),
    ]
    assert "schlüssel" in messages[0].data  # UTF-8, not \\u escapes
    ids = [order(message.id) for message in messages]
    assert ids == sorted(ids) and len(set(ids)) == 4


def test_1000_writes_from_8_threads_each_reach_the_stream_once_in_revision_order(any_server, streams):
    stream = open_stream(streams, any_server)
    written: dict[str, list[str]] = {}  # key -> the ETags of its writes, in the order they were answered

    def writer(thread: int) -> None:
        connection = any_server.connect()
        for n in range(125):
            key = f"t{thread}/k{n % 5}"
            written.setdefault(key, []).append(put(any_server, key, b"%d" % n, connection))

    threads = [threading.Thread(target=writer, args=(thread,)) for thread in range(8)]
    for thread in threads:
        thread.start()
    messages = stream.events(1000)
    for thread in threads:
        thread.join()
    ids = [order(message.id) for message in messages]
    assert ids == sorted(ids) and len(set(ids)) == 1000
    seen: dict[str, list[str]] = {}
    for message in messages:
        assert message.event == "put"
        seen.setdefault(message.json()["key"], []).append(message.json()["etag"])
    assert seen == written  # every write once, and each key's writes in the order they were made


def test_a_client_that_reconnects_with_last_event_id_misses_nothing_and_sees_nothing_twice(any_server, streams):
    stream = open_stream(streams, any_server)
    for n in range(3):
        put(any_server, f"k{n}")
    first = stream.events(3)
    stream.close()  # gone; meanwhile more changes happen
    for n in range(3, 6):
        put(any_server, f"k{n}")
    any_server.request("DELETE", "/kv/k0")
    resumed = open_stream(streams, any_server, headers={"Last-Event-ID": first[-1].id})
    rest = resumed.events(4)
    assert [(message.event, message.json()["key"]) for message in rest] == [
        ("put", "k3"),
        ("put", "k4"),
        ("put", "k5"),
        ("delete", "k0"),
    ]
    by_query = open_stream(streams, any_server, f"/events?after={first[0].id}")
    assert [message.id for message in by_query.events(6)] == [message.id for message in first[1:] + rest]


def test_resuming_from_before_the_history_gives_a_reset_and_its_revision_resumes(make_server, streams):
    server = make_server("--quiet", "--storage", "memory")
    connection = server.connect()
    stream = open_stream(streams, server)
    put(server, "k", connection=connection)
    early = stream.events(1)[0].id
    stream.close()
    for n in range(kvserver.HISTORY + 1):  # the history then starts after the first of these
        put(server, f"k{n % 10}", connection=connection)
    resumed = open_stream(streams, server, headers={"Last-Event-ID": early})
    [reset] = resumed.events(1)
    assert reset.event == "reset"
    assert reset.json() == {"revision": reset.id}
    put(server, "after", connection=connection)
    [event] = resumed.events(1)
    assert event.json()["key"] == "after"
    from_reset = open_stream(streams, server, f"/events?after={reset.id}")
    assert from_reset.events(1)[0].id == event.id


def test_a_revision_from_before_a_restart_of_a_files_server_gives_a_reset(make_server, streams):
    server = make_server("--quiet", "--no-fsync")
    stream = open_stream(streams, server)
    put(server, "k")
    before = stream.events(1)[0].id
    stream.close()
    server.restart()
    resumed = open_stream(streams, server, headers={"Last-Event-ID": before})
    [reset] = resumed.events(1)
    assert reset.event == "reset" and order(reset.id) > order(before)


def test_the_stream_has_only_the_keys_under_its_prefix(any_server, streams):
    stream = open_stream(streams, any_server, "/events?prefix=app%2F")
    for key in ("other", "app/a", "apple", "app/b"):
        put(any_server, key)
    assert [message.json()["key"] for message in stream.events(2)] == ["app/a", "app/b"]


@pytest.mark.parametrize(
    ("query", "headers"),
    [("?after=abc", {}), ("?after=", {}), ("?nope=1", {}), ("", {"Last-Event-ID": "12x"}), ("?after=1-2-3", {})],
)
def test_a_bad_revision_or_query_is_a_400(server, query, headers):
    response = server.get(f"/events{query}", headers=headers)
    assert response.status == 400
    response.problem()


def test_the_stream_refuses_post_naming_get_and_head(server):
    response = server.request("POST", "/events", b"")
    assert (response.status, response.headers["Allow"]) == (405, "GET, HEAD")


def test_an_http_1_0_stream_ends_with_the_connection(server):
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(b"GET /events HTTP/1.0\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
        assert b"Transfer-Encoding" not in head and b"Connection: close" in head
        put(server, "k")
        body = head.partition(b"\r\n\r\n")[2]
        while body.count(b"\n\n") < 2 and (received := sock.recv(4096)):
            body += received
        assert re.match(rb"id: [0-9]+\n\nid: [0-9]+\nevent: put\n", body), body  # (the opening id, then the event)


@contextlib.contextmanager
def event_chunks(server) -> Iterator[Callable[[], bytes]]:
    """An open GET /events on `server`, past its opening id: line: a function that reads its
    next chunk (one send's events)."""
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        reader = sock.makefile("rb")
        sock.sendall(b"GET /events HTTP/1.1\r\nHost: localhost\r\n\r\n")
        while reader.readline() != b"\r\n":
            pass

        def chunk() -> bytes:
            size = int(reader.readline(), 16)
            data = reader.read(size + 2)
            assert data.endswith(b"\r\n")
            return data[:-2]

        assert re.fullmatch(rb"id: [0-9-]+\n\n", chunk())  # (the opening id alone)
        yield chunk


def test_a_flood_of_changes_reaches_a_stream_whole_after_its_pause_not_a_batch_per_pause(make_live_server, monkeypatch):
    # A busy stream pauses COALESCE seconds between sends; what came meanwhile must all go in the
    # next send. (It once sent one batch of 1,000 per pause: under 5,000 changes a second a stream
    # fell behind a client that read as fast as it could, and was reset.) Batches of a page here,
    # so that a send of three fits in one chunk.
    monkeypatch.setattr(kvserver, "_WATCH_BATCH", kvserver._PAGE)
    server = make_live_server("memory")
    with event_chunks(server) as chunk:
        server.storage.put("first", b"v")
        assert chunk().count(b"event: put\n") == 1  # sent at once: the stream was quiet
        changes = 3 * kvserver._WATCH_BATCH
        for n in range(changes):  # in well under COALESCE seconds: the stream is pausing meanwhile
            server.storage.put(f"k{n}", b"v")
        sizes = []
        while sum(sizes) < changes:
            sizes.append(chunk().count(b"event: put\n"))
        assert sum(sizes) == changes and max(sizes) > kvserver._WATCH_BATCH, sizes


def test_a_stream_that_gathered_more_batches_than_one_send_takes_loses_none(make_live_server, monkeypatch):
    # A send takes what had come by the end of its wait, a batch at a time (here of 1 event);
    # what comes later leaves with the next send. (A stream once read a batch on its last turn
    # and never sent it: under a flood, 250 events lost every 41 batches, without a reset.)
    monkeypatch.setattr(kvserver, "_WATCH_BATCH", 1)
    monkeypatch.setattr(kvserver, "HISTORY", 2)
    server = make_live_server("memory")
    with event_chunks(server) as chunk:
        server.storage.put("first", b"v")
        assert b'"key": "first"' in chunk()  # sent at once: the stream now pauses
        for n in range(5):
            server.storage.put(f"k{n}", b"v")
        received = b""
        while b'"key": "k4"' not in received:
            received += chunk()
        assert re.findall(rb'"key": "(k[0-9])"', received) == [b"k0", b"k1", b"k2", b"k3", b"k4"]


def test_a_change_during_a_streams_pause_leaves_when_the_pause_since_its_last_send_is_up(make_live_server, monkeypatch):
    # A stream sends at most once in COALESCE seconds, counted from its last send. It once waited
    # for the next change and then paused COALESCE seconds from that change: later by up to that,
    # and every stream waiting then was woken by each write of a flood.
    monkeypatch.setattr(kvserver, "COALESCE", 2.0)
    server = make_live_server("memory")
    with event_chunks(server) as chunk:
        server.storage.put("first", b"v")
        assert b'"key": "first"' in chunk()  # sent at once: the stream was quiet
        sent = time.monotonic()
        time.sleep(1.0)  # (the input: a change halfway through the pause, not a wait for anything)
        server.storage.put("second", b"v")
        assert b'"key": "second"' in chunk()
        assert 1.9 <= time.monotonic() - sent < 2.6


def test_a_stream_pausing_between_sends_ends_at_once_when_the_server_stops(make_live_server, monkeypatch):
    monkeypatch.setattr(kvserver, "COALESCE", 60.0)
    server = make_live_server("memory")
    with event_chunks(server) as chunk:
        server.storage.put("first", b"v")
        assert b'"key": "first"' in chunk()  # sent: the stream now pauses for a minute
        server.storage.put("second", b"v")  # (what the pause is gathering)
        started = time.monotonic()
        stopping = threading.Thread(target=server.server.stop)
        stopping.start()
        stopping.join(10)
        assert not stopping.is_alive() and time.monotonic() - started < 2, "the stop waited for the pause"
        assert chunk() == b""  # the last chunk: the stream ended


@pytest.mark.parametrize("end", ["close the watch", "close the storage"])
def test_a_wait_in_its_pause_ends_at_once_when_its_watch_or_storage_closes(end):
    store = kvserver.MemoryStorage()
    watch = store.watch("")
    waited: list[list[list[bytes]]] = []
    waiting = threading.Thread(target=lambda: waited.append(list(watch.wait_messages(60, pause=60))))
    waiting.start()
    wait_for(lambda: watch in store._feed._pausing, timeout=10, what="the wait to pause")
    store.put("k", b"v")  # wakes no pause
    started = time.monotonic()
    if end == "close the watch":
        watch.close()
    else:
        store.close()
    waiting.join(10)
    assert not waiting.is_alive() and time.monotonic() - started < 2
    assert waited == [[]]
    store.close()


def test_the_comment_after_silence_counts_the_silence_from_the_last_event_sent(make_live_server, monkeypatch):
    monkeypatch.setattr(kvserver, "HEARTBEAT", 1.0)
    monkeypatch.setattr(kvserver, "COALESCE", 0.6)  # the pause after a send is part of the silence
    server = make_live_server("memory")
    with event_chunks(server) as chunk:
        server.storage.put("k", b"v")
        assert b'"key": "k"' in chunk()
        sent = time.monotonic()
        assert chunk() == b": keep-alive\n\n"
        assert 0.9 <= time.monotonic() - sent < 1.4


def test_a_negative_pause_is_no_pause_and_does_not_shorten_the_wait():
    with kvserver.MemoryStorage() as store, store.watch("") as watch:
        started = time.monotonic()
        assert list(watch.wait_messages(0.5, pause=-5)) == []
        assert time.monotonic() - started >= 0.5


def test_a_stream_sends_a_comment_after_silence_and_is_not_closed_as_idle(monkeypatch):
    monkeypatch.setattr(kvserver, "HEARTBEAT", 0.2)
    monkeypatch.setattr(kvserver, "IDLE_TIMEOUT", 0.5)  # the limits that close connections, shortened too
    monkeypatch.setattr(kvserver, "STALL_TIMEOUT", 0.5)
    server = kvserver.KVServer(("127.0.0.1", 0), kvserver.MemoryStorage(), quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=5)
        connection.request("GET", "/events")
        response = connection.getresponse()
        started = time.monotonic()
        lines = []
        while time.monotonic() - started < 1.5:  # three times the idle limit
            lines.append(response.readline())
        assert lines.count(b": keep-alive\n") >= 4
        server.storage.put("k", b"v")
        while not (line := response.readline()).startswith(b"id: "):
            assert line in (b": keep-alive\n", b"\n")
        connection.close()
    finally:
        server.shutdown()
        server.stop()


def test_head_of_events_answers_the_streams_head_alone_and_the_connection_goes_on(server):
    """RFC 9110 section 9.3.2: HEAD is GET without the content (it was a 405)."""
    connection = server.connect(timeout=10)
    head = server.request("HEAD", "/events", connection=connection)
    assert head.status == 200
    assert head.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert head.body == b""
    assert server.request("GET", "/health", connection=connection).status == 200  # nothing was left to read
    assert server.request("HEAD", "/events?after=not-a-revision").status == 400  # as GET would answer


def test_a_stream_that_drops_before_its_first_event_resumes_from_its_opening_id(any_server, streams):
    """An EventSource that drops before any event has no Last-Event-ID of an event; the stream's
    opening id: line gives it one, so the changes made while it was away are not lost."""
    first = open_stream(streams, any_server)
    opening = first.next()
    assert opening.id is not None and (opening.event, opening.data) == ("message", "")  # an id alone, no event
    first.close()
    put(any_server, "while-away")
    resumed = open_stream(streams, any_server, headers={"Last-Event-ID": opening.id})
    assert resumed.next().id == opening.id  # (its own opening id: where it resumes from)
    [event] = resumed.events(1)
    assert (event.event, event.json()["key"]) == ("put", "while-away")


def test_with_a_token_a_stream_and_a_waiting_get_need_it(make_server, streams):
    server = make_server("--quiet", "--storage", "memory", "--token", "s3cret")
    assert server.get("/events").status == 401
    assert server.get("/kv/k?wait=1").status == 401
    stream = open_stream(streams, server, headers={"Authorization": "Bearer s3cret"})
    assert server.request("PUT", "/kv/k", b"v", {"Authorization": "Bearer s3cret"}).status == 201
    assert stream.events(1)[0].json()["key"] == "k"


def open_connections(server: Server) -> int:
    metrics = server.get("/metrics", headers={"Connection": "close"}).body.decode()
    return int(metrics.split("\nkvserver_open_connections ")[1].split()[0]) - 1  # (less the one asking)


def test_a_stream_or_a_waiting_get_the_client_left_lets_its_connection_go_within_a_second(any_server):
    with socket.create_connection((any_server.host, any_server.port)) as stream:
        stream.sendall(b"GET /events HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert stream.recv(4096).startswith(b"HTTP/1.1 200")
        with socket.create_connection((any_server.host, any_server.port)) as waiting:
            waiting.sendall(b"GET /kv/nothing?wait=300 HTTP/1.1\r\nHost: localhost\r\n\r\n")
            wait_for(lambda: open_connections(any_server) == 2, what="both to be open")
    left = time.monotonic()
    wait_for(lambda: open_connections(any_server) == 0, timeout=5, what="both connections to go")
    assert time.monotonic() - left < 2  # not the 15 s heartbeat, nor the 300 s wait


@pytest.mark.parametrize("path", ["/kv/nothing?wait=300", "/events"])
def test_a_client_that_pipelined_a_request_behind_a_wait_and_hung_up_lets_its_connection_go(make_live_server, path):
    """The pipelined bytes stand before the end of the connection: looked at alone, they made
    the client seem to be there, until the wait ended (300 s) or the next heartbeat (15 s)."""
    server = make_live_server("memory")
    with socket.create_connection((server.host, server.port)) as client:
        client.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        # Once it waits, its head has been read: the next request stays in the socket.
        wait_for(lambda: server.server.connections._watches, what="the request to wait")
        client.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    left = time.monotonic()
    wait_for(lambda: open_connections(server) == 0, timeout=5, what="the connection to go")
    assert time.monotonic() - left < 2


@pytest.mark.parametrize(
    "headers", [{"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}, {"Origin": "null"}]
)
def test_another_sites_page_cannot_open_a_stream(server, headers):
    assert server.get("/events", headers=headers).status == 403


def test_streams_count_against_max_connections(make_server, streams):
    server = make_server("--quiet", "--storage", "memory", "--max-connections", "2")
    for _ in range(2):
        open_stream(streams, server)
    response = server.get("/health")
    assert response.status == 503


def test_stop_with_50_open_streams_and_waiting_requests_takes_under_a_second(any_server, streams):
    for _ in range(50):
        open_stream(streams, any_server)
    waiting = [any_server.connect() for _ in range(5)]
    for connection in waiting:
        connection.request("GET", "/kv/nothing?wait=300")
    wait_for(lambda: b"kvserver_open_connections 56" in any_server.get("/metrics").body, what="all to be open")
    started = time.monotonic()
    any_server.process.send_signal(signal.SIGTERM)
    assert any_server.process.wait(5) == 0
    assert time.monotonic() - started < 1.0
    for connection in waiting:
        assert connection.getresponse().status == 404  # the answer it would have had
    for stream in streams:
        assert re.fullmatch(rb"id: [0-9-]+\n\n", stream.response.read())  # its opening id alone: it ended cleanly


@contextlib.contextmanager
def stream_read_no_further(server) -> Iterator[socket.socket]:
    """GET /events on a socket with a small receive buffer, whose client reads its head and no more."""
    with socket.socket() as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (before connecting, to take effect)
        client.settimeout(10)
        client.connect(("127.0.0.1", server.port))
        client.sendall(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head = b""
        for _ in range(100):
            if b"\r\n\r\n" in head:
                break
            head += client.recv(4096)
        assert head.startswith(b"HTTP/1.1 200 ")
        yield client


def test_stop_is_not_held_by_a_stream_that_begins_a_send_its_client_will_not_take(make_live_server, monkeypatch):
    """A stream about to send a batch when the server stops, its client having taken all it was
    sent, is not cut off at once; its send then blocks (a small send buffer, as on a long-distance
    connection), and it is cut off STOP_GRACE later, not at the stall deadline (found by review)."""
    server = make_live_server(storage="memory")
    armed, held, go_on = threading.Event(), threading.Event(), threading.Event()
    answer = kvserver.KVRequestHandler._stream

    class HeldWriter:
        def __init__(self, writer):
            self._writer = writer

        def write(self, data):
            if armed.is_set() and data.count(b"\n\n") > 100 and not held.is_set():
                held.set()  # serving, a batch in hand, about to send it
                assert go_on.wait(10)
            return self._writer.write(data)

        def __getattr__(self, name):
            return getattr(self._writer, name)

    def stream(self, *args, **kwargs):
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
        return HeldWriter(answer(self, *args, **kwargs))

    monkeypatch.setattr(kvserver.KVRequestHandler, "_stream", stream)
    with stream_read_no_further(server):
        armed.set()
        for n in range(300):  # (the client reads nothing more)
            server.storage.put(f"{n:06d}" + "k" * 1000, b"v", content_type="application/x-" + "t" * 1000)
        assert held.wait(10)
        connections = server.server.connections
        [connection] = connections._streams
        assert (connections._state(connection), kvserver._unsent_bytes(connection)) == ("serving", 0)
        stopper = threading.Thread(target=server.stop, daemon=True)
        started = time.monotonic()
        stopper.start()
        wait_for(lambda: connections.stopping, what="the stop to have looked at the streams")
        go_on.set()
        stopper.join(10)
        assert time.monotonic() - started < kvserver.STOP_GRACE + 2  # (the housekeeping looks twice a second)


def test_stop_ends_a_stream_that_has_just_started_cleanly(make_live_server, monkeypatch):
    """Not sending yet, it is not cut off: it answers 200 and ends (found by review)."""
    server = make_live_server(storage="memory")
    in_stream, go_on = threading.Event(), threading.Event()
    answer = kvserver.KVRequestHandler._stream

    def held(self, *args, **kwargs):  # the stream is under way, about to send its head
        in_stream.set()
        assert go_on.wait(10)
        return answer(self, *args, **kwargs)

    monkeypatch.setattr(kvserver.KVRequestHandler, "_stream", held)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:
        client.sendall(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert in_stream.wait(10)
        kvserver._shut_down(server.server.connections.stop())  # what KVServer.stop does first
        go_on.set()
        received = b""
        for _ in range(100):
            piece = client.recv(65536)
            if not piece:
                break
            received += piece
    assert received.startswith(b"HTTP/1.1 200 ") and received.endswith(b"\r\n0\r\n\r\n"), received


def test_stop_cuts_off_at_once_a_stream_whose_client_stopped_reading(make_live_server):
    """Its thread, blocked in a send, held the stop until the stall deadline (over 30 s)."""
    server = make_live_server(storage="memory")
    with stream_read_no_further(server):
        media_type = "application/x-" + "t" * 1000
        for n in range(4000):  # about 8 MB of events, more than the kernel's buffers hold
            server.storage.put(f"{n:06d}" + "k" * 1000, b"v", content_type=media_type)
        connections = server.server.connections
        [stream] = connections._streams

        def blocked_in_a_send() -> bool:
            return connections._state(stream) == "serving" and kvserver._unsent_bytes(stream) > 1024 * 1024

        wait_for(blocked_in_a_send, timeout=20, what="the stream to fill the kernel's buffers")
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 1.0


# HTTP: several servers on one Redis


def test_redis_coming_back_without_its_data_resets_the_watches_at_once(make_server, make_redis, streams):
    """Its keys went with no event: an open stream, and a client that comes back with its last id,
    get a reset, without waiting for the next write."""
    redis = make_redis()
    server = make_server("--quiet", "--storage", redis.url())
    stream = open_stream(streams, server)
    put(server, "a")
    [first] = stream.events(1)
    redis.kill()
    redis.start(same_port=True)  # empty: this Redis keeps nothing on disk
    wait_for(lambda: server.get("/health").status == 200, timeout=15, what="Redis to be back")
    [reset] = stream.events(1)
    assert reset.event == "reset"
    resumed = open_stream(streams, server, headers={"Last-Event-ID": first.id})
    assert [message.event for message in resumed.events(1)] == ["reset"]
    put(server, "b")  # and on: the next change, once (no second reset)
    assert [(message.event, message.json()["key"]) for message in stream.events(1)] == [("put", "b")]


def test_a_waiting_get_answers_404_soon_after_redis_comes_back_without_its_key(make_redis):
    redis = make_redis()
    server = LiveServer(kvserver.RedisStorage(redis.url())).start()  # (in this process: its waits can be seen)
    try:
        etag = put(server, "a")
        waiting = server.connect()
        waiting.request("GET", "/kv/a?wait=60", headers={"If-None-Match": f'"{etag}"'})
        # Waiting, not only connected: else Redis may go before the request has read the key (a 503).
        wait_for(lambda: server.server.connections._watches, what="the request to wait")
        redis.kill()
        redis.start(same_port=True)
        wait_for(lambda: server.get("/kv/a").status == 404, timeout=15, what="Redis to be back without the key")
        gone = time.monotonic()
        assert waiting.getresponse().status == 404
        assert time.monotonic() - gone < 3  # not at the end of its 60 s
    finally:
        server.stop()


@pytest.fixture
def redis_servers(make_server, redis_db: RedisServer) -> tuple[Server, Server]:
    return tuple(make_server("--quiet", "--storage", redis_db.url()) for _ in range(2))


def test_a_write_through_one_kvserver_reaches_a_stream_on_another(redis_servers, streams):
    one, two = redis_servers
    stream = open_stream(streams, two)
    etag = put(one, "shared", b"value")
    one.get("/set?key=short&value=v&ttl=1")
    assert one.request("DELETE", "/kv/shared").status == 204
    messages = stream.events(4)
    assert [(message.event, message.json()["key"]) for message in messages] == [
        ("put", "shared"),
        ("put", "short"),
        ("delete", "shared"),
        ("expire", "short"),
    ]
    assert messages[0].json() == {"key": "shared", "etag": etag, "size": 5, "content_type": "application/octet-stream"}
    ids = [order(message.id) for message in messages]
    assert ids == sorted(ids) and len(set(ids)) == 4
    resumed = open_stream(streams, one, headers={"Last-Event-ID": messages[0].id})  # the ids are the store's
    assert [message.id for message in resumed.events(3)] == [message.id for message in messages[1:]]


def test_writes_through_two_kvservers_reach_both_streams_in_one_order(redis_servers, streams):
    one, two = redis_servers
    readers = [open_stream(streams, server) for server in (one, two)]

    def writer(server: Server, name: str) -> None:
        connection = server.connect()
        for n in range(50):
            put(server, f"{name}/{n % 3}", b"%d" % n, connection)

    threads = [threading.Thread(target=writer, args=(server, name)) for server, name in ((one, "a"), (two, "b"))]
    for thread in threads:
        thread.start()
    seen = [[(message.id, message.data) for message in reader.events(100)] for reader in readers]
    for thread in threads:
        thread.join()
    assert seen[0] == seen[1]
    assert [order(id) for id, _ in seen[0]] == sorted(order(id) for id, _ in seen[0])


def test_a_waiting_request_on_one_kvserver_answers_a_write_through_another(redis_servers):
    one, two = redis_servers
    etag = put(one, "k", b"old")
    change = Change(0.5, lambda: put(two, "k", b"new"))
    answer = wait_get(one, "/kv/k?wait=30", {"If-None-Match": f'"{etag}"'})
    change.join()
    assert answer.response.status == 200
    assert change.begun <= answer.answered < change.done + PROMPT


# HTTP: waiting for a change


@dataclass
class Answer:
    response: http.client.HTTPResponse
    asked: float  # time.monotonic() when the request went out
    answered: float  # ... and when its answer arrived

    @property
    def took(self) -> float:
        return self.answered - self.asked


def wait_get(server: Server, path: str, headers: dict[str, str] | None = None) -> Answer:
    connection = server.connect()
    asked = time.monotonic()
    connection.request("GET", path, headers=headers or {})
    response = connection.getresponse()
    answered = time.monotonic()
    response.read()
    return Answer(response, asked, answered)


class Change(threading.Thread):
    """`action` run after `delay` seconds in a thread; `done` is when it was answered."""

    def __init__(self, delay: float, action) -> None:
        super().__init__()
        self.delay, self.action = delay, action
        self.begun = self.done = 0.0
        self.start()

    def run(self) -> None:
        time.sleep(self.delay)
        self.begun = time.monotonic()
        self.action()
        self.done = time.monotonic()


def test_a_waiting_request_answers_within_100_ms_of_a_change_with_the_new_value(any_server):
    etag = put(any_server, "k", b"old")
    change = Change(0.5, lambda: put(any_server, "k", b"new"))
    answer = wait_get(any_server, "/kv/k?wait=30", {"If-None-Match": f'"{etag}"'})
    change.join()
    assert answer.response.status == 200 and answer.response.getheader("ETag") != f'"{etag}"'
    assert change.begun <= answer.answered < change.done + PROMPT


def test_a_waiting_request_answers_304_after_its_time_if_nothing_changed(any_server):
    etag = put(any_server, "k")
    answer = wait_get(any_server, "/kv/k?wait=1", {"If-None-Match": f'"{etag}"'})
    assert answer.response.status == 304 and answer.response.getheader("ETag") == f'"{etag}"'
    assert 1.0 <= answer.took < 1.0 + AT_ONCE


def test_without_if_none_match_a_request_waits_for_the_key_to_exist(any_server):
    change = Change(0.3, lambda: put(any_server, "new", b"here"))
    answer = wait_get(any_server, "/kv/new?wait=30")
    change.join()
    assert answer.response.status == 200
    assert change.begun <= answer.answered < change.done + PROMPT
    answer = wait_get(any_server, "/kv/absent?wait=1")
    assert answer.response.status == 404 and 1.0 <= answer.took < 1.0 + AT_ONCE


def test_a_waiting_request_answers_404_when_its_key_goes(any_server):
    etag = put(any_server, "k")
    change = Change(0.3, lambda: any_server.request("DELETE", "/kv/k"))
    answer = wait_get(any_server, "/kv/k?wait=30", {"If-None-Match": f'"{etag}"'})
    change.join()
    assert answer.response.status == 404
    assert change.begun <= answer.answered < change.done + PROMPT


def test_a_waiting_request_answers_when_its_key_expires(any_server):
    any_server.get("/set?key=k&value=v&ttl=1")
    etag = any_server.get("/kv/k").headers["ETag"]
    answer = wait_get(any_server, "/kv/k?wait=30", {"If-None-Match": etag})
    assert answer.response.status == 404 and answer.took < 1.0 + EXPIRY_DEADLINE


def test_a_change_to_a_longer_key_does_not_end_the_wait(any_server):
    etag = put(any_server, "k")
    Change(0.2, lambda: put(any_server, "k2"))
    answer = wait_get(any_server, "/kv/k?wait=1", {"If-None-Match": f'"{etag}"'})
    assert answer.response.status == 304 and answer.took >= 1.0


@pytest.mark.parametrize("held", ['"other"', None])
def test_a_client_that_holds_another_answer_gets_the_value_at_once(any_server, held):
    put(any_server, "k")
    answer = wait_get(any_server, "/kv/k?wait=30", {"If-None-Match": held} if held else {})
    assert answer.response.status == 200 and answer.took < AT_ONCE


def test_a_client_that_holds_a_value_of_a_key_that_is_gone_gets_404_at_once(any_server):
    answer = wait_get(any_server, "/kv/gone?wait=30", {"If-None-Match": '"1-2"'})
    assert answer.response.status == 404 and answer.took < AT_ONCE


@pytest.mark.parametrize("wait", ["0", "301", "abc", "1.5", "-1", "", "0010"])
def test_a_bad_wait_is_a_400(server, wait):
    put(server, "k")
    response = server.get(f"/kv/k?wait={wait}")
    assert response.status == 400
    response.problem()
