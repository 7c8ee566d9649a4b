"""A throwaway PostgreSQL server for the tests (``import postgres_cluster``; tests/ is on ``sys.path``).

``initdb`` into a new folder under /tmp, ``pg_ctl start`` listening only on a Unix socket in that folder
(no TCP port is opened), fsync off (the data is thrown away), and an empty schema per test, named in
the URL as the connection's ``search_path`` (a schema costs ~5 ms, ``CREATE DATABASE`` 0.1-0.7 s). The server
binaries come from Debian's ``postgresql`` package (``.ci/run`` installs it). PostgreSQL refuses to
run as root: under root the server runs as the ``postgres`` user the package creates.

Without the binaries (or psycopg) the tests that need the server skip with the reason; with
``HEMATOVISION_TEST_POSTGRES=require`` (set by ``.ci/run``) they fail instead, so CI cannot skip them quietly.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

REQUIRE_ENV = "HEMATOVISION_TEST_POSTGRES"
SUPERUSER = "hv_test"
DATABASE = "hv"


def unavailable(reason: str) -> None:
    """Skip the test, or fail it when the environment says PostgreSQL must be tested (CI)."""
    if os.environ.get(REQUIRE_ENV) == "require":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=require)")
    pytest.skip(reason)


def server_binaries() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl``: on PATH, else Debian's newest /usr/lib/postgresql/N/bin."""
    initdb = shutil.which("initdb")
    if initdb is not None and shutil.which("pg_ctl") is not None:
        return Path(initdb).resolve().parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]))
    return Path(found[-1]).parent if found else None


class PostgresCluster:
    """One running server; :meth:`new_database` hands each test an empty schema of its own in database ``hv``."""

    def __init__(self, root: Path, binaries: Path, run_as: dict[str, Any]) -> None:
        self.root, self.binaries, self.run_as = root, binaries, run_as
        self.data, self.log = root / "data", root / "server.log"
        self.port = 5432  # only names the socket file: the folder is private to this cluster
        self._numbers = itertools.count(1)

    @classmethod
    def start(cls) -> PostgresCluster:
        """initdb and start a server, or skip (fail under ``HEMATOVISION_TEST_POSTGRES=require``) with the reason."""
        try:
            import psycopg  # noqa: F401
        except ImportError:
            unavailable("psycopg is not installed (pip install 'hematovision[postgres]')")
        binaries = server_binaries()
        if binaries is None:
            unavailable("PostgreSQL server binaries (initdb, pg_ctl) not found; install Debian's postgresql package")
        assert binaries is not None
        run_as: dict[str, Any] = {}
        root = Path(tempfile.mkdtemp(prefix="hv-pg-"))  # short: a socket path has a ~100-byte limit
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(root)
                unavailable("running as root and there is no 'postgres' user to run the PostgreSQL server as")
            os.chown(root, account.pw_uid, account.pw_gid)
            run_as = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        cluster = cls(root, binaries, run_as)
        try:
            cluster._run("initdb", "-D", str(cluster.data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
                         "--locale=C.UTF-8", "--no-sync")
            options = (f"-c fsync=off -c full_page_writes=off -c synchronous_commit=off -c listen_addresses='' "
                       f"-k {root} -p {cluster.port} -c max_connections=200")
            cluster._run("pg_ctl", "-D", str(cluster.data), "-l", str(cluster.log), "-w", "-t", "60", "-o", options,
                         "start")
            cluster._run("createdb", "-h", str(root), "-p", str(cluster.port), "-U", SUPERUSER, DATABASE)
        except subprocess.CalledProcessError as error:
            log = cluster.log.read_text()[-2000:] if cluster.log.exists() else ""
            shutil.rmtree(root, ignore_errors=True)
            pytest.fail(f"the PostgreSQL test server did not start: {error.stderr or error}\n{log}")
        return cluster

    def _run(self, program: str, *args: str) -> None:
        subprocess.run([str(self.binaries / program), *args], check=True, capture_output=True, text=True,
                       cwd=self.root, **self.run_as)

    def url(self, schema: str | None = None) -> str:
        """The ``--db`` URL of database ``hv`` in this cluster (over the Unix socket), in ``schema`` if given."""
        url = f"postgresql://{SUPERUSER}@/{DATABASE}?host={self.root}&port={self.port}"
        return url + (f"&options=-csearch_path%3D{schema}" if schema else "")

    def new_database(self) -> str:
        """Create an empty schema; return the URL whose connections work in it (what the app sees as its database)."""
        import psycopg

        schema = f"test_{next(self._numbers)}"
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f"CREATE SCHEMA {schema}")
        return self.url(schema)

    def stop(self) -> None:
        """Stop the server at once (its data is thrown away) and remove its folder."""
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
