"""The REST routes, SPEC section 4: PUT, GET, HEAD and DELETE on /kv/<key>, streamed both ways,
with conditional requests; plus what sections 2, 3, 6 and 8 say about them.

Most tests talk to a kvserver running in this process through http.client (`server.request`);
those that care about the bytes on the wire (100 Continue, no body after HEAD, chunk framing, a
client that hangs up) use a raw socket and conftest's `read_http`, after waitress's functional
tests. Restarts and the server's memory use a subprocess (`process_server`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.parse
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import (
    RawConnection,
    Response,
    Server,
    assert_problem,
    parse_response,
    read_http,
    require_service,
    vm_bytes,
    wait_for,
)

KiB = 1024
MiB = 1024 * KiB


def exchange_and_close(
    server: Server, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[Response, bytes]:
    """Send a request asking the server to close after it; return the answer's status and headers
    (its body not read) and every byte that followed the headers."""
    with RawConnection(server) as connection:
        connection.request(method, path, {**(headers or {}), "Connection": "close"})
        received = connection.read_to_eof()
    head, separator, rest = received.partition(b"\r\n\r\n")
    assert separator, f"no complete head in {received[:200]!r}"
    return read_http(io.BytesIO(head + separator), "HEAD"), rest


# Helpers over http.client


def put(server: Server, path: str, body: bytes = b"", headers: dict[str, str] | None = None):
    return server.request("PUT", path, body=body, headers=headers)


def keys(server: Server) -> list[str]:
    return server.get("/keys").json()["keys"]


def data_files(server: Server) -> dict[str, bytes]:
    """The files of the data dir and of its .kvserver/tmp and .kvserver/meta, with their bytes."""
    root = server.data_dir
    folders = [root, root / ".kvserver" / "tmp", root / ".kvserver" / "meta"]
    return {
        str(path.relative_to(root)): path.read_bytes()
        for folder in folders
        if folder.exists()
        for path in folder.iterdir()
        if path.is_file() and path.name != "lock"
    }


def temporary_files(server: Server) -> list[Path]:
    return list((server.data_dir / ".kvserver" / "tmp").iterdir())


# PUT


def test_put_answers_201_for_a_new_key_and_200_when_it_replaces_one(server):
    created = put(server, "/kv/greeting", b"hello")
    assert created.status == 201
    assert created.headers["Content-Type"] == "application/json"
    assert created.json() == {"key": "greeting", "created": True, "etag": created.json()["etag"]}

    replaced = put(server, "/kv/greeting", b"hi")
    assert replaced.status == 200
    assert replaced.json()["created"] is False
    assert replaced.json()["key"] == "greeting"
    assert server.get("/kv/greeting").body == b"hi"


def test_the_etag_header_of_a_put_is_its_json_etag_in_quotes_and_what_get_gives(server):
    response = put(server, "/kv/tagged", b"value")
    etag = response.json()["etag"]
    assert isinstance(etag, str) and etag and '"' not in etag
    assert response.headers["ETag"] == f'"{etag}"'
    assert server.get("/kv/tagged").headers["ETag"] == f'"{etag}"'


def test_every_write_that_changes_bytes_or_media_type_changes_the_etag(server):
    first = put(server, "/kv/k", b"aaaa", {"Content-Type": "text/plain"}).json()["etag"]
    other_bytes = put(server, "/kv/k", b"bbbb", {"Content-Type": "text/plain"}).json()["etag"]
    other_type = put(server, "/kv/k", b"bbbb", {"Content-Type": "text/csv"}).json()["etag"]
    assert len({first, other_bytes, other_type}) == 3


@pytest.mark.parametrize("size", [10, 100 * KiB], ids=["small", "large"])
def test_etags_stay_the_same_across_a_restart(process_server, size):
    put(process_server, "/kv/plain", os.urandom(size))
    put(process_server, "/kv/typed?ttl=3600", b"x" * size, {"Content-Type": "text/x-typed"})
    before = {path: process_server.get(path).headers["ETag"] for path in ("/kv/plain", "/kv/typed")}
    process_server.restart()
    after = {path: process_server.get(path).headers["ETag"] for path in ("/kv/plain", "/kv/typed")}
    assert after == before
    assert process_server.get("/kv/typed").headers["Content-Type"] == "text/x-typed"


def test_the_content_type_sent_with_put_is_stored_and_served_back(server):
    put(server, "/kv/page", b"<p>hi</p>", {"Content-Type": "text/html; charset=utf-8"})
    response = server.get("/kv/page")
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert response.body == b"<p>hi</p>"


def test_a_put_without_content_type_is_stored_as_octet_stream_even_for_text(server):
    put(server, "/kv/untyped", b"plain text")
    assert server.get("/kv/untyped").headers["Content-Type"] == "application/octet-stream"


def test_a_content_type_with_a_control_character_is_a_400_and_stores_nothing(server):
    with RawConnection(server) as connection:
        connection.request("PUT", "/kv/k", {"Content-Type": "text/plain\x01", "Content-Length": "3"}, b"abc")
        response = connection.response()
    assert response.status == 400
    assert "Content-Type" in response.problem()["detail"]
    assert server.get("/kv/k").status == 404


def test_a_content_type_with_a_tab_between_its_parameters_is_stored_as_sent(server):
    """OWS between media-type parameters is space or tab (RFC 9110 sections 5.6.3, 8.3.1)."""
    answer = server.raw(
        b"PUT /kv/tabbed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain;\tcharset=utf-8\r\n"
        b"Content-Length: 3\r\nConnection: close\r\n\r\nabc"
    )
    assert answer.startswith(b"HTTP/1.1 201 "), answer
    assert server.get("/kv/tabbed").headers["Content-Type"] == "text/plain;\tcharset=utf-8"


@pytest.mark.parametrize(
    "content_type",
    [b"", b"text/html\xa0", b"text/html\xa0 \xa0x", b"t/x" * 342],
    ids=["empty", "nbsp", "nbsps", "over 1,024 characters"],
)
def test_a_content_type_that_is_not_printable_ascii_is_a_400_not_trimmed_or_collapsed(server, content_type):
    """Field values are Latin-1: a no-break space (0xA0) is not whitespace to trim or collapse."""
    answer = server.raw(
        b"PUT /kv/k HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: " + content_type + b"\r\nContent-Length: 3\r\n\r\nabc"
    )
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert b"media type" in answer
    assert server.get("/kv/k").status == 404


def test_an_empty_body_stores_the_empty_value(server):
    assert put(server, "/kv/empty", b"").status == 201
    response = server.get("/kv/empty")
    assert response.status == 200
    assert response.body == b""
    assert response.headers["Content-Length"] == "0"


def test_a_value_put_with_a_ttl_expires_and_a_later_write_without_one_clears_it(server):
    assert put(server, "/kv/brief?ttl=1", b"soon gone").status == 201
    assert server.get("/kv/brief").status == 200
    put(server, "/kv/kept?ttl=1", b"first")
    assert put(server, "/kv/kept", b"second").status == 200  # no ttl: clears the earlier one

    wait_for(lambda: server.get("/kv/brief").status == 404, timeout=10, what="the 1 s TTL to expire")
    assert server.request("HEAD", "/kv/brief").status == 404
    assert "brief" not in keys(server)
    assert "brief" not in server.get("/", headers={"Accept": "application/json"}).json()
    assert server.get("/kv/kept").body == b"second"


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_a_value_with_a_ttl_carries_the_whole_seconds_it_has_left_rounded_up(server, method):
    assert put(server, "/kv/big?ttl=60", b"x" * (100 * KiB)).status == 201  # served from its file
    assert server.get("/set?key=small&value=v&ttl=3600").status == 201
    assert put(server, "/kv/forever", b"v").status == 201
    for path, ttl in [("/kv/big", 60), ("/get?key=big", 60), ("/kv/small", 3600), ("/get?key=small", 3600)]:
        response = server.request(method, path)
        assert response.status == 200, path
        assert int(response.headers["KV-TTL"]) in (ttl, ttl - 1), (path, response.headers["KV-TTL"])
    assert server.request(method, "/kv/forever").headers["KV-TTL"] is None
    etag = server.get("/kv/big").headers["ETag"]
    assert server.get("/kv/big", headers={"If-None-Match": etag}).headers["KV-TTL"] in ("60", "59")


def test_kv_ttl_never_says_0_while_the_value_is_served(server):
    assert put(server, "/kv/brief?ttl=1", b"soon gone").status == 201
    answers = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (response := server.get("/kv/brief")).status == 200:
        answers.append(response.headers["KV-TTL"])
    assert answers and set(answers) <= {"1"}, answers


def test_a_ttl_expiry_holds_across_a_restart(process_server):
    put(process_server, "/kv/fleeting?ttl=2", b"gone after a restart")
    # Text stored as text: only the TTL tells this value from one a file on disk would give.
    put(process_server, "/kv/fleeting-text?ttl=2", b"gone too", {"Content-Type": "text/plain; charset=utf-8"})
    written = time.time()
    put(process_server, "/kv/lasting", b"stays")
    put(process_server, "/kv/long?ttl=3600", b"stays too")
    assert keys(process_server) == ["fleeting", "fleeting-text", "lasting", "long"]

    assert process_server.stop() == 0
    wait_for(lambda: time.time() > written + 2.2, timeout=5, what="the TTL to pass while the server is down")
    process_server.start()

    assert process_server.get("/kv/fleeting").status == 404
    assert process_server.get("/kv/fleeting-text").status == 404
    assert keys(process_server) == ["lasting", "long"]
    assert "fleeting" not in process_server.get("/", headers={"Accept": "application/json"}).json()
    assert process_server.get("/kv/lasting").body == b"stays"
    assert process_server.get("/kv/long").body == b"stays too"


@pytest.mark.parametrize("ttl", ["0", "-1", "1.5", "abc", "", "1e3", "%201"])
def test_a_ttl_that_is_not_a_positive_whole_number_is_a_400_and_stores_nothing(server, ttl):
    response = put(server, f"/kv/k?ttl={ttl}", b"value")
    assert_problem(response, 400)
    assert server.get("/kv/k").status == 404


@pytest.mark.parametrize("query", ["foo=1", "ttl=5&x=1", "ttl", "ttl=5&ttl=6"])
def test_an_unknown_or_repeated_query_field_on_put_is_a_400_and_stores_nothing(server, query):
    response = put(server, f"/kv/k?{query}", b"value")
    assert_problem(response, 400)
    assert server.get("/kv/k").status == 404


# Keys in the path


def test_the_key_is_the_rest_of_the_path_so_a_slash_and_percent_2f_name_one_key(server):
    assert put(server, "/kv/a/b", b"one").status == 201
    assert server.get("/kv/a%2Fb").body == b"one"
    replaced = put(server, "/kv/a%2Fb", b"two")
    assert replaced.status == 200
    assert replaced.json()["key"] == "a/b"
    assert server.get("/kv/a/b").body == b"two"
    assert keys(server) == ["a/b"]


@pytest.mark.parametrize(
    ("path", "key"),
    [
        ("/kv/with%20space", "with space"),
        ("/kv/" + urllib.parse.quote("ünï 😀"), "ünï 😀"),
        ("/kv/100%25", "100%"),
        ("/kv/..", ".."),
        ("/kv/../../etc/passwd", "../../etc/passwd"),
        ("/kv/a%3Fb", "a?b"),
        ("/kv/" + "k" * 1024, "k" * 1024),
    ],
    ids=["space", "non-ascii", "percent", "dot-dot", "climbing", "question-mark", "1024-bytes"],
)
def test_any_valid_key_round_trips_through_its_percent_decoded_path(server, path, key):
    response = put(server, path, b"value of " + key.encode())
    assert response.status == 201
    assert response.json()["key"] == key
    assert server.get(path).body == b"value of " + key.encode()
    assert keys(server) == [key]
    assert not (server.data_dir.parent / "etc").exists()
    assert not (server.data_dir.parent.parent / "etc").exists()


@pytest.mark.parametrize(
    "path",
    ["/kv/", "/kv/%FF", "/kv/%C3", "/kv/a%00b", "/kv/a%7Fb", "/kv/a%EF%BF%BEb", "/kv/%EF%BF%BF", "/kv/" + "k" * 1025],
    ids=["no-key", "invalid-utf8", "truncated-utf8", "nul", "del", "U+FFFE", "U+FFFF", "1025-bytes"],
)
def test_a_missing_or_invalid_key_is_a_400_for_every_method(server, path):
    for method in ("GET", "HEAD", "PUT", "DELETE"):
        response = server.request(method, path, body=b"x" if method == "PUT" else None)
        assert response.status == 400, method
        if method != "HEAD":
            assert response.problem()
    assert keys(server) == []


# GET and HEAD


def test_get_serves_the_value_with_its_headers_and_the_nosniff_and_sandbox_guards(server):
    put(server, "/kv/evil.svg", b"<svg onload='alert(1)'/>", {"Content-Type": "image/svg+xml"})
    response = server.get("/kv/evil.svg")
    assert response.status == 200
    assert response.body == b"<svg onload='alert(1)'/>"
    assert response.headers["Content-Type"] == "image/svg+xml"
    assert response.headers["Content-Length"] == str(len(response.body))
    assert response.headers["ETag"].startswith('"') and response.headers["ETag"].endswith('"')
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Content-Security-Policy"] == "sandbox"


def test_a_large_value_is_served_with_the_same_headers_as_a_small_one(server):
    value = os.urandom(300 * KiB)
    etag = put(server, "/kv/large", value, {"Content-Type": "application/x-large"}).headers["ETag"]
    response = server.get("/kv/large")
    assert response.status == 200
    assert response.body == value
    assert response.headers["Content-Type"] == "application/x-large"
    assert response.headers["Content-Length"] == str(len(value))
    assert response.headers["ETag"] == etag
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Content-Security-Policy"] == "sandbox"


def test_get_of_a_missing_key_is_a_404_problem(server):
    response = server.get("/kv/nothing-here")
    assert response.status == 404
    assert "nothing-here" in response.problem()["detail"]


@pytest.mark.parametrize("size", [5, 100 * KiB], ids=["small", "large"])
@pytest.mark.parametrize(
    "if_none_match",
    ["{etag}", "W/{etag}", "*", '"nope", {etag}', '"nope",{etag} , "other"'],
    ids=["exact", "weak", "star", "list", "list-unspaced"],
)
def test_get_answers_304_without_a_body_when_if_none_match_matches(server, if_none_match, size):
    etag = put(server, "/kv/cached", b"v" * size).headers["ETag"]
    for method in ("GET", "HEAD"):
        head, rest = exchange_and_close(
            server, method, "/kv/cached", {"If-None-Match": if_none_match.format(etag=etag)}
        )
        assert head.status == 304, method
        assert rest == b"", f"{len(rest)} bytes followed the 304's headers"
        assert head.headers["etag"] == etag


@pytest.mark.parametrize("if_none_match", ['"nope"', 'W/"nope"', '"nope", "other"'])
def test_get_answers_200_with_the_value_when_if_none_match_does_not_match(server, if_none_match):
    put(server, "/kv/cached", b"fresh")
    response = server.get("/kv/cached", headers={"If-None-Match": if_none_match})
    assert response.status == 200
    assert response.body == b"fresh"


def test_a_304_stops_matching_once_the_value_changes(server):
    old = put(server, "/kv/k", b"one").headers["ETag"]
    put(server, "/kv/k", b"two")
    response = server.get("/kv/k", headers={"If-None-Match": old})
    assert response.status == 200
    assert response.body == b"two"


@pytest.mark.parametrize("size", [9, 200 * KiB], ids=["small", "large"])
def test_head_gives_the_get_headers_and_not_one_byte_of_body(server, size):
    put(server, "/kv/headed", b"h" * size, {"Content-Type": "text/plain"})
    got = server.get("/kv/headed")
    head, rest = exchange_and_close(server, "HEAD", "/kv/headed")
    assert head.status == 200
    assert rest == b"", f"{len(rest)} bytes followed the HEAD answer's headers"
    for name in ("Content-Type", "Content-Length", "ETag", "X-Content-Type-Options", "Content-Security-Policy"):
        assert head.headers[name.lower()] == got.headers[name], name
    assert head.headers["content-length"] == str(size)


def test_head_then_get_on_one_connection_leaves_the_second_answer_intact(server):
    put(server, "/kv/k", b"body bytes")
    with RawConnection(server) as connection:
        connection.request("HEAD", "/kv/k")
        assert connection.response("HEAD").status == 200
        connection.request("GET", "/kv/k")
        response = connection.response()
    assert response.status == 200
    assert response.body == b"body bytes"


@pytest.mark.parametrize("change", ["truncated", "grown"])
def test_a_value_file_changed_by_hand_is_a_quick_500_never_a_wrong_length(server, change, capfd):
    value = os.urandom(151_344)
    assert put(server, "/kv/big", value).status == 201
    with open(server.data_dir / "big", "r+b") as file:
        if change == "truncated":
            file.truncate(6)
        else:
            file.seek(0, os.SEEK_END)
            file.write(b"more")
    started = time.monotonic()
    assert server.request("HEAD", "/kv/big").status == 500
    assert server.get("/kv/big").problem()["status"] == 500
    assert time.monotonic() - started < 5, "the client waited for bytes that never came"
    assert "changed while the server ran" in capfd.readouterr().err
    assert put(server, "/kv/big", b"rewritten").status == 200  # a write puts it right
    assert server.get("/kv/big").body == b"rewritten"


def test_head_of_a_missing_key_is_a_404_without_a_body(server):
    head, rest = exchange_and_close(server, "HEAD", "/kv/missing")
    assert head.status == 404
    assert rest == b""


# DELETE


def test_delete_answers_204_then_404(server):
    put(server, "/kv/doomed", b"x")
    deleted, rest = exchange_and_close(server, "DELETE", "/kv/doomed")
    assert deleted.status == 204
    assert rest == b"", "a 204 has no body"
    assert server.get("/kv/doomed").status == 404
    again = server.request("DELETE", "/kv/doomed")
    assert_problem(again, 404)


def test_delete_with_the_right_if_match_removes_the_value(server):
    etag = put(server, "/kv/k", b"x").headers["ETag"]
    assert server.request("DELETE", "/kv/k", headers={"If-Match": etag}).status == 204
    assert server.get("/kv/k").status == 404


def test_delete_with_a_wrong_if_match_is_a_412_and_keeps_the_value(server):
    etag = put(server, "/kv/k", b"keep me").headers["ETag"]
    response = server.request("DELETE", "/kv/k", headers={"If-Match": '"not-the-etag"'})
    assert_problem(response, 412)
    kept = server.get("/kv/k")
    assert kept.body == b"keep me"
    assert kept.headers["ETag"] == etag


def test_delete_with_if_none_match_star_on_an_existing_key_is_a_412(server):
    put(server, "/kv/k", b"still here")
    response = server.request("DELETE", "/kv/k", headers={"If-None-Match": "*"})
    assert_problem(response, 412)
    assert server.get("/kv/k").body == b"still here"


@pytest.mark.parametrize("if_match", ['"some-etag"', "*"])
def test_a_conditional_delete_of_a_missing_key_is_a_404_not_a_412(server, if_match):
    """Without its If-Match, this DELETE is a 404, so the condition is ignored (RFC 9110 section 13.2.1)."""
    assert_problem(server.request("DELETE", "/kv/missing", headers={"If-Match": if_match}), 404)


# Conditional reads: If-Match is evaluated on GET and HEAD too (RFC 9110 section 13.1.1, MUST)


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("path", ["/kv/k", "/get?key=k"])
def test_a_read_with_a_stale_if_match_is_a_412_not_the_current_value(server, method, path):
    put(server, "/kv/k", b"current")
    response = server.request(method, path, headers={"If-Match": '"stale"'})
    assert response.status == 412, (response.status, response.body)
    if method == "GET":
        assert_problem(response, 412)


@pytest.mark.parametrize("if_match", ["etag", "*"])
def test_a_read_whose_if_match_holds_gets_the_value(server, if_match):
    etag = put(server, "/kv/k", b"current").headers["ETag"]
    response = server.get("/kv/k", headers={"If-Match": etag if if_match == "etag" else "*"})
    assert (response.status, response.body) == (200, b"current")


def test_a_read_of_a_missing_key_with_if_match_is_a_404(server):
    assert_problem(server.get("/kv/missing", headers={"If-Match": "*"}), 404)


def test_a_read_with_a_malformed_if_match_is_a_400(server):
    put(server, "/kv/k", b"current")
    assert_problem(server.get("/kv/k", headers={"If-Match": 'W/"weak"'}), 400)


def test_a_delete_with_a_query_is_a_400_and_deletes_nothing(server):
    put(server, "/kv/k", b"kept")
    assert_problem(server.request("DELETE", "/kv/k?ttl=abc"), 400)
    assert server.get("/kv/k").body == b"kept"


@pytest.mark.parametrize("wait", ["", "?wait=5"])
def test_an_if_none_match_that_holds_no_quoted_etag_is_a_400_at_once(server, wait):
    """The ETag of a PUT's JSON answer has no quotes: sent as it is, it would never match, and a
    waiting GET would answer 200 at once, every time."""
    etag = put(server, "/kv/k", b"v").json()["etag"]
    started = time.monotonic()
    assert_problem(server.get("/kv/k" + wait, headers={"If-None-Match": etag}), 400)
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("form", ['"{}"', 'W/"{}"', '"other", "{}"', '"other",W/"{}"', '"{}" , ', "*"])
def test_an_if_none_match_list_that_names_the_value_is_a_304(server, form):
    etag = put(server, "/kv/k", b"v").json()["etag"]
    assert server.get("/kv/k", headers={"If-None-Match": form.format(etag)}).status == 304


def test_a_put_with_two_content_type_fields_is_a_400_and_stores_nothing(server):
    """Joined, they would be stored and served as one media type, "text/plain, text/html"."""
    received = server.raw(
        b"PUT /kv/k HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/plain\r\nContent-Type: text/html\r\n"
        b"Content-Length: 1\r\n\r\nx",
        half_close=True,
    )
    answer = parse_response(received)
    assert answer.status == 400 and b"one Content-Type" in answer.body, received
    assert "k" not in server.storage


# Conditional PUT


def test_put_with_the_right_if_match_answers_200_with_a_new_etag(server):
    old = put(server, "/kv/k", b"one").headers["ETag"]
    response = put(server, "/kv/k", b"two", {"If-Match": old})
    assert response.status == 200
    assert response.headers["ETag"] != old
    assert response.headers["ETag"] == f'"{response.json()["etag"]}"'
    assert server.get("/kv/k").body == b"two"


def test_put_with_a_wrong_if_match_is_a_412_problem_and_changes_nothing(server):
    etag = put(server, "/kv/k", b"original", {"Content-Type": "text/plain"}).headers["ETag"]
    response = put(server, "/kv/k?ttl=1", b"intruder", {"If-Match": '"stale"', "Content-Type": "text/html"})
    assert_problem(response, 412)
    kept = server.get("/kv/k")
    assert (kept.body, kept.headers["ETag"], kept.headers["Content-Type"]) == (b"original", etag, "text/plain")


def test_put_with_if_match_on_a_missing_key_is_a_412_and_creates_nothing(server):
    for if_match in ('"whatever"', "*"):
        response = put(server, "/kv/absent", b"x", {"If-Match": if_match})
        assert response.status == 412, if_match
        assert response.problem()
    assert server.get("/kv/absent").status == 404
    assert keys(server) == []


@pytest.mark.parametrize("if_match", ['"stale"', None])
def test_a_put_too_large_is_a_413_whatever_its_precondition(make_live_server, if_match):
    """The request's own checks come before its preconditions (RFC 9110 section 13.2.1): a
    client told 412 would read the value again and retry, only to get the 413 then."""
    server = make_live_server(max_value=10)
    put(server, "/kv/k", b"small")
    conditions = {"If-Match": if_match} if if_match else {"If-None-Match": "*"}
    assert_problem(put(server, "/kv/k", b"x" * 100, conditions), 413)
    assert server.get("/kv/k").body == b"small"


@pytest.mark.parametrize(
    "bad", [{"Content-Encoding": "gzip"}, {"Content-Type": "t\u00e9xt/plain".encode().decode("latin-1")}]
)
def test_a_put_refused_as_a_400_is_a_400_whatever_its_precondition(server, bad):
    put(server, "/kv/k", b"small")
    assert_problem(put(server, "/kv/k", b"x", {"If-Match": '"stale"', **bad}), 400)
    assert server.get("/kv/k").body == b"small"


def test_put_with_if_match_star_replaces_an_existing_value(server):
    put(server, "/kv/k", b"one")
    assert put(server, "/kv/k", b"two", {"If-Match": "*"}).status == 200
    assert server.get("/kv/k").body == b"two"


@pytest.mark.parametrize(
    "if_match", ['*, "{etag}"', '"{etag}", *', '"{etag}" x', 'x "{etag}"', 'W/"{etag}"', '"{etag}", "{etag}"']
)
def test_if_match_with_anything_beside_one_strong_etag_is_a_400_and_changes_nothing(server, if_match):
    etag = put(server, "/kv/k", b"kept").json()["etag"]
    for method, body in (("PUT", b"replaced"), ("DELETE", b"")):
        response = server.request(method, "/kv/k", body=body, headers={"If-Match": if_match.format(etag=etag)})
        assert_problem(response, 400)
    assert server.get("/kv/k").body == b"kept"


def test_a_quoted_star_in_if_match_is_an_etag_no_value_has_not_any_value(server):
    """RFC 9110 section 8.8.3: "*" in quotes is an entity tag; only a bare * matches any value."""
    etag = put(server, "/kv/k", b"kept").headers["ETag"]
    assert_problem(put(server, "/kv/k", b"replaced", {"If-Match": '"*"'}), 412)
    assert_problem(server.request("DELETE", "/kv/k", headers={"If-Match": '"*"'}), 412)
    kept = server.get("/kv/k")
    assert (kept.body, kept.headers["ETag"]) == (b"kept", etag)


def test_a_put_with_content_range_is_a_400_and_changes_nothing(server):
    """curl -C - -T file (resuming an upload) sends the rest of the file with a Content-Range:
    stored as the whole value it would cut the value short (RFC 9110 section 14.5)."""
    put(server, "/kv/resumed", b"0123456789")
    response = put(server, "/kv/resumed", b"456789", {"Content-Range": "bytes 4-9/10"})
    assert_problem(response, 400)
    assert "Content-Range" in response.problem()["detail"]
    assert server.get("/kv/resumed").body == b"0123456789"


def test_put_with_if_none_match_star_creates_once_then_is_a_412(server):
    first = put(server, "/kv/once", b"first", {"If-None-Match": "*"})
    assert first.status == 201
    second = put(server, "/kv/once", b"second", {"If-None-Match": "*"})
    assert_problem(second, 412)
    kept = server.get("/kv/once")
    assert kept.body == b"first"
    assert kept.headers["ETag"] == first.headers["ETag"]


def test_a_failing_precondition_is_answered_before_100_continue(server):
    put(server, "/kv/k", b"original")
    headers = {"Content-Length": "5", "If-Match": '"stale"', "Expect": "100-continue"}
    with RawConnection(server) as connection:
        connection.request("PUT", "/kv/k", headers)
        response = connection.response()
    assert_problem(response, 412)
    assert server.get("/kv/k").body == b"original"


# Request bodies: 411, 413, 100 Continue


@pytest.mark.parametrize("coding", ["gzip", "br", "GZIP, identity"])
def test_a_put_with_a_content_coding_is_a_400_before_any_100_continue_and_changes_nothing(server, coding):
    """The coding could not be given back (kvserver serves the bytes it stores, without one): a
    browser would show the compressed bytes of what was sent as text/plain."""
    put(server, "/kv/k", b"original")
    headers = {"Content-Length": "5", "Content-Encoding": coding, "Expect": "100-continue", "Connection": "close"}
    with RawConnection(server) as connection:
        connection.request("PUT", "/kv/k", headers)
        received = connection.read_to_eof()
    assert b"100 Continue" not in received
    response = read_http(io.BytesIO(received))
    assert_problem(response, 400)
    assert "Content-Encoding" in response.problem()["detail"]
    assert server.get("/kv/k").body == b"original"


def test_content_encoding_identity_is_no_coding(server):
    assert put(server, "/kv/k", b"plain", {"Content-Encoding": "identity"}).status == 201
    assert server.get("/kv/k").body == b"plain"


def test_a_put_with_neither_content_length_nor_chunked_is_a_411(server):
    with RawConnection(server) as connection:
        connection.request("PUT", "/kv/k", {"Connection": "close"})
        response = connection.response()
    assert_problem(response, 411)
    assert server.get("/kv/k").status == 404


def test_an_oversized_declared_length_is_a_413_before_any_100_continue_and_not_a_reset(make_server):
    server = make_server("--quiet", "--max-value", "1K")
    with RawConnection(server) as connection:
        connection.request("PUT", "/kv/big", {"Content-Length": str(KiB + 1), "Expect": "100-continue"})
        received = connection.read_to_eof()  # a ConnectionResetError here fails the test
    assert received.startswith(b"HTTP/1.1 413 "), received[:80]
    assert b"100 Continue" not in received
    response = read_http(io.BytesIO(received))
    assert str(KiB) in response.problem()["detail"]
    assert server.get("/kv/big").status == 404
    assert temporary_files(server) == []


def test_an_oversized_body_sent_without_waiting_is_a_413_and_not_a_reset(make_server):
    server = make_server("--quiet", "--max-value", "1K")
    put(server, "/kv/big", b"old")
    with RawConnection(server) as connection:
        # More than the server's read buffer holds: it has to drain the rest before it closes,
        # or the unread bytes make the close a reset that can destroy the 413 in flight.
        connection.request("PUT", "/kv/big", {"Content-Length": str(8 * MiB)}, b"x" * 8 * MiB)
        received = connection.read_to_eof()  # a reset (or a broken pipe above) fails the test
    assert read_http(io.BytesIO(received)).status == 413
    assert server.get("/kv/big").body == b"old"


def test_a_value_of_exactly_max_value_bytes_is_accepted(make_server):
    server = make_server("--quiet", "--max-value", "1K")
    assert put(server, "/kv/edge", b"e" * KiB).status == 201
    assert put(server, "/kv/over", b"e" * (KiB + 1)).status == 413
    assert server.get("/kv/edge").body == b"e" * KiB
    assert server.get("/kv/over").status == 404


def test_a_chunked_body_over_max_value_is_a_413_and_stores_nothing(make_server):
    server = make_server("--quiet", "--max-value", "1K")
    put(server, "/kv/old", b"old value")
    before = data_files(server)
    chunk = b"c" * 600
    body = b"258\r\n" + chunk + b"\r\n" + b"258\r\n" + chunk + b"\r\n" + b"0\r\n\r\n"
    for key in ("new", "old"):
        with RawConnection(server) as connection:
            connection.request("PUT", f"/kv/{key}", {"Transfer-Encoding": "chunked"}, body)
            response = connection.response()
            assert response.status == 413, key
            assert response.problem()
    assert server.get("/kv/new").status == 404
    assert server.get("/kv/old").body == b"old value"
    wait_for(lambda: data_files(server) == before, timeout=5, what="no file left by the refused uploads")


def test_expect_100_continue_with_an_acceptable_length_gets_100_then_201(server):
    value = b"sent after 100 Continue"
    with RawConnection(server) as connection:
        connection.request("PUT", "/kv/k", {"Content-Length": str(len(value)), "Expect": "100-continue"})
        interim = connection.response()
        assert interim.status == 100
        connection.send(value)
        final = connection.response()
    assert final.status == 201
    assert final.headers["etag"] == f'"{json.loads(final.body)["etag"]}"'
    assert server.get("/kv/k").body == value


def test_an_http_1_0_client_gets_no_100_continue(server):
    with RawConnection(server) as connection:
        connection.send(
            b"PUT /kv/old-client HTTP/1.0\r\nHost: localhost\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\nabc"
        )
        received = connection.read_to_eof()
    assert b"100 Continue" not in received
    assert read_http(io.BytesIO(received)).status == 201
    assert server.get("/kv/old-client").body == b"abc"


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Transfer-Encoding": "gzip"}, 501),
        ({"Transfer-Encoding": "chunked", "Content-Length": "3"}, 400),
        ({"Content-Length": "abc"}, 400),
        ({"Content-Length": "-3"}, 400),
    ],
    ids=["unknown-coding", "both", "not-a-number", "negative"],
)
def test_a_body_framing_the_server_cannot_trust_is_refused_and_stores_nothing(server, headers, status):
    with RawConnection(server) as connection:
        connection.request("PUT", "/kv/k", {**headers, "Connection": "close"}, b"abc")
        response = connection.response()
    assert_problem(response, status)
    assert server.get("/kv/k").status == 404


def test_a_method_the_kv_route_does_not_take_is_a_405_with_allow_and_an_unknown_one_a_501(server):
    response = server.request("POST", "/kv/k", body=b"x")
    assert_problem(response, 405)
    allowed = {method.strip() for method in response.headers["Allow"].split(",")}
    assert {"GET", "HEAD", "PUT", "DELETE"} <= allowed
    assert "POST" not in allowed
    assert server.request("BREW", "/kv/k").status == 501


# Chunked uploads


def test_a_chunked_upload_with_extensions_and_trailers_stores_the_exact_bytes(server):
    pieces = [b"hello", b"\r\n0\r\n\r\n looks like framing", bytes(range(256)), b"z" * 70_000]
    body = b"5;name=value\r\n" + pieces[0] + b"\r\n"
    body += b'%X;a;b="c"\r\n' % len(pieces[1]) + pieces[1] + b"\r\n"
    body += b"%x\r\n" % len(pieces[2]) + pieces[2] + b"\r\n"
    body += b"%X\r\n" % len(pieces[3]) + pieces[3] + b"\r\n"
    body += b"0;last\r\nX-Checksum: abc\r\nX-Other: 1\r\n\r\n"
    with RawConnection(server) as connection:
        connection.request(
            "PUT", "/kv/chunky", {"Transfer-Encoding": "chunked", "Content-Type": "application/x-test"}, body
        )
        response = connection.response()
        assert response.status == 201
        assert not response.closes
        connection.request("GET", "/kv/chunky")  # the trailers were read: the connection is in step
        got = connection.response()
    assert got.status == 200
    assert got.body == b"".join(pieces)
    assert got.headers["content-type"] == "application/x-test"


def test_an_empty_chunked_upload_stores_the_empty_value(server):
    with RawConnection(server) as connection:
        connection.request("PUT", "/kv/nothing", {"Transfer-Encoding": "chunked"}, b"0\r\n\r\n")
        assert connection.response().status == 201
    response = server.get("/kv/nothing")
    assert (response.status, response.body) == (200, b"")


def curl(*args: str, data: bytes | None = None) -> subprocess.CompletedProcess:
    """Run curl (verbose, so stderr shows the request headers it sent); fail on an HTTP error."""
    if shutil.which("curl") is None:
        require_service("curl is not on PATH")
    result = subprocess.run(
        ["curl", "--silent", "--show-error", "--verbose", "--fail", "--noproxy", "*", "--max-time", "60", *args],
        input=data,
        capture_output=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result


def test_curl_t_dash_uploads_stdin_chunked(server):
    value = os.urandom(3 * MiB + 17)
    result = curl("-T", "-", f"{server.url}/kv/from-stdin", data=value)
    assert b"> Transfer-Encoding: chunked" in result.stderr
    answer = json.loads(result.stdout)
    assert answer["created"] is True
    assert answer["key"] == "from-stdin"
    got = server.get("/kv/from-stdin")
    assert hashlib.sha256(got.body).hexdigest() == hashlib.sha256(value).hexdigest()


def test_curl_t_file_and_curl_o_round_trip_byte_for_byte(server, tmp_path):
    source = tmp_path / "upload.bin"
    source.write_bytes(os.urandom(5 * MiB + 3))
    result = curl("-T", str(source), "-H", "Content-Type: application/x-blob", f"{server.url}/kv/blob")
    assert b"< HTTP/1.1 100 Continue" in result.stderr, "curl asks to continue for a body this big"
    assert json.loads(result.stdout)["created"] is True
    target = tmp_path / "download.bin"
    curl("-o", str(target), f"{server.url}/kv/blob")
    assert target.read_bytes() == source.read_bytes()
    assert server.request("HEAD", "/kv/blob").headers["Content-Type"] == "application/x-blob"


# Uploads cut off half way


@pytest.mark.parametrize("existing", [False, True], ids=["new-key", "existing-key"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_an_upload_cut_off_half_way_stores_nothing_and_leaves_no_file(server, framing, existing):
    if existing:
        etag = put(server, "/kv/cut", b"the old value").headers["ETag"]
    before = data_files(server)
    half = os.urandom(MiB // 2)
    if framing == "chunked":
        headers, body = {"Transfer-Encoding": "chunked"}, b"%x\r\n" % MiB + half
    else:
        headers, body = {"Content-Length": str(MiB)}, half
    with RawConnection(server) as connection:
        connection.request("PUT", "/kv/cut", headers, body)
        wait_for(lambda: temporary_files(server), timeout=10, what="the upload to reach a temporary file")
    # The client is gone; the server must notice, drop the temporary file and store nothing.
    wait_for(lambda: not temporary_files(server), timeout=10, what="the temporary file to be removed")
    assert data_files(server) == before
    if existing:
        kept = server.get("/kv/cut")
        assert (kept.body, kept.headers["ETag"]) == (b"the old value", etag)
    else:
        assert server.get("/kv/cut").status == 404
    assert keys(server) == (["cut"] if existing else [])


# Streaming: server memory stays flat


def test_a_200_mib_value_streams_in_and_out_while_server_memory_stays_flat(process_server):
    size, block_size = 200 * MiB, MiB
    block = bytearray(os.urandom(block_size))
    pid = process_server.process.pid
    put(process_server, "/kv/warm-up", os.urandom(MiB))  # allocate what any large PUT and GET allocate
    assert len(process_server.get("/kv/warm-up").body) == MiB
    rss_before = vm_bytes(pid, "VmRSS")

    sent = hashlib.sha256()

    def body():
        for index in range(size // block_size):
            block[:8] = index.to_bytes(8, "big")  # every block different
            chunk = bytes(block)
            sent.update(chunk)
            yield chunk

    connection = process_server.connect(timeout=120)
    connection.request("PUT", "/kv/huge", body=body(), headers={"Content-Length": str(size)})
    response = connection.getresponse()
    assert response.status == 201, response.read()
    response.read()

    connection.request("GET", "/kv/huge")
    response = connection.getresponse()
    assert response.status == 200
    assert response.headers["Content-Length"] == str(size)
    received, count = hashlib.sha256(), 0
    while chunk := response.read(block_size):
        received.update(chunk)
        count += len(chunk)
    assert count == size
    assert received.hexdigest() == sent.hexdigest()

    growth = vm_bytes(pid, "VmHWM") - rss_before
    assert growth < 32 * MiB, f"the server's peak RSS rose by {growth / MiB:.1f} MiB"
    assert (process_server.data_dir / "huge").stat().st_size == size


# Races: compare-and-set is atomic


THREADS = 16


def test_racing_if_match_writers_get_exactly_one_winner_per_etag(server):
    put(server, "/kv/contested", b"start")
    barrier = threading.Barrier(THREADS, timeout=20)
    rounds = 5
    results: list[tuple[int, int, str, int]] = []  # round, thread, If-Match sent, status
    lock = threading.Lock()

    def contender(thread: int) -> None:
        connection = server.connect()  # kept alive where the server allows; reopened where not
        for round_ in range(rounds):
            barrier.wait()
            head = server.request("HEAD", "/kv/contested", connection=connection)
            assert head.status == 200
            etag = head.headers["ETag"]
            barrier.wait()  # every thread holds this round's ETag before anyone writes
            body = f"{round_}:{thread}".encode()
            response = server.request("PUT", "/kv/contested", body, {"If-Match": etag}, connection=connection)
            with lock:
                results.append((round_, thread, etag, response.status))

    with ThreadPoolExecutor(THREADS) as pool:
        for future in [pool.submit(contender, thread) for thread in range(THREADS)]:
            future.result(timeout=60)

    assert {status for *_, status in results} <= {200, 412}
    by_etag = Counter(etag for _, _, etag, status in results if status == 200)
    etags = {etag for _, _, etag, _ in results}
    assert len(etags) == rounds, "each round every thread read the same, new ETag"
    assert by_etag == dict.fromkeys(etags, 1), "exactly one write per ETag succeeded"
    winner = next((r, t) for r, t, _, status in results if status == 200 and r == rounds - 1)
    assert server.get("/kv/contested").body == f"{winner[0]}:{winner[1]}".encode()


def test_racing_create_only_writers_get_exactly_one_201(server):
    barrier = threading.Barrier(THREADS, timeout=20)

    def creator(key: str, thread: int) -> int:
        barrier.wait()
        return put(server, f"/kv/{key}", f"by {thread}".encode(), {"If-None-Match": "*"}).status

    with ThreadPoolExecutor(THREADS) as pool:
        for key in ("race-a", "race-b", "race-c"):
            statuses = list(pool.map(creator, [key] * THREADS, range(THREADS), timeout=60))
            assert sorted(statuses) == [201] + [412] * (THREADS - 1), key
            winner = statuses.index(201)
            assert server.get(f"/kv/{key}").body == f"by {winner}".encode()


# The / dump


def test_the_dump_links_values_over_64_kib_and_following_the_link_gives_the_value(server):
    big_key = "big/ü x?#%"
    big = os.urandom(64 * KiB + 1)
    put(server, "/kv/" + urllib.parse.quote(big_key, safe=""), big)
    put(server, "/kv/edge", b"a" * (64 * KiB))
    dump = server.get("/", headers={"Accept": "application/json"}).json()

    assert dump["edge"] == "a" * (64 * KiB), "a value of exactly 64 KiB is inline"
    link = dump[big_key]
    assert link == {"size": len(big), "href": link["href"]}
    href = link["href"]
    assert href.startswith("/kv/")
    assert href.isascii() and not any(c in href for c in " ?#"), href
    assert urllib.parse.unquote(href.removeprefix("/kv/")) == big_key
    assert server.get(href).body == big


def test_the_dump_inlines_json_values_and_falls_back_to_strings_and_base64(server):
    document = {"n": [1, 2.5, None, True], "s": "ü"}
    put(server, "/kv/json", json.dumps(document).encode(), {"Content-Type": "application/json"})
    put(server, "/kv/json-utf8", b"[1, 2, 3]", {"Content-Type": "application/json; charset=utf-8"})
    put(server, "/kv/json-upper", b"42", {"Content-Type": "Application/JSON"})
    put(server, "/kv/not-json", b"{not json", {"Content-Type": "application/json"})
    put(server, "/kv/json-text", b"[1, 2]", {"Content-Type": "text/plain"})
    put(server, "/kv/bytes", b"\xff\x00\xfe")
    dump = server.get("/", headers={"Accept": "application/json"}).json()
    assert dump == {
        "json": document,
        "json-utf8": [1, 2, 3],
        "json-upper": 42,
        "not-json": "{not json",
        "json-text": "[1, 2]",
        "bytes": {"base64": "/wD+"},
    }


# Keep-alive after error answers


@dataclass
class Exchange:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int
    keeps_alive: bool  # no body was sent, so nothing stands in the way of the next request


ERROR_EXCHANGES = {
    "404-get": Exchange("GET", "/kv/missing", {}, b"", 404, True),
    "404-delete": Exchange("DELETE", "/kv/missing", {}, b"", 404, True),
    "412-delete": Exchange("DELETE", "/kv/present", {"If-Match": '"stale"'}, b"", 412, True),
    "400-key": Exchange("GET", "/kv/%FF", {}, b"", 400, True),
    "412-put-with-body": Exchange(
        "PUT", "/kv/present", {"If-Match": '"stale"', "Content-Length": "5"}, b"12345", 412, False
    ),
    "412-create-only-with-body": Exchange(
        "PUT", "/kv/present", {"If-None-Match": "*", "Content-Length": "5"}, b"12345", 412, False
    ),
    "400-ttl-with-body": Exchange("PUT", "/kv/k?ttl=soon", {"Content-Length": "5"}, b"12345", 400, False),
    "400-chunked-framing": Exchange(
        "PUT", "/kv/k", {"Transfer-Encoding": "chunked"}, b"zz\r\nab\r\n0\r\n\r\n", 400, False
    ),
    "405-with-body": Exchange("POST", "/kv/k", {"Content-Length": "5"}, b"12345", 405, False),
    "411": Exchange("PUT", "/kv/k", {}, b"", 411, False),
}


def assert_connection_does_what_the_answer_says(connection: RawConnection, response: Response) -> None:
    """After `response`: if it says Connection: close, the server closes; else the connection
    takes the next request in step (no unread body left on it to be taken for a request)."""
    if response.closes:
        assert connection.read_to_eof() == b"", "the server said close, then sent more"
    else:
        connection.request("GET", "/health")
        follow_up = connection.response()
        assert follow_up.status == 200, "the connection fell out of step"
        assert json.loads(follow_up.body)["status"] == "ok"


@pytest.mark.parametrize("name", ERROR_EXCHANGES)
def test_after_an_error_answer_the_connection_does_what_the_answer_says(server, name):
    exchange = ERROR_EXCHANGES[name]
    put(server, "/kv/present", b"value")
    with RawConnection(server) as connection:
        connection.request(exchange.method, exchange.path, exchange.headers, exchange.body)
        response = connection.response(exchange.method)
        assert response.status == exchange.status
        assert response.problem()
        if exchange.keeps_alive:
            assert not response.closes, "an error with no body to skip keeps the connection"
        assert_connection_does_what_the_answer_says(connection, response)
    assert server.get("/kv/present").body == b"value"
    assert server.get("/kv/k").status == 404


@pytest.mark.parametrize("precondition", ["If-Match", "If-None-Match"])
def test_a_value_changed_while_a_conditional_upload_streams_makes_it_a_412_that_changes_nothing(server, precondition):
    if precondition == "If-Match":
        headers = {"If-Match": put(server, "/kv/k", b"one").headers["ETag"]}
    else:
        headers = {"If-None-Match": "*"}
    with RawConnection(server) as connection:
        connection.request("PUT", "/kv/k", {"Transfer-Encoding": "chunked", **headers}, b"5\r\nfirst\r\n")
        wait_for(lambda: temporary_files(server), what="the conditional upload to start")
        rival = put(server, "/kv/k", b"rival")  # another client writes while the upload streams
        assert rival.status in (200, 201)
        connection.send(b"6\r\nsecond\r\n0\r\n\r\n")
        response = connection.response()
        assert response.status == 412  # checked again, atomically, when the upload commits
        assert response.problem()
        assert_connection_does_what_the_answer_says(connection, response)
    kept = server.get("/kv/k")
    assert (kept.body, kept.headers["ETag"]) == (b"rival", rival.headers["ETag"])
    wait_for(lambda: not temporary_files(server), timeout=5, what="the refused upload's file to be removed")


def test_conflicting_content_lengths_are_a_400_that_closes_so_no_request_is_smuggled_after_them(server):
    smuggled = b"GET /set?smuggled=yes HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    answer = server.raw(
        b"PUT /kv/a HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n"
        + b"Content-Length: %d\r\n\r\n" % len(smuggled)
        + smuggled
    )
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert b"Connection: close" in answer.partition(b"\r\n\r\n")[0]
    assert answer.count(b"HTTP/1.1 ") == 1, answer
    assert server.get("/get?key=smuggled").status == 404
