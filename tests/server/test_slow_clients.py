"""Slow and lying clients, over raw sockets on 127.0.0.1: a body declared too large is refused at
once, and nothing a client sends or withholds - a body, the headers, anything at all - holds a
connection past its deadline. The deadlines here are 0.5 s; every wait is bounded by 10 s."""
from __future__ import annotations

import json
import select
import socket

import pytest

from tests.server.conftest import API_KEY, MODEL, another_app

DEADLINE = 0.5
HEAD = ("POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {API_KEY}\r\n")


@pytest.fixture(scope="module")
def url(server):
    with another_app(server.aengine, header_timeout=DEADLINE, body_timeout=DEADLINE) as url:
        yield url


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def read_response(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (at most 10 s)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def closed_while_trickling(sock: socket.socket, data: bytes) -> bool:
    """Send ``data`` a byte every 50 ms; True once the server has closed the connection."""
    for b in data:
        try:
            sock.sendall(bytes([b]))
        except (BrokenPipeError, ConnectionResetError):
            return True
        if select.select([sock], [], [], 0.05)[0]:
            try:
                while sock.recv(65536):  # an answer, then the close
                    pass
            except ConnectionResetError:
                pass
            return True
    return False


def test_huge_content_length_gets_413_at_once(url):
    with connect(url) as sock:
        sock.sendall(f"{HEAD}Content-Length: 10000000000\r\n\r\n{{}}".encode())
        head = sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 413 "), head
        assert b"--max-request-bytes" in head + sock.recv(65536)


def test_a_stalled_body_gets_408_and_the_connection_closes(url):
    body = json.dumps({"model": MODEL, "prompt": "hello", "max_tokens": 1}).encode()
    with connect(url) as sock:
        sock.sendall(f"{HEAD}Content-Length: {len(body)}\r\n\r\n".encode() + body[:10])
        response = read_response(sock)
    assert response.startswith(b"HTTP/1.1 408 ") and b"--body-timeout" in response, response


@pytest.mark.parametrize("sent", [b"", b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"],
                         ids=["nothing", "part of the headers"])
def test_a_stalled_request_head_is_closed(url, sent):
    with connect(url) as sock:
        sock.sendall(sent)
        assert read_response(sock) == b""


def test_headers_trickled_byte_by_byte_are_cut_off(url):
    """The deadline counts from the first byte: data does not move it (the head would take 20 s
    to send)."""
    with connect(url) as sock:
        assert closed_while_trickling(sock, (HEAD + "X-Pad: " + "a" * 400).encode())


def test_a_body_trickled_after_an_early_413_is_cut_off(url):
    with connect(url) as sock:
        sock.sendall(f"{HEAD}Content-Length: 10000000000\r\n\r\n".encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 413 ")
        assert closed_while_trickling(sock, b"a" * 400)


def test_keep_alive_still_serves_several_requests(url):
    body = json.dumps({"model": MODEL, "prompt": [5, 6], "max_tokens": 1}).encode()
    request = f"{HEAD}Content-Length: {len(body)}\r\n\r\n".encode() + body
    with connect(url) as sock:
        for _ in range(3):
            sock.sendall(request)
            data = b""
            while not data.endswith(b"}"):  # one JSON response; the connection stays open
                chunk = sock.recv(65536)
                assert chunk, data
                data += chunk
            assert data.startswith(b"HTTP/1.1 200 "), data
