"""The README's Python examples run as written (against a live server where they need one)."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_examples() -> dict[str, str]:
    """The README's ```python blocks, by the heading they stand under."""
    examples = {}
    heading = ""
    for block in re.split(r"^(## .*)$", README.read_text(), flags=re.MULTILINE):
        if block.startswith("## "):
            heading = block[3:].strip()
        for code in re.findall(r"```python\n(.*?)```", block, flags=re.DOTALL):
            examples[heading] = code
    return examples


def test_the_readme_has_the_xmlrpc_library_and_watching_examples():
    assert set(python_examples()) == {"Use it from XML-RPC", "Use it as a library", "Watching for changes"}


def test_the_watching_loop_prints_each_change_until_the_flag_is_off(server, capsys):
    code = python_examples()["Watching for changes"]
    assert "http://localhost:4000" in code
    assert server.request("PUT", "/kv/config/flag", b"on").status == 201
    turned_off = threading.Timer(0.5, lambda: server.request("PUT", "/kv/config/flag", b"off"))
    turned_off.start()
    exec(compile(code.replace("http://localhost:4000", server.url), "README.md", "exec"), {})
    turned_off.join()
    assert capsys.readouterr().out == "flag: b'on'\nflag: b'off'\n"


def test_the_xmlrpc_example_runs_against_a_live_server(server):
    code = python_examples()["Use it from XML-RPC"]
    assert "http://localhost:4000" in code
    exec(compile(code.replace("http://localhost:4000", server.url), "README.md", "exec"), {})
    assert server.get("/get?key=name").body == b"Guido"


def test_the_library_example_runs_in_a_fresh_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(python_examples()["Use it as a library"], "README.md", "exec"), {})
    assert (tmp_path / "data" / "k").read_bytes() == b"w"
    assert not (tmp_path / "data" / "greeting").exists()
