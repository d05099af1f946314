"""Debian's PgBouncer in transaction mode, in front of the shared PostgreSQL, for tests.

    from pgbouncer import pgbouncer, stock_pgbouncer  # noqa: F401  (the fixtures)

    def test_x(stock_pgbouncer, postgres_url):
        url = stock_pgbouncer.url_for(postgres_url)

or `with PgBouncer() as bouncer: ...`. It listens on 127.0.0.1 on a free port,
trusts user "postgres" and pools 5 server connections per database and user.
Startup parameters it does not track, it refuses ("unsupported startup
parameter"), as PgBouncer does by default, except those named in
`ignore_startup_parameters`: the `pgbouncer` fixture ignores
`extra_float_digits` and `options`; `stock_pgbouncer` ignores none, as
deploy/pgbouncer.ini. Its config and log live in a temporary
directory under /tmp, removed by `stop()`. As root (CI) it runs as user
postgres, since pgbouncer refuses to run as root.
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import pytest
from sqlalchemy.engine import make_url

from conftest import free_port, skip_or_fail, wait_until

PGBOUNCER = "/usr/sbin/pgbouncer"


class PgBouncer:
    """One pgbouncer process; `start()`, then `stop()` (by its pid)."""

    def __init__(self, server_host: str = "127.0.0.1", server_port: int = 5432, pool_size: int = 5,
                 ignore_startup_parameters: Sequence[str] = ()) -> None:
        self.server = (server_host, server_port)
        self.pool_size = pool_size
        self.ignore_startup_parameters = tuple(ignore_startup_parameters)
        self.port = free_port()
        self.dir: Path | None = None
        self.process: subprocess.Popen | None = None

    def url_for(self, database_url: str) -> str:
        """`database_url` (same driver, user and database) pointed at this pgbouncer."""
        url = make_url(database_url).set(host="127.0.0.1", port=self.port)
        return url.render_as_string(hide_password=False)

    @property
    def log_path(self) -> Path:
        return self.dir / "pgbouncer.log"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except (OSError, TypeError):
            return ""

    def start(self) -> PgBouncer:
        if not os.access(PGBOUNCER, os.X_OK):
            skip_or_fail("Debian's pgbouncer is not installed (apt-get install pgbouncer)")
        self.dir = Path(tempfile.mkdtemp(prefix="pgbouncer-", dir="/tmp"))
        host, port = self.server
        (self.dir / "userlist.txt").write_text('"postgres" ""\n')
        (self.dir / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host={host} port={port}\n"
            "\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self.dir / 'userlist.txt'}\n"
            "admin_users = postgres\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {self.pool_size}\n"
            f"ignore_startup_parameters = {','.join(self.ignore_startup_parameters)}\n"
            f"logfile = {self.log_path}\n"
        )
        command = [PGBOUNCER, str(self.dir / "pgbouncer.ini")]
        if os.geteuid() == 0:  # "PgBouncer should not run as root"
            user = pwd.getpwnam("postgres")
            for path in (self.dir, *self.dir.iterdir()):
                os.chown(path, user.pw_uid, user.pw_gid)
            command[1:1] = ["-u", "postgres"]
        # It logs to stderr as well as to the logfile: keep only the file.
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        try:
            wait_until(self._answers, timeout=15, what=f"pgbouncer on port {self.port} (log: {self.log_path})")
        except BaseException:
            self.stop()
            raise
        return self

    def _answers(self) -> bool:
        import psycopg

        if self.process.poll() is not None:
            raise AssertionError(f"pgbouncer exited with {self.process.returncode}: {self.log()[-3000:]}")
        try:  # the whole chain: pgbouncer, then a server connection for the query
            with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                                 connect_timeout=2, autocommit=True) as conn:
                return conn.execute("SELECT 1").fetchone() == (1,)
        except psycopg.OperationalError:
            return False

    def stop(self) -> None:
        """SIGTERM (pgbouncer's immediate shutdown), SIGKILL if need be; remove the temp dir. Idempotent."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def running(bouncer: PgBouncer) -> Iterator[PgBouncer]:
    try:
        yield bouncer.start()
    finally:
        bouncer.stop()


@pytest.fixture
def pgbouncer() -> Iterator[PgBouncer]:
    """A fresh pgbouncer in transaction mode for one test, stopped after it, ignoring the
    startup parameters deploy/pgbouncer.ini ignores."""
    yield from running(PgBouncer(ignore_startup_parameters=("extra_float_digits", "options")))


@pytest.fixture
def stock_pgbouncer() -> Iterator[PgBouncer]:
    """The same with PgBouncer's default startup-parameter handling: it refuses `options`."""
    yield from running(PgBouncer())
