"""``sagas <command> --help`` as an operator reads it: piped at 80 columns, for every command.

The commands are read from the CLI's own tree, so a command added later is checked too. No
application is needed for help, and none is named.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SAGAS = str(Path(sys.executable).parent / "sagas")
PYTHON_TYPE_TAG = re.compile(r"<[a-z][\w |,\[\].-]*>")  # <bool>, <int range>, <a|b|c>


def command_paths() -> list[tuple[str, ...]]:
    import typer.main

    from sagas.ops.cli import cli

    paths: list[tuple[str, ...]] = []

    def walk(command: Any, path: tuple[str, ...]) -> None:
        paths.append(path)
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            walk(sub, (*path, name))

    walk(typer.main.get_command(cli), ())
    return paths


def help_of(*path: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SAGAS_APP", "DATABASE_URL")}
    env.update(COLUMNS="80", PYTHONPATH=str(ROOT))
    return subprocess.run([SAGAS, *path, "--help"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60, check=False)


def panel_rows(text: str, panel: str) -> list[list[str]]:
    """The rows of one box of rich's help (``Options``, ``Arguments``), split into columns;
    a description wrapped onto the next line is not a row."""
    rows: list[list[str]] = []
    inside = False
    for line in text.splitlines():
        if line.startswith(f"╭─ {panel} "):
            inside = True
        elif line.startswith("╰"):
            inside = False
        elif inside and line.startswith("│ ") and line[2] != " ":
            rows.append(re.split(r"\s{2,}", line.strip("│").strip()))
    return rows


def test_every_command_is_checked() -> None:
    paths = {" ".join(p) for p in command_paths()}
    assert {"", "list", "show", "bench", "relay", "audit", "recover", "db upgrade",
            "outbox stats"} <= paths


@pytest.mark.parametrize("path", command_paths(), ids=lambda p: " ".join(p) or "sagas")
def test_help_piped_at_80_columns_is_typers_with_a_description_for_every_option(
    path: tuple[str, ...],
) -> None:
    shown = help_of(*path)
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    assert f"Usage: {' '.join(('sagas', *path))} [OPTIONS]" in text, text
    assert max(len(line) for line in text.splitlines()) <= 80
    assert not PYTHON_TYPE_TAG.search(text), f"a Python type tag: {PYTHON_TYPE_TAG.search(text)}"
    assert "[x>=" not in text and "[x<=" not in text
    assert "python -m" not in text and "usage:" not in text, "help names no Python module"
    usage = text.partition("Usage:")[2].splitlines()[0]
    assert "{" not in usage and "<" not in usage, f"arguments by name (ID, NAME): {usage}"
    options = panel_rows(text, "Options")
    assert any(row[0] == "--help" for row in options)
    for row in options + panel_rows(text, "Arguments"):
        description = row[-1]
        assert len(row) >= 2 and not re.fullmatch(r"-{1,2}[\w-]+|[A-Z_]+|\*", description), (
            f"no description: {row}"
        )
        assert re.search(r"[a-z]{2,} ", description + " "), f"no description: {row}"


def test_every_parameter_has_help_text() -> None:
    """The same from the command objects: hidden or wrapped rows cannot slip through."""
    import typer.main
    from typer.models import Context

    from sagas.ops.cli import cli

    def walk(command: Any, path: str) -> None:
        ctx = Context(command)
        for param in command.get_params(ctx):
            assert (param.help or "").strip(), f"sagas {path}: {param.name} has no help"
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{path} {name}".strip())

    walk(typer.main.get_command(cli), "")


def test_bench_help_is_typers_and_lists_every_option() -> None:
    shown = help_of("bench")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.lstrip().startswith("Usage: sagas bench [OPTIONS]")
    names = {row[0] for row in panel_rows(shown.stdout, "Options")}
    assert names >= {"--n", "--failure-n", "--repeat", "--idle", "--warmup", "--concurrency",
                     "--in-flight", "--database-url", "--redis-url", "--use-running-workers",
                     "--no-failure", "--quick", "--json", "--timeout", "--keep"}
    assert re.search(r"--n\s+-n\s+N\s+Sagas per variant", shown.stdout)


def test_a_wrong_bench_option_is_typers_usage_error() -> None:
    env = dict(os.environ, COLUMNS="80", PYTHONPATH=str(ROOT))
    for args, words in ((["--bogus"], "No such option"), (["-n", "0"], "0 is less than 1"),
                        (["--use-running-workers"], "needs --redis-url and --database-url"),
                        (["--in-flight", "10", "--quick"], "the in-flight study takes no --quick")):
        ran = subprocess.run([SAGAS, "bench", *args], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=60, check=False)
        said = " ".join(ran.stderr.replace("│", " ").split())  # rich's box, unwrapped
        assert ran.returncode == 2, ran.stderr
        assert words in said and "Try 'sagas bench --help'" in said, ran.stderr
