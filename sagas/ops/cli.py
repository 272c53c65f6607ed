"""The ``sagas`` command line (Typer + rich), for any application bound with ``Sagas(app)``.

``sagas -A module[:attribute]`` names the application as ``celery -A`` does (or ``SAGAS_APP``):
the attribute may be a ``Sagas`` engine or a Celery app bound to one; without it the module's
``engine`` (any ``Sagas``) or its Celery ``app`` is used. Nothing else is imported.

Every failure an operator can cause (unknown id, unreachable database or broker) prints one line
on stderr and exits non-zero; no traceback.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

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
from sagas.runtime.stalls import stalled_among
from sagas.states import SagaState
from sagas.store import dead_letters
from sagas.store.sql import utcnow

F = TypeVar("F", bound=Callable[..., Any])


# --- help as an operator reads it ---------------------------------------------------------------
class _Argument(TyperArgument):
    """An argument shown by its name (``ID``), not by a Python type (``<str>``)."""

    def display_type_rich(self, ctx: Any) -> str | None:
        return None

    def get_usage_pieces(self, ctx: Any) -> list[str]:
        name = self.display_name_raw.upper()
        return [name if self.required else f"[{name}]"]


class _Option(TyperOption):
    """A flag shows no type; an option taking a value shows its metavar (``N``, ``URL``)."""

    def display_type_rich(self, ctx: Any) -> str | None:
        if self.is_flag or self.count:
            return None
        return self.metavar or (self.name or "value").upper()


def _plain(params: list[Any]) -> list[Any]:
    """Typer builds its own parameter classes: give them the help above (idempotent)."""
    for param in params:
        if type(param) is TyperArgument:
            param.__class__ = _Argument
        elif type(param) is TyperOption:
            param.__class__ = _Option
    return params


def _reflow(text: str | None) -> str | None:
    """A docstring's paragraphs as single lines: the terminal wraps them, not the source."""
    if not text:
        return text
    return "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(text).split("\n\n"))


class Command(TyperCommand):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.help = _reflow(self.help)

    def get_params(self, ctx: Any) -> list[Any]:
        return _plain(super().get_params(ctx))


class Group(TyperGroup):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.help = _reflow(self.help)

    def get_params(self, ctx: Any) -> list[Any]:
        return _plain(super().get_params(ctx))


def _typer(help: str, **kwargs: Any) -> typer.Typer:
    return typer.Typer(cls=Group, help=help, no_args_is_help=True, add_completion=False,
                       pretty_exceptions_enable=False, **kwargs)


cli = _typer("Run and operate task-graph sagas on Celery.", name="sagas")
db_cli = _typer("The saga store's schema.")
outbox_cli = _typer("The outbox of saga lifecycle events.")
dead_cli = typer.Typer(
    cls=Group, help="Dead letters: messages workers refused as poison.",
    invoke_without_command=True, add_completion=False, pretty_exceptions_enable=False,
)
cli.add_typer(db_cli, name="db")
cli.add_typer(outbox_cli, name="outbox")
cli.add_typer(dead_cli, name="dead")


def command(app: typer.Typer, name: str, **kwargs: Any) -> Callable[[F], F]:
    """``app.command`` with this CLI's help (no Python type tags)."""
    return app.command(name, cls=Command, **kwargs)


out = Console()
err = Console(stderr=True)

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
        "-A", "--app", metavar="MODULE",
        help="The application: module[:attribute] (default: $SAGAS_APP)",
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
    "FAILED": "red", "COMPENSATION_FAILED": "bold red", "FORWARD_FAILED": "bold red",
}


def styled(state: str) -> str:
    return f"[{STATE_STYLE.get(state, 'white')}]{state}[/]"


# --- commands -----------------------------------------------------------------------------------
SagaId = Annotated[str, typer.Argument(
    metavar="ID", help="The saga's id, or its unique beginning (8 characters usually do)",
    show_default=False,
)]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables")]
STATES = ", ".join(SagaState)


def _saga_state(value: str | None) -> str | None:
    """``--state``: any case; a wrong one exits 2 naming every valid state."""
    if value is None:
        return None
    try:
        return str(SagaState(value.upper()))
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a saga state: one of {STATES}") from None


def _at_least(floor: int) -> Callable[[int | None], int | None]:
    return _within(floor)


def _within(
    floor: float, ceiling: float | None = None
) -> Callable[[Any], Any]:
    """A bound checked by the command (Typer would print ``[x>=1]`` in the help)."""

    def check(value: Any) -> Any:
        if value is None:
            return value
        if value < floor:
            raise typer.BadParameter(f"{value} is less than {floor}")
        if ceiling is not None and value > ceiling:
            raise typer.BadParameter(f"{value} is more than {ceiling}")
        return value

    return check


def _each_within(floor: int, ceiling: int) -> Callable[[Any], Any]:
    one = _within(floor, ceiling)

    def check(values: Any) -> Any:
        for value in values or ():
            one(value)
        return values

    return check


@contextmanager
def working(message: str) -> Iterator[None]:
    """A spinner on stderr while a command that may take a while works (a terminal only: piped
    output stays the command's own lines)."""
    if not err.is_terminal:
        yield
        return
    with err.status(message):
        yield


@command(db_cli, "upgrade")
@operator_errors
def db_upgrade() -> None:
    """Create or migrate the engine's own tables (never the application's)."""
    current = engine()
    with working("migrating the saga store"):
        current.upgrade_schema()
    err.print(f"saga tables up to date at {current.settings.database_url}", highlight=False,
              soft_wrap=True)


@command(cli, "graph")
@operator_errors
def graph(
    name: Annotated[str, typer.Argument(
        metavar="NAME", help="The saga's name, as `sagas list` shows it", show_default=False)],
    mermaid: Annotated[bool, typer.Option(
        "--mermaid", help="Print a Mermaid flowchart instead of text")] = False,
) -> None:
    """Print a saga's step graph (an unknown name exits 2)."""
    saga = engine().saga(name)
    print(saga.render_mermaid() if mermaid else saga.render_text())


@command(cli, "show")
@operator_errors
def show(saga_id: SagaId, as_json: AsJson = False) -> None:
    """Show one saga: state, steps, its input and step results, its history, and why it makes
    no progress when it is stalled."""
    current = engine()
    view = current.view(current.store.resolve_id(saga_id))
    if as_json:
        print_json(view)
        return
    stalled = " [bold yellow]stalled[/]" if view["stalled"] else ""
    out.print(f"saga [bold]{view['id']}[/] ({view['name']} v{view['version']}, graph "
              f"{view['fingerprint'] or '?'}): {styled(view['state'])}{stalled}", soft_wrap=True)
    if view["error"]:
        out.print(f"error: {view['error']}", markup=False)
    if view["stalled"]:
        for step in view["stalled"]["steps"]:
            out.print(f"stalled: {step['detail']}", markup=False, highlight=False,
                      soft_wrap=True)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("step", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("tries", no_wrap=True)
    table.add_column("undos", no_wrap=True)
    table.add_column("error", overflow="fold")
    for s in view["steps"]:
        table.add_row(s["name"], styled(s["state"]), str(s["attempts"]),
                      str(s["compensation_attempts"]), s["error"] or "")
    out.print(table)
    held = view.get("locks") or {}
    if held.get("holds"):
        out.print("holds semantic locks: " + ", ".join(held["holds"]), markup=False,
                  highlight=False, soft_wrap=True)
    for key in held.get("waits") or ():
        holder = engine().lock_holder(key)
        out.print(f"waits for key {key} (held by saga {holder or 'nobody now'})", markup=False,
                  highlight=False, soft_wrap=True)
    out.print("input: " + json.dumps(view["context"]["input"], default=str), markup=False,
              highlight=False, soft_wrap=True)
    for step_name, result in view["context"]["results"].items():
        out.print(f"result of {step_name}: " + json.dumps(result, default=str), markup=False,
                  highlight=False, soft_wrap=True)
    # Step names and states are whole; below 120 columns the errors (already in the table
    # above and on the saga's line) give way rather than fold into a column of syllables.
    wide = out.width >= 120
    history = Table(title="history (UTC)", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("at", "step", "from", "to", "#"):
        history.add_column(column, no_wrap=True)
    if wide:
        history.add_column("error", overflow="fold")
    for e in view["events"]:
        cells = [(e["at"] or "")[11:23], e["step"] or "(saga)", e["from_state"] or "",
                 e["to_state"], str(e["attempt"])]
        history.add_row(*cells, *([e["error"] or ""] if wide else []))
    out.print(history)


@command(cli, "list")
@operator_errors
def list_sagas(
    state: Annotated[str | None, typer.Option(
        metavar="STATE", callback=_saga_state, show_default=False,
        help=f"Only sagas in this state: {STATES} (any case)")] = None,
    name: Annotated[str | None, typer.Option(
        metavar="NAME", help="Only sagas with this name", show_default=False)] = None,
    version: Annotated[int | None, typer.Option(
        metavar="N", callback=_within(1, MAX_VERSION), show_default=False,
        help="Only sagas started on this version of their definition")] = None,
    limit: Annotated[int, typer.Option(
        metavar="N", callback=_within(1, MAX_OFFSET), help="Most sagas to list")] = 50,
    offset: Annotated[int, typer.Option(
        metavar="N", callback=_within(0, MAX_OFFSET),
        help="Sagas to skip first (the next page)")] = 0,
    as_json: AsJson = False,
) -> None:
    """List sagas, newest first; whole ids and states at any width. A live saga that makes no
    progress says "stalled" (`sagas show ID` says why)."""
    store = engine().store
    rows, total = store.list_sagas(
        state=state, name=name, version=version, limit=limit, offset=offset
    )
    stalled = stalled_among(store, [r["id"] for r in rows], utcnow())
    rows = [{**r, "stalled": r["id"] in stalled} for r in rows]
    if as_json:
        print_json({"total": total, "items": rows})
        return
    # Ids and states are never cut (an id is what the next command takes); errors fold. Below
    # 100 columns (or piped at 80) the creation time gives way: `show` and --json have it.
    wide = out.width >= 100
    table = Table(title=f"{total} sagas", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("id", no_wrap=True, min_width=36)
    table.add_column("state", no_wrap=True)
    table.add_column("saga", no_wrap=True)
    if wide:
        table.add_column("created (UTC)", no_wrap=True)
    table.add_column("error", overflow="fold")
    for r in rows:
        cells = [r["id"], styled(r["state"]), f"{r['name']} v{r['version']}"]
        if wide:
            cells.append(_short_time(r["created_at"]))
        note = "stalled" if r["stalled"] else ""
        table.add_row(*cells, ": ".join(t for t in (note, r["error"] or "") if t))
    out.print(table)


@command(cli, "versions")
@operator_errors
def versions(as_json: AsJson = False) -> None:
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


@command(cli, "retry")
@operator_errors
def retry(saga_id: SagaId) -> None:
    """Resume a parked saga (COMPENSATION_FAILED, FORWARD_FAILED), or re-drive a stalled one."""
    _operate(saga_id, lambda current, found: current.retry(found))


@command(cli, "cancel")
@operator_errors
def cancel(saga_id: SagaId) -> None:
    """Cancel a running saga: its succeeded steps are compensated."""
    _operate(saga_id, lambda current, found: current.cancel(found))


@command(cli, "locks")
@operator_errors
def locks_cmd(
    key: Annotated[str | None, typer.Argument(
        metavar="KEY", show_default=False,
        help="Only this key (e.g. customer:c1); by default every held key")] = None,
    limit: Annotated[int, typer.Option(
        metavar="N", callback=_within(1, MAX_OFFSET), help="Most keys to list")] = 100,
    as_json: AsJson = False,
) -> None:
    """Semantic locks: who holds each key, and who waits for it in arrival order."""
    rows = engine().locks(key, limit)
    if as_json:
        print_json([{**r, "taken_at": _iso_or_none(r["taken_at"])} for r in rows])
        return
    if not rows:
        out.print(f"key {key} is free" if key else "no key is held", highlight=False)
        return
    # Keys and saga ids are whole at any width (ids are what `show` takes).
    for r in rows:
        out.print(f"{r['key']}  held by {r['holder']}", markup=False, highlight=False,
                  soft_wrap=True)
        for position, waiter in enumerate(r["waiting"], 1):
            out.print(f"  {position}. waiting: {waiter}", markup=False, highlight=False,
                      soft_wrap=True)


def _iso_or_none(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


@command(cli, "recover")
@operator_errors
def recover(
    limit: Annotated[int | None, typer.Option(
        metavar="N", callback=_within(1, MAX_OFFSET), show_default=False,
        help="Most sagas to re-drive (default: the RECOVERY_BATCH setting, 500)")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="List what would be re-driven, change nothing")] = False,
    as_json: AsJson = False,
) -> None:
    """Re-drive sagas that made no progress past their deadline (safe beside beat's run)."""
    with working("looking for stalled sagas"):
        report = engine().recover(limit=limit, dry_run=dry_run)
    if as_json:
        print_json(report.as_dict())
    else:
        out.print(report.summary(), markup=False, highlight=False, soft_wrap=True)
    if report.errors:
        raise typer.Exit(EXIT_FAILURE)


@command(cli, "audit")
@operator_errors
def audit(
    no_idle: Annotated[bool, typer.Option(
        "--no-idle", help="Sagas may still be running: do not flag live ones")] = False,
    as_json: AsJson = False,
) -> None:
    """Check the engine's invariants on every saga in the store, then the app's own checks."""
    current = engine()
    with working("auditing every saga in the store"):
        report = run_audit(current, idle=not no_idle)
    if as_json:
        print_json(report.as_dict())
    else:
        out.print(report.summary(), markup=False, highlight=False, soft_wrap=True)
        for finding in report.findings[:50]:
            out.print(f"  {finding.saga_id or '-'}: {finding.rule}: {finding.detail}",
                      markup=False, highlight=False, soft_wrap=True)
    if not report.ok:
        raise typer.Exit(EXIT_FAILURE)


@command(cli, "relay")
@operator_errors
def relay(
    batch: Annotated[int | None, typer.Option(
        metavar="N", show_default=False,
        help="Log rows per batch (default: the SAGAS_OUTBOX_BATCH setting, 100)")] = None,
    interval: Annotated[float | None, typer.Option(
        metavar="SECONDS", show_default=False,
        help="Pause between polls when idle (default: the SAGAS_OUTBOX_INTERVAL setting, "
        "0.5)")] = None,
    lease: Annotated[float, typer.Option(
        metavar="SECONDS",
        help="How long this relay holds the cursor between passes; another relay takes over "
        "once it lapses")] = 30.0,
    throttle: Annotated[float, typer.Option(
        metavar="SECONDS", help="Pause after each publish (a gentle backfill)")] = 0.0,
    once: Annotated[bool, typer.Option(
        "--once", help="Publish one batch, print how many, and exit")] = False,
) -> None:
    """Publish the saga log's lifecycle events to the sagas.events exchange until stopped
    (Ctrl-C)."""
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


@command(outbox_cli, "stats")
@operator_errors
def outbox_stats(as_json: AsJson = False) -> None:
    """How far the relay has published the saga log, and what waits behind it."""
    stats = outbox.stats(engine().store)
    if as_json:
        print_json(stats.as_dict())
        return
    lease = "none" if stats.owner is None else f"{stats.owner} until {stats.lease_until}"
    out.print(f"position {stats.position} of {stats.newest}", highlight=False)
    out.print(f"pending  {stats.pending} log rows", highlight=False)
    out.print(f"lease    {lease}", highlight=False, soft_wrap=True)


@dead_cli.callback()
@operator_errors
def dead(
    ctx: typer.Context,
    reason: Annotated[PoisonReason | None, typer.Option(
        metavar="REASON", case_sensitive=False, show_default=False,
        help="Only dead letters refused for this reason: "
        + ", ".join(r.value for r in PoisonReason))] = None,
    limit: Annotated[int, typer.Option(
        metavar="N", callback=_within(1, MAX_OFFSET), help="Most dead letters to list")] = 50,
    as_json: AsJson = False,
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


@command(dead_cli, "show")
@operator_errors
def dead_show(
    letter_id: Annotated[int, typer.Argument(
        metavar="ID", callback=_within(1, MAX_ROW_ID), help="The dead letter's id")],
    as_json: AsJson = False,
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


@command(dead_cli, "purge")
@operator_errors
def dead_purge(
    letter_ids: Annotated[list[int] | None, typer.Argument(
        metavar="ID", callback=_each_within(1, MAX_ROW_ID), show_default=False,
        help="Dead letters to delete")] = None,
    reason: Annotated[PoisonReason | None, typer.Option(
        metavar="REASON", case_sensitive=False, show_default=False,
        help="Every dead letter refused for this reason")] = None,
    older_than: Annotated[float | None, typer.Option(
        metavar="SECONDS", callback=_within(0, MAX_SECONDS), show_default=False,
        help="Only those older than this many seconds")] = None,
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


def _checkout_module(name: str) -> Any:
    """The bench lives in a checkout of this repository (bench/), not in the wheel: imported
    only when ``sagas bench`` runs, from the current directory."""
    _cwd_on_path()
    try:
        return importlib.import_module(name)
    except ImportError:
        raise fail("sagas bench runs from a checkout of the sagas repository (bench/)") from None


_THROUGHPUT_ONLY = ("n", "failure_n", "repeat", "idle", "warmup", "redis_url",
                    "use_running_workers", "no_failure", "quick", "keep", "locks")
"""Options of the throughput bench that ``--in-flight`` has no use for."""


@command(cli, "bench")
def bench(
    ctx: typer.Context,
    n: Annotated[int, typer.Option(
        "-n", "--n", metavar="N", callback=_at_least(1), help="Sagas per variant and run")] = 2000,
    failure_n: Annotated[int | None, typer.Option(
        metavar="N", callback=_at_least(0), show_default=False,
        help="Sagas per failure-path run (default: -n)")] = None,
    repeat: Annotated[int, typer.Option(
        metavar="N", callback=_at_least(1), help="Interleaved repetitions")] = 3,
    idle: Annotated[int, typer.Option(
        metavar="N", callback=_at_least(0),
        help="Idle-latency samples per variant and repetition")] = 50,
    warmup: Annotated[int, typer.Option(
        metavar="N", callback=_at_least(0), help="Untimed sagas per variant first")] = 20,
    concurrency: Annotated[int, typer.Option(
        metavar="N", callback=_at_least(1), help="Prefork processes of the bench's worker")] = 2,
    in_flight: Annotated[int | None, typer.Option(
        metavar="N", callback=_at_least(1), show_default=False,
        help="Instead: N sagas in flight at once; store size, the reconciler's query plan, "
        "worker memory")] = None,
    database_url: Annotated[str | None, typer.Option(
        metavar="URL", show_default=False,
        help="SQLAlchemy URL of the saga store (default: a private SQLite file)")] = None,
    redis_url: Annotated[str | None, typer.Option(
        metavar="URL", show_default=False,
        help="Broker to use (default: a private redis-server on a free port)")] = None,
    use_running_workers: Annotated[bool, typer.Option(
        "--use-running-workers",
        help="Start no worker: use the bench workers already serving --redis-url and "
        "--database-url (no CPU or SQL figures)")] = False,
    no_failure: Annotated[bool, typer.Option(
        "--no-failure", help="Skip the failure path")] = False,
    quick: Annotated[bool, typer.Option(
        "--quick", help="A smoke-test run: N=50, one repetition, 10 idle samples")] = False,
    json_path: Annotated[Path | None, typer.Option(
        "--json", metavar="FILE", show_default=False,
        help="Also write every figure to this file as JSON")] = None,
    timeout: Annotated[float | None, typer.Option(
        metavar="SECONDS", show_default=False,
        help="Give up when no saga finishes for this long (default: 120; with --in-flight, "
        "the whole drain's limit, default 1800)")] = None,
    keep: Annotated[bool, typer.Option(
        "--keep", help="Keep the temporary directory (the worker's log)")] = False,
    locks: Annotated[bool, typer.Option(
        "--locks", help="Our saga under semantic locks, a distinct key per saga")] = False,
) -> None:
    """Our saga against a raw Celery chain of the same tasks, in the same run.

    Runs from a checkout of this repository (bench/) on its own app: no -A needed. Everything is
    private unless named: a redis-server on a free port, a SQLite file, one prefork worker.
    """
    if use_running_workers and not (redis_url and database_url):
        raise typer.BadParameter("it needs --redis-url and --database-url",
                                 param_hint="--use-running-workers")
    if in_flight is not None:
        given = [name for name in _THROUGHPUT_ONLY
                 if getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"]
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise typer.BadParameter(f"the in-flight study takes no {flags}",
                                     param_hint="--in-flight")
        scale = _checkout_module("bench.scale")
        raise typer.Exit(scale.main(scale.ScaleOptions(
            in_flight=in_flight, database_url=database_url, concurrency=concurrency,
            timeout=timeout or 1800.0, json_path=json_path,
        )))
    run = _checkout_module("bench.run")
    raise typer.Exit(run.main(run.Options(
        n=n, failure_n=failure_n, repeat=repeat, idle=idle, warmup=warmup,
        concurrency=concurrency, database_url=database_url, redis_url=redis_url,
        use_running_workers=use_running_workers, no_failure=no_failure, quick=quick,
        json_path=json_path, timeout=timeout or 120.0, keep=keep, locks=locks,
    )))


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
