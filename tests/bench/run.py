"""kvserver's benchmark: kvserver beside its ceiling and two alternatives, on 127.0.0.1 only.

Usage (from the repository root):
  python tests/bench/run.py            # the full run, a few minutes
  python tests/bench/run.py --smoke    # a second per scenario, small sizes: for CI
  python tests/bench/run.py --only get,set --duration 10 --rounds 5

Load comes from wrk (the Debian package); servers of one scenario take turns, round after
round (A B C A B C ...), so that noise on the machine hits them alike, and the report gives
medians and ratios. The Markdown report goes to stdout, progress to stderr. The exit status
is 1 if kvserver failed to start, answered a non-2xx status or lost data; never for speed.
See README.md beside this file for what each scenario means.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import select
import selectors
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
KVSERVER = ROOT / "kvserver.py"
PEERS = HERE / "peers"
PYTHON = sys.executable
MiB = 1024 * 1024
T = TypeVar("T")
START_TIMEOUT = 60.0  # seconds for a server to print its start line (100,000 keys on a loaded machine)
STOP_TIMEOUT = 15.0
SCENARIO_GROUPS = ("get", "set", "rest", "events", "startup", "big")
STREAMS = 100  # open event streams in the events group
NO_FSYNC_BEFORE = 2_261  # req/s of GET /set --no-fsync in the run before the write path was reworked
# Where each process runs. kvserver keeps its threads on one CPU, the one it starts on: it is
# started on the first CPU the benchmark may use. The load (wrk, and the benchmark's own clients:
# the event streams' reader, the probe, the big PUT and GET) stands for clients on other
# machines, so it runs on the other CPUs, where it does not take kvserver's. The other servers
# and the reference loops may use every CPU. (With one CPU, everything shares it.)
ALL_CPUS = frozenset(os.sched_getaffinity(0))
KVSERVER_CPUS = frozenset({min(ALL_CPUS)})
CLIENT_CPUS = ALL_CPUS - KVSERVER_CPUS or ALL_CPUS
PROBE_INTERVAL = 0.6  # seconds between the writes that time write-to-event; longer than kvserver's COALESCE

# The Lua every wrk run loads: done() prints one parseable line with the counts and percentiles
# (latencies in microseconds). wrk counts a response with status >= 400 as a status error.
LUA_DONE = """
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH {\\"requests\\": %d, \\"duration_us\\": %d, \\"bytes\\": %d, \\"connect\\": %d, \\"read\\": %d, "
    .. "\\"write\\": %d, \\"status\\": %d, \\"timeout\\": %d, \\"p50_us\\": %d, \\"p99_us\\": %d, "
    .. "\\"max_us\\": %d}\\n",
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""

# /set with 1,000 keys in turn and a new value each time, so that writes do not queue on one key's lock.
LUA_SET = """
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", "/set?k" .. (n % 1000) .. "=v" .. n)
end
"""

# PUT /kv/put-<i> of a value of `size` random bytes (binary, so no metadata file is needed
# for small values), over `keys` keys in turn; the requests are built once, in init().
LUA_PUT = """
local requests = {}
local n = 0
init = function(args)
  local size, keys = tonumber(args[1]), tonumber(args[2])
  local block = {}
  for i = 1, 4096 do block[i] = string.char(math.random(128, 255)) end
  local body = string.rep(table.concat(block), size / 4096)
  for i = 1, keys do
    requests[i] = wrk.format("PUT", "/kv/put-" .. i, {["Content-Type"] = "application/octet-stream"}, body)
  end
end
request = function()
  n = n % #requests + 1
  return requests[n]
end
"""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# Servers


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Spec:
    """How to start one server: its name in the report, its command line, and whether it
    prints a start line with its URL (otherwise it is given `port` and polled)."""

    name: str
    argv: list[str]
    port: int | None = None
    cpus: frozenset[int] = ALL_CPUS  # where it is started


def kvserver(data_dir: Path, fsync: bool = True, name: str = "kvserver") -> Spec:
    argv = [PYTHON, str(KVSERVER), "--port", "0", "--data-dir", str(data_dir), "-q"]
    return Spec(name, argv + ([] if fsync else ["--no-fsync"]), cpus=KVSERVER_CPUS)


@contextlib.contextmanager
def on_cpus(cpus: frozenset[int]) -> Iterator[None]:
    """Run the calling thread, and the processes it starts meanwhile, on `cpus` (see ALL_CPUS)."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def ceiling() -> Spec:
    port = free_port()
    return Spec("ceiling", [PYTHON, str(PEERS / "ceiling.py"), str(port)], port)


def flask_waitress(data_dir: Path, fsync: bool = False) -> Spec:
    argv = [PYTHON, str(PEERS / "flask_waitress.py"), "--port", "0", "--data-dir", str(data_dir)]
    return Spec("flask+waitress", argv + (["--fsync"] if fsync else []))


def naive(data_dir: Path, fsync: bool = False) -> Spec:
    argv = [PYTHON, str(PEERS / "naive.py"), "--port", "0", "--data-dir", str(data_dir)]
    return Spec("naive", argv + (["--fsync"] if fsync else []))


def flask_available() -> bool:
    return all(importlib.util.find_spec(module) for module in ("flask", "waitress"))


class Server:
    """A server process, started on construction and stopped (by its PID) by stop()."""

    def __init__(self, spec: Spec, logs: Path) -> None:
        self.spec = spec
        self.name = spec.name
        logs.mkdir(exist_ok=True)
        safe_name = re.sub(r"[^\w.-]", "_", spec.name)
        self.log_path = logs / f"{safe_name}-{time.monotonic_ns()}.log"
        self.started = time.perf_counter()
        with open(self.log_path, "wb") as stderr, on_cpus(spec.cpus):
            self.process = subprocess.Popen(spec.argv, stdout=subprocess.PIPE, stderr=stderr, cwd=ROOT)
        try:
            if spec.port is None:
                self.start_line = self._read_line(START_TIMEOUT)
                match = re.search(r"http://127\.0\.0\.1:(\d+)/", self.start_line)
                if match is None:
                    raise RuntimeError(f"{self.name} printed no URL: {self.start_line!r}")
                self.port = int(match.group(1))
            else:
                self.start_line = ""
                self.port = spec.port
                self._await_listening(START_TIMEOUT)
            self.start_seconds = time.perf_counter() - self.started
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _fail(self, why: str) -> RuntimeError:
        tail = self.log_path.read_text(errors="replace")[-2000:]
        return RuntimeError(f"{self.name} ({shlex.join(self.spec.argv)}) {why}; its stderr ends:\n{tail}")

    def _read_line(self, timeout: float) -> str:
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + timeout
        data = b""
        while b"\n" not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._fail(f"printed no start line in {timeout:.0f} s")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise self._fail(f"exited with status {self.process.wait()} before its start line")
                data += chunk
        return data.decode(errors="replace").splitlines()[0]

    def _await_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise self._fail(f"exited with status {self.process.returncode}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            time.sleep(0.01)
        raise self._fail(f"did not listen within {timeout:.0f} s")

    def status_bytes(self, field_name: str) -> int:
        """A size from /proc/<pid>/status (VmRSS, VmHWM), in bytes."""
        text = Path(f"/proc/{self.pid}/status").read_text()
        match = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.MULTILINE)
        if match is None:
            raise RuntimeError(f"no {field_name} in /proc/{self.pid}/status")
        return int(match.group(1)) * 1024

    def reset_peak(self) -> bool:
        """Reset VmHWM to the current RSS (Linux 4.0+); False if the kernel refuses."""
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
        if self.process.stdout is not None:
            self.process.stdout.close()


@contextlib.contextmanager
def running(specs: list[Spec], logs: Path) -> Iterator[list[Server]]:
    """Start every server of a scenario group; stop them all, whatever happens."""
    servers: list[Server] = []
    try:
        for spec in specs:
            servers.append(Server(spec, logs))
        yield servers
    finally:
        for server in servers:
            server.stop()


def request(
    url: str, method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split("/", 1)[0].split(":")
    path = "/" + url.removeprefix("http://").split("/", 1)[1] if url.count("/") > 2 else "/"
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


# wrk


@dataclass
class Run:
    """One wrk run (or one fsync-loop run): its rates, percentiles and errors."""

    rps: float
    p50_ms: float
    p99_ms: float
    non2xx: int = 0
    socket_errors: int = 0
    bytes_per_s: float = 0.0
    cpu_us: float = float("nan")  # the server's CPU time (user + system) per request, when measured


def wrk(url: str, connections: int, config: Config, script: Path, *script_args: str) -> Run:
    threads = min(config.wrk_threads, connections)
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{config.duration}s", "--timeout", "2s"]
    argv += ["-s", str(script), url]
    if script_args:
        argv += ["--", *script_args]
    with on_cpus(CLIENT_CPUS):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=config.duration + 120, check=False)
    line = next((line for line in done.stdout.splitlines() if line.startswith("BENCH ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"{shlex.join(argv)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    result = json.loads(line.removeprefix("BENCH "))
    seconds = result["duration_us"] / 1e6
    return Run(
        rps=result["requests"] / seconds,
        p50_ms=result["p50_us"] / 1000,
        p99_ms=result["p99_us"] / 1000,
        non2xx=result["status"],
        socket_errors=result["connect"] + result["read"] + result["write"] + result["timeout"],
        bytes_per_s=result["bytes"] / seconds,
    )


def cpu_seconds(pid: int) -> float:
    """The user + system CPU time a process has used, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk_with_cpu(server: Server, path: str, connections: int, config: Config, script: Path) -> Run:
    """A wrk run, with the server's CPU time per request measured around it."""
    before = cpu_seconds(server.pid)
    run = wrk(server.url + path, connections, config, script)
    requests = run.rps * config.duration
    return dataclasses.replace(run, cpu_us=(cpu_seconds(server.pid) - before) * 1e6 / max(requests, 1))


def fsync_loop(folder: Path, config: Config, like_kvserver: bool = False, fsync: bool = True) -> Run:
    """A run of fsync_loop.py: the bare loop, or with `like_kvserver` the system calls kvserver
    makes for a /set (those of --no-fsync without `fsync`)."""
    argv = [PYTHON, str(HERE / "fsync_loop.py"), str(folder), "--threads", "16", "--seconds", str(config.duration)]
    argv += ["--like-kvserver"] if like_kvserver else []
    argv += [] if fsync else ["--no-fsync"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=config.duration + 120, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return Run(rps=result["ops_per_s"], p50_ms=result["p50_ms"], p99_ms=result["p99_ms"])


# Results and the report


@dataclass
class Row:
    """The runs of one server in one scenario."""

    scenario: str
    server: str
    runs: list[Run] = field(default_factory=list)
    note: str = ""
    payload: int = 0  # bytes each request sends (PUT), for MiB/s; else MiB/s is what came back

    def median(self, attribute: str) -> float:
        values = [getattr(run, attribute) for run in self.runs]
        return statistics.median(values) if values else float("nan")

    @property
    def rps(self) -> float:
        return self.median("rps")

    @property
    def errors(self) -> tuple[int, int]:
        return sum(run.non2xx for run in self.runs), sum(run.socket_errors for run in self.runs)


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(cell).ljust(width) for cell, width in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def number(value: float, digits: int = 0) -> str:
    return "n/a" if value != value else f"{value:,.{digits}f}"


def ratio(a: float, b: float) -> float:
    return a / b if b and a == a and b == b else float("nan")


def times(value: float) -> str:
    return "n/a" if value != value else f"{value:.2f}×"


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


class Report:
    def __init__(self) -> None:
        self.targets: list[tuple[str, str, bool | None]] = []
        self.problems: list[str] = []

    def out(self, text: str = "") -> None:
        print(text, flush=True)

    def target(self, what: str, measured: str, passed: bool | None) -> None:
        self.targets.append((what, measured, passed))

    def load_table(self, rows: list[Row], reference: str = "kvserver", megabytes: bool = False) -> None:
        """A scenario group's table: one line per scenario and server, with kvserver's rate
        divided by each server's (how many times faster kvserver is)."""
        headers = ["scenario", "server", "req/s", "kvserver ÷ it", "p50 ms", "p99 ms", "non-2xx", "socket err"]
        headers += ["MiB/s"] if megabytes else []
        headers += ["req/s per round"]
        lines = []
        for row in rows:
            base = next((r for r in rows if r.scenario == row.scenario and r.server == reference), None)
            non2xx, socket_errors = row.errors
            cells = [row.scenario, row.server + (f" ({row.note})" if row.note else "")]
            if not row.runs:
                lines.append([*cells, "not run", "", "", "", "", ""] + ([""] if megabytes else []) + [""])
                continue
            cells += [number(row.rps), times(ratio(base.rps, row.rps)) if base else ""]
            cells += [number(row.median("p50_ms"), 3), number(row.median("p99_ms"), 3), str(non2xx), str(socket_errors)]
            sent = row.rps * row.payload if row.payload else row.median("bytes_per_s")
            cells += [number(sent / MiB, 1)] if megabytes else []
            cells += [" ".join(number(run.rps) for run in row.runs)]
            lines.append(cells)
        self.out(table(headers, lines))
        self.out()
        self.out(
            "non-2xx: responses wrk counts as errors (status ≥ 400; each server's answer was checked before the load)."
            " socket err: wrk's connect, read, write and timeout (2 s) errors."
        )
        self.out()


@dataclass
class Config:
    smoke: bool
    duration: int
    rounds: int
    keys: int
    key_bytes: int
    value_size: int
    big: int
    startup_runs: int
    wrk_threads: int
    only: tuple[str, ...]
    work: Path = Path()

    @property
    def logs(self) -> Path:
        return self.work / "logs"


def in_turn(items: list[T], round_number: int) -> list[T]:
    """`items` in the order of round `round_number` (from 0): A B C, B C A, C A B... so that no
    item always follows the same one (a run can leave the machine slower for the next, as the
    files a run of writes frees do on ext4)."""
    turn = round_number % len(items)
    return items[turn:] + items[:turn]


def alternate(config: Config, rows: list[Row], measure: Callable[[Row], Run]) -> None:
    """Round after round, one run of each row, in a new order each round (see in_turn)."""
    for round_number in range(config.rounds):
        for row in in_turn(rows, round_number):
            if row.note == "not installed":
                continue
            log(f"  round {round_number + 1}/{config.rounds}: {row.scenario}, {row.server}")
            row.runs.append(measure(row))


def check_kvserver(report: Report, rows: list[Row]) -> None:
    for row in rows:
        if row.server.startswith("kvserver") and row.errors[0]:
            report.problems.append(f"{row.scenario}: kvserver answered {row.errors[0]} requests with status >= 400")


def probe(report: Report, server: Server, path: str, expected: bytes | None, statuses: tuple[int, ...]) -> None:
    """One request before the load, so that a server answering errors is noticed, not measured."""
    status, body = request(server.url + path)
    if status not in statuses or (expected is not None and body != expected):
        report.problems.append(f"{server.name}: GET {path} answered {status} {body[:200]!r}")


# Scenario groups


def peer_specs(config: Config, folder: str, fsync: bool) -> list[Spec]:
    specs = [ceiling()]
    if flask_available():
        specs.append(flask_waitress(config.work / folder / "flask", fsync))
    specs.append(naive(config.work / folder / "naive", fsync))
    return specs


def peer_rows(scenario: str, servers: list[str]) -> list[Row]:
    rows = [Row(scenario, name) for name in servers]
    if not flask_available():
        rows.insert(2, Row(scenario, "flask+waitress", note="not installed"))
    return rows


def scenario_get(config: Config, report: Report, scripts: dict[str, Path]) -> None:
    report.out("## GET /get: a 5-byte value, keep-alive connections")
    report.out()
    specs = [kvserver(config.work / "get" / "kvserver"), *peer_specs(config, "get", fsync=False)]
    rows: list[Row] = []
    with running(specs, config.logs) as servers:
        by_name = {server.name: server for server in servers}
        for server in servers:
            if server.name != "ceiling":
                request(server.url + "/set?bench=hello")
            probe(report, server, "/get?key=bench", b"hello", (200,))
        if not config.smoke:
            for server in servers:  # warm-up
                wrk(server.url + "/get?key=bench", 16, dataclasses.replace(config, duration=1), scripts["get"])
        for connections in (1, 16, 64):
            group = peer_rows(f"{connections} conn", [server.name for server in servers])
            alternate(
                config,
                group,
                lambda row, c=connections: wrk_with_cpu(
                    by_name[row.server], "/get?key=bench", c, config, scripts["get"]
                ),
            )
            rows += group
    check_kvserver(report, rows)
    report.load_table(rows)
    c16 = {row.server: row for row in rows if row.scenario == "16 conn"}
    c1 = next(row for row in rows if row.scenario == "1 conn" and row.server == "kvserver")
    kv = c16["kvserver"]
    ceiling = c16["ceiling"]
    r = ratio(kv.rps, ceiling.rps)
    report.target("GET /get, 16 conn: ≥ 1.0× the ceiling", times(r), r >= 1.0)
    cpu, ceiling_cpu = kv.median("cpu_us"), ceiling.median("cpu_us")
    report.target(
        "GET /get, 16 conn: server CPU per request ≤ the ceiling's",
        f"{cpu:.1f} µs (ceiling {ceiling_cpu:.1f} µs)",
        cpu <= ceiling_cpu,
    )
    r = ratio(kv.rps, c16["flask+waitress"].rps)
    report.target("GET /get, 16 conn: ≥ 4× flask+waitress", times(r), r >= 4 if r == r else None)
    p99, ceiling_p99 = kv.median("p99_ms"), ceiling.median("p99_ms")
    report.target(
        "GET /get, 16 conn: p99 ≤ 2× the ceiling's",
        f"{p99:.3f} ms (ceiling {ceiling_p99:.3f} ms)",
        p99 <= 2 * ceiling_p99,
    )
    p50 = c1.median("p50_ms")
    report.target("GET /get, 1 conn: p50 < 0.2 ms", f"{p50:.3f} ms", p50 < 0.2)


def scenario_set(config: Config, report: Report, scripts: dict[str, Path]) -> None:
    for fsync in (True, False):
        mode = "fsync" if fsync else "--no-fsync"
        title = "with fsync (peers fsync the file only)" if fsync else "with --no-fsync (peers do not fsync)"
        report.out(f"## GET /set, 16 connections, {title}")
        report.out()
        folder = "set-fsync" if fsync else "set-nofsync"
        specs = [kvserver(config.work / folder / "kvserver", fsync), *peer_specs(config, folder, fsync)]
        with running(specs, config.logs) as servers:
            by_name = {server.name: server for server in servers}
            for server in servers:
                probe(report, server, "/set?probe=1", None, (200, 201))
            rows = peer_rows(f"16 conn, {mode}", [server.name for server in servers])
            if fsync:
                rows.append(Row(rows[0].scenario, "bare fsync loop", note="16 threads"))
            rows.append(Row(rows[0].scenario, "kvserver's system calls", note="16 threads, no HTTP"))
            loop_folder = config.work / folder / "loop"

            def measure(
                row: Row, by_name: dict[str, Server] = by_name, loop_folder: Path = loop_folder, fsync: bool = fsync
            ) -> Run:
                if row.server == "bare fsync loop":
                    return fsync_loop(loop_folder, config)
                if row.server == "kvserver's system calls":
                    return fsync_loop(loop_folder.with_name("loop-like-kvserver"), config, True, fsync)
                return wrk(by_name[row.server].url + "/", 16, config, scripts["set"])

            alternate(config, rows, measure)
        check_kvserver(report, rows)
        report.load_table(rows)
        named = {row.server: row for row in rows}
        if fsync:
            r = ratio(named["kvserver"].rps, named["bare fsync loop"].rps)
            report.target("GET /set, 16 conn, fsync: ≥ 0.8× the bare fsync loop", times(r), r >= 0.8)
        else:
            r = ratio(named["kvserver"].rps, named["ceiling"].rps)
            report.target("GET /set, 16 conn, --no-fsync: ≥ 0.8× the ceiling", times(r), r >= 0.8)
            r = ratio(named["kvserver"].rps, NO_FSYNC_BEFORE)
            report.target(
                f"GET /set, 16 conn, --no-fsync: ≥ 2× the {NO_FSYNC_BEFORE:,} req/s before the write-path work",
                f"{named['kvserver'].rps:,.0f} req/s ({times(r)})",
                r >= 2,
            )


def scenario_rest(config: Config, report: Report, scripts: dict[str, Path]) -> None:
    report.out("## REST PUT and GET /kv/<key>, 16 connections (kvserver only; the ceiling's body is 5 bytes)")
    report.out()
    specs = [
        kvserver(config.work / "rest" / "fsync", True, "kvserver"),
        kvserver(config.work / "rest" / "nofsync", False, "kvserver --no-fsync"),
        ceiling(),
    ]
    rows: list[Row] = []
    with running(specs, config.logs) as servers:
        by_name = {server.name: server for server in servers}
        kv = by_name["kvserver"]
        for size, label in ((4096, "4 KiB"), (MiB, "1 MiB")):
            value = os.urandom(size)
            status, body = request(
                f"{kv.url}/kv/get-{size}", "PUT", value, {"Content-Type": "application/octet-stream"}
            )
            if status not in (200, 201):
                report.problems.append(f"kvserver: PUT /kv/get-{size} answered {status} {body[:200]!r}")
            if request(f"{kv.url}/kv/get-{size}") != (200, value):
                report.problems.append(f"kvserver: GET /kv/get-{size} did not give back the value PUT")
            keys = "64" if size == 4096 else "16"
            put = [Row(f"PUT {label}", name, payload=size) for name in ("kvserver", "kvserver --no-fsync")]
            alternate(
                config,
                put,
                lambda row, a=(str(size), keys): wrk(by_name[row.server].url + "/", 16, config, scripts["put"], *a),
            )
            get = [Row(f"GET {label}", "kvserver")] + ([Row(f"GET {label}", "ceiling")] if size == 4096 else [])
            alternate(
                config,
                get,
                lambda row, path=f"/kv/get-{size}": wrk(by_name[row.server].url + path, 16, config, scripts["get"]),
            )
            rows += put + get
    check_kvserver(report, rows)
    report.load_table(rows, megabytes=True)


class EventStreams:
    """`count` open GET /events streams, read and dropped by one thread (as fast as it can,
    into one reused buffer: the streams stand for clients on other machines, so their reader
    should take as little as it can of the cores the server runs on)."""

    def __init__(self, url: str, count: int) -> None:
        self.sockets = [open_event_stream(url, "/events") for _ in range(count)]
        self.received = 0
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        buffer = bytearray(256 * 1024)
        with selectors.DefaultSelector() as selector, on_cpus(CLIENT_CPUS):
            for sock in self.sockets:
                selector.register(sock, selectors.EVENT_READ)
            while not self._stop:
                for key, _ in selector.select(0.1):
                    with contextlib.suppress(OSError):
                        self.received += key.fileobj.recv_into(buffer)  # type: ignore[union-attr]

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        for sock in self.sockets:
            sock.close()


def open_event_stream(url: str, path: str) -> socket.socket:
    """A socket on which GET `path` has been answered with its head (the events follow)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError(f"GET {path} closed before its head: {head!r}")
        head += chunk
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"GET {path} answered {head[:200]!r}")
    return sock


def event_latencies(url: str, seconds: float) -> list[float]:
    """For `seconds`: write a key under probe/ (every PROBE_INTERVAL) and time until the event
    for it arrives on a stream of probe/ keys: the milliseconds from write to event, one per write."""
    with on_cpus(CLIENT_CPUS):
        stream = open_event_stream(url, "/events?prefix=probe%2F")
        host, port = url.removeprefix("http://").split(":")
        writer = http.client.HTTPConnection(host, int(port), timeout=30)
        latencies = []
        buffered = b""
        try:
            deadline = time.monotonic() + seconds
            n = 0
            while time.monotonic() < deadline:
                n += 1
                marker = f'"key": "probe/{n}"'.encode()
                started = time.perf_counter()
                writer.request("GET", f"/set?probe%2F{n}=v")
                writer.getresponse().read()
                while marker not in buffered:
                    chunk = stream.recv(65536)
                    if not chunk:
                        raise RuntimeError("the probe's event stream ended")
                    buffered += chunk
                latencies.append((time.perf_counter() - started) * 1000)
                buffered = buffered[buffered.index(marker) :]
                time.sleep(PROBE_INTERVAL)
        finally:
            writer.close()
            stream.close()
        return latencies


def scenario_events(config: Config, report: Report, scripts: dict[str, Path]) -> None:
    report.out(f"## Event streams: GET /set, 16 connections, --no-fsync, with and without {STREAMS} open streams")
    report.out()
    rows = [Row("16 conn, --no-fsync", "kvserver"), Row("16 conn, --no-fsync", f"kvserver, {STREAMS} streams")]
    latencies: list[float] = []
    with running([kvserver(config.work / "events" / "kvserver", fsync=False)], config.logs) as [server]:
        probe(report, server, "/set?probe=1", None, (200, 201))

        def measure(row: Row) -> Run:
            if row.server == "kvserver":
                return wrk(server.url + "/", 16, config, scripts["set"])
            streams = EventStreams(server.url, STREAMS)
            probing = threading.Thread(target=lambda: latencies.extend(event_latencies(server.url, config.duration)))
            try:
                probing.start()
                run = wrk(server.url + "/", 16, config, scripts["set"])
                probing.join()
            finally:
                streams.close()
            if not streams.received:
                report.problems.append(f"kvserver: {STREAMS} event streams received nothing")
            return run

        alternate(config, rows, measure)
    check_kvserver(report, rows)
    report.load_table(rows)
    if latencies:
        quantiles = statistics.quantiles(latencies, n=100, method="inclusive")
        report.out(
            f"Write to event (a /set of a probe/ key every {PROBE_INTERVAL * 1000:.0f} ms on its own connection, to its"
            " event on a stream"
            f" of probe/ keys, during the {STREAMS}-stream runs): p50 {quantiles[49]:.3f} ms, p99 {quantiles[98]:.3f}"
            f" ms, over {len(latencies)} writes."
        )
        report.out()
    else:
        report.problems.append("the write-to-event probe measured nothing")
    r = ratio(rows[1].rps, rows[0].rps)
    report.target(f"GET /set, 16 conn, --no-fsync, {STREAMS} open streams: ≥ 0.9× without", times(r), r >= 0.9)


def generate_keys(folder: Path, count: int, key_bytes: int, value_size: int) -> int:
    """Write `count` small values straight into a data dir; return their raw bytes (keys + values)."""
    folder.mkdir(parents=True)
    raw = 0
    for i in range(count):
        key = f"key-{i:0{key_bytes - 4}d}"
        value = (f"value {i} " * (value_size // 8 + 1)).encode()[:value_size]
        (folder / key).write_bytes(value)
        raw += len(key.encode()) + len(value)
    return raw


def scenario_startup(config: Config, report: Report) -> None:
    report.out(
        f"## Start-up and RSS with {config.keys:,} keys of {config.key_bytes} bytes and values of "
        f"{config.value_size} bytes, written straight into the data dir"
    )
    report.out()
    log(f"  writing {config.keys:,} files")
    loaded_dir = config.work / "startup" / "loaded"
    raw = generate_keys(loaded_dir, config.keys, config.key_bytes, config.value_size)
    empty_dir = config.work / "startup" / "empty"
    specs = {
        "kvserver, empty data dir": lambda: kvserver(empty_dir),
        "kvserver": lambda: kvserver(loaded_dir),
        "naive": lambda: naive(loaded_dir),
    }
    measured: dict[str, list[tuple[float, int, float | None]]] = {name: [] for name in specs}
    for round_number in range(config.startup_runs):
        for name, make in specs.items():
            log(f"  start-up {round_number + 1}/{config.startup_runs}: {name}")
            with running([make()], config.logs) as [server]:
                rss = server.status_bytes("VmRSS")
                loaded = re.search(r"loaded in ([\d.]+) s", server.start_line)
                own = float(loaded.group(1)) if loaded else None
                measured[name].append((server.start_seconds, rss, own))
                if name == "kvserver" and f" {config.keys} keys loaded" not in server.start_line:
                    report.problems.append(f"kvserver did not load {config.keys} keys: {server.start_line!r}")
    lines = []
    for name, results in measured.items():
        seconds = statistics.median(result[0] for result in results)
        rss = statistics.median(result[1] for result in results)
        owns = [result[2] for result in results if result[2] is not None]
        lines.append(
            [
                name,
                f"{seconds:.3f}",
                f"{statistics.median(owns):.3f}" if owns else "",
                " ".join(f"{result[0]:.3f}" for result in results),
                f"{rss / MiB:.1f}",
                "" if "empty" in name else f"{rss / raw:.1f}×",
            ]
        )
    report.out(f"Raw bytes of the keys and values: {raw / MiB:.1f} MiB ({raw:,} bytes).")
    report.out()
    headers = ["server", "start-up s (median)", "own load report s", "start-up s per run", "RSS MiB", "RSS ÷ raw"]
    report.out(table(headers, lines))
    report.out()
    empty_rss = statistics.median(result[1] for result in measured["kvserver, empty data dir"])
    kv_rss = statistics.median(result[1] for result in measured["kvserver"])
    report.out(f"kvserver's memory per key: {(kv_rss - empty_rss) / config.keys:.0f} bytes above the empty server.")
    report.out()
    seconds = statistics.median(result[0] for result in measured["kvserver"])
    report.target(f"start-up with {config.keys:,} keys < 1.5 s", f"{seconds:.3f} s", seconds < 1.5)
    limit = 3 * raw + 30e6
    report.target(
        f"RSS with {config.keys:,} keys < 3× raw + 30 MB (= {limit / 1e6:.1f} MB)",
        f"{kv_rss / 1e6:.1f} MB",
        kv_rss < limit,
    )


def timed(action: Callable[[], object]) -> float:
    os.sync()  # the dirty pages of the step before are not this step's to write
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def copy_and_sync(source: Path, target: Path) -> None:
    subprocess.run(["cp", str(source), str(target)], check=True)
    subprocess.run(["sync", str(target)], check=True)


def put_file(server: Server, source: Path, size: int) -> None:
    """PUT a file with sendfile(2), so that the client costs next to nothing."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=120) as connection, open(source, "rb") as file:
        head = (
            f"PUT /kv/big HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {size}\r\nConnection: close\r\n\r\n"
        )
        connection.sendall(head.encode())
        connection.sendfile(file)
        response = http.client.HTTPResponse(connection)
        response.begin()
        body = response.read()
        if response.status not in (200, 201):
            raise RuntimeError(f"PUT /kv/big answered {response.status} {body[:200]!r}")


def get_file(server: Server, size: int) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        connection.request("GET", "/kv/big")
        response = connection.getresponse()
        buffer = bytearray(MiB)
        received = 0
        while n := response.readinto(buffer):
            received += n
        if response.status != 200 or received != size:
            raise RuntimeError(f"GET /kv/big answered {response.status} with {received} bytes, not {size}")
    finally:
        connection.close()


def scenario_big(config: Config, report: Report) -> None:
    size = config.big
    label = f"{size / MiB / 1024:g} GiB" if size >= 1024 * MiB else f"{size / MiB:g} MiB"
    report.out(f"## One {label} value: PUT then GET, beside cp of the same file on the same disk")
    report.out()
    folder = config.work / "big"
    folder.mkdir()
    source = folder / "source"
    log(f"  writing a {label} file")
    block = os.urandom(MiB)
    with open(source, "wb") as file:
        for _ in range(size // MiB):
            file.write(block)
    copy = folder / "copy"
    kinds = ["cp", "cp + sync", "kvserver PUT", "kvserver GET", "kvserver --no-fsync PUT", "kvserver --no-fsync GET"]
    seconds: dict[str, list[float]] = {kind: [] for kind in kinds}
    growth: dict[str, list[int]] = {"kvserver": [], "kvserver --no-fsync": []}

    def copies() -> None:
        seconds["cp"].append(timed(lambda: subprocess.run(["cp", str(source), str(copy)], check=True)))
        copy.unlink()
        seconds["cp + sync"].append(timed(lambda: copy_and_sync(source, copy)))
        copy.unlink()

    def kvserver_put_get(name: str, fsync: bool) -> None:
        data_dir = folder / "data"
        with running([kvserver(data_dir, fsync, name)], config.logs) as [server]:
            before = server.status_bytes("VmRSS")
            exact = server.reset_peak()
            with on_cpus(CLIENT_CPUS):
                seconds[f"{name} PUT"].append(timed(lambda: put_file(server, source, size)))
                seconds[f"{name} GET"].append(timed(lambda: get_file(server, size)))
            peak = server.status_bytes("VmHWM")
            growth[name].append(peak - before)
            if not exact:
                report.problems.append("could not reset VmHWM: the RSS growth includes start-up's peak")
        shutil.rmtree(data_dir)

    # Taking turns in a new order each round: on a virtual machine, how fast a GiB is written
    # depends on what the step before freed (memory handed back to the host costs a fault per
    # page when it is written again), so no step keeps the same place.
    steps: list[tuple[str, Callable[[], None]]] = [
        ("cp, cp + sync", copies),
        ("kvserver PUT, GET", lambda: kvserver_put_get("kvserver", True)),
        ("kvserver --no-fsync PUT, GET", lambda: kvserver_put_get("kvserver --no-fsync", False)),
    ]
    for round_number in range(config.rounds):
        for what, step in in_turn(steps, round_number):
            log(f"  round {round_number + 1}/{config.rounds}: {what}")
            step()
    lines = []
    cp = statistics.median(seconds["cp"])
    cp_sync = statistics.median(seconds["cp + sync"])
    rates: dict[str, float] = {}
    for kind in kinds:
        median = statistics.median(seconds[kind])
        rates[kind] = size / median / MiB
        reference = cp_sync if kind == "kvserver PUT" else cp
        owner = kind.rsplit(" ", 1)[0]
        lines.append(
            [
                kind,
                f"{median:.2f}",
                f"{rates[kind]:.0f}",
                ""
                if kind.startswith("cp")
                else times(reference / median) + (" of cp + sync" if kind == "kvserver PUT" else " of cp"),
                f"{statistics.median(growth[owner]) / MiB:.1f}" if kind.endswith("GET") else "",
                " ".join(f"{s:.2f}" for s in seconds[kind]),
            ]
        )
    headers = [
        "what",
        "seconds (median)",
        "MiB/s",
        "throughput ÷ reference",
        "RSS growth MiB (PUT+GET)",
        "seconds per round",
    ]
    report.out(table(headers, lines))
    report.out()
    worst_growth = max(statistics.median(values) for values in growth.values())
    report.target(f"{label} PUT+GET: RSS grows < 32 MiB", f"{worst_growth / MiB:.1f} MiB", worst_growth < 32 * MiB)
    for kind, reference, name in (
        ("kvserver PUT", cp_sync, "cp + sync"),
        ("kvserver --no-fsync PUT", cp, "cp"),
        ("kvserver GET", cp, "cp"),
    ):
        r = reference / statistics.median(seconds[kind])
        report.target(f"{label} {kind}: ≥ 0.5× {name}", times(r), r >= 0.5)


# Main


def machine(config: Config) -> list[str]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    work = str(config.work)
    mount = max((m for m in mounts if work == m[1] or work.startswith(m[1].rstrip("/") + "/")), key=lambda m: len(m[1]))
    versions = []
    for package in ("flask", "waitress"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package} not installed")
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False).stdout.split("[")[0]
    return [
        f"- CPU: {model.group(1) if model else platform.processor()}, {os.cpu_count()} cores "
        f"({len(os.sched_getaffinity(0))} usable)",
        f"- Python {platform.python_version()} ({platform.python_implementation()}), kernel {platform.release()}",
        f"- {wrk_version.strip()}; {', '.join(versions)}",
        f"- Work dir: {work} on {mount[0]} ({mount[2]}, mounted on {mount[1]})",
        f"- CPUs: kvserver started on {cpu_list(KVSERVER_CPUS)}; wrk and the benchmark's own clients on"
        f" {cpu_list(CLIENT_CPUS)}; the other servers and the reference loops on {cpu_list(ALL_CPUS)}",
    ]


def cpu_list(cpus: frozenset[int]) -> str:
    return ("CPU " if len(cpus) == 1 else "CPUs ") + ",".join(map(str, sorted(cpus)))


def parse_args() -> Config:
    parser = argparse.ArgumentParser(description="kvserver's benchmark (see README.md beside this file)")
    parser.add_argument("--smoke", action="store_true", help="a second per scenario and small sizes, for CI")
    parser.add_argument("--duration", type=int, help="seconds per wrk run (full: 4, smoke: 1)")
    parser.add_argument("--rounds", type=int, help="runs of each server per scenario (full: 3, smoke: 1)")
    parser.add_argument("--keys", type=int, help="keys preloaded for start-up and RSS (full: 100000, smoke: 1000)")
    parser.add_argument("--value-size", type=int, default=100, help="bytes per preloaded value (default 100)")
    parser.add_argument("--big", type=int, help="MiB of the big value (full: 1024, smoke: 16)")
    parser.add_argument("--startup-runs", type=int, help="start-ups of each server (full: 5, smoke: 1)")
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (default 1: one core for wrk)")
    parser.add_argument("--only", default=",".join(SCENARIO_GROUPS), help="groups: " + ",".join(SCENARIO_GROUPS))
    args = parser.parse_args()
    only = tuple(group.strip() for group in args.only.split(",") if group.strip())
    if unknown := set(only) - set(SCENARIO_GROUPS):
        parser.error(f"unknown groups {sorted(unknown)}; the groups are {','.join(SCENARIO_GROUPS)}")

    def pick(value: int | None, full: int, smoke: int) -> int:
        chosen = value if value is not None else smoke if args.smoke else full
        if chosen < 1:
            parser.error("sizes, counts and durations are at least 1")
        return chosen

    return Config(
        smoke=args.smoke,
        duration=pick(args.duration, 4, 1),
        rounds=pick(args.rounds, 3, 1),
        keys=pick(args.keys, 100_000, 1000),
        key_bytes=10,
        value_size=pick(args.value_size, 100, 100),
        big=pick(args.big, 1024, 16) * MiB,
        startup_runs=pick(args.startup_runs, 5, 1),
        wrk_threads=pick(args.wrk_threads, 1, 1),
        only=only,
    )


def main() -> int:
    config = parse_args()
    if shutil.which("wrk") is None:
        print("run.py needs wrk: apt-get install wrk", file=sys.stderr)
        return 2
    report = Report()
    started = time.perf_counter()
    load_start = load_average()
    # On the disk of the repository (not /tmp, which may be tmpfs): the data dirs, the fsync
    # loop's folder and the big files all live here, and go at the end.
    config.work = Path(tempfile.mkdtemp(prefix=".work-", dir=HERE))
    try:
        scripts = {}
        for name, lua in (("get", ""), ("set", LUA_SET), ("put", LUA_PUT)):
            scripts[name] = config.work / f"{name}.lua"
            scripts[name].write_text(lua + LUA_DONE)
        report.out(
            "# kvserver benchmark"
            + (" (smoke: tiny sizes, numbers not comparable to the targets)" if config.smoke else "")
        )
        report.out()
        report.out(f"Command: `python {shlex.join(sys.argv)}` (in {Path.cwd()})")
        report.out()
        for line in machine(config):
            report.out(line)
        report.out(f"- Load average at start: {load_start}")
        report.out(
            f"- Each wrk run: {config.duration} s, {config.wrk_threads} wrk thread(s); {config.rounds} round(s), "
            "servers alternating; medians shown. kvserver runs with -q."
        )
        report.out()
        groups: dict[str, Callable[[], None]] = {
            "get": lambda: scenario_get(config, report, scripts),
            "set": lambda: scenario_set(config, report, scripts),
            "rest": lambda: scenario_rest(config, report, scripts),
            "events": lambda: scenario_events(config, report, scripts),
            "startup": lambda: scenario_startup(config, report),
            "big": lambda: scenario_big(config, report),
        }
        for name in config.only:
            log(f"== {name}")
            groups[name]()
        report.out("## Targets")
        report.out()
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}
        report.out(table(["target", "measured", "result"], [[t, m, verdict[p]] for t, m, p in report.targets]))
        report.out()
        report.out(f"Load average at end: {load_average()}; the run took {time.perf_counter() - started:.0f} s.")
        if report.problems:
            report.out()
            report.out("## Problems")
            report.out()
            for problem in report.problems:
                report.out(f"- {problem}")
            return 1
        return 0
    finally:
        shutil.rmtree(config.work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
