"""Decoder-only GPT (after nanoGPT's model.py), plain torch.

- pre-LN blocks, causal self-attention through scaled_dot_product_attention (flash /
  cuDNN kernels on GPU), GELU MLP, tied input/output embeddings, GPT-2 init.
- q, k and v are separate Linear layers so tensor parallelism can shard them by heads
  column-wise (a fused qkv weight would split across q/k/v boundaries); without tensor
  parallelism the full forward runs them as one matmul (`fuse_qkv`).
- Attention infers the local head count from the tensor it gets, so the same code runs
  unsharded and under tensor parallelism (each rank holding n_head / tp heads).
- A KV cache with slots (`KVCache`) serves generation: `forward_cached` writes the new
  keys/values of each row into its slot at its own position and attends over the slot.
  Rows may be at different positions, which is what continuous batching needs.

Nothing here imports torch.distributed: wrapping is raygpt.parallel's job.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    vocab_size: int = 65
    dropout: float = 0.0
    bias: bool = False
    # Ids >= this are padding of the embedding table (vocab_size rounded up for fast
    # matmuls): never predicted, never sampled. None: every id is a real token.
    real_vocab_size: int | None = None

    @property
    def n_real_vocab(self) -> int:
        """Tokens the model may predict (the tokenizer's vocabulary when padded)."""
        return self.real_vocab_size or self.vocab_size

    @classmethod
    def from_model_config(cls, m, vocab_size: int | None = None) -> "GPTConfig":
        """From raygpt.config.ModelConfig (vocab padded to m.pad_vocab_to)."""
        v = m.vocab_size or vocab_size
        if v is None:
            raise ValueError("model.vocab_size is unset and no data vocabulary was given")
        pad = max(1, m.pad_vocab_to)
        padded = ((v + pad - 1) // pad) * pad
        return cls(m.n_layer, m.n_head, m.n_embd, m.block_size, padded, m.dropout, m.bias,
                   v if padded != v else None)


class LayerNorm(nn.Module):
    """LayerNorm with optional bias (torch's has no bias=False before 2.1)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class LMHead(nn.Linear):
    """The output projection. Logits of padded ids (>= n_real) come out as a large
    negative number: exactly zero probability in softmax, so the loss equals that of
    the unpadded model and sampling never picks them (finite, not -inf, so that KL
    terms 0 * (t - s) stay 0 rather than NaN)."""

    def __init__(self, n_embd: int, vocab_size: int, n_real: int | None = None):
        super().__init__(n_embd, vocab_size, bias=False)
        self.restrict(n_real)

    def restrict(self, n_real: int | None) -> None:
        mask = None
        if n_real is not None and n_real < self.out_features:
            mask = torch.arange(self.out_features, device=self.weight.device) >= n_real
        self.register_buffer("pad_mask", mask, persistent=False)

    def forward(self, x):
        logits = super().forward(x)
        if self.pad_mask is None:
            return logits
        return logits.masked_fill(self.pad_mask, max(-1e9, torch.finfo(logits.dtype).min))


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.head_dim = cfg.n_embd // cfg.n_head
        self.wq = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.wk = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.wv = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.dropout = cfg.dropout
        # One (C, 3C) matmul instead of three (C, C) ones: the weights are concatenated
        # per call (a few MB; under compile fused into the bf16 cast), and backward gets
        # one GEMM for the input's gradient. Tensor parallelism turns this off: its q/k/v
        # weights are DTensors sharded by heads, which a concatenation would regather.
        self.fuse_qkv = True

    def _qkv(self, x, fuse: bool | None = None):
        B, T, _ = x.shape
        if self.fuse_qkv if fuse is None else fuse:
            w = torch.cat([self.wq.weight, self.wk.weight, self.wv.weight])
            b = None if self.wq.bias is None else torch.cat([self.wq.bias, self.wk.bias, self.wv.bias])
            q, k, v = F.linear(x, w, b).view(B, T, 3, -1, self.head_dim).unbind(2)
            return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        # -1 heads: under tensor parallelism each rank holds n_head / tp of them.
        q = self.wq(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        return q, k, v

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = self._qkv(x)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.resid_dropout(self.c_proj(y))

    def forward_cached(self, x, layer_cache, slots, pos, attn_mask):
        """x: (B,T,C); rows write k/v at positions pos[b]..pos[b]+T-1 of slot slots[b].

        slots: a LongTensor (B,), or a slice when row b's slot is start + b: attention
        then reads the cache in place. Gathering the rows' slots copies every row's keys
        and values at every layer and step (half of a CPU decode step at 32 rows)."""
        B, T, _ = x.shape
        # Separate projections: decoding is bound by reading weights, and the fused path
        # would copy them (the concatenation) at every step.
        q, k, v = self._qkv(x, fuse=False)
        kc, vc = layer_cache  # (S, H, L, D) each
        if isinstance(slots, slice):
            kc, vc = kc[slots], vc[slots]  # views: row b is slot start + b
            slots = torch.arange(B, device=x.device)
            gather = False
        else:
            gather = True
        idx = pos[:, None] + torch.arange(T, device=x.device)[None, :]  # (B,T)
        kc[slots[:, None], :, idx] = k.transpose(1, 2)  # index (B,T) -> (B,T,H,D)
        vc[slots[:, None], :, idx] = v.transpose(1, 2)
        L = attn_mask.shape[-1]
        if gather:  # index_select of a slice: a row copy, faster than kc[slots, :, :L]
            keys, values = kc[:, :, :L].index_select(0, slots), vc[:, :, :L].index_select(0, slots)
        else:
            keys, values = kc[:, :, :L], vc[:, :, :L]
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask[:, None])
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def forward_cached(self, x, layer_cache, slots, pos, attn_mask):
        x = x + self.attn.forward_cached(self.ln_1(x), layer_cache, slots, pos, attn_mask)
        return x + self.mlp(self.ln_2(x))


def as_slots(slots, device):
    """Cache slots of a batch's rows for forward_cached: a slice when they are
    start, start+1, ... in row order (the cache is then read in place), else a LongTensor."""
    if isinstance(slots, slice):
        return slots
    if isinstance(slots, (list, tuple, range)) and len(slots) and \
            list(slots) == list(range(slots[0], slots[0] + len(slots))):
        return slice(slots[0], slots[0] + len(slots))
    return torch.as_tensor(slots, device=device, dtype=torch.long)


class KVCache:
    """Preallocated keys/values: n_layer x (slots, heads, block_size, head_dim)."""

    def __init__(self, cfg: GPTConfig, n_slots: int, device=None, dtype=torch.float32,
                 n_head: int | None = None):
        h = n_head or cfg.n_head
        d = cfg.n_embd // cfg.n_head
        shape = (n_slots, h, cfg.block_size, d)
        self.layers = [
            (torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
            for _ in range(cfg.n_layer)
        ]
        self.n_slots = n_slots
        self.block_size = cfg.block_size


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        # A ModuleDict keyed "0".."L-1" (same names as a ModuleList): a pipeline stage
        # deletes the blocks it does not own and the parameter names stay the same, so
        # checkpoints move between pipelined and unpipelined plans.
        self.blocks = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layer)})
        self.ln_f = LayerNorm(cfg.n_embd, cfg.bias)
        self.lm_head = LMHead(cfg.n_embd, cfg.vocab_size, cfg.real_vocab_size)
        self.lm_head.weight = self.wte.weight  # weight tying
        self.register_load_state_dict_pre_hook(_crop_positions)
        self.apply(self._init_weights)
        # GPT-2: scale residual projections by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    @classmethod
    def empty(cls, cfg: GPTConfig, device="cpu") -> "GPT":
        """Uninitialized weights, for loading every tensor next (the random init of a 124M
        model costs seconds)."""
        with torch.device("meta"):
            m = cls(cfg)
        m = m.to_empty(device=device)
        m.lm_head.weight = m.wte.weight  # to_empty unties them
        m.lm_head.restrict(cfg.real_vocab_size)  # the mask buffer came out uninitialized
        return m

    def restrict_vocab(self, n_real: int) -> None:
        """Never predict ids >= n_real (a tokenizer smaller than the embedding table)."""
        if n_real < self.config.n_real_vocab:
            self.config.real_vocab_size = n_real
            if self.lm_head is not None:
                self.lm_head.restrict(n_real)

    # ------------------------------------------------------------ accounting

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters (the tied embedding counts once)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.wpe is not None:
            n -= self.wpe.weight.numel()
        return n

    def flops_per_token(self) -> float:
        """Training FLOPs per token (PaLM appendix B: 6N + 12 L H Q T), fwd + bwd."""
        c = self.config
        n = self.num_params(non_embedding=True)
        return 6 * n + 12 * c.n_layer * c.n_embd * c.block_size

    # ------------------------------------------------------------ forward

    def forward(self, idx, targets=None, return_logits: bool = True):
        """idx (B,T) -> logits (B,T,V); with targets, (logits, mean cross-entropy), or
        (None, loss) with return_logits=False (training: a compiled graph then need not
        write the logits out).

        A pipeline stage without the embeddings takes hidden states (B,T,C) instead of
        token ids, and one without the head returns hidden states."""
        if self.wte is not None:
            B, T = idx.shape
            if T > self.config.block_size:
                raise ValueError(f"sequence length {T} > block_size {self.config.block_size}")
            pos = torch.arange(T, device=idx.device)
            x = self.drop(self.wte(idx) + self.wpe(pos))
        else:
            x = idx
        for block in self.blocks.values():
            x = block(x)
        if self.lm_head is None:
            return x
        logits, loss = self.head_loss(x, targets)
        if targets is None:
            return logits
        return (logits if return_logits else None), loss

    def head_loss(self, x, targets=None):
        """Final norm, head and (with targets) the mean cross-entropy in fp32: one unit,
        so per-block compile can compile it as its own graph."""
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1),
                               ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def forward_cached(self, idx, cache: KVCache, slots, pos, last_only: bool = False):
        """Incremental forward. idx (B,T) new tokens; slots (B,) cache slot of each row
        (or a slice: row b in slot start + b, read in place); pos (B,) position of each
        row's first new token. Returns logits (B,T,V), or
        (B,1,V) with last_only (prefill: only the next-token logits are needed, and a
        50k-vocabulary head over every prompt position is most of the memory).

        Key j of row b is visible to query t iff j <= pos[b] + t: earlier tokens of the
        same sequence (already in the slot) plus the causal part of the new ones.
        """
        B, T = idx.shape
        dev = idx.device
        slots = as_slots(slots, dev)
        pos = torch.as_tensor(pos, device=dev, dtype=torch.long)
        qpos = pos[:, None] + torch.arange(T, device=dev)[None, :]  # (B,T)
        if int(qpos.max()) >= self.config.block_size:
            raise ValueError(f"position {int(qpos.max())} >= block_size {self.config.block_size}")
        L = int(qpos.max()) + 1
        attn_mask = torch.arange(L, device=dev)[None, None, :] <= qpos[:, :, None]  # (B,T,L)
        x = self.wte(idx) + self.wpe(qpos)
        for block, layer_cache in zip(self.blocks.values(), cache.layers):
            x = block.forward_cached(x, layer_cache, slots, pos, attn_mask)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.ln_f(x))

    # ------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None, stop_ids: set[int] | None = None):
        """Autoregressive sampling with a KV cache; temperature 0 = greedy.

        The context is capped at block_size: when it is full, generation stops (the
        cache would have to be rebuilt for a sliding window).
        """
        was_training = self.training
        self.eval()
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"prompt of {T} tokens is longer than block_size {self.config.block_size}")
        dtype = next(self.parameters()).dtype
        cache = KVCache(self.config, B, device=idx.device, dtype=dtype)
        slots = slice(0, B)  # row b in slot b: attention reads the cache in place
        logits = self.forward_cached(idx, cache, slots, torch.zeros(B, dtype=torch.long), last_only=True)[:, -1]
        out = idx
        for i in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            out = torch.cat([out, nxt[:, None]], dim=1)
            if stop_ids and B == 1 and int(nxt[0]) in stop_ids:
                break
            if out.shape[1] >= self.config.block_size or i == max_new_tokens - 1:
                break
            pos = torch.full((B,), out.shape[1] - 1, dtype=torch.long)
            logits = self.forward_cached(nxt[:, None], cache, slots, pos)[:, -1]
        self.train(was_training)
        return out


def _crop_positions(model: GPT, state_dict, prefix, *args):
    """Load hook: a source with a longer context (GPT-2's 1024 positions, fine-tuned here
    with a shorter block_size) gives its first block_size position embeddings."""
    w = state_dict.get(prefix + "wpe.weight")
    if model.wpe is not None and w is not None and w.shape[0] > model.config.block_size:
        state_dict[prefix + "wpe.weight"] = w[: model.config.block_size]


def sample_next(logits, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None):
    """logits (B,V) -> next token ids (B,). temperature 0 = argmax."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the mass before it already reaches top_p (keeps >= 1 token).
        drop = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
