"""Connection-level limits uvicorn lacks: a deadline for reading each request, a cap on open connections,
and one log line (not one traceback per attempt) when accepting fails for lack of file descriptors.

uvicorn closes idle keep-alive connections, but never one that sends half its headers, nothing at all, or
trickles its body: each holds a file descriptor forever, and about a thousand of them lock every real
client out. Here every request must arrive whole (headers and body) within `request_timeout` seconds of
the connection or of its first byte, and when `max_connections` are open a new connection evicts the
oldest one that has not sent a complete request yet; only when every connection is busy with a real
request does the newcomer get a 503.
"""
from __future__ import annotations

import asyncio
import json
import logging
import resource
import time

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("uvicorn.error")
DEFAULT_MAX_CONNECTIONS = 1000
FD_RESERVE = 64  # descriptors kept for the model files, logs and the engine


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (many systems start at 1024); the soft limit after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def connection_cap(requested: int | None) -> int:
    """`requested` (default 1000), kept below the open-file limit so accept() never runs out of descriptors."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = soft - FD_RESERVE if soft != resource.RLIM_INFINITY else 1 << 20
    return max(1, min(requested or DEFAULT_MAX_CONNECTIONS, room))


def guarded_protocol(*, request_timeout: float, max_connections: int) -> type[H11Protocol]:
    """An h11 protocol class for uvicorn.Config(http=...) with the limits above."""

    class GuardedProtocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.opened_at = time.monotonic()
            self.read_deadline: asyncio.TimerHandle | None = None
            self._arm()
            if len(self.connections) > max_connections:
                self._make_room()

        def waiting_for_request(self) -> bool:
            """Holds no request being answered: evicting it costs nobody a response."""
            return (getattr(self, "cycle", None) is None or self.cycle.response_complete) and \
                self.conn.their_state is not h11.DONE

        def _make_room(self) -> None:
            idle = [c for c in self.connections if c is not self and getattr(c, "waiting_for_request", lambda: False)()]
            if idle:
                oldest = min(idle, key=lambda c: c.opened_at)
                oldest.transport.close()
                return
            body = json.dumps({"error": {"message": f"the server has {max_connections} connections open; retry shortly",
                                         "type": "server_error", "param": None, "code": "too_many_connections"}}).encode()
            self.transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                                 b"retry-after: 1\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            self._disarm()
            self.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
                if self.read_deadline is None and not self.transport.is_closing():
                    self._arm()  # the first byte of a request (e.g. the next one on a keep-alive connection)
            else:
                self._disarm()  # the whole request is in

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self.read_deadline = self.loop.call_later(request_timeout, self._too_slow)

        def _disarm(self) -> None:
            if self.read_deadline is not None:
                self.read_deadline.cancel()
                self.read_deadline = None

        def _too_slow(self) -> None:
            # Closing the transport also tells an app waiting for the body that the client is gone.
            self.read_deadline = None
            if not self.transport.is_closing() and self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
                self.transport.close()

    return GuardedProtocol


class AcceptErrorLog:
    """Loop exception handler: 'out of system resource' from accept() logged once per `interval` with a count."""

    def __init__(self, interval: float = 10.0):
        self.interval, self.last, self.suppressed = interval, float("-inf"), 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        if "accept" not in str(context.get("message", "")):
            return loop.default_exception_handler(context)
        now = time.monotonic()
        if now - self.last < self.interval:
            self.suppressed += 1
            return
        more = f" ({self.suppressed} more in the last {self.interval:.0f}s)" if self.suppressed else ""
        log.error("cannot accept connections: %s%s; raise the open-file limit (ulimit -n) or lower --max-connections",
                  context.get("exception") or context.get("message"), more)
        self.last, self.suppressed = now, 0


def server_config(app, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                  request_timeout: float = 10.0, idle_timeout: float = 5.0, max_connections: int | None = None,
                  shutdown_timeout: float | None = 30.0) -> uvicorn.Config:
    """uvicorn settings with the limits above; `shutdown_timeout`: seconds SIGTERM waits for requests in flight."""
    cap = connection_cap(max_connections)
    return uvicorn.Config(app, host=host, port=port, log_level=log_level,
                          http=guarded_protocol(request_timeout=request_timeout, max_connections=cap),
                          timeout_keep_alive=idle_timeout,  # type: ignore[arg-type]  (a float works: call_later)
                          timeout_graceful_shutdown=shutdown_timeout)  # type: ignore[arg-type]


def install_accept_error_log(interval: float = 10.0) -> None:
    """Call from inside the running loop (the app's startup)."""
    asyncio.get_running_loop().set_exception_handler(AcceptErrorLog(interval))
