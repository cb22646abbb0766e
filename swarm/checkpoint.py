"""Access to a Hugging Face causal-LM checkpoint: resolve, read its config, fingerprint it, read tensors by name.

A checkpoint is a local directory or a hub id (resolved with ``huggingface_hub.snapshot_download``). Tensors
are read one by one from the safetensors files, so a peer reads only the blocks of its span.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open

from swarm.arch import check_architecture
from swarm.files import sha256_file

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

WEIGHT_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]


def resolve_checkpoint(path_or_id: str | Path) -> Path:
    """Return the local directory of ``path_or_id``: an existing directory, or a hub snapshot."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"checkpoint directory {p} has no config.json: is it a Hugging Face model?")
        return p.resolve()
    text = str(path_or_id)
    looks_local = text.startswith((".", "/", "~")) or text.count("/") != 1 or p.exists()
    if looks_local:
        raise FileNotFoundError(
            f"checkpoint {text!r} does not exist: pass a model directory (make one with `swarm make-base DIR`)"
            " or a hub id such as 'org/name'"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=text, allow_patterns=WEIGHT_PATTERNS))
    except Exception as exc:  # hub errors come in many types; name the cause and what to do
        raise FileNotFoundError(
            f"could not fetch hub model {text!r} ({type(exc).__name__}: {exc}); download it to a directory"
            " and pass that directory instead"
        ) from exc


def read_config(path_or_id: str | Path) -> PretrainedConfig:
    """Load ``config.json`` of a supported architecture, with SDPA attention (same as the full model)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_checkpoint(path_or_id))
    check_architecture(config.model_type)
    config._attn_implementation = "sdpa"
    return config


def weight_map(path: Path) -> dict[str, str]:
    """Tensor name -> safetensors file name, from the index file or the single weights file."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    single = path / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{path} has neither model.safetensors nor model.safetensors.index.json")
    with safe_open(str(single), framework="pt") as f:
        return {name: single.name for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


def load_tensors(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Read exactly ``names`` from the checkpoint's safetensors files; error naming any missing tensor."""
    wmap = weight_map(path)
    missing = [n for n in names if n not in wmap]
    if missing:
        raise KeyError(f"checkpoint {path} lacks tensor(s) {missing[:5]}{'...' if len(missing) > 5 else ''}")
    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(wmap[name], []).append(name)
    out: dict[str, torch.Tensor] = {}
    for file_name, file_names in by_file.items():
        with safe_open(str(path / file_name), framework="pt") as f:
            for name in file_names:
                out[name] = f.get_tensor(name)
    return out


@lru_cache(maxsize=32)
def _fingerprint_cached(path: str, stamp: tuple[tuple[str, int, int], ...]) -> str:
    root = Path(path)
    config = json.loads((root / "config.json").read_text())
    # Fields that change nothing about the weights' meaning are left out, so a re-save keeps the fingerprint.
    for volatile in ("transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures"):
        config.pop(volatile, None)
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name, _, _ in stamp:
        h.update(name.encode())
        h.update(sha256_file(root / name).encode())
    return "sha256:" + h.hexdigest()


def fingerprint(path_or_id: str | Path) -> str:
    """A stable identity of a base model: sha256 over its config and the bytes of every weights file."""
    root = resolve_checkpoint(path_or_id)
    files = sorted(set(weight_map(root).values()))
    stamp = tuple((f, os.stat(root / f).st_size, os.stat(root / f).st_mtime_ns) for f in files)
    return _fingerprint_cached(str(root), stamp)


def block_nbytes(path_or_id: str | Path, block: int, bytes_per_param: int) -> int:
    """Bytes one transformer block takes at ``bytes_per_param``, from the safetensors headers (no tensor read)."""
    root = resolve_checkpoint(path_or_id)
    prefix = f"model.layers.{block}."
    total = 0
    wmap = weight_map(root)
    for file_name in sorted({f for name, f in wmap.items() if name.startswith(prefix)}):
        with safe_open(str(root / file_name), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if name.startswith(prefix):
                    numel = 1
                    for dim in f.get_slice(name).get_shape():
                        numel *= int(dim)
                    total += numel * bytes_per_param
    if total == 0:
        raise KeyError(f"checkpoint {root} has no tensors for block {block}")
    return total
