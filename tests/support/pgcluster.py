"""A private PostgreSQL cluster for one test: its own ``initdb`` in a temporary directory, its
own port, trust auth; it can be stopped, restarted and kept down on cue.

Never the machine's own server: the cluster lives in a directory named
``sagas-pg-<pid>-*`` under the temp dir, and everything here acts on that directory only (the
leftovers of a crashed run are recognised by their dead pid and removed, their postmaster
stopped only when its command line names that directory).

``initdb`` refuses to run as root, so as root every server command runs as the ``postgres`` OS
user (``runuser``) in a directory that user owns. With ``netns`` the server runs inside that
network namespace (tests/support/netns.py) and listens on ``listen`` there; the admin
connection goes through the Unix socket in the cluster's directory, which every namespace sees.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from sagas.devtools.localredis import free_port

StopMode = Literal["smart", "fast", "immediate"]
DIR_PREFIX = "sagas-pg-"
SUPERUSER = "postgres"


class PgClusterUnavailable(RuntimeError):
    """No PostgreSQL server binaries on this machine (or no user to run them as)."""


def pg_bindir() -> Path:
    """Debian's newest /usr/lib/postgresql/<ver>/bin, else ``pg_config --bindir``, else PATH."""
    debian = Path("/usr/lib/postgresql")
    if debian.is_dir():
        versions = sorted(
            (p for p in debian.iterdir() if (p / "bin" / "initdb").exists()),
            key=lambda p: [int(x) for x in re.findall(r"\d+", p.name)] or [0],
        )
        if versions:
            return versions[-1] / "bin"
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        bindir = Path(out.stdout.strip())
        if (bindir / "initdb").exists():
            return bindir
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise PgClusterUnavailable("no PostgreSQL server binaries (initdb, pg_ctl) found")


def available() -> tuple[bool, str]:
    """Whether a private cluster can be made here, and why not."""
    try:
        pg_bindir()
        if os.geteuid() == 0:
            pwd.getpwnam(SUPERUSER)
            if not shutil.which("runuser"):
                return False, "running as root without runuser"
    except (PgClusterUnavailable, KeyError) as exc:
        return False, f"no private PostgreSQL cluster: {exc}"
    return True, ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_leftovers(tmp: Path | None = None) -> list[Path]:
    """Remove clusters left by test processes that died; returns the directories removed."""
    removed: list[Path] = []
    for path in Path(tmp or tempfile.gettempdir()).glob(f"{DIR_PREFIX}*"):
        match = re.match(rf"{DIR_PREFIX}(\d+)-", path.name)
        if not match or _pid_alive(int(match.group(1))):
            continue
        pidfile = path / "data" / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, IndexError):
            postmaster = int(pidfile.read_text().splitlines()[0])
            cmdline = Path(f"/proc/{postmaster}/cmdline").read_bytes().decode(errors="replace")
            if str(path / "data") in cmdline:  # only a server of that directory
                os.kill(postmaster, signal.SIGKILL)
                time.sleep(0.2)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


class PgCluster:
    """``PgCluster().start()``; ``url(db)``, ``create_database``, ``stop``/``start``/
    ``restart``/``down_for``; ``close()`` (also at exit) stops it and deletes its directory."""

    def __init__(
        self, *, port: int | None = None, listen: str = "127.0.0.1",
        netns: Sequence[str] = (), settings: dict[str, str] | None = None,
    ) -> None:
        self.bindir = pg_bindir()
        self.listen = listen
        self.port = port or (free_port() if not netns else 5432)
        self.netns_prefix = list(netns)  # e.g. ["ip", "netns", "exec", "<ns>"]
        cleanup_leftovers()
        self.dir = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-"))
        self.data = self.dir / "data"
        self.log_path = self.dir / "server.log"
        self.settings = {
            # A test's cluster: durability off, enough connections for several hosts' workers.
            "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
            "max_connections": "300", "shared_buffers": "32MB",
            "log_min_messages": "warning", "log_connections": "off",
        } | (settings or {})
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam(SUPERUSER)
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self._as_user = ["runuser", "-u", SUPERUSER, "--"]
        self._initialised = False
        self._closed = False
        atexit.register(self.close)

    # --- addresses -----------------------------------------------------------------------------
    def url(self, database: str = "postgres", host: str | None = None) -> str:
        """SQLAlchemy URL of ``database`` through TCP at ``host`` (default: the listen address)."""
        return f"postgresql+psycopg://{SUPERUSER}@{host or self.listen}:{self.port}/{database}"

    def admin_dsn(self, database: str = "postgres") -> str:
        """A libpq DSN through the Unix socket: works whatever the network does."""
        return f"host={self.dir} port={self.port} user={SUPERUSER} dbname={database}"

    # --- server commands ---------------------------------------------------------------------
    def _run(self, *args: str, timeout: float = 120, check: bool = True
             ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*self.netns_prefix, *self._as_user, *args], capture_output=True, text=True,
            timeout=timeout, cwd=self.dir,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args[:2])} exited {result.returncode}: {result.stderr.strip()}\n"
                f"{self.server_log()[-2000:]}"
            )
        return result

    def _initdb(self) -> None:
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", SUPERUSER,
                  "--auth=trust", "--encoding=UTF8", "--no-sync", "-N")
        conf = dict(self.settings, port=str(self.port), listen_addresses=f"'{self.listen}'",
                    unix_socket_directories=f"'{self.dir}'")
        with open(self.data / "postgresql.conf", "a") as fh:
            fh.write("\n# sagas test cluster\n")
            fh.writelines(f"{k} = {v}\n" for k, v in conf.items())
        # Trust everyone who can reach it: it listens only on loopback or a test namespace.
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 0.0.0.0/0 trust\nhost all all ::/0 trust\n"
        )
        self._initialised = True

    def start(self, timeout: float = 60) -> PgCluster:
        """initdb on first use, then ``pg_ctl start`` and wait until it accepts connections."""
        if not self._initialised:
            self._initdb()
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log_path),
                  "-w", "-t", str(int(timeout)), "start", timeout=timeout + 10)
        return self

    def stop(self, mode: StopMode = "fast", timeout: float = 60) -> None:
        """``smart`` waits for clients, ``fast`` disconnects them, ``immediate`` is a crash."""
        if not self.running():
            return
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w",
                  "-t", str(int(timeout)), "stop", timeout=timeout + 10)

    def restart(self, mode: StopMode = "fast") -> float:
        """Stop (``mode``) and start again at once; returns how long it was down (s)."""
        return self.down_for(0.0, mode)

    def down_for(self, seconds: float, mode: StopMode = "fast") -> float:
        """Stop, stay down ``seconds``, start; returns the time it refused connections (s).

        Blocks: run it in a thread to keep the rest of a test going meanwhile.
        """
        began = time.monotonic()
        self.stop(mode)
        time.sleep(max(0.0, seconds - (time.monotonic() - began)))
        self.start()
        return time.monotonic() - began

    def running(self) -> bool:
        if not self._initialised:
            return False
        result = self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "status",
                           check=False, timeout=30)
        return result.returncode == 0

    # --- databases -------------------------------------------------------------------------------
    def create_database(self, name: str) -> str:
        """A new database; returns its SQLAlchemy URL (TCP, the listen address)."""
        import psycopg

        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise ValueError(f"not a plain database name: {name!r}")
        with psycopg.connect(self.admin_dsn(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def server_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # --- cleanup ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the server (immediate) and delete its directory; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self.stop("immediate", timeout=20)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PgCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
