"""One error path: an exception from the storage gets the same status over HTTP and XML-RPC."""

from __future__ import annotations

import xmlrpc.client
from collections.abc import Iterator

import pytest
from conftest import LiveServer, assert_no_traceback, assert_problem

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
