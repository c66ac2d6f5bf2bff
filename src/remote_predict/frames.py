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
    if not FrameWriter(parts).write(sock):
        raise BlockingIOError("the socket would block: use a FrameWriter on a non-blocking socket")


_READ_CHUNK = 16 << 10


def parse_header(header: bytes | bytearray | memoryview, max_body: int = MAX_FRAME_BYTES) -> tuple[int, int, int, int]:
    """(kind, value, meta size, body size) of a frame's header, or FrameError: the checks every reader makes."""
    magic, kind, _, _, value, meta_size, body_size = HEADER.unpack_from(header)
    if magic != MAGIC:
        raise FrameError("not a remote-predict frame (bad magic): is this port a remote-predict --tcp_port?")
    if kind not in KINDS:
        raise FrameError(f"unknown frame kind {kind}")
    if meta_size > _MAX_META_BYTES:
        raise FrameError(f"frame metadata of {meta_size} bytes is larger than the limit of {_MAX_META_BYTES}")
    if body_size > max_body:
        raise FrameError(f"a frame body of {body_size} bytes is larger than the limit of {max_body}")
    return kind, value, meta_size, body_size


class FrameReader:
    """Frames from a connection, with one `recv` for a whole small frame (header, meta and body together).

    `feed` reads what a non-blocking socket has and says whether a frame is complete (then `frame()` is it);
    `read` blocks until one is. A buffer grows only as bytes arrive (doubling from 16 KiB), so that a peer
    declaring a huge frame and sending nothing makes us allocate nothing much. The body is a view of the
    buffer, which the reader then lets go of (it starts a new one): arrays made from it need no copy.
    """

    def __init__(self, max_body: int = MAX_FRAME_BYTES):
        self.max_body = max_body
        self.header: tuple[int, int, int, int] | None = None  # (kind, value, meta size, body size)
        self._buffer = bytearray(_READ_CHUNK)
        self._have = 0
        self._frame: tuple[int, int, bytes, memoryview] | None = None

    def _complete(self) -> bool:
        if self.header is None:
            if self._have < HEADER.size:
                return False
            self.header = parse_header(self._buffer, self.max_body)
        kind, value, meta_size, body_size = self.header
        end = HEADER.size + meta_size + body_size
        if self._have < end:
            return False
        buffer, have = self._buffer, self._have
        view = memoryview(buffer)
        self._frame = kind, value, bytes(view[HEADER.size:HEADER.size + meta_size]), view[HEADER.size + meta_size:end]
        self._buffer, self._have, self.header = bytearray(_READ_CHUNK), have - end, None
        self._buffer[:self._have] = buffer[end:have]  # (nothing, unless the peer sent ahead)
        return True

    def _recv(self, sock: socket.socket) -> None:
        if self._have == len(self._buffer):  # full: grow towards the frame's size, doubling at most
            size = len(self._buffer)
            wanted = HEADER.size + self.header[2] + self.header[3] if self.header else 2 * size
            self._buffer.extend(bytes(min(max(wanted - size, 1), size)))
        with memoryview(self._buffer) as view:
            got = sock.recv_into(view[self._have:])
        if not got:
            if self._have == 0:
                raise EOFError("the peer closed the connection")
            raise FrameError("the connection closed in the middle of a frame")
        self._have += got

    def feed(self, sock: socket.socket) -> bool:
        """Read what has arrived; True once a frame is complete (`frame()`). Raises EOFError when the peer
        closed between frames, FrameError for a bad frame or one cut short."""
        while not self._complete():
            try:
                self._recv(sock)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return False
        return True

    def frame(self) -> tuple[int, int, bytes, memoryview]:
        """The frame `feed` (or `read`) completed: (kind, value, meta, body)."""
        return self._frame

    def read(self, sock: socket.socket) -> tuple[int, int, bytes, memoryview]:
        """The next frame from a blocking socket."""
        while not self._complete():
            self._recv(sock)
        return self._frame


def read(sock: socket.socket, max_body: int = MAX_FRAME_BYTES) -> tuple[int, int, bytes, memoryview]:
    """One frame from a blocking socket: (kind, value, meta, body). Raises EOFError at a clean end between
    frames. (A connection that carries several frames keeps one FrameReader: it may read ahead.)"""
    return FrameReader(max_body).read(sock)


class FrameWriter:
    """One frame to a non-blocking socket, as much as it takes at a time: `write` says whether all is sent."""

    def __init__(self, parts: list):
        if len(parts) > 2:  # header and meta in one piece: one small write fewer
            parts = [b"".join(bytes(p) for p in parts[:2]), *parts[2:]]
        self._views = [memoryview(p).cast("B") for p in parts if len(p)]

    def write(self, sock: socket.socket) -> bool:
        tls = isinstance(sock, ssl.SSLSocket)  # no sendmsg over TLS
        while self._views:
            try:
                sent = sock.send(self._views[0]) if tls else sock.sendmsg(self._views)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                return False
            while sent and self._views:
                if sent >= self._views[0].nbytes:
                    sent -= self._views[0].nbytes
                    self._views.pop(0)
                else:
                    self._views[0] = self._views[0][sent:]
                    sent = 0
        return True
