"""kvserver: a key-value server over HTTP and XML-RPC, and the storage library behind it.

Usage:
  kvserver [options]
  kvserver export [options]
  kvserver import [options]
  kvserver -h | --help
  kvserver --version

Options:
  -p --port=<int>        TCP port; 0 picks a free one and prints it [default: 4000].
  -b --bind=<addr>       Address to listen on, IPv4 or IPv6 [default: 127.0.0.1].
  -s --storage=<kind>    Where values live: files, memory, or a redis://,
                         rediss:// or unix:// URL [default: files].
  -d --data-dir=<path>   Folder of the files storage (default: ./data).
  --prefix=<p>           kvserver export: only the keys that start with <p>.
  --token=<secret>       Require this secret on every request but /health, as
                         "Authorization: Bearer <secret>" or as the Basic auth
                         password (default: the KV_TOKEN environment variable;
                         on an address that is not loopback, a random one).
  --no-token             Serve an address that is not loopback without a token.
  --max-value=<size>     Largest value accepted, in bytes or with a K, M or G
                         suffix (powers of 1024) [default: 1G].
  --max-connections=<n>  Connections served at once; more get 503 [default: 256].
  --no-fsync             Do not fsync writes: faster, but the last writes may be
                         lost on power loss.
  --certfile=<pem>       Serve HTTPS with this certificate (chain), in PEM.
  --keyfile=<pem>        The private key of --certfile, in PEM.
  -q --quiet             No access log.
  -h --help              Show this text.
  --version              Show the version.

kvserver export writes every live key of a storage (a stopped server's data dir,
or Redis) to stdout, one JSON line a key with its media type and expiry;
kvserver import reads such lines from stdin into a storage.
"""

from __future__ import annotations

import abc
import base64
import binascii
import bisect
import codecs
import collections
import contextlib
import errno
import fcntl
import functools
import hashlib
import heapq
import hmac
import html
import inspect
import io
import ipaddress
import itertools
import json
import math
import os
import re
import secrets
import select
import shutil
import signal
import socket
import socketserver
import ssl
import struct
import sys
import termios
import threading
import time
import traceback
import urllib.parse
import xml.parsers.expat
import xmlrpc.client
from collections.abc import Callable, Iterable, Iterator, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from stat import S_ISREG
from typing import IO, Any, BinaryIO, ClassVar, NamedTuple, NoReturn, Protocol, TypeVar, cast

try:
    import ctypes  # for a C library call that Python's os lacks: see _exchange
except ImportError:  # (not in every build of Python; kvserver then does without it)
    ctypes = None  # type: ignore[assignment]

__version__ = "0.1.0"
__all__ = [
    "DataDirLocked",
    "Event",
    "FileStorage",
    "KVRequestHandler",
    "KVServer",
    "MemoryStorage",
    "PreconditionFailed",
    "RedisStorage",
    "Stat",
    "Storage",
    "StorageFull",
    "StorageUnavailable",
    "Watch",
    "check_key",
    "main",
    "open_storage",
    "revision_order",
]

# How this file is built
#
# Layers, top to bottom, each using only those above it:
#
#   Keys and values   check_key, Stat, ETags and their stamps, strict JSON.
#   Watching          _ChangeFeed: each storage's changes with revisions, and the watches reading them.
#   Storage           Storage, the interface (simplekv's names plus metadata, compare-and-set, listing
#                     by folder, export/import, watch); then three backends, each one whole class:
#                     MemoryStorage, FileStorage (an _Index in memory, a file per key), RedisStorage.
#                     The HTTP and XML-RPC layers use only the Storage interface.
#   HTTP              message framing (_read_head, _RequestBody: RFC 9112, strictly); the answers and
#                     the one mapping from exceptions to statuses (_answer_to); the HTML page; the
#                     metrics; XML-RPC; KVRequestHandler, whose handlers carry their routes (@_route).
#   Server            KVServer: a thread per connection; _Connections, what each connection is
#                     doing and by when it must move on.
#   main()            the command line: serve, export, import.
#
# Threads. The main thread accepts connections (serve_forever) and answers those beyond
# --max-connections with a 503 itself. Each connection has a thread that reads its requests and
# answers them in turn; a waiting GET or an event stream holds it while it waits. The housekeeping
# thread, twice a second, cuts off connections past their deadline (sockets have no timeouts),
# frees waits whose client hung up, closes refused connections, and sweeps expired values (which
# publishes their expire events). With Redis storage, one more thread reads the shared event
# stream for the local watches.
#
# Locks, and what each guards: an _Index's 64 stripe locks serialise the changes of a key (so
# compare-and-set is atomic; readers take none) and its books lock the running totals and the
# expiry heap; a _GroupSync's lock its fsync tickets; a _ChangeFeed's lock the history ring
# and its watches' wake-ups (and, in memory and files storage, a change's becoming visible
# with its revision: taken after the key's lock, before the books lock); _Connections' lock the
# connections' states; _Metrics' lock the counters; _stamp_lock the last stamp. Writers never
# wait for watchers or for readers.
#
# A request's life: handle_one_request marks the connection idle until a byte comes, reads the
# head (a refusal is a 400 that closes the connection, and nothing runs), _dispatch checks the
# request's origin and token and finds the handler by path and method; the handler reads a body
# through _RequestBody, calls the storage, and answers through _send*, whose head and small body
# leave in one write; the access log and the metrics are written before it is flushed.


# Keys and values

MAX_KEY_BYTES = 1024
SMALL_VALUE = 64 * 1024  # held in memory by FileStorage, inlined in the / dump
CHUNK = 64 * 1024  # unit of every streamed read and write
_IOV_MAX = max(16, os.sysconf("SC_IOV_MAX"))  # pieces one writev(2) takes (1,024 on Linux; -1 is "no limit")
DEFAULT_CONTENT_TYPE = "application/octet-stream"
TEXT_CONTENT_TYPE = "text/plain; charset=utf-8"

_CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f]")
_MEDIA_TYPE = re.compile("[\x21-\x7e]([\t\x20-\x7e]*[\x21-\x7e])?")  # an HTTP field value of ASCII, trimmed
MAX_MEDIA_TYPE = 1024  # characters: so an export line's head always fits in what import reads of it at once


def check_key(key: object) -> str:
    """Return `key` if it is a valid key, else raise ValueError saying which rule it breaks.

    A key is 1 to 1024 bytes of UTF-8 without control characters (U+0000-U+001F, U+007F) and
    without U+FFFE and U+FFFF, which XML 1.0 cannot carry (XML-RPC's keys() lists every key).
    """
    if not isinstance(key, str):
        raise ValueError(f"a key is a str, not {type(key).__name__}")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"key {key!r} is not valid UTF-8 (it holds a lone surrogate)") from None
    if not 1 <= size <= MAX_KEY_BYTES:
        raise ValueError(f"a key is 1 to {MAX_KEY_BYTES} bytes of UTF-8, not {size}")
    if _CONTROL_CHARACTER.search(key):
        raise ValueError(f"key {key!r} holds a control character (U+0000-U+001F or U+007F)")
    if "\ufffe" in key or "\uffff" in key:
        raise ValueError(f"key {key!r} holds U+FFFE or U+FFFF, which XML cannot carry")
    return key


def _check_media_type(content_type: object) -> str:
    """Return `content_type` if a value may be stored with it, else raise ValueError: it is
    sent back as a Content-Type field, so it is printable ASCII (tabs too, as between the
    parameters of a media type), not empty, with no space or tab at either end, and at most
    MAX_MEDIA_TYPE characters."""
    if not isinstance(content_type, str) or not _MEDIA_TYPE.fullmatch(content_type):
        raise ValueError(
            "a media type is printable ASCII (and tabs), as an HTTP field value, not empty and without "
            f"whitespace around it; not {content_type!r}"
        )
    if len(content_type) > MAX_MEDIA_TYPE:
        raise ValueError(f"a media type is at most {MAX_MEDIA_TYPE} characters, not {len(content_type)}")
    return content_type


def _stored_media_type(content_type: str) -> str:
    """A media type as a backend reads it back, in the form kvserver takes now, so that it is
    sent, watched and exported as import takes it. Earlier versions stored it as given: space
    or tab around it is trimmed, and an empty one (or one still refused: longer than
    MAX_MEDIA_TYPE, or another program's, in Redis) reads as DEFAULT_CONTENT_TYPE, as a message
    without one is taken (RFC 9110 section 8.3)."""
    try:
        return _check_media_type(content_type.strip(" \t"))
    except ValueError:
        return DEFAULT_CONTENT_TYPE


def _sniff_content_type(data: bytes) -> str:
    """The media type of a value that came without one: text if it is UTF-8, else bytes."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return DEFAULT_CONTENT_TYPE
    return TEXT_CONTENT_TYPE


def _is_text(content_type: str) -> bool:
    """Whether values of this media type are UTF-8 text (text/*, charset=utf-8 or none)."""
    kind, _, params = content_type.partition(";")
    charset = re.search(r"charset\s*=\s*\"?([\w-]+)", params, re.IGNORECASE)
    return kind.strip().lower().startswith("text/") and (
        charset is None or charset.group(1).lower() in ("utf-8", "utf8", "us-ascii")
    )


class _JSONBeyondLimits(ValueError):
    """JSON that is valid but beyond what other readers take: a number beyond the range of a
    double (1e400, which most read as infinity), or nesting too deep for Python's parser."""


def _excerpt(text: str) -> str:
    """`text` quoted for a message, cut to its first 20 characters."""
    return repr(text) if len(text) <= 20 else f"{text[:20]!r}... ({len(text)} characters)"


def _parse_json(data: bytes) -> Any:
    """A JSON value read strictly, so that it can be written back as JSON and XML: ValueError
    if `data` is not UTF-8 JSON, holds NaN or Infinity (Python's json reads them), a number
    beyond a double's range (1e400: Python reads it as inf, or as an int no other reader can
    take), or a lone surrogate (\\ud800: not a character, cannot be written as UTF-8); its
    subclass _JSONBeyondLimits for such numbers and for nesting too deep for Python's parser
    (about 900 levels)."""

    def reject(constant: str) -> NoReturn:
        raise ValueError(f"{constant} is not JSON")

    def finite_float(text: str) -> float:
        number = float(text)
        if math.isinf(number):
            raise _JSONBeyondLimits(f"the value holds a number beyond the range of a double, {_excerpt(text)}")
        return number

    def finite_int(text: str) -> int:
        if len(text) > 300:  # fewer digits always fit in a double
            finite_float(text)
        return int(text)

    try:
        value = json.loads(data.decode("utf-8"), parse_constant=reject, parse_float=finite_float, parse_int=finite_int)
    except RecursionError:
        raise _JSONBeyondLimits("the value nests deeper than Python's JSON parser goes") from None
    if _SURROGATE_ESCAPE.search(data) and _holds_surrogate(value):
        raise ValueError("a JSON string holds a lone surrogate")
    return value


# Strict JSON out: non-ASCII characters as themselves (not \\u escapes), ValueError for a float
# that is not finite, which JSON has no form for. One encoder for every answer and event:
# json.dumps with arguments makes a new one each call, a third of its cost for a small document.
_JSON = json.JSONEncoder(ensure_ascii=False, allow_nan=False)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _holds_surrogate(value: Any) -> bool:
    """Whether a parsed JSON value holds a str with a surrogate (a key or a string, at any depth)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, dict):
            pending.extend(item)
            pending.extend(item.values())
    return False


_JSON_STRING_LITERAL = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # unrolled: fast on long strings


def _count_json_items(data: bytes) -> int:
    """How many items the arrays and objects of a JSON text hold, at any depth, counted without
    parsing it (exactly, if it is JSON): its commas, and one more in each non-empty container."""
    skeleton = _JSON_STRING_LITERAL.sub(b"0", data).translate(None, b" \t\r\n")
    containers = skeleton.count(b"[") + skeleton.count(b"{") - skeleton.count(b"[]") - skeleton.count(b"{}")
    return skeleton.count(b",") + containers


def _is_json(content_type: str) -> bool:
    """Whether the media type is application/json, whatever its parameters."""
    return content_type.partition(";")[0].strip().lower() == "application/json"


class Stat(NamedTuple):
    """What is known about a stored value besides its bytes."""

    size: int
    content_type: str
    etag: str  # unquoted; changes with every write, survives restarts
    expires_at: float | None  # Unix time, or None for no TTL

    def seconds_left(self) -> int | None:
        """The whole seconds until the value expires, rounded up (at least 1); None without a TTL."""
        return None if self.expires_at is None else max(1, math.ceil(self.expires_at - time.time()))


def _etag(size: int, stamp: int) -> str:
    """The ETag of a value of `size` bytes written at `stamp` (a unique nanosecond time)."""
    return f"{size:x}-{stamp:x}"


_stamp_lock = threading.Lock()
_last_stamp = 0


def _new_stamp() -> int:
    """A nanosecond timestamp later than every earlier one in this process.

    Stamps are the second half of ETags: unique stamps make every write's ETag new.
    """
    global _last_stamp
    with _stamp_lock:
        _last_stamp = max(time.time_ns(), _last_stamp + 1)
        return _last_stamp


_FOLDER_CLOCK_MARGIN = 100_000_000  # ns: a clock tick, and the moment between a removal and its revision


def _stamps_after(stamp: int) -> None:
    """Make every later stamp larger than `stamp` (a modification time found on disk), so that
    a clock set back, or a file dated in the future, cannot make an ETag repeat."""
    global _last_stamp
    with _stamp_lock:
        _last_stamp = max(_last_stamp, stamp)


def _expiry(ttl: int | None) -> float | None:
    """The Unix time a value written now with `ttl` seconds to live expires."""
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 < ttl < 10**12:
        raise ValueError(f"a TTL is a whole number of seconds from 1 to 10**12 - 1, not {ttl!r}")
    return time.time() + ttl


# Watching for changes

HISTORY = 10_000  # changes a storage remembers, for watchers that resume or fall behind
HEARTBEAT = 15.0  # seconds of silence after which an event stream sends a comment line
# An event stream sends at most once in this many seconds: after a send it pauses this long, and
# then sends all that came meanwhile (a change after a longer quiet spell leaves at once). Under
# a flood of writes each open stream then costs the server two sends a second, not one per
# write; and a busy stream finds changes after each pause, so it never waits for one (each write
# wakes every stream waiting under its prefix). Each pause costs the server its wake-up, and
# the GIL handed over and back: with 100 busy streams, writes kept 0.88x of their rate without
# them at 0.2 s, 0.94x to 0.97x at 0.5 s.
COALESCE = 0.5
MAX_WAIT = 300  # seconds a GET /kv/<key>?wait=<s> may wait for a change
# Most events handed to a watcher at once (and read from Redis's stream at once): the feed's
# lock is held briefly, and an event stream holds one batch's messages at a time (with a prefix,
# its own copy: about 150 KB, or 1.2 MB with keys of 1 KiB). A batch ends at a page's end (where
# it can), so that streams send whole pages (see _ChangeFeed.messages). (Batches of 256 took
# 100 streams of every write a third more CPU.)
_PAGE = 64
_WATCH_BATCH = 16 * _PAGE
_REVISION = re.compile(r"[0-9]{1,20}(-[0-9]{1,20})?")


class Event(NamedTuple):
    """One change of a storage, as `Storage.watch` yields it.

    `type` is "put" (`stat` is then the new value's), "delete" or "expire" (`stat` is None);
    or "reset" (`key` and `stat` None): the watcher missed changes, because it resumed from a
    revision the storage no longer remembers or fell more than HISTORY changes behind; list
    the keys again, then go on from `revision`.

    `revision` is an opaque token that grows with every change of the store and never
    repeats: a later change has a larger one (`revision_order` compares them).
    """

    revision: str
    type: str
    key: str | None
    stat: Stat | None


def revision_order(revision: str) -> tuple[int, ...]:
    """A sort key for revisions: '<n>' (memory and files storage: a nanosecond stamp) or
    '<ms>-<n>' (Redis storage: a stream entry ID). ValueError for anything else."""
    if not isinstance(revision, str) or not _REVISION.fullmatch(revision):
        raise ValueError(f"a revision is a number or two joined by '-', as in an event's id, not {revision!r}")
    return tuple(int(part) for part in revision.split("-"))


def _check_timeout(timeout: object) -> None:
    """ValueError unless `timeout` is None or a number of seconds, at least 0 (inf: no limit)."""
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0):
        raise ValueError(f"a timeout is a number of seconds, at least 0, or None; not {timeout!r}")


def _event_message(event: Event) -> bytes:
    """An event as a Server-Sent Events message: its revision as id, its type, JSON data.
    (The feed keeps each event's message for every stream: see _ChangeFeed.messages. It is
    written here field by field, at a third of the cost of json.dumps of a dict, since every
    change makes one while a stream is open.)"""
    if event.type == "reset":
        data = f'{{"revision": {_JSON.encode(event.revision)}}}'
    elif event.stat is not None:
        stat = event.stat
        data = (
            f'{{"key": {_JSON.encode(event.key)}, "etag": {_JSON.encode(stat.etag)}, "size": {stat.size}, '
            f'"content_type": {_JSON.encode(stat.content_type)}}}'
        )
    else:
        data = f'{{"key": {_JSON.encode(event.key)}}}'
    return f"id: {event.revision}\nevent: {event.type}\ndata: {data}\n\n".encode()


_Entries = TypeVar("_Entries")


class _Batch(NamedTuple):
    """What a watch reads at once: its events; the numbers of those that are in the feed's
    ring (a range if the watch kept every event of the batch: no prefix, nothing skipped; none
    for a reset); their event-stream messages, or None where none is made yet."""

    numbers: Sequence[int]
    events: list[Event]
    messages: list[bytes | None]


class _ChangeFeed:
    """A storage's changes in the order they took effect: the last HISTORY of them in a ring,
    and the watches reading them.

    A backend publishes each change at the moment it takes effect, under the key's lock, so
    that the events of one key follow the order of its writes; a revision is taken under the
    feed's lock, so revision order is publication order. Memory and files storage make a
    change visible under that lock too (`publishing`), so that a change made by someone who
    saw another is published after it. Writers never wait for watchers:
    publishing stores the event and wakes the watches waiting for one under their prefix
    (its cost grows with the number of different prefixes waited on, not of watches); each
    watch reads at its own pace, and one that falls a whole ring behind, or behind a gap in
    the feed's source (see gap), gets a reset, unless it would have skipped all it missed
    (see position).

    The history begins at the first publication or watch (so after FileStorage has loaded):
    `begin` then gives the revision before the first change this feed knows, and the events
    it already knows after it (Redis storage: the tail of its stream).
    """

    def __init__(self, begin: Callable[[], tuple[str, list[Event]]] | None = None, capacity: int = HISTORY) -> None:
        self._lock = threading.RLock()  # (reentrant: see publishing)
        self._begin = begin or (lambda: (str(_new_stamp()), []))
        # The ring, as three lists: event n, its revision_order and its event-stream message
        # (once a stream has made it) are at [n % capacity] while n >= _oldest, so that a batch
        # of events, or of messages, is a slice.
        self._events: list[Event | None] = [None] * capacity
        self._orders: list[tuple[int, ...]] = [()] * capacity
        self._messages: list[bytes | None] = [None] * capacity
        self._pages: dict[int, bytes] = {}  # by the number of its first event: a page's messages, joined
        self._count = 0  # events published
        self._oldest = 0  # the number of the oldest event in the ring
        self._floor: tuple[int, ...] | None = None  # every change after this revision is in the ring
        self._last = ""  # the latest revision: of the last event, else the floor
        self._last_order: tuple[int, ...] = ()
        self._waiting: dict[str, set[Watch]] = {}  # by prefix: the watches waiting for a change under it
        self._pausing: set[Watch] = set()  # the watches in a pause before they read (see read)
        self._closed = False

    def _start(self) -> None:
        """Begin the history, once (called under the lock)."""
        if self._floor is None:
            floor, events = self._begin()
            self._floor = self._last_order = revision_order(floor)
            self._last = floor
            for event in events:
                self._append(revision_order(event.revision), event)

    @property
    def count(self) -> int:
        """The number the next event published gets (the events published, and a gap counts one)."""
        return self._count

    def publishing(self) -> contextlib.AbstractContextManager[bool]:
        """What to hold (`with`) while a change becomes visible and is published, so that no
        other change is published in between: the revision order is then the order in which
        the changes became visible (SPEC section 4). It is the feed's lock."""
        return self._lock

    def publish(self, type: str, key: str, stat: Stat | None = None, revision: str | None = None) -> Event:
        """Record a change that just took effect and wake the watches waiting for it; a
        revision is made (a new stamp) unless given (it must then be larger than the last)."""
        with self._lock:
            self._start()
            order: tuple[int, ...]
            if revision is None:
                stamp = _new_stamp()
                revision, order = str(stamp), (stamp,)
            else:
                order = revision_order(revision)
            event = Event(revision, type, key, stat)
            sequence = self._append(order, event)
            for prefix in [prefix for prefix in self._waiting if key.startswith(prefix)]:
                for watch in self._waiting.pop(prefix):
                    watch._woken_by = sequence
                    watch._wake.notify()
            return event

    def _append(self, order: tuple[int, ...], event: Event) -> int:
        slot = self._count % len(self._events)
        if self._events[slot] is not None:  # the oldest event, which leaves the history
            self._floor = self._orders[slot]
            self._pages.pop(self._oldest, None)  # (if it began one)
            self._oldest += 1
        self._events[slot], self._orders[slot], self._messages[slot] = event, order, None
        self._last, self._last_order = event.revision, order
        self._count += 1
        return self._count - 1

    def position(self, after: str | None, newest: str | None) -> tuple[int, str | None, tuple[int, ...], str]:
        """Where a watch starts: the number of its first event; the revision of the reset it
        starts with if `after` is a revision this feed does not remember changes since; the
        revision_order up to which it skips the events it reads (() for none); and the revision
        it reads the changes after (`after`, or without it the newest known as it starts).

        `newest` is the newest revision of the feed's source as the watch is made, when the
        feed may not have read that far yet (Redis storage: other kvservers write the stream
        too). Instead of waiting for the feed to catch up, the watch then starts at the end of
        what the feed has, and skips what comes up to `newest` (without `after`, or with a
        reset) or up to `after` (if the feed has not read that far): it sees each change after
        its start once. It skips through its start (or its reset's revision) in any case: just
        after a gap, the feed's last revision is one whose change it has yet to publish. Changes
        it would skip do not make it fall behind (see _take)."""
        order = () if after is None else revision_order(after)
        newest_order = () if newest is None else revision_order(newest)
        with self._lock:
            self._start()
            assert self._floor is not None
            if after is None:
                if newest is not None and newest_order > self._last_order:
                    return self._count, None, newest_order, newest
                return self._count, None, self._last_order, self._last
            if self._last_order < order <= newest_order:
                return self._count, None, order, after
            if not self._floor <= order <= self._last_order:  # forgotten, or never made
                if newest_order > self._last_order:  # (the reset is then at the source's newest)
                    return self._count, newest, newest_order, after
                return self._count, self._last, self._last_order, after  # (as _reset_at_last)
            orders = self._orders
            kept = range(self._oldest, self._count)
            index = bisect.bisect_right(kept, order, key=lambda n: orders[n % len(orders)])
            return kept.start + index, None, order, after

    def read(self, watch: Watch, timeout: float | None, pause: float = 0.0) -> _Batch:
        """The watch's next events, waiting up to `timeout` seconds (None: no limit) for one,
        after `pause` seconds in which it reads none (what comes meanwhile is read together);
        none when the time is up or the watch is closed (which also ends a pause)."""
        paused = time.monotonic() + max(0.0, pause)
        deadline = None if timeout is None else paused + timeout
        with self._lock:
            if pause > 0:
                self._pause(watch, paused)
            while not watch.closed:
                if self._closed:
                    watch.closed = True
                    break
                batch = self._take(watch)
                if batch.events:
                    return batch
                if watch._next < self._count:
                    continue  # a batch held none for this watch; there is more
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                watch._woken_by = None
                self._waiting.setdefault(watch.prefix, set()).add(watch)
                try:  # (a wait ends by threading.TIMEOUT_MAX, some 292 years, at the latest: then it goes on)
                    watch._wake.wait(None if remaining is None else min(remaining, threading.TIMEOUT_MAX))
                finally:
                    if watch._woken_by is None:  # no change under its prefix came: skip what did
                        self._stop_waiting(watch)
                        watch._next = self._count  # (a skip still pending is below every later event)
                    else:  # what came before the change that woke it was not for it
                        watch._next = max(watch._next, watch._woken_by)
            return _Batch((), [], [])

    def _pause(self, watch: Watch, until: float) -> None:
        """Wait until the monotonic time `until`, unless the watch or the feed is closed first
        (called under the lock; no change wakes it)."""
        self._pausing.add(watch)
        try:
            while not watch.closed and not self._closed and (left := until - time.monotonic()) > 0:
                watch._wake.wait(left)
        finally:
            self._pausing.discard(watch)

    def _stop_waiting(self, watch: Watch) -> None:
        waiting = self._waiting.get(watch.prefix, set())
        waiting.discard(watch)
        if not waiting:
            self._waiting.pop(watch.prefix, None)

    def _take(self, watch: Watch) -> _Batch:
        """The events for `watch` in the next batch it has not read, but those it skips (see
        position); a reset if it missed changes (called under the lock)."""
        if watch._next < self._oldest:  # the history moved on without it (a whole ring, or a gap)
            if self._missed(watch):
                self._reset_at_last(watch)
                watch._next = self._count
            else:
                watch._next = self._oldest
        if watch._reset is not None:
            reset, watch._reset = watch._reset, None
            return _Batch((), [Event(reset, "reset", None, None)], [None])
        stop = watch._next + _WATCH_BATCH
        if stop % _PAGE < _WATCH_BATCH:  # end at a page's end (see messages)
            stop -= stop % _PAGE
        numbers = range(watch._next, min(self._count, stop))
        watch._next = numbers.stop
        events = cast(list[Event], self._slice(self._events, numbers))  # (no None in the kept part)
        messages = self._slice(self._messages, numbers)
        skip = watch._skip_through
        if not watch.prefix and not skip:
            return _Batch(numbers, events, messages)
        kept = [i for i, event in enumerate(events) if event.key.startswith(watch.prefix)]  # type: ignore[union-attr]
        if skip:  # changes from before the watch began (or up to its `after`) that the feed read since
            orders = self._slice(self._orders, numbers)
            kept = [i for i in kept if orders[i] > skip]
            if orders and orders[-1] >= skip:
                watch._skip_through = ()  # the feed is past them
        return _Batch([numbers[i] for i in kept], [events[i] for i in kept], [messages[i] for i in kept])

    def _reset_at_last(self, watch: Watch) -> None:
        """Give `watch` a reset at the latest revision, after which it reads only the changes
        after that one (called under the lock): the listing a reset calls for holds the rest,
        even the change of that revision when a gap's (see gap) is published after it."""
        watch._reset, watch._skip_through = self._last, self._last_order

    def _missed(self, watch: Watch) -> bool:
        """Whether `watch`, behind the history, missed changes it would not have skipped
        (called under the lock). What it missed is at most the floor: the newest change that
        left the ring, or, after a gap, the changes before the gap's revision."""
        assert self._floor is not None
        return watch._skip_through < self._floor

    @staticmethod
    def _slice(ring: list[_Entries], numbers: range) -> list[_Entries]:
        """The entries of `numbers` (consecutive, and no more than the ring holds) in one of
        the ring's lists."""
        start = numbers.start % len(ring)
        stop = start + len(numbers)
        if stop <= len(ring):
            return ring[start:stop]
        return ring[start:] + ring[: stop - len(ring)]  # the batch wraps around the ring's end

    def messages(self, batch: _Batch) -> list[bytes]:
        """The batch's events as event-stream messages, in pieces to send in turn. Every open
        stream sends the same recent events, so each message is made once, by the first stream
        that sends it, and kept in the ring beside its event for the others; and the messages of
        each page (the _PAGE events from a multiple of _PAGE on) are joined once, by the first
        stream that sends the whole page (or by each of those that do so at once), for the
        others. A stream of every change then sends pages, and joins the messages of the events
        before its first page and after its last. (With pages, 100 streams of every write took
        a quarter less CPU.)"""
        numbers = batch.numbers
        if not isinstance(numbers, range):  # a reset, or the events a watch's prefix or skip kept
            return [self._joined(batch, 0, len(batch.events))]
        pieces = []
        page = min(numbers.stop, -(-numbers.start // _PAGE) * _PAGE)  # the first page's first event
        if page > numbers.start:
            pieces.append(self._joined(batch, 0, page - numbers.start))
        while page + _PAGE <= numbers.stop:
            joined = self._pages.get(page)
            if joined is None:
                joined = self._joined(batch, page - numbers.start, page + _PAGE - numbers.start)
                with self._lock:
                    if page >= self._oldest:  # still in the ring
                        self._pages[page] = joined
            pieces.append(joined)
            page += _PAGE
        if page < numbers.stop:
            pieces.append(self._joined(batch, page - numbers.start, len(numbers)))
        return pieces

    def _joined(self, batch: _Batch, start: int, stop: int) -> bytes:
        """The messages of the batch's events[start:stop], joined. (The join also finds a
        message not yet made: it refuses the None in its place. Checking first, and counting
        the bytes of each message to send, took half of a stream's Python time per event.)"""
        messages = batch.messages[start:stop]
        with contextlib.suppress(TypeError):
            return b"".join(cast(list[bytes], messages))
        events = batch.events[start:stop]
        made = [message or _event_message(event) for event, message in zip(events, messages, strict=True)]
        with self._lock:  # (a reset has no number: it is in no slot)
            for number, event, message in zip(batch.numbers[start:stop], events, made, strict=False):
                slot = number % len(self._events)
                if self._events[slot] is event:  # still in the ring
                    self._messages[slot] = message
        return b"".join(made)

    def gap(self, revision: str) -> None:
        """Changes before `revision` may have been missed (the Redis stream was trimmed past its
        reader), and the history begins again at `revision`, whose change comes next: every
        watch gets a reset at `revision` (and then the changes after it), but one that skips
        every change up to `revision` anyway (see position) goes on without one."""
        with self._lock:
            self._start()
            self._events = [None] * len(self._events)
            self._messages = [None] * len(self._events)
            self._pages.clear()
            self._count += 1  # a number no event has: every watch is now behind the history (see _take)
            self._oldest = self._count
            self._floor = self._last_order = revision_order(revision)
            self._last = revision
            for watches in self._waiting.values():  # (the others find themselves behind: see _take)
                for watch in watches:
                    if self._missed(watch):
                        self._reset_at_last(watch)
                    watch._woken_by = self._count
                    watch._wake.notify()
            self._waiting.clear()

    def close_watch(self, watch: Watch) -> None:
        with self._lock:
            watch.closed = True
            watch._wake.notify()

    def close(self) -> None:
        """End every watch (the storage closes)."""
        with self._lock:
            self._closed = True
            for watch in self._pausing.union(*self._waiting.values()):
                watch._wake.notify()


class Watch(Iterator[Event]):
    """What `Storage.watch` returns: an iterator over the changes under a prefix.

    `close()`, from any thread, ends the iteration at once (and a `with` block closes it), as
    does the end of its `timeout`; once ended, it stays ended (StopIteration on every later
    `next`, as Python's iterator protocol asks). `wait(timeout)` is the step underneath, for a
    caller that does something between events, and goes on working after the iteration ended.

    `after` is the revision it gives the changes after: the one it was made with, or else the
    newest as it began. A later watch made with `after=watch.after` misses nothing between the
    two, even if this one gave no event.
    """

    def __init__(
        self, feed: _ChangeFeed, prefix: str, after: str | None, timeout: float | None, newest: str | None = None
    ) -> None:
        self.prefix = prefix
        self.closed = False
        self._feed = feed
        self._wake = threading.Condition(feed._lock)
        self._woken_by: int | None = None  # the number of the event that ended its last wait
        # Its next event's number; the reset it is to get first; the revision_order up to
        # which it skips changes (from before it began, which the feed read after it began).
        self._next, self._reset, self._skip_through, self.after = feed.position(after, newest)
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._pending: list[Event] = []
        self._ended = False  # the iteration raised StopIteration

    def wait(self, timeout: float | None) -> list[Event]:
        """The events that came since the last call, in revision order, waiting up to `timeout`
        seconds (None: no limit) for one; [] if the time is up or the watch is closed.
        ValueError for a timeout that is not a number of seconds, at least 0, or None."""
        _check_timeout(timeout)
        return self._feed.read(self, timeout).events

    def wait_messages(self, timeout: float | None, pause: float = 0.0) -> Iterator[list[bytes]]:
        """Like `wait`, after `pause` seconds in which it reads none (what comes meanwhile is
        read together; `close()` ends it at once): the events as Server-Sent Events messages,
        a batch at a time, each in pieces to send in turn. The first batch is read by this call
        (none if the time is up); the others, up to all that had come by the end of the wait (a
        flood of writes cannot keep it going), as the iterator is consumed: a stream sends each
        before it reads the next, and so holds one batch at a time."""
        batch = self._feed.read(self, timeout, pause)
        return self._batches(batch, self._feed.count)

    def _batches(self, batch: _Batch, end: int) -> Iterator[list[bytes]]:
        while batch.events:
            yield self._feed.messages(batch)
            if self._next >= end:
                return
            batch = self._feed.read(self, 0)

    def __next__(self) -> Event:
        while not self._pending:
            if self._ended:
                raise StopIteration
            remaining = None if self._deadline is None else max(0.0, self._deadline - time.monotonic())
            self._pending = self.wait(remaining)  # (at the end of the time, what has come already)
            self._ended = not self._pending and (self.closed or remaining == 0)
        return self._pending.pop(0)

    def close(self) -> None:
        self._feed.close_watch(self)

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# Storage: the interface every backend offers


class PreconditionFailed(Exception):
    """A conditional write or delete found the value not as the caller expected."""


class StorageUnavailable(RuntimeError):
    """The storage cannot serve the call now (Redis down, loading its data, a read-only
    replica, busy running a script); nothing was changed, and the same call may work later.
    Where a change may have been made all the same (Redis did not answer, or an ACL allowed
    only some of a write's commands), the message says so: read the key before writing again."""


class StorageFull(StorageUnavailable):
    """The storage has no room for the write (Redis at its maxmemory; or a full disk, as an
    import reports it: see Storage.import_); the write stored nothing, and reads and deletes
    go on working."""


BUFFER = 1024 * 1024  # what a streamed value is read into before it is written, in one call


class _SupportsReadinto(Protocol):
    """A source of bytes that fills a buffer, as binary files do: `readinto` returns how many
    bytes it put there, 0 at the end (and raises if the source fails half way)."""

    def readinto(self, buffer: memoryview, /) -> int | None: ...


_Pieces = Iterable[bytes | bytearray | memoryview]  # a value as a backend's _write gets it: see _pieces
_Source = bytes | bytearray | memoryview | _Pieces | _SupportsReadinto | IO[bytes] | str | os.PathLike[str]
_spare_buffers: list[bytearray] = []  # BUFFER-sized, for reuse (list.pop and .append are atomic)


def _pieces(source: _Source) -> _Pieces:
    """The bytes of a value from bytes, an iterable of bytes-like chunks, an object with
    `readinto` (binary files), one with only `read`, or a path. A piece may be a view of a
    reused buffer, so it is valid only until the next piece is asked for."""
    if isinstance(source, bytes):
        return (source,)
    if isinstance(source, (bytearray, memoryview)):
        view = memoryview(source)
        return (view.cast("B") if view.c_contiguous else view.tobytes(),)  # counted in bytes, whatever its items
    if isinstance(source, (str, os.PathLike)):
        return _file_pieces(source)
    if hasattr(source, "readinto"):
        return _buffered_pieces(cast(_SupportsReadinto, source))
    if hasattr(source, "read"):
        readable = cast(IO[bytes], source)
        return iter(lambda: readable.read(CHUNK), b"")
    if not isinstance(source, Iterable):
        raise ValueError(f"a value is bytes, chunks, a binary file or a path; not {type(source).__name__}")
    return source


def _file_pieces(path: str | os.PathLike[str]) -> Iterator[memoryview]:
    with open(path, "rb", buffering=0) as file:
        yield from _buffered_pieces(file)


def _buffered_pieces(source: _SupportsReadinto) -> Iterator[memoryview]:
    """What `source` holds, read into a reused buffer of BUFFER bytes; a piece is a full buffer
    (but the last), so that writing it is one system call whatever sizes the source reads in."""
    try:
        buffer = _spare_buffers.pop()
    except IndexError:  # none spare (or another thread took the last one)
        buffer = bytearray(BUFFER)
    try:
        view = memoryview(buffer)
        filled = 0
        while True:
            count = source.readinto(view[filled:])
            if count is None:  # (not the end: a non-blocking file with no bytes ready)
                raise ValueError("the source has no bytes ready (a non-blocking file); give one that waits for them")
            if count:
                filled += count
                if filled < BUFFER:
                    continue
            if filled:
                yield view[:filled]
            if not count:
                return
            filled = 0
    finally:
        if len(_spare_buffers) < 4:
            _spare_buffers.append(buffer)


def _join(pieces: _Pieces) -> bytes:
    """All the pieces as one bytes object (copied as they come: a piece may be a reused buffer)."""
    value = bytearray()
    for piece in pieces:
        value += piece
    return bytes(value)


class _NewValue(NamedTuple):
    """What a write stores: the value, as pieces to read once, with its metadata."""

    pieces: _Pieces
    content_type: str
    expires_at: float | None  # Unix time, or None for no TTL


class _Precondition(NamedTuple):
    """What a conditional write or delete expects of the current value."""

    if_match: str | None  # an ETag, or "*" for any value
    if_none_match: bool  # True: there must be no value

    def check(self, key: str, current_etag: str | None) -> None:
        """Raise PreconditionFailed unless the value with `current_etag` (None: no value) is as expected."""
        if self.if_none_match and current_etag is not None:
            raise PreconditionFailed(f"key {key!r} exists, and the write asked for none (If-None-Match)")
        if self.if_match is not None:
            if current_etag is None:
                raise PreconditionFailed(f"key {key!r} does not exist, and the write asked for a value (If-Match)")
            if self.if_match not in ("*", current_etag):
                raise PreconditionFailed(
                    f"key {key!r} has ETag {current_etag!r}, not {self.if_match!r}: someone changed it; read it again"
                )


_LEVEL_BATCH = 256  # keys read at a time by a listing with a delimiter


def _folder(key: str, prefix: str, delimiter: str) -> str | None:
    """The folder `key` lies in, one level below `prefix`: the key up to and including the
    first `delimiter` after the prefix; None if the delimiter does not follow the prefix."""
    if not key.startswith(prefix):
        return None
    cut = key.find(delimiter, len(prefix))
    return key[: cut + len(delimiter)] if cut >= 0 else None


def _past_folder(folder: str) -> str:
    """A cursor for `after` that every key starting with `folder` precedes, and every other
    key that follows the folder follows: the folder, then U+10FFFF (the last code point) one
    time more than the bytes a key has left after it (a key is at most 1024 bytes, so what
    follows the folder in it is at most that many characters, each at most U+10FFFF)."""
    return folder + "\U0010ffff" * max(0, MAX_KEY_BYTES + 1 - len(folder.encode("utf-8", "surrogatepass")))


# The export format (SPEC section 4): one JSON object a line, fields in this order,
# {"key": k, "content_type": t, "expires_at": <Unix seconds> or null, "value": "<base64>"}.
# Values are streamed both ways, so the reader below parses a line's head with a regex and
# decodes its value as it arrives instead of handing the whole line to json.

_BASE64_BLOCK = CHUNK // 4 * 3  # bytes whose base64 is CHUNK characters, with no padding
_JSON_STRING = rb'"(?:[^"\\\n]|\\.)*"'
_LINE_HEAD = re.compile(
    rb'[ \t]*\{[ \t]*"key"[ \t]*:[ \t]*(' + _JSON_STRING + rb")[ \t]*,"
    rb'[ \t]*"content_type"[ \t]*:[ \t]*(' + _JSON_STRING + rb")[ \t]*,"
    rb'[ \t]*"expires_at"[ \t]*:[ \t]*(null|-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)[ \t]*,'
    rb'[ \t]*"value"[ \t]*:[ \t]*"'
)
_LINE_TAIL = re.compile(rb"[ \t]*\}[ \t]*\r?\n")
_LAST_LINE_TAIL = re.compile(rb"[ \t]*\}[ \t]*\r?")  # the last line may end without a newline
_NOT_BLANK = re.compile(rb"[^ \t\r]")
_MAX_LINE_HEAD = 64 * 1024
_LINE_SHAPE = '{"key": k, "content_type": t, "expires_at": <Unix seconds> or null, "value": "<base64>"}'


class _Writable(Protocol):
    def write(self, data: bytes, /) -> object: ...


def _export_head(key: str, stat: Stat) -> bytes:
    """A line of the export format up to the opening quote of its value."""
    fields = [json.dumps(key, ensure_ascii=False), json.dumps(stat.content_type), json.dumps(stat.expires_at)]
    return '{{"key": {}, "content_type": {}, "expires_at": {}, "value": "'.format(*fields).encode()


def _base64_pieces(body: BinaryIO) -> Iterator[bytes]:
    """The base64 of what a file holds, a block at a time (padding only at the very end)."""
    rest = b""
    while block := body.read(_BASE64_BLOCK):
        block = rest + block
        whole = len(block) - len(block) % 3
        rest = block[whole:]
        yield base64.b64encode(block[:whole])
    yield base64.b64encode(rest)


class _ExportReader:
    """Reads the export format line by line from chunks of bytes, holding a chunk and a line's
    head at most: `head()` parses a line up to its value, then `value()` gives the value's
    bytes as they are decoded. Both raise ValueError saying what is wrong with the line
    `number`."""

    def __init__(self, chunks: _Pieces) -> None:
        self._chunks = iter(chunks)  # each copied into the buffer before the next is read
        self._buffer = b""
        self._at = 0  # where the part of the buffer not read yet begins
        self.number = 0  # of the line being read

    def _fill(self) -> bool:
        """Append the next chunk of input to what is left of the buffer (what was read goes
        here, once a chunk, not line by line); False at the end of the input."""
        for chunk in self._chunks:
            if chunk:
                self._buffer = self._buffer[self._at :] + chunk
                self._at = 0
                return True
        return False

    def _left(self) -> int:
        """How many bytes of the buffer are not read yet."""
        return len(self._buffer) - self._at

    def head(self) -> tuple[str, str, float | None] | None:
        """The key, media type and expiry of the next line; None at the end of the input.
        Blank lines are skipped."""
        while True:
            not_blank = _NOT_BLANK.search(self._buffer, self._at)
            self._at = len(self._buffer) if not_blank is None else not_blank.start()
            if self._buffer.startswith(b"\n", self._at):  # a blank line
                self.number += 1
                self._at += 1
            elif self._left():
                break
            elif not self._fill():
                return None
        self.number += 1
        while (match := _LINE_HEAD.match(self._buffer, self._at)) is None:
            if self._buffer.find(b"\n", self._at) >= 0 or self._left() > _MAX_LINE_HEAD or not self._fill():
                raise ValueError(f"it is not {_LINE_SHAPE}, with the fields in this order")
        self._at = match.end()
        key, content_type = _parse_json(match[1]), _parse_json(match[2])
        expires_at = None if match[3] == b"null" else float(match[3])
        if expires_at is not None and not math.isfinite(expires_at):
            raise ValueError(f"expires_at {match[3].decode()} is not a time")
        return key, content_type, expires_at

    def value(self) -> Iterator[bytes]:
        """The bytes of the value of the line `head()` read. The end of the line is checked
        before the last piece is given, so that a write fed from here stores nothing of a
        bad or cut-off line."""
        pending = b""  # base64 not decoded yet: it ends with the last group, which may be padded
        while (end := self._buffer.find(b'"', self._at)) < 0:
            pending = self._unescaped(pending + self._buffer[self._at :])  # (a '\' left at its end waits for its '/')
            self._at = len(self._buffer)
            whole = (len(pending) - 1) // 4 * 4
            if whole > 0:
                yield self._decode(pending[:whole], last=False)
                pending = pending[whole:]
            if not self._fill():
                raise ValueError("the line is cut off inside its value")
        last = self._decode(self._unescaped(pending + self._buffer[self._at : end]), last=True)
        self._at = end + 1
        while (match := _LINE_TAIL.match(self._buffer, self._at)) is None:
            if self._buffer.find(b"\n", self._at) >= 0 or self._left() > _MAX_LINE_HEAD:
                raise ValueError('the value is not followed by "}" and the end of the line')
            if not self._fill():
                match = _LAST_LINE_TAIL.fullmatch(self._buffer, self._at)
                if match is None:
                    raise ValueError('the line is cut off after its value: "}" is missing')
                break
        self._at = match.end()
        yield last

    @staticmethod
    def _unescaped(text: bytes) -> bytes:
        """Base64 text as JSON may escape it: '/' as '\\/' (PHP's json_encode does so)."""
        return text.replace(b"\\/", b"/")

    @staticmethod
    def _decode(text: bytes, last: bool) -> bytes:
        if not last and b"=" in text:
            raise ValueError("the value is not base64: it has padding before its end")
        try:
            return base64.b64decode(text, validate=True)
        except ValueError:
            raise ValueError("the value is not base64") from None


def _ttl_left(expires_at: float | None) -> int | None:
    """The TTL, in whole seconds rounded up, of a value that expires at `expires_at`; 0 if
    that time has passed."""
    if expires_at is None:
        return None
    return max(0, math.ceil(expires_at - time.time()))


def _at_most(chunks: Iterable[bytes], limit: int | None) -> Iterator[bytes]:
    """The chunks, or ValueError once they hold more than `limit` bytes."""
    size = 0
    for chunk in chunks:
        size += len(chunk)
        if limit is not None and size > limit:
            raise ValueError(f"the value is over {limit} bytes, the most allowed")
        yield chunk


_AnyStorage = TypeVar("_AnyStorage", bound="Storage")


class Storage(abc.ABC):
    """The interface every backend offers; the HTTP and XML-RPC layers use only this.

    Callers use the simplekv interface (`get`, `put`, `put_file`, `get_file`, `open`,
    `delete`, `keys`, `iter_keys`, `in`, `len`, iteration) and the extras: `stat`, `fetch`,
    `write` (streamed, with metadata and compare-and-set), `remove`, `check_precondition`,
    `totals`, `sweep`, `check_writable`, `watch`, `close` (also as a context manager), and the
    attributes `kind` (the name of the backend) and `location` (where values live, said for people).

    The public methods check their arguments once (keys, TTLs, media types), then
    call the hooks. A backend must implement `_fetch`, `_write`, `_delete` and `_keys`, and
    set `kind` and `location`. It may override `_stat` (default: from `_fetch`), `totals`
    (default: the stat of every key; a backend with an index keeps running totals),
    `sweep` (default: nothing to do), `check_writable` (default: nothing to check) and `close`
    (calling this one). Its `__init__` calls this one's, which makes the change feed: for
    `watch`, the backend publishes every change (writes, deletes, and values that expire:
    sweeps) to `self._feed` at the moment the change takes effect, under the key's lock, or
    gives the feed the changes in their order (Redis).
    """

    kind: str  # "memory", "files", "redis"
    location: str  # "in memory", "in /srv/data", "at redis://…"
    max_value: int | None = None  # the largest value the backend can hold, in bytes, if it has a limit
    _closed = False

    def __init__(self) -> None:
        self._feed = _ChangeFeed()

    # The simplekv interface

    def get(self, key: str) -> bytes:
        """The value of `key`; KeyError if absent."""
        _, body = self.fetch(key)
        with body:
            return body.read()

    def put(
        self,
        key: str,
        data: bytes | bytearray | memoryview,
        *,
        content_type: str = DEFAULT_CONTENT_TYPE,
        ttl: int | None = None,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str:
        """Store `data` under `key` and return the key.

        `ttl` is in seconds; `if_match` (an ETag, or "*") and `if_none_match` make it a
        compare-and-set that raises PreconditionFailed and changes nothing when it fails.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ValueError(f"a value is bytes, not {type(data).__name__}")
        self.write(key, data, content_type=content_type, ttl=ttl, if_match=if_match, if_none_match=if_none_match)
        return key

    def put_file(
        self,
        key: str,
        file: IO[bytes] | str | os.PathLike[str],
        *,
        content_type: str = DEFAULT_CONTENT_TYPE,
        ttl: int | None = None,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> str:
        """Store the contents of a file (a path or a binary file object) under `key`, streamed."""
        self.write(key, file, content_type=content_type, ttl=ttl, if_match=if_match, if_none_match=if_none_match)
        return key

    def get_file(self, key: str, file: IO[bytes] | str | os.PathLike[str]) -> str:
        """Write the value of `key` into a file (a path or a binary file object), streamed."""
        with self.open(key) as source:
            if isinstance(file, (str, os.PathLike)):
                with open(file, "wb") as target:
                    shutil.copyfileobj(source, target, CHUNK)
            else:
                shutil.copyfileobj(source, file, CHUNK)
        return key

    def open(self, key: str) -> BinaryIO:
        """The value of `key` as a binary file object to read; KeyError if absent."""
        return self.fetch(key)[1]

    def delete(self, key: str, *, if_match: str | None = None, if_none_match: bool = False) -> None:
        """Remove `key`; no error if it is absent (unless a precondition says otherwise)."""
        self.remove(key, if_match=if_match, if_none_match=if_none_match)

    def keys(
        self,
        prefix: str = "",
        *,
        delimiter: str | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> list[str]:
        """The live keys that start with `prefix`, in code-point order; with `after`, only
        those that follow it; with `limit`, at most that many (so `after` pages through them).
        Listing only reads: expired values are left out, not removed (that is `sweep`'s job).

        With `delimiter`, one level, as S3 and Consul list folders: a key that holds the
        delimiter after `prefix` is not listed; in its place its folder (the key up to and
        including the first such delimiter) is listed once. It stays one list in code-point
        order, and `limit` counts keys and folders alike: an item is a folder exactly when it
        holds the delimiter after `prefix` (it then ends with it). `after` may be either;
        after a folder, the listing goes on past every key in it.
        """
        if not isinstance(prefix, str) or not isinstance(after, (str, type(None))):
            raise ValueError(f"a prefix and a key to list after are str, not {prefix!r} and {after!r}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"a limit is a whole number of at least 1, not {limit!r}")
        if delimiter is not None and (not isinstance(delimiter, str) or not delimiter):
            raise ValueError(f"a delimiter is a non-empty str, not {delimiter!r}")
        if any(_SURROGATE.search(text) for text in (prefix, after or "", delimiter or "")):
            raise ValueError("a prefix, key or delimiter holds no lone surrogate (no key does: keys are UTF-8)")
        self._check_open()
        if delimiter is None:
            return self._keys(prefix, after, limit)
        return self._level(prefix, delimiter, after, limit)

    def _level(self, prefix: str, delimiter: str, after: str | None, limit: int | None) -> list[str]:
        """`keys` with a delimiter, built on the `_keys` hook: keys are read in batches, and the
        rest of a folder is skipped by starting the next batch past it."""
        if after is not None and (folder := _folder(after, prefix, delimiter)) is not None:
            after = _past_folder(folder)
        items: list[str] = []
        while True:
            wanted = _LEVEL_BATCH if limit is None else min(limit - len(items), _LEVEL_BATCH)
            batch = self._keys(prefix, after, wanted)
            folder = None
            for key in batch:
                if folder is not None and key.startswith(folder):
                    continue  # in the folder just listed
                folder = _folder(key, prefix, delimiter)
                items.append(folder or key)
                if len(items) == limit:
                    return items
            if len(batch) < wanted:
                return items
            after = _past_folder(folder) if folder is not None else batch[-1]

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        """An iterator over `keys(prefix)`."""
        return iter(self.keys(prefix))

    def iter_prefixes(self, delimiter: str, prefix: str = "") -> Iterator[str]:
        """As simplekv's: the keys that start with `prefix`, each cut after the first
        `delimiter` that follows the prefix, each result once; that is `keys(prefix,
        delimiter=delimiter)`, read a page at a time (so in code-point order)."""
        after = None
        while page := self.keys(prefix, delimiter=delimiter, after=after, limit=_LEVEL_BATCH):
            yield from page
            after = page[-1]

    def __iter__(self) -> Iterator[str]:
        return self.iter_keys()

    def __contains__(self, key: object) -> bool:
        try:
            self.stat(key)  # type: ignore[arg-type]
        except KeyError:  # an invalid key raises ValueError, as in simplekv
            return False
        return True

    def __len__(self) -> int:
        return self.totals()[0]

    def totals(self) -> tuple[int, int]:
        """How many live keys there are, and how many bytes their values hold."""
        self._check_open()
        stats = []
        for key in self._keys("", None, None):
            with contextlib.suppress(KeyError):
                stats.append(self._stat(key))
        return len(stats), sum(stat.size for stat in stats)

    def sweep(self) -> int:
        """Remove the values whose TTL has passed (reads already leave them out); return how
        many went. The server calls it twice a second."""
        self._check_open()
        return 0

    def check_writable(self) -> None:
        """Raise what a write would raise now if the storage cannot take one, as far as one
        cheap check tells (StorageUnavailable, StorageFull); /health calls it. Memory and files
        storage check nothing here (a full disk shows at the write)."""
        self._check_open()

    def close(self) -> None:
        """Release what the storage holds (FileStorage: the data-dir lock); using it
        afterwards raises ValueError. Watches end."""
        self._closed = True
        self._feed.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self!r} is closed")

    def __enter__(self: _AnyStorage) -> _AnyStorage:
        self._check_open()  # (as a closed file refuses a `with`)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # The extras: metadata, streaming and compare-and-set

    def stat(self, key: str) -> Stat:
        """Size, media type, ETag and expiry of the value of `key`; KeyError if absent."""
        check_key(key)
        self._check_open()
        return self._stat(key)

    def fetch(self, key: str) -> tuple[Stat, BinaryIO]:
        """The value of `key` with its Stat, both of one version, as a binary file the caller
        must close (a value held in memory comes as a BytesIO over its bytes, not a copy);
        KeyError if absent."""
        check_key(key)
        self._check_open()
        stat, body = self._fetch(key)
        return stat, io.BytesIO(body) if isinstance(body, bytes) else body

    def write(
        self,
        key: str,
        source: _Source,
        *,
        content_type: str = DEFAULT_CONTENT_TYPE,
        ttl: int | None = None,
        if_match: str | None = None,
        if_none_match: bool = False,
    ) -> tuple[Stat, bool]:
        """Store a value and return its Stat and whether the key is new.

        `source` is bytes; an iterable of bytes-like chunks (they may be views of one reused
        buffer: each is consumed before the next is asked for); an object with `readinto`,
        such as a binary file (the fastest way to stream: it is read into a reused buffer of
        BUFFER bytes); an object with only `read`; or a path. An exception from `source` (an
        upload cut off half way) stores nothing.
        """
        check_key(key)
        _check_media_type(content_type)
        expires_at = _expiry(ttl)
        self._check_open()
        new = _NewValue(_pieces(source), content_type, expires_at)
        return self._write(key, new, _Precondition(if_match, if_none_match))

    def remove(self, key: str, *, if_match: str | None = None, if_none_match: bool = False) -> bool:
        """Like `delete`, and return whether there was a value to remove."""
        check_key(key)
        self._check_open()
        return self._delete(key, _Precondition(if_match, if_none_match))

    def check_precondition(self, key: str, *, if_match: str | None = None, if_none_match: bool = False) -> None:
        """Raise PreconditionFailed if a write or delete of `key` with these conditions would
        fail now: a server calls it before reading a request body that would be refused. The
        write itself checks again, atomically, when it commits."""
        try:
            etag: str | None = self.stat(key).etag
        except KeyError:
            etag = None
        _Precondition(if_match, if_none_match).check(key, etag)

    def watch(self, prefix: str = "", after: str | None = None, timeout: float | None = None) -> Watch:
        """The changes of keys that start with `prefix`, as Events in the order they took effect.

        Without `after`, from the first change after this call; with a revision `after`
        (an event's), every change after it, each once, or a reset first if the storage no
        longer remembers that far back. It ends after `timeout` seconds (None: never), when
        closed, or when the storage closes. ValueError for a bad prefix, revision or timeout.
        """
        if not isinstance(prefix, str):
            raise ValueError(f"a prefix is a str, not {type(prefix).__name__}")
        _check_timeout(timeout)
        self._check_open()
        return Watch(self._feed, prefix, after, timeout, self._newest_revision())

    def _newest_revision(self) -> str | None:
        """The revision of the newest change, if the feed may not have it yet (only a feed
        read from elsewhere can be behind: see _ChangeFeed.position); else None."""
        return None

    # Backup and moving between storages: the export format

    def export(self, file: _Writable, prefix: str = "", *, progress: Callable[[int, int], object] | None = None) -> int:
        """Write every live key that starts with `prefix` to `file` (anything with a
        write(bytes) method) in the export format, and return how many were written.

        One JSON line a key, in code-point order: {"key": k, "content_type": t, "expires_at":
        <Unix seconds> or null, "value": "<base64>"}. Values are streamed, each one version
        whole; keys that expire or go while the export runs are left out. `progress`, if
        given, is called after each line with the keys and value bytes written so far.
        """
        count = size = 0
        after = None
        while page := self.keys(prefix, after=after, limit=_LEVEL_BATCH):
            after = page[-1]
            for key in page:
                try:
                    stat, body = self.fetch(key)
                except KeyError:
                    continue  # deleted or expired since the listing
                with body as source:
                    file.write(_export_head(key, stat))
                    for piece in _base64_pieces(source):
                        file.write(piece)
                file.write(b'"}\n')
                count, size = count + 1, size + stat.size
                if progress is not None:
                    progress(count, size)
        return count

    def import_(
        self,
        file: _SupportsReadinto | IO[bytes] | Iterable[bytes],
        *,
        max_value: int | None = None,
        progress: Callable[[int, int], object] | None = None,
    ) -> tuple[int, int]:
        """Store each line of an export (see `export`) read from `file`, a binary file object
        or an iterable of bytes, with its media type and expiry, replacing the key whole.
        Return how many lines were imported, and how many skipped because their expiry had
        passed. `progress`, if given, is called after each line imported with the lines and
        value bytes imported so far.

        It is not one transaction: each line is stored whole or not at all, and a bad line
        (or a value over `max_value` bytes) stops the import there with a ValueError that
        names its line number; the lines before it stay stored. So does a storage that cannot
        take a line: StorageUnavailable (Redis), or StorageFull (Redis out of memory, or a
        full disk), naming the line too. Values are streamed.
        """
        reader = _ExportReader(_pieces(file))
        imported = skipped = size = 0
        while True:
            try:  # (what stops the import names the line; progress is the caller's own)
                if (head := reader.head()) is None:
                    return imported, skipped
                key, content_type, expires_at = head
                ttl = _ttl_left(expires_at)
                if ttl == 0:  # read, checked as a line to store is, and dropped
                    check_key(key)
                    _check_media_type(content_type)
                    collections.deque(reader.value(), maxlen=0)
                    skipped += 1
                    continue
                stat, _ = self.write(key, _at_most(reader.value(), max_value), content_type=content_type, ttl=ttl)
            except ValueError as error:
                raise ValueError(f"line {reader.number}: {error}; the lines before it were imported") from None
            except StorageUnavailable as error:  # (StorageFull too)
                raise type(error)(
                    f"line {reader.number} could not be stored: {error}; the lines before it were imported"
                ) from None
            except OSError as error:
                if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise OSError(
                        error.errno,
                        f"line {reader.number} could not be stored: {_os_error_text(error)}; the lines before it "
                        "were imported",
                    ) from error
                raise StorageFull(
                    f"line {reader.number} could not be stored: the disk is full ({error.strerror}); the lines "
                    f"before it were imported, so free space and import the lines from {reader.number} on"
                ) from None
            imported, size = imported + 1, size + stat.size
            if progress is not None:
                progress(imported, size)

    # Hooks for backends: the key is valid and the storage open when they are called

    @abc.abstractmethod
    def _fetch(self, key: str) -> tuple[Stat, bytes | BinaryIO]:
        """The Stat and bytes (or an open file) of one version of the value; KeyError if none."""
        raise NotImplementedError(f"{type(self).__name__}._fetch")

    @abc.abstractmethod
    def _write(self, key: str, new: _NewValue, precondition: _Precondition) -> tuple[Stat, bool]:
        """Store `new` if `precondition` holds for the current value, atomically, and durably
        before returning; the Stat of the new value and whether the key had none."""
        raise NotImplementedError(f"{type(self).__name__}._write")

    @abc.abstractmethod
    def _delete(self, key: str, precondition: _Precondition) -> bool:
        """Remove the value if `precondition` holds, atomically; whether there was one."""
        raise NotImplementedError(f"{type(self).__name__}._delete")

    @abc.abstractmethod
    def _keys(self, prefix: str, after: str | None, limit: int | None) -> list[str]:
        """The live keys with `prefix`, in order, after `after`, at most `limit` of them."""
        raise NotImplementedError(f"{type(self).__name__}._keys")

    def _stat(self, key: str) -> Stat:
        stat, body = self.fetch(key)
        body.close()
        return stat


# Memory storage


class _Entry(NamedTuple):
    """An index entry, one small tuple per key (its Stat is made when asked for): the value's
    size, media type, stamp (of its ETag) and expiry, and its bytes if held in memory."""

    size: int
    content_type: str
    stamp: int
    expires_at: float | None
    data: bytes | None

    @property
    def etag(self) -> str:
        return _etag(self.size, self.stamp)

    @property
    def stat(self) -> Stat:
        return Stat(self.size, self.content_type, _etag(self.size, self.stamp), self.expires_at)

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and self.expires_at <= now


class _Index:
    """What MemoryStorage and FileStorage know of their values, in memory: an entry per key,
    the keys in order for listing, a lock per stripe of keys, and running totals.

    Reads take no lock (entries are immutable and replaced whole). A change to a key is made
    under `lock_for(key)`, which serialises the writes and deletes of one key and so makes
    compare-and-set atomic; `put` and `pop`, called under it, are the moment a change takes
    effect. Expired entries stay until a write or a sweep replaces or removes them; reads
    leave them out, and the totals stop counting them when they expire.
    """

    _LOCK_STRIPES = 64

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._locks = [threading.Lock() for _ in range(self._LOCK_STRIPES)]
        # The keys in order, so that listing a page costs a bisect, not a sort. It is sorted
        # again when the generation has changed since: after any key came or went.
        self._generations = itertools.count(1)
        self._generation = 0
        self._ordered: tuple[int, list[str]] = (-1, [])
        # The totals, kept as entries come and go. An entry with a TTL is also in a heap by
        # expiry; once it has passed, the entry moves to `_lapsed` and out of the totals.
        self._books = threading.Lock()  # guards the totals, the heap and _lapsed
        self._count = 0
        self._bytes = 0
        self._expiring: list[tuple[float, int, str]] = []  # (expires_at, stamp, key)
        self._lapsed: dict[str, _Entry] = {}

    def lock_for(self, key: str) -> threading.Lock:
        return self._locks[hash(key) % self._LOCK_STRIPES]

    def get(self, key: str) -> _Entry | None:
        """The entry of `key`, expired or not."""
        return self._entries.get(key)

    def live(self, key: str) -> _Entry | None:
        """The entry of `key` unless it has expired."""
        entry = self._entries.get(key)
        if entry is None or entry.expired(time.time()):
            return None
        return entry

    def find(self, key: str) -> _Entry:
        """The entry of `key`; KeyError if it has none or it has expired."""
        entry = self.live(key)
        if entry is None:
            raise KeyError(key)
        return entry

    def put(self, key: str, entry: _Entry) -> _Entry | None:
        """Make `entry` the one of `key` (under the key's lock); return the entry it replaced,
        expired or not."""
        with self._books:
            previous = self._entries.get(key)
            self._entries[key] = entry  # first: a put cut short after this line has taken effect
            self._forget(key, previous)
            self._count += 1
            self._bytes += entry.size
            if entry.expires_at is not None:
                heapq.heappush(self._expiring, (entry.expires_at, entry.stamp, key))
                if len(self._expiring) > 2 * len(self._entries) + 1000:  # mostly replaced entries
                    self._expiring = [(e.expires_at, e.stamp, k) for k, e in self._entries.items() if e.expires_at]
                    heapq.heapify(self._expiring)
        if previous is None:
            self._keys_changed()
        return previous

    def pop(self, key: str) -> _Entry | None:
        """Remove the entry of `key`, if any (under the key's lock); return it, expired or not."""
        with self._books:
            previous = self._entries.pop(key, None)
            self._forget(key, previous)
        if previous is not None:
            self._keys_changed()
        return previous

    def _forget(self, key: str, entry: _Entry | None) -> None:
        """Take a replaced or removed entry out of the totals (under the books' lock)."""
        if entry is None:
            return
        if self._lapsed.get(key) is entry:
            del self._lapsed[key]  # out of the totals already
        else:
            self._count -= 1
            self._bytes -= entry.size

    def totals(self) -> tuple[int, int]:
        """How many live entries there are and the bytes of their values."""
        with self._books:
            self._note_expiries()
            return self._count, self._bytes

    def lapsed(self) -> list[tuple[str, _Entry]]:
        """The entries that have expired, for a sweep to remove."""
        with self._books:
            self._note_expiries()
            return list(self._lapsed.items())

    def _note_expiries(self) -> None:
        """Move the entries whose expiry has passed out of the totals (under the books' lock)."""
        now = time.time()
        while self._expiring and self._expiring[0][0] <= now:
            _, stamp, key = heapq.heappop(self._expiring)
            entry = self._entries.get(key)
            if entry is not None and entry.stamp == stamp and key not in self._lapsed:  # not replaced since
                self._lapsed[key] = entry
                self._count -= 1
                self._bytes -= entry.size

    def keys(self, prefix: str, after: str | None, limit: int | None) -> list[str]:
        ordered = self._ordered_keys()
        start = bisect.bisect_left(ordered, prefix)
        if after is not None:
            start = max(start, bisect.bisect_right(ordered, after))
        now = time.time()
        keys: list[str] = []
        for position in range(start, len(ordered)):
            key = ordered[position]
            if not key.startswith(prefix) or len(keys) == limit:
                break
            entry = self._entries.get(key)
            if entry is not None and not entry.expired(now):
                keys.append(key)
        return keys

    def _ordered_keys(self) -> list[str]:
        """Every key in the index, in order (some may have expired or gone since)."""
        generation, ordered = self._ordered
        if generation != self._generation:
            generation = self._generation  # read first: a change during the sort makes a later call sort again
            ordered = sorted(self._entries)
            self._ordered = (generation, ordered)
        return ordered

    def _keys_changed(self) -> None:
        """Make the next listing sort again: a new key must be listed (a gone one would only
        be skipped, but is dropped too)."""
        self._generation = next(self._generations)


def _announce(feed: _ChangeFeed, key: str, previous: _Entry | None, entry: _Entry | None) -> None:
    """Publish how `key` went from the entry `previous` to `entry` (None: no value), at the
    moment the change takes effect, under the key's lock: a value that had expired (and was
    not swept yet) expires first."""
    if previous is not None and previous.expired(time.time()):
        feed.publish("expire", key)
        previous = None
    if entry is not None:
        feed.publish("put", key, entry.stat)
    elif previous is not None:
        feed.publish("delete", key)


def _take_effect(index: _Index, feed: _ChangeFeed, key: str, entry: _Entry | None) -> None:
    """Make `entry` (None: no value) the one of `key` in `index` and publish the change: the
    moment it takes effect, under the key's lock and, so that revisions follow what readers
    saw, in one step with its publication."""
    with feed.publishing():
        _announce(feed, key, index.pop(key) if entry is None else index.put(key, entry), entry)


class MemoryStorage(Storage):
    """Values in a dict, lost at exit. Reads take no lock; the writes and deletes of one key
    are serialised by its lock in the index, which makes compare-and-set atomic."""

    kind = "memory"
    location = "in memory"

    def __init__(self) -> None:
        super().__init__()
        self._index = _Index()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def _stat(self, key: str) -> Stat:
        return self._index.find(key).stat

    def _fetch(self, key: str) -> tuple[Stat, bytes | BinaryIO]:
        entry = self._index.find(key)
        assert entry.data is not None
        return entry.stat, entry.data

    def _keys(self, prefix: str, after: str | None, limit: int | None) -> list[str]:
        return self._index.keys(prefix, after, limit)

    def totals(self) -> tuple[int, int]:
        self._check_open()
        return self._index.totals()

    def sweep(self) -> int:
        self._check_open()
        removed = 0
        for key, entry in self._index.lapsed():
            with self._index.lock_for(key):
                if self._index.get(key) is entry:  # not written again since
                    _take_effect(self._index, self._feed, key, None)
                    removed += 1
        return removed

    def _write(self, key: str, new: _NewValue, precondition: _Precondition) -> tuple[Stat, bool]:
        data = _join(new.pieces)
        with self._index.lock_for(key):
            current = self._index.live(key)
            precondition.check(key, current and current.etag)
            entry = _Entry(len(data), sys.intern(new.content_type), _new_stamp(), new.expires_at, data)
            _take_effect(self._index, self._feed, key, entry)
        return entry.stat, current is None

    def _delete(self, key: str, precondition: _Precondition) -> bool:
        with self._index.lock_for(key):
            current = self._index.live(key)
            precondition.check(key, current and current.etag)
            if self._index.get(key) is not None:  # live or expired
                _take_effect(self._index, self._feed, key, None)
        return current is not None


# Files storage


class DataDirLocked(RuntimeError):
    """Another FileStorage (often another kvserver process) holds the data dir."""


class _ValueFileChanged(RuntimeError):
    """A value file was changed by another program while the FileStorage held the data dir:
    what it holds is not what the index promises. `key` is the key whose file it is, at `path`;
    `change` says what is wrong with it, `advice` what to do."""

    def __init__(self, key: str, path: str, change: str, advice: str = "restart the server to load it") -> None:
        super().__init__(
            f"{_printable(path)} {change}: it was changed while the server ran (data/ is the server's while it"
            f" runs); {advice}"
        )
        self.key = key


_NOT_LOADED = "a start skips it, so put the value's file back in its place, or write the key again"


# File names: a plain key is its own name, others are percent-escaped, long ones hashed.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_HASHED_PREFIX = "%+"  # never made by escaping: '%' is always followed by two hex digits there
_NAME_MAX = 255


def _file_name(key: str) -> str:
    """The name of the file that holds `key`: never a path outside its folder, at most 255 bytes."""
    if len(key) <= _NAME_MAX and _PLAIN_NAME.fullmatch(key):
        return key
    escaped = urllib.parse.quote(key, safe="").replace("~", "%7E")
    if escaped.startswith("."):
        escaped = "%2E" + escaped[1:]
    if len(escaped) <= _NAME_MAX:
        return escaped
    return _HASHED_PREFIX + hashlib.sha256(key.encode("utf-8")).hexdigest()


def _key_from_name(name: str) -> str | None:
    """The key whose file is called `name`, or None if no key is (the name is hashed or foreign)."""
    if _PLAIN_NAME.fullmatch(name):
        return name  # a plain key is its own name
    try:
        key = check_key(urllib.parse.unquote(name, errors="strict"))
    except (ValueError, UnicodeDecodeError):
        return None
    return key if _file_name(key) == name else None


def _printable(path: str) -> str:
    """A path as any stream can print it, on one line: name bytes that are not UTF-8, and
    control characters (a newline, a terminal's escape sequence), become \\x escapes."""
    text = path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return _CONTROL_CHARACTER.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def _os_error_text(error: OSError) -> str:
    """An OSError in words for a message: its strerror and the file it names, if it names one."""
    text = error.strerror or str(error)
    return text if error.filename is None else f"{text}: {_printable(os.fsdecode(error.filename))}"


def _refuse_link(path: str) -> None:
    """OSError (ELOOP) if `path`, one of kvserver's own in the data dir, is a symbolic link:
    followed, its clean-ups and its lock could empty or remove files outside the data dir
    (a link another user of a shared data dir put there). (Its words name the link.)"""
    if os.path.islink(path):
        raise OSError(errno.ELOOP, f"{_printable(path)} is a symbolic link, where kvserver keeps its own; remove it")


def _make_own_folder(path: str) -> None:
    """Make one of kvserver's own folders in the data dir, for its user alone (0700), unless a
    symbolic link is in its place."""
    _refuse_link(path)
    os.makedirs(path, mode=0o700, exist_ok=True)


def _regular_files(folder: str) -> Iterator[os.DirEntry[str]]:
    """The regular files in `folder` but hidden ones (.kvserver, .gitkeep), with a warning for
    anything else: a folder, a symbolic link, a FIFO (whose opening would stall the start) is
    neither read nor removed."""
    with os.scandir(folder) as dir_entries:
        for dir_entry in dir_entries:
            if dir_entry.name.startswith("."):
                continue
            if dir_entry.is_file(follow_symlinks=False):
                yield dir_entry
            else:
                print(f"kvserver: skipping {_printable(dir_entry.path)}: not a regular file", file=sys.stderr)


def _read_small_file(path: str, size: int) -> bytes:
    """The bytes of a small file, with fewer calls than open() makes (start-up reads thousands)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, size)
    finally:
        os.close(fd)


# renameat2(2) with RENAME_EXCHANGE (Linux 3.15, glibc 2.28) swaps two names in one step. A write
# uses it to put its value in place and keep the old value's file as its next temporary file: on
# ext4, creating a file and freeing another cost several times the system time of rewriting one.
# (None without ctypes, or where the C library has no renameat2: not Linux, or an old glibc.)
_libc = ctypes.CDLL(None, use_errno=True) if ctypes else None
_renameat2: Any = getattr(_libc, "renameat2", None)
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(path: str, other: str) -> None:
    """Swap the files named `path` and `other`, atomically (renameat2(2), RENAME_EXCHANGE).

    Raises OSError: FileNotFoundError if either is missing; errno EINVAL or ENOSYS where the
    file system, the kernel or the C library cannot swap."""
    if _renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available here")
    if _renameat2(_AT_FDCWD, os.fsencode(path), _AT_FDCWD, os.fsencode(other), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path, None, other)


# fallocate(2) with FALLOC_FL_ZERO_RANGE (Linux 3.15; ext4 and XFS, not tmpfs) lets a write
# without fsync rewrite a spare (see FileStorage._stage). (None without ctypes, or where the C
# library has no fallocate.)
_fallocate: Any = getattr(_libc, "fallocate64", None) or getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_ZERO_RANGE = 0x10


def _zero_blocks(fd: int, length: int, block_size: int) -> None:
    """Make the file's first `length` bytes, rounded up to whole blocks of `block_size` bytes,
    read as zeros, and keep its size (fallocate(2), FALLOC_FL_ZERO_RANGE). On whole blocks
    ext4 and XFS do it by a change of the file's metadata, the blocks marked unwritten: they
    read as zeros until bytes written into them are on disk. ext4 marks the file's own blocks,
    and frees or takes none (XFS frees them and takes others; a hole takes blocks on both).

    Raises OSError: errno EOPNOTSUPP where the file system cannot (tmpfs; ext4 in a file
    without extents), ENOSYS where the kernel or the C library cannot."""
    if _fallocate is None:
        raise OSError(errno.ENOSYS, "fallocate is not available here")
    blocks = -(-length // block_size)
    if _fallocate(fd, _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE, 0, blocks * block_size) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _file_system_type(path: str | os.PathLike[str]) -> str:
    """The type of the file system `path` is on, as /proc/self/mountinfo names it ("ext4",
    "xfs", "tmpfs"); "" if none is found there (not Linux, or a file system whose files' device
    number is not its mount's, as btrfs and overlayfs)."""
    device = os.stat(path).st_dev
    with contextlib.suppress(OSError), open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mounts:
        for line in mounts:  # "<id> <parent> <major>:<minor> <root> <mount point> <options> ... - <type> ..."
            fields = line.split()
            major, _, minor = fields[2].partition(":")
            if os.makedev(int(major), int(minor)) == device and "-" in fields:
                return fields[fields.index("-") + 1]
    return ""


_WRITEBACK_STEP = 8 * 1024 * 1024  # bytes of a large value written between two _start_writeback


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Have the kernel begin writing these bytes of a file to disk, without waiting for it.
    With fsync, the fsync at the end of a large value then finds most of it written, as the
    disk worked while the value was still arriving (a 1 GiB PUT with fsync took 0.56 to 0.97 s
    here, against 0.73 to 3.2 s without, in turns); without fsync, a small value's bytes
    start for the disk before its swap does (see FileStorage._stage). POSIX_FADV_DONTNEED
    does it on Linux: mm/fadvise.c starts writeback of the range's dirty pages, then drops
    from the page cache the pages that are written already, so on a fast disk much of a large
    value leaves the cache (a first read of it then reads the disk; the 1 GiB GET that
    followed was no slower here). Elsewhere, or if the file system refuses the advice,
    nothing is begun: an fsync writes it all."""
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def _is_regular_file(path: str) -> bool:
    """Whether `path` names a regular file itself (not through a link); True if it cannot be
    looked at, so that the caller's own error stands."""
    try:
        return S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return True


def _sniff_file(path: str) -> str:
    """Like _sniff_content_type, for a file too large to read into memory at once."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        for piece in _file_pieces(path):
            decoder.decode(piece)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return DEFAULT_CONTENT_TYPE
    return TEXT_CONTENT_TYPE


class _GroupSync:
    """The fsync of one folder, shared by every writer waiting for one: group commit.

    A rename or a removal in a folder is durable once an fsync of the folder that began
    after it has ended. So a writer makes its change, takes a ticket (a number, in the order
    changes were made), and waits for its ticket to be synced. The first waiter that finds no
    fsync running starts one, covering every ticket handed out so far; the writers that take
    tickets while it runs wait for it to end, and then one of them runs the next fsync for
    all of them. Sixteen concurrent writers pay two or three folder fsyncs, not sixteen, and
    each still hears back only after an fsync that began after its change. If an fsync fails,
    every change it covered may never be durable, even once a later fsync succeeds (it may not
    write what the failed one did not): each of their waits raises, the leader's with the
    fsync's error and the others' with EIO, and `failed` stays True. Later changes are synced
    by the next fsync as usual. Without fsync, waiting returns at once; once closed, a wait
    for a change not yet durable raises ValueError. So no change that may be lost is reported
    durable.
    """

    def __init__(self, path: str, enabled: bool) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY) if enabled else None
        self._lock = threading.Lock()  # guards the others below (but see the end of wait)
        self._issued = 0  # the last ticket handed out
        self._synced = 0  # every change up to this ticket is durable, but those of _failures
        self._failures: list[range] = []  # the tickets failed fsyncs covered (one range per run of them)
        self._running = False  # an fsync is under way
        self._parked: list[threading.Lock] = []  # one held lock per thread waiting for it to end
        self._closed = False

    @property
    def failed(self) -> bool:
        """Whether an fsync of the folder has failed."""
        return bool(self._failures)

    def ticket(self) -> int:
        """A ticket for a change just made in the folder."""
        if self._fd is None:
            return 0  # nothing to wait for
        with self._lock:
            self._issued += 1
            return self._issued

    def wait_for_all(self) -> None:
        """Return once every change made in the folder so far is durable, by an fsync that
        begins from now (see `wait`)."""
        self.wait(self.ticket())

    def wait(self, ticket: int) -> None:
        """Return once the change of `ticket`, and every change before it (but those of
        failed fsyncs), is durable. OSError if an fsync that covered it failed; ValueError if
        the storage closed before it was durable."""
        if self._fd is None:
            return
        while True:
            with self._lock:
                if any(ticket in failure for failure in self._failures):
                    raise OSError(errno.EIO, "the folder fsync that was to make this change durable failed")
                if self._synced >= ticket:
                    return
                if self._running:
                    parked = self._park()
                elif self._closed:
                    raise ValueError("the storage was closed before this change was made durable")
                else:
                    parked = None
            if parked is None:
                self._lead(ticket)
                continue
            parked.acquire()  # until the fsync under way has ended
            # The leader set _synced and _failures before it let this thread go, so a writer
            # whose change it made durable returns without taking the lock again (sixteen writers
            # woken at once, each taking it in turn, cost 2-3% of the rate of /set with fsync).
            # Once an fsync has failed, every writer looks again under the lock.
            if self._synced >= ticket and not self._failures:
                return

    def _park(self) -> threading.Lock:
        """A held lock for a thread to wait on until the fsync under way ends (called under
        the lock, while one runs)."""
        parked = threading.Lock()
        parked.acquire()
        self._parked.append(parked)
        return parked

    def _lead(self, ticket: int) -> None:
        """Run the folder fsync for every change that has a ticket now, unless, since the caller
        looked, another thread has begun one or synced `ticket`, or the storage has closed (the
        caller then looks again); record how it ended, and let the threads parked meanwhile go.
        Raises the fsync's error. (The lead is taken inside the `try`, so that an interrupt of
        the main thread, KeyboardInterrupt, cannot leave an fsync marked as running for ever; an
        interrupted fsync counts as failed.)"""
        assert self._fd is not None
        covered = None  # once this thread leads: the last ticket its fsync covers
        ended = False  # the fsync ended without an error
        try:
            with self._lock:
                if self._running or self._closed or self._synced >= ticket:
                    return
                self._running, covered = True, self._issued  # each was taken after its change
            os.fsync(self._fd)
            ended = True
        finally:
            if covered is not None:
                with self._lock:
                    self._running = False
                    if ended:
                        self._synced = max(self._synced, covered)
                    elif self._failures and self._failures[-1].start == self._synced + 1:
                        self._failures[-1] = range(self._synced + 1, covered + 1)  # no fsync ended since: one range
                    else:
                        self._failures.append(range(self._synced + 1, covered + 1))
                    parked, self._parked = self._parked, []
                for lock in parked:
                    lock.release()

    def close(self) -> None:
        while True:
            with self._lock:
                if not self._running:  # (the fsync under way uses the descriptor)
                    if self._fd is not None and not self._closed:
                        os.close(self._fd)
                    self._closed = True
                    return
                parked = self._park()
            parked.acquire()


class _Staged(NamedTuple):
    """A value received in full but not yet visible: its temporary file, size and stamp, and
    its bytes if it is small enough to keep in memory."""

    path: str
    size: int
    stamp: int
    data: bytes | None  # all of it, unless it is larger than SMALL_VALUE


# Without fsync, where spares are zeroed: the spares that wait before a write makes a folder
# fsync for them (see _Spares).
SPARE_BATCH = 128
_ZEROING_FILE_SYSTEMS = ("ext4", "xfs")  # those _zero_blocks is relied on for (see FileStorage._stage)


class _Spares:
    """The files in a data dir's spare folder: old values' files that swaps took out of place
    (FileStorage._move_into_place), for later writes to rewrite (FileStorage._stage).

    `keep` adds one. With fsync, its swap is durable by then (the write waited for the folder
    fsync). Without fsync, where spares are zeroed (`sync_swaps`), it waits until its swap is:
    once SPARE_BATCH or more wait, the next write that comes for a spare first fsyncs the folder
    for them (an fsync that begins after their swaps; one write at a time), and then they are
    ready. Otherwise (without fsync, where spares are emptied) nothing is known of its swap.
    `take` gives a write the newest ready spare, and whether its swap is known to be durable;
    None if none is ready (a write then makes a new file). So the spares come to number about
    SPARE_BATCH, and the new files that writes make while the slowest of those fsyncs runs.

    Spares whose fsync fails or does not end (an interrupt) are removed; after a failed fsync
    the swaps it covered may never be durable, and `failed` stays True.
    """

    def __init__(self, folder: str, *, fsync: bool, sync_swaps: bool) -> None:
        self._folder = folder
        self._lock = threading.Lock()
        self._ready: list[str] = []  # those a write may take
        self._waiting: list[str] = []  # those whose swap waits for a folder fsync
        self._durable = fsync or sync_swaps  # whether the swap of a ready spare is known to be durable
        self._sync_swaps = sync_swaps
        self._syncing = False  # a write is making a folder fsync for spares
        self.failed = False  # a folder fsync for spares has failed

    def keep(self, path: str) -> None:
        with self._lock:
            (self._waiting if self._sync_swaps else self._ready).append(path)

    def take(self) -> tuple[str, bool] | None:
        self._sync_when_due()
        with self._lock:
            return (self._ready.pop(), self._durable) if self._ready else None

    def _sync_when_due(self) -> None:
        """Once SPARE_BATCH spares wait and no other write is at it, make their swaps durable
        and the spares ready; or remove them, if the fsync fails or does not end."""
        claimed = synced = False
        waiting: list[str] = []
        try:
            with self._lock:
                if self._syncing or len(self._waiting) < SPARE_BATCH:
                    return
                self._syncing = claimed = True
                waiting, self._waiting = self._waiting, []
            synced = self._fsync_folder()
        finally:
            if claimed:
                with self._lock:
                    self._syncing = False
                    if synced and not self.failed:
                        self._ready += waiting
                        waiting = []
                for path in waiting:
                    with contextlib.suppress(OSError):
                        os.unlink(path)

    def _fsync_folder(self) -> bool:
        """Whether an fsync of the folder, begun now, ended; `failed` is set if it failed."""
        try:
            fd = os.open(self._folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:  # (no descriptor left, say: no fsync, so nothing known)
            return False
        try:
            os.fsync(fd)
        except OSError:
            self.failed = True
            return False
        finally:
            os.close(fd)
        return True


class _Spare(NamedTuple):
    """A spare opened for a write (see FileStorage._stage): its path, a descriptor open for
    writing, what fstat told of it, and whether the swap that took it out of place is known to
    be durable."""

    path: str
    fd: int
    info: os.stat_result
    durable: bool


def _clear_spare(fd: int, info: os.stat_result, durable: bool, block_size: int) -> int:
    """Without fsync, before a spare is rewritten (see FileStorage._stage): zero its blocks
    (`block_size` bytes each) if its swap is `durable` and it is small and has no holes
    (zeroing a hole takes a block); else, or if they cannot be zeroed (ext4 cannot in a file
    without extents, as ext3 made them), empty it. Return the size the file still has (zeros;
    0 once emptied). OSError if it cannot be emptied."""
    if durable and info.st_size <= SMALL_VALUE and info.st_blocks * 512 >= info.st_size:
        with contextlib.suppress(OSError):
            _zero_blocks(fd, info.st_size, block_size)
            return info.st_size
    os.ftruncate(fd, 0)
    return 0


class FileStorage(Storage):
    """One file per key under a data dir, with the index and small values held in memory.

    Layout of the data dir:
      <name>                   a value's bytes, exactly (`cat data/greeting` works)
      .kvserver/lock           held with flock while a FileStorage is open
      .kvserver/tmp/           values and metadata being written; emptied at start
      .kvserver/spare/         files that writes swapped out, for later writes to rewrite; emptied at start
      .kvserver/meta/<name>    metadata that cannot be derived from the value file
      .kvserver/kept/          folders put in a key's place by hand, once a write of that key needed it

    A value file's fingerprint, its size and modification time (which kvserver sets to a
    unique stamp), is its ETag. A value whose media type is the one its bytes suggest, with
    no TTL and a name that decodes to its key, needs no metadata file: a plain `/set` costs
    one file write, its fsync, a rename (or a swap, below) and a share of a folder fsync.
    Otherwise the metadata file maps fingerprints to metadata, and holds both the old and the
    new value's entries while a write is under way, so after a crash at any instant whichever
    value file is in place finds its own. Files with no matching entry (put there by hand)
    load with derived metadata.

    A write stages its value in a temporary file (written, and with fsync fsynced) before it
    takes the key's lock; under the lock it checks the precondition, renames the file into
    place and updates the index; then, with the lock released, it waits for the folder fsync
    that makes the rename durable (see _GroupSync). A reader may see a value a few milliseconds
    before it is durable; the writer hears back only once it is. A write that replaces a
    small value (without fsync, with a small one) swaps the two files instead of renaming,
    and the old value's file becomes the temporary file of a later write (see
    _move_into_place and _stage).
    """

    kind = "files"

    def __init__(self, path: str | os.PathLike[str] = "./data", *, fsync: bool = True) -> None:
        super().__init__()
        self.path = os.path.abspath(path)
        self.location = f"in {self.path}"
        self.fsync = fsync
        self._index = _Index()
        self._tmp = os.path.join(self.path, ".kvserver", "tmp")
        self._spare = os.path.join(self.path, ".kvserver", "spare")
        self._meta = os.path.join(self.path, ".kvserver", "meta")
        # Unique names in tmp and spare: both are emptied at start, and the data dir is locked.
        self._temporary_names = itertools.count()
        # A data dir made here is its user's alone, as value files are: key names are file names.
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        for folder in (os.path.join(self.path, ".kvserver"), self._tmp, self._spare, self._meta):
            _make_own_folder(folder)
        # Held open, and so locked, until close(); never truncated, nor followed if a link.
        lock = os.path.join(self.path, ".kvserver", "lock")
        _refuse_link(lock)
        self._lock_file: IO[bytes] | None = os.fdopen(
            os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600), "r+b"
        )
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise DataDirLocked(
                f"data dir {self.path} is in use by another kvserver; stop it or pick another"
            ) from None
        self._syncs: list[_GroupSync] = []
        try:
            self._values_synced = _GroupSync(self.path, fsync)
            self._syncs.append(self._values_synced)
            self._meta_synced = _GroupSync(self._meta, fsync)
            self._syncs.append(self._meta_synced)
            for folder in (self._tmp, self._spare):  # left by a crash, or by the last run
                for name in os.listdir(folder):
                    path = os.path.join(folder, name)
                    try:
                        os.unlink(path)
                    except IsADirectoryError:  # put in a key's place by hand, and swapped out (see _stage)
                        self._keep_folder(path)
            self._block_size = os.statvfs(self.path).f_frsize  # (what _zero_blocks zeroes in)
            self._swaps, zeroes = self._check_file_system()
            self._load()
            self._spares = _Spares(self.path, fsync=fsync, sync_swaps=self._swaps and zeroes and not fsync)
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, fsync={self.fsync!r})"

    def close(self) -> None:
        super().close()
        for sync in self._syncs:
            sync.close()
        if self._lock_file is not None:
            self._lock_file.close()  # releases the flock: another server may own the folder from now on
            self._lock_file = None

    # Start-up

    def _keep_folder(self, path: str) -> None:
        """Move a folder put by hand where kvserver puts a file (a key's place or its metadata's,
        tmp or spare) into kept."""
        kept = os.path.join(self.path, ".kvserver", "kept")
        _make_own_folder(kept)
        name = os.path.basename(path)
        if len(os.fsencode(name)) > 235:  # (its stamp in front would pass 255 bytes: its hash instead)
            name = hashlib.sha256(os.fsencode(name)).hexdigest()
        target = os.path.join(kept, f"{_new_stamp()}-{name}")
        os.rename(path, target)
        print(
            f"kvserver: moved {_printable(path)} to {_printable(target)}: a folder put by hand where kvserver"
            " keeps a file",
            file=sys.stderr,
        )

    def _check_file_system(self) -> tuple[bool, bool]:
        """Refuse a file system that would break the format: one that rounds modification times
        (ETags could repeat) or ignores the case of names (keys 'A' and 'a' would share a file).
        Return whether it can swap two files (see _exchange), and make a file's blocks read as
        zeros in a way FileStorage._stage can rely on (see _zero_blocks: ext4 and XFS)."""
        path, other = os.path.join(self._tmp, "probe-a"), os.path.join(self._tmp, "probe-b")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            stamp = _new_stamp() | 1  # an odd number of nanoseconds does not survive rounding
            os.utime(fd, ns=(stamp, stamp))
            rounds = os.fstat(fd).st_mtime_ns != stamp
            folds = os.path.exists(os.path.join(self._tmp, "PROBE-A"))
            os.close(os.open(other, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
            try:
                _exchange(path, other)
                exchanges = True
            except OSError:
                exchanges = False
            try:
                _zero_blocks(fd, 1, self._block_size)
                zeroes = _file_system_type(path) in _ZEROING_FILE_SYSTEMS
            except OSError:
                zeroes = False
        finally:
            os.close(fd)
            for probe in (path, other):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(probe)
        if rounds:
            raise OSError(errno.EOPNOTSUPP, "its file system rounds modification times; kvserver needs nanoseconds")
        if folds:
            raise OSError(errno.EOPNOTSUPP, "its file system ignores the case of names; kvserver needs it kept")
        return exchanges, zeroes

    def _load(self) -> None:
        """Build the index from the data dir; remove expired values and metadata no value
        file matches."""
        unused_metadata = {dir_entry.name for dir_entry in _regular_files(self._meta)}
        now = time.time()
        latest_stamp = 0
        for dir_entry in _regular_files(self.path):
            name = dir_entry.name
            file_stat = dir_entry.stat(follow_symlinks=False)
            size, stamp = file_stat.st_size, file_stat.st_mtime_ns
            records = self._read_metadata(name) if name in unused_metadata else {}
            record = records.get(_etag(size, stamp))
            if record is not None:
                unused_metadata.discard(name)
                key, expires_at = record["key"], record["expires_at"]
                content_type = _stored_media_type(record["content_type"])
            else:
                key, content_type, expires_at = _key_from_name(name), None, None
                if key is None and records:  # a hashed name: only its metadata holds the key, kept for the next start
                    # It is one of the versions the records know (a write records the new one first):
                    # their key (each record's is the file's: _read_metadata), their media type if
                    # they agree, and the latest of their expiries (none if one has none).
                    key = next(iter(records.values()))["key"]
                    media_types = {record["content_type"] for record in records.values()}
                    content_type = _stored_media_type(media_types.pop()) if len(media_types) == 1 else None
                    expiries = [record["expires_at"] for record in records.values()]
                    expires_at = None if None in expiries else max(expiries)
                    unused_metadata.discard(name)
                    print(
                        f"kvserver: {_printable(dir_entry.path)} is not the version its metadata knows (its"
                        f" modification time changed: copied without -a?); its key {key!r}, media type and TTL are"
                        " taken from its metadata",
                        file=sys.stderr,
                    )
                if key is None:
                    print(f"kvserver: skipping {_printable(dir_entry.path)}: its name is not a key", file=sys.stderr)
                    continue
            if expires_at is not None and expires_at <= now:
                os.unlink(dir_entry.path)
                unused_metadata.add(name)  # its metadata goes too, below
                continue
            data = _read_small_file(dir_entry.path, size) if size <= SMALL_VALUE else None
            if content_type is None:
                content_type = _sniff_content_type(data) if data is not None else _sniff_file(dir_entry.path)
            self._index.put(key, _Entry(size, sys.intern(content_type), stamp, expires_at, data))
            latest_stamp = max(latest_stamp, stamp)
        # A delete leaves no file to date it: the folder's modification time, which the removal
        # set just before the delete took its revision, stands for it (the kernel dates files by
        # a clock up to a tick behind, hence the margin). So a clock set back across a restart
        # does not give a revision again.
        folder_changed = os.stat(self.path).st_mtime_ns + _FOLDER_CLOCK_MARGIN
        _stamps_after(max(latest_stamp, folder_changed))
        if unused_metadata:  # the removals of the value files they knew are durable first
            self._values_synced.wait_for_all()
        for name in unused_metadata:
            os.unlink(os.path.join(self._meta, name))

    def _read_metadata(self, name: str) -> dict[str, dict[str, Any]]:
        """The records of a metadata file; none if it is damaged (written by hand, or cut off
        by a power loss under --no-fsync), so that its value loads with derived metadata."""
        path = os.path.join(self._meta, name)
        try:
            with open(path, "rb") as file:
                records = _parse_json(file.read())
            if isinstance(records, dict) and all(
                isinstance(record, dict)
                and isinstance(record.get("key"), str)
                and _file_name(check_key(record["key"])) == name  # (a ValueError if it is no key)
                and isinstance(record.get("content_type"), str)
                and isinstance(record.get("expires_at", ""), (int, float, type(None)))
                and not isinstance(record["expires_at"], bool)
                for record in records.values()
            ):
                return records
        except ValueError:
            pass
        print(f"kvserver: ignoring {_printable(path)}: it is not a metadata file kvserver wrote", file=sys.stderr)
        return {}

    # Reads

    def _stat(self, key: str) -> Stat:
        return self._index.find(key).stat

    def _fetch(self, key: str) -> tuple[Stat, bytes | BinaryIO]:
        entry = self._index.live(key)
        if entry is not None and entry.data is not None:
            return entry.stat, entry.data
        with self._index.lock_for(key):  # so the file opened is the one the entry describes
            entry = self._index.find(key)
            if entry.data is not None:
                return entry.stat, entry.data
            path = os.path.join(self.path, _file_name(key))
            # Not following a link (one put in the file's place could serve a file only we may
            # read), nor waiting on a FIFO (it would hold the key's lock for good).
            try:
                descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except FileNotFoundError:
                raise KeyError(key) from None  # removed by hand
            except OSError as error:
                if error.errno == errno.ELOOP:
                    raise _ValueFileChanged(key, path, "is now a symbolic link", _NOT_LOADED) from None
                if not _is_regular_file(path):  # a socket (Linux: ENXIO, BSD: EOPNOTSUPP) or a device
                    raise _ValueFileChanged(key, path, "is no longer a regular file", _NOT_LOADED) from None
                raise
            try:
                info = os.fstat(descriptor)
                if not S_ISREG(info.st_mode):
                    raise _ValueFileChanged(key, path, "is no longer a regular file", _NOT_LOADED)
                if info.st_size != entry.size:  # what would be sent is not what the index promises
                    change = f"holds {info.st_size} bytes, not the {entry.size} of key {key!r}"
                    raise _ValueFileChanged(key, path, change)
                os.set_blocking(descriptor, True)
            except BaseException:
                os.close(descriptor)
                raise
            return entry.stat, os.fdopen(descriptor, "rb")

    def _keys(self, prefix: str, after: str | None, limit: int | None) -> list[str]:
        return self._index.keys(prefix, after, limit)

    def totals(self) -> tuple[int, int]:
        self._check_open()
        return self._index.totals()

    # Writes: what a crash between any two steps leaves is said beside them. A crash is a
    # kill -9 or a power loss: after a kill -9 every rename and removal that was made is
    # there; after a power loss, those that an ended fsync of their folder covered.

    def _write(self, key: str, new: _NewValue, precondition: _Precondition) -> tuple[Stat, bool]:
        name = _file_name(key)
        # Crash while staging, or before the rename: a temporary file, removed at start.
        staged = self._stage(new.pieces)
        entry = _Entry(staged.size, sys.intern(new.content_type), staged.stamp, new.expires_at, staged.data)
        needs_metadata = self._needs_metadata(key, name, entry)
        try:
            with self._index.lock_for(key), self._in_step_with_disk(key, entry):
                current = self._index.live(key)
                precondition.check(key, current and current.etag)
                previous = self._index.get(key)  # expired or not: its file is in place until the rename
                had_metadata = previous is not None and self._needs_metadata(key, name, previous)
                if needs_metadata:
                    records = {entry.etag: self._record(key, entry)}
                    if previous is not None:
                        records[previous.etag] = self._record(key, previous)
                    if had_metadata or (previous is None and os.path.lexists(os.path.join(self._meta, name))):
                        # The metadata file about to be replaced also knows the version before
                        # `previous` (or a value a sweep has just removed), whose file may still
                        # be the one a power loss leaves in place: wait until the rename of
                        # `previous` (or the removal) is durable, with a folder fsync from now.
                        self._values_synced.wait_for_all()
                    # Crash before the next line: the old value and its metadata, as before.
                    self._write_metadata(name, records)
                    # Crash here: the metadata knows both versions; the old value file is in place.
                spare = self._move_into_place(staged, os.path.join(self.path, name), previous)
                # Crash here: the old or (once a folder fsync covers the rename) the new value,
                # each with its metadata; the temporary file, if it holds the old value, is
                # removed at start.
                _take_effect(self._index, self._feed, key, entry)  # readers see the new value
                ticket = self._values_synced.ticket()
                if had_metadata and not needs_metadata:
                    self._values_synced.wait(ticket)  # the old value may not come back without its metadata
                    # Crash here: a stale metadata file matches no value file; removed at start.
                    self._unlink_metadata(key)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):  # gone if it was renamed
                os.unlink(staged.path)
            raise
        durable = False
        try:
            self._values_synced.wait(ticket)  # with the lock released, so writers share the fsync
            durable = True
        finally:
            if spare is not None:
                self._keep_spare(spare, durable)
        return entry.stat, current is None

    def _delete(self, key: str, precondition: _Precondition) -> bool:
        with self._index.lock_for(key):
            current = self._index.live(key)
            precondition.check(key, current and current.etag)
            entry = self._index.get(key)  # live or expired
            if entry is None:
                return False
            ticket = self._unlink(key)
            if self._needs_metadata(key, _file_name(key), entry):
                self._values_synced.wait(ticket)  # the value may not come back without its metadata
                # Crash here: the metadata file matches no value file; removed at start.
                self._unlink_metadata(key)
        self._values_synced.wait(ticket)
        return current is not None

    def sweep(self) -> int:
        self._check_open()
        swept: list[tuple[str, _Entry]] = []
        tickets = [0]
        for key, entry in self._index.lapsed():
            with self._index.lock_for(key):
                if self._index.get(key) is entry:  # not written again since
                    tickets.append(self._unlink(key))
                    swept.append((key, entry))
        self._values_synced.wait(max(tickets))  # one folder fsync for them all
        for key, entry in swept:
            if self._needs_metadata(key, _file_name(key), entry):
                with self._index.lock_for(key):
                    if self._index.get(key) is None:  # else a new value owns the metadata file
                        # Crash before this: the metadata file matches no value file; removed at start.
                        self._unlink_metadata(key)
        return len(swept)

    def _move_into_place(self, staged: _Staged, target: str, previous: _Entry | None) -> str | None:
        """Rename the staged file over `target`, whose value is `previous`; or swap the two,
        and return the spare this leaves: the staged file's path, which now holds the previous
        value's file, for a later write to rewrite (_stage).

        Only a small value's file is swapped out: the server never opens one (it serves the
        bytes from memory), so no reader of the server can be reading a file that is
        rewritten. Without fsync, only a small value's file is swapped in (see _stage)."""
        if (
            self._swaps
            and previous is not None
            and previous.data is not None
            and (self.fsync or staged.data is not None)
        ):
            with contextlib.suppress(FileNotFoundError):  # its file was removed by hand
                _exchange(staged.path, target)
                return staged.path
        self._replace(staged.path, target)
        return None

    def _replace(self, source: str, target: str) -> None:
        """os.replace, moving a folder put by hand in the target's place (skipped at start)
        into kept first, if one is there."""
        try:
            os.replace(source, target)
        except IsADirectoryError:
            self._keep_folder(target)
            os.replace(source, target)

    def _keep_spare(self, path: str, durable: bool) -> None:
        """Add the file a swap left at `path` to the spares, moving a new one from tmp to spare
        first (tmp holds only writes in progress); or remove it, unless the wait for the folder
        fsync that covers the swap returned (`durable`; at once without fsync) and no fsync of
        the folder has ever failed: with fsync, only then is the swap known to be on disk (see
        _stage). Never raises: the write is done, and a spare only saves a later one some work
        (a file left behind is removed at the next start)."""
        try:
            if not durable or self._values_synced.failed or self._spares.failed:
                os.unlink(path)
                return
            if os.path.dirname(path) == self._tmp:
                os.rename(path, spare := os.path.join(self._spare, os.path.basename(path)))
                path = spare
        except OSError:
            return
        self._spares.keep(path)

    def _unlink(self, key: str) -> int:
        """Remove the value file of `key` and its entry (under the key's lock); return the
        ticket of the folder fsync that makes it durable."""
        with self._in_step_with_disk(key, None):
            with contextlib.suppress(FileNotFoundError):  # removed by hand
                os.unlink(os.path.join(self.path, _file_name(key)))
            _take_effect(self._index, self._feed, key, None)
        return self._values_synced.ticket()

    @contextlib.contextmanager
    def _in_step_with_disk(self, key: str, entry: _Entry | None) -> Iterator[None]:
        """Around the steps of a change of `key` to `entry` (None: a removal), under the key's
        lock: if one raises once the disk holds the change (an interrupt of the main thread,
        KeyboardInterrupt, just after the rename or the removal), the change takes effect all
        the same, as a restart would find it, so that the store never serves what is no longer
        on disk. The new value's file is the one with its size and stamp, which no other has."""
        before = self._index.get(key)
        try:
            yield
        except BaseException:
            changed_on_disk = False  # (a file it cannot look at is left as it is)
            with contextlib.suppress(OSError):
                changed_on_disk = self._file_of(key) == (None if entry is None else (entry.size, entry.stamp))
            if changed_on_disk and self._index.get(key) is before:
                _take_effect(self._index, self._feed, key, entry)
            raise

    def _file_of(self, key: str) -> tuple[int, int] | None:
        """The size and modification time (the stamp) of the value file of `key`; None if none."""
        try:
            info = os.stat(os.path.join(self.path, _file_name(key)))
        except FileNotFoundError:
            return None
        return info.st_size, info.st_mtime_ns

    def _unlink_metadata(self, key: str) -> None:
        path = os.path.join(self._meta, _file_name(key))
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except IsADirectoryError:  # a folder put in its place by hand (skipped at start)
            self._keep_folder(path)

    def _stage(self, pieces: _Pieces, *, zeroed_spare: bool = True) -> _Staged:
        """Write a value into a temporary file, stamp it, fsync it (with fsync): none of it
        visible. The file is removed if the pieces raise (an upload cut off). Without
        `zeroed_spare`, a spare is emptied, never zeroed (see below).

        The file is a spare (a file a write swapped out, see _move_into_place) if there is
        one, else a new one: on ext4, creating a file and freeing another cost more than
        rewriting one, and without a journal several times more (creating a file there
        searches the inodes freed in the last minutes). Until the swap that took a spare out
        of place is on disk, a power loss would put it back, so bytes written over its old
        ones must not reach the disk before that swap. With fsync, the swap was durable before
        the file became a spare, and the new bytes are durable before it is swapped in.
        Without fsync, a power loss may lose the last writes, but no key may come back with
        another value's bytes: neither a spare's old bytes in a new value's place, nor new
        bytes in a file that a power loss could still put back. Where the file system can zero
        blocks (_zero_blocks: ext4, XFS), a spare is rewritten only once a folder fsync has
        covered the swap that took it out of place (made by a write for a batch of them: see
        _Spares; until then, writes make new files), and its blocks are zeroed first
        (_clear_spare): they read as zeros until the new bytes are on disk, and the zeroing,
        made before the swap that shows them, is committed with it or before (a journal commits
        in order). Elsewhere (tmpfs, btrfs), for a spare that is large, has holes or cannot be
        zeroed, and for metadata (a metadata file of zeros would lose the key's media type,
        TTL or name; ext4 writes bytes into new blocks before it commits the rename that shows
        them, but not bytes into zeroed ones), the spare is emptied instead, so the new bytes
        go to new blocks (ext4 in data=ordered mode, its default, reuses the old ones only once
        the emptying, which follows the swap, is committed); but freeing blocks costs more (on
        a file system mounted with `discard`, a discard each). Either way the writeback of a
        small value (the only kind swapped in without fsync) is begun at once, as ext4 begins
        it by itself for a file renamed over another (auto_da_alloc), though not for a swap. A
        key written moments before a power loss may then hold zeros, or nothing, in place of
        its new bytes, under its new ETag. (An ext4 without a journal orders nothing, for a
        rename either.)

        A spare that is not a regular file of one link is not rewritten but removed: a hard
        link made by hand (a snapshot with `cp -al`, a deduplicating tool) may be another
        key's value."""
        spare = self._open_spare()
        if spare is not None:
            path, fd, stale = spare.path, spare.fd, spare.info.st_size
        else:
            path, stale = os.path.join(self._tmp, str(next(self._temporary_names))), 0
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            if spare is not None and stale and not self.fsync:
                stale = _clear_spare(fd, spare.info, spare.durable and zeroed_spare, self._block_size)
            size = 0  # bytes written
            head: list[bytes] = []  # the pieces, while the value may still be small
            written_back = 0  # with fsync: the bytes whose writeback has begun
            for piece in pieces:
                view = memoryview(piece).cast("B")
                if size + len(view) <= SMALL_VALUE:
                    head.append(piece if isinstance(piece, bytes) else view.tobytes())
                # A CHUNK a call, not a whole buffer: the kernel (Linux 6.16 and later, ext4) caches
                # what one write brings in, in folios of up to its size, and where a virtual
                # machine hands free memory back to its host (virtio-balloon free page reporting)
                # the large blocks of free memory that large folios take are those handed back,
                # whose first write costs a page fault on the host for every page. Here a 1 GiB
                # PUT took 0.51 to 0.84 s in writes of 64 KiB, against 0.45 to 3.6 s in writes
                # of 1 MiB (0.29 to 0.41 s against 1.0 to 1.7 s to write 1 GiB into the cache
                # after a pause, in a loop of its own), at the cost of about 8% of the rate of
                # PUTs of 1 MiB at 16 connections.
                while view:  # (a regular file takes all it is given, but for a signal or a full disk)
                    written = os.write(fd, view[:CHUNK])
                    size, view = size + written, view[written:]
                    if self.fsync and size - written_back >= _WRITEBACK_STEP:
                        _start_writeback(fd, written_back, size - written_back)
                        written_back = size
            if size < stale:
                os.ftruncate(fd, size)  # the rest of the old value
            stamp = _new_stamp()
            os.utime(fd, ns=(stamp, stamp))
            if self.fsync:
                os.fsync(fd)
            elif size <= SMALL_VALUE:
                _start_writeback(fd, 0, size)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        data = (head[0] if len(head) == 1 else b"".join(head)) if size <= SMALL_VALUE else None
        return _Staged(path, size, stamp, data)

    def _open_spare(self) -> _Spare | None:
        """A spare to rewrite, opened; None if there is none to take (see _Spares.take).
        Spares unfit to rewrite (see _stage) are removed."""
        while (taken := self._spares.take()) is not None:  # each turn takes one spare out
            path, durable = taken
            with contextlib.suppress(OSError):  # a symbolic link, folder or FIFO put in the key's place by hand
                fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)  # (a FIFO: ENXIO)
                info = os.fstat(fd)
                if S_ISREG(info.st_mode) and info.st_nlink == 1:
                    return _Spare(path, fd, info, durable)
                os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
        return None

    def _write_metadata(self, name: str, records: dict[str, dict[str, Any]]) -> None:
        """Replace the metadata file `name` with `records`, durably, in one step."""
        staged = self._stage((json.dumps(records).encode(),), zeroed_spare=False)
        try:
            self._replace(staged.path, os.path.join(self._meta, name))
        except BaseException:
            os.unlink(staged.path)
            raise
        self._meta_synced.wait(self._meta_synced.ticket())

    @staticmethod
    def _needs_metadata(key: str, name: str, entry: _Entry) -> bool:
        """Whether loading the value file alone would give back other metadata."""
        return (
            entry.expires_at is not None
            or entry.data is None  # large: the media type is not sniffed at start
            or entry.content_type != _sniff_content_type(entry.data)
            or _key_from_name(name) != key
        )

    @staticmethod
    def _record(key: str, entry: _Entry) -> dict[str, Any]:
        return {"key": key, "content_type": entry.content_type, "expires_at": entry.expires_at}


# Redis storage


class RedisStorage(Storage):
    """Values in Redis, so that several kvserver processes on several machines serve one store.

    Each key is a Redis hash named `<prefix><key>` with the fields value, type, etag and
    expires; a TTL is also the hash's Redis expiry. Beside the hashes, five structures make
    listing and counting cost the same however many keys there are; their names are the prefix,
    a 0xFF byte (which no UTF-8 key contains, so no key's hash can have these names) and:

    - `keys`: a sorted set of every key, all scored 0, so that ZRANGEBYLEX reads it in byte
      order, which for UTF-8 is code-point order: the ordered index;
    - `expiries`: a sorted set of the keys that have a TTL, scored by their Redis expiry in ms;
    - `sizes`: a hash of the sizes of those keys (their Redis hash may already be gone);
    - `totals`: a hash of the fields keys and bytes (what the index holds), indexed (set
      once every value in Redis is in the index) and events (the number of the last event);
    - `events`: a stream of the changes, for `watch` in every kvserver on this Redis: put
      (with the value's etag, size, content_type and expires), delete and expire, each with
      its key and a number one past the one before (so that a reader can tell when entries
      it did not read were trimmed); trimmed to about (never fewer than) HISTORY entries. Its
      entry IDs are the revisions;
    - and `probe`, a name that never holds anything: a write to it that changes nothing tells
      whether Redis takes writes now (`check_writable`, and each write before its first change).

    Every write and delete changes the key's hash, the index and the totals and appends its
    event in one Lua script (_CHANGE), which does nothing if the key changed since the write
    checked its precondition (see _change), so compare-and-set is atomic across processes,
    the index never disagrees with the values and the events are in the order the changes
    took effect. Redis expires a hash by itself; its key stays in the index until a sweep
    (_SWEEP_AND_COUNT, and a few keys on every write) takes it out and appends its expire
    event, and until then listing skips it by its expiry and the totals are read only after
    sweeping. A kvserver sweeps twice a second (`sweep`), so that expire events come on time
    whether or not anyone reads the keys. A thread per RedisStorage, started by the first
    watch, reads the stream (XREAD BLOCK) into the storage's change feed. The scripts read
    Redis's clock (TIME), the one its expiry follows. A store written by an older kvserver,
    without the index, is indexed when it is first opened. Needs one Redis (not Redis
    Cluster: a script spans a key and the index).

    Values travel whole, so they are limited to `max_value` (Redis strings stop at 512 MB).
    Needs the redis package: pip install 'kvserver[redis]'.
    """

    kind = "redis"
    max_value = 512 * 1024 * 1024 - 1
    _FIELDS = (b"value", b"type", b"etag", b"expires")
    _STRUCTURES = (b"keys", b"expiries", b"sizes", b"totals", b"events", b"probe")
    _BATCH = 1000  # keys per listing, sweeping or indexing step: a step holds Redis for well under 10 ms
    _SWEEP_ON_WRITE = 2  # expired keys each write sweeps, more than it can add: the index cannot fill with them
    _TIMEOUT = 5  # seconds to connect to Redis, and for each of its answers

    # Lua shared by the scripts. Every script gets the structures as KEYS[1..6] and the
    # prefix as ARGV[1]. A Lua script runs whole, with no other command in between.
    _LUA = (
        """
local index, expiries, sizes, totals, events, probe = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local prefix = ARGV[1]
local history = """
        + str(HISTORY)
        + """

local function now_ms()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end

-- Take `key` out of the index and the totals, before its hash changes (its size may be read
-- there); return whether it was in them.
local function forget(key)
  if redis.call('ZREM', index, key) == 1 then
    local size = redis.call('HGET', sizes, key) or redis.call('HSTRLEN', prefix .. key, 'value')
    redis.call('HINCRBY', totals, 'keys', -1)
    redis.call('HINCRBY', totals, 'bytes', 0 - tonumber(size))  -- (-size: Lua writes -0, which HINCRBY refuses)
    redis.call('ZREM', expiries, key)
    redis.call('HDEL', sizes, key)
    return true
  end
  return false
end

-- Append an event (its fields and values) to the stream, numbered one past the one before it:
-- a reader that finds a number skipped knows that entries it had not read were trimmed.
local function announce(...)
  local number = redis.call('HINCRBY', totals, 'events', 1)
  redis.call('XADD', events, 'MAXLEN', '~', history, '*', 'number', number, ...)
end

-- Forget `key`, announcing an expire event if its value had expired.
local function forget_or_expire(key)
  local expires = redis.call('ZSCORE', expiries, key)
  if forget(key) and expires and tonumber(expires) < now_ms() then
    announce('type', 'expire', 'key', key)
  end
end

-- Put `key` in the index and the totals with a value of `size` bytes expiring at `expires_ms` (nil: never).
local function remember(key, size, expires_ms)
  redis.call('ZADD', index, 0, key)
  redis.call('HINCRBY', totals, 'keys', 1)
  redis.call('HINCRBY', totals, 'bytes', size)
  if expires_ms then
    redis.call('ZADD', expiries, expires_ms, key)
    redis.call('HSET', sizes, key, size)
  end
end

-- A write that changes nothing (SETRANGE of no bytes creates no key), which Redis refuses as it
-- refuses any write it cannot take now (out of memory): a script that writes a value calls it
-- before its first change, so that such a refusal leaves nothing half done. (Once a script has
-- changed something, Redis lets it finish.)
local function check_writable()
  redis.call('SETRANGE', probe, 0, '')
end

-- The type of the Redis key `name`, and the etag of the value of kvserver's it holds (a hash with
-- all of _FIELDS), or false if it holds none ('none': no such key; else another program's value).
local function look(name)
  local kind = redis.call('TYPE', name).ok
  if kind == 'hash' and redis.call('HEXISTS', name, 'value') == 1 then
    local fields = redis.call('HMGET', name, 'type', 'etag', 'expires')
    if fields[1] and fields[2] and fields[3] then
      return kind, fields[2]
    end
  end
  return kind, false
end

-- Forget at most `count` keys whose expiry has passed, with their expire events, and delete
-- their hashes (Redis has, or is about to: it deletes a key once the time is past its expiry);
-- return how many. A key written again since has a new expiry, or none, so it is not among them.
local function sweep(count)
  local due = redis.call('ZRANGEBYSCORE', expiries, '-inf', string.format('(%d', now_ms()), 'LIMIT', 0, count)
  for _, key in ipairs(due) do
    forget_or_expire(key)
    redis.call('DEL', prefix .. key)
  end
  return #due
end
"""
    )

    # A write's or delete's first look at the key ARGV[2]: {its type, the etag of its value, nil
    # if it holds no value of kvserver's} (see look).
    _CURRENT = _LUA + "return {look(prefix .. ARGV[2])}"

    # A write or delete of the key ARGV[2], if its value's etag is still ARGV[3] ('' for none:
    # the one its precondition was checked against). ARGV[4]: how many expired keys to sweep on
    # the way; then for a write ARGV[5..10]: the size, the expiry in ms ('' for none), and the
    # hash's value, type, etag and expires fields (none for a delete). Returns 1 if done, 0 if
    # the key changed since the look (nothing is done: look again).
    _CHANGE = (
        _LUA
        + """
local key, expected = ARGV[2], ARGV[3]
local name = prefix .. key
local kind, etag = look(name)
if (etag or '') ~= expected or (kind ~= 'none' and not etag) then
  return 0
end
if ARGV[5] then
  check_writable()  -- (a delete goes on when Redis is out of memory: it frees some)
end
sweep(tonumber(ARGV[4]))
forget_or_expire(key)
redis.call('DEL', name)
if ARGV[5] then
  local expires_ms = ARGV[6] ~= '' and ARGV[6] or nil
  remember(key, tonumber(ARGV[5]), expires_ms)
  redis.call('HSET', name, 'value', ARGV[7], 'type', ARGV[8], 'etag', ARGV[9], 'expires', ARGV[10])
  if expires_ms then
    redis.call('PEXPIREAT', name, expires_ms)
  end
  announce('type', 'put', 'key', key, 'etag', ARGV[9], 'size', ARGV[5], 'content_type', ARGV[8], 'expires', ARGV[10])
elseif etag then
  announce('type', 'delete', 'key', key)
end
return 1
"""
    )

    # Sweep at most ARGV[2] keys, then read the totals: {swept, keys, bytes}. The totals are
    # exact when fewer than ARGV[2] were swept (nothing expired is left in them).
    _SWEEP_AND_COUNT = (
        _LUA
        + """
local swept = sweep(tonumber(ARGV[2]))
local counts = redis.call('HMGET', totals, 'keys', 'bytes')
return {swept, tonumber(counts[1]) or 0, tonumber(counts[2]) or 0}
"""
    )

    # One step of a listing: at most ARGV[4] keys of the index from ARGV[2] to ARGV[3] (ZRANGEBYLEX
    # bounds). Returns {how many the index gave, the last of them ('' if none), those not expired}.
    _LIST = (
        _LUA
        + """
local now = now_ms()
local batch = redis.call('ZRANGEBYLEX', index, ARGV[2], ARGV[3], 'LIMIT', 0, ARGV[4])
local live = {}
for _, key in ipairs(batch) do
  local expires = redis.call('ZSCORE', expiries, key)
  if not expires or tonumber(expires) >= now then
    live[#live + 1] = key
  end
end
return {#batch, batch[#batch] or '', live}
"""
    )

    # Index the keys ARGV[2..] whose hash holds a value (it has an etag) and that are not in the
    # index yet: what an older kvserver wrote. Doing it twice, or beside writers, changes nothing.
    _ADOPT = (
        _LUA
        + """
local adopted = 0
for i = 2, #ARGV do
  local key = ARGV[i]
  local hash = prefix .. key
  if not redis.call('ZSCORE', index, key) and select(2, look(hash)) then
    local expires = redis.call('HGET', hash, 'expires') or ''
    remember(key, redis.call('HSTRLEN', hash, 'value'), expires ~= '' and math.floor(tonumber(expires) * 1000) or nil)
    adopted = adopted + 1
  end
end
return adopted
"""
    )

    def __init__(self, url: str = "redis://localhost:6379/0", *, prefix: str | None = None) -> None:
        """Connect to the Redis at `url`; keys are namespaced under `prefix`, or under the URL's
        `?prefix=` parameter (the way to set it from the command line), or 'kvserver:'.

        A store an older kvserver wrote without the index is indexed now, once, with a notice on
        stderr (it takes a SCAN of the Redis database)."""
        try:
            import redis
        except ImportError:
            raise ModuleNotFoundError("RedisStorage needs redis-py: pip install 'kvserver[redis]'") from None
        super().__init__()
        address, _, query = url.partition("?")  # (urlunsplit would turn unix:///path into unix:/path)
        fields = urllib.parse.parse_qsl(query, keep_blank_values=True)
        url_prefixes = [value for name, value in fields if name == "prefix"]
        client_query = urllib.parse.urlencode([field for field in fields if field[0] != "prefix"])
        self.url = url
        self.prefix = prefix if prefix is not None else (url_prefixes or ["kvserver:"])[-1]
        self._structures = [self._name("") + b"\xff" + name for name in self._STRUCTURES]
        self._redis_error = redis.RedisError
        self._connection_error = redis.ConnectionError
        self._timeout_error = redis.TimeoutError
        # The reply codes of the refusals that redis-py raises as errors of their own class
        # (the others are ResponseErrors whose text holds the code: see _refusal_code).
        self._refusal_classes = (
            (redis.exceptions.OutOfMemoryError, "OOM"),
            (redis.AuthenticationError, "NOAUTH"),  # (a ConnectionError, as the next is: looked for first)
            (redis.exceptions.BusyLoadingError, "LOADING"),
            (redis.exceptions.ReadOnlyError, "READONLY"),
            (redis.exceptions.MasterDownError, "MASTERDOWN"),
            (redis.exceptions.NoPermissionError, "NOPERM"),
        )
        self._response_error = redis.ResponseError
        self._connect = functools.partial(  # a new client (loosely typed)
            redis.Redis.from_url,
            f"{address}?{client_query}" if client_query else address,
            socket_timeout=self._TIMEOUT,
            socket_connect_timeout=self._TIMEOUT,
        )
        try:
            self._client: Any = self._connect()
        except ValueError as error:  # (not with the URL, nor urllib's words if it has a password: they may hold it)
            why = "" if "@" in url else f": {error}"
            raise ValueError(
                "a Redis URL is redis://[user:password@]host[:port][/db], with / # ? @ in a password "
                f"percent-encoded; this one is not{why}"
            ) from None
        self._scripts: dict[str, Any] = {}  # the Lua scripts as redis-py has them, registered at first use
        self._feed = _ChangeFeed(self._begin_changes)
        self._reader: Any = None  # the connection of the thread that reads the events, once started
        with self._reachable():
            self._client.ping()
            if not self._client.hexists(self._structures[3], "indexed"):
                self._index_older_values()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r}, prefix={self.prefix!r})"

    @property
    def location(self) -> str:  # type: ignore[override]
        """The URL without its password, if it has one (before the host, or as ?password=)."""
        url = re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1…@", self.url)
        return "at " + re.sub(r"([?&]password=)[^&#]*", r"\1…", url)

    def close(self) -> None:
        super().close()
        self._client.close()
        if self._reader is not None:
            self._reader.close()  # its thread's XREAD fails, and the thread sees the storage closed

    @contextlib.contextmanager
    def _reachable(self, changing: bool = False) -> Iterator[None]:
        """Turn redis-py's errors of a Redis that cannot take the call now (away, loading, a
        read-only replica, busy, out of memory, ...) into StorageUnavailable, or StorageFull,
        saying why; and refuse once closed. Nothing was half done: Redis refuses a script whole
        (see _change), unless its ACL allows some of the script's commands and not others. Other
        errors are faults of ours, raised as they are. After READONLY, the idle connections are
        closed, so that the next call connects again: where a failover moved the URL's host name
        to the new primary, writes then go there.

        A call that Redis does not answer in time, or a change (`changing`) whose connection was
        lost after it was made (not while connecting), may have been carried out all the same:
        the error says so, and to read the key before writing it again."""
        self._check_open()
        try:
            yield
        except self._redis_error as error:
            code = self._refusal_code(error)
            if code == "READONLY":  # a primary turned replica (a failover): connect again, maybe to the new one
                self._client.connection_pool.disconnect(inuse_connections=False)
            if code is not None:
                refusal, reason = _REDIS_REFUSALS[code]
                raise refusal(f"Redis {self.location} {reason}") from None
            if isinstance(error, self._timeout_error):
                what = f"did not answer within {self._TIMEOUT} s"
            # (" connecting to " is how redis-py words a connection that failed to open: nothing was sent)
            elif isinstance(error, self._connection_error) and changing and " connecting to " not in str(error):
                what = f"lost the connection during a write ({error})"
            elif isinstance(error, self._connection_error):
                raise StorageUnavailable(f"cannot reach Redis {self.location}: {error}") from None
            else:
                raise
            raise StorageUnavailable(
                f"Redis {self.location} {what}: a write may have been made all the same, so read the key before"
                " writing it again"
            ) from None

    def _refusal_code(self, error: Exception) -> str | None:
        """The code of the reply by which Redis refused a call, if it is one of _REDIS_REFUSALS:
        from redis-py's class for it, or from the text of a ResponseError. That text may put the
        command first ("Command # 2 (DEL ...) of pipeline caused error: BUSY ..."), or, from
        Redis 6, wrap a refusal inside a script ("Error running script ...: -OOM ..."); an ACL's
        refusal inside a script has no code at all (Redis 6.2 and 7.0), only its words. What
        redis-py says of the command stays out of the message: it may hold a key or a value."""
        for kind, code in self._refusal_classes:
            if isinstance(error, kind):
                return code
        if isinstance(error, self._response_error):
            text = str(error)
            codes: list[str] = _REPLY_CODE.findall(text)
            if codes and codes[-1] in _REDIS_REFUSALS:
                return codes[-1]
            if _ACL_REFUSAL_IN_SCRIPT.search(text):
                return "NOPERM"
        return None

    def check_writable(self) -> None:
        """A write that changes nothing, which Redis refuses as it refuses any write when it
        cannot take one (read-only, out of memory, loading, busy...): SETRANGE of no bytes at
        `probe` (Redis then creates nothing)."""
        with self._reachable():
            self._client.setrange(self._structures[5], 0, b"")

    def _name(self, key: str) -> bytes:
        return (self.prefix + key).encode("utf-8")

    def _run(self, script: str, *args: object) -> Any:
        """Run one of the Lua scripts, with the structures as its KEYS and the prefix and `args`
        as its ARGV: by its SHA1 (EVALSHA), so that its text goes to Redis once, not each time."""
        registered = self._scripts.get(script)
        if registered is None:  # (redis-py loads it into Redis if Redis does not have it)
            registered = self._scripts[script] = self._client.register_script(script)
        return registered(keys=self._structures, args=[self._name(""), *args])

    def _index_older_values(self) -> None:
        """Index the values in Redis that are not in the index: a store an older kvserver wrote.

        Safe beside other kvservers doing the same or writing (_ADOPT takes a key only if it is
        not indexed yet); the last step marks the store indexed, so it runs once.
        """
        pattern = re.sub(rb"([*?\[\]\\])", rb"\\\1", self._name("")) + b"*"
        start = len(self._name(""))
        names = self._client.scan_iter(match=pattern, count=self._BATCH, _type="HASH")
        adopted = 0
        while batch := list(itertools.islice(names, self._BATCH)):
            keys = []
            for name in batch:
                with contextlib.suppress(UnicodeDecodeError, ValueError):  # not a key: the structures, say
                    keys.append(check_key(name[start:].decode("utf-8")))
            if keys and (found := self._run(self._ADOPT, *keys)):
                if not adopted:
                    print(
                        f"kvserver: indexing the keys an older kvserver wrote in Redis {self.location} "
                        f"(prefix {self.prefix!r}), once",
                        file=sys.stderr,
                    )
                adopted += found
        self._client.hset(self._structures[3], "indexed", 1)

    @staticmethod
    def _stat_of(size: int, content_type: bytes, etag: bytes, expires: bytes) -> Stat:
        return Stat(
            size, _stored_media_type(content_type.decode("latin-1")), etag.decode(), float(expires) if expires else None
        )

    def _fetch(self, key: str) -> tuple[Stat, bytes | BinaryIO]:
        with self._reachable(), self._no_value_if_foreign(key):
            value, content_type, etag, expires = self._client.hmget(self._name(key), self._FIELDS)
        if None in (value, content_type, etag, expires):  # no hash, or another program's
            raise KeyError(key)
        return self._stat_of(len(value), content_type, etag, expires), value

    def _stat(self, key: str) -> Stat:
        with self._reachable(), self._no_value_if_foreign(key), self._client.pipeline() as pipe:
            pipe.hexists(self._name(key), "value")
            pipe.hstrlen(self._name(key), "value")
            pipe.hmget(self._name(key), self._FIELDS[1:])
            has_value, size, (content_type, etag, expires) = pipe.execute()
        if not has_value or None in (content_type, etag, expires):  # no hash, or another program's
            raise KeyError(key)
        return self._stat_of(size, content_type, etag, expires)

    @contextlib.contextmanager
    def _no_value_if_foreign(self, key: str) -> Iterator[None]:
        """Around reading a key's hash: another program's value of another type under the
        prefix (Redis answers WRONGTYPE) is not a value of kvserver's: KeyError, as it is not
        listed either; nor is a hash without all of _FIELDS (the reader checks that). Writes
        refuse to replace either: see _change."""
        try:
            yield
        except self._response_error as error:
            if "WRONGTYPE" not in str(error):
                raise
            raise KeyError(key) from None

    def _keys(self, prefix: str, after: str | None, limit: int | None) -> list[str]:
        """Read the index from `prefix` (or just after `after`) in steps of at most _BATCH keys;
        a step costs O(log n + its keys), so `after` jumps anywhere at once."""
        first = prefix.encode("utf-8")
        low = b"(" + after.encode("utf-8") if after is not None and after.encode("utf-8") >= first else b"[" + first
        high = b"(" + first + b"\xff"  # past every UTF-8 string that starts with the prefix
        keys: list[str] = []
        wanted = self._BATCH if limit is None else min(self._BATCH, limit)
        with self._reachable():
            while True:
                seen, last, live = self._run(self._LIST, low, high, wanted)
                keys += (key.decode("utf-8") for key in live)
                if seen < wanted or (limit is not None and len(keys) >= limit):
                    return keys[:limit]
                low = b"(" + last
                wanted = self._BATCH  # (a page cut short by expired keys goes on in full steps)

    def totals(self) -> tuple[int, int]:
        """Read from the totals hash, after sweeping every key that has expired."""
        _, keys, size = self._sweep_and_count()
        return keys, size

    def sweep(self) -> int:
        """Sweep every key that has expired, whoever wrote it, with its expire event."""
        return self._sweep_and_count()[0]

    def _sweep_and_count(self) -> tuple[int, int, int]:
        """Sweep every key that has expired, in steps of _BATCH keys (so that a step never
        holds Redis long); return how many went, and the totals then."""
        removed = 0
        with self._reachable():
            while True:
                swept, keys, size = self._run(self._SWEEP_AND_COUNT, self._BATCH)
                removed += swept
                if swept < self._BATCH:
                    return removed, keys, size

    def _write(self, key: str, new: _NewValue, precondition: _Precondition) -> tuple[Stat, bool]:
        pieces, content_type, expires_at = new
        value = _join(pieces)
        if len(value) > self.max_value:
            raise ValueError(f"Redis holds values of at most {self.max_value} bytes, not {len(value)}")
        stat = Stat(len(value), content_type, f"{_etag(len(value), _new_stamp())}-{secrets.token_hex(4)}", expires_at)
        expires_ms = "" if expires_at is None else int(expires_at * 1000)
        expires = "" if expires_at is None else repr(expires_at)
        written = (len(value), expires_ms, value, content_type, stat.etag, expires)
        return stat, self._change(key, precondition, written) is None

    def _delete(self, key: str, precondition: _Precondition) -> bool:
        return self._change(key, precondition, ()) is not None

    def _change(self, key: str, precondition: _Precondition, written: tuple[object, ...]) -> str | None:
        """If the precondition holds, replace the key's hash (`written`: _CHANGE's ARGV[5..10];
        none to delete it), keeping the index and totals in step and appending the event, in one
        script; return the ETag the key had (None: it had no value). ValueError if another
        program's value is under the key's name: kvserver does not replace what it did not write.

        The precondition is checked in Python against a first look at the key; the script then
        changes the key only if it is still as seen, else the write looks again, as a
        compare-and-set. (One script, not MULTI: Redis discards a refused script whole, while a
        transaction whose MULTI a busy or loading Redis refused could run its commands one by one.)"""
        with self._reachable(changing=True):
            while True:
                kind, etag = self._run(self._CURRENT, key)
                if kind != b"none" and etag is None:
                    raise ValueError(
                        f"Redis holds another program's value ({kind.decode()}) under {self._name(key)!r}, where the"
                        f" key {key!r} would be: kvserver does not replace it; remove it from Redis, or give"
                        " kvserver a prefix of its own (?prefix= in the Redis URL)"
                    )
                current = None if etag is None else etag.decode()
                precondition.check(key, current)
                if self._run(self._CHANGE, key, current or "", self._SWEEP_ON_WRITE, *written):
                    return current

    # Watching: the events stream, read by one thread into the change feed

    def _newest_revision(self) -> str | None:
        """The stream's newest entry: this kvserver's feed may not have read it yet (a change
        made through another kvserver, or just now through this one)."""
        with self._reachable():
            newest = self._client.xrevrange(self._structures[4], count=1)
        return newest[0][0].decode() if newest else None

    @staticmethod
    def _event(revision: bytes, fields: dict[bytes, bytes]) -> Event:
        """The Event of a stream entry."""
        type, key = fields[b"type"].decode(), fields[b"key"].decode("utf-8")
        stat = None
        if type == "put":
            expires = fields[b"expires"]
            stat = Stat(
                int(fields[b"size"]),
                _stored_media_type(fields[b"content_type"].decode("latin-1")),
                fields[b"etag"].decode(),
                float(expires) if expires else None,
            )
        return Event(revision.decode(), type, key, stat)

    def _begin_changes(self) -> tuple[str, list[Event]]:
        """The feed's start (at the first watch): the last HISTORY events of the stream, and a
        thread that reads the ones that follow."""
        with self._reachable():
            entries = self._client.xrevrange(self._structures[4], count=HISTORY)[::-1]
        events = [self._event(revision, fields) for revision, fields in entries]
        floor = events[0].revision if events else "0-0"  # (what came before the first is not known)
        self._reader = self._connect()
        last, number = (events[-1].revision, self._number(entries[-1][1])) if events else (floor, None)
        threading.Thread(target=self._read_changes, args=(last, number), name="kvserver-events", daemon=True).start()
        return floor, events

    @staticmethod
    def _number(fields: dict[bytes, bytes]) -> int | None:
        """A stream entry's number (None for one an older kvserver wrote, unnumbered)."""
        number = fields.get(b"number")
        return None if number is None else int(number)

    def _read_changes(self, last: str, number: int | None) -> None:
        """Publish each entry of the stream after `last` (whose number is `number`) to the feed,
        until the storage closes. An entry whose number is not one past the one before follows
        entries that were trimmed before this thread read them (it fell behind, or Redis came
        back from an older snapshot, or none): the feed has a gap there. Where numbers cannot
        tell (an older kvserver's entries have none), it looks after the read whether the
        stream's oldest entry is past `last`, so that entries after `last` may have gone unread:
        then the feed has a gap before what it read. A read that finds nothing new looks whether
        the stream still reaches `last`: if not, Redis came back without the changes read
        (restarted without its data, or from an older snapshot), and its keys may have changed
        with no event, so the feed has a gap just after `last` at once, not at the next write."""
        stream = self._structures[4]
        unavailable = False  # the last read could not reach Redis (which was said once)
        while not self._closed:
            try:
                with self._reachable():
                    answer = self._reader.xread({stream: last}, count=_WATCH_BATCH, block=1000)
                    entries = answer[0][1] if answer else []
                    numbers = [self._number(fields) for _, fields in entries]
                    unnumbered = number is None or None in numbers
                    oldest = self._reader.xrange(stream, count=1) if entries and unnumbered and last != "0-0" else []
                    # (after a read that found nothing: the stream's newest entry, [] if none)
                    newest = None if entries or last == "0-0" else self._reader.xrevrange(stream, count=1)
                if unavailable:
                    print(f"kvserver: the events from Redis {self.location} are read again", file=sys.stderr)
                    unavailable = False
                if oldest and revision_order(oldest[0][0].decode()) > revision_order(last):
                    self._feed.gap(entries[0][0].decode())
                if newest is not None and (not newest or revision_order(newest[0][0].decode()) < revision_order(last)):
                    milliseconds, sequence = revision_order(last)  # the loss came after `last`: a gap just past it
                    self._feed.gap(f"{milliseconds}-{sequence + 1}")  # (Redis's next entry IDs are newer still)
                    # Read on from what the stream holds now (an emptied Redis numbers from 1 again).
                    last, number = (newest[0][0].decode(), self._number(newest[0][1])) if newest else ("0-0", 0)
                for (revision, fields), following in zip(entries, numbers, strict=True):
                    event = self._event(revision, fields)
                    if number is not None and following is not None and following != number + 1:
                        self._feed.gap(event.revision)
                    self._feed.publish(event.type, event.key, event.stat, event.revision)  # type: ignore[arg-type]
                    last, number = event.revision, following
            except Exception as error:
                if self._closed:
                    return  # (close() closed the connection under the XREAD)
                if not isinstance(error, StorageUnavailable):
                    traceback.print_exc()  # a fault of ours: said every time
                elif not unavailable:
                    print(f"kvserver: events are not read for now: {error}", file=sys.stderr)
                    unavailable = True
                time.sleep(1)  # once Redis is back, XREAD goes on from `last`


# Redis's refusals of a call it cannot take now, by the code its reply begins with: what
# RedisStorage raises instead (StorageFull: 507; StorageUnavailable: 503) and why, in words.
_REDIS_REFUSALS: dict[str, tuple[type[StorageUnavailable], str]] = {
    "OOM": (
        StorageFull,
        "is out of memory (its maxmemory): nothing was stored; free memory in Redis or raise its maxmemory",
    ),
    "NOAUTH": (
        StorageUnavailable,
        "does not take kvserver's password (NOAUTH or WRONGPASS): give kvserver the password in its Redis URL",
    ),
    "LOADING": (StorageUnavailable, "is loading its data (LOADING)"),
    "READONLY": (StorageUnavailable, "is a read-only replica (READONLY): nothing was stored"),
    "MASTERDOWN": (StorageUnavailable, "is a replica that lost its primary (MASTERDOWN)"),
    "BUSY": (StorageUnavailable, "is busy running a script (BUSY)"),
    "MISCONF": (StorageUnavailable, "refuses writes as it cannot save to its disk (MISCONF): nothing was stored"),
    "NOREPLICAS": (
        StorageUnavailable,
        "refuses writes as too few replicas are connected (NOREPLICAS): nothing was stored",
    ),
    "NOPERM": (
        StorageUnavailable,
        "refuses kvserver's user a command or a key (NOPERM, by its ACL): allow that user every command on the"
        " keys under kvserver's prefix; where the ACL allows some of a write's commands, the write may have been"
        " made in part, so read the key before writing it again",
    ),
}
_REPLY_CODE = re.compile(r"(?:^|caused error: |: -)([A-Z]+)\b")  # where a reply's code stands in redis-py's text
# An ACL's refusal of a command inside a script, which has no code (Redis 6.2 and 7.0): its
# words where a reply's text stands, first or after the script's line ("@user_script: 1: ").
_ACL_REFUSAL_IN_SCRIPT = re.compile(r"(?:^|@user_script: [0-9]+: )The user executing the script can't")

_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def open_storage(spec: str, *, fsync: bool = True) -> Storage:
    """A storage from a short description: 'memory', 'files' (./data), 'files:<path>', or a
    redis://, rediss:// or unix:// URL."""
    if spec.startswith(_REDIS_SCHEMES):
        return RedisStorage(spec)
    kind, _, argument = spec.partition(":")
    if kind == "memory" and not argument:
        return MemoryStorage()
    if kind == "files":
        return FileStorage(argument or "./data", fsync=fsync)
    raise ValueError(f"unknown storage {spec!r}: use 'memory', 'files', 'files:<path>' or a redis:// URL")


# HTTP message framing (RFC 9112): request heads and bodies, read strictly


class _HTTPError(Exception):
    """An error answered to the client as problem+json (RFC 9457); raise it anywhere in a
    request's handling, with the header fields the answer needs (Allow, WWW-Authenticate)."""

    def __init__(self, status: HTTPStatus, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}


class _IncompleteMessage(Exception):
    """The client closed the connection, or went quiet past a deadline, before its message
    ended: nothing of the message is carried out."""


MAX_REQUEST_LINE = 64 * 1024
MAX_HEADER_BYTES = 64 * 1024  # the field lines of a head or a trailer section, CRLFs included
MAX_FIELDS = 100
MAX_CHUNK_LINE = 4096  # a chunk-size line with its extensions
_REQUEST_TARGET = re.compile(rb"[\x21-\x7e]+")  # RFC 3986 characters, percent-encoded beyond ASCII
_TOKEN_PATTERN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED_STRING = rb'"(?:[\t\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t\x20-\x7e\x80-\xff])*"'
_TOKEN = re.compile(_TOKEN_PATTERN)  # RFC 9110 section 5.6.2
# field-name ":" OWS field-value OWS CRLF: no control character but tab in the value (no NUL, CR,
# LF, ...), and no obs-fold (RFC 9112 section 5); the value is trimmed of space and tab after the
# match. (No whitespace on both sides of the value in the pattern: that backtracks quadratically.)
_FIELD_LINE = re.compile(rb"(%b):([\t\x20-\x7e\x80-\xff]*)\r\n" % _TOKEN_PATTERN)
_REQUEST_LINE = re.compile(rb"(%b) (%b) (HTTP/[0-9]\.[0-9])" % (_TOKEN_PATTERN, _REQUEST_TARGET.pattern))
_CHUNK_LINE = re.compile(  # chunk-size [ chunk-ext ] (RFC 9112 section 7.1.1)
    rb"(0*[0-9A-Fa-f]{1,15})(?:[ \t]*;[ \t]*%b(?:[ \t]*=[ \t]*(?:%b|%b))?)*"
    % (_TOKEN_PATTERN, _TOKEN_PATTERN, _QUOTED_STRING)
)
# Methods of RFC 9110 section 9 and PATCH (RFC 5789): a route that does not take one answers 405,
# any other method 501.
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})


class _Fields:
    """The header fields of a request: names matched without regard to case, every field line
    kept (so that the framing rules can see repeated ones), values as Latin-1 text trimmed of
    space and tab, as http.client's HTTPMessage offers them."""

    __slots__ = ("_values",)

    def __init__(self, values: dict[str, list[str]]) -> None:
        self._values = values  # by lower-case name: the values of its field lines, in order

    def get(self, name: str, default: str | None = None) -> str | None:
        """The field's value; the values of a repeated field joined with ", " (RFC 9110
        section 5.3), so that a second Origin or If-Match cannot pass unseen."""
        values = self._values.get(name.lower())
        if values is None:
            return default
        return values[0] if len(values) == 1 else ", ".join(values)

    def get_all(self, name: str) -> list[str]:
        return self._values.get(name.lower(), [])

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._values

    def items(self) -> list[tuple[str, str]]:
        return [(name, value) for name, values in self._values.items() for value in values]


_NO_FIELDS = _Fields({})


def _read_line(rfile: io.BufferedIOBase, limit: int, too_long: tuple[HTTPStatus, str]) -> bytes:
    """One CRLF-terminated line without its CRLF: the error `too_long` past `limit` bytes, a 400
    for a bare LF (RFC 9112 section 2.2: we take no other line ending), _IncompleteMessage at EOF."""
    line = rfile.readline(limit + 1)
    if line.endswith(b"\r\n"):
        return line[:-2]
    raise _line_error(line, limit, too_long)


def _line_error(line: bytes, limit: int, too_long: tuple[HTTPStatus, str]) -> Exception:
    """What is wrong with a line read with readline(limit + 1) that does not end with CRLF."""
    if len(line) > limit:
        return _HTTPError(*too_long)
    if line.endswith(b"\n"):
        return _HTTPError(HTTPStatus.BAD_REQUEST, "end every line of the message with CRLF, not a bare LF")
    return _IncompleteMessage()


def _read_field_lines(rfile: io.BufferedIOBase, what: str) -> _Fields:
    """The field lines up to the empty line that ends them (a head's, or a chunked body's
    trailer section); 400 for anything RFC 9112 section 5 does not allow, 431 past MAX_FIELDS
    or MAX_HEADER_BYTES."""
    values: dict[str, list[str]] = {}
    budget = MAX_HEADER_BYTES
    for _ in range(MAX_FIELDS + 1):
        line = rfile.readline(budget + 1)
        if line == b"\r\n":
            return _Fields(values)
        match = _FIELD_LINE.fullmatch(line)
        if match is None:
            raise _field_line_error(line, budget, what)
        budget -= len(line)
        name, value = match.groups()
        values.setdefault(name.lower().decode("ascii"), []).append(value.strip(b" \t").decode("latin-1"))
    raise _HTTPError(*_too_many_fields(what))


def _too_many_fields(what: str) -> tuple[HTTPStatus, str]:
    return HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"send at most {MAX_FIELDS} {what} and 64 KiB of them"


def _field_line_error(line: bytes, limit: int, what: str) -> Exception:
    """What is wrong with a field line that _FIELD_LINE does not match (read with readline(limit + 1))."""
    if not line.endswith(b"\r\n"):
        return _line_error(line, limit, _too_many_fields(what))
    if line[0] in b" \t":
        return _HTTPError(HTTPStatus.BAD_REQUEST, "a field line starts with whitespace (obs-fold); send it on one line")
    name, colon, _ = line.partition(b":")
    if not colon:
        return _HTTPError(HTTPStatus.BAD_REQUEST, f"a field line has no colon: {_shown(line[:-2])}")
    if not _TOKEN.fullmatch(name):
        return _HTTPError(
            HTTPStatus.BAD_REQUEST, f"field name {_shown(name)} is not a token (no whitespace before the colon)"
        )
    return _HTTPError(HTTPStatus.BAD_REQUEST, f"field {_shown(name)} holds a control character")


def _shown(data: bytes) -> str:
    """A piece of a message as a problem detail shows it: quoted, escaped, at most 60 characters."""
    text = data[:60].decode("latin-1")
    return json.dumps(text + ("…" if len(data) > 60 else ""), ensure_ascii=True)


class _RequestHead(NamedTuple):
    """A request line and its header fields, read and checked."""

    method: str
    target: str  # Latin-1 text: encoding it gives back the bytes sent
    version: str  # "HTTP/1.0" or "HTTP/1.1"
    fields: _Fields
    content_length: int | None  # None: no Content-Length field
    chunked: bool


_REQUEST_LINE_TOO_LONG = (
    HTTPStatus.REQUEST_URI_TOO_LONG,
    "the request line is over 64 KiB; send big values with PUT /kv/<key>",
)


def _read_request_line(rfile: io.BufferedIOBase) -> bytes:
    """The request line without its CRLF, empty lines before it skipped (RFC 9112 section 2.2);
    414 past 64 KiB."""
    line = _read_line(rfile, MAX_REQUEST_LINE, _REQUEST_LINE_TOO_LONG)
    budget = MAX_REQUEST_LINE
    while not line and budget > 0:
        budget -= 2
        line = _read_line(rfile, MAX_REQUEST_LINE, _REQUEST_LINE_TOO_LONG)
    return line


def _parse_request_line(line: bytes) -> tuple[str, str, str]:
    """A request line's method, target (Latin-1 text: encoding it gives back the bytes sent)
    and version ('HTTP/1.1', as sent), by RFC 9112 section 3; a 400 for a line to refuse."""
    request_line = _REQUEST_LINE.fullmatch(line)
    if request_line is None:
        raise _request_line_error(line)
    method, target, version = request_line.groups()
    return method.decode("ascii"), target.decode("latin-1"), version.decode("ascii")


def _read_head(request_line: tuple[str, str, str], rfile: io.BufferedIOBase) -> _RequestHead:
    """Read the header fields after a request line (method, target, version), by RFC 9112
    sections 2-6: every rule that decides where the message ends is checked before anything
    of it is carried out. A 400 (or 431, 501, 505) for a head to refuse; _IncompleteMessage if
    the client ends it before its empty line."""
    method, target, version = request_line
    if not version.startswith("HTTP/1."):
        raise _HTTPError(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, "this server speaks HTTP/1.1 and HTTP/1.0")
    http_version = "HTTP/1.0" if version == "HTTP/1.0" else "HTTP/1.1"
    fields = _read_field_lines(rfile, "header fields")
    hosts = fields.get_all("Host")
    if len(hosts) > 1 or (not hosts and http_version == "HTTP/1.1"):
        raise _HTTPError(HTTPStatus.BAD_REQUEST, "send exactly one Host field (RFC 9112 section 3.2)")
    return _RequestHead(method, target, http_version, fields, *_body_framing(fields, http_version))


def _request_line_error(line: bytes) -> _HTTPError:
    """What is wrong with a request line that _REQUEST_LINE does not match."""
    parts = line.split(b" ")
    if len(parts) != 3:
        return _HTTPError(
            HTTPStatus.BAD_REQUEST,
            f"a request line is <method> <target> HTTP/1.1, each separated by one space, not {_shown(line)}",
        )
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        return _HTTPError(HTTPStatus.BAD_REQUEST, f"method {_shown(method)} is not a token")
    if not _REQUEST_TARGET.fullmatch(target):
        return _HTTPError(
            HTTPStatus.BAD_REQUEST, f"the request target {_shown(target)} holds bytes to percent-encode first"
        )
    return _HTTPError(HTTPStatus.BAD_REQUEST, f"{_shown(version)} is not an HTTP version; send HTTP/1.1")


def _body_framing(fields: _Fields, version: str) -> tuple[int | None, bool]:
    """The Content-Length and whether the body is chunked (RFC 9112 section 6): a 400 for any
    framing two parsers could read two ways, a 501 for a transfer coding other than chunked."""
    if "content-length" not in fields and "transfer-encoding" not in fields:
        return None, False  # no body: the common case
    lengths = fields.get_all("Content-Length")
    codings = fields.get_all("Transfer-Encoding")
    if lengths and codings:
        raise _HTTPError(HTTPStatus.BAD_REQUEST, "send Content-Length or Transfer-Encoding, not both")
    if codings:
        if version == "HTTP/1.0":
            raise _HTTPError(HTTPStatus.BAD_REQUEST, "HTTP/1.0 has no Transfer-Encoding; send Content-Length")
        names = [name.strip(" \t").lower() for name in ",".join(codings).split(",")]
        if any(not _TOKEN.fullmatch(name.encode("latin-1")) for name in names):
            raise _HTTPError(
                HTTPStatus.BAD_REQUEST, f"Transfer-Encoding {', '.join(codings)!r} is not a list of codings"
            )
        if any(name != "chunked" for name in names):
            raise _HTTPError(HTTPStatus.NOT_IMPLEMENTED, "the only transfer coding this server takes is chunked")
        if len(names) > 1:
            raise _HTTPError(HTTPStatus.BAD_REQUEST, "Transfer-Encoding names chunked more than once")
        return None, True
    if len(lengths) > 1:
        raise _HTTPError(HTTPStatus.BAD_REQUEST, "send one Content-Length field, not several")
    if not lengths[0].isascii() or not lengths[0].isdigit():
        raise _HTTPError(HTTPStatus.BAD_REQUEST, f"Content-Length is a run of digits, not {lengths[0]!r}")
    digits = lengths[0].lstrip("0") or "0"  # (leading zeros add nothing, but to the time int() takes)
    if len(digits) > 18:
        raise _HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"Content-Length {digits} is beyond any limit")
    return int(digits), False


class _RequestBody:
    """The body of one request as its head frames it: Content-Length bytes, chunked, or none.

    A route that takes a body calls `open(limit)` and reads what it returns as a binary file
    (`readinto`, which the storage calls with its reused buffer). Until the body has been read
    to its end (`unread` is False), the connection cannot carry another request and is closed
    after the answer. Each byte must come within STALL_TIMEOUT of the one before.
    """

    __slots__ = ("_chunked_total", "_handler", "_head", "_left", "_limit", "unread")

    def __init__(self, handler: KVRequestHandler, head: _RequestHead) -> None:
        self._handler = handler
        self._head = head
        self.unread = head.chunked or bool(head.content_length)
        self._left = 0 if head.chunked else head.content_length or 0  # of the body, or of the chunk read
        self._limit = 0
        self._chunked_total = 0

    def open(self, limit: int) -> _RequestBody:
        """Accept a body of at most `limit` bytes, to read from the object returned: `check`
        it, and only then send 100 Continue to a client that asked for it (RFC 9110 section
        10.1.1), so that a client that waits for it sends no byte of a value we refuse. A
        chunked body is held to `limit` as it arrives."""
        self.check(limit)
        if self._head.version == "HTTP/1.1" and (self._head.fields.get("Expect") or "").lower() == "100-continue":
            self._handler.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self._handler.wfile.flush()
        self._limit = limit
        return self

    def check(self, limit: int) -> None:
        """Refuse, from the head alone, a body that `open(limit)` would not take: 400 for a
        content coding, 411 without a length, 413 for a length over `limit`."""
        head = self._head
        coding = head.fields.get("Content-Encoding")
        if coding and coding.lower() != "identity":  # (RFC 9110 section 8.4 allows refusing it)
            raise _HTTPError(
                HTTPStatus.BAD_REQUEST,
                f"a body is taken without a content coding, not with Content-Encoding {coding!r}: a value is stored "
                "as the bytes sent and served without one; send it decoded, or as a value of its own media type",
            )
        if not head.chunked and head.content_length is None:
            raise _HTTPError(HTTPStatus.LENGTH_REQUIRED, "send a Content-Length field, or the body chunked")
        if head.content_length is not None and head.content_length > limit:
            raise _HTTPError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the value is {head.content_length} bytes; this server takes at most {limit} (--max-value)",
            )

    def read_all(self, limit: int) -> bytes:
        """`open(limit)`, and the whole body."""
        return _join(_pieces(self.open(limit)))

    def readinto(self, buffer: memoryview, /) -> int:
        """Read the next bytes of the body into `buffer`, as a binary file does: how many, 0 at
        the end. At most what one recv gives, so that each renews the stall deadline.
        _IncompleteMessage if the client stops short; 400 or 413 for a bad chunked body."""
        if self._left == 0 and self.unread and self._head.chunked:
            self._left = self._next_chunk_size()
        if self._left == 0:
            self.unread = False
            return 0
        count = self._handler.rfile.readinto1(memoryview(buffer)[: self._left])
        if not count:
            raise _IncompleteMessage
        self._handler.server.connections.moved(self._handler.connection)
        self._left -= count
        if self._left == 0 and self._head.chunked and self._handler.rfile.read(2) != b"\r\n":
            raise _HTTPError(HTTPStatus.BAD_REQUEST, "chunk data is not followed by CRLF: the size line is wrong")
        return count

    def _next_chunk_size(self) -> int:
        """Read a chunk-size line (RFC 9112 section 7.1) and return the size, its extensions
        checked and ignored; at the last chunk (0), read the trailer section too, checked and
        ignored. A size that is not hex digits or an over-long line is a 400."""
        rfile = self._handler.rfile
        line = _read_line(
            rfile, MAX_CHUNK_LINE, (HTTPStatus.BAD_REQUEST, f"a chunk-size line is over {MAX_CHUNK_LINE} bytes")
        )
        match = _CHUNK_LINE.fullmatch(line)
        if match is None:
            raise _HTTPError(HTTPStatus.BAD_REQUEST, f"{_shown(line)} is not a chunk-size line")
        size = int(match.group(1), 16)
        if size == 0:
            _read_field_lines(rfile, "trailer fields")
        self._chunked_total += size
        if self._chunked_total > self._limit:
            raise _HTTPError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the value is over {self._limit} bytes, the most this server takes (--max-value)",
            )
        return size


# HTTP answers: JSON, problem+json, the one mapping from errors to statuses, query fields


def _json_bytes(document: object) -> bytes:
    """`document` as strict JSON in UTF-8, non-ASCII characters as themselves (not \\u escapes);
    ValueError for a float that is not finite, which JSON has no form for."""
    return _JSON.encode(document).encode("utf-8")


def _problem(status: HTTPStatus, detail: str) -> bytes:
    """The problem+json body (RFC 9457) of an error answer, ending with a newline."""
    document = {"type": "about:blank", "title": status.phrase, "status": status.value, "detail": detail}
    return _json_bytes(document) + b"\n"


def _answer_to(error: Exception) -> tuple[HTTPStatus, str, dict[str, str]]:
    """The status, detail and headers that answer an exception from a route or the storage,
    over HTTP and (as a Fault whose code is the status) over XML-RPC: the one place that
    decides. A 500 is a fault of the server: the caller logs its traceback."""
    if isinstance(error, _HTTPError):
        return error.status, error.detail, error.headers
    if isinstance(error, PreconditionFailed):
        return HTTPStatus.PRECONDITION_FAILED, str(error), {}
    if isinstance(error, KeyError):
        return HTTPStatus.NOT_FOUND, f"no key {error.args[0]!r}", {}
    if isinstance(error, ValueError):  # the storage refused an argument: a bad key, TTL, size or media type
        return HTTPStatus.BAD_REQUEST, str(error), {}
    if isinstance(error, StorageFull):  # (a StorageUnavailable, of its own status)
        return HTTPStatus.INSUFFICIENT_STORAGE, str(error), {}
    if isinstance(error, StorageUnavailable):
        return HTTPStatus.SERVICE_UNAVAILABLE, f"{error}; try again later", {}
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return HTTPStatus.INSUFFICIENT_STORAGE, "the disk is full; nothing was stored; free space", {}
    return HTTPStatus.INTERNAL_SERVER_ERROR, "an unexpected error; the server log has details", {}


def _decode_query(query: str) -> list[tuple[bytes, bytes | None]]:
    """The name/value pairs of a query string, percent-decoded, '+' as space, as bytes.

    A value is None for a pair without '='. The request line reached us as Latin-1 text,
    so encoding it back gives the bytes the client sent.
    """
    if "%" not in query:  # nothing to decode (the common case: unquote_to_bytes is Python code)
        unquote: Callable[[bytes], bytes] = bytes
    else:
        unquote = urllib.parse.unquote_to_bytes
    pairs: list[tuple[bytes, bytes | None]] = []
    for field in query.replace("+", " ").split("&"):
        if field:
            name, equals, value = field.partition("=")
            pairs.append((unquote(name.encode("latin-1")), unquote(value.encode("latin-1")) if equals else None))
    return pairs


def _text(raw: bytes, what: str) -> str:
    """Decode a query or path field that must be UTF-8 text. (A key's other rules are the
    storage's to check: its ValueError is answered 400 like this one.)"""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _HTTPError(HTTPStatus.BAD_REQUEST, f"the {what} is not valid UTF-8 once percent-decoded") from None


def _ttl(raw: bytes | None) -> int | None:
    if raw is None:
        return None
    if not re.fullmatch(rb"[1-9][0-9]{0,11}", raw):
        raise _HTTPError(HTTPStatus.BAD_REQUEST, f"ttl is a positive whole number of seconds, not {_shown(raw)}")
    return int(raw)


def _fields(query: str, allowed: tuple[str, ...], usage: str) -> dict[str, bytes]:
    """The query's fields, each named in `allowed` and given once with a value, else a 400."""
    fields: dict[str, bytes] = {}
    for raw_name, value in _decode_query(query):
        name = raw_name.decode("utf-8", "replace")
        if name not in allowed:
            problem = "unexpected query field {}"
        elif value is None:
            problem = "query field {} needs '=' and a value"
        elif name in fields:
            problem = "query field {} is repeated"
        else:
            fields[name] = value
            continue
        raise _HTTPError(HTTPStatus.BAD_REQUEST, f"{problem.format(_shown(raw_name))}; use {usage}")
    return fields


def _etags(header: str) -> list[str]:
    """The entity tags of an If-Match or If-None-Match header, unquoted; weak ones keep 'W/'."""
    return [weak + tag for weak, tag in re.findall(r'(W/)?"([^"]*)"', header)]


# A list of entity tags (RFC 9110 sections 8.8.3 and 5.6.1): each in quotes, W/ before a weak one.
_ETAG_LIST = re.compile(r'[ \t,]*(?:W/)?"[^"]*"(?:[ \t]*,[ \t,]*(?:W/)?"[^"]*")*[ \t,]*')


class _ChunkedWriter:
    """Writes a response body of unknown length: chunked for HTTP/1.1, raw (closing after) for 1.0."""

    def __init__(self, handler: KVRequestHandler, chunked: bool) -> None:
        self._handler = handler
        self._chunked = chunked
        self._buffer: list[bytes] = []
        self._buffered = 0
        self.written = 0  # bytes of the body, without the chunk framing

    def write(self, data: bytes) -> None:
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered >= CHUNK:
            self._flush()

    def flush(self) -> None:
        """Send what is buffered now (an event stream sends what each of its reads brings)."""
        self._flush()
        self._handler.wfile.flush()

    def _flush(self) -> None:
        if self._buffered:
            if self._chunked:  # chunk-size, data, CRLF (RFC 9112 section 7.1)
                self._buffer.insert(0, b"%x\r\n" % self._buffered)
                self._buffer.append(b"\r\n")
            self._handler._write_pieces(self._buffer)
            self.written += self._buffered
        self._buffer.clear()
        self._buffered = 0

    def close(self) -> None:
        self._flush()
        if self._chunked:
            self._handler._write_body(b"0\r\n\r\n")


def _value_href(key: str) -> str:
    """The URL of a key's value: /kv/<key>, but /get?key=<key> for "." and "..", which browsers
    and curl resolve away as dot-segments of a path (even as %2E): /kv/.. would be /."""
    quoted = urllib.parse.quote(key, safe="")
    return f"/get?key={quoted}" if key in (".", "..") else f"/kv/{quoted}"


def _dump_entry(storage: Storage, key: str) -> object:
    """How a value appears in the / dump (SPEC section 3); KeyError if it is gone."""
    stat = storage.stat(key)  # first, so that a large value is not even opened
    if stat.size <= SMALL_VALUE:
        stat, body = storage.fetch(key)
        with body:
            data = body.read(SMALL_VALUE + 1)
        if len(data) <= SMALL_VALUE:  # (else it grew since)
            if _is_json(stat.content_type):
                with contextlib.suppress(ValueError):
                    return _parse_json(data)
            try:
                return data.decode("utf-8")
            except UnicodeDecodeError:
                return {"base64": base64.b64encode(data).decode("ascii")}
    return {"size": stat.size, "href": _value_href(key)}


# The HTML page


@functools.lru_cache(maxsize=256)  # a client sends the same Accept again and again; parsing it is ~10% of a /set
def _prefers_html(accept: str) -> bool:
    """Whether an Accept header names text/html and ranks it at least as high as JSON, as
    a browser's does (curl's */* gets JSON)."""
    quality: dict[str, float] = {}
    for item in accept.lower().split(","):
        media, _, params = item.partition(";")
        match = re.search(r"q\s*=\s*([0-9.]+)", params)
        try:
            quality[media.strip()] = float(match.group(1)) if match else 1.0
        except ValueError:
            quality[media.strip()] = 0.0
    json_quality = max(quality.get("application/json", 0.0), quality.get("application/*", 0.0), quality.get("*/*", 0.0))
    return quality.get("text/html", 0.0) > 0 and quality["text/html"] >= json_quality


_PAGE_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 60rem; padding: 1.5rem; color: #222; }
header { display: flex; align-items: baseline; gap: 1rem; border-bottom: 2px solid #2b6cb0; margin-bottom: 1rem; }
h1 { font-size: 1.6rem; margin: 0 0 .3rem; color: #2b6cb0; }
header span, .empty, nav { color: #666; }
form { display: flex; flex-wrap: wrap; gap: .5rem; align-items: end; margin: .6rem 0; }
label { display: flex; flex-direction: column; font-size: .8rem; color: #555; }
input, button { font: inherit; line-height: 1.2; padding: .35rem .5rem; border: 1px solid #bbb; border-radius: 4px; }
button { background: #2b6cb0; color: #fff; border-color: #2b6cb0; cursor: pointer; }
table { width: 100%; border-collapse: collapse; margin-top: 1rem; }
th, td { text-align: left; padding: .4rem .5rem; border-bottom: 1px solid #e3e3e3; }
th { font-size: .8rem; text-transform: uppercase; color: #666; }
td.key { font-family: ui-monospace, monospace; overflow-wrap: anywhere; }
td.key, code { white-space: pre-wrap; }
.size { text-align: right; white-space: nowrap; }
.notice { background: #e6f4ea; border: 1px solid #9ad0a6; padding: .5rem .75rem; border-radius: 4px; }
.error, .confirm { background: #fdecea; border: 1px solid #f1a7a0; padding: .5rem .75rem; border-radius: 4px; }
.confirm button { background: #b42318; border-color: #b42318; }
nav { display: flex; gap: 1.5rem; margin-top: .8rem; }
a { color: #2b6cb0; } a.delete { color: #b42318; }
"""


# The page's one script: the page that answers a /set or a confirmed /delete takes the
# listing's address, so that Back and Reload do not send the write again (the browser fetches
# a page it may not store: Cache-Control no-store); and it reloads the listing when a key under
# its prefix changes (an EventSource on /events), or, while the visitor is typing into a form
# or the page asks to confirm a delete, offers a reload link.
_PAGE_SCRIPT = """
const { events, listing } = document.currentScript.dataset;
if (location.pathname !== "/" && !document.querySelector("form.confirm")) history.replaceState(null, "", listing);
let timer = null, notice = null;
function changed() {
  const inputs = [...document.querySelectorAll("form input")];
  const busy = inputs.some((input) => input === document.activeElement || input.value !== input.defaultValue);
  if (busy || document.querySelector("form.confirm")) {
    if (!notice) {
      notice = document.createElement("p");
      notice.className = "notice";
      const link = document.createElement("a");
      link.href = listing;
      link.textContent = "reload";
      notice.append("Keys changed since this page was loaded: ", link);
      document.querySelector("header").after(notice);
    }
    return;
  }
  clearTimeout(timer);
  timer = setTimeout(() => location.replace(listing), 300);
}
const source = new EventSource(events);
for (const type of ["put", "delete", "expire", "reset"]) source.addEventListener(type, changed);
"""


def _human_size(size: int) -> str:
    """'512 bytes', '1.5 KiB', '20.0 MiB', '3.2 GiB'."""
    if size < 1024:
        return f"{size} byte" if size == 1 else f"{size} bytes"
    exponent = min(3, (size.bit_length() - 1) // 10)
    return f"{size / 1024**exponent:.1f} {('KiB', 'MiB', 'GiB')[exponent - 1]}"


_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
}


def _page_script(code: str, attributes: str = "", policy: str = "") -> tuple[str, dict[str, str]]:
    """A <script> element with `code` and `attributes`, and the header fields of a page that
    runs it and no other script: its Content-Security-Policy allows the element's fresh nonce
    (and what `policy` adds, as "; connect-src 'self'")."""
    nonce = secrets.token_urlsafe(16)
    csp = f"{_PAGE_HEADERS['Content-Security-Policy']}; script-src 'nonce-{nonce}'{policy}"
    return f'<script nonce="{nonce}"{attributes}>{code}</script>', {**_PAGE_HEADERS, "Content-Security-Policy": csp}


def _html_document(body: str) -> bytes:
    """A whole HTML page around `body`: the page's style, and no script but one `body` brings."""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>kvserver</title><style>{_PAGE_STYLE}</style></head>
<body>{body}</body></html>
""".encode()


def _render_error(status: HTTPStatus, detail: str, script: str = "") -> bytes:
    """An error answer as a browser gets it: the problem+json fields as a page (and `script`)."""
    return _html_document(
        f'<header><h1>kvserver</h1></header><p class="error"><strong>{status.value} {status.phrase}</strong>: '
        f'{html.escape(detail)}</p><nav><a href="/">back to the keys</a></nav>{script}'
    )


def _notice(done: str, key: str) -> str:
    """A line of news on top of the page ("Stored <code>k</code>.")."""
    return f'<p class="notice">{done} <code>{html.escape(key)}</code>.</p>'


def _confirm_delete(key: str) -> str:
    """The question the page asks before it deletes: a form sending /delete?key=<key>&confirm=yes."""
    return (
        f'<form class="confirm" action="/delete" method="get"><span>Delete <code>{html.escape(key)}</code>? '
        f'It cannot be undone.</span><input type="hidden" name="key" value="{html.escape(key)}">'
        f'<button name="confirm" value="yes">Delete</button><a href="/">Cancel</a></form>'
    )


class _KeyPage(NamedTuple):
    """One page of a listing, as /keys and the HTML page show it."""

    items: list[str]  # keys, and with a delimiter folders too, in code-point order
    next: str | None  # the cursor for the next page; None on the last
    prefix: str
    delimiter: str | None
    after: str | None  # the cursor this page starts after; None on the first
    limit: int | None  # the most items a page holds, if the request set it

    def is_folder(self, item: str) -> bool:
        return self.delimiter is not None and _folder(item, self.prefix, self.delimiter) is not None

    def split(self) -> tuple[list[str], list[str]]:
        """The keys and the folders of the page."""
        return [item for item in self.items if not self.is_folder(item)], list(filter(self.is_folder, self.items))


def _page_href(page: _KeyPage, prefix: str, after: str | None = None) -> str:
    """The address, HTML-escaped, of the page listing under `prefix` after `after`, by the
    folders and with the page size of `page` (the page's defaults go without saying)."""
    query = {"prefix": prefix} if prefix else {}
    if page.delimiter not in (None, "/"):
        query["delimiter"] = page.delimiter
    if page.limit is not None:
        query["limit"] = str(page.limit)
    if after is not None:
        query["after"] = after
    return html.escape("/?" + urllib.parse.urlencode(query) if query else "/")


def _breadcrumbs(page: _KeyPage, delimiter: str) -> str:
    """Links to the top level and to each folder the prefix goes through, then the rest of it."""
    prefix = page.prefix
    crumbs = [f'<a href="{_page_href(page, "")}">all keys</a>']
    start = 0
    while (cut := prefix.find(delimiter, start)) >= 0:
        end = cut + len(delimiter)
        crumbs.append(f'<a href="{_page_href(page, prefix[:end])}">{html.escape(prefix[start:end])}</a>')
        start = end
    if prefix[start:]:
        crumbs.append(f"<span>{html.escape(prefix[start:])}…</span>")
    return f'<nav class="crumbs">{" ".join(crumbs)}</nav>'


def _render_page(storage: Storage, page: _KeyPage, notice_html: str, script: str) -> bytes:
    """The HTML page: a form to set a key, a prefix filter, one page of keys and folders
    (each folder a link to its own level), and `script` (the <script> element that keeps it
    up to date)."""
    delimiter = page.delimiter or "/"  # (the page always lists by folders)
    rows = []
    for key in page.items:
        if page.is_folder(key):
            rows.append(
                f'<tr class="folder"><td class="key"><a href="{_page_href(page, key)}">'
                f'{html.escape(key)}</a></td><td class="size"></td><td>folder</td><td></td><td></td></tr>'
            )
            continue
        try:
            stat = storage.stat(key)
        except KeyError:
            continue  # deleted or expired since the listing
        seconds_left = stat.seconds_left()
        rows.append(
            f'<tr><td class="key"><a href="{_value_href(key)}">{html.escape(key)}</a></td>'
            f'<td class="size">{_human_size(stat.size)}</td><td>{html.escape(stat.content_type)}</td>'
            f'<td class="size">{"" if seconds_left is None else f"{seconds_left} s"}</td>'
            f'<td><a class="delete" href="/delete?key={urllib.parse.quote(key, safe="")}">delete</a></td></tr>'
        )
    links = []
    if page.after is not None:
        links.append(f'<a href="{_page_href(page, page.prefix)}">← first page</a>')
    if page.next is not None:
        links.append(f'<a href="{_page_href(page, page.prefix, page.next)}">next page →</a>')
    if rows:
        table = (
            '<table><thead><tr><th>Key</th><th class="size">Size</th><th>Media type</th>'
            f'<th class="size">TTL</th><th></th></tr></thead><tbody>{"".join(rows)}</tbody></table>'
        )
    elif page.prefix:
        table = f'<p class="empty">No keys start with <code>{html.escape(page.prefix)}</code>.</p>'
    else:
        table = f'<p class="empty">{"No more keys." if page.after is not None else "No keys here yet."}</p>'
    kept = (  # what the filter keeps, as the links do (see _page_href)
        "" if delimiter == "/" else f'<input type="hidden" name="delimiter" value="{html.escape(delimiter)}">'
    ) + ("" if page.limit is None else f'<input type="hidden" name="limit" value="{page.limit}">')
    keys, size = storage.totals()
    return _html_document(f"""<header><h1>kvserver</h1>
<span>{keys} key{"" if keys == 1 else "s"}, {_human_size(size)}, {storage.kind} storage</span></header>
{notice_html}
<form action="/set" method="get">
<label>Key <input name="key" required></label>
<label>Value <input name="value" size="40"></label>
<button type="submit">Set</button></form>
<form action="/" method="get">
<label>Keys starting with <input name="prefix" value="{html.escape(page.prefix)}"></label>{kept}
<button type="submit">Filter</button></form>
{_breadcrumbs(page, delimiter) if page.prefix else ""}
{table}
{f"<nav>{''.join(links)}</nav>" if links else ""}
{script}
""")


# Metrics


class _Metrics:
    """Request counts and durations for /metrics, safe to update from every connection's thread."""

    BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(self) -> None:
        self.started = time.time()
        self._lock = threading.Lock()
        self._requests: collections.Counter[tuple[str, int]] = collections.Counter()
        self._buckets: dict[str, list[int]] = {}  # per route: counts per bucket, the last one +Inf
        self._seconds: collections.defaultdict[str, float] = collections.defaultdict(float)

    def observe(self, route: str, status: int, seconds: float) -> None:
        bucket = bisect.bisect_left(self.BUCKETS, seconds)
        with self._lock:
            self._requests[route, status] += 1
            self._seconds[route] += seconds
            counts = self._buckets.get(route)
            if counts is None:
                counts = self._buckets[route] = [0] * (len(self.BUCKETS) + 1)
            counts[bucket] += 1

    def render(self, storage: Storage, connections: int) -> bytes:
        """The Prometheus text exposition format (version 0.0.4)."""
        keys, size = storage.totals()
        with self._lock:
            requests = sorted(self._requests.items())
            durations = sorted((route, list(counts), self._seconds[route]) for route, counts in self._buckets.items())
        lines = [
            "# HELP kvserver_requests_total Requests answered, by route and status code.",
            "# TYPE kvserver_requests_total counter",
            *(f'kvserver_requests_total{{route="{route}",status="{status}"}} {n}' for (route, status), n in requests),
            "# HELP kvserver_request_duration_seconds Time from a request's first byte to its answer, by route.",
            "# TYPE kvserver_request_duration_seconds histogram",
        ]
        for route, counts, seconds in durations:
            cumulative = 0
            for bound, count in zip([*map(repr, self.BUCKETS), "+Inf"], counts, strict=True):
                cumulative += count
                lines.append(f'kvserver_request_duration_seconds_bucket{{route="{route}",le="{bound}"}} {cumulative}')
            lines.append(f'kvserver_request_duration_seconds_sum{{route="{route}"}} {seconds}')
            lines.append(f'kvserver_request_duration_seconds_count{{route="{route}"}} {cumulative}')
        for name, kind, help_text, value in (
            ("kvserver_keys", "gauge", "Live keys in the storage.", keys),
            ("kvserver_stored_bytes", "gauge", "Bytes held by all live values.", size),
            ("kvserver_open_connections", "gauge", "Client connections open now.", connections),
            ("kvserver_start_time_seconds", "gauge", "When the server started, in Unix time.", self.started),
        ):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        lines += ["# HELP kvserver_info The running version.", "# TYPE kvserver_info gauge"]
        lines.append(f'kvserver_info{{version="{__version__}"}} 1')
        return ("\n".join(lines) + "\n").encode()


# XML-RPC

MAX_RPC_VALUE = 16 * 1024 * 1024  # XML-RPC carries values up to this size either way; /kv/<key> any size
MAX_RPC_DEPTH = 64  # levels of arrays and structs in an XML-RPC value
MAX_RPC_ITEMS = 500_000  # items of the arrays and structs in an XML-RPC value, at any depth
MAX_RPC_PARAMS = 16  # parameters of a call (no method takes more than three)
_MAX_RPC_BODY = 2 * MAX_RPC_VALUE + CHUNK  # room for the value's base64 (4/3 of it) or escaped text, and XML
_RPC_TOO_LARGE = (
    f"XML-RPC carries values of at most {MAX_RPC_VALUE >> 20} MiB and {MAX_RPC_ITEMS:,} items: "
    "PUT larger ones to /kv/<key> and GET them from there"
)


class _NotCarried(Exception):
    """A value XML-RPC cannot carry: a Fault with `code` (400, or 413 for too large); the
    message says what to do instead."""

    def __init__(self, message: str, code: int = 400) -> None:
        super().__init__(message)
        self.code = code


# The elements of an XML-RPC call (its specification, with the types xmlrpc.client reads): what
# each may hold. Those marked True may hold one of their elements many times; a <value> holds one
# element at most; the others hold each of theirs at most once.
_RPC_STRUCTURE = {"methodName", "params", "value", "array", "struct", "name", "fault"}  # not a value's type
_RPC_SCALARS = frozenset(xmlrpc.client.Unmarshaller.dispatch) - _RPC_STRUCTURE  # the types xmlrpc.client reads
_RPC_ELEMENTS: dict[str, tuple[frozenset[str], bool]] = {
    "": (frozenset(["methodCall"]), False),  # the document
    "methodCall": (frozenset(["methodName", "params"]), False),
    "params": (frozenset(["param"]), True),
    "param": (frozenset(["value"]), False),
    "value": (_RPC_SCALARS | {"array", "struct"}, False),
    "array": (frozenset(["data"]), False),
    "data": (frozenset(["value"]), True),
    "struct": (frozenset(["member"]), True),
    "member": (frozenset(["name", "value"]), False),
}
_RPC_NEEDED = {"param": ("value",), "member": ("name", "value")}  # (a call's <methodName> is looked for after)
_XML_SPACE = "[ \t\r\n]*"  # XML's white space (S), which ints, doubles and base64 may have around them
_RPC_INT = re.compile(f"{_XML_SPACE}[-+]?[0-9]{{1,10}}{_XML_SPACE}")
# (Each digit matches one way only: a pattern that can split a run of digits takes quadratic time.)
_RPC_DOUBLE = re.compile(f"{_XML_SPACE}[-+]?([0-9]+(\\.[0-9]*)?|\\.[0-9]+)([eE][-+]?[0-9]+)?{_XML_SPACE}")
_RPC_BASE64 = re.compile("[A-Za-z0-9+/ \t\r\n]*(=[ \t\r\n]*){0,2}")  # (its length is checked by decoding)


class _CallReader(xmlrpc.client.Unmarshaller):
    """xmlrpc.client's reader, keeping a call to the XML-RPC grammar (_RPC_ELEMENTS) and within
    what the server stores and gives back (each refused as it is read, as _NotCarried): ints of
    32 bits, finite doubles, strict base64, at most MAX_RPC_DEPTH levels of arrays and structs,
    MAX_RPC_ITEMS items in the call and MAX_RPC_PARAMS parameters. <base64> is decoded without
    an extra copy."""

    def __init__(self) -> None:
        super().__init__()
        self.xml("", None)  # no encoding: expat gives str, with nothing to decode
        self._open: list[tuple[str, list[str]]] = [("", [])]  # the elements open: name, and those it holds once
        self._items = 0  # the items of arrays and structs so far
        self._params = 0  # the parameters so far

    def start(self, tag: str, attrs: dict[str, str]) -> None:
        name = tag.rpartition(":")[2]
        parent, held = self._open[-1]
        allowed, many = _RPC_ELEMENTS.get(parent, (frozenset(), False))
        if parent == "member" and name == "value" and "name" not in held:
            raise _NotCarried("a <member> holds its <name>, then its <value>")
        if name not in allowed or (parent == "value" and held) or (not many and name in held):
            where = f"in <{parent}>" if parent else "as the document"
            raise _NotCarried(f"<{name}> cannot stand {where}; send a <methodCall> with a <methodName> and <params>")
        if not many:  # (what an array or struct holds is counted below, not kept)
            held.append(name)
        self._open.append((name, []))
        if name == "param":
            self._params += 1
            if self._params > MAX_RPC_PARAMS:
                raise _NotCarried(
                    f"a call holds over {MAX_RPC_PARAMS} parameters, more than any method takes; "
                    "system.methodHelp(<method>) says what one takes"
                )
        elif name == "value" and parent in ("data", "member"):
            self._items += 1
            if self._items > MAX_RPC_ITEMS:
                raise _NotCarried(f"a call holds over {MAX_RPC_ITEMS:,} items; {_RPC_TOO_LARGE}", 413)
        elif name in ("array", "struct") and len(self._marks) >= MAX_RPC_DEPTH:
            raise _NotCarried(f"a parameter nests arrays and structs deeper than {MAX_RPC_DEPTH} levels; flatten it")
        super().start(tag, attrs)

    def end(self, tag: str) -> None:
        name, held = self._open.pop()
        for needed in _RPC_NEEDED.get(name, ()):
            if needed not in held:
                raise _NotCarried(f"a <{name}> holds no <{needed}>; each needs one")
        super().end(tag)

    def end_int(self, data: str) -> None:
        if not _RPC_INT.fullmatch(data) or int(data) not in _INT32:
            raise _NotCarried(
                f"an XML-RPC int is a whole number from {_INT32.start} to {_INT32.stop - 1}, not {_excerpt(data)}; "
                "send larger numbers as a double or a string"
            )
        super().end_int(data)

    def end_double(self, data: str) -> None:
        if not _RPC_DOUBLE.fullmatch(data) or not math.isfinite(float(data)):
            raise _NotCarried(f"an XML-RPC double is a finite number in decimal digits, not {_excerpt(data)}")
        super().end_double(data)

    def end_boolean(self, data: str) -> None:
        if data not in ("0", "1"):
            raise _NotCarried(f"an XML-RPC boolean is 0 or 1, not {_excerpt(data)}")
        super().end_boolean(data)

    def end_base64(self, data: str) -> None:
        try:
            if not _RPC_BASE64.fullmatch(data):
                raise ValueError  # (a2b_base64 skips what is not base64, and stops at padding)
            self.append(xmlrpc.client.Binary(binascii.a2b_base64(data)))  # reads the str in place
        except ValueError:
            raise _NotCarried("a <base64> value is not valid base64 (RFC 4648 section 4, lines allowed)") from None
        self._value = False

    dispatch: dict[str, Callable[[Any, str], None]] = {  # noqa: RUF012 -- as in Unmarshaller: name -> end handler
        **xmlrpc.client.Unmarshaller.dispatch,
        **dict.fromkeys(["i1", "i2", "i4", "i8", "int", "biginteger"], end_int),
        **dict.fromkeys(["double", "float"], end_double),
        "boolean": end_boolean,
        "base64": end_base64,
    }


def _read_call(request: bytes) -> tuple[str, tuple[Any, ...]]:
    """The method name and parameters of an XML-RPC call; Fault 400 saying what is wrong if
    `request` is not one, or holds a value beyond the limits _CallReader keeps."""
    reader = _CallReader()
    parser = xml.parsers.expat.ParserCreate()
    parser.buffer_text = True  # text comes in pieces of buffer_size, not one per line
    parser.buffer_size = CHUNK
    parser.StartElementHandler = reader.start
    parser.EndElementHandler = reader.end
    parser.CharacterDataHandler = reader.data

    def refuse_dtd(*args: object) -> NoReturn:  # its entities could make a small call expand
        raise _NotCarried("an XML-RPC call has no document type declaration (<!DOCTYPE>)")

    parser.StartDoctypeDeclHandler = refuse_dtd
    try:
        parser.Parse(request, True)
        method = reader.getmethodname()
        params = reader.close()
    except _NotCarried as error:
        raise xmlrpc.client.Fault(error.code, str(error)) from None
    except xml.parsers.expat.ExpatError as error:
        raise xmlrpc.client.Fault(
            400, f"the request is not well-formed XML ({error}); send text with control characters as Binary"
        ) from None
    except Exception:  # anything else the reader meets: a response instead of a call, a misplaced element
        method = None
    if method is None:
        raise xmlrpc.client.Fault(
            400, "the request is not an XML-RPC call; send a <methodCall> with a <methodName> and <params>"
        )
    return method, params


# What XML 1.0 cannot carry: control characters but tab, LF and CR; U+FFFE and U+FFFF (and
# lone surrogates, which no str decoded from UTF-8 or read from XML holds).
_NOT_XML_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
_BASE64_PIECE = CHUNK * 3 // 4  # bytes encoded at a time: one line of 64 KiB of base64


class _XMLRPCWriter:
    """Writes XML-RPC responses as UTF-8 bytes that an XML 1.0 parser reads back as they were
    meant: a str XML cannot carry (see _NOT_XML_TEXT) goes as <base64> of its UTF-8 bytes, and
    CR as &#13; (a parser reads a raw CR as LF). Values are written a slice at a time into one
    buffer, so a response costs the value and the response, not the four copies that
    xmlrpc.client.dumps makes. _NotCarried for what XML-RPC has no form for (ints beyond 32
    bits, nesting deeper than MAX_RPC_DEPTH, a struct member name XML cannot carry)."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._write = self._out.write
        self._write(b"<?xml version='1.0'?>\n<methodResponse>\n")

    @classmethod
    def result(cls, value: Any) -> bytes:
        """The response that returns `value`."""
        writer = cls()
        writer._write(b"<params>\n<param>\n")
        writer._value(value, 0)
        writer._write(b"</param>\n</params>\n")
        return writer._end()

    @classmethod
    def fault(cls, fault: xmlrpc.client.Fault) -> bytes:
        """The response that reports `fault`."""
        writer = cls()
        writer._write(b"<fault>\n")
        writer._value({"faultCode": fault.faultCode, "faultString": fault.faultString}, 0)
        writer._write(b"</fault>\n")
        return writer._end()

    def _end(self) -> bytes:
        self._write(b"</methodResponse>\n")
        return self._out.getvalue()  # the buffer itself, not a copy

    def _value(self, value: Any, depth: int) -> None:
        write = self._write
        if value is None:
            write(b"<value><nil/></value>\n")
        elif isinstance(value, bool):
            write(b"<value><boolean>%d</boolean></value>\n" % value)
        elif isinstance(value, int):
            if not _INT32.start <= value < _INT32.stop:  # not `in`, which tests an IntEnum by iterating
                raise _NotCarried(f"the value holds {value}, beyond XML-RPC's 32-bit ints; read it with GET /kv/<key>")
            write(b"<value><int>%d</int></value>\n" % value)
        elif isinstance(value, float):
            write(b"<value><double>%r</double></value>\n" % value)
        elif isinstance(value, str):
            if _NOT_XML_TEXT.search(value):
                self._base64(value.encode("utf-8"))
            else:
                write(b"<value><string>")
                self._text(value)
                write(b"</string></value>\n")
        elif isinstance(value, xmlrpc.client.Binary):
            self._base64(value.data)
        elif depth == MAX_RPC_DEPTH and isinstance(value, (list, dict)):
            raise _NotCarried(f"the value nests deeper than {MAX_RPC_DEPTH} levels; read it with GET /kv/<key>")
        elif isinstance(value, list):
            write(b"<value><array><data>\n")
            for item in value:
                self._value(item, depth + 1)
            write(b"</data></array></value>\n")
        elif isinstance(value, dict):
            write(b"<value><struct>\n")
            for name, item in value.items():
                if _NOT_XML_TEXT.search(name):
                    raise _NotCarried(
                        f"the value has a member name XML cannot carry, {name!r}; read it with GET /kv/<key>"
                    )
                write(b"<member>\n<name>")
                self._text(name)
                write(b"</name>\n")
                self._value(item, depth + 1)
                write(b"</member>\n")
            write(b"</struct></value>\n")
        else:
            raise TypeError(f"no XML-RPC form for {type(value).__name__}")

    def _text(self, text: str) -> None:
        """`text` as XML character data, CR too, which a parser would read as LF. (Replacing
        in UTF-8 is safe: no byte of a multi-byte character is ASCII.)"""
        for start in range(0, len(text), CHUNK):
            data = text[start : start + CHUNK].encode("utf-8")
            self._write(
                data.replace(b"&", b"&amp;").replace(b"<", b"&lt;").replace(b">", b"&gt;").replace(b"\r", b"&#13;")
            )

    def _base64(self, data: bytes) -> None:
        self._write(b"<value><base64>\n")
        view = memoryview(data)
        for start in range(0, len(data), _BASE64_PIECE):
            self._write(binascii.b2a_base64(view[start : start + _BASE64_PIECE]))
        self._write(b"</base64></value>\n")


class _XMLRPC:
    """The XML-RPC methods; values keep their type through the media type they are stored with."""

    def __init__(self, storage: Storage, max_value: int) -> None:
        self._storage = storage
        self._max_value = max_value
        self._methods: dict[str, Callable[..., Any]] = {
            "save": self.save,
            "load": self.load,
            "delete": self.delete,
            "keys": self.keys,
            "system.listMethods": self.list_methods,
            "system.methodHelp": self.method_help,
        }

    def dispatch(self, request: bytes) -> bytes:
        """The XML-RPC response to a request: a result, or a Fault saying what was wrong."""
        try:
            method, params = _read_call(request)
            result = self._call(method, params)
            try:
                return _XMLRPCWriter.result(result)
            except _NotCarried as error:
                raise xmlrpc.client.Fault(error.code, f"{method}: {error}") from None
        except xmlrpc.client.Fault as fault:
            return _XMLRPCWriter.fault(fault)

    def _call(self, method: str, params: tuple[Any, ...]) -> Any:
        """Call a method; any failure becomes a Fault whose code is the HTTP status of the same
        failure (_answer_to)."""
        function = self._methods.get(method)
        if function is None:
            raise xmlrpc.client.Fault(404, f"no method {method!r}; system.listMethods() lists them")
        try:
            inspect.signature(function).bind(*params)
        except TypeError:
            raise xmlrpc.client.Fault(
                400, f"{method} does not take {len(params)} argument(s); {self.method_help(method)}"
            ) from None
        try:
            return function(*params)
        except xmlrpc.client.Fault:
            raise
        except Exception as error:
            status, detail, _ = _answer_to(error)
            if status == HTTPStatus.INTERNAL_SERVER_ERROR:
                traceback.print_exc(file=sys.stderr)
            raise xmlrpc.client.Fault(status.value, detail) from None

    def save(self, key: str, value: Any, ttl: int | None = None) -> None:
        """save(key, value[, ttl]): store value under key (str as text, Binary as bytes,
        anything else as JSON), for ttl seconds if given."""
        if isinstance(value, str):
            data, content_type = value.encode("utf-8"), TEXT_CONTENT_TYPE
        elif isinstance(value, xmlrpc.client.Binary):
            data, content_type = value.data, DEFAULT_CONTENT_TYPE
        else:
            try:
                data, content_type = _json_bytes(value), "application/json"
            except TypeError:
                raise xmlrpc.client.Fault(
                    400,
                    "save stores str, Binary, int, float, bool, None, list and struct values; not dateTime "
                    "(send it as an ISO 8601 string), nor Binary inside a list or struct",
                ) from None
        if len(data) > self._max_value:
            raise xmlrpc.client.Fault(413, f"the value is {len(data)} bytes; at most {self._max_value} (--max-value)")
        if len(data) > MAX_RPC_VALUE:
            raise xmlrpc.client.Fault(413, f"the value is {len(data):,} bytes; {_RPC_TOO_LARGE}")
        self._storage.write(key, data, content_type=content_type, ttl=ttl)

    def load(self, key: str) -> Any:
        """load(key): the value saved under key, or None if there is none."""
        try:
            data, content_type = self._read(key)
        except KeyError:
            return None
        if _is_json(content_type):
            if _count_json_items(data) > MAX_RPC_ITEMS:  # checked first: parsing costs ~100 bytes an item
                raise xmlrpc.client.Fault(413, f"key {key!r} holds over {MAX_RPC_ITEMS:,} items; {_RPC_TOO_LARGE}")
            try:
                return _parse_json(data)
            except _JSONBeyondLimits as error:
                raise xmlrpc.client.Fault(400, f"{error}; read it with GET /kv/<key>") from None
            except ValueError:
                pass  # not JSON after all: given as its bytes
        if _is_text(content_type):
            with contextlib.suppress(UnicodeDecodeError):
                return data.decode("utf-8")
        return xmlrpc.client.Binary(data)

    def _read(self, key: str) -> tuple[bytes, str]:
        """The bytes and media type of the value of `key`; KeyError if absent, Fault 413 if it
        is over MAX_RPC_VALUE, found before reading it."""
        size = self._storage.stat(key).size
        if size <= MAX_RPC_VALUE:
            stat, body = self._storage.fetch(key)
            with body:
                data = body.read(MAX_RPC_VALUE + 1)  # it may have grown since
            size = len(data)
            if size <= MAX_RPC_VALUE:
                return data, stat.content_type
        raise xmlrpc.client.Fault(413, f"key {key!r} holds {size:,} bytes; {_RPC_TOO_LARGE}")

    def delete(self, key: str) -> None:
        """delete(key): remove key; no error if it is absent."""
        self._storage.delete(key)

    def list_methods(self) -> list[str]:
        """system.listMethods(): the names of the methods."""
        return sorted(self._methods)

    def method_help(self, name: str) -> str:
        """system.methodHelp(name): how to call a method, and what it does."""
        if not isinstance(name, str):
            raise xmlrpc.client.Fault(400, f"a method name is a str, not {type(name).__name__}")
        if name not in self._methods:
            raise xmlrpc.client.Fault(404, f"no method {name!r}; system.listMethods() lists them")
        return inspect.getdoc(self._methods[name]) or name

    def keys(self, prefix: str = "") -> list[str]:
        """keys([prefix]): the keys that start with prefix, in code-point order."""
        keys = self._storage.keys(prefix)
        if len(keys) > MAX_RPC_ITEMS or sum(map(len, keys)) > MAX_RPC_VALUE:
            raise xmlrpc.client.Fault(
                413,
                f"the keys under {prefix!r} are over {MAX_RPC_ITEMS:,} or {MAX_RPC_VALUE >> 20} Mi characters, "
                "more than XML-RPC carries: list them a page at a time with GET /keys?prefix=<prefix>",
            )
        return keys


# The request handler: access checks, routes, and each route's handler


# A Host value, lower-cased: uri-host [ ":" port ] (RFC 9110 section 7.2), with an IP literal in
# brackets or a name of letters, digits and . _ ~ - (a reg-name's other characters name no loopback).
_HOST = re.compile(r"(?:\[([0-9a-f:.]+)\]|([a-z0-9._~-]+))(?::[0-9]*)?")


@functools.lru_cache(maxsize=256)  # a client sends the same Host again and again; parsing it is ~8% of a /get
def _is_loopback_host(host: str) -> bool:
    """Whether a Host header names this machine: localhost, *.localhost, 127.0.0.0/8 or ::1,
    with a port or without; anything more (`[::1]evil.example`, `localhost:80@evil.example`) does not."""
    match = _HOST.fullmatch(host.lower())
    if match is None:
        return False
    ip_literal, name = match.groups()
    if name is not None and name.endswith(".") and name != ".":
        name = name[:-1]  # a name in its absolute form (localhost.) is the same name
    if name is not None and (name == "localhost" or name.endswith(".localhost")):
        return True
    try:
        return ipaddress.ip_address(ip_literal or name).is_loopback
    except ValueError:
        return False


def _split_target(path: str) -> tuple[str | None, str]:
    """The authority and the path of a request target (its part before '?'): the authority is
    None in origin form ('/kv/a'); an absolute-form target ('http://localhost:4000/kv/a')
    names its host itself (RFC 9112 section 3.2.2), its scheme matched without regard to case."""
    scheme, absolute, rest = path.partition("://")
    if absolute and scheme.lower() in ("http", "https"):
        authority, _, path = rest.partition("/")
        return authority, "/" + path
    return None, path


_LOGGED_FIELDS = frozenset({"key", "ttl", "prefix", "delimiter", "limit", "after", "wait"})
_SET_SETTINGS = frozenset({"key", "ttl"})  # of /set?key=<key>&value=<value>&ttl=<seconds>


_USERINFO = re.compile(r"^(\S* [A-Za-z][A-Za-z0-9+.-]*://)[^/?#@ ]*@")  # the method, the scheme, then user@


def _redact(request_line: str) -> str:
    """The request line for the access log: values hidden as '…', keys shown as REST paths
    show them. Only the query fields that name keys or settings keep their value (on /set
    only `key=` and `ttl=` beside `value=`: /set?key=abc and /set?ttl=abc store the value
    abc); every other field's value may be a stored value, or a typo of one. The user part
    of an absolute-form target (user:password@) is hidden too: it may be the token."""
    request_line = _USERINFO.sub("\\1…@", request_line, count=1)
    head, question, rest = request_line.partition("?")
    if not question:
        return request_line
    query, separator, version = rest.rpartition(" HTTP/")  # a bad request line's value may hold spaces
    if not separator:
        query, version = rest, ""
    fields = [field.partition("=") for field in query.split("&")]
    shown = _LOGGED_FIELDS
    if _split_target(head.partition(" ")[2])[1] == "/set":
        shown = _SET_SETTINGS if "value" in {name for name, _, _ in fields} else frozenset()
    redacted = (name + equals + (value if name in shown or not equals else "…") for name, equals, value in fields)
    return head + "?" + "&".join(redacted) + separator + version


_Route = Callable[["KVRequestHandler", str, str], None]


def _route(path: str, method: str, *, head: bool = True) -> Callable[[_Route], _Route]:
    """Mark a handler method as the answer to `method` on `path` (as bottle's @route does);
    "/kv/" stands for every /kv/<key>. A GET route answers HEAD too, unless `head` is False."""

    def mark(handler: _Route) -> _Route:
        methods = (method, "HEAD") if method == "GET" and head else (method,)
        marks: list[tuple[str, tuple[str, ...]]] = getattr(handler, "routes", [])
        setattr(handler, "routes", [*marks, (path, methods)])  # noqa: B010
        return handler

    return mark


def _route_table(namespace: dict[str, Any]) -> dict[str, dict[str, _Route]]:
    """The routes marked on the handlers of a class body: path -> method -> handler."""
    table: dict[str, dict[str, _Route]] = {}
    for handler in namespace.values():
        for path, methods in getattr(handler, "routes", ()):
            for method in methods:
                table.setdefault(path, {})[method] = handler
    return table


_STATUS_LINES = {status: f"HTTP/1.1 {status.value} {status.phrase}\r\n" for status in HTTPStatus}


class KVRequestHandler(BaseHTTPRequestHandler):
    """Serves one connection: the seed routes, REST, XML-RPC, the page, health and metrics.

    A request's life: `handle_one_request` reads the head (`_read_head`), `_dispatch` checks
    access and finds the handler in `routes` by path (every /kv/<key> shares one entry) and
    method; a handler is marked with @_route where it is defined. Handlers read a body with
    `self.body.open(limit)` and answer through `_send` (and `_send_json`, `_send_problem`,
    `_send_value`), which write the head with `_write_head`; anything they raise is turned
    into a problem+json answer by `_dispatch`, through `_answer_to`. A subclass may override
    `_check_access` to guard the routes differently, and add routes by marking handlers and
    building its own `routes = _route_table(vars())`.
    """

    server: KVServer
    rfile: io.BufferedReader  # (setup makes both)
    wfile: io.BufferedWriter
    protocol_version = "HTTP/1.1"
    server_version = f"kvserver/{__version__}"

    # Per request: the body, and what the access log and the metrics say
    body: _RequestBody
    _status: int | None = None
    _sent: int = 0
    _metrics_route: str = "unmatched"  # the route as /metrics names it
    _negotiated: bool = False  # whether the answer depends on Accept (a page or JSON)
    _started: float = 0.0

    @property
    def storage(self) -> Storage:
        return self.server.storage

    def version_string(self) -> str:
        return self.server_version

    # Hooks of BaseHTTPRequestHandler

    def handle_one_request(self) -> None:
        """Wait for a request, read its head (kvserver's own strict reading, in place of
        http.client's), answer it, and decide whether the connection serves another."""
        self.close_connection = True
        connections = self.server.connections
        if not connections.idle(self.connection):
            return
        try:
            arrived = self.rfile.peek(1)
            if not arrived:
                return  # the client closed the connection
            # A head that is all here already cannot stall: it needs no head deadline. (After
            # empty lines, which the request line may follow, the head's end is looked for.)
            whole_head = arrived.find(b"\r\n\r\n") > 0
            if not connections.reading_head(self.connection, whole_head):
                return  # stop() or the idle deadline closed it as the request's first byte arrived
            self._status, self._sent, self._metrics_route, self._negotiated = None, 0, "unmatched", False
            self._started = time.perf_counter()
            self.command, self.request_version, self.requestline = "", "HTTP/1.1", ""
            self.headers = _NO_FIELDS  # type: ignore[assignment]  # until the head's are read
            try:
                line = _read_request_line(self.rfile)
                self.requestline = line.decode("latin-1")
                request_line = _parse_request_line(line)
                self.command = request_line[0]  # (an answer to HEAD has no body, though it refuses the head)
                head = _read_head(request_line, self.rfile)
            except _HTTPError as error:  # close_connection stays set: where the message ends is unknown
                unread = True
                if whole_head or connections.head_read(self.connection):
                    self._send_problem(error.status, error.detail, error.headers)
            else:
                if not whole_head and not connections.head_read(self.connection):
                    return  # the head deadline cut the connection off as the head arrived
                self._start(head)
                self._dispatch()
                unread = self.body.unread
            if self._status is not None:  # logged before the answer leaves, so that the log keeps its order
                self.server.metrics.observe(self._metrics_route, self._status, time.perf_counter() - self._started)
                if not self.server.quiet:
                    self._log_access()
            self.wfile.flush()
        except (_IncompleteMessage, ConnectionError, TimeoutError, ssl.SSLError):
            self.close_connection = True  # cut off, idle too long, gone, or no TLS: nothing carried out
            return
        if unread and self._status is not None:
            with contextlib.suppress(OSError):
                _close_gently(self.connection)  # what follows on the connection is no request of ours

    def _start(self, head: _RequestHead) -> None:
        """Take a request's head as BaseHTTPRequestHandler's attributes, and its body."""
        self.command, self.path, self.request_version = head.method, head.target, head.version
        self.headers = head.fields  # type: ignore[assignment]  # a mapping with HTTPMessage's reading methods
        self.body = _RequestBody(self, head)
        connection = head.fields.get("Connection")
        options = {option.strip(" \t").lower() for option in connection.split(",")} if connection else set()
        # "close" ends the connection whatever else is said (RFC 9112 section 9.3); HTTP/1.0 keeps
        # it only when asked to.
        self.close_connection = "close" in options or (head.version == "HTTP/1.0" and "keep-alive" not in options)

    def setup(self) -> None:
        """The connection's rfile and wfile, buffered: a head is read in one read, and the head
        and a small body of an answer leave in one write, at the flush after each request.
        Over plain TCP they read and write the socket's file descriptor through io.FileIO, all
        in C; socket.makefile's SocketIO runs Python code for every read and write, which cost
        about 1 µs of server CPU a GET /get in the benchmark. TLS needs the SSLSocket's own
        reads and writes.
        The socket has no timeout: the server's _Connections enforces every deadline."""
        self.connection = self.request
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        reader: io.RawIOBase
        writer: io.RawIOBase
        if isinstance(self.connection, ssl.SSLSocket):
            reader, writer = socket.SocketIO(self.connection, "rb"), socket.SocketIO(self.connection, "wb")
        else:  # (closefd=False: the socket owns its descriptor, and closes it after finish())
            descriptor = self.connection.fileno()
            reader, writer = io.FileIO(descriptor, "rb", closefd=False), io.FileIO(descriptor, "wb", closefd=False)
        self.rfile = io.BufferedReader(reader)
        self.wfile = io.BufferedWriter(writer, CHUNK)

    def finish(self) -> None:
        with contextlib.suppress(OSError):  # flushing onto a connection the client (or a deadline) closed
            super().finish()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Answer an error as problem+json and close the connection (for code that calls
        BaseHTTPRequestHandler's hook; kvserver itself raises _HTTPError)."""
        self.close_connection = True
        self._send_problem(HTTPStatus(code), message or HTTPStatus(code).phrase)

    def log_date_time_string(self) -> str:
        """The local time as Common Log Format writes it: 10/Oct/2000:13:55:36 -0700."""
        return time.strftime("%d/%b/%Y:%H:%M:%S %z")

    def log_message(self, format: str, *args: Any) -> None:
        """BaseHTTPRequestHandler's log line, control characters escaped, unless --quiet."""
        if not self.server.quiet:
            super().log_message(format, *args)

    def _log_access(self) -> None:
        line = _redact(self.requestline)
        self.log_message('"%s" %s %s', line, self._status, self._sent or "-")

    # Routing

    def _dispatch(self) -> None:
        target, _, query = self.path.partition("?")
        authority, path = _split_target(target)
        host = self.headers.get("Host") if authority is None else authority  # whatever Host says
        route = "/kv/" if path.startswith("/kv/") else path
        methods = self.routes.get(route)
        try:
            if self.command not in _KNOWN_METHODS:
                raise _HTTPError(HTTPStatus.NOT_IMPLEMENTED, f"method {self.command!r} is not known to this server")
            if authority is not None and (not authority or "@" in authority):
                raise _HTTPError(
                    HTTPStatus.BAD_REQUEST,
                    f"an absolute-form target names its host, and no user (RFC 9110 section 4.2), not {authority!r}",
                )
            self._check_access(route, host)
            if methods is None:
                raise _HTTPError(HTTPStatus.NOT_FOUND, f"no route {path!r}; see the README for the routes")
            self._metrics_route = "/kv/<key>" if route == "/kv/" else route
            handler = methods.get(self.command)
            if handler is None:
                allowed = ", ".join(methods)
                raise _HTTPError(
                    HTTPStatus.METHOD_NOT_ALLOWED, f"{path} takes {allowed}, not {self.command}", {"Allow": allowed}
                )
            handler(self, path, query)
        except (_IncompleteMessage, ConnectionError, TimeoutError, ssl.SSLError):
            raise  # the client broke off, stalled or broke its TLS; nothing was stored
        except Exception as error:
            status, detail, headers = _answer_to(error)
            if status == HTTPStatus.INTERNAL_SERVER_ERROR:
                traceback.print_exc(file=sys.stderr)
            # After a fault of ours, or in an answer already under way (which is then cut short:
            # only closing the connection says so), what follows on the connection is not to be trusted.
            if status in (HTTPStatus.INTERNAL_SERVER_ERROR, HTTPStatus.NOT_IMPLEMENTED) or self._status is not None:
                self.close_connection = True
            self._send_problem(status, detail, headers)

    def _check_access(self, route: str, host: str | None) -> None:
        """Refuse what a web page could make a browser send here (SPEC section 8), then
        requests without the token. `host` is the request's: its Host field, or the
        authority of an absolute-form target."""
        sites = self.headers.get("Sec-Fetch-Site")  # (two fields arrive joined: "same-origin, cross-site")
        if sites is not None and any(
            site.strip(" \t").lower() in ("cross-site", "same-site") for site in sites.split(",")
        ):
            raise _HTTPError(
                HTTPStatus.FORBIDDEN,
                "requests from other sites are refused (a page on another port of this host too): "
                "a web page may not use this server",
            )
        origin = self.headers.get("Origin")
        if origin is not None and (host is None or origin.lower() != f"{self.server.scheme}://{host}".lower()):
            raise _HTTPError(
                HTTPStatus.FORBIDDEN, f"requests from origin {origin!r} are refused: it is not this server's"
            )
        if self.server.loopback and host is not None and not _is_loopback_host(host):
            raise _HTTPError(
                HTTPStatus.FORBIDDEN,
                f"Host {host!r} is not a loopback name; this server answers only to localhost (DNS rebinding)",
            )
        if self.server.token is not None and route != "/health" and not self._has_token(self.server.token):
            raise _HTTPError(
                HTTPStatus.UNAUTHORIZED,
                "send the token: 'Authorization: Bearer <token>', or Basic auth with the token as password",
                {"WWW-Authenticate": 'Basic realm="kvserver", charset="UTF-8"'},
            )

    def _has_token(self, token: bytes) -> bool:
        scheme, _, credentials = self.headers.get("Authorization", "").partition(" ")
        credentials = credentials.lstrip(" ")  # auth-scheme 1*SP token68 (RFC 9110 section 11.4)
        if scheme.lower() == "bearer":
            given = credentials.encode("latin-1")  # field values are Latin-1 text: the bytes sent
        elif scheme.lower() == "basic":
            try:
                given = base64.b64decode(credentials, validate=True).partition(b":")[2]
            except ValueError:
                return False
        else:
            return False
        return hmac.compare_digest(given, token)

    # Answers

    def _send(
        self,
        status: HTTPStatus,
        body: bytes = b"",
        content_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer with a body known in full."""
        if self._status is not None:
            return  # already answered (a failure after the headers went out): nothing more to say
        fields = {"Content-Type": content_type} if content_type is not None else {}
        fields.update(headers or {})
        has_body = status not in (HTTPStatus.NO_CONTENT, HTTPStatus.NOT_MODIFIED)
        if has_body:
            fields["Content-Length"] = str(len(body))
        self._write_head(status, fields)
        if has_body and self.command != "HEAD":
            self._write_body(body)
            self._sent = len(body)

    def _write_head(self, status: HTTPStatus, fields: dict[str, str]) -> None:
        """Write the status line and header fields as one piece, so that with the buffered
        wfile a small response leaves in one send. (Going through send_response and
        send_header instead costs about 15% of a /get.)"""
        self._status = status
        # (After a head that could not be read, close_connection is already set, and there is no body.)
        if self.close_connection or self.server.connections.stopping or self.body.unread:
            self.close_connection = True
        if self._negotiated:
            fields["Vary"] = "Accept"
        if self.close_connection:
            fields["Connection"] = "close"
        elif self.request_version == "HTTP/1.0":
            fields["Connection"] = "keep-alive"
        lines = "".join([f"{name}: {value}\r\n" for name, value in fields.items()])
        self.wfile.write(
            f"{_STATUS_LINES[status]}Server: {self.server_version}\r\n"
            f"Date: {self.date_time_string()}\r\n{lines}\r\n".encode("latin-1")
        )

    def _write_body(self, data: bytes) -> None:
        """Write (a part of) an answer's body to wfile, a piece of at most CHUNK at a time, each
        renewing the stall deadline: a blocking write returns only once all it was given has
        left, so a slow reader of a big answer would otherwise look stalled while its bytes
        keep moving."""
        if len(data) <= CHUNK:  # (nearly every answer: one piece, without a memoryview)
            self.wfile.write(data)
            self.server.connections.moved(self.connection)
            return
        view = memoryview(data)
        for start in range(0, len(view), CHUNK):
            self.wfile.write(view[start : start + CHUNK])
            self.server.connections.moved(self.connection)

    def _write_pieces(self, pieces: Sequence[bytes]) -> None:
        """Write pieces of an answer's body, in order, as one: over plain TCP with writev(2),
        IOV_MAX pieces at most a call, without joining them first (each call renews the stall
        deadline); joined, through _write_body, over TLS or if they hold CHUNK bytes at most (so
        that a small answer still leaves in one send with its head and its end). (An event
        stream's chunk is pages of joined messages: sending them without the copies that joining
        and buffering them made took a fifth of the streams' CPU.)"""
        if isinstance(self.connection, ssl.SSLSocket) or sum(map(len, pieces)) <= CHUNK:
            self._write_body(b"".join(pieces))
            return
        self.wfile.flush()  # (what is buffered goes first)
        out = self.connection.fileno()
        pending: list[bytes | memoryview] = list(pieces)
        start = 0  # the first piece not written in full
        while start < len(pending):
            written = os.writev(out, pending[start : start + _IOV_MAX])
            self.server.connections.moved(self.connection)
            # A blocking writev writes all it is given, unless a signal cuts it short: then it
            # goes on from the first byte not written.
            while start < len(pending) and written >= len(pending[start]):
                written -= len(pending[start])
                start += 1
            if written:
                pending[start] = memoryview(pending[start])[written:]

    _date: tuple[int, str] = (0, "")

    def date_time_string(self, timestamp: float | None = None) -> str:
        """The Date header, formatted once a second rather than per request (about 8% of a /get)."""
        if timestamp is not None:
            return super().date_time_string(timestamp)
        second, text = KVRequestHandler._date
        now = int(time.time())
        if second != now:
            text = super().date_time_string(now)
            KVRequestHandler._date = (now, text)
        return text

    def _send_json(self, status: HTTPStatus, document: object, headers: dict[str, str] | None = None) -> None:
        self._send(status, _json_bytes(document) + b"\n", "application/json", headers)

    def _send_problem(self, status: HTTPStatus, detail: str, headers: dict[str, str] | None = None) -> None:
        """An error answer: problem+json, or the same as a page for a browser."""
        if self._wants_page():
            script, page_headers = "", _PAGE_HEADERS
            if self._metrics_route in ("/set", "/delete"):  # (Back and Reload would send it again: _PAGE_SCRIPT)
                script, page_headers = _page_script('history.replaceState(null, "", "/");')
            body = _render_error(status, detail, script)
            self._send(status, body, "text/html; charset=utf-8", {**page_headers, **(headers or {})})
        else:
            self._send(status, _problem(status, detail), "application/problem+json", headers)

    def _send_value(self, key: str, stat: Stat, body: BinaryIO) -> None:
        """Answer with the value of `key`: 200 with its bytes, 304 if the client has it, or 412
        if the request's If-Match names another value (looked at first: RFC 9110 section 13.2.2)."""
        with body:
            if_match = self._if_match()
            if if_match is not None:
                _Precondition(if_match, if_none_match=False).check(key, stat.etag)
            modified = not self._client_has(stat.etag)
            fields = {
                "Content-Type": stat.content_type,
                "ETag": f'"{stat.etag}"',
                "Cache-Control": "no-cache",
                "X-Content-Type-Options": "nosniff",
                "Content-Security-Policy": "sandbox",
            }
            if stat.expires_at is not None:
                fields["KV-TTL"] = str(stat.seconds_left())
            if modified:
                fields["Content-Length"] = str(stat.size)
            self._write_head(HTTPStatus.OK if modified else HTTPStatus.NOT_MODIFIED, fields)
            if not modified or self.command == "HEAD":
                return
            if isinstance(body, io.BytesIO):  # held in memory: a small one leaves with the head, in one write
                value = body.getvalue()
                self._write_body(value)
                self._sent = len(value)
            else:
                self.wfile.flush()
                self._sent = self._send_file(body, stat.size)
                if self._sent < stat.size:  # the file shrank under us: end the answer where the bytes end
                    self.close_connection = True

    def _send_file(self, file: BinaryIO, size: int) -> int:
        """Send the first `size` bytes of a file (fewer if it ends sooner), a piece of at most
        CHUNK at a time, each renewing the stall deadline (so a slow reader of a big value is not
        cut off while bytes keep moving): with sendfile(2), or through wfile over TLS."""
        sent = 0
        if isinstance(self.connection, ssl.SSLSocket):  # TLS is done in user space: no sendfile
            while sent < size and (piece := file.read(min(CHUNK, size - sent))):
                self._write_body(piece)
                sent += len(piece)
            return sent
        out, source = self.connection.fileno(), file.fileno()
        while sent < size and (piece_size := os.sendfile(out, source, sent, min(CHUNK, size - sent))):
            sent += piece_size
            self.server.connections.moved(self.connection)
        return sent

    def _client_has(self, etag: str) -> bool:
        """Whether the request's If-None-Match names the value with `etag` (or any, with *); a
        400 for one that holds no ETag list (an ETag without its quotes would never match, and
        a waiting GET would answer at once, every time)."""
        if_none_match = self.headers.get("If-None-Match")
        if if_none_match is None:
            return False
        if if_none_match != "*" and not _ETAG_LIST.fullmatch(if_none_match):
            raise _HTTPError(
                HTTPStatus.BAD_REQUEST,
                'If-None-Match takes ETags in quotes ("<etag>", as the ETag field gives them) or *, '
                f"not {if_none_match!r}",
            )
        return if_none_match == "*" or etag in (tag.removeprefix("W/") for tag in _etags(if_none_match))

    # Seed routes

    @_route("/set", "GET", head=False)  # it changes data: HEAD is a 405
    def _route_set(self, path: str, query: str) -> None:
        pairs = _decode_query(query)
        fields = {name: value for name, value in pairs if value is not None}
        if len(fields) == len(pairs) and sorted(fields) in ([b"key", b"value"], [b"key", b"ttl", b"value"]):
            key, value, ttl = _text(fields[b"key"], "key"), fields[b"value"], _ttl(fields.get(b"ttl"))
        elif len(fields) == len(pairs) == 1:
            [(name, value)] = fields.items()
            key, ttl = _text(name, "key"), None
        else:
            raise _HTTPError(
                HTTPStatus.BAD_REQUEST,
                "use /set?<key>=<value> (one pair, with '=') or /set?key=<key>&value=<value>[&ttl=<seconds>]",
            )
        if len(value) > self.server.max_value:
            raise _HTTPError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the value is {len(value)} bytes; this server takes at most {self.server.max_value} (--max-value)",
            )
        stat, created = self.storage.write(key, value, content_type=_sniff_content_type(value), ttl=ttl)
        status = HTTPStatus.CREATED if created else HTTPStatus.OK
        if self._wants_page():
            self._send_page(status, "", _notice("Stored", key))
        else:
            self._send_json(status, {"key": key, "created": created}, {"ETag": f'"{stat.etag}"'})

    def _fetch_or_404(self, key: str) -> tuple[Stat, BinaryIO]:
        try:
            return self.storage.fetch(key)
        except KeyError:
            raise _HTTPError(HTTPStatus.NOT_FOUND, f"no key {key!r}") from None

    @staticmethod
    def _query_key(path: str, query: str, allowed: tuple[str, ...] = ("key",)) -> str:
        """The key of /get?key=<key> and /delete?key=<key>."""
        usage = f"{path}?key=<key>"
        fields = _fields(query, allowed, usage)
        if "key" not in fields:
            raise _HTTPError(HTTPStatus.BAD_REQUEST, f"name the key: {usage}")
        return _text(fields["key"], "key")

    @_route("/get", "GET")
    def _route_get(self, path: str, query: str) -> None:
        key = self._query_key(path, query)
        self._send_value(key, *self._fetch_or_404(key))

    @_route("/delete", "GET", head=False)
    def _route_delete(self, path: str, query: str) -> None:
        """Delete at once, but a browser is asked first: its answer comes back with confirm=yes."""
        key = self._query_key(path, query, ("key", "confirm"))
        if self._wants_page() and (b"confirm", b"yes") not in _decode_query(query):
            if key not in self.storage:
                raise _HTTPError(HTTPStatus.NOT_FOUND, f"no key {key!r}")
            self._send_page(HTTPStatus.OK, "", _confirm_delete(key))
            return
        if not self.storage.remove(key):
            raise _HTTPError(HTTPStatus.NOT_FOUND, f"no key {key!r}")
        if self._wants_page():
            self._send_page(HTTPStatus.OK, "", _notice("Deleted", key))
        else:
            self._send_json(HTTPStatus.OK, {"key": key, "deleted": True})

    def _key_page(self, query: str, default_limit: int, default_delimiter: str | None = None) -> _KeyPage:
        """One page of keys (and folders, with a delimiter) as /keys and the HTML page take it."""
        usage = "?prefix=<p>&delimiter=<d>&limit=<1-10000>&after=<key>"
        fields = _fields(query, ("prefix", "delimiter", "limit", "after"), usage)
        limit_field = fields.get("limit", b"%d" % default_limit)
        if not re.fullmatch(rb"[0-9]{1,5}", limit_field) or not 1 <= int(limit_field) <= 10000:
            raise _HTTPError(
                HTTPStatus.BAD_REQUEST, f"limit is a whole number from 1 to 10000, not {_shown(limit_field)}"
            )
        limit = int(limit_field)  # (the page's links keep it if the request gave it)
        prefix = _text(fields.get("prefix", b""), "prefix")
        after = _text(fields["after"], "after") if "after" in fields else None
        delimiter = default_delimiter
        if "delimiter" in fields:
            if not 1 <= len(fields["delimiter"]) <= 16:
                raise _HTTPError(HTTPStatus.BAD_REQUEST, "delimiter is 1 to 16 bytes, such as / or %2F")
            delimiter = _text(fields["delimiter"], "delimiter")
        # One more item than the page holds tells whether a next page exists.
        items = self.storage.keys(prefix, delimiter=delimiter, after=after, limit=limit + 1)
        page = items[:limit]
        given_limit = limit if "limit" in fields else None
        return _KeyPage(page, page[-1] if len(items) > limit else None, prefix, delimiter, after, given_limit)

    @_route("/keys", "GET")
    def _route_keys(self, path: str, query: str) -> None:
        page = self._key_page(query, 1000)
        if page.delimiter is None:
            self._send_json(HTTPStatus.OK, {"keys": page.items, "next": page.next})
            return
        keys, prefixes = page.split()
        self._send_json(HTTPStatus.OK, {"keys": keys, "prefixes": prefixes, "next": page.next})

    # The page

    def _wants_page(self) -> bool:
        """Whether to answer with a page rather than JSON; the answer then says that it depends
        on Accept (Vary, RFC 9110 section 12.5.5), so that a cache keeps the two apart."""
        self._negotiated = True
        return _prefers_html(self.headers.get("Accept", ""))  # (none known if the head was refused)

    def _send_page(self, status: HTTPStatus, query: str, notice_html: str = "") -> None:
        # First the revision the listing is as of: the page's stream starts after it, not when
        # it connects, so that a change made while the page loads still reloads it.
        with self.storage.watch() as watch:
            after = watch.after
        page = self._key_page(query, 100, "/")
        listing = f"/?{query}" if query else "/"  # after /set or /delete, the listing without the action
        events = "/events?" + urllib.parse.urlencode({"prefix": page.prefix, "after": after})
        script, headers = _page_script(
            _PAGE_SCRIPT,
            f' data-events="{html.escape(events)}" data-listing="{html.escape(listing)}"',
            "; connect-src 'self'",
        )
        body = _render_page(self.storage, page, notice_html, script)
        self._send(status, body, "text/html; charset=utf-8", headers)

    @_route("/", "GET")
    def _route_dump(self, path: str, query: str) -> None:
        """Every live key and its value as one JSON object, written as it is read; the HTML
        page for a browser."""
        if self._wants_page():
            self._send_page(HTTPStatus.OK, query)
            return
        prefix = _text(_fields(query, ("prefix",), "/?prefix=<p>").get("prefix", b""), "prefix")
        writer = self._stream("application/json")
        if writer is None:
            return
        separator = b"{"
        for key in self.storage.keys(prefix):
            try:
                value = _dump_entry(self.storage, key)
            except KeyError:
                continue  # deleted or expired since the listing
            writer.write(separator + _json_bytes(key) + b": " + _json_bytes(value))
            separator = b", "
        writer.write(b"}\n" if separator == b", " else b"{}\n")
        writer.close()

    def _stream(self, content_type: str, headers: dict[str, str] | None = None) -> _ChunkedWriter | None:
        """Answer 200 with a body of unknown length, and return its writer (None for HEAD)."""
        fields = {"Content-Type": content_type, **(headers or {})}
        chunked = self.request_version != "HTTP/1.0"
        if chunked:
            fields["Transfer-Encoding"] = "chunked"
        else:
            self.close_connection = True  # the body ends where the connection does
        self._write_head(HTTPStatus.OK, fields)
        return _ChunkedWriter(self, chunked) if self.command != "HEAD" else None

    @_route("/export", "GET")
    def _route_export(self, path: str, query: str) -> None:
        prefix = _text(_fields(query, ("prefix",), "/export?prefix=<p>").get("prefix", b""), "prefix")
        writer = self._stream("application/x-ndjson")
        if writer is None:
            return
        self.storage.export(writer, prefix)
        writer.close()

    @_route("/import", "POST")
    def _route_import(self, path: str, query: str) -> None:
        _fields(query, (), "POST /import with an export as the body")
        body = self.body.open(sys.maxsize)  # a whole store; each value is held to --max-value
        # A bad line is a ValueError naming it: a 400.
        imported, skipped = self.storage.import_(body, max_value=self.server.max_value)
        self._send_json(HTTPStatus.OK, {"imported": imported, "skipped": skipped})

    @_route("/health", "GET")
    def _route_health(self, path: str, query: str) -> None:
        self.storage.check_writable()  # (a 503 or 507 when it cannot take a write, as a write would get)
        self._send_json(HTTPStatus.OK, {"status": "ok", "storage": self.storage.kind, "keys": len(self.storage)})

    @_route("/metrics", "GET")
    def _route_metrics(self, path: str, query: str) -> None:
        body = self.server.metrics.render(self.storage, len(self.server.connections))
        self._send(HTTPStatus.OK, body, "text/plain; version=0.0.4; charset=utf-8")

    # REST routes

    def _path_key(self, path: str) -> str:
        raw = urllib.parse.unquote_to_bytes(path.removeprefix("/kv/").encode("latin-1"))
        if not raw:
            raise _HTTPError(HTTPStatus.BAD_REQUEST, "name the key: /kv/<key>")
        return _text(raw, "key")

    def _precondition(self) -> tuple[str | None, bool]:
        """If-Match and If-None-Match of a PUT or DELETE, as storage arguments."""
        if_none_match = self.headers.get("If-None-Match")
        if if_none_match is not None and if_none_match != "*":
            raise _HTTPError(HTTPStatus.BAD_REQUEST, 'on PUT and DELETE, If-None-Match takes only "*" (create only)')
        return self._if_match(), if_none_match is not None

    def _if_match(self) -> str | None:
        """The request's If-Match as the storage takes it: an ETag, "*" for any value, or None."""
        if_match = self.headers.get("If-Match")
        if if_match is None or if_match == "*":
            return if_match
        tags = _etags(if_match)
        if len(tags) != 1 or if_match != f'"{tags[0]}"':  # (nothing beside it: no W/, no second tag, no *)
            raise _HTTPError(HTTPStatus.BAD_REQUEST, 'If-Match takes one strong ETag, as "<etag>", or *')
        if tags[0] == "*":  # an entity tag (RFC 9110 section 8.8.3), which no value has; not the storage's "any value"
            raise PreconditionFailed('no value has ETag "*"; If-Match: * without quotes matches any value')
        return tags[0]

    @_route("/kv/", "GET")  # every /kv/<key>
    def _route_kv_get(self, path: str, query: str) -> None:
        key = self._path_key(path)
        wait = _fields(query, ("wait",), "/kv/<key>?wait=<seconds>").get("wait")
        if wait is None:
            self._send_value(key, *self._fetch_or_404(key))
        elif not re.fullmatch(rb"[1-9][0-9]{0,2}", wait) or int(wait) > MAX_WAIT:
            raise _HTTPError(HTTPStatus.BAD_REQUEST, f"wait is a whole number of seconds from 1 to {MAX_WAIT}")
        else:
            self._send_value(key, *self._wait_for_change(key, int(wait)))

    def _wait_for_change(self, key: str, seconds: int) -> tuple[Stat, BinaryIO]:
        """The value of `key` once it differs from what the client holds (the value its
        If-None-Match names; without one, no value), or after `seconds`, or at once when the
        server stops; 404 if there is none then."""
        deadline = time.monotonic() + seconds
        # The watch begins before the first read, so that no change slips by.
        with self.storage.watch(key) as watch:
            while True:
                try:
                    stat, body = self.storage.fetch(key)
                except KeyError:
                    if self.headers.get("If-None-Match") is not None or watch.closed or time.monotonic() >= deadline:
                        raise _HTTPError(HTTPStatus.NOT_FOUND, f"no key {key!r}") from None
                else:
                    if not self._client_has(stat.etag) or watch.closed or time.monotonic() >= deadline:
                        return stat, body
                    body.close()
                with self._waiting(watch):
                    watch.wait(max(0.0, deadline - time.monotonic()))  # wakes at a change of a key that starts with it

    @contextlib.contextmanager
    def _waiting(self, watch: Watch) -> Iterator[None]:
        """Around a wait on `watch`: no deadline on the connection meanwhile, and the watch
        closed (so that the wait ends at once) when the server stops."""
        self.server.connections.watching(self.connection, watch)
        try:
            yield
        finally:
            self.server.connections.serving(self.connection)

    @_route("/kv/", "PUT")
    def _route_kv_put(self, path: str, query: str) -> None:
        key = self._path_key(path)
        ttl = _ttl(_fields(query, ("ttl",), "/kv/<key>?ttl=<seconds>").get("ttl"))
        if "Content-Range" in self.headers:  # likely part of a value, sent as if whole (RFC 9110 section 14.5)
            raise _HTTPError(
                HTTPStatus.BAD_REQUEST,
                "a PUT stores a whole value: send all of it, without Content-Range (no resuming)",
            )
        if_match, if_none_match = self._precondition()
        if len(self.headers.get_all("Content-Type") or ()) > 1:  # (joined, they would be stored as one media type)
            raise _HTTPError(HTTPStatus.BAD_REQUEST, "send one Content-Type field, not several")
        content_type = _check_media_type(self.headers.get("Content-Type", DEFAULT_CONTENT_TYPE))
        self.body.check(self.server.max_value)
        # The preconditions come after the request's own checks (RFC 9110 section 13.2.1), and
        # before the body is sent; the storage checks them again, atomically, when it commits.
        self.storage.check_precondition(key, if_match=if_match, if_none_match=if_none_match)
        body = self.body.open(self.server.max_value)
        stat, created = self.storage.write(
            key, body, content_type=content_type, ttl=ttl, if_match=if_match, if_none_match=if_none_match
        )
        status = HTTPStatus.CREATED if created else HTTPStatus.OK
        self._send_json(status, {"key": key, "created": created, "etag": stat.etag}, {"ETag": f'"{stat.etag}"'})

    @_route("/kv/", "DELETE")
    def _route_kv_delete(self, path: str, query: str) -> None:
        key = self._path_key(path)
        _fields(query, (), "DELETE /kv/<key>, with no query")
        if_match, if_none_match = self._precondition()
        try:
            removed = self.storage.remove(key, if_match=if_match, if_none_match=if_none_match)
        except PreconditionFailed:
            if key in self.storage:
                raise
            removed = False  # without its If-Match, a 404: so it is one (RFC 9110 section 13.2.1)
        if not removed:
            raise _HTTPError(HTTPStatus.NOT_FOUND, f"no key {key!r}")
        self._send(HTTPStatus.NO_CONTENT)

    @_route("/events", "GET")
    def _route_events(self, path: str, query: str) -> None:
        """Server-Sent Events: each change under ?prefix=, from the revision in Last-Event-ID
        (a reconnecting EventSource sends it) or ?after= on, after an opening id: line of the
        revision it starts after; a comment line after HEARTBEAT seconds of silence. It ends
        when the client goes or the server stops."""
        fields = _fields(query, ("prefix", "after"), "/events?prefix=<prefix>&after=<revision>")
        prefix = _text(fields.get("prefix", b""), "prefix")
        after = _text(fields["after"], "after") if "after" in fields else None
        after = self.headers.get("Last-Event-ID") or after  # a reconnecting EventSource's is newer
        try:
            watch = self.storage.watch(prefix, after=after)  # before the head is sent: no change slips by
        except ValueError as error:
            raise _HTTPError(HTTPStatus.BAD_REQUEST, str(error)) from None
        with watch, self.server.connections.streaming(self.connection, watch):
            writer = self._stream("text/event-stream; charset=utf-8", {"Cache-Control": "no-cache"})
            if writer is None:
                return  # HEAD: the stream's head is the whole answer
            # An id alone, no event: where an EventSource that drops before the first event
            # resumes (it sends this as Last-Event-ID), so that it misses nothing in between.
            writer.write(b"id: %b\n\n" % watch.after.encode())
            writer.flush()
            sent = -math.inf  # when events last left
            while True:
                pause = max(0.0, sent + COALESCE - time.monotonic())
                with self._waiting(watch):
                    batches = watch.wait_messages(HEARTBEAT - pause, pause=pause)
                if watch.closed:
                    break
                sent_before = sent
                for pieces in batches:
                    for piece in pieces:
                        writer.write(piece)
                    sent = time.monotonic()
                if sent == sent_before:  # HEARTBEAT seconds of silence
                    writer.write(b": keep-alive\n\n")
                writer.flush()
            writer.close()
            self.wfile.flush()  # (its end leaves while stop() still knows it for a stream)
            self._sent = writer.written

    # XML-RPC

    @_route("/RPC2", "POST")
    @_route("/", "POST")  # as SimpleXMLRPCServer takes it
    def _route_rpc(self, path: str, query: str) -> None:
        try:
            response = self.server.rpc.dispatch(self.body.read_all(_MAX_RPC_BODY))
        except _HTTPError as error:
            if error.status != HTTPStatus.REQUEST_ENTITY_TOO_LARGE:
                raise
            too_large = xmlrpc.client.Fault(413, f"the call is over {_MAX_RPC_BODY:,} bytes; {_RPC_TOO_LARGE}")
            response = _XMLRPCWriter.fault(too_large)
        self._send(HTTPStatus.OK, response, "text/xml")

    # path -> method -> handler, from the @_route marks above
    routes: ClassVar[dict[str, dict[str, _Route]]] = _route_table(vars())


_INT32 = range(-(2**31), 2**31)


# Server: connections, their deadlines, and the threads

IDLE_TIMEOUT = 15.0  # seconds a keep-alive connection may wait for its next request
HEAD_TIMEOUT = 10.0  # seconds from a request's first byte to the end of its headers
STALL_TIMEOUT = 30.0  # seconds a request body, or an answer, may go without a byte moving
STALL_GRACE = 5.0  # seconds between looks at an answer in the send queue, once STALL_TIMEOUT has passed
STOP_GRACE = 1.0  # seconds an event stream has, once the server stops, to send what it is sending


def _problem_response(status: HTTPStatus, detail: str) -> bytes:
    """A whole problem+json response, for answers given outside a request handler."""
    body = _problem(status, detail)
    head = (
        f"HTTP/1.1 {status.value} {status.phrase}\r\nContent-Type: application/problem+json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def _close_gently(connection: socket.socket) -> None:
    """End our side, then read and drop what the client still sends, for 2 s at most, so that
    closing does not reset the connection before the client has read our answer (RFC 9112
    section 9.6). OSError if the connection is gone."""
    connection.shutdown(socket.SHUT_WR)
    connection.settimeout(1.0)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and connection.recv(CHUNK):
        pass


def _shut_down(connections: Iterable[socket.socket]) -> None:
    """End connections from another thread: a read or send blocked on one returns at once. (On
    a TLS connection, beneath TLS: SSLSocket.shutdown drops its TLS state first, and a send of
    the connection's own thread at that moment would go out in plain text.)"""
    for connection in connections:
        with contextlib.suppress(OSError):
            socket.socket.shutdown(connection, socket.SHUT_RDWR)


def _unsent_bytes(connection: socket.socket) -> int:
    """The bytes in a connection's send queue that the client has not yet acknowledged
    (Linux's SIOCOUTQ); 0 where that cannot be known."""
    try:
        return int(struct.unpack("i", fcntl.ioctl(connection.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0])
    except (OSError, ValueError):
        return 0


_POLLRDHUP = getattr(select, "POLLRDHUP", 0)  # the peer's FIN, whatever bytes stand before it (Linux 2.6.17)


class _Connections:
    """The server's open connections, what each one is doing, and by when it must move on.

    A connection is idle (waiting for its next request, for at most IDLE_TIMEOUT), reading a
    request head (complete within HEAD_TIMEOUT of its first byte), serving a request (no
    STALL_TIMEOUT without a byte of its body or answer moving: see `overdue`), or watching for a change (no
    deadline: a long-poll or an event stream). Sockets have no timeout of their own, because a
    timeout makes CPython poll() before every recv and send; instead the housekeeping thread
    cuts off every connection past its deadline, so that a client that stops sending or
    reading never holds a thread. `stop` closes the idle and watching connections at once, and
    event streams even as they send; those serving a request finish it. One lock guards it all,
    taken a few times per request.
    """

    _IDLE, _READING_HEAD, _SERVING, _WATCHING = "idle", "reading head", "serving", "watching"

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.stopping = False
        self._lock = threading.Lock()
        self._count = 0
        # Each connection's state and deadline (monotonic seconds; inf while watching).
        self._states: dict[socket.socket, tuple[str, float]] = {}
        self._watches: dict[socket.socket, Watch] = {}  # what the watching connections wait on
        self._streams: dict[socket.socket, Watch] = {}  # the connections serving an event stream, and its watch
        # For a connection given STALL_GRACE: that deadline, and the bytes unsent when it was set.
        self._unsent_seen: dict[socket.socket, tuple[float, int]] = {}

    def __len__(self) -> int:
        return self._count

    def admit(self) -> bool:
        """Count a new connection in; False if `limit` are open already."""
        with self._lock:
            if self._count >= self.limit:
                return False
            self._count += 1
            return True

    def leave(self, connection: socket.socket) -> None:
        """An admitted connection is closed and its thread done."""
        with self._lock:
            self._count -= 1
            self._states.pop(connection, None)
            self._watches.pop(connection, None)
            self._unsent_seen.pop(connection, None)

    def idle(self, connection: socket.socket) -> bool:
        """The connection waits for its next request; False once stopping (close it)."""
        with self._lock:
            self._states[connection] = (self._IDLE, time.monotonic() + IDLE_TIMEOUT)
            return not self.stopping

    def reading_head(self, connection: socket.socket, whole_head: bool) -> bool:
        """A request's first byte arrived: its head must be complete within HEAD_TIMEOUT,
        unless all of it has (`whole_head`): the request is then served from now on, with no
        `head_read`. False if stopping, which has closed the connection as idle, or if the
        idle deadline cut it off first."""
        with self._lock:
            if self._state(connection) != self._IDLE:
                return False  # the idle deadline cut it off as the byte came
            if whole_head:
                self._serve(connection)
            else:
                self._states[connection] = (self._READING_HEAD, time.monotonic() + HEAD_TIMEOUT)
            return not self.stopping

    def head_read(self, connection: socket.socket) -> bool:
        """The head was read, and the request is served from now on; False if the head
        deadline cut the connection off first, so that what was read may be only part of it."""
        with self._lock:
            if self._state(connection) != self._READING_HEAD:
                return False
            self._serve(connection)
            return True

    def moved(self, connection: socket.socket) -> None:
        """Bytes of a body or an answer moved: the stall deadline starts again, unless it
        did within the last tenth of STALL_TIMEOUT (a lock round trip on every send of every
        small answer costs more than that tenth of the deadline is worth). The look without
        the lock can only skip a renewal whose deadline is still most of STALL_TIMEOUT away,
        or one of a connection that is no longer serving."""
        now = time.monotonic()
        if self._states.get(connection, ("", 0.0))[1] - now > 0.9 * STALL_TIMEOUT:
            return
        with self._lock:
            if self._state(connection) == self._SERVING and not self._stopping_stream(connection):
                self._serve(connection)  # (a stopping stream's grace is not renewed)

    def watching(self, connection: socket.socket, watch: Watch) -> None:
        """The request waits on `watch` for a change, with no deadline, until `serving` again
        (to answer). `stop` closes the watch, and so ends the wait; if stopping, it is closed
        at once."""
        with self._lock:
            self._states[connection] = (self._WATCHING, math.inf)
            self._watches[connection] = watch
            stopping = self.stopping
        if stopping:
            watch.close()

    def serving(self, connection: socket.socket) -> None:
        """The request goes on after `watching`: it is answered within STALL_TIMEOUT again."""
        with self._lock:
            self._serve(connection)
            self._watches.pop(connection, None)

    @contextlib.contextmanager
    def streaming(self, connection: socket.socket, watch: Watch) -> Iterator[None]:
        """Around an event stream reading `watch`, which `stop` ends even while it sends: its
        client may have stopped reading, and a blocked send would hold the stop for
        STALL_TIMEOUT."""
        with self._lock:
            self._streams[connection] = watch
        try:
            yield
        finally:
            with self._lock:
                self._streams.pop(connection, None)

    def replaced(self, connection: socket.socket) -> None:
        """The connection goes on as another socket object (wrapped in TLS): forget this one."""
        with self._lock:
            self._states.pop(connection, None)

    def _serve(self, connection: socket.socket) -> None:
        """The connection is serving a request, to answer within STALL_TIMEOUT (an event stream
        once stopping: within STOP_GRACE, see stop); under the lock."""
        grace = STOP_GRACE if self._stopping_stream(connection) else STALL_TIMEOUT
        self._states[connection] = (self._SERVING, time.monotonic() + grace)

    def _stopping_stream(self, connection: socket.socket) -> bool:
        """Whether the connection is an event stream of a server that is stopping; under the lock."""
        return self.stopping and connection in self._streams

    def _state(self, connection: socket.socket) -> str:
        """What the connection is doing ("" once forgotten: cut off, or left); under the lock."""
        return self._states.get(connection, ("", 0.0))[0]

    def overdue(self) -> list[socket.socket]:
        """The connections past their deadline, forgotten here (to cut off).

        A connection whose answer still waits in the kernel's send queue is cut off only once
        the client has taken none of it for STALL_GRACE seconds: a blocked send wakes only when
        a third of its (several MiB) buffer has drained, so a slow reader's bytes can keep
        moving for minutes while the sending thread sees no progress."""
        now = time.monotonic()
        with self._lock:
            late = [
                (connection, state, deadline)
                for connection, (state, deadline) in self._states.items()
                if deadline < now
            ]
        overdue = []
        for connection, state, deadline in late:
            unsent = _unsent_bytes(connection) if state == self._SERVING else 0
            with self._lock:
                if self._states.get(connection) != (state, deadline):
                    continue  # it moved on meanwhile
                seen = self._unsent_seen.pop(connection, None)
                if unsent and seen != (deadline, unsent) and not self._stopping_stream(connection):
                    renewed = now + STALL_GRACE  # the client took bytes since the last look: look again
                    self._states[connection] = (state, renewed)
                    self._unsent_seen[connection] = (renewed, unsent)
                    continue
                del self._states[connection]  # so head_read says the head was cut off
            overdue.append(connection)
        return overdue

    def hung_up(self) -> None:
        """End the waits of the watching connections whose client closed its end, so that a
        long-poll or a stream the client left does not hold its thread (and a place under the
        limit) until its time or next heartbeat: its end of the connection, even behind a
        request it pipelined (POLLRDHUP, on Linux), or else a peek that finds no more bytes. (A
        TLS connection cannot be peeked at: its stream finds out at its next heartbeat.)"""
        with self._lock:
            watching = {connection.fileno(): connection for connection in self._watches}
        poller = select.poll()
        for fd, connection in watching.items():
            if fd >= 0 and not isinstance(connection, ssl.SSLSocket):
                poller.register(fd, select.POLLIN | _POLLRDHUP)
        for fd, events in poller.poll(0):
            try:
                gone = bool(events & (_POLLRDHUP | select.POLLHUP | select.POLLERR)) or (
                    watching[fd].recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
                )
            except BlockingIOError:
                gone = False
            except OSError:
                gone = True
            if gone:
                with self._lock:
                    watch = self._watches.get(watching[fd])
                if watch is not None:
                    watch.close()

    def stop(self) -> list[socket.socket]:
        """Admit no more requests, end the waits of the watching connections and the event
        streams (so that they answer at once: a long-poll with what it has, a stream with its
        end, once what it is sending has gone), and return the connections to close: the idle
        ones, and the event streams whose client has not taken all they sent (a blocked send
        would hold the stop; a client that reads resumes from its last event id). A stream
        that is sending has STOP_GRACE to finish, and is cut off after (see _serve)."""
        with self._lock:
            self.stopping = True
            watches = [*self._watches.values(), *self._streams.values()]
            idle = [connection for connection, (state, _) in self._states.items() if state == self._IDLE]
            streams = [connection for connection in self._streams if self._state(connection) == self._SERVING]
            for connection in streams:
                self._serve(connection)
        for watch in watches:
            watch.close()
        return idle + [connection for connection in streams if _unsent_bytes(connection)]


class KVServer(ThreadingHTTPServer):
    """A thread per connection, at most `max_connections` of them.

    `connections` tracks what each connection is doing, so that a housekeeping thread can
    cut off heads that take too long and `stop` can close idle connections without cutting
    off a request in flight.
    """

    request_queue_size = 128
    daemon_threads = False
    block_on_close = True
    _BUSY = _problem_response(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections; try again in a moment")
    _MAX_LINGERING = 64  # refused connections kept open briefly so that they read their 503

    def __init__(
        self,
        address: tuple[str, int],
        storage: Storage,
        *,
        max_value: int = 1024**3,
        max_connections: int = 256,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        quiet: bool = False,
    ) -> None:
        self.address_family = socket.getaddrinfo(address[0], address[1], type=socket.SOCK_STREAM)[0][0]
        self.storage = storage
        # The largest value taken: `max_value`, within what the storage can hold.
        self.max_value = max_value if storage.max_value is None else min(max_value, storage.max_value)
        self.token = token.encode("utf-8") if token is not None else None
        self.ssl_context = ssl_context
        self.scheme = "https" if ssl_context else "http"
        self.quiet = quiet
        self.rpc = _XMLRPC(storage, self.max_value)
        self.metrics = _Metrics()
        self.connections = _Connections(max_connections)
        self._lingering_lock = threading.Lock()
        self._lingering: list[tuple[socket.socket, float]] = []
        self._closed = threading.Event()
        self._stop_requested = threading.Event()
        self._housekeeper: threading.Thread | None = None
        super().__init__(address, KVRequestHandler)
        self.loopback = ipaddress.ip_address(self.host).is_loopback
        self._housekeeper = threading.Thread(target=self._housekeeping, name="kvserver-housekeeping", daemon=True)
        self._housekeeper.start()

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse DNS lookup of the address, which can stall start-up."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.host, int(self.server_address[1])

    @property
    def host(self) -> str:
        """The address listened on (for IP sockets, socketserver's bytes are never used)."""
        return cast(str, self.server_address[0])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.server_address[1]}/"

    # Connections

    def process_request(self, request: socket.socket, client_address: Any) -> None:  # type: ignore[override]
        if self.connections.admit():
            try:
                super().process_request(request, client_address)
            except BaseException:  # no thread: the connection is not served
                self.connections.leave(request)
                raise
        else:
            self._refuse(request)

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:  # type: ignore[override]
        connection: socket.socket | None = request
        try:
            if self.ssl_context is not None:
                connection = self._start_tls(request)
            if connection is not None:
                super().process_request_thread(connection, client_address)
        finally:
            self.connections.leave(connection or request)

    def _start_tls(self, connection: socket.socket) -> ssl.SSLSocket | None:
        """The connection in TLS, in its own thread; None if the client spoke plain HTTP to this
        port: it is answered 400 with a pointer to https:// (as nginx does) and closed."""
        assert self.ssl_context is not None
        first = b""
        if self.connections.idle(connection):  # until its first byte: the idle deadline and stop() apply
            with contextlib.suppress(OSError):
                first = connection.recv(1, socket.MSG_PEEK)
        if first == b"\x16":  # a TLS handshake record; the handshake itself happens on the first read
            self.connections.replaced(connection)
            return self.ssl_context.wrap_socket(connection, server_side=True, do_handshake_on_connect=False)
        with contextlib.suppress(OSError):
            if first:
                detail = "this port speaks HTTPS: use an https:// URL"
                connection.sendall(_problem_response(HTTPStatus.BAD_REQUEST, detail))
                _close_gently(connection)
        connection.close()
        return None

    def _refuse(self, connection: socket.socket) -> None:
        """Answer 503 at once, from the accepting thread, without starting a thread."""
        with contextlib.suppress(OSError):
            if self.ssl_context is None:  # a TLS client gets only the close
                connection.setblocking(False)
                connection.send(self._BUSY)
            connection.shutdown(socket.SHUT_WR)
        with self._lingering_lock:
            if len(self._lingering) < self._MAX_LINGERING:
                self._lingering.append((connection, time.monotonic() + 1.0))
                return
        connection.close()

    def _housekeeping(self) -> None:
        """Twice a second: cut off clients whose request head is overdue, end the waits of
        clients that hung up, close the refused connections once their client had a moment to
        read the 503, and sweep the storage."""
        unavailable = False  # the last sweep found the storage unavailable (it was said once)
        while not self._closed.wait(0.5):
            _shut_down(self.connections.overdue())
            self.connections.hung_up()
            now = time.monotonic()
            with self._lingering_lock:
                done = [connection for connection, until in self._lingering if until < now]
                self._lingering = [(connection, until) for connection, until in self._lingering if until >= now]
            for connection in done:
                connection.close()
            try:
                self.storage.sweep()  # values whose TTL passed
            except StorageUnavailable as error:
                if not unavailable:
                    print(f"kvserver: expired values are not swept for now: {error}", file=sys.stderr)
                unavailable = True
            except Exception:
                traceback.print_exc()  # housekeeping goes on
            else:
                if unavailable:
                    print("kvserver: expired values are swept again", file=sys.stderr)
                unavailable = False

    def stop_on_signals(self) -> None:
        """Make Ctrl-C and SIGTERM end serve_forever at its next turn; a second one raises
        KeyboardInterrupt, to stop waiting for requests in flight. (Raising at the first would
        land anywhere in the accept loop, whose bare `except:` then shuts the connection being
        handed to its thread, with its request under way.) Call it from the main thread."""

        def on_signal(signum: int, frame: object) -> None:
            if self._stop_requested.is_set():
                raise KeyboardInterrupt
            self._stop_requested.set()
            threading.Thread(target=self.shutdown, name="kvserver-stop").start()

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)

    def stop(self) -> None:
        """Stop accepting, close idle connections, end event streams and waiting requests,
        wait for the other requests in flight."""
        _shut_down(self.connections.stop())
        self.server_close()

    def server_close(self) -> None:
        """Close the listening socket, wait for the connections' threads, end housekeeping."""
        super().server_close()
        self._closed.set()
        if self._housekeeper is not None:  # (None if binding failed)
            self._housekeeper.join()  # so that it does not sweep a storage being closed


# main(): the command line


def _parse_size(text: str) -> int:
    """Bytes in '512', '64K', '10M' or '1G' (powers of 1024); ValueError otherwise."""
    match = re.fullmatch(r"(\d+)([KMG]?)", text.strip(), re.IGNORECASE)
    if not match:
        raise ValueError(f"a size is a whole number of bytes with an optional K, M or G suffix, not {text!r}")
    return int(match.group(1)) << 10 * " KMG".index(match.group(2).upper() or " ")


def _fail(message: str, status: int) -> NoReturn:
    print(f"kvserver: {message}", file=sys.stderr)
    sys.exit(status)


def _whole_number(args: dict[str, Any], option: str, low: int, high: int) -> int:
    """The value of a whole-number option, or exit 2 with a line naming it."""
    with contextlib.suppress(ValueError):
        if low <= (value := int(args[option])) <= high:
            return value
    _fail(f"{option} takes a whole number from {low} to {high}, not {args[option]!r}", 2)


def _text_option(option: str, value: str) -> None:
    """Exit 2 naming `option` unless `value` is UTF-8 text. (Bytes of the command line or the
    environment that are not UTF-8 reach Python as lone surrogates, PEP 383: no key, URL,
    address or token holds one.)"""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        _fail(f"{option} takes UTF-8 text, not the bytes {os.fsencode(value)!r}", 2)


def _command_line_problem(given: list[str]) -> str:
    """What is wrong with a command line docopt refused, in words: the first unknown option,
    option given twice, or argument that is neither a command nor an option's value."""
    commands = re.findall(r"^  kvserver (\w+)", __doc__ or "", re.MULTILINE)
    options: dict[str, tuple[str, bool]] = {}  # every spelling -> (long name, takes a value)
    for short, long, value in re.findall(r"^  (-\w )?(--[\w-]+)(=<)?", __doc__ or "", re.MULTILINE):
        options[long] = options[short.strip() or long] = (long, bool(value))
    seen: set[str] = set()
    command = None
    arguments = list(reversed(given))  # the next one last
    while arguments:
        argument = arguments.pop()
        if argument in commands and command is None:  # (options may stand before it too)
            command = argument
            continue
        if not argument.startswith("-") or argument in ("-", "--"):
            return f"unexpected argument {argument!r}: every setting is an option such as --port 4000"
        name, equals, _ = argument.partition("=")
        if name.startswith("--") and name not in options:  # docopt takes a unique prefix of one
            longer = [option for option in options if option.startswith(name)]
            if len(longer) > 1:
                return f"option {name} could be any of {', '.join(longer)}: spell it out"
            name = longer[0] if longer else name
        elif not name.startswith("--"):
            name, equals = argument[:2], "=" if len(argument) > 2 else ""  # -p4000 holds its value
            if equals and not options.get(name, ("", True))[1]:  # short flags stand together: -qp is -q -p
                arguments.append("-" + argument[2:])
                equals = ""
        if name not in options:
            return f"unknown option {name}"
        long, takes_value = options[name]
        if long in seen:
            return f"option {long} is given twice"
        seen.add(long)
        if not takes_value and equals:
            return f"option {long} takes no value"
        if takes_value and not equals and not arguments:
            return f"option {long} needs a value"
        if takes_value and not equals:
            arguments.pop()  # its value, whatever it looks like
    return "the command line does not match the usage"


class _Progress:
    """The progress line of kvserver export and import on stderr: rewritten in place at most
    twice a second while stderr is a terminal, and written once more at the end."""

    def __init__(self, verb: str) -> None:
        self.verb = verb
        self.keys = self.size = 0
        self._started = self._shown = time.monotonic()

    def __call__(self, keys: int, size: int) -> None:
        self.keys, self.size = keys, size
        if sys.stderr.isatty() and time.monotonic() - self._shown >= 0.5:
            self._shown = time.monotonic()
            print(f"\r{self.line()}", end="", file=sys.stderr, flush=True)

    def line(self) -> str:
        return f"kvserver: {self.verb} {self.keys} key{'' if self.keys == 1 else 's'} ({_human_size(self.size)})"

    def finish(self, more: str) -> None:
        end = "\r" if sys.stderr.isatty() else ""
        print(f"{end}{self.line()}{more} in {time.monotonic() - self._started:.1f} s", file=sys.stderr, flush=True)

    def fail(self, message: str) -> NoReturn:
        """Exit 1 with `message`, on a line of its own after a progress line shown in place."""
        if self._shown > self._started:
            print(file=sys.stderr)
        _fail(message, 1)


@contextlib.contextmanager
def _on_one_cpu() -> Iterator[None]:
    """Keep the calling thread, and every thread it starts meanwhile (they inherit it), on one
    CPU while the block runs; then give the calling thread back the CPUs it had. Linux only:
    elsewhere, and where the kernel refuses, nothing changes.

    Only the thread that holds the GIL runs Python, and with a thread per connection another
    thread nearly always waits for it. Each system call that may block releases the GIL; with a
    second CPU idle, the kernel wakes the waiter there at once, it takes the GIL, and the caller,
    back from a call of microseconds, sleeps until the GIL is free again: two context switches
    and a wake-up across CPUs for each call (a kernel profile put over 40% of the server's CPU
    in them under a write load). On one CPU the woken waiter queues behind the caller, which
    comes back, finds the GIL free and runs on. Python runs no faster on two CPUs than on one;
    only the kernel's share of the work (system calls, TCP) could overlap it. For the numbers,
    and where that share is large enough to lose (README, Performance).

    The CPU is the one this thread is running on, so that servers started side by side stay
    where the kernel spread them, and is one of those the thread may use (taskset). A Python
    without the GIL (a free-threaded build) runs threads in parallel: they are left free. (The
    CPUs come back at the end for a caller of main() in a process that goes on: a test.)"""
    if not hasattr(os, "sched_setaffinity") or not getattr(sys, "_is_gil_enabled", lambda: True)():
        yield
        return
    allowed: set[int] | None = None
    with contextlib.suppress(OSError):  # (a sandbox may refuse either call: the server runs as it is)
        allowed = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {_current_cpu(allowed)})
    try:
        yield
    finally:
        if allowed is not None:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, allowed)


def _current_cpu(allowed: set[int]) -> int:
    """The CPU this thread is running on, if it is in `allowed`; else the lowest of those."""
    try:
        with open("/proc/thread-self/stat", "rb") as stat:  # field 39: the CPU it last ran on
            current = int(stat.read().rpartition(b")")[2].split()[36])
    except (OSError, ValueError, IndexError):
        return min(allowed)
    return current if current in allowed else min(allowed)


def _open_storage(args: dict[str, Any], locked_hint: str = "") -> Storage:
    """The storage the command line names, by open_storage; or exit 1 with one line saying why
    it cannot be used (with `locked_hint` after the line for a data dir in use)."""
    spec = f"files:{args['--data-dir']}" if args["--storage"] == "files" else args["--storage"]
    try:
        return open_storage(spec, fsync=not args["--no-fsync"])
    except DataDirLocked as error:
        _fail(f"{error}{locked_hint}", 1)
    except (StorageUnavailable, ImportError) as error:
        _fail(str(error), 1)
    except ValueError as error:  # a Redis URL that redis-py cannot read
        _fail(f"--storage: {error}", 2)
    except OSError as error:
        _fail(f"cannot use data dir {args['--data-dir']}: {_os_error_text(error)}", 1)


def _run_transfer(args: dict[str, Any], said: dict[str, Any]) -> None:
    """kvserver export and kvserver import: between a storage and stdout or stdin. `said` is
    docopt's reading of the command line without the usage's defaults: any option on it that
    does not apply to the command is refused, even at its default value (the usage lists
    every option for it, as docopt needs)."""
    exporting = bool(args["export"])
    command = "export" if exporting else "import"
    if args["--prefix"] is not None and not exporting:
        _fail("--prefix goes with kvserver export; see kvserver --help", 2)
    applies = {"--storage", "--data-dir", "--prefix" if exporting else "--no-fsync"}
    for option, value in said.items():
        if option.startswith("--") and option not in applies and value not in (None, False):
            _fail(f"{option} does not go with kvserver {command}; see kvserver --help", 2)
    if args["--storage"] == "memory":
        _fail("export and import need files or redis storage: a memory storage starts empty and is lost at exit", 2)
    # A shell's `>&-` or `<&-` leaves Python no sys.stdout or sys.stdin (exit 1, as an output
    # closed part way: the command line is right, the place it was run from is not)
    if (sys.stdout if exporting else sys.stdin) is None:
        stream = "its output (stdout)" if exporting else "its input (stdin)"
        _fail(f"{command} needs {stream} open, and it is closed", 1)
    if not exporting and sys.stdin.isatty():  # (as gzip will not read compressed data from one)
        _fail("import reads an export from its input (stdin), which is a terminal: pipe one in or use < file", 1)
    files = args["--storage"] == "files"
    if exporting and files and not os.path.isdir(args["--data-dir"]):
        _fail(f"no data dir {args['--data-dir']} to export", 1)
    storage = _open_storage(
        args,
        ", or export from it while it runs: curl http://<host>:<port>/export"
        if exporting
        else ", or import into it while it runs: curl -T <export> -X POST http://<host>:<port>/import",
    )
    where = f"{storage.kind} storage {storage.location}"
    progress = _Progress(f"{command}ed")
    with storage:
        try:
            if exporting:
                storage.export(sys.stdout.buffer, args["--prefix"] or "", progress=progress)
                sys.stdout.buffer.flush()
                progress.finish(f" from {where}")
            else:
                _, skipped = storage.import_(sys.stdin.buffer, progress=progress)
                progress.finish(f" into {where}, skipped {skipped} already expired")
        except ValueError as error:
            progress.fail(f"export stopped: {error}" if exporting else f"import stopped at {error}")  # (its line)
        except _ValueFileChanged as error:  # (files: the data dir is locked, so not by a kvserver)
            progress.fail(
                f"export stopped at key {error.key!r}: its file {storage.location} was changed by another "
                "program during the export; run the export again once nothing else writes there"
            )
        except StorageUnavailable as error:
            progress.fail(f"{command} stopped: {error}")  # (an import's names its line)
        except BrokenPipeError:  # (export | head): stdout closed early; as the Python docs advise,
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit does not flush into it
            progress.fail("export stopped: its output was closed")
        except OSError as error:
            progress.fail(f"{command} failed: {_os_error_text(error)}")
        except KeyboardInterrupt:
            progress.fail("interrupted; every key written so far is whole")


def main(argv: list[str] | None = None) -> None:
    """Run the server from the command line: exit 0 when stopped, 1 if it cannot start, 2 on a bad command line."""
    if sys.stderr is None:  # started with `2>&-`: its lines are dropped, not printed to stdout
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 -- for the life of the process
    try:
        from docopt import DocoptExit, docopt
    except ImportError:
        _fail("needs the docopt-ng package: pip install docopt-ng", 1)
    given = sys.argv[1:] if argv is None else argv
    try:
        args = docopt(__doc__, given, version=f"kvserver {__version__}")
    except DocoptExit:
        _fail(f"{_command_line_problem(given)}; see kvserver --help", 2)
    for option, value in args.items():  # paths are bytes to the OS; every other value is text
        if isinstance(value, str) and option not in ("--data-dir", "--certfile", "--keyfile"):
            _text_option(option, value)
    port = _whole_number(args, "--port", 0, 65535)
    max_connections = _whole_number(args, "--max-connections", 1, 65535)
    try:
        max_value = _parse_size(args["--max-value"])
    except ValueError as error:
        _fail(f"--max-value: {error}", 2)
    if args["--storage"] not in ("files", "memory") and not args["--storage"].startswith(_REDIS_SCHEMES):
        _fail(f"--storage takes files, memory, or a redis://, rediss:// or unix:// URL, not {args['--storage']!r}", 2)
    kind = args["--storage"] if args["--storage"] in ("files", "memory") else "redis"  # (a URL may hold a password)
    if args["--data-dir"] is not None and kind != "files":
        _fail(f"--data-dir is the folder of --storage files; {kind} storage keeps no files there", 2)
    if args["--no-fsync"] and kind != "files" and not args["export"]:  # (export takes no --no-fsync at all)
        _fail(f"--no-fsync is for --storage files; {kind} storage makes no fsync of kvserver's", 2)
    if args["--data-dir"] == "":  # (as "$DATA_DIR" gives when it is not set)
        _fail("--data-dir takes a folder, not an empty string", 2)
    args["--data-dir"] = args["--data-dir"] or "./data"
    if args["export"] or args["import"] or args["--prefix"] is not None:
        _run_transfer(args, docopt(re.sub(r" ?\[default: [^]]*\]", "", __doc__ or ""), given))
        return
    token = args["--token"] if args["--token"] is not None else os.environ.get("KV_TOKEN") or None
    if args["--token"] is None and token is not None:
        _text_option("KV_TOKEN", token)
    if token == "":
        _fail("--token takes a secret, not an empty string", 2)
    if token is not None and (token != token.strip(" \t") or _CONTROL_CHARACTER.search(token.strip(" \t"))):
        _fail(  # (HTTP trims a field value; CR and LF end it)
            "--token (or KV_TOKEN) holds no control character, nor space or tab at either end: "
            "an Authorization: Bearer field could not carry it",
            2,
        )
    try:
        socket.getaddrinfo(args["--bind"], port, type=socket.SOCK_STREAM)  # as KVServer does, before any storage opens
    except (socket.gaierror, UnicodeError) as error:  # not an address, nor a name that has one; or no answer for now
        why = (
            error.strerror
            if isinstance(error, socket.gaierror)
            else "a part of the name is empty, too long or not allowed"
        )
        no_answer_for_now = isinstance(error, socket.gaierror) and error.errno in (socket.EAI_AGAIN, socket.EAI_FAIL)
        an_address = re.fullmatch(r"[0-9.]*|.*[:\[\]].*", args["--bind"])  # (no name looks so)
        if no_answer_for_now and not an_address:  # (a name may resolve later)
            _fail(f"cannot listen on {args['--bind']} port {port}: {why}", 1)
        _fail(f"--bind takes an address (the port goes in --port), not {args['--bind']!r}: {why}", 2)
    if token is not None and args["--no-token"]:
        _fail("--no-token contradicts --token (or KV_TOKEN): give one or the other", 2)
    if (args["--certfile"] is None) != (args["--keyfile"] is None):
        _fail("--certfile and --keyfile go together: give both, or neither", 2)
    ssl_context = None
    if args["--certfile"] is not None:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ssl_context.load_cert_chain(args["--certfile"], args["--keyfile"])
        except (OSError, ssl.SSLError) as error:
            _fail(f"cannot load --certfile/--keyfile: {error}", 1)

    with _on_one_cpu():  # before the storage starts a thread of its own: they all inherit it
        started = time.perf_counter()
        storage = _open_storage(args)
        loaded = time.perf_counter() - started
        try:
            server = KVServer(
                (args["--bind"], port),
                storage,
                max_value=max_value,
                max_connections=max_connections,
                token=token,
                ssl_context=ssl_context,
                quiet=args["--quiet"],
            )
        except OSError as error:
            storage.close()
            _fail(f"cannot listen on {args['--bind']} port {port}: {error.strerror or error}", 1)

        if token is not None:
            access = "token required"
        elif server.loopback or args["--no-token"]:
            access = "no token"
        else:  # the network would be served open: require a token made for this run (--no-token opts out)
            token = secrets.token_urlsafe(16)
            server.token = token.encode()
            access = f"token required: {token} (made for this run; set --token or KV_TOKEN to choose one)"
        server.stop_on_signals()  # before the start line: a script may stop us as soon as it reads it
        with contextlib.suppress(KeyboardInterrupt):  # (only a second signal raises it)
            print(
                f"kvserver {__version__} serving {server.url} with {storage.kind} storage {storage.location}: "
                f"{len(storage)} keys loaded in {loaded:.3f} s; {access}, TLS {'on' if ssl_context else 'off'}",
                flush=True,
            )
            server.serve_forever()
        with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C stops the wait for requests in flight
            server.stop()
        storage.close()
        print("kvserver stopped", flush=True)


if __name__ == "__main__":
    main()
