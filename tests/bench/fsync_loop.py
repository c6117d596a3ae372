"""The bare cost of a durable small write on a disk, without HTTP or Python bookkeeping.

Each of --threads threads loops: write a small value to a temporary file, fsync it,
rename it over a key's file, fsync the folder. The threads share --keys keys in turn, as the
benchmark's /set load does, so that renames replace existing files (freeing the old one is
part of the cost). After --seconds (or --max-ops writes per
thread) it prints one JSON line: ops, seconds, ops_per_s, p50_ms, p99_ms.

With --like-kvserver each write makes the system calls kvserver's files storage makes for a
plain /set that replaces a small value, in its order: open a spare temporary file in a tmp
sub-folder (one that an earlier write swapped out, or a new one named by a counter), look at
its size and links, write, cut it to size if it was longer, set its modification time,
fsync, close, swap it with the key's file (renameat2 RENAME_EXCHANGE) under a lock per
stripe of keys, wait for a folder fsync shared by the writers waiting at the time
(kvserver's own group commit), and keep the swapped-out file as a spare. The swap and the
group commit are imported from kvserver.py. What is left between this and kvserver is HTTP
and Python bookkeeping. With --no-fsync as well, each write makes the calls of kvserver
--no-fsync instead: the same, but no write fsyncs a file or waits for a folder fsync; the
writeback of the value is begun (posix_fadvise) where the file was fsynced; and a spare is
taken once a folder fsync for a batch of them covers the swap that made it, and its blocks
zeroed first (as on ext4 or XFS), else a new file is made (kvserver's _Spares and
_clear_spare).
Usage: python fsync_loop.py DIR [--threads 16] [--seconds 5] [--keys 1000] [--max-ops N] [--like-kvserver [--no-fsync]]
"""

import argparse
import itertools
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import kvserver  # the repository root's kvserver.py


class Shared:
    """What the threads share (for as long as the process runs): the folder and a descriptor of
    it, and kvserver's counter of names, its locks, its group commit and its spares."""

    def __init__(self, folder: str, fsync: bool) -> None:
        self.folder = folder
        self.fsync = fsync
        self.folder_fd = os.open(folder, os.O_RDONLY)
        self.tmp = os.path.join(folder, ".kvserver", "tmp")
        self.names = itertools.count()
        self.locks = [threading.Lock() for _ in range(64)]
        self.synced = kvserver._GroupSync(folder, fsync)
        zeroes = kvserver._file_system_type(folder) in kvserver._ZEROING_FILE_SYSTEMS
        self.spares = kvserver._Spares(folder, fsync=fsync, sync_swaps=zeroes and not fsync)
        self.block_size = os.statvfs(folder).f_frsize


def bare_write(shared: Shared, index: int, n: int, key: str) -> None:
    """Write, fsync, rename, fsync the folder (each thread its own temporary file)."""
    temporary = os.path.join(shared.folder, f".tmp-{index}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, b"v%d" % n)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temporary, os.path.join(shared.folder, key))
    os.fsync(shared.folder_fd)


def kvserver_write(shared: Shared, index: int, n: int, key: str) -> None:
    """The system calls of kvserver's /set, with fsync or without (see above)."""
    temporary, durable = shared.spares.take() or (os.path.join(shared.tmp, str(next(shared.names))), False)
    value = b"v%d" % n
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        info = os.fstat(fd)  # kvserver checks a spare's links and size, a new file's not
        old_size = info.st_size
        if old_size and not shared.fsync:
            old_size = kvserver._clear_spare(fd, info, durable, shared.block_size)
        os.write(fd, value)
        if len(value) < old_size:
            os.ftruncate(fd, len(value))
        stamp = time.time_ns()
        os.utime(fd, ns=(stamp, stamp))
        if shared.fsync:
            os.fsync(fd)
        else:
            os.posix_fadvise(fd, 0, len(value), os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    with shared.locks[hash(key) % len(shared.locks)]:
        try:
            kvserver._exchange(temporary, os.path.join(shared.folder, key))
            spare = temporary
        except FileNotFoundError:  # the key's first write
            os.replace(temporary, os.path.join(shared.folder, key))
            spare = None
        ticket = shared.synced.ticket()
    shared.synced.wait(ticket)
    if spare is not None:
        shared.spares.keep(spare)


Write = Callable[[Shared, int, int, str], None]


def worker(write: Write, shared: Shared, index: int, args: argparse.Namespace, deadline: float) -> list[float]:
    """Write until the deadline (or --max-ops); the seconds each write took."""
    latencies = []
    for n in range(args.max_ops):
        started = time.perf_counter()
        if started >= deadline:
            break
        write(shared, index, n, f"k{(n * args.threads + index) % args.keys}")
        latencies.append(time.perf_counter() - started)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir")
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--keys", type=int, default=1000, help="distinct files, shared by the threads")
    parser.add_argument("--max-ops", type=int, default=10_000_000, help="per thread")
    parser.add_argument("--like-kvserver", action="store_true", help="the system calls kvserver makes (see above)")
    parser.add_argument("--no-fsync", action="store_true", help="with --like-kvserver: those of kvserver --no-fsync")
    args = parser.parse_args()
    if args.no_fsync and not args.like_kvserver:
        parser.error("--no-fsync goes with --like-kvserver")
    os.makedirs(os.path.join(args.dir, ".kvserver", "tmp"), exist_ok=True)
    write = kvserver_write if args.like_kvserver else bare_write
    shared = Shared(args.dir, not args.no_fsync)
    latencies: list[list[float]] = [[] for _ in range(args.threads)]

    def run(index: int) -> None:
        latencies[index] = worker(write, shared, index, args, deadline)

    started = time.perf_counter()
    deadline = started + args.seconds
    threads = [threading.Thread(target=run, args=(index,)) for index in range(args.threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    every = sorted(latency for thread_latencies in latencies for latency in thread_latencies)
    ops = len(every)

    def percentile(p: float) -> float:
        return every[min(ops - 1, int(ops * p / 100))] * 1000 if ops else float("nan")

    result = {"ops": ops, "seconds": seconds, "ops_per_s": ops / seconds, "p50_ms": percentile(50)}
    result["p99_ms"] = percentile(99)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
