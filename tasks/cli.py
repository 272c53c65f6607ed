"""The order domain's commands, plugged into the ``sagas`` CLI: ``demo`` and ``audit``."""

from __future__ import annotations

import typer

from sagas.ops.cli import cli, operator_errors

_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True,
                 "help_option_names": []}


@cli.command("demo", context_settings=_PASS_THROUGH)
@operator_errors
def demo(ctx: typer.Context) -> None:
    """Start workers, run 20 orders, and show how every saga ended (see tasks.demo)."""
    from tasks.demo import main as demo_main

    raise typer.Exit(demo_main(list(ctx.args)) or 0)


@cli.command("audit", context_settings=_PASS_THROUGH)
@operator_errors
def audit(ctx: typer.Context) -> None:
    """Check the order ledgers against saga states (see tasks.audit)."""
    from tasks.audit import main as audit_main

    raise typer.Exit(audit_main(list(ctx.args)) or 0)
