"""The command line of SPEC section 1: start line, options, signals, exit codes and messages,
with `python kvserver.py` run as a subprocess."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import KVSERVER, RawConnection, Server, assert_no_traceback, wait_for

import kvserver

RUN_TIMEOUT = 10.0


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run kvserver to completion (it is expected to exit by itself) and capture its output."""
    env = {name: value for name, value in os.environ.items() if name != "KV_TOKEN"}
    return subprocess.run(
        [sys.executable, str(KVSERVER), *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        cwd=cwd,
        env=env,
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single line a failed start printed, checked to be alone and no traceback."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got {lines!r}"
    return lines[0]


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


# Start-up


def test_the_start_line_gives_version_url_storage_keys_loaded_and_time(make_server, tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for name in ["alpha", "beta", "gamma"]:
        (data_dir / name).write_bytes(name.encode())
    server = make_server("--quiet")
    line = server.start_line
    assert "0.1.0" in line
    assert re.search(r"http://127\.0\.0\.1:\d+/", line), line
    assert "files" in line
    assert re.search(r"\b3 keys?\b", line), line
    assert re.search(r"\d+(\.\d+)?\s*(s|ms|seconds?)\b", line), line
    assert server.get("/get?key=beta").body == b"beta"


def test_the_start_line_says_whether_a_token_and_tls_are_on(make_server):
    assert make_server("--quiet").start_line.rstrip().endswith("; no token, TLS off")
    line = make_server("--quiet", "--storage", "memory", "--token", "s3cret").start_line
    assert line.rstrip().endswith("; token required, TLS off"), line
    assert "s3cret" not in line


def test_the_start_line_is_printed_at_once_while_the_server_runs(make_server):
    started = time.monotonic()
    server = make_server("--quiet")  # stdout is a pipe: the line arrives only if it is flushed
    assert time.monotonic() - started < 5
    assert server.process.poll() is None
    assert server.get("/health").status == 200


def test_port_0_picks_a_free_port_and_prints_it(make_server, tmp_path):
    first = make_server("--quiet", data_dir=tmp_path / "one")
    second = make_server("--quiet", data_dir=tmp_path / "two")
    assert first.port != 0 and second.port != 0
    assert first.port != second.port
    assert f":{first.port}/" in first.start_line
    assert first.get("/set?which=one").status == 201
    assert second.get("/get?key=which").status == 404


def test_bind_takes_an_ipv6_address(make_server):
    if not has_ipv6_loopback():
        pytest.skip("this machine has no IPv6 loopback")
    server = make_server("--quiet", "--bind", "::1")
    assert "http://[::1]:" in server.start_line
    assert server.host == "::1"
    assert server.get("/set?over=ipv6").status == 201
    assert server.get("/get?key=over").body == b"ipv6"


def test_a_missing_data_dir_is_created_with_its_parents(tmp_path):
    data_dir = tmp_path / "not" / "yet" / "there"
    # Server runs in its data_dir's parent, so name an existing folder there and pass the real one.
    server = Server(["--quiet", "--data-dir", str(data_dir)], tmp_path / "cwd", tmp_path / "server.log")
    try:
        server.start()
        assert data_dir.is_dir()
        assert str(data_dir) in server.start_line
        assert server.get("/set?name=Guido").status == 201
        assert (data_dir / "name").read_bytes() == b"Guido"
        assert server.stop() == 0
    finally:
        if server.process is not None and server.process.poll() is None:
            server.process.kill()
            server.process.wait(10)


def test_a_restart_keeps_the_values_and_the_file_holds_exactly_the_value(make_server):
    server = make_server("--quiet")
    assert server.get("/set?name=Guido").status == 201
    assert server.get("/set?name=Guido").status == 200
    assert server.stop() == 0
    assert (server.data_dir / "name").read_bytes() == b"Guido"
    server.start()
    assert re.search(r"\b1 keys?\b", server.start_line), server.start_line
    response = server.get("/get?key=name")
    assert response.status == 200
    assert response.body == b"Guido"
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"


def test_no_fsync_still_stores_values(make_server):
    server = make_server("--quiet", "--no-fsync")
    assert server.get("/set?name=Guido").status == 201
    assert (server.data_dir / "name").read_bytes() == b"Guido"
    server.restart()
    assert server.get("/get?key=name").body == b"Guido"


# Threads and CPUs

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the threads' CPUs in /proc")


def cpus_of_threads(pid: int) -> tuple[int, set[str]]:
    """How many threads a process has, and the distinct lists of CPUs they may run on."""
    threads, cpu_lists = 0, set()
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread that ended meanwhile
            match = re.search(r"^Cpus_allowed_list:\s*(\S+)$", status.read_text(), re.MULTILINE)
            assert match, status
            threads, cpu_lists = threads + 1, cpu_lists | {match.group(1)}
    return threads, cpu_lists


def serve_three_connections(server: Server) -> tuple[int, str]:
    """Open three connections that each make a write (so each has its thread); while they are
    open, the server's number of threads and the CPUs they all may run on (one list for all)."""
    connections = [RawConnection(server) for _ in range(3)]
    try:
        for number, connection in enumerate(connections):
            connection.request("GET", f"/set?k{number}=v")
            assert connection.response().status == 201
        threads, cpu_lists = cpus_of_threads(server.process.pid)
        assert len(cpu_lists) == 1, f"the server's threads may run on different CPUs: {cpu_lists}"
        return threads, cpu_lists.pop()
    finally:
        for connection in connections:
            connection.close()


@linux_only
def test_every_thread_of_the_server_runs_on_one_cpu_of_those_it_may_use(make_server):
    """With a thread per connection, a system call that releases the GIL on two CPUs hands it to
    a waiting thread across them (README, Performance): the server keeps to one."""
    server = make_server("--quiet")
    threads, cpu_list = serve_three_connections(server)
    assert threads >= 4  # the main thread and the three connections' at least
    assert cpu_list.isdigit(), f"the server's threads may run on CPUs {cpu_list}, not on one"
    assert int(cpu_list) in os.sched_getaffinity(0)


@linux_only
def test_the_server_keeps_to_a_cpu_it_was_given(make_server):
    """As with `taskset -c`: the CPU is one of those the process may use."""
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        pytest.skip("one CPU: the server has no other to choose")
    given = max(allowed)  # (the kernel starts processes on the lowest CPUs first)
    os.sched_setaffinity(0, {given})  # the server inherits it from this thread
    try:
        server = make_server("--quiet")
    finally:
        os.sched_setaffinity(0, allowed)
    assert serve_three_connections(server)[1] == str(given)


@linux_only
def test_the_cpu_kept_to_is_the_one_the_thread_runs_on_and_the_cpus_come_back_after(monkeypatch):
    """So that servers the kernel started on different CPUs stay there; and main(), called by a
    test whose server cannot start, leaves the test's process as it was."""
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        pytest.skip("one CPU: no other to choose")
    running_on, real_affinity, seen = max(allowed), os.sched_getaffinity, []

    def in_a_thread() -> None:
        os.sched_setaffinity(0, {running_on})  # this thread now runs there
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(allowed))  # but it may use them all
        with kvserver._on_one_cpu():
            seen.append(real_affinity(0))
        seen.append(real_affinity(0))

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join(10)
    assert seen == [{running_on}, allowed]


def test_memory_storage_loses_its_values_on_restart(make_server):
    server = make_server("--quiet", "--storage", "memory")
    assert "memory" in server.start_line
    assert server.get("/set?name=Guido").status == 201
    assert server.get("/get?key=name").body == b"Guido"
    server.restart()
    assert server.get("/get?key=name").status == 404
    assert server.get("/health").json()["keys"] == 0


# Stopping


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_server_with_exit_0_and_one_line(make_server, sig):
    server = make_server("--quiet")
    assert server.get("/set?name=Guido").status == 201
    with socket.create_connection((server.host, server.port), timeout=10) as idle:
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert idle.recv(65536).startswith(b"HTTP/1.1 200 ")
        # the connection is now idle, kept alive: it must not hold the stop up
        assert server.stop(sig) == 0
    lines = [line for line in server.stdout_rest.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert_no_traceback(server.stderr())
    assert server.stderr().strip() == ""


def test_a_request_in_flight_finishes_during_shutdown(make_server):
    server = make_server("--quiet")
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(
            b"PUT /kv/slow HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/plain\r\n"
            b"Transfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n"
        )
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"HTTP/1.1 100 ")  # the server is reading the body now
        assert reader.readline() == b"\r\n"
        sock.sendall(b"6\r\nhello \r\n")
        server.process.send_signal(signal.SIGTERM)

        def refuses_connections() -> bool:
            try:
                socket.create_connection((server.host, server.port), timeout=1).close()
            except OSError:
                return True
            return False

        wait_for(refuses_connections, timeout=5, what="the server to stop accepting connections")
        assert server.process.poll() is None, "the server exited with a request in flight"
        sock.sendall(b"5\r\nworld\r\n0\r\n\r\n")
        status_line = reader.readline()
        assert status_line.startswith(b"HTTP/1.1 201 "), status_line
    assert server.process.wait(10) == 0
    assert (server.data_dir / "slow").read_bytes() == b"hello world"
    assert_no_traceback(server.stderr())


# Command-line errors: exit 2, one line naming the option


@pytest.mark.parametrize(
    "args, option",
    [
        (["--port", "abc"], "--port"),
        (["--port", "70000"], "--port"),
        (["--port=-1"], "--port"),
        (["--bogus"], "--bogus"),
        (["--max-value", "12X"], "--max-value"),
        (["--max-value", "-5"], "--max-value"),
        (["--storage", "nosuch"], "--storage"),
        (["extra-arg"], "'extra-arg'"),
        (["--port", "4000", "extra-arg"], "'extra-arg'"),
        (["-d", "a", "-d", "b"], "--data-dir"),
        (["--data-dir=a", "-d", "b"], "--data-dir"),
        (["--port", "1", "-p2"], "--port"),
        (["--port"], "--port"),
        (["--storage", "memory", "--data-dir", "elsewhere"], "--data-dir"),
        (["--storage", "memory", "--no-fsync"], "--no-fsync is for --storage files"),
        (["--storage", "redis://127.0.0.1:1/0", "--no-fsync"], "--no-fsync is for --storage files"),
        (["--token", "t", "--no-token"], "--no-token"),
        (["--token", os.fsdecode(b"\xff")], "--token takes UTF-8 text, not the bytes b'\\xff'"),
        (["--bind", os.fsdecode(b"h\xffst")], "--bind takes UTF-8 text"),
        (["--storage", os.fsdecode(b"redis://\xff")], "--storage takes UTF-8 text"),
        (["--storage", "redis://localhost:abc"], "--storage: a Redis URL is"),
        (["--storage", "redis://127.0.0.1:99999/0"], "--storage: a Redis URL is"),
        (["--storage", "redis://[bad"], "--storage: a Redis URL is"),
        (["--storage", "redis://127.0.0.1/0?socket_timeout=abc"], "--storage: a Redis URL is"),
        (["export", "--storage", "redis://localhost:abc"], "--storage: a Redis URL is"),
        (["--data-dir", ""], "--data-dir takes a folder, not an empty string"),
        (["--bind", ""], "--bind takes an address"),
        (["--bind", "127.0.0.1:8080"], "--bind takes an address (the port goes in --port)"),
        (["--bind", "999.0.0.1"], "--bind takes an address"),
        (["--quiet=1"], "option --quiet takes no value"),
        (["-q1"], "unknown option -1"),
        (["-qp"], "option --port needs a value"),
        (["-qq"], "option --quiet is given twice"),
        (["-qz"], "unknown option -z"),
        (["--token", "-q1", "-p"], "option --port needs a value"),  # (an option's value is not unstacked)
        (["--data-dir", "-qd", "--port"], "option --port needs a value"),
        (["-b", "-qx", "y"], "unexpected argument 'y'"),
        (["--po", "1", "--po", "2"], "option --port is given twice"),  # (docopt takes a unique prefix)
        (["--po=1", "--port", "2"], "option --port is given twice"),
        (["--p", "1"], "option --p could be any of --port, --prefix: spell it out"),
        (["-q", "export", "-q"], "option --quiet is given twice"),  # (a command may follow options)
        (["export", "export"], "unexpected argument 'export'"),
        (["--"], "unexpected argument '--'"),
        (["--bind", "a" * 64 + ".example"], "a part of the name is empty, too long or not allowed"),
        (["--bind", "a..example"], "a part of the name is empty, too long or not allowed"),
        (["--no-fsync=yes"], "option --no-fsync takes no value"),
        (["--token", "secret "], "--token (or KV_TOKEN) holds no control character, nor space or tab at either end"),
        (["--token", "\tsecret"], "--token (or KV_TOKEN) holds no control character, nor space or tab at either end"),
        (["--token", "secret\r"], "--token (or KV_TOKEN) holds no control character"),
        (["--token", "sec\nret"], "--token (or KV_TOKEN) holds no control character"),
    ],
)
def test_a_bad_command_line_exits_2_with_one_line_naming_the_option(tmp_path, args, option):
    result = run(*args, cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    line = one_line(result)
    assert option in line
    assert "Warning" not in line and "Option(" not in line and "Argument(" not in line, line
    assert not (tmp_path / "data").exists()
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("url", ["redis://:hunter2/x@127.0.0.1:6379/0", "redis://user:hunter2#x@127.0.0.1:6379/0"])
def test_a_redis_url_that_cannot_be_read_does_not_show_its_password(tmp_path, url):
    result = run("--storage", url, cwd=tmp_path)
    assert result.returncode == 2
    line = one_line(result)
    assert "--storage: a Redis URL is" in line and "percent-encoded" in line
    assert "hunter2" not in line


@pytest.mark.parametrize(
    ("bind", "status", "says"),
    [
        ("kv.internal.example", 1, "cannot listen on kv.internal.example port 4000: Temporary failure"),
        ("999.0.0.1", 2, "--bind takes an address"),  # (glibc answers so for it when no DNS server answers)
        ("127.0.0.1:4000", 2, "--bind takes an address (the port goes in --port)"),
        ("[::1]", 2, "--bind takes an address"),
    ],
)
def test_a_bind_name_the_resolver_cannot_answer_for_now_is_a_start_up_failure_but_not_a_bad_address(
    monkeypatch, capsys, bind, status, says
):
    """A resolver that does not answer (EAI_AGAIN: DNS down at boot) is no fault of the command line,
    unless what was given is no name but a malformed address."""

    def no_answer(*args, **kwargs):
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", no_answer)
    with pytest.raises(SystemExit) as exited:
        kvserver.main(["--storage", "memory", "--bind", bind])
    assert exited.value.code == status
    assert says in capsys.readouterr().err


@pytest.mark.parametrize("option", [["--no-fsync"], ["--data-dir", "d"]])
def test_an_option_refused_with_a_redis_url_does_not_show_its_password(tmp_path, option):
    result = run("--storage", "redis://:s3cret@127.0.0.1:1/0", *option, cwd=tmp_path)
    assert result.returncode == 2
    line = one_line(result)
    assert f"{option[0]} is for" in line or f"{option[0]} is the folder" in line
    assert "redis storage" in line
    assert "s3cret" not in line


def test_a_repeated_option_or_a_stray_argument_says_so_in_words(tmp_path):
    assert "--data-dir is given twice" in one_line(run("-d", "a", "-d", "b", cwd=tmp_path))
    assert "unexpected argument 'extra-arg'" in one_line(run("extra-arg", cwd=tmp_path))


def test_a_kv_token_that_is_not_utf_8_exits_2_naming_it(tmp_path):
    env = {**os.environ, "KV_TOKEN": os.fsdecode(b"\xff")}
    result = subprocess.run(
        [sys.executable, str(KVSERVER), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 2
    assert one_line(result) == "kvserver: KV_TOKEN takes UTF-8 text, not the bytes b'\\xff'"
    assert not (tmp_path / "data").exists()


def test_an_unknown_storage_lists_every_kind_there_is(tmp_path):
    line = one_line(run("--storage", "nosuch", cwd=tmp_path))
    for kind in ["files", "memory", "redis://", "rediss://", "unix://"]:
        assert kind in line, line


# Start-up failures: exit 1, one line naming the problem


def test_a_port_in_use_exits_1_with_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("--port", str(port), "--data-dir", str(tmp_path / "data"), cwd=tmp_path)
    assert result.returncode == 1, (result.stdout, result.stderr)
    line = one_line(result)
    assert str(port) in line
    assert "in use" in line.lower()


def test_a_data_dir_that_cannot_be_made_exits_1_with_one_line(tmp_path):
    (tmp_path / "file").write_text("a regular file, not a folder")
    data_dir = tmp_path / "file" / "data"
    result = run("--port", "0", "--data-dir", str(data_dir), cwd=tmp_path)
    assert result.returncode == 1, (result.stdout, result.stderr)
    line = one_line(result)
    assert str(data_dir) in line
    assert "data dir" in line.lower()


def test_a_data_dir_locked_by_a_running_kvserver_exits_1_with_one_line(make_server, tmp_path):
    first = make_server("--quiet")
    assert first.get("/set?name=Guido").status == 201
    result = run("--port", "0", "--data-dir", str(first.data_dir), cwd=tmp_path)
    assert result.returncode == 1, (result.stdout, result.stderr)
    line = one_line(result)
    assert str(first.data_dir) in line
    assert "another kvserver" in line.lower() or "lock" in line.lower()
    assert first.get("/get?key=name").body == b"Guido"
    assert (first.data_dir / "name").read_bytes() == b"Guido"


# --version and --help


def test_version_prints_the_version_and_exits_0(tmp_path):
    result = run("--version", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout == "kvserver 0.1.0\n"
    assert result.stderr == ""


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_the_usage_and_exits_0(tmp_path, flag):
    result = run(flag, cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.lstrip().startswith("kvserver")
    assert "Usage:" in result.stdout
    for option in ["--port", "--bind", "--storage", "--data-dir", "--max-value", "--no-fsync", "--quiet", "--version"]:
        assert option in result.stdout
    assert result.stderr == ""
    assert not (tmp_path / "data").exists()
