"""`raygpt prepare`: corpus -> tokenizer + Arrow token shards. Heavy imports stay inside."""
from __future__ import annotations

from typing import Optional

import typer

from raygpt.errors import UserError


def _default_out(corpus: Optional[str], tokenizer: str, vocab_size: int) -> str:
    from pathlib import Path

    name = "shakespeare" if corpus is None else (Path(corpus).expanduser().absolute().stem or "corpus")
    return f"data/{name}-{tokenizer}" + (f"-{vocab_size}" if tokenizer == "bpe" else "")


def prepare_cmd(
    corpus: Optional[str] = typer.Option(
        None, "--corpus",
        help="Text file or directory of text files (default: the bundled tinyshakespeare)."),
    tokenizer: str = typer.Option("char", "--tokenizer", help="char | bpe (byte-level BPE)."),
    out: Optional[str] = typer.Option(
        None, "--out",
        help="Output directory (default: data/shakespeare-char, or data/<corpus>-<tokenizer>[-<vocab>])."),
    vocab_size: int = typer.Option(2048, "--vocab-size", help="BPE vocabulary size."),
    val_fraction: float = typer.Option(0.1, "--val-fraction",
                                       help="Tail of each document kept for validation."),
    shard_tokens: int = typer.Option(50_000_000, "--shard-tokens", help="Tokens per shard file."),
    use_ray: Optional[bool] = typer.Option(
        None, "--ray/--no-ray",
        help="Tokenize with Ray Data (default: when the corpus has more than one file)."),
):
    """Tokenize a corpus into train/val Arrow token shards + meta.json + tokenizer.json."""
    import time

    from rich.console import Console

    from raygpt.data.prepare import prepare_corpus

    if tokenizer not in ("char", "bpe"):
        raise UserError(f"unknown tokenizer {tokenizer!r}: use --tokenizer char or --tokenizer bpe")
    out = out or _default_out(corpus, tokenizer, vocab_size)
    console = Console(stderr=True, highlight=False)
    t0 = time.time()

    def log(msg: str) -> None:
        console.print(f"[dim]{time.time() - t0:6.1f}s[/dim] {msg}")

    meta = prepare_corpus(corpus, out, tokenizer=tokenizer, vocab_size=vocab_size,
                          val_fraction=val_fraction, shard_tokens=shard_tokens,
                          use_ray=use_ray, log=log)
    ns = meta["num_shards"]
    Console(highlight=False).print(
        f"[bold green]prepared[/bold green] {meta['corpus']} -> [bold]{out}[/bold]\n"
        f"  tokenizer {meta['tokenizer']}, vocab {meta['vocab_size']}, dtype {meta['dtype']}\n"
        f"  train {meta['train_tokens']:,} tokens ({ns['train']} shard{'s' * (ns['train'] != 1)}), "
        f"val {meta['val_tokens']:,} tokens ({ns['val']} shard{'s' * (ns['val'] != 1)})\n"
        f"  {time.time() - t0:.1f}s")
