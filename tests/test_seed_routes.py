"""The seed routes of SPEC section 3, with the key rules of section 2, the error bodies of
section 6 and the transport promises of section 9, tested on a kvserver running in this process
(a subprocess for restarts and the access log on stderr)."""

from __future__ import annotations

import base64
import json
import re
import socket
import statistics
import time
import urllib.parse
from collections.abc import Iterator

import pytest
from conftest import LiveServer, Response, Server, assert_problem, live, parse_response, q, read_http, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st

import kvserver

TEXT = "text/plain; charset=utf-8"
BINARY = "application/octet-stream"


def set_form(server: Server, key: str, value: str, **kwargs) -> Response:
    return server.get(f"/set?key={q(key)}&value={q(value)}", **kwargs)


def get_value(server: Server, key: str, **kwargs) -> Response:
    return server.get(f"/get?key={q(key)}", **kwargs)


def key_count(server: Server) -> int:
    response = server.get("/health")
    assert response.status == 200
    return response.json()["keys"]


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Iterator[LiveServer]:
    """One quiet server for the many tests that leave the store as they found it (refused
    requests, reads), so that the module runs in seconds. Each such test checks the key count."""
    server = live(tmp_path_factory.mktemp("shared") / "data")
    yield server
    server.stop()


def dump(server: Server) -> dict:
    response = server.get("/")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("application/json")
    return response.json()


def all_keys(server: Server) -> list[str]:
    response = server.get("/keys?limit=10000")
    assert response.status == 200
    return response.json()["keys"]


# /set, the first shape: /set?<key>=<value>


def test_set_of_a_new_key_answers_201_with_created_true(shared):
    response = shared.get("/set?new-key=Guido")
    assert response.status == 201
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {"key": "new-key", "created": True}
    assert get_value(shared, "new-key").body == b"Guido"


def test_set_of_an_existing_key_answers_200_with_created_false_and_replaces_the_value(shared):
    assert shared.get("/set?replaced=Guido").status == 201
    response = shared.get("/set?replaced=Barry")
    assert response.status == 200
    assert response.json() == {"key": "replaced", "created": False}
    assert get_value(shared, "replaced").body == b"Barry"


def test_set_without_an_equals_sign_is_a_400_and_stores_nothing(shared):
    assert_problem(shared.get("/set?noequals"), 400, "/set?")
    assert shared.get("/get?key=noequals").status == 404


def test_set_with_an_empty_value_stores_the_empty_value(shared):
    assert shared.get("/set?empty=").status == 201
    response = shared.get("/get?key=empty")
    assert response.status == 200
    assert response.body == b""
    assert response.headers["Content-Length"] == "0"
    assert response.headers["Content-Type"] == TEXT


def test_set_with_the_single_name_key_is_the_first_shape(shared):
    response = shared.get("/set?key=abc")
    assert response.status == 201
    assert response.json() == {"key": "key", "created": True}
    assert shared.get("/get?key=key").body == b"abc"
    assert shared.get("/get?key=abc").status == 404


@pytest.mark.parametrize(
    "query",
    ["a=1&b=2", "a=1&a=2", "", "&", "a=1&b", "key=k&value=v&other=x", "key=k&ttl=5", "key=k&key=j&value=v"],
)
def test_set_with_anything_but_one_pair_or_the_form_fields_is_a_400_and_stores_nothing(shared, query):
    before = key_count(shared)
    assert_problem(shared.get(f"/set?{query}"), 400, "/set?")
    assert key_count(shared) == before


def test_set_without_a_query_is_a_400(shared):
    assert_problem(shared.get("/set"), 400, "/set?")


def test_set_keeps_escaped_ampersand_and_equals_inside_a_value(shared):
    assert shared.get("/set?eq=a%3Db%26c%3D").status == 201
    assert shared.get("/get?key=eq").body == b"a=b&c="


def test_set_keeps_escaped_ampersand_and_equals_inside_a_key(shared):
    response = shared.get("/set?a%26b%3Dc=v")
    assert response.status == 201
    assert response.json()["key"] == "a&b=c"
    assert get_value(shared, "a&b=c").body == b"v"


def test_set_decodes_plus_as_space_and_percent_2b_as_plus(shared):
    response = shared.get("/set?my+key=hello+world%2B1")
    assert response.json() == {"key": "my key", "created": True}
    assert shared.get("/get?key=my+key").body == b"hello world+1"
    assert shared.get("/get?key=my%20key").body == b"hello world+1"


def test_set_decodes_plus_as_space_in_a_query_without_percent_escapes(shared):
    response = shared.get("/set?plain+key=a+b")
    assert response.json() == {"key": "plain key", "created": True}
    assert shared.get("/get?key=plain%20key").body == b"a b"


@settings(max_examples=300, deadline=None)
@given(
    pairs=st.lists(st.tuples(st.binary(min_size=1, max_size=20), st.one_of(st.none(), st.binary(max_size=20)))),
    safe=st.sampled_from(["", "/", "/:@!$'()*,;"]),
    plus_for_space=st.booleans(),
)
def test_query_decoding_gives_back_every_byte_however_it_was_escaped(pairs, safe, plus_for_space):
    quote = urllib.parse.quote_from_bytes
    fields = []
    for name, value in pairs:
        escaped = [
            quote(part, safe).replace("%20", "+") if plus_for_space else quote(part, safe)
            for part in (name, value or b"")
        ]
        fields.append(escaped[0] if value is None else "=".join(escaped))
    assert kvserver._decode_query("&".join(fields)) == pairs


def test_set_decodes_percent_encoded_utf8_keys_and_values(shared):
    response = shared.get("/set?%C3%A9t%C3%A9=%E2%98%83%20snow")
    assert response.status == 201
    assert response.json() == {"key": "été", "created": True}
    value = shared.get("/get?key=%C3%A9t%C3%A9")
    assert value.body == "☃ snow".encode()
    assert value.headers["Content-Type"] == TEXT
    assert "été" in all_keys(shared)


@pytest.mark.parametrize("raw_key", ["%FF", "a%C3", "%C0%AF", "%ED%A0%80"])
def test_set_with_a_key_that_is_not_utf8_is_a_400(shared, raw_key):
    before = key_count(shared)
    assert_problem(shared.get(f"/set?{raw_key}=v"), 400, "UTF-8")
    assert_problem(shared.get(f"/set?key={raw_key}&value=v"), 400, "UTF-8")
    assert key_count(shared) == before


# /set, the HTML-form shape: /set?key=<k>&value=<v>[&ttl=<s>]


def test_set_in_the_form_shape_stores_value_under_key(shared):
    response = shared.get("/set?key=form-name&value=Guido")
    assert response.status == 201
    assert response.json() == {"key": "form-name", "created": True}
    assert shared.get("/get?key=form-name").body == b"Guido"
    response = shared.get("/set?value=Barry&key=form-name")
    assert response.status == 200
    assert response.json() == {"key": "form-name", "created": False}
    assert shared.get("/get?key=form-name").body == b"Barry"


def test_set_in_the_form_shape_with_ttl_expires_the_key_everywhere(server):
    response = server.get("/set?key=brief&value=soon+gone&ttl=1")
    assert response.status == 201
    assert response.json() == {"key": "brief", "created": True}
    assert server.get("/get?key=brief").body == b"soon gone"
    assert "brief" in all_keys(server)
    wait_for(lambda: server.get("/get?key=brief").status == 404, timeout=5, what="the key to expire")
    assert "brief" not in all_keys(server)
    assert "brief" not in dump(server)
    assert server.get("/health").json()["keys"] == 0
    assert server.get("/delete?key=brief").status == 404


def test_set_without_ttl_clears_an_earlier_ttl(server):
    # "kept" gets its TTL before "marker", so it would expire no later than "marker" does.
    assert server.get("/set?key=kept&value=1&ttl=1").status == 201
    assert server.get("/set?key=marker&value=x&ttl=1").status == 201
    assert server.get("/set?kept=2").status == 200
    wait_for(lambda: server.get("/get?key=marker").status == 404, timeout=5, what="the marker to expire")
    assert server.get("/get?key=kept").body == b"2"


def test_expired_keys_stay_absent_after_a_restart(process_server):
    assert process_server.get("/set?key=brief&value=v&ttl=1").status == 201
    wait_for(lambda: process_server.get("/get?key=brief").status == 404, timeout=5, what="the key to expire")
    process_server.restart()
    assert process_server.get("/get?key=brief").status == 404
    assert all_keys(process_server) == []


@pytest.mark.parametrize("ttl", ["0", "-1", "1.5", "abc", "", "1e3", "%201"])
def test_set_with_a_ttl_that_is_not_a_positive_whole_number_is_a_400(shared, ttl):
    assert_problem(shared.get(f"/set?key=ttl-test&value=v&ttl={ttl}"), 400, "ttl")
    assert shared.get("/get?key=ttl-test").status == 404


# Keys (SPEC section 2)


@pytest.mark.parametrize(
    "key",
    ["k" * 1024, "é" * 512, "a b", " ", "a/b", "/", "..", "../escape", "%", "100%25", "日本語", "🎉", "a.b-c_d", "~"],
    ids=["1024 bytes", "1024 bytes of 2-byte chars", "space", "only space", "slash", "only slash", "dotdot",
         "dotdot slash", "percent", "percent-2-5", "cjk", "emoji", "punctuation", "tilde"],
)  # fmt: skip
def test_keys_of_1_to_1024_bytes_may_hold_anything_but_control_characters(shared, key):
    value = f"value of {key}"
    response = set_form(shared, key, value)
    assert response.status == 201, response.body
    assert response.json() == {"key": key, "created": True}
    assert get_value(shared, key).body == value.encode()
    assert key in all_keys(shared)
    assert dump(shared)[key] == value
    assert shared.get(f"/delete?key={q(key)}").json() == {"key": key, "deleted": True}
    assert get_value(shared, key).status == 404


def test_keys_are_stored_inside_the_data_dir_whatever_they_hold(process_server):
    for key in ["../escape", "../../escape", "/tmp/escape", "a/../../escape", "..", "."]:
        assert set_form(process_server, key, "x").status == 201
    parent = process_server.data_dir.parent
    assert not (parent / "escape").exists()
    assert not (parent.parent / "escape").exists()
    process_server.restart()
    assert sorted(all_keys(process_server)) == sorted(
        ["../escape", "../../escape", "/tmp/escape", "a/../../escape", "..", "."]
    )


def test_a_one_byte_key_is_allowed(server):
    assert server.get("/set?x=1").status == 201
    assert server.get("/get?key=x").body == b"1"


@pytest.mark.parametrize(
    "key", ["k" * 1025, "é" * 512 + "a", "日" * 342], ids=["1025 ascii", "1025 with 2-byte", "1026 with 3-byte"]
)
def test_a_key_over_1024_bytes_is_a_400(shared, key):
    before = key_count(shared)
    assert_problem(set_form(shared, key, "v"), 400, "1024")
    assert_problem(shared.get(f"/set?{q(key)}=v"), 400, "1024")
    assert_problem(get_value(shared, key), 400, "1024")
    assert_problem(shared.get(f"/delete?key={q(key)}"), 400, "1024")
    assert key_count(shared) == before


def test_an_empty_key_is_a_400(server):
    assert_problem(server.get("/set?=v"), 400, "key")
    assert_problem(server.get("/set?key=&value=v"), 400, "key")
    assert_problem(server.get("/get?key="), 400, "key")
    assert_problem(server.get("/delete?key="), 400, "key")
    assert all_keys(server) == []


@pytest.mark.parametrize("char", ["%00", "%01", "%09", "%0A", "%0D", "%1B", "%1F", "%7F"])
def test_a_key_with_a_control_character_is_a_400(shared, char):
    before = key_count(shared)
    assert_problem(shared.get(f"/set?a{char}b=v"), 400, "control")
    assert_problem(shared.get(f"/set?key=a{char}b&value=v"), 400, "control")
    assert_problem(shared.get(f"/get?key=a{char}b"), 400, "control")
    assert key_count(shared) == before


def test_control_characters_are_allowed_in_values(shared):
    assert shared.get("/set?ctl=a%00b%0A%7F").status == 201
    assert shared.get("/get?key=ctl").body == b"a\x00b\n\x7f"


# Value size (--max-value)


def test_a_set_value_over_max_value_is_a_413_and_stores_nothing(make_live_server):
    server = make_live_server(max_value=10)
    assert_problem(server.get("/set?big=" + "x" * 11), 413, "10")
    assert server.get("/get?key=big").status == 404
    assert_problem(server.get("/set?key=big&value=" + "x" * 11), 413)
    assert server.get("/get?key=big").status == 404
    assert server.get("/set?big=" + "x" * 10).status == 201
    assert_problem(server.get("/set?big=" + "y" * 11), 413)
    assert server.get("/get?key=big").body == b"x" * 10
    assert all_keys(server) == ["big"]


def test_max_value_counts_decoded_bytes_not_query_characters(make_live_server):
    server = make_live_server(max_value=4)
    assert server.get("/set?k=%E2%98%83").status == 201  # 9 characters, 3 bytes
    assert_problem(server.get("/set?k=%E2%98%83%E2%98%83"), 413)  # 6 bytes
    assert server.get("/get?key=k").body == "☃".encode()


# /get


def test_get_returns_the_raw_utf8_value_as_text_plain(shared):
    shared.get("/set?greeting=hello%2C+w%C3%B6rld")
    response = shared.get("/get?key=greeting")
    assert response.status == 200
    assert response.body == "hello, wörld".encode()
    assert response.headers["Content-Type"] == TEXT
    assert response.headers["Content-Length"] == str(len(response.body))


def test_get_returns_non_utf8_bytes_as_application_octet_stream(shared):
    assert shared.get("/set?bin=%FF%FE%00%80").status == 201
    response = shared.get("/get?key=bin")
    assert response.status == 200
    assert response.body == b"\xff\xfe\x00\x80"
    assert response.headers["Content-Type"] == BINARY
    assert response.headers["Content-Length"] == "4"


def test_get_of_a_missing_key_is_a_404_naming_the_key(shared):
    assert_problem(shared.get("/get?key=nothing-here"), 404, "nothing-here")


@pytest.mark.parametrize("query", ["", "?", "?key", "?name=x", "?key=a&key=b", "?key=a&extra=1", "?key=%FF"])
def test_get_with_a_bad_query_is_a_400_saying_how(shared, query):
    shared.get("/set?a=1")
    assert_problem(shared.get(f"/get{query}"), 400, "key")


@pytest.mark.parametrize("path", ["/get", "/get?", "/delete", "/delete?"])
def test_get_and_delete_without_a_query_answer_with_their_usage(shared, path):
    route = path.rstrip("?")
    detail = assert_problem(shared.get(path), 400)["detail"]
    assert f"{route}?key=<key>" in detail, detail
    assert "invalid key" not in detail and "not 0" not in detail, detail


@pytest.mark.parametrize(
    "path, words",
    [
        ("/keys?limit=0", ["limit", '"0"']),
        ("/keys?limit=1.5", ["limit", '"1.5"']),
        ("/set?key=k&value=v&ttl=1.5", ["ttl", '"1.5"']),
        ("/kv/k?ttl=0", ["ttl", '"0"']),
        ("/keys?prefix=a&prefix=b", ['"prefix" is repeated']),
        ("/get?key=a&key=b", ['"key" is repeated']),
        ("/keys?prefix", ["\"prefix\" needs '=' and a value"]),
        ("/keys?bogus=1", ['unexpected query field "bogus"', "?prefix=<p>&delimiter=<d>&limit="]),
        ("/?bogus=1", ['unexpected query field "bogus"', "/?prefix=<p>"]),
    ],
)
def test_error_details_read_as_text_in_a_terminal(shared, path, words):
    method = "PUT" if path.startswith("/kv/") else "GET"
    detail = assert_problem(shared.request(method, path, b"v" if method == "PUT" else None), 400)["detail"]
    for word in words:
        assert word in detail, detail
    assert "b'" not in detail and 'b"' not in detail, f"a Python bytes literal in {detail!r}"


# /delete


def test_delete_answers_200_json_then_404(process_server):
    process_server.get("/set?name=Guido")
    response = process_server.get("/delete?key=name")
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {"key": "name", "deleted": True}
    assert process_server.get("/get?key=name").status == 404
    assert_problem(process_server.get("/delete?key=name"), 404, "name")
    process_server.restart()
    assert process_server.get("/get?key=name").status == 404


def test_delete_of_a_key_never_set_is_a_404(shared):
    assert_problem(shared.get("/delete?key=ghost"), 404, "ghost")


@pytest.mark.parametrize("query", ["", "?key", "?name=x", "?key=a&key=a", "?key=%FF"])
def test_delete_with_a_bad_query_is_a_400_and_deletes_nothing(shared, query):
    shared.get("/set?a=1")
    assert_problem(shared.get(f"/delete{query}"), 400, "key")
    assert shared.get("/get?key=a").body == b"1"


# /keys


def test_keys_of_an_empty_store_is_an_empty_list(server):
    response = server.get("/keys")
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {"keys": [], "next": None}


def test_keys_are_listed_in_code_point_order(server):
    keys = ["b", "a", "B", "é", "z", "日本", "🎉", "a b", "ab", "~", "Z", "ä", "ﬀ"]
    for key in keys:
        assert set_form(server, key, "v").status == 201
    assert server.get("/keys").json() == {"keys": sorted(keys), "next": None}


def test_keys_with_prefix_lists_only_keys_starting_with_it(server):
    for key in ["user:1", "user:2", "user:10", "users", "admin:1", "use"]:
        server.get(f"/set?{q(key)}=v")
    assert server.get("/keys?prefix=user%3A").json() == {"keys": ["user:1", "user:10", "user:2"], "next": None}
    assert server.get("/keys?prefix=user").json()["keys"] == ["user:1", "user:10", "user:2", "users"]
    assert server.get("/keys?prefix=nobody").json() == {"keys": [], "next": None}
    assert server.get("/keys?prefix=").json()["keys"] == sorted(
        ["user:1", "user:2", "user:10", "users", "admin:1", "use"]
    )


def test_keys_cursor_walk_gives_every_key_exactly_once_in_code_point_order(make_live_server):
    server = make_live_server(fsync=False)
    keys = [f"key{i:02d}" for i in range(18)] + ["Zed", "ångström", "é", "日本", "🎉", "a b", "~tilde"]
    assert len(keys) == 25
    connection = server.connect()
    for key in keys:
        assert set_form(server, key, "v", connection=connection).status == 201
    seen: list[str] = []
    pages = []
    query = "/keys?limit=10"
    while True:
        page = server.get(query, connection=connection).json()
        pages.append(len(page["keys"]))
        seen += page["keys"]
        if page["next"] is None:
            break
        assert page["next"] == page["keys"][-1]
        query = f"/keys?limit=10&after={q(page['next'])}"
        assert len(pages) < 10, "the cursor walk does not end"
    assert pages == [10, 10, 5]
    assert seen == sorted(keys)


def test_keys_next_is_null_when_the_page_ends_at_the_last_key(server):
    for i in range(3):
        server.get(f"/set?k{i}=v")
    assert server.get("/keys?limit=3").json() == {"keys": ["k0", "k1", "k2"], "next": None}
    assert server.get("/keys?limit=2").json() == {"keys": ["k0", "k1"], "next": "k1"}
    assert server.get("/keys?limit=1&after=k1").json() == {"keys": ["k2"], "next": None}


def test_keys_after_is_exclusive_and_need_not_exist(server):
    for key in ["a", "b", "c", "d"]:
        server.get(f"/set?{key}=v")
    assert server.get("/keys?after=b").json() == {"keys": ["c", "d"], "next": None}
    assert server.get("/keys?after=bb").json() == {"keys": ["c", "d"], "next": None}
    assert server.get("/keys?after=0").json() == {"keys": ["a", "b", "c", "d"], "next": None}
    assert server.get("/keys?after=z").json() == {"keys": [], "next": None}
    assert server.get("/keys?after=a&limit=2").json() == {"keys": ["b", "c"], "next": "c"}


def test_keys_combines_prefix_limit_and_after(server):
    for key in ["p1", "p2", "p3", "p4", "q1"]:
        server.get(f"/set?{key}=v")
    assert server.get("/keys?prefix=p&after=p1&limit=2").json() == {"keys": ["p2", "p3"], "next": "p3"}
    assert server.get("/keys?prefix=p&after=p3&limit=2").json() == {"keys": ["p4"], "next": None}


def test_keys_limit_defaults_to_1000_and_reaches_10000(make_live_server):
    server = make_live_server("memory")
    connection = server.connect()
    for i in range(1001):
        assert server.get(f"/set?k{i:04d}=v", connection=connection).status == 201
    page = server.get("/keys", connection=connection).json()
    assert len(page["keys"]) == 1000
    assert page["next"] == "k0999"
    page = server.get("/keys?limit=10000", connection=connection).json()
    assert len(page["keys"]) == 1001
    assert page["next"] is None
    assert server.get("/keys?limit=1", connection=connection).json() == {"keys": ["k0000"], "next": "k0000"}


@pytest.mark.parametrize("limit", ["0", "10001", "abc", "-1", "", "1.5", "%201", "99999999999999999999"])
def test_keys_with_a_limit_outside_1_to_10000_is_a_400(shared, limit):
    assert_problem(shared.get(f"/keys?limit={limit}"), 400, "limit")


@pytest.mark.parametrize("query", ["bogus=1", "key=a", "prefix=a&prefix=b", "prefix", "prefix=%FF", "after=%FF"])
def test_keys_with_an_unknown_repeated_or_bad_field_is_a_400(shared, query):
    assert_problem(shared.get(f"/keys?{query}"), 400)


# / (the JSON dump)


def test_dump_of_an_empty_store_is_an_empty_object(server):
    assert dump(server) == {}


def test_dump_shows_every_value_by_its_media_type(server):
    server.get("/set?text=hello+w%C3%B6rld")
    server.get("/set?empty=")
    server.get("/set?bin=%FF%00%FE")
    server.get("/set?looks-like-json=%7B%22a%22%3A1%7D")  # text/plain, so a string
    put = [
        ("object", b'{"a": [1, 2.5, null, true]}', "application/json"),
        ("number", b"42", "application/json; charset=utf-8"),
        ("string", b'"quoted"', "Application/JSON"),
        ("broken-json", b"{not json", "application/json"),
        ("octets", b"plain bytes", "application/octet-stream"),
    ]
    for key, body, content_type in put:
        response = server.request("PUT", f"/kv/{key}", body=body, headers={"Content-Type": content_type})
        assert response.status == 201, response.body
    assert dump(server) == {
        "text": "hello wörld",
        "empty": "",
        "bin": {"base64": base64.b64encode(b"\xff\x00\xfe").decode()},
        "looks-like-json": '{"a":1}',
        "object": {"a": [1, 2.5, None, True]},
        "number": 42,
        "string": "quoted",
        "broken-json": "{not json",
        "octets": "plain bytes",
    }


def strict_json(body: bytes):
    """`body` parsed as JSON that any reader takes: UTF-8, no NaN or Infinity, no lone surrogate,
    and every number within a double's range."""

    def refuse(constant: str):
        raise AssertionError(f"{constant} is not JSON")

    def finite(number: str) -> float:
        assert abs(float(number)) != float("inf"), f"{number} is beyond a double"
        return float(number)

    document = json.loads(body.decode("utf-8"), parse_constant=refuse, parse_float=finite, parse_int=finite)
    json.dumps(document, ensure_ascii=False).encode("utf-8")  # no lone surrogate anywhere
    return document


@pytest.mark.parametrize(
    "body",
    [
        b"1e400",
        b"-1e400",
        b"[1, 2.5e999]",
        b'{"n": -1E+309}',
        b"1" + b"0" * 400,  # an integer: Python reads it exactly, a double cannot hold it
        b'"\\ud800"',
        b'["\\udfff x"]',
        b"NaN",
        b"[Infinity]",
    ],
)
def test_dump_shows_json_that_other_readers_cannot_take_as_its_text(server, body):
    assert server.request("PUT", "/kv/v", body=body, headers={"Content-Type": "application/json"}).status == 201
    assert server.request("PUT", "/kv/ok", body=b"[1e308, -5]", headers={"Content-Type": "application/json"}).status
    assert strict_json(server.get("/").body) == {"ok": [1e308, -5], "v": body.decode()}


def test_every_json_answer_is_utf8_and_ends_with_a_newline(server):
    assert server.get(f"/set?{q('été')}={q('ünï')}").body == '{"key": "été", "created": true}\n'.encode()
    assert server.get("/").body == '{"été": "ünï"}\n'.encode()
    assert server.get("/keys").body == '{"keys": ["été"], "next": null}\n'.encode()
    assert server.get(f"/delete?key={q('été')}").body == '{"key": "été", "deleted": true}\n'.encode()
    assert server.get("/").body == b"{}\n"
    problem = server.get(f"/get?key={q('naïve')}")
    assert problem.body.endswith(b"\n")
    assert "naïve".encode() in problem.body
    assert strict_json(problem.body)["status"] == 404


def test_dump_with_a_prefix_holds_only_the_keys_under_it(server):
    for key in ["a/1", "a/2", "b/1"]:
        assert server.get(f"/set?{q(key)}=v").status == 201
    response = server.get("/?prefix=a%2F")
    assert response.status == 200
    assert response.json() == {"a/1": "v", "a/2": "v"}
    assert server.get("/?prefix=zzz").json() == {}


def test_dump_keys_come_in_code_point_order(server):
    for key in ["b", "é", "a", "Z"]:
        set_form(server, key, key)
    response = server.get("/")
    assert list(json.loads(response.body)) == ["Z", "a", "b", "é"]


def test_dump_shows_values_over_64_kib_as_size_and_href(server):
    limit = 64 * 1024
    assert server.request("PUT", "/kv/at-limit", body=b"a" * limit).status == 201
    assert server.request("PUT", "/kv/big%20one", body=b"b" * (limit + 1)).status == 201
    big_json = b"[" + b"1," * limit + b"1]"
    response = server.request("PUT", "/kv/big.json", body=big_json, headers={"Content-Type": "application/json"})
    assert response.status == 201
    document = dump(server)
    assert document["at-limit"] == "a" * limit
    assert document["big one"] == {"size": limit + 1, "href": "/kv/big%20one"}
    assert document["big.json"] == {"size": len(big_json), "href": "/kv/big.json"}
    href = document["big one"]["href"]
    assert server.get(href).body == b"b" * (limit + 1)


def test_dump_is_framed_so_the_connection_can_be_reused(server):
    server.get("/set?a=1")
    connection = server.connect()
    response = server.get("/", connection=connection)
    chunked = response.headers.get("Transfer-Encoding", "").lower() == "chunked"
    assert chunked or response.headers["Content-Length"] == str(len(response.body))
    assert response.json() == {"a": "1"}
    assert server.get("/get?key=a", connection=connection).body == b"1"


# /health


def test_health_reports_status_storage_and_key_count(server):
    response = server.get("/health")
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {"status": "ok", "storage": "files", "keys": 0}
    server.get("/set?a=1")
    server.get("/set?b=2")
    assert server.get("/health").json() == {"status": "ok", "storage": "files", "keys": 2}


def test_health_names_memory_storage(make_live_server):
    server = make_live_server("memory")
    assert server.get("/health").json() == {"status": "ok", "storage": "memory", "keys": 0}


# Unknown paths and methods, and error bodies (SPEC sections 4 and 6)


@pytest.mark.parametrize("path", ["/nosuch", "/sets?a=1", "/get/name", "/SET?a=1", "/favicon.ico", "/kv"])
def test_an_unknown_path_is_a_404(shared, path):
    before = key_count(shared)
    assert_problem(shared.get(path), 404)
    assert key_count(shared) == before


@pytest.mark.parametrize(
    "method, path",
    [("POST", "/set?a=1"), ("PUT", "/get?key=a"), ("DELETE", "/delete?key=a"), ("POST", "/keys"),
     ("DELETE", "/"), ("PATCH", "/health"), ("PUT", "/"), ("OPTIONS", "/set?a=1")],
)  # fmt: skip
def test_a_known_method_not_allowed_on_a_route_is_a_405_with_allow(shared, method, path):
    shared.get("/set?a=1")
    before = key_count(shared)
    response = shared.request(method, path, body=b"" if method in ("POST", "PUT", "PATCH") else None)
    assert_problem(response, 405, method)
    allowed = [name.strip() for name in response.headers["Allow"].split(",")]
    assert "GET" in allowed
    assert method not in allowed
    assert shared.get("/get?key=a").body == b"1"
    assert key_count(shared) == before


def test_an_unknown_method_is_a_501(shared):
    response = shared.request("BREW", "/")
    assert_problem(response, 501, "BREW")


def test_an_unknown_method_on_a_raw_socket_is_a_501_problem(shared):
    answer = shared.raw(b"BREW /pot HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n", timeout=5)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 501 ")
    assert b"content-type: application/problem+json" in head.lower()
    assert json.loads(body)["status"] == 501


def test_error_details_say_what_was_wrong(shared):
    assert "no-such-name" in assert_problem(shared.get("/get?key=no-such-name"), 404)["detail"]
    assert "limit" in assert_problem(shared.get("/keys?limit=0"), 400)["detail"]
    assert "10000" in assert_problem(shared.get("/keys?limit=0"), 400)["detail"]
    assert "key=" in assert_problem(shared.get("/get?nokey=1"), 400)["detail"]
    assert "/nosuch" in assert_problem(shared.get("/nosuch"), 404)["detail"]
    for response in [shared.get("/set?a"), shared.get("/get?key=%FF"), shared.request("BREW", "/")]:
        problem = response.problem()
        assert problem["title"] != problem["detail"]
        assert "Traceback" not in problem["detail"]


# Transport (SPEC section 9)


def has_framing(response: Response) -> bool:
    if response.headers.get("Transfer-Encoding", "").lower() == "chunked":
        return True
    return response.headers.get("Content-Length") == str(len(response.body))


def test_several_requests_share_one_keep_alive_connection(shared):
    connection = shared.connect()
    responses = [shared.get("/set?ka-name=Guido", connection=connection)]
    sock = connection.sock
    assert sock is not None
    for path in [
        "/get?key=ka-name",
        "/keys",
        "/",
        "/health",
        "/get?key=missing",
        "/set?ka-name=Barry",
        "/delete?key=ka-name",
    ]:
        responses.append(shared.get(path, connection=connection))
        assert connection.sock is sock, f"the shared closed the connection after {path}"
    assert [response.status for response in responses] == [201, 200, 200, 200, 200, 404, 200, 200]
    assert responses[1].body == b"Guido"
    for response in responses:
        assert has_framing(response), response.headers
        assert response.headers.get("Connection", "").lower() != "close"


def test_an_http_1_0_request_is_served(shared):
    shared.get("/set?name10=Guido")
    response = parse_response(shared.raw(b"GET /get?key=name10 HTTP/1.0\r\n\r\n", timeout=5))
    assert response.status == 200
    assert response.body == b"Guido"
    assert response.headers["Content-Length"] == "5"


def test_an_http_1_0_request_for_the_dump_gets_a_body_without_chunks(server):
    server.get("/set?name=Guido")
    answer = server.raw(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n", timeout=5)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert re.match(rb"HTTP/1\.[01] 200 ", head), head
    assert b"chunked" not in head.lower()
    assert json.loads(body) == {"name": "Guido"}


def test_an_http_1_0_keep_alive_client_gets_framed_responses(shared):
    shared.get("/set?ka10=1")
    with socket.create_connection((shared.host, shared.port), timeout=5) as sock:
        sock.sendall(b"GET /get?key=ka10 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        response = read_http(sock.makefile("rb"))
    assert response.status == 200
    assert response.headers["Content-Length"] == "1" and response.body == b"1"


def test_a_keep_alive_round_trip_on_loopback_is_fast(shared):
    # A regression guard against the 40 ms stall of Nagle's algorithm meeting delayed ACKs.
    shared.get("/set?rt=Guido")
    connection = shared.connect()
    for _ in range(5):
        shared.get("/get?key=rt", connection=connection)
    times = []
    for i in range(50):
        started = time.perf_counter()
        path = "/get?key=rt" if i % 2 else "/keys?limit=5"
        response = shared.get(path, connection=connection)
        times.append(time.perf_counter() - started)
        assert response.status == 200
    assert statistics.median(times) < 0.020, f"median round trip {statistics.median(times) * 1000:.1f} ms"


# Access log (SPEC sections 8 and 9)

CLF = re.compile(
    r"^(?P<host>\S+) (?P<ident>\S+) (?P<user>\S+) \[(?P<time>\d{2}/[A-Z][a-z]{2}/\d{4}:\d{2}:\d{2}:\d{2} [+-]\d{4})\] "
    r'"(?P<request>[^"]*)" (?P<status>\d{3}) (?P<size>\d+|-)$'
)


def log_lines(server: Server, count: int) -> list[str]:
    def enough():
        lines = [line for line in server.stderr().splitlines() if line.strip()]
        return lines if len(lines) >= count else None

    return wait_for(enough, timeout=5, what=f"{count} access log lines")


def test_the_access_log_is_in_common_log_format_on_stderr(make_server):
    server = make_server()
    server.get("/set?name=Guido")
    server.get("/get?key=name")
    server.get("/get?key=missing")
    lines = log_lines(server, 3)
    assert len(lines) == 3, lines
    for line in lines:
        assert CLF.match(line), f"not Common Log Format: {line!r}"
    parsed = [CLF.match(line) for line in lines]
    assert [(m["host"], m["ident"], m["user"]) for m in parsed] == [("127.0.0.1", "-", "-")] * 3
    assert [m["status"] for m in parsed] == ["201", "200", "404"]
    assert parsed[0]["request"] == "GET /set?name=… HTTP/1.1"
    assert parsed[1]["size"] == "5"


def test_the_access_log_never_holds_a_set_value(make_server):
    server = make_server()
    server.get("/set?name=hunter2")
    server.get("/set?key=password&value=correct+horse&ttl=60")
    server.get("/set?token=s3cr3t%20value")
    lines = log_lines(server, 3)
    log = server.stderr()
    for secret in ["hunter2", "correct", "horse", "s3cr3t"]:
        assert secret not in log
    assert '"GET /set?name=… HTTP/1.1" 201 ' in lines[0]
    assert '"GET /set?key=password&value=…&ttl=60 HTTP/1.1" 201 ' in lines[1]
    assert '"GET /set?token=… HTTP/1.1" 201 ' in lines[2]


def test_quiet_turns_the_access_log_off(make_server):
    server = make_server("--quiet")
    server.get("/set?name=Guido")
    server.get("/nosuch")
    assert server.stop() == 0
    assert server.stderr().strip() == ""
