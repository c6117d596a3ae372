"""One random sequence of operations applied to MemoryStorage, FileStorage and the live HTTP
API, each checked against a dict model (STYLE habit 14, after Hypothesis's
tests/nocover/test_database_agreement.py).

Every backend has its own ETags, so compare-and-set is described to the machine as
"with the current ETag" or "with a stale one", and each backend gets its own.
"""

from __future__ import annotations

import itertools
import urllib.parse
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

import kvserver

KEYS = st.sampled_from(
    [
        "a",
        "b",
        "a/b",
        "..",
        ".hidden",
        "with space",
        "100%",
        "%2F",
        "~",
        "ключ",
        "🔑",
        "k" * 300,  # a hashed file name
    ]
)
VALUES = st.one_of(
    st.binary(max_size=40),
    st.text(max_size=20).map(str.encode),
    st.sampled_from([b"x" * (64 * 1024 + 1), bytes(range(256)) * 300]),  # larger than FileStorage keeps in memory
)
MEDIA_TYPES = st.sampled_from(
    ["application/octet-stream", "text/plain; charset=utf-8", "text/html", "application/json", "image/png"]
)
STORES = ("memory", "files", "http")


def kv_path(key: str) -> str:
    return "/kv/" + urllib.parse.quote(key, safe="")


class HTTPStore:
    """The live server seen through PUT/GET/DELETE /kv/<key>, shaped like the storage API."""

    def __init__(self, server) -> None:
        self.server = server
        self.connection = server.connect()

    def request(self, method: str, key: str, body: bytes | None = None, headers: dict[str, str] | None = None):
        return self.server.request(method, kv_path(key), body=body, headers=headers, connection=self.connection)

    def clear(self) -> None:
        response = self.server.get("/keys?limit=10000", connection=self.connection)
        assert response.status == 200
        for key in response.json()["keys"]:
            assert self.request("DELETE", key).status == 204

    def keys(self) -> list[str]:
        response = self.server.get("/keys?limit=10000", connection=self.connection)
        assert response.status == 200, response.body
        document = response.json()
        assert document["next"] is None
        return document["keys"]

    def get(self, key: str) -> tuple[bytes, str, str] | None:
        """Bytes, media type and ETag, or None for a 404."""
        response = self.request("GET", key)
        if response.status == 404:
            response.problem()
            return None
        assert response.status == 200, (response.status, response.body)
        etag = response.headers["ETag"]
        assert etag.startswith('"') and etag.endswith('"'), etag
        return response.body, response.headers["Content-Type"], etag[1:-1]

    def put(self, key: str, value: bytes, content_type: str, if_match: str | None, if_none_match: bool):
        """(created, etag) on success, None on a 412."""
        headers = {"Content-Type": content_type}
        if if_match is not None:
            headers["If-Match"] = f'"{if_match}"'
        if if_none_match:
            headers["If-None-Match"] = "*"
        response = self.request("PUT", key, body=value, headers=headers)
        if response.status == 412:
            response.problem()
            return None
        assert response.status in (200, 201), (response.status, response.body)
        document = response.json()
        assert document["key"] == key
        assert document["created"] is (response.status == 201)
        assert response.headers["ETag"] == f'"{document["etag"]}"'
        return document["created"], document["etag"]

    def delete(self, key: str, if_match: str | None) -> int:
        headers = {"If-Match": f'"{if_match}"'} if if_match is not None else {}
        response = self.request("DELETE", key, headers=headers)
        assert response.status in (204, 404, 412), (response.status, response.body)
        if response.status == 204:
            assert response.body == b""
        else:
            response.problem()
        return response.status


class AgreementMachine(RuleBasedStateMachine):
    """Set up per run by the test below: `server` (a live kvserver) and `tmp_path`."""

    server = None
    tmp_path: Path = Path()
    runs = itertools.count()

    def __init__(self) -> None:
        super().__init__()
        self.model: dict[str, tuple[bytes, str]] = {}
        self.memory = kvserver.MemoryStorage()
        self.files_dir = self.tmp_path / f"files-{next(self.runs)}"
        self.files = kvserver.FileStorage(self.files_dir, fsync=False)
        self.http = HTTPStore(self.server)
        self.http.clear()
        # Per store, the ETag of each key's current value, and every ETag it ever had.
        self.etags: dict[str, dict[str, str]] = {store: {} for store in STORES}
        self.old_etags: dict[str, dict[str, list[str]]] = {store: {} for store in STORES}

    def teardown(self) -> None:
        self.files.close()
        self.http.connection.close()

    # Helpers

    def storages(self) -> dict[str, kvserver.Storage]:
        return {"memory": self.memory, "files": self.files}

    def condition_etag(self, store: str, key: str, current: bool) -> str:
        """The ETag a compare-and-set sends: the current one, or one from an older version."""
        if current:
            return self.etags[store][key]
        old = self.old_etags[store].get(key, [])
        return old[-1] if old else "0-0"

    def wrote(self, store: str, key: str, etag: str) -> None:
        previous = self.etags[store].get(key)
        assert etag != previous, f"{store}: the ETag of {key!r} did not change"
        assert etag not in self.old_etags[store].get(key, []), f"{store}: an old ETag of {key!r} came back"
        if previous is not None:
            self.old_etags[store].setdefault(key, []).append(previous)
        self.etags[store][key] = etag

    def deleted(self, store: str, key: str) -> None:
        previous = self.etags[store].pop(key, None)
        if previous is not None:
            self.old_etags[store].setdefault(key, []).append(previous)

    # Rules

    def write(self, key, value, content_type, current: bool | None, if_none_match: bool):
        """A put on every store; `current` None means no If-Match."""
        present = key in self.model
        should_succeed = (not if_none_match or not present) and (current is None or (present and current))
        for name, storage in self.storages().items():
            if_match = None if current is None else self.condition_etag(name, key, current and present)
            try:
                stat, created = storage.write(
                    key, value, content_type=content_type, if_match=if_match, if_none_match=if_none_match
                )
            except kvserver.PreconditionFailed:
                assert not should_succeed, f"{name}: the write failed its precondition"
            else:
                assert should_succeed, f"{name}: the write should have failed its precondition"
                assert created is not present
                assert stat == storage.stat(key)
                self.wrote(name, key, stat.etag)
        if_match = None if current is None else self.condition_etag("http", key, current and present)
        answer = self.http.put(key, value, content_type, if_match, if_none_match)
        if answer is None:
            assert not should_succeed, "http: the PUT was answered 412"
        else:
            assert should_succeed, "http: the PUT should have been answered 412"
            created, etag = answer
            assert created is not present
            self.wrote("http", key, etag)
        if should_succeed:
            self.model[key] = (value, content_type)

    @rule(key=KEYS, value=VALUES, content_type=MEDIA_TYPES)
    def put(self, key, value, content_type):
        self.write(key, value, content_type, current=None, if_none_match=False)

    @rule(key=KEYS, value=VALUES, content_type=MEDIA_TYPES, current=st.booleans())
    def put_if_match(self, key, value, content_type, current):
        self.write(key, value, content_type, current=current, if_none_match=False)

    @rule(key=KEYS, value=VALUES, content_type=MEDIA_TYPES)
    def put_if_none_match(self, key, value, content_type):
        self.write(key, value, content_type, current=None, if_none_match=True)

    @rule(key=KEYS)
    def get(self, key):
        expected = self.model.get(key)
        for name, storage in self.storages().items():
            if expected is None:
                with pytest.raises(KeyError):
                    storage.get(key)
                assert key not in storage
            else:
                assert storage.get(key) == expected[0], name
                stat = storage.stat(key)
                assert (stat.size, stat.content_type, stat.etag) == (
                    len(expected[0]),
                    expected[1],
                    self.etags[name][key],
                )
                with storage.open(key) as file:
                    assert file.read() == expected[0]
        answer = self.http.get(key)
        if expected is None:
            assert answer is None, "http: a deleted key was served"
        else:
            assert answer == (*expected, self.etags["http"][key])

    @rule(key=KEYS)
    def delete(self, key):
        present = key in self.model
        for name, storage in self.storages().items():
            assert storage.remove(key) is present, name
            self.deleted(name, key)
        assert self.http.delete(key, None) == (204 if present else 404)
        self.deleted("http", key)
        self.model.pop(key, None)

    @rule(key=KEYS, current=st.booleans())
    def delete_if_match(self, key, current):
        present = key in self.model
        should_succeed = present and current
        for name, storage in self.storages().items():
            try:
                storage.delete(key, if_match=self.condition_etag(name, key, should_succeed))
            except kvserver.PreconditionFailed:
                assert not should_succeed, f"{name}: the delete failed its precondition"
            else:
                assert should_succeed, f"{name}: the delete should have failed its precondition"
                self.deleted(name, key)
        status = self.http.delete(key, self.condition_etag("http", key, should_succeed))
        # (over HTTP a DELETE of no value is a 404 whatever its conditions: RFC 9110 section 13.2.1)
        assert status == (204 if should_succeed else 412 if present else 404)
        if should_succeed:
            self.deleted("http", key)
            del self.model[key]

    @rule()
    def reopen_the_file_storage(self):
        self.files.close()
        self.files = kvserver.FileStorage(self.files_dir, fsync=False)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def stat_survives_a_reopen(self, data):
        key = data.draw(st.sampled_from(sorted(self.model)))
        before = self.files.stat(key)
        self.reopen_the_file_storage()
        assert self.files.stat(key) == before

    # Invariants

    @invariant()
    def every_store_lists_the_model_keys_in_code_point_order(self):
        expected = sorted(self.model)
        assert self.memory.keys() == expected
        assert self.files.keys() == expected
        assert len(self.memory) == len(self.files) == len(expected)
        assert self.http.keys() == expected

    @invariant()
    def etags_stay_put_until_a_write(self):
        for name, storage in self.storages().items():
            assert {key: storage.stat(key).etag for key in self.model} == self.etags[name]


def test_memory_files_and_http_agree_with_a_dict_model(make_live_server, tmp_path):
    AgreementMachine.server = make_live_server(fsync=False)
    AgreementMachine.tmp_path = tmp_path
    run_state_machine_as_test(
        AgreementMachine,
        settings=settings(max_examples=40, stateful_step_count=30, deadline=None, database=None),
    )
