"""Listing one level of hierarchical keys (SPEC sections 3 and 7, issue 17): `Storage.keys(prefix,
delimiter=...)`, simplekv's `iter_prefixes`, `GET /keys?delimiter=` and the HTML page's folders.

The listing is built on each backend's ordered `_keys` hook, skipping a folder's keys with a cursor
past them; the paging tests compare every page size against a model computed by brute force, on
Memory, Files and Redis storage.
"""

from __future__ import annotations

import html
import json
import re
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Server
from test_redis import redis_db, redis_server  # noqa: F401  (the fixtures of the Redis store)

import kvserver

MAX = "\U0010ffff"  # the last code point: the character a cursor past a folder is made of


@pytest.fixture(params=["memory", "files", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[kvserver.Storage]:
    if request.param == "memory":
        with kvserver.MemoryStorage() as memory:
            yield memory
    elif request.param == "files":
        with kvserver.FileStorage(tmp_path / "data", fsync=False) as files:
            yield files
    else:
        with kvserver.RedisStorage(request.getfixturevalue("redis_db").url()) as redis_store:
            yield redis_store


def level(keys: list[str], prefix: str, delimiter: str) -> list[str]:
    """The model: one level of `keys` under `prefix`, folders cut after the first delimiter."""
    items = set()
    for key in keys:
        if key.startswith(prefix):
            cut = key.find(delimiter, len(prefix))
            items.add(key[: cut + len(delimiter)] if cut >= 0 else key)
    return sorted(items)


def pages(store: kvserver.Storage, prefix: str, delimiter: str, limit: int) -> list[list[str]]:
    """Every page of a listing, each cursor the last item of the page before."""
    result, after = [], None
    while page := store.keys(prefix, delimiter=delimiter, after=after, limit=limit):
        assert len(page) <= limit
        result.append(page)
        after = page[-1]
        assert len(result) < 1000, "the paging does not end"
    return result


# simplekv's BasicStore prefix-iterator cases (tests/basic_store.py test_prefix_iterator, and the
# FilesystemStore variant with os.sep): their keys and expected results, copied; simplekv sorts
# the results, kvserver gives them sorted.

SIMPLEKV_KEYS = ["X", "a1Xb1", "a1Xb1", "a2Xb1", "a3", "a4Xb1Xc1", "a4Xb1Xc2", "a4Xb2Xc1", "a4Xb3"]


@pytest.mark.parametrize("delimiter", ["X", "/"])
def test_simplekvs_prefix_iterator_cases_pass(store, delimiter):
    for key in SIMPLEKV_KEYS:
        store.put(key.replace("X", delimiter), b"value")
    expected = {
        "": ["X", "a1X", "a2X", "a3", "a4X"],
        "a4X": ["a4Xb1X", "a4Xb2X", "a4Xb3"],
        "foo": [],
        "fooX": [],
    }
    for prefix, items in expected.items():
        with_delimiter = [item.replace("X", delimiter) for item in items]
        assert list(store.iter_prefixes(delimiter, prefix=prefix.replace("X", delimiter))) == with_delimiter
    assert list(store.iter_prefixes(delimiter)) == store.keys(delimiter=delimiter)


# Paging with tricky keys

TRICKY_KEYS = [
    "a",  # a key equal to a folder without its delimiter
    "a/",  # a key that is its own folder: the delimiter at the end
    "a/b",
    "a/b/",
    "a/b/c",
    "a/b/c/d",
    "a/bc/d",  # a folder whose name starts with another's
    "a/b0",
    "a0",  # right after every "a/..." key: the successor of the folder "a/"
    "a/" + MAX,
    "a/" + MAX + "/x",
    "a/" + MAX * 255 + "/z",  # 1024 bytes: the longest key in a folder of U+10FFFF characters
    "a/" + MAX * 255 + "0",
    "b::c::d",
    "b::",
    "b:::x",  # the delimiter "::" found first at the earliest position
    "b→x→y",
    "b→",
    "b🔑",
    "c🔑d🔑e",
    "c🔑🔑",
    "d" + "|<16bytes>|" + "e",
    "/leading",
    "//double",
    "x" * 1024,
]


@pytest.mark.parametrize("delimiter", ["/", "::", "→", "🔑", "|<16bytes>|", MAX])
@pytest.mark.parametrize("prefix", ["", "a", "a/", "a/b", "a/b/", "b", "c🔑", "/", "nothing"])
def test_paging_through_a_level_gives_the_model_at_every_page_size(store, delimiter, prefix):
    for key in TRICKY_KEYS:
        store.put(key, b"v")
    expected = level(TRICKY_KEYS, prefix, delimiter)
    for limit in [1, 2, 3, 7, len(expected) + 1]:
        paged = [item for page in pages(store, prefix, delimiter, limit) for item in page]
        assert paged == expected, f"limit={limit}"
    assert store.keys(prefix, delimiter=delimiter) == expected


def test_a_level_shows_keys_and_folders_merged_in_code_point_order(store):
    for key in TRICKY_KEYS:
        store.put(key, b"v")
    assert store.keys("a/", delimiter="/") == [
        "a/",
        "a/b",
        "a/b/",
        "a/b0",
        "a/bc/",
        "a/" + MAX,
        "a/" + MAX + "/",
        "a/" + MAX * 255 + "/",
        "a/" + MAX * 255 + "0",
    ]
    assert store.keys(delimiter="/") == [
        "/",
        "a",
        "a/",
        "a0",
        "b::",
        "b:::x",
        "b::c::d",
        "b→",
        "b→x→y",
        "b🔑",
        "c🔑d🔑e",
        "c🔑🔑",
        "d|<16bytes>|e",
        "x" * 1024,
    ]
    assert store.keys("b", delimiter="::") == ["b::", "b→", "b→x→y", "b🔑"]


@pytest.mark.parametrize(
    ("after", "expected"),
    [
        ("a/b/", ["a/b0", "a/bc/"]),  # a folder as the cursor: on past its keys
        ("a/b/zzz", ["a/b0", "a/bc/"]),  # a cursor inside a folder: on past the folder
        ("a/b", ["a/b/", "a/b0"]),  # a key that is also a folder's name
        ("a/a", ["a/b", "a/b/"]),  # a cursor that is no key
        ("a/" + MAX * 3, ["a/" + MAX * 255 + "/", "a/" + MAX * 255 + "0"]),
        ("a/" + MAX * 255 + "0", []),
        ("0", ["a/", "a/b"]),  # before the prefix
        ("b", []),  # past the prefix
    ],
)
def test_the_cursor_may_be_a_key_a_folder_or_neither(store, after, expected):
    for key in TRICKY_KEYS:
        store.put(key, b"v")
    assert store.keys("a/", delimiter="/", after=after, limit=2) == expected


def test_a_folder_whose_keys_are_all_gone_is_not_listed(store):
    store.put("f/one", b"v")
    store.put("f/two", b"v")
    store.put("g", b"v")
    store.delete("f/one")
    assert store.keys(delimiter="/") == ["f/", "g"]
    store.delete("f/two")
    assert store.keys(delimiter="/") == ["g"]


def test_a_big_folder_is_skipped_without_listing_it(store, monkeypatch):
    for n in range(3000):
        store.put(f"big/{n:04d}", b"v")
    store.put("small", b"v")
    read = []
    original = type(store)._keys

    def counting(self, prefix, after, limit):
        keys = original(self, prefix, after, limit)
        read.extend(keys)
        return keys

    monkeypatch.setattr(type(store), "_keys", counting)
    assert store.keys(delimiter="/", limit=10) == ["big/", "small"]
    assert len(read) <= 2 * kvserver._LEVEL_BATCH, "the folder's keys were read, not skipped"


@pytest.mark.parametrize("delimiter", ["", b"/", 1])
def test_a_delimiter_that_is_not_a_non_empty_str_is_a_value_error(store, delimiter):
    with pytest.raises(ValueError, match="delimiter"):
        store.keys(delimiter=delimiter)


# Over HTTP


def keys_json(server: Server, query: str) -> dict:
    response = server.get("/keys?" + query)
    assert response.status == 200, response.body
    return response.json()


def test_keys_with_a_delimiter_answers_keys_prefixes_and_a_cursor(server):
    for key in ["app/prod/db", "app/prod/url", "app/test/db", "app/name", "app/", "top"]:
        assert server.get(f"/set?{urllib.parse.quote(key, safe='')}=v").status == 201
    assert keys_json(server, "prefix=app/&delimiter=/") == {
        "keys": ["app/", "app/name"],
        "prefixes": ["app/prod/", "app/test/"],
        "next": None,
    }
    assert keys_json(server, "delimiter=%2F") == {"keys": ["top"], "prefixes": ["app/"], "next": None}
    assert keys_json(server, "prefix=app/") == {
        "keys": ["app/", "app/name", "app/prod/db", "app/prod/url", "app/test/db"],
        "next": None,
    }


def test_keys_with_a_delimiter_pages_with_a_prefix_as_the_cursor(server):
    for key in ["a/1", "a/2", "b", "c/1", "c/2", "d"]:
        server.get(f"/set?{key}=v")
    first = keys_json(server, "delimiter=/&limit=2")
    assert first == {"keys": ["b"], "prefixes": ["a/"], "next": "b"}
    second = keys_json(server, "delimiter=/&limit=1&after=b")
    assert second == {"keys": [], "prefixes": ["c/"], "next": "c/"}
    assert keys_json(server, "delimiter=/&limit=1&after=c%2F") == {"keys": ["d"], "prefixes": [], "next": None}


def test_a_multi_byte_delimiter_travels_percent_encoded(server):
    for key in ["x→y→z", "x→w", "xy"]:
        server.get(f"/set?{urllib.parse.quote(key)}=v")
    assert keys_json(server, "prefix=x&delimiter=%E2%86%92") == {"keys": ["xy"], "prefixes": ["x→"], "next": None}
    assert keys_json(server, "prefix=x%E2%86%92&delimiter=%E2%86%92") == {
        "keys": ["x→w"],
        "prefixes": ["x→y→"],
        "next": None,
    }


@pytest.mark.parametrize("delimiter", ["", "x" * 17, "%FF", "%E2%86%92" * 6])
def test_a_delimiter_not_of_1_to_16_bytes_of_utf8_is_a_400(server, delimiter):
    response = server.get("/keys?delimiter=" + delimiter)
    assert response.status == 400
    assert "delimiter" in response.problem()["detail"]


# The HTML page browses folders


def page(server: Server, path: str) -> str:
    response = server.get(path, headers={"Accept": "text/html"})
    assert response.status == 200, response.body
    return response.body.decode()


def listed(text: str) -> list[tuple[str, str]]:
    """The (link, text) of each row's first cell."""
    cells = re.findall(r'<td class="key"><a href="([^"]*)">([^<]*)</a>', text)
    return [(html.unescape(href), html.unescape(label)) for href, label in cells]


def test_the_page_lists_the_top_level_with_folders_that_open_their_level(server):
    for key in ["dir/sub/file.txt", "dir/readme", "dir/sub/other", "top", "dir<x>/a"]:
        server.get(f"/set?{urllib.parse.quote(key, safe='')}=v")
    assert listed(page(server, "/")) == [
        ("/?prefix=dir%2F", "dir/"),
        ("/?prefix=dir%3Cx%3E%2F", "dir<x>/"),
        ("/kv/top", "top"),
    ]
    dir_level = page(server, "/?prefix=dir%2F")
    assert listed(dir_level) == [("/kv/dir%2Freadme", "dir/readme"), ("/?prefix=dir%2Fsub%2F", "dir/sub/")]
    assert '<a href="/">all keys</a>' in dir_level
    sub_level = page(server, "/?prefix=dir%2Fsub%2F")
    assert listed(sub_level) == [
        ("/kv/dir%2Fsub%2Ffile.txt", "dir/sub/file.txt"),
        ("/kv/dir%2Fsub%2Fother", "dir/sub/other"),
    ]
    crumbs = re.search(r'<nav class="crumbs">(.*?)</nav>', sub_level)
    assert crumbs is not None
    assert re.findall(r'<a href="([^"]*)">([^<]*)</a>', crumbs.group(1)) == [
        ("/", "all keys"),
        ("/?prefix=dir%2F", "dir/"),
        ("/?prefix=dir%2Fsub%2F", "sub/"),
    ]


def test_the_pages_of_a_level_go_on_past_a_folder(server):
    connection = server.connect()
    for n in range(150):
        server.get(f"/set?f{n:03d}/x=v", connection=connection)
    server.get("/set?zz=v", connection=connection)
    first = page(server, "/")
    assert [label for _, label in listed(first)] == [f"f{n:03d}/" for n in range(100)]
    after = re.search(r'<a href="([^"]*)">next page', first)
    assert after is not None
    assert html.unescape(after.group(1)) == "/?after=f099%2F"
    assert [label for _, label in listed(page(server, "/?after=f099%2F"))] == [
        *(f"f{n:03d}/" for n in range(100, 150)),
        "zz",
    ]


def test_the_json_answers_do_not_change_for_clients_that_give_no_delimiter(server):
    server.get("/set?a/b=v")
    assert json.loads(server.get("/keys").body) == {"keys": ["a/b"], "next": None}
    assert json.loads(server.get("/").body) == {"a/b": "v"}


def test_the_page_keeps_another_delimiter_in_its_links(server):
    for key in ["a::b::c", "a::d", "e"]:
        server.get(f"/set?{urllib.parse.quote(key)}=v")
    assert listed(page(server, "/?delimiter=%3A%3A")) == [("/?prefix=a%3A%3A&delimiter=%3A%3A", "a::"), ("/kv/e", "e")]
    level = page(server, "/?prefix=a%3A%3A&delimiter=%3A%3A")
    assert listed(level) == [("/?prefix=a%3A%3Ab%3A%3A&delimiter=%3A%3A", "a::b::"), ("/kv/a%3A%3Ad", "a::d")]
    assert 'href="/?delimiter=%3A%3A">all keys</a>' in level


@pytest.mark.parametrize("path", ["/?delimiter=%3A%3A", "/?prefix=a%3A%3A&delimiter=%3A%3A"])
def test_the_pages_filter_keeps_another_delimiter(server, path):
    server.get("/set?a%3A%3Ab%3A%3Ac=v")
    form = re.search(r'<form action="/" method="get">(.*?)</form>', page(server, path), re.DOTALL)
    assert form is not None
    fields = dict(re.findall(r'<input (?:type="hidden" )?name="([^"]*)" value="([^"]*)">', form.group(1)))
    assert {name: html.unescape(value) for name, value in fields.items()} == {
        "prefix": "a::" if "prefix" in path else "",
        "delimiter": "::",
    }
    filtered = "/?" + urllib.parse.urlencode({"prefix": "a::", "delimiter": "::"})  # what submitting it asks for
    assert listed(page(server, filtered)) == [("/?prefix=a%3A%3Ab%3A%3A&delimiter=%3A%3A", "a::b::")]


def test_the_pages_filter_has_no_delimiter_field_for_the_usual_slash(server):
    assert 'name="delimiter"' not in page(server, "/")
    assert 'name="delimiter"' not in page(server, "/?delimiter=%2F")
