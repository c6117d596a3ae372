"""One error path: an exception from the storage gets the same status over HTTP and XML-RPC."""

from __future__ import annotations

import http.client
import json
import threading
import xmlrpc.client
from collections.abc import Iterator

import pytest

import kvserver


class RefusingStorage(kvserver.MemoryStorage):
    """A backend whose writes refuse their argument, as a backend with its own rules would."""

    def write(self, key, source, **options):  # type: ignore[override]
        raise ValueError("this backend takes no value named like that")


@pytest.fixture
def refusing_server() -> Iterator[int]:
    storage = RefusingStorage()
    server = kvserver.KVServer(("127.0.0.1", 0), storage, quiet=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.stop()
    thread.join(10)


def test_a_storage_value_error_is_a_400_over_http_with_its_message(refusing_server, capfd):
    connection = http.client.HTTPConnection("127.0.0.1", refusing_server, timeout=5)
    connection.request("PUT", "/kv/k", body=b"v")
    response = connection.getresponse()
    body = json.loads(response.read())
    assert response.status == 400
    assert response.headers["Content-Type"] == "application/problem+json"
    assert body["detail"] == "this backend takes no value named like that"
    assert "Traceback" not in capfd.readouterr().err


def test_a_storage_value_error_is_a_fault_400_over_xmlrpc(refusing_server, capfd):
    proxy = xmlrpc.client.ServerProxy(f"http://127.0.0.1:{refusing_server}")
    with pytest.raises(xmlrpc.client.Fault) as fault:
        proxy.save("k", "v")
    assert fault.value.faultCode == 400
    assert "this backend takes no value named like that" in fault.value.faultString
    assert "Traceback" not in capfd.readouterr().err
