"""Fine-tuning from a Hugging Face GPT-2 directory with a real Ray Train fit: the run starts
from the HF weights (with a shorter context than the checkpoint's), trains, and its
`raygpt export --format hf` loads in transformers and back into raygpt."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from raygpt.cli import main  # noqa: E402
from raygpt.data.tokenizer import train_bpe_tokenizer  # noqa: E402
from raygpt.model.io import load_model_dir  # noqa: E402
from raygpt.train.launch import run_training  # noqa: E402
from raygpt.train.metrics import read_metrics  # noqa: E402

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]


def test_finetune_from_hf_dir_trains_exports_and_loads_back(tmp_path):
    from raygpt.lifecycle.data import prepare_with_tokenizer
    from raygpt.train.commands import build_run_config

    text = (Path(__file__).resolve().parents[2] / "raygpt/assets/tinyshakespeare.txt").read_text()
    tok = train_bpe_tokenizer(text[:60000], 300)
    hf = tmp_path / "gpt2-tiny"
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=tok.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=4,
        bos_token_id=tok.eos_id, eos_token_id=tok.eos_id))
    ref.save_pretrained(hf)
    tok.save(hf)
    (tmp_path / "corpus.txt").write_text(text[:200000])
    data = tmp_path / "data"
    prepare_with_tokenizer(tmp_path / "corpus.txt", data, hf / "tokenizer.json")

    cfg = build_run_config(None, "debug", [
        f"run.storage={tmp_path / 'runs'}", "run.name=ft", "run.cpus_per_worker=1",
        f"data.path={data}", "train.max_steps=12", "train.eval_every=12", "train.log_every=1",
        "checkpoint.every=0", "model.block_size=32"], num_workers="1", init_from=str(hf))
    assert (cfg.model.block_size, cfg.model.bias, cfg.model.vocab_size, cfg.model.pad_vocab_to) == (32, True, 300, 64)
    s = run_training(cfg, progress=False)
    losses = [r["loss"] for r in read_metrics(tmp_path / "runs" / "ft") if "loss" in r]
    assert len(losses) == 12 and losses[-1] < losses[0], losses

    out = tmp_path / "hf-out"
    assert main(["export", str(s["checkpoint"]), "--out", str(out), "--format", "hf"]) == 0
    hcfg = json.loads((out / "config.json").read_text())
    assert (hcfg["vocab_size"], hcfg["n_positions"]) == (300, 32)
    assert hcfg["raygpt"]["raygpt_config"]["train"]["init_from"] == str(hf)
    assert hcfg["raygpt"]["source"] == str(s["checkpoint"]) and hcfg["raygpt"]["step"] == 12
    # it started from the HF weights: moved a little by 12 steps, not re-initialized
    a = load_file(str(hf / "model.safetensors"))["transformer.h.1.mlp.c_fc.weight"]
    b = load_file(str(out / "model.safetensors"))["transformer.h.1.mlp.c_fc.weight"]
    assert 0 < (a - b).abs().max().item() < 0.05

    tuned = transformers.GPT2LMHeadModel.from_pretrained(str(out)).eval()
    back, meta = load_model_dir(out)  # and back into raygpt, as a HF directory
    assert meta["format"] == "hf" and back.config.real_vocab_size == 300
    x = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (tuned(x).logits - back(x)[..., :300]).abs().max().item() < 1e-5
