"""Run a command on a pseudo-terminal, as an operator's shell would, and read all it wrote.

Rich draws live bars and spinners only on a terminal; piped, the same command must stay plain.
"""

from __future__ import annotations

import os
import pty
import subprocess
from pathlib import Path


def run_on_terminal(argv: list[str], *, cwd: Path, env: dict[str, str], timeout: float = 120,
                    columns: int = 100) -> tuple[int, str]:
    """(exit code, everything written to the terminal, escape codes included)."""
    main, replica = pty.openpty()
    env = dict(env, COLUMNS=str(columns), TERM=env.get("TERM") or "xterm")
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=replica, stdout=replica,
                            stderr=replica, close_fds=True)
    os.close(replica)
    seen = bytearray()
    try:
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # every writer closed the terminal: the command exited
                break
            if not chunk:
                break
            seen += chunk
        code = proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(main)
    return code, seen.decode(errors="replace")
