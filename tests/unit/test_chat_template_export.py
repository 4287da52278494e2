"""The HF export carries raygpt's chat template as Jinja: transformers' `apply_chat_template`
(what vLLM calls) renders exactly what raygpt's chat endpoint renders, with the built-in
template and with a model directory's chat_template.json. Nothing is downloaded."""
from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")

from raygpt.cli import main  # noqa: E402
from raygpt.data.tokenizer import load_tokenizer, train_bpe_tokenizer  # noqa: E402
from raygpt.model.chat import ChatTemplate  # noqa: E402
from raygpt.model.gpt import GPT, GPTConfig  # noqa: E402
from raygpt.model.io import save_model_dir  # noqa: E402
from raygpt.serving.adapter import ChatTemplate as ServingChatTemplate  # noqa: E402
from raygpt.serving.protocol import ChatMessage  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TEXT = (ROOT / "raygpt/assets/tinyshakespeare.txt").read_text()[:30000]

CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Who art thou?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
     {"role": "user", "content": "And then?"}, {"role": "assistant", "content": "Nothing."},
     {"role": "user", "content": "Bye"}],
    [{"role": "user", "content": "Finish this:"}, {"role": "assistant", "content": "To be or"}],  # assistant last
    [{"role": "user", "content": ""}, {"role": "assistant", "content": None},
     {"role": "system", "content": ""}],  # empty and missing content
    [{"role": "developer", "content": "Ünïcödé ✓ 😀 — ‘quotes’ \"dq\" 'sq' \\ back\\slash"},
     {"role": "user", "content": "日本語 {content} {{ not jinja }} {% raw %} \n\t\r tabs"}],
    [{"role": "user", "content": [{"type": "text", "text": "part one, "}, {"type": "text", "text": "part two"}]},
     {"role": "tool", "content": "42"}, {"role": "user", "content": [{"type": "text", "text": ""}]}],
]

OVERRIDE = {  # quotes, backslashes, Jinja syntax, unicode, {content} twice and not at all
    "system": "<<SYS>>{content}<</SYS>>\n",
    "user": "[INST] {% raw %}{{x}} 'it''s' \"q\" \\n {content} [/INST]",
    "assistant": " {content} </s>\n",
    "tool": "« tool » {content} / {content}\n",
    "generation_prompt": " ",
    "stop": ["[INST]"],
}


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return train_bpe_tokenizer(TEXT, 300).save(tmp_path_factory.mktemp("tok") / "tokenizer.json")


def _model_dir(d: Path, tok_path: Path, template: dict | None) -> Path:
    tok = load_tokenizer(tok_path)
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=tok.vocab_size))
    src = save_model_dir(m, d / "model", tok_path)
    if template is not None:
        (src / "chat_template.json").write_text(json.dumps(template), encoding="utf-8")
    return src


def _export(src: Path, out: Path) -> Path:
    assert main(["export", str(src), "--out", str(out), "--format", "hf"]) == 0
    return out


def _endpoint_render(src: Path, conv: list[dict]) -> str:
    """What POST /v1/chat/completions renders: the model dir's template, ChatMessages."""
    return ServingChatTemplate.load(str(src)).render([ChatMessage.model_validate(m) for m in conv])


@pytest.mark.parametrize("override", [None, OVERRIDE], ids=["built-in", "chat_template.json"])
def test_export_chat_template_renders_like_the_endpoint(override, tok_path, tmp_path):
    src = _model_dir(tmp_path, tok_path, override)
    out = _export(src, tmp_path / "hf")
    htok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert htok.chat_template, "the export has no chat_template"
    tok = load_tokenizer(tok_path)
    for conv in CONVERSATIONS:
        want = _endpoint_render(src, conv)
        got = htok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert got == want, conv
        # the same tokens as raygpt feeds its engine
        ids = htok.apply_chat_template(conv, tokenize=True, add_generation_prompt=True, return_dict=False)
        assert list(ids) == tok.encode(want), conv
        # without the generation prompt: the same text less the prompt
        bare = htok.apply_chat_template(conv, tokenize=False, add_generation_prompt=False)
        gp = ChatTemplate.load(str(src)).generation_prompt
        assert bare + gp == want
    # the raygpt form of the template (its stop) travels in config.json
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["raygpt"]["chat_template"] == ChatTemplate(**(override or {})).to_dict()
    assert cfg["raygpt"]["chat_template"]["stop"] == (override or {}).get("stop", ["\nUser:"])


def test_unknown_role_is_an_error(tok_path, tmp_path):
    out = _export(_model_dir(tmp_path, tok_path, None), tmp_path / "hf")
    htok = transformers.AutoTokenizer.from_pretrained(str(out))
    with pytest.raises(Exception, match="unknown message role"):
        htok.apply_chat_template([{"role": "function", "content": "x"}], tokenize=False)


def test_jinja_loops_over_message_content():
    """vLLM picks the 'openai' content format (text parts passed as a list, which the
    template joins with nothing, as raygpt does) when the template loops over
    message['content'] inside the loop over messages; under 'string' it would join parts
    with newlines. The structure is checked here, and serve/vllm.yaml pins the format."""
    ast = jinja2.Environment().parse(ChatTemplate().to_jinja())
    outer = [f for f in ast.find_all(jinja2.nodes.For)
             if isinstance(f.iter, jinja2.nodes.Name) and f.iter.name == "messages"]
    assert outer and isinstance(outer[0].target, jinja2.nodes.Name)
    var = outer[0].target.name
    inner = [f for f in outer[0].find_all(jinja2.nodes.For)
             if isinstance(f.iter, jinja2.nodes.Getitem) and isinstance(f.iter.node, jinja2.nodes.Name)
             and f.iter.node.name == var and getattr(f.iter.arg, "value", None) == "content"]
    assert inner
    raw = yaml.safe_load((ROOT / "serve/vllm.yaml").read_text())
    (llm,) = raw["applications"][0]["args"]["llm_configs"]
    assert llm["engine_kwargs"]["chat_template_content_format"] == "openai"
