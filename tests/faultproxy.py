"""A TCP proxy for fault tests: the one place a test cuts or stalls the database.

    with FaultProxy("127.0.0.1", 5432) as proxy:
        url = proxy.url_for(postgres_url)   # the app connects through the proxy
        proxy.cut()       # the database host goes away: connections closed, new ones refused
        proxy.stall()     # the database stops answering: connections held open, no bytes move
        proxy.restore()   # back to normal; bytes and connections held by a stall flow again

The shared PostgreSQL server is never stopped or reconfigured. Everything runs
in daemon threads of the test process: one accepting, and per connection one
thread for each direction. Every control takes effect before it returns and is
safe to call from any thread.

Sockets are only ever `shutdown()` by the controls (which wakes a thread blocked
on them without freeing the file descriptor), and closed by the connection's
own thread once both directions have stopped.
"""
from __future__ import annotations

import socket
import threading

from sqlalchemy.engine import make_url

_CHUNK = 65536
_JOIN_S = 10.0  # a guard: every thread here stops as soon as its sockets are shut down


class _Connection:
    """A client socket and, once connected through, its upstream socket."""

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.upstream: socket.socket | None = None
        self.closed = False
        self.thread: threading.Thread | None = None

    def shutdown(self) -> None:
        """Stop both directions; called with the proxy's lock held."""
        self.closed = True
        for sock in (self.client, self.upstream):
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # not connected any more


class FaultProxy:
    """Forward 127.0.0.1:`port` to `target_host`:`target_port`, until a test says otherwise."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.connections_accepted = 0  # every accepted client connection, refused ones included
        self.connections_refused = 0  # closed at once because of `cut()`
        self._cond = threading.Condition()
        self._connections: set[_Connection] = set()
        self._cut = False
        self._stalled = False
        self._closing = False
        self._held_bytes = 0
        self._held_connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"faultproxy-{self.port}", daemon=True)
        self._acceptor.start()

    # -- controls -----------------------------------------------------------------------

    def cut(self) -> None:
        """Close every open connection, and refuse new ones until `restore()`."""
        with self._cond:
            self._cut = True
            connections = list(self._connections)
            for conn in connections:
                conn.shutdown()
            self._cond.notify_all()
        self._join(connections)

    def stall(self) -> None:
        """Keep connections open but forward nothing, and hold new ones, until `restore()`."""
        with self._cond:
            self._stalled = True

    def restore(self) -> None:
        """Forward normally again: bytes and connections held by a stall go through."""
        with self._cond:
            self._cut = False
            self._stalled = False
            self._cond.notify_all()

    def close(self) -> None:
        """Stop listening, close every connection, and join every thread. Idempotent."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            connections = list(self._connections)
            for conn in connections:
                conn.shutdown()
            self._cond.notify_all()
        try:  # wake the accept loop, which then sees `_closing`
            socket.create_connection(("127.0.0.1", self.port), timeout=_JOIN_S).close()
        except OSError:
            pass
        self._acceptor.join(_JOIN_S)
        self._listener.close()
        self._join(connections)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- for tests ------------------------------------------------------------------------

    def url_for(self, database_url: str) -> str:
        """`database_url` (same driver, user and database) pointed at this proxy."""
        url = make_url(database_url).set(host="127.0.0.1", port=self.port)
        return url.render_as_string(hide_password=False)

    @property
    def open_connections(self) -> int:
        """Client connections not yet closed, held ones included."""
        with self._cond:
            return len(self._connections)

    @property
    def held_connections(self) -> int:
        """New connections a stall keeps from connecting through."""
        with self._cond:
            return self._held_connections

    @property
    def held_bytes(self) -> int:
        """Bytes received but not forwarded because of a stall."""
        with self._cond:
            return self._held_bytes

    # -- threads -------------------------------------------------------------------------

    def _join(self, connections: list[_Connection]) -> None:
        for conn in connections:
            if conn.thread is not threading.current_thread():
                conn.thread.join(_JOIN_S)

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._cond:
                if self._closing:
                    client.close()
                    return
                self.connections_accepted += 1
                if self._cut:
                    self.connections_refused += 1
                    client.close()
                    continue
                conn = _Connection(client)
                conn.thread = threading.Thread(target=self._serve, args=(conn,), daemon=True,
                                               name=f"faultproxy-{self.port}-conn")
                self._connections.add(conn)
                conn.thread.start()  # under the lock, so `cut()` never joins an unstarted thread

    def _may_forward(self, conn: _Connection, held_bytes: int = 0, new: bool = False) -> bool:
        """Wait out a stall; False once the connection is closed instead."""
        with self._cond:
            self._held_bytes += held_bytes
            self._held_connections += new
            while self._stalled and not conn.closed:
                self._cond.wait()
            self._held_bytes -= held_bytes
            self._held_connections -= new
            return not conn.closed

    def _serve(self, conn: _Connection) -> None:
        """Connect `conn` through, then pump client -> upstream here and upstream -> client beside."""
        other: threading.Thread | None = None
        try:
            if not self._may_forward(conn, new=True):
                return
            try:
                upstream = socket.create_connection(self.target, timeout=_JOIN_S)
                upstream.settimeout(None)
            except OSError:
                return  # the target is down: the client sees its connection closed
            with self._cond:
                conn.upstream = upstream
                if conn.closed:  # cut or closed while connecting
                    conn.shutdown()
                    return
            other = threading.Thread(target=self._pump, args=(conn, upstream, conn.client), daemon=True,
                                     name=f"faultproxy-{self.port}-down")
            other.start()
            self._pump(conn, conn.client, upstream)
        finally:
            with self._cond:
                conn.shutdown()
            if other is not None:
                other.join(_JOIN_S)
            conn.client.close()
            if conn.upstream is not None:
                conn.upstream.close()
            with self._cond:
                self._connections.discard(conn)
                self._cond.notify_all()

    def _pump(self, conn: _Connection, source: socket.socket, sink: socket.socket) -> None:
        """Forward `source` to `sink` until either end closes; shut both down then."""
        try:
            while True:
                try:
                    data = source.recv(_CHUNK)
                except OSError:
                    data = b""
                if not self._may_forward(conn, held_bytes=len(data)):
                    return  # an end of stream is held by a stall too, like any other bytes
                if not data:
                    return
                try:
                    sink.sendall(data)
                except OSError:
                    return
        finally:
            with self._cond:
                conn.shutdown()
