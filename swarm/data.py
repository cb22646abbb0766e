"""Data pipeline of a trainer: load text files, pack them into token rows, split, shard, batch.

Files are read with HF ``datasets`` (no hub access). Supported inputs:

* ``.jsonl`` / ``.json``: one ``{"text": ...}`` object per line (or a JSON list of such objects);
* ``.txt``: one document per non-empty line (blank lines are skipped);
* ``.parquet``: a ``text`` column;
* a directory: every supported file directly inside it, in sorted name order.

Everything after loading is deterministic for a given seed.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from swarm.config import DataSettings

log = logging.getLogger(__name__)

#: File suffix -> HF ``datasets`` loader name.
SUPPORTED_SUFFIXES: dict[str, str] = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}


def _load_file(path: Path) -> list[str]:
    import datasets

    kind = SUPPORTED_SUFFIXES[path.suffix.lower()]
    if path.stat().st_size == 0:
        log.warning("%s is empty: no documents", path)
        return []
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        # A throw-away cache: the dataset is kept in memory, nothing lands in the shared HF cache.
        with tempfile.TemporaryDirectory(prefix="loraswarm-data-") as tmp:
            kw: dict[str, Any] = {"cache_dir": tmp, "keep_in_memory": True}
            if kind == "json":
                ds = datasets.Dataset.from_json(str(path), **kw)
            elif kind == "text":
                ds = datasets.Dataset.from_text(str(path), sample_by="line", **kw)
            else:
                ds = datasets.Dataset.from_parquet(str(path), **kw)
    except Exception as e:
        raise ValueError(f"could not read {path} as {kind}: {type(e).__name__}: {e}") from e
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
    if "text" not in ds.column_names:
        raise ValueError(f"{path} has no 'text' field (columns found: {ds.column_names})")
    texts = ds["text"]
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"{path}: record {i} has a 'text' value of type {type(t).__name__}, expected str")
    if kind == "text":
        texts = [t for t in texts if t.strip()]
    return list(texts)


def load_texts(path: str | Path) -> list[str]:
    """Read the documents of a file or a directory of files (formats in the module docstring)."""
    p = Path(path)
    allowed = ", ".join(SUPPORTED_SUFFIXES)
    if not p.exists():
        raise FileNotFoundError(f"data path {p} does not exist")
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in SUPPORTED_SUFFIXES)
        skipped = sorted(f.name for f in p.iterdir() if f not in files and not f.name.startswith("."))
        if skipped:
            log.warning("%s: ignoring %s (supported extensions: %s)", p, skipped, allowed)
        if not files:
            raise ValueError(f"directory {p} holds no data file; supported extensions: {allowed}")
        return [t for f in files for t in _load_file(f)]
    if p.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise ValueError(f"unsupported data file extension {p.suffix!r} ({p}); supported extensions: {allowed}")
    return _load_file(p)


def pack(texts: list[str], tokenizer: Any, seq_len: int) -> torch.Tensor:
    """Tokenize ``texts``, end each with EOS, concatenate and cut into full rows: ``LongTensor [N, seq_len]``.

    The tail shorter than ``seq_len`` is dropped. Special tokens (BOS) are not added per document.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; packing needs one to separate documents")
    ids: list[int] = []
    if texts:
        for doc in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
            ids.extend(doc)
            ids.append(eos)
    rows = len(ids) // seq_len
    if rows == 0:
        raise ValueError(f"{len(texts)} documents give {len(ids)} tokens, fewer than one sequence of seq_len={seq_len}")
    return torch.tensor(ids[: rows * seq_len], dtype=torch.long).view(rows, seq_len)


def split_train_eval(seqs: torch.Tensor, eval_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hold out ``round(eval_fraction * N)`` rows (at least 1) chosen by ``seed``; both parts keep row order."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    n = len(seqs)
    if n < 2:
        raise ValueError(f"need at least 2 sequences to split into train and eval, got {n}")
    n_eval = min(n - 1, max(1, round(eval_fraction * n)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    eval_idx, _ = perm[:n_eval].sort()
    train_idx, _ = perm[n_eval:].sort()
    return seqs[train_idx], seqs[eval_idx]


def shard(seqs: torch.Tensor, num_shards: int, index: int) -> torch.Tensor:
    """Rows ``index, index + num_shards, ...``: shards are disjoint and together cover ``seqs``."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if not 0 <= index < num_shards:
        raise ValueError(f"shard index must be in [0, {num_shards}), got {index}")
    return seqs[index::num_shards]


def batches(
    seqs: torch.Tensor, micro_batch_size: int, seed: int, epoch: int = 0, drop_last: bool = False
) -> Iterator[torch.Tensor]:
    """Yield shuffled micro-batches of ``seqs``; the order depends only on ``(seed, epoch)``.

    The last batch may be smaller unless ``drop_last``.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(len(seqs), generator=g)
    for start in range(0, len(seqs), micro_batch_size):
        idx = perm[start : start + micro_batch_size]
        if drop_last and len(idx) < micro_batch_size:
            return
        yield seqs[idx]


def load_round_data(
    settings: DataSettings, tokenizer: Any, shard_index: int = 0, num_shards: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (this trainer's shard of the training rows, the full eval rows) for a round's data settings.

    The eval rows come from ``settings.eval_path`` if set, else ``settings.eval_fraction`` of
    ``settings.train_path`` is held out (the same rows on every trainer).
    """
    if not settings.train_path:
        raise ValueError("data.train_path is empty: set it to a .jsonl/.json/.txt/.parquet file or a directory")
    train = pack(load_texts(settings.train_path), tokenizer, settings.seq_len)
    if settings.eval_path:
        eval_ = pack(load_texts(settings.eval_path), tokenizer, settings.seq_len)
    else:
        train, eval_ = split_train_eval(train, settings.eval_fraction, settings.seed)
    part = shard(train, num_shards, shard_index)
    if len(part) == 0:
        raise ValueError(
            f"shard {shard_index} of {num_shards} is empty: {settings.train_path} gives only "
            f"{len(train)} training sequences of {settings.seq_len} tokens"
        )
    return part, eval_
