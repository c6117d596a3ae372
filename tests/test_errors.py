"""One error path: an exception from the storage gets the same status over HTTP and XML-RPC."""

from __future__ import annotations

import xmlrpc.client
from collections.abc import Iterator

import pytest
from conftest import LiveServer, assert_no_traceback, assert_problem, raw_exchange_timed, wait_for

import kvserver


class RefusingStorage(kvserver.MemoryStorage):
    """A backend whose writes refuse their argument, as a backend with its own rules would."""

    def write(self, key, source, **options):  # type: ignore[override]
        raise ValueError("this backend takes no value named like that")


@pytest.fixture
def refusing_server() -> Iterator[LiveServer]:
    server = LiveServer(RefusingStorage()).start()
    yield server
    server.stop()


def test_a_storage_value_error_is_a_400_over_http_with_its_message(refusing_server, capfd):
    response = refusing_server.request("PUT", "/kv/k", body=b"v")
    assert assert_problem(response, 400)["detail"] == "this backend takes no value named like that"
    assert_no_traceback(capfd.readouterr().err)


def test_a_storage_value_error_is_a_fault_400_over_xmlrpc(refusing_server, capfd):
    proxy = xmlrpc.client.ServerProxy(refusing_server.url)
    with pytest.raises(xmlrpc.client.Fault) as fault:
        proxy.save("k", "v")
    assert fault.value.faultCode == 400
    assert "this backend takes no value named like that" in fault.value.faultString
    assert_no_traceback(capfd.readouterr().err)


class FailingStorage(kvserver.MemoryStorage):
    """A backend that fails partway through a listing, as Redis going away does."""

    def fetch(self, key):  # type: ignore[override]
        if key == "b":
            raise kvserver.StorageUnavailable("the backend went away")
        return super().fetch(key)


@pytest.fixture
def failing_server() -> Iterator[LiveServer]:
    server = LiveServer(FailingStorage()).start()
    for key in ("a", "b", "c"):
        server.storage.put(key, b"v")
    yield server
    server.stop()


@pytest.mark.parametrize("path", ["/", "/export"])
def test_an_answer_that_a_storage_failure_cuts_short_closes_the_connection(failing_server, path):
    """RFC 9112 section 7.1: a chunked body ends with its last chunk; one that cannot end so is
    cut short by closing the connection, not left open for the next answer to land in."""
    health = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode() + health
    received, went_quiet = raw_exchange_timed(failing_server.port, request, timeout=5)
    assert not went_quiet, received
    assert received.startswith(b"HTTP/1.1 200 ") and b"\r\nTransfer-Encoding: chunked\r\n" in received
    assert not received.endswith(b"0\r\n\r\n")  # no last chunk: the client can tell the body is cut short
    assert received.count(b"HTTP/1.1 ") == 1  # the pipelined /health is not answered inside it


class UnreachableStorage(kvserver.MemoryStorage):
    """A backend whose sweeps fail while `reachable` is False, as Redis's do while it is away."""

    reachable = False
    sweeps = 0

    def sweep(self) -> int:
        self.sweeps += 1
        if not self.reachable:
            raise kvserver.StorageUnavailable("cannot reach the backend")
        return super().sweep()


def test_a_storage_unavailable_to_the_sweep_is_said_once_not_twice_a_second(capfd):
    storage = UnreachableStorage()
    server = LiveServer(storage).start()
    try:
        wait_for(lambda: storage.sweeps >= 4, timeout=10, what="four sweeps")
        storage.reachable = True
        swept = storage.sweeps
        wait_for(lambda: storage.sweeps >= swept + 2, timeout=10, what="two more sweeps")
    finally:
        server.stop()
    err = capfd.readouterr().err
    assert err.count("expired values are not swept for now: cannot reach the backend") == 1, err
    assert err.count("expired values are swept again") == 1, err
    assert_no_traceback(err)
