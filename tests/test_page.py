"""The browser page of SPEC section 3 and issue 7: GET / for a client that prefers text/html.

The first half drives the page in a real headless Chromium (Debian's, through Playwright) the way a
person would: the form, the key links, the delete links, paging and the prefix filter. The second
half checks, without a browser, which clients get the page and that it is inert: escaped, one
script of its own (it keeps the listing up to date), a strict Content-Security-Policy."""

from __future__ import annotations

import contextlib
import http.client
import http.server
import os
import re
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import Response, Server, require_service, wait_for

try:
    from playwright.sync_api import Browser, Page, sync_playwright
    from playwright.sync_api import Response as PageResponse
except ImportError:  # pragma: no cover - the test extra is missing
    sync_playwright = None

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
DOCS = Path(__file__).resolve().parent.parent / "docs"

# What browsers send when they navigate (Chromium 120+, Firefox 120+, Safari 17)
CHROME_ACCEPT = (
    "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,image/apng,*/*;q=0.8,"
    "application/signed-exchange;v=b3;q=0.7"
)
FIREFOX_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
SAFARI_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
TEXT = "text/plain; charset=utf-8"


def q(text: str) -> str:
    """Percent-encode a key or value for a query string (every reserved byte escaped)."""
    return urllib.parse.quote(text, safe="")


def set_key(server: Server, key: str, value: str) -> None:
    response = server.get(f"/set?key={q(key)}&value={q(value)}")
    assert response.status == 201, (response.status, response.body)


def put_key(server: Server, key: str, body: bytes, content_type: str) -> None:
    response = server.request("PUT", f"/kv/{q(key)}", body, {"Content-Type": content_type})
    assert response.status == 201, (response.status, response.body)


# The browser


@pytest.fixture
def server(make_server) -> Server:
    """A quiet kvserver with files storage, without fsync: these tests write many keys, none for durability."""
    return make_server("--quiet", "--no-fsync")


@dataclass
class Tab:
    """A browser page, with what it said that a test should see: dialogs and console messages."""

    page: Page
    server: Server
    dialogs: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)

    def open(self, path: str) -> PageResponse:
        response = self.page.goto(self.server.url + path)
        assert response is not None
        return response

    def follow(self, locator) -> PageResponse:
        """Click a link or button and return the response of the navigation it starts."""
        with self.page.expect_navigation() as navigation:
            locator.click()
        return navigation.value

    def key_link(self, key: str):
        return self.page.get_by_role("link", name=key, exact=True)

    def row(self, key: str):
        return self.page.locator("tbody tr", has=self.key_link(key))

    def listed_keys(self) -> list[str]:
        return self.page.locator("tbody tr td:first-child").all_inner_texts()

    def body_text(self) -> str:
        return self.page.locator("body").inner_text()

    def delete(self, key: str) -> PageResponse:
        """Delete a key as a person does: its row's delete link, then the confirmation's button."""
        response = self.follow(self.row(key).get_by_role("link", name="delete"))
        assert_is_page(response, 200)
        assert key in self.page.locator(".confirm").inner_text()
        assert self.server.get(f"/get?key={q(key)}").status == 200, "deleted before it was confirmed"
        return self.follow(self.page.get_by_role("button", name="Delete"))


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if sync_playwright is None:
        require_service("the playwright package (pip install -e '.[test]')")
    if not os.access(CHROMIUM, os.X_OK):
        require_service(f"chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30_000)
        yield browser
        browser.close()


@pytest.fixture
def tab(browser: Browser, server: Server) -> Iterator[Tab]:
    context = browser.new_context(viewport={"width": 960, "height": 720}, locale="en-US")
    context.set_default_timeout(10_000)
    context.set_default_navigation_timeout(10_000)
    page = context.new_page()
    tab = Tab(page, server)
    page.on("dialog", lambda dialog: (tab.dialogs.append(dialog.message), dialog.dismiss()))
    page.on("console", lambda message: tab.console.append(f"{message.type}: {message.text}"))
    yield tab
    context.close()


def assert_is_page(response: PageResponse, status: int) -> None:
    assert response.status == status, (response.status, response.url)
    assert response.headers["content-type"] == "text/html; charset=utf-8", response.headers


def test_the_page_has_a_title_and_says_when_there_are_no_keys(tab: Tab) -> None:
    assert_is_page(tab.open("/"), 200)
    assert tab.page.title() == "kvserver"
    assert tab.page.get_by_role("heading", level=1).inner_text() == "kvserver"
    assert "No keys" in tab.page.locator(".empty").inner_text()
    assert tab.listed_keys() == []
    assert tab.page.get_by_role("link", name="delete").count() == 0
    assert not [message for message in tab.console if "Content Security Policy" in message], tab.console


def test_a_key_set_through_the_form_is_listed_opened_and_deleted(tab: Tab) -> None:
    page, value = tab.page, "hello <b>world</b>"
    tab.open("/")
    page.get_by_label("Key", exact=True).fill("greeting")
    page.get_by_label("Value", exact=True).fill(value)
    response = tab.follow(page.get_by_role("button", name="Set"))
    assert_is_page(response, 201)
    assert urllib.parse.urlsplit(response.url).path == "/set"
    assert page.url == tab.server.url + "/", "the answer to a write takes the listing's address"
    assert page.title() == "kvserver"
    assert "greeting" in page.locator(".notice").inner_text()
    assert tab.listed_keys() == ["greeting"]
    row = tab.row("greeting").inner_text()
    assert f"{len(value.encode())} bytes" in row and "text/plain" in row, row
    assert tab.key_link("greeting").get_attribute("href") == "/kv/greeting"

    response = tab.follow(tab.key_link("greeting"))
    assert response.status == 200
    assert response.headers["content-type"] == TEXT
    assert tab.body_text() == value, "a text/plain value is shown as its text, tags and all"
    assert page.locator("b").count() == 0

    page.go_back()
    assert page.title() == "kvserver"
    response = tab.delete("greeting")
    assert_is_page(response, 200)
    assert "greeting" in page.locator(".notice").inner_text()
    assert tab.key_link("greeting").count() == 0
    assert tab.listed_keys() == []
    assert "No keys" in page.locator(".empty").inner_text()
    assert tab.server.get("/get?key=greeting").status == 404
    assert tab.dialogs == []


def test_a_key_made_of_html_is_shown_as_text_and_never_becomes_markup(tab: Tab) -> None:
    page, key, value = tab.page, "<img src=x onerror=alert(1)>", "<script>alert(2)</script>"
    tab.open("/")
    page.get_by_label("Key", exact=True).fill(key)
    page.get_by_label("Value", exact=True).fill(value)
    assert_is_page(tab.follow(page.get_by_role("button", name="Set")), 201)
    assert tab.listed_keys() == [key]
    assert key in page.locator(".notice").inner_text()
    assert page.locator("img").count() == 0
    assert page.locator("script").count() == 1 and page.locator("script[data-events]").count() == 1  # the page's own
    assert tab.follow(tab.key_link(key)).status == 200
    assert tab.body_text() == value
    assert page.locator("script").count() == 0
    assert tab.dialogs == [], "script from a key or value ran"


ODD_KEYS = {
    "dir/sub/file.txt": "a path of folders",
    "two words": "a space",
    "fish & chips": "an ampersand",
    "naïve 日本語 ключ": "non-ASCII",
    "100% + more?#not-a-fragment": "percent, plus, question mark and hash",
    "..": "a dot-dot key",
    ".": "a dot key",
    "a=b": "an equals sign",
}


def level_of(key: str) -> str:
    """The page that lists `key`: the page browses the folders its slashes make."""
    folder = key.rpartition("/")[0]
    return f"/?prefix={q(folder + '/')}" if folder else "/"


def test_keys_with_slashes_spaces_ampersands_and_non_ascii_work_through_their_links(tab: Tab) -> None:
    for key, value in ODD_KEYS.items():
        set_key(tab.server, key, value)
    tab.open("/")
    assert tab.listed_keys() == sorted(["dir/", *(key for key in ODD_KEYS if "/" not in key)])
    wrong = []
    for key, value in ODD_KEYS.items():
        tab.open(level_of(key))
        response = tab.follow(tab.key_link(key))
        if response.status != 200 or tab.body_text() != value:
            wrong.append(f"the link of {key!r} led to {response.url} ({response.status})")
    assert wrong == []
    for key in ODD_KEYS:
        tab.open(level_of(key))
        assert_is_page(tab.delete(key), 200)
        assert key in tab.page.locator(".notice").inner_text()
        assert key not in tab.listed_keys()
    assert tab.listed_keys() == []
    assert tab.server.get("/keys").json() == {"keys": [], "next": None}


def wait_until_live(tab: Tab) -> None:
    """Wait until the page's EventSource is open: changes from then on reach it."""
    # (page.wait_for_function would evaluate a string, which the page's policy forbids)
    wait_for(lambda: tab.page.evaluate("() => source.readyState === EventSource.OPEN"), what="the EventSource to open")


def test_the_page_reloads_its_listing_when_a_key_changes(tab: Tab) -> None:
    tab.open("/")
    wait_until_live(tab)
    with tab.page.expect_navigation():
        set_key(tab.server, "arrived", "v")
    assert tab.listed_keys() == ["arrived"]
    wait_until_live(tab)
    with tab.page.expect_navigation():
        assert tab.server.request("DELETE", "/kv/arrived").status == 204
    assert tab.listed_keys() == []
    assert not [message for message in tab.console if "Content Security Policy" in message], tab.console


def test_after_a_set_through_the_form_a_change_reloads_the_listing_without_setting_again(tab: Tab) -> None:
    page = tab.page
    tab.open("/")
    page.get_by_label("Key", exact=True).fill("mine")
    page.get_by_label("Value", exact=True).fill("1")
    tab.follow(page.get_by_role("button", name="Set"))
    wait_until_live(tab)
    with page.expect_navigation():
        set_key(tab.server, "theirs", "v")
    assert page.url == tab.server.url + "/"
    assert tab.listed_keys() == ["mine", "theirs"]
    assert tab.server.get("/get?key=mine").body == b"1"
    page.go_back()
    assert page.url == tab.server.url + "/"  # the /set is not in the history to run again


def test_while_the_visitor_types_a_change_offers_a_reload_link_instead(tab: Tab) -> None:
    page = tab.page
    tab.open("/")
    wait_until_live(tab)
    page.get_by_label("Key", exact=True).fill("half-typed")
    set_key(tab.server, "arrived", "v")
    notice = page.locator(".notice")
    notice.wait_for()
    assert "Keys changed" in notice.inner_text()
    assert page.get_by_label("Key", exact=True).input_value() == "half-typed"
    tab.follow(notice.get_by_role("link", name="reload"))
    assert tab.listed_keys() == ["arrived"]


def test_while_the_page_asks_to_confirm_a_delete_a_change_offers_a_reload_link_instead(tab: Tab) -> None:
    set_key(tab.server, "doomed", "v")
    tab.open("/delete?key=doomed")
    wait_until_live(tab)
    set_key(tab.server, "arrived", "v")
    notice = tab.page.locator(".notice", has_text="Keys changed")
    notice.wait_for()
    assert urllib.parse.urlsplit(tab.page.url).path == "/delete"
    assert tab.page.locator("form.confirm").count() == 1


def set_through_the_form(tab: Tab, key: str, value: str) -> None:
    tab.page.get_by_label("Key", exact=True).fill(key)
    tab.page.get_by_label("Value", exact=True).fill(value)
    response = tab.follow(tab.page.get_by_role("button", name="Set"))
    assert response.status in (200, 201) and "Stored" in tab.page.locator(".notice").inner_text()


def test_back_after_two_sets_does_not_set_the_first_value_again(tab: Tab) -> None:
    tab.open("/")
    set_through_the_form(tab, "k", "first")
    set_through_the_form(tab, "k", "second")
    tab.page.go_back()
    tab.page.wait_for_load_state()
    assert tab.server.get("/get?key=k").body == b"second", "Back sent /set?key=k&value=first again"
    assert "k" in tab.listed_keys()


def test_back_after_a_delete_and_a_set_does_not_delete_again(tab: Tab) -> None:
    tab.server.get("/set?k=old")
    tab.open("/")
    assert_is_page(tab.delete("k"), 200)
    assert tab.server.get("/get?key=k").status == 404
    set_through_the_form(tab, "k", "new")
    tab.page.go_back()
    tab.page.wait_for_load_state()
    assert tab.server.get("/get?key=k").body == b"new", "Back sent /delete?key=k&confirm=yes again"


def test_reload_after_a_set_shows_the_listing_and_writes_nothing(tab: Tab) -> None:
    tab.open("/")
    set_through_the_form(tab, "k", "mine")
    tab.server.get("/set?k=theirs")  # another client's write since
    response = tab.page.reload()
    assert response is not None and urllib.parse.urlsplit(response.url).path == "/"
    assert tab.server.get("/get?key=k").body == b"theirs", "Reload sent /set?key=k&value=mine again"


def test_the_confirmation_of_a_delete_keeps_its_address(tab: Tab) -> None:
    tab.server.get("/set?k=v")
    tab.open("/")
    tab.follow(tab.row("k").get_by_role("link", name="delete"))
    assert urllib.parse.urlsplit(tab.page.url).path == "/delete"
    assert tab.server.get("/get?key=k").status == 200


def test_back_to_a_failed_delete_does_not_delete_a_key_made_since(tab: Tab) -> None:
    """An error page answering a write takes the listing's address too: Back sent the confirmed
    delete again, which deleted the key another client had made since, without asking."""
    set_key(tab.server, "k", "old")
    tab.open("/")
    tab.follow(tab.row("k").get_by_role("link", name="delete"))  # the question
    assert tab.server.get("/delete?key=k").status == 200  # another client deletes it meanwhile
    assert tab.follow(tab.page.get_by_role("button", name="Delete")).status == 404
    assert urllib.parse.urlsplit(tab.page.url).path == "/"
    set_key(tab.server, "k", "new")  # another client makes it again
    tab.follow(tab.page.get_by_role("link", name="back to the keys"))
    assert "k" in tab.listed_keys()
    tab.page.go_back()
    tab.page.wait_for_load_state()
    assert tab.server.get("/get?key=k").body == b"new", "Back sent /delete?key=k&confirm=yes again"
    assert not [message for message in tab.console if "Content Security Policy" in message], tab.console


def test_keys_that_differ_only_in_spaces_are_shown_as_they_are(tab: Tab) -> None:
    """HTML folds white space: "a  b", "a b" and " a b " all read "a b", and the delete
    question named a key other than the one it deletes."""
    for key in ("a  b", "a b", " a b "):
        set_key(tab.server, key, "v")
    tab.open("/")
    assert tab.listed_keys() == [" a b ", "a  b", "a b"]
    tab.open("/delete?key=" + q("a  b"))
    assert tab.page.locator("form.confirm code").inner_text() == "a  b"
    tab.follow(tab.page.get_by_role("button", name="Delete"))
    assert tab.page.locator(".notice code").inner_text() == "a  b"


def test_the_page_works_without_javascript(browser: Browser, server: Server) -> None:
    context = browser.new_context(java_script_enabled=False)
    try:
        page = context.new_page()
        page.goto(server.url + "/")
        page.get_by_label("Key", exact=True).fill("greeting")
        page.get_by_label("Value", exact=True).fill("hello")
        with page.expect_navigation():
            page.get_by_role("button", name="Set").click()
        assert page.locator("tbody tr td:first-child").all_inner_texts() == ["greeting"]
    finally:
        context.close()


def test_folders_open_their_level_and_the_breadcrumbs_lead_back(tab: Tab) -> None:
    for key in ["app/prod/db", "app/prod/url", "app/name", "readme"]:
        set_key(tab.server, key, key.upper())
    page = tab.page
    tab.open("/")
    assert tab.listed_keys() == ["app/", "readme"]
    assert_is_page(tab.follow(page.get_by_role("link", name="app/", exact=True)), 200)
    assert tab.listed_keys() == ["app/name", "app/prod/"]
    tab.follow(page.get_by_role("link", name="app/prod/", exact=True))
    assert tab.listed_keys() == ["app/prod/db", "app/prod/url"]
    assert page.get_by_label("Keys starting with").input_value() == "app/prod/"
    tab.follow(tab.key_link("app/prod/url"))
    assert tab.body_text() == "APP/PROD/URL"
    page.go_back()
    tab.follow(page.locator("nav.crumbs").get_by_role("link", name="app/", exact=True))
    assert tab.listed_keys() == ["app/name", "app/prod/"]
    tab.follow(page.get_by_role("link", name="all keys"))
    assert tab.listed_keys() == ["app/", "readme"]


@pytest.fixture
def many_keys(server: Server) -> list[str]:
    """130 keys key-000 … key-129 and five more, note-1 … note-5, that sort after them."""
    connection = server.connect()
    keys = [f"key-{n:03d}" for n in range(130)] + [f"note-{n}" for n in range(1, 6)]
    for key in keys:
        assert server.get(f"/set?{key}=v", connection=connection).status == 201
    return keys


def test_a_long_listing_shows_100_keys_and_a_next_page_link_to_the_rest(tab: Tab, many_keys: list[str]) -> None:
    tab.open("/")
    assert tab.listed_keys() == many_keys[:100]
    assert "135 keys" in tab.page.locator("header").inner_text()
    assert_is_page(tab.follow(tab.page.get_by_role("link", name=re.compile("next page"))), 200)
    assert tab.listed_keys() == many_keys[100:]
    assert tab.page.get_by_role("link", name=re.compile("next page")).count() == 0


def test_a_page_size_from_the_address_is_kept_by_the_next_and_first_page_links(tab: Tab, many_keys: list[str]) -> None:
    page = tab.page
    tab.open("/?limit=50")
    assert tab.listed_keys() == many_keys[:50]
    tab.follow(page.get_by_role("link", name=re.compile("next page")))
    assert tab.listed_keys() == many_keys[50:100]
    tab.follow(page.get_by_role("link", name=re.compile("first page")))
    assert tab.listed_keys() == many_keys[:50]
    page.get_by_label("Keys starting with").fill("key-")
    tab.follow(page.get_by_role("button", name="Filter"))  # the filter keeps it too
    assert tab.listed_keys() == many_keys[:50]


def test_the_prefix_filter_lists_only_matching_keys_and_keeps_the_prefix_when_paging(
    tab: Tab, many_keys: list[str]
) -> None:
    page = tab.page
    tab.open("/")
    page.get_by_label("Keys starting with").fill("key-")
    assert_is_page(tab.follow(page.get_by_role("button", name="Filter")), 200)
    assert urllib.parse.parse_qs(urllib.parse.urlsplit(page.url).query) == {"prefix": ["key-"]}
    assert page.get_by_label("Keys starting with").input_value() == "key-"
    assert tab.listed_keys() == many_keys[:100]
    tab.follow(page.get_by_role("link", name=re.compile("next page")))
    assert tab.listed_keys() == many_keys[100:130], "the next page of a filtered listing keeps the filter"
    assert page.get_by_role("link", name=re.compile("next page")).count() == 0

    page.get_by_label("Keys starting with").fill("note-")
    tab.follow(page.get_by_role("button", name="Filter"))
    assert tab.listed_keys() == many_keys[130:]
    page.get_by_label("Keys starting with").fill("nothing-like-this")
    tab.follow(page.get_by_role("button", name="Filter"))
    assert tab.listed_keys() == []
    assert page.locator(".empty").count() == 1


def test_a_filter_that_matches_nothing_says_so_and_not_that_the_store_is_empty(tab: Tab) -> None:
    set_key(tab.server, "greeting", "hello")
    assert_is_page(tab.open("/?prefix=nothing-like-this"), 200)
    empty = tab.page.locator(".empty").inner_text()
    assert "nothing-like-this" in empty and "No keys here yet" not in empty, empty
    assert "1 key" in tab.page.locator("header").inner_text()


def test_a_later_page_has_a_link_back_to_the_first(tab: Tab, many_keys: list[str]) -> None:
    tab.open("/?prefix=key-")
    assert tab.page.get_by_role("link", name=re.compile("first page")).count() == 0
    tab.follow(tab.page.get_by_role("link", name=re.compile("next page")))
    assert tab.listed_keys() == many_keys[100:130]
    assert_is_page(tab.follow(tab.page.get_by_role("link", name=re.compile("first page"))), 200)
    assert tab.listed_keys() == many_keys[:100], "the first page of the same filter"


def test_delete_asks_first_and_cancel_keeps_the_key(tab: Tab) -> None:
    set_key(tab.server, "keep me", "precious")
    tab.open("/")
    assert_is_page(tab.follow(tab.row("keep me").get_by_role("link", name="delete")), 200)
    assert tab.server.get("/get?key=keep%20me").body == b"precious"
    tab.follow(tab.page.get_by_role("link", name="Cancel"))
    assert tab.listed_keys() == ["keep me"]
    assert tab.server.get("/get?key=keep%20me").body == b"precious"
    assert tab.dialogs == [], "no JavaScript dialog: the page asks by itself"


def test_a_value_with_a_ttl_shows_the_seconds_it_has_left(tab: Tab) -> None:
    assert tab.server.get("/set?key=session&value=abc&ttl=60").status == 201
    set_key(tab.server, "forever", "x")
    tab.open("/")
    assert tab.page.get_by_role("columnheader", name="TTL").count() == 1
    cells = tab.row("session").locator("td").all_inner_texts()
    assert cells[3] in ("60 s", "59 s"), cells
    assert tab.row("forever").locator("td").all_inner_texts()[3] == ""


@pytest.mark.parametrize(
    "path, status, detail",
    [("/get?key=nosuch", 404, "no key 'nosuch'"), ("/keys?limit=0", 400, "limit"), ("/nowhere", 404, "no route")],
)
def test_an_error_is_shown_to_a_browser_as_a_page_not_as_json(tab: Tab, path: str, status: int, detail: str) -> None:
    assert_is_page(tab.open(path), status)
    assert detail in tab.page.locator(".error").inner_text()
    assert tab.page.get_by_role("link", name=re.compile("back")).get_attribute("href") == "/"


def test_the_page_with_a_few_keys_fits_its_window_and_is_saved_as_a_screenshot(tab: Tab) -> None:
    server = tab.server
    set_key(server, "greeting", "hello world")
    set_key(server, "notes/2024/trip to Zürich", "Train at 08:12 from platform 7.\n" * 20)
    put_key(server, "config.json", b'{"debug": false, "workers": 4}', "application/json")
    put_key(server, "images/logo.png", bytes(range(256)) * 80, "image/png")
    put_key(server, "backup.tar", b"\0" * (3 * 1024 * 1024 // 2), "application/octet-stream")
    tab.open("/")
    page = tab.page
    page.get_by_label("Key", exact=True).fill("session:42")
    page.get_by_label("Value", exact=True).fill("active")
    assert_is_page(tab.follow(page.get_by_role("button", name="Set")), 201)
    assert len(tab.listed_keys()) == 6

    overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, f"the page is {overflow} px wider than its window"
    assert (
        page.evaluate("document.styleSheets.length") >= 1
        and page.evaluate("document.styleSheets[0].cssRules.length") > 0
    ), "the inline style sheet did not apply"
    assert not [message for message in tab.console if "Content Security Policy" in message], tab.console

    ARTIFACTS.mkdir(exist_ok=True)
    png = page.screenshot(full_page=True)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    (ARTIFACTS / "page.png").write_bytes(png)
    # The picture the README shows is replaced only when asked: a test run leaves the checkout as it
    # was, though another machine's fonts make another picture.
    if os.environ.get("KV_UPDATE_SCREENSHOT") == "1":
        (DOCS / "page.png").write_bytes(png)


# A page on another port of this host (same-site, not cross-site, to a browser)


@pytest.fixture
def other_site() -> Iterator[Callable[[str], str]]:
    """other_site(html) serves `html` from a server on another port of 127.0.0.1 and gives its URL."""
    pages: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = pages.get(self.path, b"")
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()

    def serve(html: str) -> str:
        pages["/attack.html"] = html.encode()
        return f"http://127.0.0.1:{server.server_address[1]}/attack.html"

    yield serve
    server.shutdown()
    server.server_close()
    thread.join(10)


def test_a_page_on_another_port_of_this_host_cannot_write_or_delete_through_the_browser(
    tab: Tab, other_site: Callable[[str], str]
) -> None:
    server = tab.server
    set_key(server, "victim", "kept")
    base = server.url  # http://127.0.0.1:<port>, the same host as the other page: same-site
    attack = other_site(
        f'''<!doctype html><title>elsewhere</title>
<img src="{base}/set?planted=1"><img src="{base}/set?key=planted2&value=2">
<iframe src="{base}/set?planted3=3"></iframe><iframe src="{base}/delete?key=victim&confirm=yes"></iframe>
<img src="{base}/delete?key=victim">'''
    )
    tab.page.goto(attack, wait_until="load")  # after the images and frames loaded, or failed to

    def refused() -> int:
        """How many requests kvserver answered 403, from its /metrics."""
        metrics = server.get("/metrics").body.decode()
        return sum(int(n) for n in re.findall(r'^kvserver_requests_total{.*status="403"} (\d+)$', metrics, re.M))

    wait_for(lambda: refused() == 5, what="the five requests to kvserver, refused with 403")
    assert server.get("/keys").json()["keys"] == ["victim"]
    assert server.get("/get?key=victim").body == b"kept"


# Without a browser: who gets the page, and what is in it


def get_root(server: Server, accept: str | None, path: str = "/") -> Response:
    return server.get(path, headers={} if accept is None else {"Accept": accept})


@pytest.mark.parametrize(
    "accept",
    [None, "*/*", "application/json", "application/json, text/html;q=0.9", "text/html;q=0.5, */*"],
    ids=["none", "curl", "json", "json-first", "html-lower"],
)
def test_clients_that_do_not_prefer_html_get_the_json_dump_from_root(server: Server, accept: str | None) -> None:
    set_key(server, "greeting", "hello")
    response = get_root(server, accept)
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {"greeting": "hello"}


@pytest.mark.parametrize(
    "path",
    ["/", "/set?vary=1", "/delete?key=vary", "/get?key=nosuch", "/nowhere", "/kv/nosuch"],
)
@pytest.mark.parametrize("accept", [CHROME_ACCEPT, "application/json"], ids=["browser", "json"])
def test_an_answer_that_is_a_page_or_json_by_accept_says_vary_accept(server: Server, path: str, accept: str) -> None:
    # RFC 9110 section 12.5.5: so that a cache does not give a browser the JSON, or curl the page.
    set_key(server, "vary", "x")
    response = get_root(server, accept, path)
    assert response.headers["Vary"] == "Accept", (response.status, response.headers)


def test_an_answer_that_is_the_same_whatever_accept_says_has_no_vary(server: Server) -> None:
    set_key(server, "greeting", "hello")
    for path in ("/get?key=greeting", "/kv/greeting", "/keys", "/health", "/metrics"):
        for accept in (CHROME_ACCEPT, "*/*"):
            response = get_root(server, accept, path)
            assert response.status == 200, (path, response.status)
            assert "Vary" not in response.headers, (path, response.headers)


@pytest.mark.parametrize(
    "accept", [CHROME_ACCEPT, FIREFOX_ACCEPT, SAFARI_ACCEPT, "text/html"], ids=["chrome", "firefox", "safari", "html"]
)
def test_browsers_get_an_html_page_with_a_strict_content_security_policy(server: Server, accept: str) -> None:
    set_key(server, "greeting", "hello")
    response = get_root(server, accept)
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    policy = response.headers["Content-Security-Policy"]
    assert policy is not None and "default-src 'none'" in policy, policy
    directives = dict(directive.strip().split(" ", 1) for directive in policy.split(";"))
    assert re.fullmatch(r"'nonce-[A-Za-z0-9_-]{22,}'", directives["script-src"]), policy  # its own script only
    assert directives["connect-src"] == "'self'", policy
    assert "unsafe-eval" not in policy, policy
    html = response.body.decode("utf-8")
    assert html.lower().startswith("<!doctype html>")
    assert ">greeting</a>" in html


def test_the_page_has_one_script_with_the_policys_nonce_and_loads_nothing_from_elsewhere(server: Server) -> None:
    set_key(server, "greeting", "hello")
    response = get_root(server, CHROME_ACCEPT)
    nonce = re.search(r"'nonce-([^']+)'", response.headers["Content-Security-Policy"]).group(1)
    assert f"'nonce-{nonce}'" not in get_root(server, CHROME_ACCEPT).headers["Content-Security-Policy"]  # one a page
    html = response.body.decode("utf-8")
    [script] = re.findall(r"<script\b[^>]*>", html)
    events = "/events\\?prefix=&amp;after=[0-9]+"  # (after: the revision the listing is as of)
    assert re.fullmatch(f'<script nonce="{nonce}" data-events="{events}" data-listing="/">', script), script
    html = html.lower()
    assert "javascript:" not in html
    assert not re.search(r"\son[a-z]+\s*=", html), "an inline event handler"
    assert not re.search(r"<(link|img|iframe|object|embed)\b", html), "an external asset"
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", html), "a link to another site"


def test_the_pages_stream_starts_from_the_listing_so_a_change_made_while_it_loads_is_not_missed(
    server: Server,
) -> None:
    """Its EventSource once started from when it connected: a change between the listing and
    that left the page stale."""
    set_key(server, "before", "1")
    html = get_root(server, CHROME_ACCEPT).body.decode("utf-8")
    events = re.search(r'data-events="([^"]+)"', html).group(1).replace("&amp;", "&")
    set_key(server, "while-loading", "2")  # listed nowhere yet: the page must hear of it
    with contextlib.closing(http.client.HTTPConnection(server.host, server.port, timeout=10)) as connection:
        connection.request("GET", events, headers={"Accept": "text/event-stream"})
        response = connection.getresponse()
        assert response.status == 200
        received = b""
        while b'"key": "while-loading"' not in received and (line := response.readline()):
            received += line
    assert b'event: put\ndata: {"key": "while-loading"' in received, received


def test_a_change_made_between_the_pages_listing_and_its_revision_reaches_the_page(make_live_server) -> None:
    """The page once took its stream's revision after reading its listing: another client's
    change in between was in neither."""
    server = make_live_server("memory")
    listing_keys = server.storage.keys
    writes: list[threading.Thread] = []

    def keys_then_another_clients_write(*args, **kwargs):
        items = listing_keys(*args, **kwargs)
        if not writes:  # (the first listing only)
            writes.append(threading.Thread(target=server.request, args=("PUT", "/kv/while-loading", b"2")))
            writes[0].start()
            writes[0].join(10)
        return items

    server.storage.keys = keys_then_another_clients_write  # (this storage object's only)
    html = get_root(server, CHROME_ACCEPT).body.decode("utf-8")
    del server.storage.keys
    assert server.storage.get("while-loading") == b"2" and ">while-loading<" not in html  # not listed
    events = re.search(r'data-events="([^"]+)"', html).group(1).replace("&amp;", "&")
    with contextlib.closing(http.client.HTTPConnection(server.host, server.port, timeout=10)) as connection:
        connection.request("GET", events)
        response = connection.getresponse()
        received = b""
        while b'"key": "while-loading"' not in received and (line := response.readline()):
            received += line
    assert b'data: {"key": "while-loading"' in received, received


def test_the_raw_page_escapes_keys_media_types_and_the_prefix(server: Server) -> None:
    key = '"><script>alert(1)</script>'
    response = server.request("PUT", f"/kv/{q(key)}", b"x", {"Content-Type": "text/x-<i>odd</i>"})
    assert response.status == 201
    html = get_root(server, CHROME_ACCEPT, level_of(key)).body.decode("utf-8")
    assert "<script>" not in html and "<i>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "text/x-&lt;i&gt;odd&lt;/i&gt;" in html
    assert f'href="/kv/{q(key)}"' in html

    prefix = '"><script>alert(3)</script>'
    html = get_root(server, CHROME_ACCEPT, f"/?prefix={q(prefix)}").body.decode("utf-8")
    assert "<script>" not in html
    assert 'value="&quot;&gt;&lt;script&gt;alert(3)&lt;/script&gt;"' in html


def test_a_browsers_set_and_delete_get_the_page_with_the_status_a_json_client_gets(server: Server) -> None:
    browser = {"Accept": CHROME_ACCEPT}
    created = server.get("/set?key=greeting&value=hello", headers=browser)
    assert created.status == 201
    assert created.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "greeting" in created.body.decode()
    replaced = server.get("/set?key=greeting&value=hi", headers=browser)
    assert replaced.status == 200
    assert replaced.headers["Content-Type"] == "text/html; charset=utf-8"
    asked = server.get("/delete?key=greeting", headers=browser)
    assert asked.status == 200
    assert 'name="confirm" value="yes"' in asked.body.decode(), "a browser is asked before it deletes"
    assert server.get("/get?key=greeting").body == b"hi"
    deleted = server.get("/delete?key=greeting&confirm=yes", headers=browser)
    assert deleted.status == 200
    assert deleted.headers["Content-Type"] == "text/html; charset=utf-8"
    assert "No keys" in deleted.body.decode()
    assert server.get("/delete?key=greeting", headers=browser).status == 404
    assert server.get("/delete?key=greeting&confirm=yes", headers=browser).status == 404

    assert server.get("/set?key=greeting&value=hello").json() == {"key": "greeting", "created": True}
    assert server.get("/delete?key=greeting").json() == {"key": "greeting", "deleted": True}
