"""`raygpt prepare`: corpus -> tokenizer + Arrow token shards. Heavy imports stay inside."""
from __future__ import annotations

from typing import Optional

import typer


def _default_out(corpus: Optional[str], tokenizer: str, vocab_size: int) -> str:
    from pathlib import Path

    if corpus is None:
        name = "shakespeare"
    else:
        last = str(corpus).rstrip("/").split("/")[-1].replace("*", "")
        name = Path(last).stem.split(".")[0] or "corpus"
    if tokenizer not in ("char", "bpe"):
        return f"data/{name}-" + (Path(tokenizer).parent.name if Path(tokenizer).name == "tokenizer.json"
                                  else Path(tokenizer).stem or "tok")
    return f"data/{name}-{tokenizer}" + (f"-{vocab_size}" if tokenizer == "bpe" else "")


def prepare_cmd(
    corpus: Optional[str] = typer.Option(
        None, "--corpus",
        help="A file, directory, glob or storage URI (s3://, gs://, ...) of .txt, .jsonl/.json, "
             ".parquet and .gz files (default: the bundled tinyshakespeare)."),
    tokenizer: str = typer.Option(
        "char", "--tokenizer",
        help="char | bpe (byte-level BPE trained on a sample) | PATH of a Hugging Face "
             "tokenizer.json (or a model directory holding one), used unchanged."),
    out: Optional[str] = typer.Option(
        None, "--out",
        help="Output directory or storage URI (default: data/shakespeare-char, or "
             "data/<corpus>-<tokenizer>[-<vocab>])."),
    vocab_size: int = typer.Option(2048, "--vocab-size", help="BPE vocabulary size."),
    val_fraction: float = typer.Option(
        0.1, "--val-fraction",
        help="Fraction held out for validation: whole documents (seeded) for many documents, "
             "the tail of each document for a few text files."),
    text_field: str = typer.Option("text", "--text-field",
                                   help="JSON field / parquet column holding the text."),
    bpe_sample_bytes: Optional[int] = typer.Option(
        None, "--bpe-sample-bytes",
        help="Bytes of text the BPE tokenizer is trained on (default: 1/16 of the corpus, "
             "at least 32 MiB, at most 256 MiB)."),
    skip_bad_files: bool = typer.Option(False, "--skip-bad-files",
                                        help="Skip unreadable files (and say how many) "
                                             "instead of stopping at the first."),
    seed: int = typer.Option(0, "--seed", help="Seed of the val choice of documents."),
    shard_tokens: int = typer.Option(50_000_000, "--shard-tokens", help="Tokens per shard file at most."),
    use_ray: Optional[bool] = typer.Option(
        None, "--ray/--no-ray",
        help="Tokenize with Ray Data (default: when the corpus is more than one piece)."),
):
    """Tokenize a corpus into train/val Arrow token shards + meta.json + tokenizer.json."""
    import time

    from rich.console import Console

    from raygpt.data.prepare import prepare_corpus

    out = out or _default_out(corpus, tokenizer, vocab_size)
    console = Console(stderr=True, highlight=False)
    t0 = time.time()

    def log(msg: str) -> None:
        console.print(f"[dim]{time.time() - t0:6.1f}s[/dim] {msg}")

    meta = prepare_corpus(corpus, out, tokenizer=tokenizer, vocab_size=vocab_size,
                          val_fraction=val_fraction, shard_tokens=shard_tokens,
                          use_ray=use_ray, text_field=text_field,
                          bpe_sample_bytes=bpe_sample_bytes, skip_bad_files=skip_bad_files,
                          seed=seed, log=log)
    ns = meta["num_shards"]
    skipped = meta.get("skipped_files") or 0
    Console(highlight=False).print(
        f"[bold green]prepared[/bold green] {meta['corpus']} -> [bold]{out}[/bold]\n"
        f"  tokenizer {meta['tokenizer']}, vocab {meta['vocab_size']}, dtype {meta['dtype']}\n"
        f"  train {meta['train_tokens']:,} tokens ({ns['train']} shard{'s' * (ns['train'] != 1)}), "
        f"val {meta['val_tokens']:,} tokens ({ns['val']} shard{'s' * (ns['val'] != 1)})\n"
        + (f"  skipped {skipped} bad file{'s' * (skipped != 1)}\n" if skipped else "")
        + f"  {time.time() - t0:.1f}s")
