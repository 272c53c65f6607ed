"""The ``sagas`` command line (Typer + rich), for any application bound with ``Sagas(app)``.

``sagas -A module[:attribute]`` names the application as ``celery -A`` does (or ``SAGAS_APP``):
the attribute may be a ``Sagas`` engine or a Celery app bound to one; without it the module's
``engine`` (any ``Sagas``) or its Celery ``app`` is used. Nothing else is imported.

Every failure an operator can cause (unknown id, unreachable database or broker) prints one line
on stderr and exits non-zero; no traceback.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import wraps
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from celery import Celery
from rich import box
from rich.console import Console
from rich.table import Table

from sagas.coordinator import Decision
from sagas.engine import Sagas
from sagas.errors import (
    DefinitionError,
    SagaError,
    SagaNotFoundError,
    StoreUnavailableError,
    UnknownSagaError,
    outage_of,
)
from sagas.ops.audit import audit as run_audit
from sagas.ops.bounds import MAX_OFFSET, MAX_ROW_ID, MAX_SECONDS, MAX_VERSION
from sagas.runtime import relay as outbox
from sagas.runtime.poison import PoisonReason
from sagas.states import SagaState
from sagas.store import dead_letters
from sagas.store.outbox import DEAD, PENDING, SENT

cli = typer.Typer(
    name="sagas", help="Run and operate task-graph sagas on Celery.", no_args_is_help=True,
    pretty_exceptions_enable=False, add_completion=False,
)
db_cli = typer.Typer(help="The saga store's schema.", no_args_is_help=True)
outbox_cli = typer.Typer(help="The outbox of saga lifecycle events.", no_args_is_help=True)
dead_cli = typer.Typer(help="Dead letters: messages workers refused as poison.",
                       invoke_without_command=True)
cli.add_typer(db_cli, name="db")
cli.add_typer(outbox_cli, name="outbox")
cli.add_typer(dead_cli, name="dead")

out = Console()
err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

EXIT_FAILURE = 1
EXIT_NOT_FOUND = 2
EXIT_UNAVAILABLE = 3

_state: dict[str, Any] = {"app": None, "engine": None}


# --- errors -------------------------------------------------------------------------------------
def fail(message: str, code: int = EXIT_FAILURE) -> typer.Exit:
    print_error(message)
    return typer.Exit(code)


def print_error(message: str) -> None:
    """One line, never wrapped: drivers' messages run over several (psycopg adds a hint)."""
    lines = message.strip().splitlines()
    err.print(f"error: {lines[0] if lines else 'failed'}", markup=False, highlight=False,
              soft_wrap=True)


def operator_errors(fn: F) -> F:
    """Turn expected failures into one clear line and an exit code."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except (SagaNotFoundError, UnknownSagaError) as exc:
            raise fail(str(exc), EXIT_NOT_FOUND) from None
        except StoreUnavailableError as exc:
            raise fail(str(exc), EXIT_UNAVAILABLE) from None
        except SagaError as exc:
            raise fail(str(exc)) from None
        except Exception as exc:
            outage = outage_of(exc)
            if outage is not None:
                raise fail(f"{outage.kind} unavailable: {outage.message}", EXIT_UNAVAILABLE
                           ) from None
            raise

    return wrapper  # type: ignore[return-value]


# --- the application ------------------------------------------------------------------------
def _cwd_on_path() -> None:
    """As ``celery -A`` does: the application (or the checkout's tools) is in the cwd."""
    if str(Path.cwd()) not in sys.path and "" not in sys.path:
        sys.path.insert(0, str(Path.cwd()))


def load_engine(spec: str) -> Sagas:
    """The engine ``module[:attribute]`` names (see the module docstring)."""
    module_name, _, attribute = spec.partition(":")
    _cwd_on_path()
    module = importlib.import_module(module_name)
    if attribute:
        target: Any = module
        for part in attribute.split("."):
            target = getattr(target, part)
        candidates = [target]
    else:
        candidates = [getattr(module, n, None) for n in ("engine", "sagas", "app", "celery")]
        candidates += [v for v in vars(module).values() if isinstance(v, Sagas | Celery)]
    for candidate in candidates:
        if isinstance(candidate, Sagas):
            engine = candidate
            break
        if isinstance(candidate, Celery):
            engine = Sagas.of(candidate)
            break
    else:
        raise DefinitionError(f"{spec!r} names no Sagas engine nor a Celery app bound to one")
    # The modules the app's workers import (include/imports) define its sagas too.
    engine.app.loader.import_default_modules()
    return engine


def engine() -> Sagas:
    current = _state["engine"]
    if current is None:
        spec = _state["app"] or os.environ.get("SAGAS_APP")
        if not spec:
            raise fail("name the application: sagas -A module[:attribute] (or SAGAS_APP)")
        try:
            current = load_engine(spec)
        except SagaError:
            raise
        except ImportError as exc:
            raise fail(f"cannot load the application {spec!r}: {exc}") from None
        _state["engine"] = current
    return current  # type: ignore[no-any-return]


def _version() -> str:
    try:
        return version("sagas")
    except PackageNotFoundError:
        return "unknown"


@cli.callback(invoke_without_command=True)
def root(
    ctx: typer.Context,
    app: Annotated[str | None, typer.Option(
        "-A", "--app", help="The application: module[:attribute] (default: $SAGAS_APP)",
        show_default=False,
    )] = None,
    show_version: Annotated[bool, typer.Option(
        "--version", help="Print the version and exit", is_eager=True,
    )] = False,
) -> None:
    """Run and operate task-graph sagas on Celery."""
    if show_version:
        out.print(f"sagas {_version()}", highlight=False)
        raise typer.Exit()
    if ctx.invoked_subcommand is None:
        out.print(ctx.get_help(), markup=False, highlight=False)
        raise typer.Exit()
    _state["app"] = app
    _state["engine"] = None


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


STATE_STYLE = {
    "COMPLETED": "green", "SUCCEEDED": "green", "COMPENSATED": "yellow",
    "COMPENSATING": "yellow", "RUNNING": "cyan", "PENDING": "dim", "SKIPPED": "dim",
    "FAILED": "red", "COMPENSATION_FAILED": "bold red",
}


def styled(state: str) -> str:
    return f"[{STATE_STYLE.get(state, 'white')}]{state}[/]"


# --- commands -----------------------------------------------------------------------------------
@db_cli.command("upgrade")
@operator_errors
def db_upgrade() -> None:
    """Create or migrate the engine's own tables (never the application's)."""
    current = engine()
    current.upgrade_schema()
    err.print(f"saga tables up to date at {current.settings.database_url}", highlight=False)


@cli.command("graph")
@operator_errors
def graph(
    name: Annotated[str, typer.Argument(help="The saga's name")],
    mermaid: Annotated[bool, typer.Option("--mermaid", help="Print a Mermaid flowchart")] = False,
) -> None:
    """Print a saga's step graph."""
    saga = engine().saga(name)
    print(saga.render_mermaid() if mermaid else saga.render_text())


@cli.command("show")
@operator_errors
def show(
    saga_id: Annotated[str, typer.Argument(help="The saga's id")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Show one saga: state, steps, context and history (an id, or its unique beginning)."""
    store = engine().store
    view = store.get_view(store.resolve_id(saga_id))
    if as_json:
        print_json(view)
        return
    out.print(f"saga [bold]{view['id']}[/] ({view['name']} v{view['version']}, graph "
              f"{view['fingerprint'] or '?'}): {styled(view['state'])}", soft_wrap=True)
    if view["error"]:
        out.print(f"error: {view['error']}", markup=False)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("step", overflow="fold")
    table.add_column("state", no_wrap=True)
    table.add_column("tries", no_wrap=True)
    table.add_column("undos", no_wrap=True)
    table.add_column("error", overflow="fold")
    for s in view["steps"]:
        table.add_row(s["name"], styled(s["state"]), str(s["attempts"]),
                      str(s["compensation_attempts"]), s["error"] or "")
    out.print(table)
    out.print("input: " + json.dumps(view["context"]["input"], default=str), markup=False,
              highlight=False, soft_wrap=True)
    for step_name, result in view["context"]["results"].items():
        out.print(f"result of {step_name}: " + json.dumps(result, default=str), markup=False,
                  highlight=False, soft_wrap=True)
    history = Table(title="history (UTC)", box=box.SIMPLE_HEAD, pad_edge=False)
    history.add_column("at", no_wrap=True)
    history.add_column("step", overflow="fold")
    history.add_column("from", no_wrap=True)
    history.add_column("to", no_wrap=True)
    history.add_column("#", no_wrap=True)
    history.add_column("error", overflow="fold")
    for e in view["events"]:
        history.add_row((e["at"] or "")[11:23], e["step"] or "(saga)", e["from_state"] or "",
                        e["to_state"], str(e["attempt"]), e["error"] or "")
    out.print(history)


@cli.command("list")
@operator_errors
def list_sagas(
    state: Annotated[SagaState | None, typer.Option(
        help="Only sagas in this state", case_sensitive=False, show_default=False)] = None,
    name: Annotated[str | None, typer.Option(help="Only sagas with this name")] = None,
    version: Annotated[int | None, typer.Option(
        help="Only sagas running on this definition version", min=1, max=MAX_VERSION,
        show_default=False)] = None,
    limit: Annotated[int, typer.Option(help="Most sagas to list", min=1, max=MAX_OFFSET)] = 50,
    offset: Annotated[int, typer.Option(help="Sagas to skip first", min=0, max=MAX_OFFSET)] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """List sagas, newest first."""
    rows, total = engine().store.list_sagas(
        state=str(state) if state else None, name=name, version=version, limit=limit, offset=offset
    )
    if as_json:
        print_json({"total": total, "items": rows})
        return
    # Ids and states are never cut (an id is what the next command takes); errors fold. Below
    # 100 columns (or piped at 80) the creation time gives way: `show` and --json have it.
    wide = out.width >= 100
    table = Table(title=f"{total} sagas", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("id", no_wrap=True, min_width=36)
    table.add_column("state", no_wrap=True)
    table.add_column("saga", overflow="fold")
    if wide:
        table.add_column("created (UTC)", no_wrap=True)
    table.add_column("error", overflow="fold")
    for r in rows:
        cells = [r["id"], styled(r["state"]), f"{r['name']} v{r['version']}"]
        if wide:
            cells.append(_short_time(r["created_at"]))
        table.add_row(*cells, r["error"] or "")
    out.print(table)


@cli.command("versions")
@operator_errors
def versions(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Saga versions in use, with their in-flight counts: an old one with none can go."""
    found = engine().versions()
    if as_json:
        print_json([
            {"name": v.name, "version": v.version, "fingerprint": v.fingerprint,
             "in_flight": v.in_flight, "total": v.total, "registered": v.registered,
             "changed": v.changed}
            for v in found
        ])
        return
    table = Table("saga", "version", "graph", "in flight", "total", "here")
    for v in found:
        here = "yes" if v.registered and not v.changed else (
            "[bold red]other graph[/]" if v.changed else "[yellow]no[/]")
        table.add_row(v.name, str(v.version), v.fingerprint or "?", str(v.in_flight),
                      str(v.total), here)
    out.print(table)


def _short_time(iso: str | None) -> str:
    """``2026-12-03T14:50:01.123456+00:00`` as ``2026-12-03 14:50:01``."""
    return "" if not iso else iso.replace("T", " ")[:19]


def _operate(saga_id: str, act: Callable[[Sagas, str], Decision]) -> None:
    """Run an operator action on the saga an id (or its unique beginning) names; print the state."""
    current = engine()
    saga_id = current.store.resolve_id(saga_id)
    decision = act(current, saga_id)
    state = current.handle(saga_id).state
    note = f" ({decision.ignored})" if decision.ignored else ""
    out.print(f"saga {saga_id}: {styled(state)}{note}")


@cli.command("retry")
@operator_errors
def retry(saga_id: Annotated[str, typer.Argument(help="The saga's id")]) -> None:
    """Resume a COMPENSATION_FAILED saga, or re-drive a stalled one."""
    _operate(saga_id, lambda current, found: current.retry(found))


@cli.command("cancel")
@operator_errors
def cancel(saga_id: Annotated[str, typer.Argument(help="The saga's id")]) -> None:
    """Cancel a running saga: its succeeded steps are compensated."""
    _operate(saga_id, lambda current, found: current.cancel(found))


@cli.command("recover")
@operator_errors
def recover(
    limit: Annotated[int | None, typer.Option(
        help="Most sagas to re-drive (default: RECOVERY_BATCH)", min=1, max=MAX_OFFSET,
        show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="List what would be re-driven, change nothing")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
) -> None:
    """Re-drive sagas that made no progress past their deadline (safe beside beat's run)."""
    report = engine().recover(limit=limit, dry_run=dry_run)
    if as_json:
        print_json(report.as_dict())
    else:
        out.print(report.summary(), markup=False, highlight=False, soft_wrap=True)
    if report.errors:
        raise typer.Exit(EXIT_FAILURE)


@cli.command("audit")
@operator_errors
def audit(
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
    no_idle: Annotated[bool, typer.Option(
        "--no-idle", help="Sagas may still be running: do not flag live ones")] = False,
) -> None:
    """Check the engine's invariants on every saga in the store, then the app's own checks."""
    report = run_audit(engine(), idle=not no_idle)
    if as_json:
        print_json(report.as_dict())
    else:
        out.print(report.summary(), markup=False, highlight=False, soft_wrap=True)
        for finding in report.findings[:50]:
            out.print(f"  {finding.saga_id or '-'}: {finding.rule}: {finding.detail}",
                      markup=False, highlight=False, soft_wrap=True)
    if not report.ok:
        raise typer.Exit(EXIT_FAILURE)


@cli.command("relay")
@operator_errors
def relay(
    batch: Annotated[int | None, typer.Option(
        help="Rows claimed per batch (default: SAGAS_OUTBOX_BATCH)", show_default=False)] = None,
    interval: Annotated[float | None, typer.Option(
        help="Idle poll interval in seconds (default: SAGAS_OUTBOX_INTERVAL)",
        show_default=False)] = None,
    lease: Annotated[float, typer.Option(help="SQLite claim lease in seconds")] = 30.0,
    throttle: Annotated[float, typer.Option(
        help="Pause after each publish in seconds (gentle backfills)")] = 0.0,
    once: Annotated[bool, typer.Option("--once", help="One batch, then exit")] = False,
) -> None:
    """Publish outbox events to the sagas.events exchange until stopped."""
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    worker = engine().relay(batch=batch, lease=lease, throttle=throttle)
    if once:
        out.print(str(worker.run_once()), highlight=False)
        return
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    worker.run(stop, interval)


@outbox_cli.command("stats")
@operator_errors
def outbox_stats(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Outbox rows per status (pending, sent, dead)."""
    counts = outbox.stats(engine().store)
    if as_json:
        print_json(counts)
        return
    for status in (PENDING, SENT, DEAD):
        out.print(f"{status:8} {counts.get(status, 0)}", highlight=False)


@outbox_cli.command("requeue-dead")
@operator_errors
def outbox_requeue_dead() -> None:
    """Give dead-lettered events another round of attempts (after fixing the broker)."""
    out.print(f"{outbox.requeue_dead(engine().store)} events requeued", highlight=False)


@dead_cli.callback()
@operator_errors
def dead(
    ctx: typer.Context,
    reason: Annotated[PoisonReason | None, typer.Option(
        help="Only dead letters refused for this reason", case_sensitive=False,
        show_default=False)] = None,
    limit: Annotated[int, typer.Option(
        help="Most dead letters to list", min=1, max=MAX_OFFSET)] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """List dead letters, newest first (`sagas dead show ID`, `sagas dead purge ...`)."""
    if ctx.invoked_subcommand is not None:
        return
    store = engine().store
    rows, total = dead_letters.list_dead(
        store, reason=str(reason) if reason else None, limit=limit)
    if as_json:
        print_json({"total": total, "counts": dead_letters.counts(store), "items": rows})
        return
    # Ids and reasons are never cut (an id is what `show` and `purge` take); the rest folds.
    # Below 100 columns (or piped at 80) the time gives way: `show` and --json have it.
    wide = out.width >= 100
    table = Table(title=f"{total} dead letters", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("id", no_wrap=True, justify="right")
    if wide:
        table.add_column("at (UTC)", no_wrap=True)
    table.add_column("reason", no_wrap=True)
    table.add_column("queue", overflow="fold")
    table.add_column("task", overflow="fold")
    table.add_column("detail", overflow="fold", ratio=1)
    for r in rows:
        cells = [str(r["id"])]
        if wide:
            cells.append(_short_time(r["at"]))
        detail = r["detail"]
        if r["saga_id"] and detail.startswith(f"saga {r['saga_id']}: "):
            detail = detail[len(r["saga_id"]) + 7:]  # the saga id is in `show` and --json
        cells += [r["reason"], r["queue"] or "", r["task"] or "", detail]
        table.add_row(*cells)
    out.print(table, markup=False, highlight=False)
    if total:
        out.print("sagas dead show ID: one in full; sagas dead purge ID... | --reason R | --all",
                  markup=False, highlight=False, soft_wrap=True)


@dead_cli.command("show")
@operator_errors
def dead_show(
    letter_id: Annotated[int, typer.Argument(
        help="The dead letter's id", min=1, max=MAX_ROW_ID)],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """One dead letter: why, where from, its headers and the start of its body."""
    letter = dead_letters.get_dead(engine().store, letter_id)
    if letter is None:
        raise fail(f"no dead letter {letter_id}", EXIT_NOT_FOUND)
    if as_json:
        print_json(letter)
        return
    for key in ("id", "at", "reason", "detail", "queue", "task", "task_id", "saga_id", "step",
                "size", "content_type", "worker"):
        if letter[key] is not None:
            out.print(f"{key}: {letter[key]}", markup=False, highlight=False, soft_wrap=True)
    out.print("headers: " + json.dumps(letter["headers"], default=str), markup=False,
              highlight=False, soft_wrap=True)
    kept = len(letter["body"] or "")
    cut = f", the first {kept} characters" if kept < letter["size"] else ""
    out.print(f"body{cut}:", markup=False, highlight=False)
    out.print(letter["body"] or "", markup=False, highlight=False, soft_wrap=True)


@dead_cli.command("purge")
@operator_errors
def dead_purge(
    letter_ids: Annotated[list[int] | None, typer.Argument(
        help="Dead letters to delete", min=1, max=MAX_ROW_ID, show_default=False)] = None,
    reason: Annotated[PoisonReason | None, typer.Option(
        help="Every dead letter refused for this reason", case_sensitive=False,
        show_default=False)] = None,
    older_than: Annotated[float | None, typer.Option(
        help="Only those older than this many seconds", min=0, max=MAX_SECONDS,
        show_default=False)] = None,
    everything: Annotated[bool, typer.Option("--all", help="Every dead letter")] = False,
) -> None:
    """Delete dead letters once they are understood (the sagas they named are not touched)."""
    if not (letter_ids or reason or older_than is not None or everything):
        raise fail("name the dead letters: IDs, --reason, --older-than or --all")
    before = None
    if older_than is not None:
        before = datetime.now(UTC) - timedelta(seconds=older_than)
    purged = dead_letters.purge(
        engine().store, ids=letter_ids or (), reason=str(reason) if reason else None,
        before=before, everything=everything,
    )
    out.print(f"{purged} dead letters purged", highlight=False)


_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True,
                 "help_option_names": []}


@cli.command("bench", context_settings=_PASS_THROUGH)
def bench(ctx: typer.Context) -> None:
    """Our saga against a raw Celery chain, same run (from a checkout: bench/; --help)."""
    _cwd_on_path()
    try:
        bench_run = importlib.import_module("bench.run")
    except ImportError:
        raise fail("sagas bench runs from a checkout of the sagas repository (bench/)") from None
    raise typer.Exit(bench_run.main(list(ctx.args)) or 0)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
