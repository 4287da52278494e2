import subprocess
import sys

import pytest

from raygpt.config import ConfigError, dump_config, load_config
from raygpt.presets import PRESETS


def test_defaults_and_presets_validate():
    for name in PRESETS:
        cfg = load_config(name)
        assert cfg.preset == name
    cpu = load_config("shakespeare-char-cpu")
    assert (cpu.model.n_layer, cpu.model.n_head, cpu.model.n_embd, cpu.model.block_size) == (4, 4, 128, 64)
    assert (cpu.train.global_batch, cpu.train.max_steps, cpu.train.eval_steps) == (12, 2000, 20)
    assert (cpu.optim.lr, cpu.optim.min_lr, cpu.optim.warmup_steps, cpu.optim.beta2) == (2e-3, 2e-4, 100, 0.99)
    assert cpu.model.dropout == 0.0
    baby = load_config("shakespeare-char")
    assert (baby.model.n_layer, baby.model.n_embd, baby.model.block_size, baby.model.dropout) == (6, 384, 256, 0.2)
    assert (baby.train.global_batch, baby.train.max_steps) == (64, 5000)
    g = load_config("gpt2-124m").model
    assert (g.vocab_size, g.pad_vocab_to, g.bias) == (50257, 64, True)  # -> 50304 rows
    assert load_config("gpt2").model == g and load_config("gpt2-350m").model.n_embd == 1024


def test_precedence_preset_file_set_extra(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("preset: debug\noptim:\n  lr: 0.002\ntrain:\n  max_steps: 7\n")
    cfg = load_config(path=f)
    assert cfg.optim.lr == 0.002 and cfg.train.max_steps == 7 and cfg.model.n_embd == 32  # from debug
    cfg = load_config(path=f, overrides=["optim.lr=3e-4"])
    assert cfg.optim.lr == 3e-4
    cfg = load_config(path=f, overrides=["optim.lr=3e-4"], extra={"optim": {"lr": 5e-4}})
    assert cfg.optim.lr == 5e-4
    # an explicit preset wins over the file's preset key
    assert load_config("shakespeare-char", path=f).model.n_embd == 384


def test_round_trip(tmp_path):
    cfg = load_config("debug", overrides=["parallel.strategy=fsdp", "run.num_workers=2"])
    dump_config(cfg, tmp_path / "x.yaml")
    assert load_config(path=tmp_path / "x.yaml") == cfg


@pytest.mark.parametrize("sets, message", [
    (["model.n_embd=100", "model.n_head=12"], "model.n_embd=100 is not divisible by model.n_head=12"),
    (["optim.learning_rate=1"], "unknown config key 'optim.learning_rate'"),
    (["optim.lrr=1"], "did you mean 'lr'"),
    (["modle.n_layer=2"], "did you mean 'model'"),
    (["optim.lr=-1"], "optim.lr=-1"),
    (["train.micro_batch=64"], "train.micro_batch=64 is larger than train.global_batch"),
    (["parallel.strategy=magic"], "parallel.strategy='magic'"),
    (["run.min_workers=5"], "run.min_workers=5 is larger than run.num_workers=1"),
    (["nodot"], "expected section.field=value"),
    # replica fault tolerance: data-parallel runs only, one line naming what rules it out
    (["run.fault_tolerance=replica", "run.num_workers=4", "parallel.strategy=fsdp"],
     "run.fault_tolerance=replica works with data-parallel runs only (one worker per replica, DDP): "
     "parallel.strategy=fsdp is not supported"),
    (["run.fault_tolerance=replica", "run.num_workers=4", "parallel.pp_degree=2"], "parallel.pp_degree=2 is not"),
    (["run.fault_tolerance=replica", "run.num_workers=4", "parallel.tp_degree=2"], "parallel.tp_degree=2 is not"),
    (["run.fault_tolerance=replica", "run.num_workers=4", "run.min_workers=2"],
     "run.min_workers=2 (elastic resizing) is not supported"),
    (["run.fault_tolerance=respawn"], "run.fault_tolerance='respawn'"),
])
def test_errors_name_field_and_value(sets, message):
    with pytest.raises(ConfigError) as e:
        load_config("debug", overrides=sets)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_preset_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'degub'.*did you mean 'debug'"):
        load_config("degub")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(path=tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path=bad)
    unknown = tmp_path / "u.yaml"
    unknown.write_text("model:\n  n_layers: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'model.n_layers'.*'n_layer'"):
        load_config(path=unknown)


def test_cli_error_is_one_line_exit_2():
    r = subprocess.run([sys.executable, "-m", "raygpt.cli", "train", "--preset", "debug", "--set",
                        "model.n_embd=100", "--set", "model.n_head=12", "--print-config"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: model.n_embd=100 is not divisible by model.n_head=12"
    r = subprocess.run([sys.executable, "-m", "raygpt.cli", "train", "--preset", "nope"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown preset 'nope'" in r.stderr and "Traceback" not in r.stderr


def test_cli_help_lists_commands():
    r = subprocess.run([sys.executable, "-m", "raygpt.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for cmd in ("prepare", "train", "export", "generate"):
        assert cmd in r.stdout


def test_print_config_resolves(tmp_path):
    r = subprocess.run([sys.executable, "-m", "raygpt.cli", "train", "--preset", "debug", "-n", "1:2",
                        "--set", "optim.lr=0.01", "--print-config"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "lr: 0.01" in r.stdout and "min_workers: 1" in r.stdout and "num_workers: 2" in r.stdout


def test_replica_mode_refuses_uri_storage_with_one_line():
    from raygpt.errors import UserError
    from raygpt.train.launch import RunPaths, check_replica_mode

    with pytest.raises(UserError) as e:
        check_replica_mode(RunPaths.resolve("s3://bucket/runs?region=x", "r"))
    assert "run.fault_tolerance=replica needs run.storage on a file system every node sees" in str(e.value)
    assert "\n" not in str(e.value)


def test_dashboard_is_opt_in():
    """The embedded Ray's dashboard costs start-up; `--dashboard` (or run.dashboard) asks
    for it, and the flag wins over a config's value either way."""
    from raygpt.train.runconfig import build_run_config

    assert build_run_config(None, None, None).run.dashboard is False
    assert build_run_config(None, None, None, dashboard=True).run.dashboard is True
    assert build_run_config(None, None, ["run.dashboard=true"], dashboard=False).run.dashboard is False
    assert build_run_config(None, None, ["run.dashboard=true"]).run.dashboard is True
