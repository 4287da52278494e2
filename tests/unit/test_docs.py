"""The docs say what the code does (issue 20): every `raygpt ...` command line in README.md
and docs/*.md parses against the real CLI (options exist, required arguments given; parsed,
not run), every option a synopsis names exists, every config key the docs name is a
field, every environment variable raygpt reads is in README's table, README's example
errors are what the program prints, the Python snippets are valid scripts, the job
configs load, and the ASHA rungs docs name are the ones that happen."""
from __future__ import annotations

import ast
import re
import shlex
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Fences may be indented (inside a list item); their bodies are dedented.
FENCE = re.compile(r"^([ \t]*)```(\w*)\n(.*?)^\1```", re.S | re.M)
SPAN = re.compile(r"`([^`\n]+)`")


def _text(p: Path) -> str:
    return p.read_text()


def _blocks(text: str, langs=("", "bash", "sh", "shell", "console", "cron")):
    return [textwrap.dedent(body) for _indent, lang, body in FENCE.findall(text) if lang in langs]


def _outside_fences(text: str) -> str:
    return FENCE.sub("", text)


def _command_lines():
    """(doc, line) for each `raygpt ...` command line in a shell block (continuations
    joined, comments dropped, `a && raygpt ...` split). Lines with [optional] parts are
    synopses (checked below)."""
    out = []
    for doc in DOCS:
        for body in _blocks(_text(doc)):
            for line in body.replace("\\\n", " ").splitlines():
                line = re.sub(r"(^|\s)#.*$", "", line).strip().removeprefix("$ ")
                for part in re.split(r"\s*(?:&&|;)\s*", line):
                    if part.startswith("raygpt ") and "[" not in part:
                        out.append((doc.name, part))
    return out


def _synopses():
    """(doc, text) for inline `raygpt ...` spans (`raygpt serve MODEL_DIR [--port --replicas]`,
    `raygpt eval --data TEXT`) and bracketed synopsis lines in blocks: their options must exist."""
    out = []
    for doc in DOCS:
        text = _text(doc)
        out += [(doc.name, s) for s in SPAN.findall(_outside_fences(text)) if s.startswith("raygpt ")]
        for body in _blocks(text):
            out += [(doc.name, ln.strip()) for ln in body.splitlines()
                    if ln.strip().startswith("raygpt ") and "[" in ln]
    return out


def _group():
    import typer.main

    from raygpt.cli import app

    return typer.main.get_command(app)


def _parse(argv: list[str]) -> None:
    """Parse like the console script does, without invoking the command."""
    cmds = _group().commands
    if argv in (["--help"], []):
        return
    name, rest = argv[0], argv[1:]
    assert name in cmds, f"no command {name!r} (commands: {', '.join(sorted(cmds))})"
    if "--help" in rest:  # every command has it; parsing it would print the help and exit
        rest = [a for a in rest if a != "--help"]
        if not rest:
            return
    cmds[name].make_context(f"raygpt {name}", rest)


COMMANDS = _command_lines()


def test_docs_have_commands():
    docs = {d for d, _ in COMMANDS}
    assert {"README.md", "tune.md", "serving.md", "lifecycle.md"} <= docs, docs
    assert len(COMMANDS) > 15


@pytest.mark.parametrize("doc,line", COMMANDS, ids=[f"{d}:{l[:60]}" for d, l in COMMANDS])
def test_command_line_parses(doc, line):
    argv = shlex.split(line)[1:]
    assert argv, f"{doc}: `{line}` names no command"
    error = None
    try:
        _parse(argv)
    except Exception as e:  # a usage error of typer's click (vendored or not)
        error = e.format_message() if hasattr(e, "format_message") else str(e)
    assert error is None, f"{doc}: `{line}`: {error}"


SYNOPSES = _synopses()


@pytest.mark.parametrize("doc,span", SYNOPSES, ids=[f"{d}:{s[:50]}" for d, s in SYNOPSES])
def test_synopsis_options_exist(doc, span):
    words = span.split()
    cmds = _group().commands
    if len(words) < 2 or not re.fullmatch(r"[a-z]+", words[1]):  # `raygpt --help`, `raygpt COMMAND --help`
        assert all(w in ("--help", "COMMAND") for w in words[1:]), (doc, span)
        return
    assert words[1] in cmds, f"{doc}: `{span}`: no command {words[1]!r}"
    opts = {o for p in cmds[words[1]].params for o in [*getattr(p, "opts", []), *getattr(p, "secondary_opts", [])]}
    for opt in re.findall(r"(?<![\w-])--?[a-z][a-z0-9-]*", span):
        assert opt in opts | {"--help"}, f"{doc}: `{span}`: raygpt {words[1]} has no {opt}"


# ------------------------------------------------------------------ config keys

_FILE_SUFFIXES = {"py", "yaml", "yml", "json", "jsonl", "png", "txt", "md", "safetensors", "csv",
                  "parquet", "arrow", "sh", "log", "html"}


def _config_keys():
    from raygpt.config import SECTIONS

    pat = re.compile(r"(?<![\w/.$-])(%s)\.([a-z_][a-z0-9_]*)(?![\w(/-])" % "|".join(SECTIONS))
    found = set()
    for doc in DOCS:
        for section, field in pat.findall(_text(doc)):
            if field not in _FILE_SUFFIXES:
                found.add((doc.name, f"{section}.{field}"))
    return sorted(found)


def test_docs_name_config_keys():
    keys = {k for _, k in _config_keys()}
    assert {"data.path", "data.corpus", "optim.lr", "train.freeze", "parallel.pp_degree"} <= keys


@pytest.mark.parametrize("doc,key", _config_keys())
def test_config_key_exists(doc, key):
    from raygpt.config import SECTIONS

    section, field = key.split(".")
    # `optim.learning_rate` is README's example of a wrong key.
    if key == "optim.learning_rate":
        return
    assert field in SECTIONS[section].model_fields, f"{doc} names {key}, which is not a config field"


# ------------------------------------------------------------------ README's claims


def test_readme_example_errors_are_printed(capsys):
    """README's two example errors are, word for word, what `raygpt train` prints."""
    from raygpt.cli import main

    readme = _text(REPO / "README.md")
    cases = {
        "error: model.n_embd=100 is not divisible by model.n_head=12":
            ["--set", "model.n_embd=100", "--set", "model.n_head=12"],
        "error: unknown config key 'optim.learning_rate' (did you mean 'lr'?)":
            ["--set", "optim.learning_rate=3e-4"],
    }
    for line, sets in cases.items():
        assert f"`{line}`" in readme, line
        assert main(["train", "--preset", "debug", "--print-config", *sets]) == 2
        out, err = capsys.readouterr()
        assert err.strip() == line and out == ""


def test_every_env_var_is_in_the_readme_table():
    readme = _text(REPO / "README.md")
    table = readme[readme.index("## Environment variables"):]
    table = table[: table.index("\n## ")]
    read = set()
    for p in [*(REPO / "raygpt").rglob("*.py"), *(REPO / "jobs").glob("*.py")]:
        read |= set(re.findall(r"""environ(?:\.get|\.setdefault|\[)\(?\s*["'](RAYGPT_\w+)""", p.read_text()))
        read |= set(re.findall(r"""getenv\(\s*["'](RAYGPT_\w+)""", p.read_text()))
    assert {"RAYGPT_CACHE_DIR", "RAYGPT_API_KEY"} <= read
    listed = set(re.findall(r"^\| `(RAYGPT_\w+)`", table, re.M))
    assert read - listed == set(), f"read by the code, missing in README's table: {read - listed}"
    assert listed - read == set(), f"in README's table, read nowhere: {listed - read}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_python_snippets_are_valid_scripts(doc):
    """No top-level `await`/`async with` (a syntax error in a script)."""
    errors = []
    for body in _blocks(_text(doc), ("python",)):
        try:
            ast.parse(body)
        except SyntaxError as e:
            errors.append(f"line {e.lineno} of a block: {e.msg}: {body.splitlines()[0]!r}")
    assert errors == [], f"{doc.name}: {errors}"


def test_job_configs_load():
    from raygpt.config import load_config

    paths = sorted((REPO / "jobs" / "configs").glob("*.yaml"))
    assert paths
    for p in paths:
        cfg = load_config(path=p)
        assert cfg.train.max_steps > 0 and cfg.model.n_layer > 0, p


def test_tune_debug_rungs_are_the_documented_ones():
    """jobs/configs/tune-debug.yaml and docs/tune.md say ASHA's rungs are steps 5 and 10."""
    from raygpt.config import load_config
    from raygpt.tune.runner import SweepSpec, _scheduler

    path = REPO / "jobs" / "configs" / "tune-debug.yaml"
    cfg = load_config(path=path)
    sched = _scheduler(SweepSpec(mode="quality", base=cfg.to_dict(), space=None, out="x"), cfg)
    # ASHA's milestones (private, no public accessor in Ray 2.60).
    rungs = sorted(r[0] for r in sched._brackets[0]._rungs)
    assert rungs == [5, 10]
    assert "steps 5 and 10" in path.read_text()
    assert "rungs at steps 5 and 10" in _text(REPO / "docs" / "tune.md")


def test_no_design_file_cited():
    for doc in DOCS:
        assert "DESIGN.md" not in _text(doc), doc.name


def test_tune_options_table_exists_in_the_cli():
    """docs/tune.md's Options table names only options `raygpt tune` has (and all of them)."""
    text = _text(REPO / "docs" / "tune.md")
    table = text[text.index("## Options"):text.index("## Search spaces")]
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", table))
    tune = _group().commands["tune"]
    opts = {o for p in tune.params for o in getattr(p, "opts", []) if o.startswith("--")}
    assert named - {"--help"} <= opts, named - opts
    assert opts - named == set(), f"raygpt tune options missing from docs/tune.md: {opts - named}"
