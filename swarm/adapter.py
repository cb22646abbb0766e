"""The published adapter format: write, sign, read and verify an adapter directory.

An adapter directory holds exactly:

- ``adapter_config.json`` + ``adapter_model.safetensors``: a plain PEFT LoRA adapter, loadable with
  ``peft.PeftModel.from_pretrained(base_model, directory)``;
- ``manifest.json``: a :class:`~swarm.adapter_manifest.Manifest` serialized deterministically, holding the
  sha256 of both files above;
- ``manifest.sig``: the Ed25519 signature of the exact ``manifest.json`` bytes, as 128 lowercase hex
  characters (no newline; readers tolerate surrounding whitespace).

Verification checks, in order: all files present, signature (covers the manifest and so, through the
hashes, the whole adapter), weights sha256, config sha256. Anything that fails raises
:class:`AdapterVerificationError` naming the check.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import ValidationError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from swarm.adapter_manifest import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_FILES,
    ADAPTER_WEIGHTS_FILE,
    MANIFEST_FILE,
    SIGNATURE_FILE,
    AdapterInfo,
    Contributor,
    Manifest,
    ManifestLora,
    manifest_bytes,
    parse_manifest,
)
from swarm.adapter_tensors import (
    block_index_of,
    lora_key,
    merge_span_states,
    split_by_span,
    validate_lora_tensors,
)
from swarm.config import LoraSettings
from swarm.files import sha256_file
from swarm.keys import public_key_fingerprint, sign_hex, verify_hex

__all__ = [
    "AdapterInfo",
    "AdapterVerificationError",
    "BaseModelMismatchError",
    "Contributor",
    "Manifest",
    "ManifestLora",
    "block_index_of",
    "check_base",
    "load_adapter_tensors",
    "lora_key",
    "merge_span_states",
    "read_manifest",
    "split_by_span",
    "verify_adapter",
    "write_adapter",
    "write_peft_dir",
]


class AdapterVerificationError(ValueError):
    """An adapter directory is incomplete, malformed, tampered with, or signed by another key."""


class BaseModelMismatchError(ValueError):
    """An adapter was trained on a different base model than the one it is being applied to."""


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_peft_config(directory: Path, lora: LoraSettings, base_model: str) -> None:
    """Write ``adapter_config.json`` with PEFT itself, then normalise it (sorted target_modules)."""
    from peft import LoraConfig  # imported lazily: peft pulls in transformers

    alpha: float | int = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
    LoraConfig(
        r=lora.rank,
        lora_alpha=alpha,  # type: ignore[arg-type]
        lora_dropout=lora.dropout,
        target_modules=sorted(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    ).save_pretrained(str(directory))
    path = directory / ADAPTER_CONFIG_FILE
    config = json.loads(path.read_text())
    config["target_modules"] = sorted(config["target_modules"])  # PEFT stores a set: fix the order
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_peft_dir(directory: Path, tensors: Mapping[str, torch.Tensor], lora: LoraSettings, base_model: str) -> None:
    """A plain, unsigned PEFT adapter directory (``adapter_config.json`` + weights) of ``tensors``, checked
    by :func:`~swarm.adapter_tensors.validate_lora_tensors` (an evaluator loads a candidate this way)."""
    validate_lora_tensors(tensors, lora)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: t.detach().to("cpu").contiguous() for k, t in sorted(tensors.items())}
    save_file(weights, str(directory / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    _write_peft_config(directory, lora, base_model)


def _check_target(directory: Path) -> None:
    if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
        raise FileExistsError(f"adapter target {directory} exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()):
        raise FileExistsError(
            f"adapter target {directory} already exists and is not empty; refusing to overwrite a published adapter"
        )


def write_adapter(
    directory: str | Path,
    tensors: Mapping[str, torch.Tensor],
    lora: LoraSettings,
    info: AdapterInfo,
    signing_key: Ed25519PrivateKey,
) -> Manifest:
    """Write, hash and sign a new adapter directory at ``directory`` and return its manifest.

    ``tensors`` uses PEFT saved-state keys (see :func:`swarm.adapter_tensors.lora_key`) and is checked by
    :func:`~swarm.adapter_tensors.validate_lora_tensors` (``ValueError`` naming the tensor on a bad key,
    shape, dtype or a NaN/Inf value). The files are written to a hidden temp directory next to
    ``directory`` and renamed into place, so readers never see a partial adapter. Raises
    ``FileExistsError`` if ``directory`` exists and is not empty.
    """
    target = Path(directory)
    validate_lora_tensors(tensors, lora)
    _check_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        weights = {k: t.detach().to("cpu").contiguous() for k, t in sorted(tensors.items())}
        save_file(weights, str(tmp / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
        _write_peft_config(tmp, lora, info.base_model)
        manifest = Manifest(
            **{name: getattr(info, name) for name in AdapterInfo.model_fields},
            lora=ManifestLora.from_settings(lora),
            weights_sha256=sha256_file(tmp / ADAPTER_WEIGHTS_FILE),
            config_sha256=sha256_file(tmp / ADAPTER_CONFIG_FILE),
        )
        data = manifest_bytes(manifest)
        (tmp / MANIFEST_FILE).write_bytes(data)
        (tmp / SIGNATURE_FILE).write_text(sign_hex(signing_key, data))
        for name in ADAPTER_FILES:
            os.chmod(tmp / name, 0o644)  # safetensors writes 0600; a published adapter is world-readable
            _fsync_file(tmp / name)
        os.chmod(tmp, 0o755)  # mkdtemp made it 0700
        _check_target(target)
        os.rename(tmp, target)  # atomic; fails if target became a non-empty directory meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_file(target.parent)
    return manifest


def read_manifest(directory: str | Path) -> Manifest:
    """Parse ``manifest.json`` of an adapter directory WITHOUT verifying it (use :func:`verify_adapter`).

    Raises :class:`AdapterVerificationError` if the file is missing or not a valid manifest.
    """
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise AdapterVerificationError(f"missing file: {path} does not exist")
    return _parse(path.read_bytes(), path)


def _parse(data: bytes, path: Path) -> Manifest:
    try:
        return parse_manifest(data)
    except ValidationError as e:
        raise AdapterVerificationError(f"malformed manifest: {path} is not a valid manifest: {e}") from e


def _verify_signed_manifest(directory: Path, public_key: Ed25519PublicKey) -> Manifest:
    """Check that all files exist and the signature of manifest.json is valid; return the manifest."""
    if not directory.is_dir():
        raise AdapterVerificationError(f"missing file: adapter directory {directory} does not exist")
    missing = [name for name in ADAPTER_FILES if not (directory / name).is_file()]
    if missing:
        raise AdapterVerificationError(f"missing file: {directory} lacks {', '.join(missing)}")
    data = (directory / MANIFEST_FILE).read_bytes()
    try:
        signature = (directory / SIGNATURE_FILE).read_text(encoding="ascii")
        valid = verify_hex(public_key, data, signature)
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterVerificationError(f"signature invalid: {SIGNATURE_FILE} is malformed ({e})") from e
    if not valid:
        raise AdapterVerificationError(
            f"signature invalid: {MANIFEST_FILE} was modified or not signed by the key with fingerprint "
            f"{public_key_fingerprint(public_key)}"
        )
    return _parse(data, directory / MANIFEST_FILE)


def _check_hash(kind: str, name: str, expected: str, actual: str) -> None:
    if actual != expected:
        raise AdapterVerificationError(
            f"{kind} sha256 mismatch: {name} was modified after signing (manifest says {expected}, file has {actual})"
        )


def verify_adapter(directory: str | Path, public_key: Ed25519PublicKey) -> Manifest:
    """Verify an adapter directory against ``public_key`` and return its (now trusted) manifest.

    Raises :class:`AdapterVerificationError` whose message starts with the failed check: ``missing file``,
    ``signature invalid``, ``malformed manifest``, ``weights sha256 mismatch`` or ``config sha256 mismatch``.
    """
    d = Path(directory)
    manifest = _verify_signed_manifest(d, public_key)
    _check_hash("weights", ADAPTER_WEIGHTS_FILE, manifest.weights_sha256, sha256_file(d / ADAPTER_WEIGHTS_FILE))
    _check_hash("config", ADAPTER_CONFIG_FILE, manifest.config_sha256, sha256_file(d / ADAPTER_CONFIG_FILE))
    return manifest


def load_adapter_tensors(
    directory: str | Path, public_key: Ed25519PublicKey
) -> tuple[Manifest, dict[str, torch.Tensor]]:
    """Verify an adapter (as :func:`verify_adapter`) and return its manifest and LoRA tensors (on CPU).

    The weights file is read once: the bytes that are hashed are the bytes that are deserialized, so a
    file swapped between check and load cannot slip through. The tensors are also re-validated against
    the manifest's LoRA settings (:class:`AdapterVerificationError` on any mismatch).
    """
    d = Path(directory)
    manifest = _verify_signed_manifest(d, public_key)
    _check_hash("config", ADAPTER_CONFIG_FILE, manifest.config_sha256, sha256_file(d / ADAPTER_CONFIG_FILE))
    raw = (d / ADAPTER_WEIGHTS_FILE).read_bytes()
    _check_hash("weights", ADAPTER_WEIGHTS_FILE, manifest.weights_sha256, hashlib.sha256(raw).hexdigest())
    try:
        tensors = load_safetensors_bytes(raw)
        validate_lora_tensors(tensors, manifest.lora.to_settings())
    except Exception as e:  # a signed but unusable adapter: report it, never use it
        raise AdapterVerificationError(f"invalid weights: {ADAPTER_WEIGHTS_FILE} in {d}: {e}") from e
    return manifest, tensors


def check_base(manifest: Manifest, fingerprint: str) -> None:
    """Raise :class:`BaseModelMismatchError` unless ``manifest`` was trained on the base ``fingerprint``."""
    if not fingerprint:
        raise ValueError("cannot check the adapter's base model: the local base fingerprint is empty")
    if manifest.base_fingerprint != fingerprint:
        raise BaseModelMismatchError(
            f"adapter {manifest.version} was trained on base model {manifest.base_model!r} "
            f"(fingerprint {manifest.base_fingerprint}), but the local base has fingerprint {fingerprint}; "
            "load the matching base model or pick an adapter trained on this one"
        )
