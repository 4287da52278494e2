"""`raygpt` command line. Each subsystem owns its commands in a `commands.py` module
that imports only light modules at the top (torch/ray load inside the command), so
`raygpt --help` stays fast.
"""
from __future__ import annotations

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
    app.command("report")(train_cmds.report_cmd)
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


def _click_classes() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(ClickException, Abort, Exit) classes of every click the CLI may raise: typer >= 0.25
    vendors its own `typer._click` whose exceptions are not subclasses of `click`'s."""
    mods = []
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            mods.append(__import__(name, fromlist=["x"]))
        except ImportError:
            pass
    return tuple(tuple(getattr(m, cls) for m in mods if hasattr(m, cls))
                 for cls in ("ClickException", "Abort", "Exit"))


def _usage_line(e) -> str:
    """One line naming the option/argument: 'raygpt export: Missing option '--out' / '-o'.'"""
    ctx = getattr(e, "ctx", None)
    where = f"{ctx.command_path}: " if ctx is not None else ""
    msg = " ".join(e.format_message().split())
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    return f"error: {where}{msg}{hint}"


def main(argv: list[str] | None = None) -> int:
    click_error, abort, exit_ = _click_classes()
    try:
        rc = app(args=argv, prog_name="raygpt", standalone_mode=False)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:
        return int(e.code or 0) if isinstance(e.code, int) else 1
    except abort:
        print("interrupted", file=sys.stderr)
        return 130
    except exit_ as e:
        return int(getattr(e, "exit_code", 0) or 0)
    except click_error as e:
        if type(e).__name__ == "NoArgsIsHelpError":
            # Bare `raygpt` (or a group without its command): the help, then exit 2.
            e.show()
            return 2
        print(_usage_line(e), file=sys.stderr)
        return int(getattr(e, "exit_code", 2) or 2)
    # standalone_mode=False returns the exit code of `--help` / ctx.exit(n).
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
