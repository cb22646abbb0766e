"""The published adapter format: PEFT compatibility, signing, tamper detection, span helpers, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from swarm.adapter import (
    AdapterInfo,
    AdapterVerificationError,
    BaseModelMismatchError,
    Contributor,
    Manifest,
    block_index_of,
    check_base,
    load_adapter_tensors,
    lora_key,
    merge_span_states,
    read_manifest,
    split_by_span,
    verify_adapter,
    write_adapter,
)
from swarm.adapter_manifest import manifest_bytes
from swarm.cli_adapters import register
from swarm.config import LoraSettings, SpanRange
from swarm.keys import write_public_key

pytestmark = pytest.mark.timeout(120)

HIDDEN, KV_DIM, LAYERS = 32, 16, 2  # 2 heads of 16, 1 KV head: v_proj is non-square [16, 32]
LORA = LoraSettings(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
FINGERPRINT = "ab" * 32


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=100, max_position_embeddings=64,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("base")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def make_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out_dims = {"q_proj": HIDDEN, "v_proj": KV_DIM}
    tensors = {}
    for block in range(LAYERS):
        for module, out_dim in out_dims.items():
            tensors[lora_key(block, module, "A")] = torch.randn(LORA.rank, HIDDEN, generator=g)
            tensors[lora_key(block, module, "B")] = torch.randn(out_dim, LORA.rank, generator=g)
    return tensors


def make_info(**overrides: object) -> AdapterInfo:
    fields: dict[str, object] = dict(
        version="r2", parent_version="r1", round_id="round-2", base_model="tiny-llama",
        base_fingerprint=FINGERPRINT, eval_loss_before=3.5, eval_loss_after=3.25,
        contributors=[Contributor(peer_id="QmPeerA", samples=96, tokens=6144),
                      Contributor(peer_id="QmPeerB", samples=32, tokens=2048)],
    )  # fmt: skip
    fields.update(overrides)
    return AdapterInfo.model_validate(fields)


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def adapter(tmp_path: Path, key: Ed25519PrivateKey) -> Path:
    write_adapter(tmp_path / "adapter", make_tensors(), LORA, make_info(), key)
    return tmp_path / "adapter"


def test_write_then_verify(adapter: Path, key: Ed25519PrivateKey) -> None:
    assert sorted(p.name for p in adapter.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "manifest.json", "manifest.sig",
    ]  # fmt: skip
    assert not [p for p in adapter.parent.iterdir() if p.name.startswith(".")]  # temp dir renamed away
    assert {p.stat().st_mode & 0o777 for p in adapter.iterdir()} == {0o644}
    assert adapter.stat().st_mode & 0o777 == 0o755
    manifest = verify_adapter(adapter, key.public_key())
    assert manifest == read_manifest(adapter)
    assert (manifest.version, manifest.parent_version, manifest.parents) == ("r2", "r1", ("r1",))
    assert manifest.lora.rank == 4 and manifest.lora.target_modules == ("q_proj", "v_proj")
    assert manifest.total_samples == 128 and manifest.method == "round"
    sig = (adapter / "manifest.sig").read_text()
    assert len(sig) == 128 and bytes.fromhex(sig)
    raw = (adapter / "manifest.json").read_bytes()
    assert raw == manifest_bytes(manifest)  # deterministic serialization, sorted keys
    assert list(json.loads(raw)) == sorted(json.loads(raw))
    loaded_manifest, tensors = load_adapter_tensors(adapter, key.public_key())
    assert loaded_manifest == manifest
    for k, t in make_tensors().items():
        assert torch.equal(tensors[k], t)


def test_peft_loads_the_adapter(adapter: Path, base_dir: Path) -> None:
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        base_logits = base(ids).logits.clone()
    model = PeftModel.from_pretrained(base, adapter)
    state = get_peft_model_state_dict(model, save_embedding_layers=False)  # no hub lookup
    expected = make_tensors()
    assert set(state) == set(expected)
    for k, t in expected.items():
        assert torch.equal(state[k], t), k
    layer = model.get_submodule("base_model.model.model.layers.1.self_attn.v_proj")
    scaling: dict[str, float] = getattr(layer, "scaling")  # noqa: B009 (Module.__getattr__ is untyped)
    assert scaling["default"] == pytest.approx(LORA.scaling)
    with torch.no_grad():
        lora_logits = model(ids).logits
    assert not torch.allclose(lora_logits, base_logits)


def test_tampered_weights_fail(adapter: Path, key: Ed25519PrivateKey) -> None:
    path = adapter / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(AdapterVerificationError, match="weights sha256 mismatch"):
        verify_adapter(adapter, key.public_key())
    with pytest.raises(AdapterVerificationError, match="weights sha256 mismatch"):
        load_adapter_tensors(adapter, key.public_key())


def test_tampered_config_fails(adapter: Path, key: Ed25519PrivateKey) -> None:
    path = adapter / "adapter_config.json"
    path.write_text(path.read_text().replace('"r": 4', '"r": 8'))
    with pytest.raises(AdapterVerificationError, match="config sha256 mismatch"):
        verify_adapter(adapter, key.public_key())


def test_edited_manifest_fails_signature(adapter: Path, key: Ed25519PrivateKey) -> None:
    path = adapter / "manifest.json"
    path.write_text(path.read_text().replace('"samples":96', '"samples":9600'))
    with pytest.raises(AdapterVerificationError, match="signature invalid"):
        verify_adapter(adapter, key.public_key())


def test_wrong_key_and_bad_signature_fail(adapter: Path, key: Ed25519PrivateKey) -> None:
    with pytest.raises(AdapterVerificationError, match="signature invalid"):
        verify_adapter(adapter, Ed25519PrivateKey.generate().public_key())
    (adapter / "manifest.sig").write_text("not hex")
    with pytest.raises(AdapterVerificationError, match="signature invalid: manifest.sig is malformed"):
        verify_adapter(adapter, key.public_key())


def test_missing_file_fails(adapter: Path, key: Ed25519PrivateKey, tmp_path: Path) -> None:
    (adapter / "manifest.sig").unlink()
    with pytest.raises(AdapterVerificationError, match="missing file.*manifest.sig"):
        verify_adapter(adapter, key.public_key())
    with pytest.raises(AdapterVerificationError, match="missing file"):
        verify_adapter(tmp_path / "nowhere", key.public_key())


def test_refuses_nan_bad_shape_and_existing_dir(tmp_path: Path, key: Ed25519PrivateKey, adapter: Path) -> None:
    tensors = make_tensors()
    bad = lora_key(1, "v_proj", "B")
    tensors[bad] = tensors[bad].clone()
    tensors[bad][3, 1] = float("nan")
    with pytest.raises(ValueError, match=rf"{bad}.*NaN/Inf"):
        write_adapter(tmp_path / "nan", tensors, LORA, make_info(), key)
    assert not (tmp_path / "nan").exists()
    tensors = make_tensors()
    tensors[lora_key(0, "q_proj", "A")] = torch.zeros(3, HIDDEN)
    with pytest.raises(ValueError, match=r"expected \[r, in_features\] with r = 4"):
        write_adapter(tmp_path / "shape", tensors, LORA, make_info(), key)
    tensors = make_tensors()
    del tensors[lora_key(0, "q_proj", "B")]
    with pytest.raises(ValueError, match="no matching"):
        write_adapter(tmp_path / "pair", tensors, LORA, make_info(), key)
    with pytest.raises(ValueError, match="not a PEFT LoRA key"):
        write_adapter(tmp_path / "k", {"layers.0.q.weight": torch.ones(4, 4)}, LORA, make_info(), key)
    before = (adapter / "manifest.json").read_bytes()
    with pytest.raises(FileExistsError, match="not empty"):
        write_adapter(adapter, make_tensors(1), LORA, make_info(version="r3"), key)
    assert (adapter / "manifest.json").read_bytes() == before
    (tmp_path / "empty").mkdir()
    write_adapter(tmp_path / "empty", make_tensors(), LORA, make_info(), key)  # an empty dir is fine
    verify_adapter(tmp_path / "empty", key.public_key())


def test_manifest_validation() -> None:
    info = make_info(method="merge-ties", parent_version="r1", parents=["r0"])
    assert info.parents == ("r1", "r0")
    with pytest.raises(ValueError, match="own parent"):
        make_info(version="r1")
    with pytest.raises(ValueError, match="kebab"):
        make_info(method="Merge TIES")
    with pytest.raises(ValueError, match="ISO 8601"):
        make_info(created_at="yesterday")
    with pytest.raises(ValueError):
        make_info(eval_loss_after=float("nan"))
    data = json.loads(manifest_bytes(Manifest(**make_info().model_dump(), lora=dict(
        rank=4, alpha=8, target_modules=["q_proj"]), weights_sha256="0" * 64, config_sha256="1" * 64)))  # fmt: skip
    data["format_version"] = 99
    with pytest.raises(ValueError, match="newer than this loraswarm"):
        Manifest.model_validate(data)


def test_check_base(adapter: Path) -> None:
    manifest = read_manifest(adapter)
    check_base(manifest, FINGERPRINT)
    with pytest.raises(BaseModelMismatchError, match="trained on base model 'tiny-llama'"):
        check_base(manifest, "cd" * 32)


def test_span_split_and_merge() -> None:
    tensors = make_tensors()
    assert block_index_of(lora_key(1, "q_proj", "A")) == 1
    spans = [SpanRange(start=0, end=1), SpanRange(start=1, end=2)]
    pieces = split_by_span(tensors, spans)
    assert [{block_index_of(k) for k in p} for p in pieces] == [{0}, {1}]
    assert merge_span_states(pieces, spans) == tensors
    assert merge_span_states(pieces) == tensors
    with pytest.raises(ValueError, match="in both span"):
        merge_span_states([pieces[0], pieces[0]])
    with pytest.raises(ValueError, match="span 1-2 has no state"):
        merge_span_states([pieces[0], None], spans)
    with pytest.raises(ValueError, match="outside the span"):
        merge_span_states([pieces[1], pieces[0]], spans)
    with pytest.raises(ValueError, match="none of the spans"):
        split_by_span(tensors, spans[:1])
    with pytest.raises(ValueError, match="overlap"):
        split_by_span(tensors, [SpanRange(start=0, end=2), SpanRange(start=1, end=2)])


def test_cli_verify_and_keygen(adapter: Path, key: Ed25519PrivateKey, tmp_path: Path) -> None:
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    pub = tmp_path / "coord.pub"
    write_public_key(key, pub)
    ok = runner.invoke(app, ["adapters", "verify", str(adapter), "--public-key", str(pub)])
    assert ok.exit_code == 0, ok.output
    assert "version:          r2" in ok.stdout and "2 peer(s), 128 samples" in ok.stdout
    other = tmp_path / "other"
    made = runner.invoke(app, ["adapters", "keygen", str(other)])
    assert made.exit_code == 0, made.output
    assert (other.stat().st_mode & 0o777) == 0o600 and (tmp_path / "other.pub").is_file()
    again = runner.invoke(app, ["adapters", "keygen", str(other)])
    assert again.exit_code == 1 and "refusing to overwrite" in again.stderr
    bad = runner.invoke(app, ["adapters", "verify", str(adapter), "--public-key", str(tmp_path / "other.pub")])
    assert bad.exit_code == 1
    assert bad.stderr.startswith("verification failed: signature invalid")
    base = runner.invoke(app, ["adapters", "verify", str(adapter), "-k", str(pub), "--base-fingerprint", "cd" * 32])
    assert base.exit_code == 1 and "trained on base model" in base.stderr
    helptext = runner.invoke(app, ["adapters", "verify", "--help"])
    assert "--public-key" in helptext.stdout and "PEM Ed25519 public key" in helptext.stdout
