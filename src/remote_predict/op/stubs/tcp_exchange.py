"""One frame out and its answer in, over a non-blocking socket that a selector drives.

The `tcp` transport's calls and probes are made of these. Every step returns at once: the connect, the
TLS handshake, writing the request and reading the answer each go as far as the socket allows, then
wait for the selector. So a peer that goes silent at any point (a stopped process, whose kernel still
accepts connections and buffers a few MB; a host whose packets vanish) holds only its own exchange,
never the thread that drives it and the other calls that thread waits for; the health rules
(`endpoints`) decide when to give up on it.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import ssl

from remote_predict import frames

CONNECTING, HANDSHAKING, WRITING, READING, DONE = "connecting", "handshaking", "writing", "reading", "done"


def connect(family: int, sockaddr: tuple) -> socket.socket:
    """A non-blocking socket with a connect begun (an `Exchange` on it, not `connected`, finishes it)."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    result = sock.connect_ex(sockaddr)
    if result not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
        sock.close()
        raise OSError(result, os.strerror(result))
    return sock  # even when connected at once, it reports writable: the exchange goes on from there


class Exchange:
    """Writes `parts` (a frame from `frames.encode`) to `sock` and reads one answer frame.

    `connected`: `sock` is an open connection (TLS already set up, if any); otherwise it comes from
    `connect`, and `tls` (with `hostname`) is set up once the connect completes. Call `start` once, then `step`
    on each event the selector reports for it; `step` raises OSError, ssl.SSLError, EOFError or
    frames.FrameError when the exchange failed (`state` says at which point).
    """

    def __init__(self, sock: socket.socket, parts: list, *, connected: bool, tls: ssl.SSLContext | None = None,
                 hostname: str = ""):
        self.sock = sock
        self.state = WRITING if connected else CONNECTING
        self._tls, self._hostname = tls, hostname
        self._writer = frames.FrameWriter(parts)
        self._reader = frames.FrameReader()
        self._selector: selectors.BaseSelector | None = None
        self._data = None
        self._events = 0

    @property
    def connecting(self) -> bool:
        """Not connected yet (TCP, or TLS)."""
        return self.state in (CONNECTING, HANDSHAKING)

    @property
    def answer(self) -> tuple[int, int, bytes, bytearray]:
        """(kind, value, meta, body) of the answer frame, once `state` is DONE."""
        return self._reader.frame()

    def start(self, selector: selectors.BaseSelector, data: object) -> bool:
        """Register with `selector` (events carry `data`) and go as far as possible; True when answered."""
        self._selector, self._data = selector, data
        if self.state == CONNECTING:
            self._want(selectors.EVENT_WRITE)  # writable: the connect completed or failed
            return False
        return self.step()

    def step(self) -> bool:
        """Go on from where the exchange stopped; True once the answer frame is complete."""
        if self.state == CONNECTING:
            error = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                raise OSError(error, os.strerror(error))
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                self._forget()  # the TLS socket takes over the file descriptor: register it instead
                self.sock = self._tls.wrap_socket(self.sock, server_hostname=self._hostname,
                                                  do_handshake_on_connect=False)
                self.state = HANDSHAKING
            else:
                self.state = WRITING
        if self.state == HANDSHAKING:
            try:
                self.sock.do_handshake()
            except ssl.SSLWantReadError:
                self._want(selectors.EVENT_READ)
                return False
            except ssl.SSLWantWriteError:
                self._want(selectors.EVENT_WRITE)
                return False
            self.state = WRITING
        if self.state == WRITING:
            if not self._writer.write(self.sock):
                self._want(selectors.EVENT_WRITE)
                return False
            self.state = READING
            self._want(selectors.EVENT_READ)  # the answer is not there yet: no read that would find nothing
            return False
        if self.state == READING:
            if not self._reader.feed(self.sock):
                self._want(selectors.EVENT_READ)
                return False
            self.state = DONE
            self._forget()
        return self.state == DONE

    def close(self, keep: bool = False) -> socket.socket | None:
        """Stop watching the socket; hand it back (for the next call) if `keep` and the exchange finished
        cleanly, else close it."""
        self._forget()
        if keep and self.state == DONE:
            return self.sock
        self.sock.close()
        return None

    def _want(self, events: int) -> None:
        if events == self._events:
            return
        if self._events:
            self._selector.modify(self.sock, events, self._data)
        else:
            self._selector.register(self.sock, events, self._data)
        self._events = events

    def _forget(self) -> None:
        if self._events:
            self._selector.unregister(self.sock)
            self._events = 0
