"""GET /metrics (SPEC section 3, issue 7): the Prometheus text format, read with a real parser
(prometheus_client's), checked against known sequences of requests on a live kvserver."""

from __future__ import annotations

import http.client
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass

import pytest
from conftest import Server, q, require_service, wait_for

import kvserver

try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:  # pragma: no cover - the test extra is missing
    text_string_to_metric_families = None


@dataclass
class Scrape:
    """One parsed /metrics answer: the families by name, and helpers over their samples."""

    content_type: str
    families: dict

    def samples(self, name: str) -> list:
        return [sample for family in self.families.values() for sample in family.samples if sample.name == name]

    def value(self, name: str, **labels: str) -> float:
        found = [sample.value for sample in self.samples(name) if sample.labels == labels]
        assert len(found) == 1, f"expected one {name}{labels}, found {found}"
        return found[0]

    def requests(self) -> Counter:
        """kvserver_requests_total as {(route, status): count}."""
        counts: Counter = Counter()
        for sample in self.samples("kvserver_requests_total"):
            assert set(sample.labels) == {"route", "status"}, sample.labels
            key = (sample.labels["route"], sample.labels["status"])
            assert key not in counts, f"two samples for {key}"
            counts[key] = sample.value
        return counts

    def count(self, route: str) -> float:
        """The histogram's _count for a route, 0 before the route's first request."""
        found = [
            s.value for s in self.samples("kvserver_request_duration_seconds_count") if s.labels == {"route": route}
        ]
        assert len(found) <= 1, found
        return found[0] if found else 0

    def durations(self, route: str) -> tuple[list[tuple[float, float]], float, float]:
        """The histogram of one route: its (le, cumulative count) buckets in file order, count, sum."""
        buckets = [
            (float(sample.labels["le"]), sample.value)
            for sample in self.samples("kvserver_request_duration_seconds_bucket")
            if sample.labels.get("route") == route
        ]
        count = self.value("kvserver_request_duration_seconds_count", route=route)
        total = self.value("kvserver_request_duration_seconds_sum", route=route)
        return buckets, count, total


def call(
    server: Server,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict | None = None,
    connection: http.client.HTTPConnection | None = None,
) -> int:
    """One request, on `connection` (kept open) if given, else on a connection of its own that is
    closed afterwards; the status code."""
    own = connection is None
    connection = connection or http.client.HTTPConnection(server.host, server.port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        if own:
            connection.close()


def scrape(server: Server, connection: http.client.HTTPConnection | None = None) -> Scrape:
    """GET /metrics, parsed by prometheus_client; on `connection` if given, else on a connection
    of its own. A request is counted after it is answered, so only a scrape on the connection that
    sent it is sure to see it (the connection's thread counts it before reading the next request)."""
    if text_string_to_metric_families is None:
        require_service("the prometheus_client package (pip install -e '.[test]')")
    own = connection is None
    connection = connection or http.client.HTTPConnection(server.host, server.port, timeout=10)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        body = response.read()
    finally:
        if own:
            connection.close()
    assert response.status == 200, (response.status, body)
    families = {family.name: family for family in text_string_to_metric_families(body.decode("utf-8"))}
    return Scrape(response.headers["Content-Type"], families)


def known_sequence(server: Server, connection: http.client.HTTPConnection) -> Counter:
    """Send a fixed mix of requests on one keep-alive connection; the {(route, status): n} they
    must add to the counter."""
    for key in ("alpha", "beta", "gamma"):
        assert call(server, "GET", f"/set?{key}=1", connection=connection) == 201
    sock = connection.sock
    assert call(server, "GET", "/set?key=alpha&value=2", connection=connection) == 200
    assert call(server, "GET", "/get?key=alpha", connection=connection) == 200
    assert call(server, "GET", "/get?key=beta", connection=connection) == 200
    assert call(server, "GET", "/get?key=missing", connection=connection) == 404
    put = {"Content-Type": "text/plain"}
    assert call(server, "PUT", "/kv/delta", body=b"four", headers=put, connection=connection) == 201
    assert call(server, "GET", "/no/such/route", connection=connection) == 404
    assert connection.sock is sock, "the server closed the keep-alive connection"
    return Counter(
        {
            ("/set", "201"): 3,
            ("/set", "200"): 1,
            ("/get", "200"): 2,
            ("/get", "404"): 1,
            ("/kv/<key>", "201"): 1,
            ("unmatched", "404"): 1,
            ("/metrics", "200"): 1,  # the scrape before the sequence, counted once it was answered
        }
    )


def delta(before: Counter, after: Counter) -> Counter:
    changed = Counter({key: after[key] - before[key] for key in after.keys() | before.keys()})
    return Counter({key: n for key, n in changed.items() if n})


def test_metrics_are_served_as_prometheus_text_that_a_real_parser_reads(server: Server) -> None:
    call(server, "GET", "/set?greeting=hello")
    result = scrape(server)
    assert result.content_type.startswith("text/plain; version=0.0.4"), result.content_type
    expected_types = {
        "kvserver_requests": "counter",
        "kvserver_request_duration_seconds": "histogram",
        "kvserver_keys": "gauge",
        "kvserver_stored_bytes": "gauge",
        "kvserver_open_connections": "gauge",
        "kvserver_start_time_seconds": "gauge",
        "kvserver_info": "gauge",
    }
    assert {name: result.families[name].type for name in expected_types if name in result.families} == expected_types
    for name in expected_types:
        assert result.families[name].documentation, f"{name} has no HELP text"
    assert result.requests()[("/set", "201")] == 1


def test_request_counters_grow_by_exactly_the_requests_answered(server: Server) -> None:
    connection = server.connect()
    before = scrape(server, connection).requests()
    expected = known_sequence(server, connection)
    after = scrape(server, connection).requests()
    assert delta(before, after) == expected
    assert all(float(n).is_integer() for n in after.values())


def test_unknown_paths_share_one_route_label_instead_of_making_a_label_each(server: Server) -> None:
    connection = server.connect()
    before = scrape(server, connection).requests()
    for path in ("/nope", "/secret-token-abc123", "/a/b/c?x=1"):
        assert call(server, "GET", path, connection=connection) == 404
    after = scrape(server, connection)
    assert delta(before, after.requests()) == Counter({("unmatched", "404"): 3, ("/metrics", "200"): 1})
    routes = {sample.labels.get("route") for family in after.families.values() for sample in family.samples}
    assert not any(route and ("nope" in route or "secret" in route) for route in routes), routes


def test_the_duration_histogram_counts_each_request_in_cumulative_monotone_buckets(server: Server) -> None:
    connection = server.connect()
    before = scrape(server, connection)
    expected = known_sequence(server, connection)
    after = scrape(server, connection)
    per_route: Counter = Counter()
    for (route, _), n in expected.items():
        per_route[route] += n
    for route, n in per_route.items():
        buckets, count, total = after.durations(route)
        grown = count - before.count(route)
        assert grown == n, f"{route}: _count grew by {grown}, expected {n}"
        bounds = [bound for bound, _ in buckets]
        assert bounds == sorted(bounds) and len(set(bounds)) == len(bounds), bounds
        assert bounds[-1] == math.inf, "the last bucket is le=+Inf"
        counts = [value for _, value in buckets]
        assert counts == sorted(counts), f"{route}: buckets are not cumulative: {counts}"
        assert counts[-1] == count, f"{route}: the +Inf bucket {counts[-1]} differs from _count {count}"
        assert 0 < total < 10 * count, f"{route}: implausible _sum {total} for {count} requests"
    for route in {route for route, _ in after.requests()}:
        answered = sum(n for (r, _), n in after.requests().items() if r == route)
        assert after.durations(route)[1] == answered, f"{route}: histogram and counter disagree"


def test_key_and_byte_gauges_follow_the_stored_values(server: Server) -> None:
    def gauges() -> tuple[float, float]:
        result = scrape(server)
        return result.value("kvserver_keys"), result.value("kvserver_stored_bytes")

    assert gauges() == (0, 0)
    assert call(server, "GET", "/set?plain=hello") == 201  # 5 bytes
    assert call(server, "GET", f"/set?key=unicode&value={q('héllo wörld')}") == 201  # 13 bytes in UTF-8
    assert call(server, "PUT", "/kv/blob", body=bytes(range(256)) * 4) == 201  # 1024 bytes
    assert call(server, "GET", "/set?empty=") == 201  # 0 bytes
    assert gauges() == (4, 5 + 13 + 1024 + 0)
    assert call(server, "GET", "/set?plain=hi") == 200
    assert gauges() == (4, 2 + 13 + 1024)
    assert call(server, "DELETE", "/kv/blob") == 204
    assert gauges() == (3, 2 + 13)
    assert call(server, "GET", "/set?key=brief&value=gone-soon&ttl=1") == 201
    assert gauges() == (4, 2 + 13 + 9)
    wait_for(lambda: gauges() == (3, 2 + 13), timeout=5, interval=0.1, what="the expired key to leave the gauges")


def test_the_open_connections_gauge_counts_idle_keep_alive_connections(server: Server) -> None:
    def open_connections() -> float:
        return scrape(server).value("kvserver_open_connections")

    baseline = 1  # the scrape's own connection
    wait_for(lambda: open_connections() == baseline, timeout=5, what="only the scrape's connection to be open")
    idle = [http.client.HTTPConnection(server.host, server.port, timeout=10) for _ in range(3)]
    try:
        for connection in idle:
            connection.request("GET", "/health")
            response = connection.getresponse()
            response.read()
            assert response.status == 200
            assert response.getheader("Connection", "").lower() != "close"
        wait_for(lambda: open_connections() == baseline + 3, timeout=5, what="three idle connections to count")
    finally:
        for connection in idle:
            connection.close()
    wait_for(lambda: open_connections() == baseline, timeout=5, what="the closed connections to leave the gauge")


def test_start_time_is_when_the_server_started_and_info_names_the_version(make_server) -> None:
    before = time.time()
    server = make_server("--quiet", "--storage", "memory")
    after = time.time()
    result = scrape(server)
    started = result.value("kvserver_start_time_seconds")
    assert before - 1 <= started <= after + 1, (before, started, after)
    assert result.value("kvserver_info", version=kvserver.__version__) == 1
    assert kvserver.__version__ in server.start_line


def test_request_counters_stay_exact_under_concurrent_requests(make_live_server) -> None:
    server = make_live_server("memory")
    threads, per_thread = 8, 100
    before = scrape(server)
    errors: list[str] = []
    start = threading.Barrier(threads)

    def client(number: int) -> None:
        connection = http.client.HTTPConnection(server.host, server.port, timeout=10)
        try:
            start.wait(timeout=10)
            for i in range(per_thread):  # 50 new keys, then each of them replaced
                connection.request("GET", f"/set?t{number}-{i % 50}={i}")
                response = connection.getresponse()
                response.read()
                if response.status != (201 if i < 50 else 200):
                    errors.append(f"thread {number} request {i}: {response.status}")
        except Exception as error:
            errors.append(f"thread {number}: {error!r}")
        finally:
            connection.close()

    workers = [threading.Thread(target=client, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=30)
    assert not any(worker.is_alive() for worker in workers), "a client thread hung"
    assert not errors, errors[:5]
    # Each thread's last answer may reach its client a moment before the server counts it.
    after = wait_for(
        lambda: (result := scrape(server)).count("/set") - before.count("/set") >= threads * per_thread and result,
        timeout=5,
        what="the last answered requests to be counted",
    )
    changed = delta(before.requests(), after.requests())
    del changed["/metrics", "200"]  # the polling scrapes
    assert changed == Counter({("/set", "201"): 400, ("/set", "200"): 400}), changed
    assert after.count("/set") - before.count("/set") == threads * per_thread
    assert after.value("kvserver_keys") == threads * 50


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_metrics_answers_get_and_head_and_counts_them_under_its_own_route(server: Server, method: str) -> None:
    connection = server.connect()
    before = scrape(server, connection).requests()
    assert call(server, method, "/metrics", connection=connection) == 200
    after = scrape(server, connection).requests()
    assert delta(before, after) == Counter({("/metrics", "200"): 2})
