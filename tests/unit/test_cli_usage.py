"""Command-line usage mistakes, for every command, through the installed console script:
one line naming the option or argument, exit code 2, no traceback (issue 20).

The cases are generated from the registered commands, so a new command or a new required
option is covered without editing this file. All processes start at once (a `raygpt`
start-up is ~0.3 s; one after another they would cost ~10 s).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _script() -> list[str]:
    """The `raygpt` console script of this interpreter's environment (what `pip install`
    wrote), or `python -m raygpt.cli` where none is installed."""
    exe = Path(sys.executable).with_name("raygpt")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("raygpt")
    return [found] if found else [sys.executable, "-m", "raygpt.cli"]


def _commands():
    import typer.main

    from raygpt.cli import app

    return typer.main.get_command(app).commands


def _py_type(p):
    desc = getattr(p, "type_descriptor", None)  # typer >= 0.25 (vendored click)
    if desc is not None:
        return getattr(desc, "annotation", None)
    return {"integer": int, "float": float}.get(getattr(getattr(p, "type", None), "name", ""))


def _cases():
    """(id, argv, words the one-line error must contain)."""
    cases = [("bare", [], ["Usage"]), ("unknown-command", ["trian"], ["trian"])]
    for name, cmd in sorted(_commands().items()):
        args = [p for p in cmd.params if p.param_type_name == "argument"]
        req_opts = [p for p in cmd.params if p.param_type_name == "option" and p.required]
        given = [f"x{i}" for i, _ in enumerate(args)] + [a for p in req_opts for a in (p.opts[0], "x")]
        cases.append((f"{name}-unknown-option", [name, *given, "--no-such-option"], ["--no-such-option"]))
        if args:  # leave out the last positional (the others stay unambiguous)
            opt_vals = given[len(args):]
            cases.append((f"{name}-missing-{args[-1].name}", [name, *given[: len(args) - 1], *opt_vals],
                          [args[-1].name]))
        for p in req_opts:
            others = [x for q in req_opts if q is not p for x in (q.opts[0], "x")]
            cases.append((f"{name}-missing-{p.opts[0]}", [name, *given[: len(args)], *others], [p.opts[0]]))
        numeric = [p for p in cmd.params if p.param_type_name == "option" and not p.is_flag
                   and _py_type(p) in (int, float) and not p.multiple]
        if numeric:
            p = numeric[0]
            cases.append((f"{name}-bad-type-{p.opts[0]}", [name, *given, p.opts[0], "notanumber"], [p.opts[0]]))
        valued = [p for p in cmd.params if p.param_type_name == "option" and not p.is_flag]
        if valued:
            p = valued[-1]
            cases.append((f"{name}-no-value-{p.opts[0]}", [name, *given, p.opts[0]], [p.opts[0]]))
    return cases


CASES = _cases()
KINDS = ("unknown-option", "missing", "bad-type", "no-value")


def _through_script():
    """One case per command through the console script, rotating over the kinds of mistake
    so that each kind goes through it too; every case also runs in-process below (same
    `main`, ~1 ms each, where a process costs ~0.3 s of CPU)."""
    picked, by_cmd = ["bare", "unknown-command"], {}
    for cid, argv, _ in CASES[2:]:
        by_cmd.setdefault(argv[0], []).append(cid)
    for i, (name, ids) in enumerate(sorted(by_cmd.items())):
        want = KINDS[i % len(KINDS)]
        picked.append(next((c for c in ids if c[len(name) + 1:].startswith(want)), ids[0]))
    return picked


def _check(cid, rc, out, err, words):
    assert "Traceback" not in out + err, err
    assert rc == 2, (rc, err)
    if cid == "bare":  # bare `raygpt`: its help (the command list), then exit 2
        assert "Usage" in out + err and "train" in out + err
        return
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert out == ""


@pytest.fixture(scope="module")
def script_results(tmp_path_factory):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cwd = tmp_path_factory.mktemp("cli")  # nothing a command might write lands in the repo
    argv_of = {c[0]: c[1] for c in CASES}
    procs = {cid: subprocess.Popen([*_script(), *argv_of[cid]], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
             for cid in _through_script()}
    return {cid: (p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for cid, p in procs.items()}


def test_every_command_has_cases():
    ids = {c[0] for c in CASES}
    for name in _commands():
        assert f"{name}-unknown-option" in ids
    assert {"export-missing-checkpoint", "export-missing---out", "distill-missing---teacher",
            "promote-missing---serve-app", "generate-bad-type---max-tokens"} <= ids
    picked = _through_script()
    assert len(picked) == len(_commands()) + 2
    for kind in KINDS:
        assert any(kind in c for c in picked), kind


@pytest.mark.parametrize("cid", _through_script())
def test_console_script_usage_error(script_results, cid):
    rc, out, err = script_results[cid]
    _check(cid, rc, out, err, next(c[2] for c in CASES if c[0] == cid))


@pytest.mark.parametrize("cid,argv,words", CASES, ids=[c[0] for c in CASES])
def test_usage_error_is_one_line_exit_2(capsys, monkeypatch, tmp_path, cid, argv, words):
    from raygpt.cli import main

    monkeypatch.chdir(tmp_path)
    rc = main(list(argv))
    out, err = capsys.readouterr()
    _check(cid, rc, out, err, words)


@pytest.mark.parametrize("spec,words", [
    ("[embedding]", ["train.freeze entry 'embedding'", "did you mean 'embeddings'"]),
    ("[blocks:x]", ["train.freeze entry 'blocks:x'", "blocks:N"]),
    ("[blocks:0]", ["train.freeze entry 'blocks:0'"]),
    ("[blocks:9]", ["train.freeze entry 'blocks:9'", "model.n_layer=2"]),
])
def test_freeze_typo_stops_at_print_config(capsys, spec, words):
    """A bad train.freeze entry is a config error (one line, exit 2) before Ray starts;
    it used to pass --print-config and fail inside a worker."""
    from raygpt.cli import main

    rc = main(["train", "--preset", "debug", "--print-config", "--set", f"train.freeze={spec}"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "", (rc, out, err)
    assert err.count("\n") == 1 and err.startswith("error: ")
    for w in words:
        assert w in err, (w, err)


def test_good_freeze_passes(capsys):
    from raygpt.cli import main

    assert main(["train", "--preset", "debug", "--print-config", "--set",
                 "train.freeze=[embeddings, blocks:2]"]) == 0
    assert "- blocks:2" in capsys.readouterr().out


@pytest.mark.parametrize("key,value,words", [
    ("data.path", "nope", ["data.path='nope'", "no such file"]),
    ("data.path", ".", ["data.path='.'", "has no meta.json", "raygpt prepare --out ."]),
    ("data.corpus", "nope.txt", ["data.corpus='nope.txt'"]),
    ("train.init_from", "nope", ["train.init_from='nope'"]),
    ("distill.teacher", ".", ["distill.teacher='.'", "has no config.json"]),
])
def test_config_paths_checked_before_ray(capsys, monkeypatch, tmp_path, key, value, words):
    """A path in the config that does not exist is one line and exit 2 before Ray starts
    (Ray's start-up would print more lines)."""
    import ray

    from raygpt.cli import main

    monkeypatch.chdir(tmp_path)
    was_up = ray.is_initialized()  # the session's shared Ray may be up already
    rc = main(["train", "--preset", "debug", "--set", f"{key}={value}"])
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert ray.is_initialized() == was_up
    _check(key, rc, "", err, words)
