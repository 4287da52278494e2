"""Requests as clients written for OpenAI and for vLLM send them."""
from __future__ import annotations

import json

import pytest

from raygpt.serving.adapter import sampling_params
from raygpt.serving.protocol import ApiError, ChatCompletionRequest, CompletionRequest, parse

# what `vllm bench serve` and OpenAI-compatible benchmark clients send
VLLM_BENCH = {"model": "raygpt", "prompt": "hi", "max_tokens": 8, "ignore_eos": True, "repetition_penalty": 1.0,
              "min_p": 0.0, "top_k": -1, "stop_token_ids": [], "max_completion_tokens": 8,
              "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True},
              "best_of": 1, "use_beam_search": False, "skip_special_tokens": True}


def _body(d: dict) -> bytes:
    return json.dumps(d).encode()


def test_a_vllm_benchmark_request_is_taken_and_its_extensions_honoured():
    ignored: list[str] = []
    req = parse(CompletionRequest, _body(VLLM_BENCH), ignored=ignored)
    assert sorted(ignored) == ["skip_special_tokens", "use_beam_search"]
    assert req.stream_options.continuous_usage_stats is True
    sp = sampling_params(req, 8, [], 0)
    assert sp.top_k is None and sp.ignore_eos and sp.repetition_penalty == 1.0 and sp.min_p == 0.0


def test_unknown_fields_nested_too_are_ignored_unless_strict():
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {}}]}],
            "stream_options": {"include_usage": True, "foo": 1}, "guided_json": {"a": 1}}
    ignored: list[str] = []
    req = parse(ChatCompletionRequest, _body(body), ignored=ignored)
    assert req.messages[0].text() == "hi"
    assert "guided_json" in ignored and "stream_options.foo" in ignored
    assert any(x.endswith("cache_control") for x in ignored)
    with pytest.raises(ApiError) as e:
        parse(ChatCompletionRequest, _body(body), strict=True)
    assert e.value.status == 400 and e.value.code == "unknown_field"


def test_a_bad_known_field_is_still_refused_beside_unknown_ones():
    with pytest.raises(ApiError) as e:
        parse(CompletionRequest, _body({"prompt": "a", "temperature": -1, "foo": 2}))
    assert e.value.param == "temperature"
    with pytest.raises(ApiError) as e:
        parse(CompletionRequest, _body({"prompt": "a", "best_of": 3}))
    assert e.value.code == "unsupported_parameter"


def test_stop_strings_are_capped():
    req = parse(CompletionRequest, _body({"prompt": "a", "stop": "x" * 100_000}))
    with pytest.raises(ApiError) as e:
        req.stop_list()
    assert e.value.param == "stop" and e.value.code == "stop_too_long"
