"""A throw-away PostgreSQL cluster for tests: Debian's server binaries, initdb into a temporary
folder, listening on 127.0.0.1 and a free port only, removed on exit.

PostgreSQL refuses to run as root; when the tests run as root (CI here), the cluster runs as
the `postgres` user the Debian package created.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from requant.serving.server import free_port


def pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _as_owner(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextlib.contextmanager
def postgres_server(root: Path, database: str = "prefect") -> Iterator[str]:
    """Yields an async SQLAlchemy URL (postgresql+asyncpg://…) to a fresh, empty database."""
    bindir = pg_bin()
    assert bindir is not None, "PostgreSQL is not installed: scripts/setup_system.sh"
    data, sock = root / "pgdata", root / "pgsock"
    for d in (root, sock):
        d.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
    user = "prefect"
    made = subprocess.run(_as_owner([str(bindir / "initdb"), "-D", str(data), "-U", user,
                                     "--auth=trust", "--no-sync"]),
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, f"initdb failed: {made.stdout[-1500:]}{made.stderr[-1500:]}"
    port = free_port()
    log = root / "postgres.log"
    opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(_as_owner([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o",
                              opts, "-w", "-t", "60", "start"]),
                   check=True, capture_output=True, timeout=120)
    try:
        subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", user,
                        database], check=True, capture_output=True, timeout=60,
                       env={**os.environ, "PGUSER": user})
        yield f"postgresql+asyncpg://{user}@127.0.0.1:{port}/{database}"
    finally:
        subprocess.run(_as_owner([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w",
                                  "stop"]), capture_output=True, timeout=120)
