"""Running the app under uvicorn with limits on slow clients.

What uvicorn offers, and what is set here (`loramix serve` options):
    timeout_keep_alive              an idle keep-alive connection is closed after this (--keep-alive-timeout)
    h11_max_incomplete_event_size   the largest request head (request line + headers) h11 buffers: 16 KiB here
    limit_concurrency               not set: the engine's bounded queue answers 503 instead
uvicorn has no timeout on reading a request head: a client that sends its headers a byte at a time (slowloris)
keeps its connection forever. `header_timeout_protocol` adds one: a connection whose request head is not complete
within `header_timeout` seconds of opening (or of its previous response) is closed. The body's read timeout is
the app's (`create_app(body_timeout=...)`, 408).
"""

from __future__ import annotations

import socket
from typing import Any

from ..errors import LoramixError

__all__ = ["MAX_HEAD_BYTES", "check_port", "header_timeout_protocol", "run"]

MAX_HEAD_BYTES = 16 * 1024


def check_port(host: str, port: int, error: type[LoramixError] = LoramixError) -> None:
    """Fail at once, naming --port, when something listens on host:port already (`loramix serve` checks before
    the model loads; uvicorn would find out after it, and exit 3). A plain bind with SO_REUSEADDR only, as uvicorn
    binds: also refused when another Ray Serve proxy holds the port with SO_REUSEPORT (which would share it)."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise error(f"--host {host}: cannot bind to it ({exc.strerror or exc})") from exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise error(
                f"--port {port}: {host}:{port} is already in use ({exc.strerror or exc}); stop the server there or "
                "choose another --port"
            ) from exc


def header_timeout_protocol(header_timeout: float) -> type:
    """uvicorn's h11 protocol, closing connections whose request head takes longer than `header_timeout` seconds."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        _head_timer: Any = None

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(header_timeout, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()  # the head never completed

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol


def run(app: Any, *, host: str, port: int, log_level: str, header_timeout: float, keep_alive_timeout: float) -> None:
    """uvicorn.run with the limits above."""
    import uvicorn

    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=header_timeout_protocol(header_timeout),
        timeout_keep_alive=keep_alive_timeout,
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
    )
