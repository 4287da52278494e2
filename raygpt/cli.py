"""`raygpt` command line. Each subsystem owns its commands in a `commands.py` module
that imports only light modules at the top (torch/ray load inside the command), so
`raygpt --help` stays fast.
"""
from __future__ import annotations

import os
import sys

import typer

from raygpt.errors import UserError

app = typer.Typer(
    name="raygpt",
    help="Train GPT models on Ray (DDP/FSDP2/HSDP/TP, elastic, fault tolerant) and serve them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register():
    from raygpt.data import commands as data_cmds
    from raygpt.train import commands as train_cmds

    app.command("prepare")(data_cmds.prepare_cmd)
    app.command("train")(train_cmds.train_cmd)
    app.command("export")(train_cmds.export_cmd)
    app.command("generate")(train_cmds.generate_cmd)
    # Optional subsystems: registered when their module exists.
    for mod, names in (
        ("raygpt.tune.commands", ("tune",)),
        ("raygpt.serving.commands", ("serve",)),
        ("raygpt.train.chaos", ("chaos",)),
        ("raygpt.lifecycle.commands", ("eval", "distill", "promote", "rollback")),
    ):
        try:
            m = __import__(mod, fromlist=["x"])
        except ModuleNotFoundError as e:
            if e.name and mod.startswith(e.name):
                continue
            raise
        for n in names:
            fn = getattr(m, f"{n}_cmd", None)
            if fn is not None:
                app.command(n)(fn)


_register()


def main(argv: list[str] | None = None) -> int:
    try:
        app(args=argv, standalone_mode=False)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:
        return int(e.code or 0) if isinstance(e.code, int) else 1
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.exceptions.Abort):
            return 130
        if isinstance(e, click.ClickException):
            e.show()
            return 2
        if os.environ.get("RAYGPT_DEBUG"):
            raise
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
