"""A reverse proxy that buffers request bodies, as nginx does by default.

``proxy_request_buffering on``: the proxy reads a request's head and its whole body
(``Content-Length``) before it opens a connection to the app, then relays the response
back. A client that sends its body slowly, stops, or resets never reaches the app. Enough
of a proxy for the storm's stall phase (one request per connection, ``Connection: close``);
nothing else.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

#: Longest wait for the next bytes of a client, and of the app.
TIMEOUT = 30.0


class BufferingProxy:
    """Listens on 127.0.0.1; forwards each complete request to *upstream* (``host, port``).

    :ivar forwarded: requests passed on to the app.
    :ivar dropped: requests whose client left before its body was in.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.forwarded = 0
        self.dropped = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, name="buffer-proxy", daemon=True)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed by stop()
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with client:
            client.settimeout(TIMEOUT)
            request = self._read_request(client)
            if request is None:
                with self._lock:
                    self.dropped += 1
                return
            with self._lock:
                self.forwarded += 1
            with contextlib.suppress(OSError), socket.create_connection(
                self.upstream, timeout=TIMEOUT
            ) as app:
                app.sendall(request)
                while data := app.recv(65536):
                    client.sendall(data)

    @staticmethod
    def _read_request(client: socket.socket) -> bytes | None:
        """The whole request, or ``None`` if the client left before it was in."""
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = client.recv(65536)
                if not chunk:
                    return None
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(body) < length:
                chunk = client.recv(65536)
                if not chunk:
                    return None
                body += chunk
        except OSError:  # reset, or silent for TIMEOUT
            return None
        return head + b"\r\n\r\n" + body[:length]

    def start(self) -> BufferingProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        # close() alone does not wake a thread blocked in accept() (Linux): shutdown() does
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._thread.join(5)


@contextlib.contextmanager
def buffering_proxy(app_url: str) -> Iterator[BufferingProxy]:
    """A :class:`BufferingProxy` in front of *app_url* (``http://127.0.0.1:PORT``)."""
    host, _, port = app_url.removeprefix("http://").partition(":")
    proxy = BufferingProxy((host, int(port))).start()
    try:
        yield proxy
    finally:
        proxy.stop()
