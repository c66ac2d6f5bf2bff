"""remote-predict's framed TCP transport: TF Serving's PredictRequest/PredictResponse, one frame per call.

Why a transport of our own beside gRPC: on the machines this project is measured on, a Python gRPC
unary call costs about 0.3 ms of CPU in the client and 0.45 ms in the server, ten times what the same
bytes cost over a plain TCP connection (`benchmarks/RESULTS.md`). A split model makes a call to every
shard for every request, so that cost decides whether a split is usable. The messages stay TF Serving's
protos (encoded by `wire`), and the servers keep serving gRPC and REST for every other client; this
transport only carries Predict between remote-predict's own op and servers.

A connection carries one call at a time: the client writes a request frame and reads the answer frame,
then may reuse the connection. A frame is a fixed header, then `meta` bytes, then `body` bytes:

    magic "RPF1" | kind u8 | flags u8 | reserved u16 | value u32 | meta length u32 | body length u32

A connection is read through a `FrameReader` (one `recv` for a whole small frame).
Request frames: kind PREDICT (body: a serialized PredictRequest; value: the call's timeout in ms, 0 for
none; meta: JSON object of call metadata such as W3C `traceparent`) or HEALTH (no body). Answer frames
echo the kind; value is the canonical status code (0 = OK), meta the error message (UTF-8), body a
serialized PredictResponse when OK. For HEALTH, the answer's code is OK while the server is SERVING and
UNAVAILABLE while it drains.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
from collections.abc import Mapping, Sequence

MAGIC = b"RPF1"
PREDICT = 1
HEALTH = 2
KINDS = (PREDICT, HEALTH)
HEADER = struct.Struct("<4sBBHIII")
MAX_FRAME_BYTES = (1 << 31) - 1  # as TF Serving's gRPC message limit
_MAX_META_BYTES = 1 << 16


class FrameError(Exception):
    """The peer sent something that is not a frame, or closed the connection in the middle of one."""


def encode(kind: int, value: int, meta: bytes, body: Sequence[bytes | memoryview] | bytes) -> list:
    """The parts of one frame, for `socket.sendmsg` (no copy of the body)."""
    parts = [body] if isinstance(body, bytes | memoryview) else list(body)
    size = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
    if size > MAX_FRAME_BYTES:
        raise FrameError(f"a frame body of {size} bytes is larger than the limit of {MAX_FRAME_BYTES}")
    return [HEADER.pack(MAGIC, kind, 0, 0, value, len(meta), size), meta, *parts]


def encode_meta(metadata: Mapping[str, str] | None) -> bytes:
    return json.dumps(dict(metadata), separators=(",", ":")).encode("utf-8") if metadata else b""


def decode_meta(meta: bytes) -> dict[str, str]:
    if not meta:
        return {}
    try:
        doc = json.loads(meta)
    except (UnicodeDecodeError, ValueError) as e:
        raise FrameError(f"frame metadata is not JSON: {e}") from None
    if not isinstance(doc, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in doc.items()):
        raise FrameError("frame metadata must be a JSON object of strings")
    return doc


def send(sock: socket.socket, parts: list) -> None:
    """Write a whole frame to a blocking socket."""
    left = send_some(sock, views(parts))
    if left:
        raise BlockingIOError("the socket would block: use send_some on non-blocking sockets")


def send_some(sock: socket.socket, pending: list[memoryview]) -> list[memoryview]:
    """Write what the socket takes now (it may be non-blocking); returns what is left to write."""
    pending = [v for v in pending if v.nbytes]
    while pending:
        try:
            # (no sendmsg over TLS)
            sent = sock.send(pending[0]) if isinstance(sock, ssl.SSLSocket) else sock.sendmsg(pending)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return pending
        while sent and pending:
            if sent >= pending[0].nbytes:
                sent -= pending[0].nbytes
                pending.pop(0)
            else:
                pending[0] = pending[0][sent:]
                sent = 0
    return pending


def views(parts: list) -> list[memoryview]:
    return [memoryview(p).cast("B") for p in parts]


_READ_CHUNK = 16 << 10


class FrameReader:
    """Frames from a connection, with one `recv` for a small frame (header, meta and body together).

    `feed` reads what a non-blocking socket has and returns a frame once it is whole (else None);
    `read` blocks until one is. The body is a view of the reader's buffer, which the reader then lets go
    of (it starts a new one), so arrays made from the body need no copy. A buffer grows only as bytes
    arrive: a peer declaring a huge frame and sending nothing makes us allocate nothing much.
    """

    def __init__(self, max_body: int = MAX_FRAME_BYTES):
        self.max_body = max_body
        self._buffer = bytearray(_READ_CHUNK)
        self._have = 0
        self._header: tuple | None = None

    def _frame(self) -> tuple[int, int, bytes, memoryview] | None:
        if self._header is None:
            if self._have < HEADER.size:
                return None
            magic, kind, _, _, value, meta_size, body_size = HEADER.unpack_from(self._buffer)
            if magic != MAGIC:
                raise FrameError("not a remote-predict frame (bad magic): is this port a remote-predict --tcp_port?")
            if kind not in KINDS:
                raise FrameError(f"unknown frame kind {kind}")
            if meta_size > _MAX_META_BYTES:
                raise FrameError(f"frame metadata of {meta_size} bytes is larger than the limit of {_MAX_META_BYTES}")
            if body_size > self.max_body:
                raise FrameError(f"a frame body of {body_size} bytes is larger than the limit of {self.max_body}")
            self._header = (kind, value, meta_size, body_size)
        kind, value, meta_size, body_size = self._header
        end = HEADER.size + meta_size + body_size
        if self._have < end:
            return None
        buffer, have = self._buffer, self._have
        self._buffer, self._have, self._header = bytearray(_READ_CHUNK), have - end, None
        self._buffer[:self._have] = buffer[end:have]  # (nothing, unless the peer sent ahead)
        view = memoryview(buffer)
        return kind, value, bytes(view[HEADER.size:HEADER.size + meta_size]), view[HEADER.size + meta_size:end]

    def _recv(self, sock: socket.socket) -> None:
        if self._have == len(self._buffer):  # grow: to the frame's size once known, else doubling
            wanted = HEADER.size + self._header[2] + self._header[3] if self._header else 2 * len(self._buffer)
            self._buffer.extend(bytes(min(max(wanted, len(self._buffer) + 1) - len(self._buffer), len(self._buffer))))
        with memoryview(self._buffer) as view:
            got = sock.recv_into(view[self._have:])
        if not got:
            if self._have == 0:
                raise EOFError("the peer closed the connection")
            raise FrameError("the connection closed in the middle of a frame")
        self._have += got

    def feed(self, sock: socket.socket) -> tuple[int, int, bytes, memoryview] | None:
        while True:
            frame = self._frame()
            if frame is not None:
                return frame
            try:
                self._recv(sock)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return None

    def read(self, sock: socket.socket) -> tuple[int, int, bytes, memoryview]:
        while True:
            frame = self._frame()
            if frame is not None:
                return frame
            self._recv(sock)
