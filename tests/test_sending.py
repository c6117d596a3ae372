"""How answers leave over plain TCP: _SocketWriter sends what the kernel takes at once holding
the GIL, and waits for a slow reader with the GIL released."""

import io
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import wait_for

import kvserver


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected pair of TCP sockets on 127.0.0.1: (the server's end, the client's end)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    with server, client:
        yield server, client


def receive_all(sock: socket.socket, size: int) -> bytes:
    received = bytearray()
    while len(received) < size:
        piece = sock.recv(65536)
        assert piece, f"the connection ended after {len(received)} of {size} bytes"
        received += piece
    return bytes(received)


@pytest.mark.parametrize("send", ["holding the GIL", "no ctypes"])
def test_a_small_answer_arrives_whole(tcp_pair, monkeypatch, send):
    if send == "no ctypes":
        monkeypatch.setattr(kvserver, "_libc_send", None)
    server, client = tcp_pair
    wfile = io.BufferedWriter(kvserver._SocketWriter(server.fileno()), kvserver.CHUNK)
    wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    wfile.write(b"hello")
    wfile.flush()
    assert receive_all(client, 43) == b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


@pytest.mark.skipif(sys.platform != "linux", reason="the C library's send is looked for where the benchmark runs")
def test_pieces_up_to_16_kib_go_to_the_c_librarys_send_and_larger_ones_to_os_write(tcp_pair, monkeypatch):
    server, client = tcp_pair
    libc_send, sizes = kvserver._libc_send, []
    assert libc_send is not None

    def counted_send(descriptor: int, data: bytes, size: int, flags: int) -> int:
        sizes.append(size)
        return libc_send(descriptor, data, size, flags)

    writer = kvserver._SocketWriter(server.fileno())
    monkeypatch.setattr(kvserver, "_libc_send", counted_send)
    assert writer.write(b"a" * kvserver._SEND_NOW_MOST) == kvserver._SEND_NOW_MOST
    assert writer.write(b"b" * (kvserver._SEND_NOW_MOST + 1)) == kvserver._SEND_NOW_MOST + 1
    assert sizes == [kvserver._SEND_NOW_MOST]
    assert receive_all(client, 2 * kvserver._SEND_NOW_MOST + 1) == b"a" * kvserver._SEND_NOW_MOST + b"b" * (
        kvserver._SEND_NOW_MOST + 1
    )


@pytest.mark.parametrize("piece_size", [1024, kvserver._SEND_NOW_MOST, kvserver.CHUNK])
@pytest.mark.timeout(60)
def test_a_write_the_client_is_slow_to_read_waits_with_the_gil_released(tcp_pair, piece_size):
    """The writer fills the send buffer and then blocks until the client reads; meanwhile
    this thread runs Python. (A send that blocked holding the GIL would stop it until the
    socket's send timeout, set here so that such a send ends.) Every byte arrives, in order."""
    server, client = tcp_pair
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 5, 0))
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    data = bytes(range(256)) * (1024 * 1024 // 256)
    wfile = io.BufferedWriter(kvserver._SocketWriter(server.fileno()), kvserver.CHUNK)
    done = threading.Event()

    def write() -> None:  # as answers to pipelined requests, each flushed, or a value in pieces
        for start in range(0, len(data), piece_size):
            wfile.write(data[start : start + piece_size])
            wfile.flush()
        done.set()

    writer = threading.Thread(target=write, daemon=True)
    started = time.monotonic()
    writer.start()
    wait_for(lambda: kvserver._unsent_bytes(server) >= 8 * 1024, what="the client's window to fill")  # writer waits
    for _ in range(50):  # this thread keeps running while the writer waits (0.5 s)
        time.sleep(0.01)
        assert not done.is_set()
    assert time.monotonic() - started < 2.5, "this thread was held up: a send waited holding the GIL"
    assert receive_all(client, len(data)) == data
    writer.join(10)
    assert done.is_set()


@pytest.mark.parametrize("send", ["holding the GIL", "no ctypes"])
def test_a_write_to_a_connection_the_client_reset_raises_connection_error(tcp_pair, monkeypatch, send):
    if send == "no ctypes":
        monkeypatch.setattr(kvserver, "_libc_send", None)
    server, client = tcp_pair
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # with a linger of 0 s: a reset
    writer = kvserver._SocketWriter(server.fileno())
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        for _ in range(100):  # (the reset may come in just after a first write)
            writer.write(b"hello")
