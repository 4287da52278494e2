import pytest
import torch

from raygpt.config import load_config
from raygpt.model.gpt import GPT, GPTConfig, KVCache, sample_next
from raygpt.model.io import ModelDirError, load_model_dir, save_model_dir


def tiny(**kw):
    c = dict(n_layer=2, n_head=4, n_embd=32, block_size=32, vocab_size=50, dropout=0.0)
    c.update(kw)
    torch.manual_seed(0)
    return GPT(GPTConfig(**c)).eval()


def test_shapes_and_loss():
    m = tiny()
    x = torch.randint(0, 50, (3, 16))
    assert m(x).shape == (3, 16, 50)
    logits, loss = m(x, x)
    assert loss.ndim == 0 and 3.0 < loss.item() < 5.0  # ~ln(50) at init
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, 33, dtype=torch.long))


def test_causal_future_tokens_do_not_change_past_logits():
    m = tiny()
    x = torch.randint(0, 50, (1, 20))
    y = x.clone()
    y[0, 10:] = torch.randint(0, 50, (10,))
    a, b = m(x), m(y)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_kv_cache_matches_full_forward_at_mixed_positions():
    m = tiny()
    x = torch.randint(0, 50, (3, 24))
    full = m(x)
    cache = KVCache(m.config, n_slots=5)
    slots = torch.tensor([4, 0, 2])
    # prefill rows to different lengths, then decode one token per row, batched
    for b, n in enumerate((5, 9, 13)):
        out = m.forward_cached(x[b:b + 1, :n], cache, slots[b:b + 1], torch.tensor([0]))
        assert torch.allclose(out[0], full[b, :n], atol=1e-5)
    pos = torch.tensor([5, 9, 13])
    nxt = x[torch.arange(3), pos][:, None]
    out = m.forward_cached(nxt, cache, slots, pos)
    assert torch.allclose(out[:, 0], full[torch.arange(3), pos], atol=1e-5)


@pytest.mark.parametrize("slots", [slice(1, 4), [1, 2, 3], torch.tensor([1, 2, 3])])
def test_kv_cache_read_in_place_for_consecutive_slots(slots):
    """Rows in consecutive slots (a slice, or a list forward_cached turns into one) read
    the cache in place instead of gathering it: the same logits as the full forward."""
    from raygpt.model.gpt import as_slots

    assert isinstance(as_slots([1, 2, 3], "cpu"), slice) and not isinstance(as_slots([1, 3], "cpu"), slice)
    m = tiny()
    x = torch.randint(0, 50, (3, 20))
    full = m(x)
    cache = KVCache(m.config, n_slots=5)
    out = m.forward_cached(x[:, :12], cache, slots, torch.zeros(3, dtype=torch.long))
    assert torch.allclose(out, full[:, :12], atol=1e-5)
    for p in range(12, 20):  # decode, one position per step
        out = m.forward_cached(x[:, p:p + 1], cache, slots, torch.full((3,), p))
        assert torch.allclose(out[:, 0], full[:, p], atol=1e-5)
    assert cache.layers[0][0][0].abs().sum() == 0 and cache.layers[0][0][4].abs().sum() == 0  # slots 0, 4 untouched


def test_generate_greedy_equals_argmax_loop():
    m = tiny()
    x = torch.randint(0, 50, (1, 4))
    got = m.generate(x, 10, temperature=0)
    ref = x
    for _ in range(10):
        ref = torch.cat([ref, m(ref)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, ref)


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    g = torch.Generator().manual_seed(0)
    assert {int(sample_next(logits, 1.0, top_k=1, generator=g)) for _ in range(20)} == {3}
    assert {int(sample_next(logits, 1.0, top_p=0.5, generator=g)) for _ in range(50)} <= {2, 3}
    assert int(sample_next(logits, 0.0)) == 3


def test_gpt2_124m_param_count_and_flops():
    cfg = load_config("gpt2-124m")
    with torch.device("meta"):
        m = GPT(GPTConfig.from_model_config(cfg.model))
    n = m.num_params()
    assert 123.5e6 < n < 124.6e6, n  # 124M with tied embeddings
    assert m.lm_head.weight is m.wte.weight
    assert m.flops_per_token() > 6 * (n - 1024 * 768)


def test_vocab_padding():
    cfg = load_config("debug", overrides=["model.pad_vocab_to=64"])
    assert GPTConfig.from_model_config(cfg.model, vocab_size=65).vocab_size == 128


def test_model_dir_round_trip_and_errors(tmp_path):
    m = tiny()
    tok = tmp_path / "tok.json"
    tok.write_text("{}")
    out = save_model_dir(m, tmp_path / "model", tok)
    m2, meta = load_model_dir(out)
    assert meta["version"] and all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    assert m2.lm_head.weight is m2.wte.weight
    with pytest.raises(ModelDirError, match="does not exist"):
        load_model_dir(tmp_path / "nope")
    (out / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelDirError, match="cannot read"):
        load_model_dir(out)
