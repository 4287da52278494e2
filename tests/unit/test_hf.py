"""Hugging Face GPT-2 interop: import (HF dir -> raygpt), export (`raygpt export --format
hf` -> transformers), round trips and bad input. Nothing is downloaded: a small random
GPT2LMHeadModel and a byte-level BPE tokenizer.json are built here and saved."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from raygpt.cli import main  # noqa: E402
from raygpt.data.tokenizer import load_tokenizer, train_bpe_tokenizer, train_char_tokenizer  # noqa: E402
from raygpt.model.gpt import GPT, GPTConfig  # noqa: E402
from raygpt.model.io import load_model_dir, save_model_dir  # noqa: E402

TEXT = (Path(__file__).resolve().parents[2] / "raygpt/assets/tinyshakespeare.txt").read_text()[:60000]


@pytest.fixture(scope="module")
def bpe_tok(tmp_path_factory):
    tok = train_bpe_tokenizer(TEXT, 300)
    return tok.save(tmp_path_factory.mktemp("tok") / "tokenizer.json")


def make_hf_dir(out: Path, tok_path: Path, n_positions: int = 64, seed: int = 0, **kw) -> Path:
    """A random GPT2LMHeadModel saved with save_pretrained, plus the tokenizer.json."""
    tok = load_tokenizer(tok_path)
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=tok.vocab_size, n_positions=n_positions, n_embd=32,
                                  n_layer=2, n_head=4, bos_token_id=tok.eos_id,
                                  eos_token_id=tok.eos_id, **kw)
    m = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():  # random biases and LayerNorm affines too (init leaves them 0 / 1)
        for n, p in m.named_parameters():
            if n.endswith("bias") or ".ln_" in n:
                p.add_(torch.randn_like(p) * 0.1)
    m.save_pretrained(out)
    tok.save(out)
    return out


@pytest.fixture(scope="module")
def hf_dir(bpe_tok, tmp_path_factory):
    return make_hf_dir(tmp_path_factory.mktemp("hf") / "gpt2-tiny", bpe_tok)


def hf_model(path) -> "transformers.GPT2LMHeadModel":
    return transformers.GPT2LMHeadModel.from_pretrained(str(path)).eval()


def test_import_logits_equal_transformers(hf_dir):
    ref = hf_model(hf_dir)
    model, meta = load_model_dir(hf_dir)
    c = model.config
    assert meta["format"] == "hf" and meta["version"]
    # 300 tokens padded to 320, biases, n_positions as block_size
    assert (c.vocab_size, c.real_vocab_size, c.bias, c.block_size) == (320, 300, True, 64)
    ids = torch.randint(0, 300, (3, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ref(ids).logits, model(ids)
    assert (a - b[..., :300]).abs().max().item() < 1e-5
    assert b[..., 300:].max().item() <= -1e9  # padding: zero probability
    # the loss is that of the unpadded model
    y = torch.randint(0, 300, (3, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref_loss = torch.nn.functional.cross_entropy(a.reshape(-1, 300), y.reshape(-1))
        _, loss = model(ids, y)
    assert abs(loss.item() - ref_loss.item()) < 1e-5


def test_padding_never_sampled(hf_dir):
    model, _ = load_model_dir(hf_dir)
    with torch.no_grad():  # make the padded rows the most likely tokens if they were allowed
        model.wte.weight[300:] = model.wte.weight[:20].sum(0) * 50
    out = model.generate(torch.tensor([[5, 6, 7]]), 60, temperature=2.0,
                         generator=torch.Generator().manual_seed(0))
    assert out.max().item() < 300


def test_generate_cmd_never_samples_past_the_tokenizer(tmp_path, capsys):
    """`raygpt generate` on a model whose table (128 rows) is larger than its char
    tokenizer (59 characters): the extra rows, made the likeliest, are never sampled
    (before: 'token id 123 is outside the char vocabulary', exit 2)."""
    tok_path = train_char_tokenizer(TEXT).save(tmp_path / "char")
    model = _raygpt_model(False, 128)
    with torch.no_grad():
        model.wte.weight[59:] = model.wte.weight[:59].sum(0) * 50
    src = save_model_dir(model, tmp_path / "m", tok_path)
    assert main(["generate", str(src), "--prompt", "ROMEO:", "--max-tokens", "40",
                 "--temperature", "2", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")


def _raygpt_model(bias: bool, vocab: int, seed: int = 3) -> GPT:
    torch.manual_seed(seed)
    m = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=48, vocab_size=vocab, bias=bias))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("bias") or ".ln_" in n or n.startswith("ln_f"):
                p.add_(torch.randn_like(p) * 0.1)
    return m.eval()


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_export_hf_loads_in_transformers(kind, bpe_tok, tmp_path):
    """`raygpt export MODEL --format hf`: transformers loads it with no code of ours; logits
    equal raygpt's, greedy generation equal token for token; the tokenizer round-trips."""
    if kind == "bpe":
        tok_path, bias = bpe_tok, False
    else:
        tok_path, bias = train_char_tokenizer(TEXT).save(tmp_path / "char"), True
    tok = load_tokenizer(tok_path)
    vocab = ((tok.vocab_size + 63) // 64) * 64  # a padded table; export cuts it back
    model = _raygpt_model(bias, vocab)
    src = save_model_dir(model, tmp_path / "model", tok_path)
    assert main(["export", str(src), "--out", str(tmp_path / "hf"), "--format", "hf"]) == 0
    out = tmp_path / "hf"
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "generation_config.json"):
        assert (out / f).is_file(), f
    sd = load_file(str(out / "model.safetensors"))
    assert sd["transformer.wte.weight"].shape[0] == tok.vocab_size
    if not bias:
        assert not sd["transformer.h.0.attn.c_attn.bias"].any()

    ref = hf_model(out)
    htok = transformers.AutoTokenizer.from_pretrained(str(out))
    prompt = "ROMEO:\nWhat light"
    ids = tok.encode(prompt)
    assert htok(prompt)["input_ids"] == ids and htok.decode(ids) == prompt
    assert load_tokenizer(out).encode(TEXT[:2000]) == tok.encode(TEXT[:2000])
    x = torch.randint(0, tok.vocab_size, (2, 48), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a, b = ref(x).logits, model(x)
    assert (a - b[..., :tok.vocab_size]).abs().max().item() < 1e-5
    g_ref = ref.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    g = model.generate(torch.tensor([ids]), 20, temperature=0)
    assert g_ref[0].tolist() == g[0].tolist()


def test_round_trip_hf_raygpt_hf_identical(hf_dir, tmp_path):
    assert main(["export", str(hf_dir), "--out", str(tmp_path / "r"), "--format", "raygpt"]) == 0
    meta = json.loads((tmp_path / "r" / "config.json").read_text())
    assert meta["model"]["real_vocab_size"] == 300
    assert main(["export", str(tmp_path / "r"), "--out", str(tmp_path / "h"), "--format", "hf"]) == 0
    a, b = load_file(str(hf_dir / "model.safetensors")), load_file(str(tmp_path / "h" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ha = json.loads((hf_dir / "config.json").read_text())
    hb = json.loads((tmp_path / "h" / "config.json").read_text())
    for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "eos_token_id", "resid_pdrop"):
        assert ha[k] == hb[k], k


def test_hub_layouts_sharded_and_unprefixed(hf_dir, tmp_path):
    """The Hub's own gpt2 files name tensors without 'transformer.' and carry the causal
    mask buffers (h.N.attn.bias); large models come in shards with an index."""
    import shutil

    from safetensors.torch import save_file

    sd = load_file(str(hf_dir / "model.safetensors"))
    hub = {k.removeprefix("transformer."): v for k, v in sd.items()}
    hub["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    names = sorted(hub)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    d = tmp_path / "hub"
    d.mkdir()
    for f in ("config.json", "tokenizer.json"):
        shutil.copy(hf_dir / f, d)
    for fname, keys in shards.items():
        save_file({k: hub[k].contiguous() for k in keys}, str(d / fname), metadata={"format": "pt"})
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    a, _ = load_model_dir(hf_dir)
    b, meta = load_model_dir(d)
    assert meta["format"] == "hf"
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def _bpe_50257(path: Path) -> Path:
    """A GPT-2-sized byte-level BPE tokenizer.json (256 bytes + 50000 merges + eos),
    built from synthetic merges so that nothing is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    alphabet.sort()
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges = []
    for a in alphabet:
        for b in alphabet:
            if len(vocab) == 50256:
                break
            merges.append((a, b))
            vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.add_special_tokens(["<|endoftext|>"])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path))
    return path


def test_gpt2_124m_shape_imports_and_exports(tmp_path):
    """The full GPT-2 124M shape (random weights): the gpt2 preset's shape, vocabulary
    50257 padded to 50304, exported back to identical tensors."""
    from raygpt.config import load_config

    tok_path = _bpe_50257(tmp_path / "tokenizer.json")
    assert load_tokenizer(tok_path).vocab_size == 50257
    m = load_config(preset="gpt2").model
    cfg = GPTConfig.from_model_config(m, 50257)
    assert (cfg.vocab_size, cfg.real_vocab_size, cfg.n_layer, cfg.n_embd, cfg.bias) == (50304, 50257, 12, 768, True)
    torch.manual_seed(0)
    model = GPT(cfg)
    assert 124.0e6 < model.num_params() - (50304 - 50257) * 768 < 124.5e6
    from raygpt.model.hf import save_hf_dir

    save_hf_dir(model, tmp_path / "hf", tok_path)
    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert sd["transformer.wte.weight"].shape == (50257, 768)
    assert sd["transformer.h.11.attn.c_attn.weight"].shape == (768, 2304)
    back, meta = load_model_dir(tmp_path / "hf")
    assert meta["model"] == dataclasses.asdict(cfg)
    a, b = model.state_dict(), back.state_dict()
    for k in a:
        assert torch.equal(a[k][:50257] if k in ("wte.weight", "lm_head.weight") else a[k],
                           b[k][:50257] if k in ("wte.weight", "lm_head.weight") else b[k]), k


# ----------------------------------------------------------------------------- bad input


def _one_line_error(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, (rc, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_bad_hf_dirs_are_one_line_errors(hf_dir, bpe_tok, tmp_path, capsys):
    import shutil

    llama = tmp_path / "llama"
    shutil.copytree(hf_dir, llama)
    cfg = json.loads((llama / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (llama / "config.json").write_text(json.dumps(cfg))
    err = _one_line_error(capsys, ["generate", str(llama), "--max-tokens", "2"])
    assert "model_type 'llama' (LlamaForCausalLM) is not GPT-2" in err

    notok = tmp_path / "notok"
    shutil.copytree(hf_dir, notok)
    (notok / "tokenizer.json").unlink()
    err = _one_line_error(capsys, ["generate", str(notok), "--max-tokens", "2"])
    assert "has no tokenizer.json" in err

    pkl = tmp_path / "pkl"
    pkl.mkdir()
    shutil.copy(hf_dir / "config.json", pkl)
    shutil.copy(bpe_tok, pkl)
    (pkl / "pytorch_model.bin").write_bytes(b"not unpickled")
    for argv in (["generate", str(pkl)], ["export", str(pkl), "--out", str(tmp_path / "x"), "--format", "hf"]):
        err = _one_line_error(capsys, argv)
        assert "holds only pytorch_model.bin" in err and "pickle" in err
    assert not (tmp_path / "x").exists()

    err = _one_line_error(capsys, ["train", "--init-from", str(hf_dir), "--set", "model.n_embd=64",
                                   "--print-config"])
    assert "model.n_embd" in err and "fixes the model shape" in err
    err = _one_line_error(capsys, ["train", "--init-from", str(hf_dir), "--set", "model.block_size=128",
                                   "--print-config"])
    assert "model.block_size=128: larger than the context" in err and "(64 positions)" in err

    relu = tmp_path / "relu"
    shutil.copytree(hf_dir, relu)
    cfg = json.loads((relu / "config.json").read_text())
    cfg["activation_function"] = "relu"
    (relu / "config.json").write_text(json.dumps(cfg))
    assert "activation_function='relu'" in _one_line_error(capsys, ["generate", str(relu)])

    bad = tmp_path / "shape"
    shutil.copytree(hf_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["n_embd"], cfg["n_head"] = 64, 4
    (bad / "config.json").write_text(json.dumps(cfg))
    assert "has shape" in _one_line_error(capsys, ["generate", str(bad)])


def test_init_from_hf_takes_its_shape(hf_dir):
    """`raygpt train --init-from HF_DIR`: the shape (biases, padded vocab) comes from the
    HF config, block_size may shrink (the first positions are kept)."""
    from raygpt.train.commands import build_run_config

    cfg = build_run_config(None, "debug", [], init_from=str(hf_dir))
    m = cfg.model
    assert (m.n_layer, m.n_embd, m.bias) == (2, 32, True)
    g = GPTConfig.from_model_config(m)
    assert (g.vocab_size, g.real_vocab_size, g.block_size) == (320, 300, 32)
    src, _ = load_model_dir(hf_dir)
    model = GPT(g)
    model.load_state_dict(src.state_dict())  # what the training worker does
    assert torch.equal(model.wpe.weight, src.wpe.weight[:32])
