"""The ``sagas`` command line (Typer + rich). Domain commands plug in beside the engine's.

Every failure an operator can cause (unknown id, unreachable database or Redis) prints one line
on stderr and exits non-zero; no traceback.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable
from functools import wraps
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from sagas.errors import SagaError

cli = typer.Typer(
    name="sagas", help="Run and operate task-graph sagas on Celery.", no_args_is_help=True,
    pretty_exceptions_enable=False, add_completion=False,
)
db_cli = typer.Typer(help="The saga store's schema.", no_args_is_help=True)
cli.add_typer(db_cli, name="db")

out = Console()
err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

EXIT_FAILURE = 1
EXIT_NOT_FOUND = 2
EXIT_UNAVAILABLE = 3


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
        from sagas.errors import SagaNotFoundError, StoreUnavailableError

        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except SagaNotFoundError as exc:
            raise fail(str(exc), EXIT_NOT_FOUND) from None
        except StoreUnavailableError as exc:
            raise fail(str(exc), EXIT_UNAVAILABLE) from None
        except SagaError as exc:
            raise fail(str(exc)) from None
        except Exception as exc:
            unavailable = _unavailable_message(exc)
            if unavailable:
                raise fail(unavailable, EXIT_UNAVAILABLE) from None
            raise

    return wrapper  # type: ignore[return-value]


def _unavailable_message(exc: BaseException) -> str | None:
    import redis.exceptions
    import sqlalchemy.exc
    from kombu.exceptions import OperationalError as KombuOperationalError

    if isinstance(exc, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError):
        return f"database unavailable: {str(exc.orig).strip().splitlines()[0]}"
    if isinstance(exc, redis.exceptions.ConnectionError | KombuOperationalError):
        return f"redis unavailable: {str(exc).strip().splitlines()[0]}"
    return None


def load_app() -> None:
    """Import the application (its Celery app, sagas and CLI plugins): SAGAS_APP, default config."""
    module = os.environ.get("SAGAS_APP", "config")
    importlib.import_module(module)
    # The modules a worker imports (the app's include/imports, e.g. SAGAS_IMPORTS) define
    # sagas too; without them retry/cancel of such a saga would not know its graph.
    from celery import current_app

    current_app.loader.import_default_modules()
    for plugin in os.environ.get("SAGAS_CLI_PLUGINS", "tasks.cli").split(","):
        if plugin.strip():
            try:
                importlib.import_module(plugin.strip())
            except ModuleNotFoundError as exc:
                if exc.name != plugin.strip():
                    raise


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


STATE_STYLE = {
    "COMPLETED": "green", "SUCCEEDED": "green", "COMPENSATED": "yellow",
    "COMPENSATING": "yellow", "RUNNING": "cyan", "PENDING": "dim", "SKIPPED": "dim",
    "FAILED": "red", "COMPENSATION_FAILED": "bold red",
}


def styled(state: str) -> str:
    return f"[{STATE_STYLE.get(state, 'white')}]{state}[/]"


@db_cli.command("upgrade")
@operator_errors
def db_upgrade() -> None:
    """Apply the Alembic migrations (engine and domain) to DATABASE_URL."""
    from sagas.migrate import upgrade
    from sagas.settings import get_settings

    upgrade()
    err.print(f"schema up to date at {get_settings().database_url}", highlight=False)


@cli.command("graph")
@operator_errors
def graph(
    name: str,
    mermaid: Annotated[bool, typer.Option("--mermaid", help="Print a Mermaid flowchart")] = False,
) -> None:
    """Print a saga's step graph."""
    from sagas.definition import get_saga

    saga = get_saga(name)
    print(saga.render_mermaid() if mermaid else saga.render_text())


@cli.command("show")
@operator_errors
def show(
    saga_id: str,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Show one saga: state, steps, context and history."""
    from sagas.runtime import get_store

    view = get_store().get_view(saga_id)
    if as_json:
        print_json(view)
        return
    out.print(f"saga [bold]{view['id']}[/] ({view['name']}): {styled(view['state'])}")
    if view["error"]:
        out.print(f"error: {view['error']}", markup=False)
    table = Table("step", "state", "attempts", "undo attempts", "error")
    for s in view["steps"]:
        table.add_row(s["name"], styled(s["state"]), str(s["attempts"]),
                      str(s["compensation_attempts"]), s["error"] or "")
    out.print(table)
    history = Table("at", "step", "from", "to", "attempt", "error")
    for e in view["events"]:
        history.add_row(e["at"], e["step"] or "(saga)", e["from_state"] or "", e["to_state"],
                        str(e["attempt"]), e["error"] or "")
    out.print(history)


@cli.command("list")
@operator_errors
def list_sagas(
    state: Annotated[str | None, typer.Option(help="Only sagas in this state")] = None,
    name: Annotated[str | None, typer.Option(help="Only sagas with this name")] = None,
    limit: int = 50,
    offset: int = 0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List sagas, newest first."""
    from sagas.runtime import get_store

    rows, total = get_store().list_sagas(state=state, name=name, limit=limit, offset=offset)
    if as_json:
        print_json({"total": total, "items": rows})
        return
    table = Table("id", "name", "state", "created", "error", title=f"{total} sagas")
    for r in rows:
        table.add_row(r["id"], r["name"], styled(r["state"]), r["created_at"], r["error"] or "")
    out.print(table)


@cli.command("retry")
@operator_errors
def retry(saga_id: str) -> None:
    """Resume a COMPENSATION_FAILED saga, or re-drive a stalled one."""
    from sagas.runtime import get_store, retry_saga

    decision = retry_saga(saga_id)
    state = get_store().get_view(saga_id)["state"]
    note = f" ({decision.ignored})" if decision.ignored else ""
    out.print(f"saga {saga_id}: {styled(state)}{note}")


@cli.command("cancel")
@operator_errors
def cancel(saga_id: str) -> None:
    """Cancel a running saga: its succeeded steps are compensated."""
    from sagas.runtime import cancel_saga, get_store

    decision = cancel_saga(saga_id)
    state = get_store().get_view(saga_id)["state"]
    note = f" ({decision.ignored})" if decision.ignored else ""
    out.print(f"saga {saga_id}: {styled(state)}{note}")


_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True,
                 "help_option_names": []}


@cli.command("recover", context_settings=_PASS_THROUGH)
@operator_errors
def recover(ctx: typer.Context) -> None:
    """Re-drive sagas that made no progress past their deadline (see sagas.recovery)."""
    from sagas.recovery import main as recovery_main

    raise typer.Exit(recovery_main(list(ctx.args)) or 0)


@cli.command("bench", context_settings=_PASS_THROUGH)
@operator_errors
def bench(ctx: typer.Context) -> None:
    """Measure our saga against a raw Celery chain in the same run (see sagas.bench)."""
    from sagas.bench import main as bench_main

    raise typer.Exit(bench_main(list(ctx.args)) or 0)


@cli.command("relay", context_settings=_PASS_THROUGH)
@operator_errors
def relay(ctx: typer.Context) -> None:
    """Publish outbox events to the sagas.events exchange (see sagas.outbox)."""
    from sagas.outbox import main as outbox_main

    raise typer.Exit(outbox_main(["relay", *ctx.args]) or 0)


def main() -> None:
    try:
        load_app()
    except Exception as exc:  # a broken app import is one clear line too
        message = _unavailable_message(exc) or f"cannot load the application: {exc}"
        print_error(message)
        raise SystemExit(EXIT_FAILURE) from None
    cli()


if __name__ == "__main__":
    main()
