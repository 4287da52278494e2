"""User-facing errors: the CLI prints them as one line and exits with `exit_code`; and the
"did you mean" suggestions their messages carry."""

import difflib


class UserError(Exception):
    """A mistake in input (file, flag, config): message names the thing and what is wrong."""

    exit_code = 2


class RunFailed(UserError):
    """A run that failed in a way it understands (its restart budget spent, the same
    failure twice): one line saying what happened and where the details are; exit 1."""

    exit_code = 1


class ConfigError(UserError, ValueError):
    """A user mistake in configuration: printed as one line, exit code 2."""


# Names people reach for (other frameworks, nanoGPT, HF) -> the field here.
SYNONYMS = {
    "learning_rate": "lr", "max_lr": "lr", "min_learning_rate": "min_lr",
    "steps": "max_steps", "max_iters": "max_steps", "num_steps": "max_steps", "iters": "max_steps",
    "batch_size": "global_batch", "micro_batch_size": "micro_batch",
    "gradient_accumulation_steps": "global_batch",
    "n_layers": "n_layer", "num_layers": "n_layer", "layers": "n_layer",
    "n_heads": "n_head", "num_heads": "n_head", "heads": "n_head",
    "d_model": "n_embd", "hidden_size": "n_embd", "n_embed": "n_embd", "embed_dim": "n_embd",
    "context_length": "block_size", "seq_len": "block_size", "max_seq_len": "block_size",
    "warmup": "warmup_steps", "warmup_iters": "warmup_steps", "lr_decay_iters": "decay_steps",
    "clip": "grad_clip", "grad_norm_clip": "grad_clip", "max_grad_norm": "grad_clip",
    "eval_interval": "eval_every", "eval_iters": "eval_steps", "log_interval": "log_every",
    "workers": "num_workers", "n_workers": "num_workers", "gpu": "use_gpu",
    "precision": "dtype", "data_dir": "path", "dataset": "path",
}


def _parts(name: str) -> list[str]:
    return [w for w in name.lower().replace("-", "_").split("_") if w]


def closest(name: str, choices: list[str]) -> str | None:
    """The field a mistyped or differently named key most likely means: a known synonym,
    a near spelling, the initials of its words (learning_rate -> lr), or the one field
    that shares a word with it (iters -> ...)."""
    key = name.lower().replace("-", "_")
    if SYNONYMS.get(key) in choices:
        return SYNONYMS[key]
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.75)
    if close:
        return close[0]
    words = _parts(key)
    initials = "".join(w[0] for w in words)
    for c in choices:
        if len(words) > 1 and c.replace("_", "") == initials:
            return c
    sharing = [c for c in choices if set(words) & set(_parts(c)) - {"n", "num", "max", "min"}]
    if len(sharing) == 1:
        return sharing[0]
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.5)
    return close[0] if close else None


def suggest(name: str, choices) -> str:
    close = closest(name, list(choices))
    return f" (did you mean '{close}'?)" if close else ""


def describe_os_error(e: OSError) -> str:
    """'EROFS: Read-only file system: /path' (one line)."""
    import errno

    name = errno.errorcode.get(e.errno, type(e).__name__) if e.errno else type(e).__name__
    msg = e.strerror or str(e)
    if e.filename:
        msg += f": {e.filename}"
    return " ".join(f"{name}: {msg}".split())


def one_line(e: BaseException) -> str:
    """Any exception as one line: an OSError as describe_os_error, else its type and the
    first line of its message."""
    if isinstance(e, OSError):
        return describe_os_error(e)
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
