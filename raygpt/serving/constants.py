"""Limits shared by the wire layer (protocol.py) and the engine. No torch here: the wire
layer imports this module and must stay importable without torch."""
from __future__ import annotations

# Temperatures below this sample greedily: dividing logits by 1e-300 overflows to inf/nan.
GREEDY_EPS = 1e-5
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1  # what torch.Generator.manual_seed takes
MAX_LOGPROBS = 5
# A stop string longer than this is refused: the hold-back scan costs its length per token.
MAX_STOP_CHARS = 256
# The KV caches' default share of the device's memory (serve setting kv_memory_fraction).
DEFAULT_KV_MEMORY_FRACTION = 0.5
