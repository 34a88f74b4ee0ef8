"""A throwaway PostgreSQL server on 127.0.0.1 for tests, from Debian's `postgresql` package.

`initdb` into a temporary data directory, `pg_ctl start` on a free port with trust authentication
(the socket and the port are private to the test), `pg_ctl stop` at the end. PostgreSQL refuses to
run as root, so under root the server runs as the `postgres` system user the package creates. The
fixture skips, saying why, when no server binaries are found or the server cannot start.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self, root: Path):
        self.root = root
        self.data = root / "pgdata"
        self.sockets = root / "sockets"
        self.log = root / "postgres.log"
        self.port = _free_port()
        self.prefix: list[str] = []

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*self.prefix, *args], capture_output=True, text=True, timeout=120)

    def start(self) -> "PostgresServer":
        initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
        if not initdb or not pg_ctl:
            pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl); install Debian's postgresql (.ci/run does)")
        self.sockets.mkdir(parents=True)
        if os.geteuid() == 0:  # the server refuses root: run it as the package's postgres user
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and there is no 'postgres' user to run the server as")
            for path in (self.root, self.sockets):
                os.chown(path, user.pw_uid, user.pw_gid)
            self.prefix = ["runuser", "-u", "postgres", "--"]
        done = self._run(initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        if done.returncode != 0:
            pytest.skip(f"initdb failed: {done.stderr.strip().splitlines()[-1:]}")
        options = f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync=off"
        done = self._run(pg_ctl, "-D", str(self.data), "-o", options, "-l", str(self.log), "-w", "start")
        if done.returncode != 0:
            tail = self.log.read_text().strip().splitlines()[-3:] if self.log.exists() else done.stderr
            pytest.skip(f"the PostgreSQL server did not start: {tail}")
        return self

    def stop(self) -> None:
        pg_ctl = _binary("pg_ctl")
        if pg_ctl and self.data.exists():
            self._run(pg_ctl, "-D", str(self.data), "-m", "immediate", "stop")


@pytest.fixture
def postgres_server():
    """A running PostgreSQL server on 127.0.0.1 (its URL: `.url`), stopped and deleted afterwards.

    Its folder is made directly under the system temp dir: pytest's own temp folders are private to
    root, and the server may run as the postgres user.
    """
    root = Path(tempfile.mkdtemp(prefix="m2dx-postgres-"))
    os.chmod(root, 0o755)
    server = PostgresServer(root)
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
