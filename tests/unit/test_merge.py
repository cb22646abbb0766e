"""Adapter merging: exact linear (PEFT 'cat') on non-square layers, TIES by hand and against PEFT, signed dirs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft.utils.merge_utils import ties as peft_ties
from typer.testing import CliRunner

from coordinator.merge import magnitude_prune, merge_adapter_dirs, merge_adapters, refactorize, ties
from swarm.adapter import AdapterInfo, Contributor, load_adapter_tensors, lora_key, write_adapter
from swarm.config import LoraSettings
from swarm.keys import generate_signing_key

pytestmark = pytest.mark.timeout(30)

SHAPES = {"q_proj": (32, 32), "v_proj": (16, 32)}  # (out, in): v_proj is not square


def state(rank: int, seed: int, blocks: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for block in range(blocks):
        for module, (o, i) in SHAPES.items():
            out[lora_key(block, module, "A")] = torch.randn(rank, i, generator=g)
            out[lora_key(block, module, "B")] = torch.randn(o, rank, generator=g)
    return out


def delta(s: dict[str, torch.Tensor], block: int, module: str, scaling: float) -> torch.Tensor:
    return s[lora_key(block, module, "B")].double() @ s[lora_key(block, module, "A")].double() * scaling


def test_linear_is_the_exact_weighted_sum_of_updates() -> None:
    a, b = state(4, 1), state(2, 2)  # different ranks are fine for cat
    sa, sb = 16 / 4, 3 / 2
    merged = merge_adapters([a, b], [0.3, 0.7], "linear", scalings=[sa, sb])
    assert (merged.rank, merged.alpha) == (6, 6.0)  # alpha = rank: scaling 1, like PEFT
    for block in range(2):
        for module, (o, i) in SHAPES.items():
            assert merged.tensors[lora_key(block, module, "A")].shape == (6, i)
            assert merged.tensors[lora_key(block, module, "B")].shape == (o, 6)
            want = 0.3 * delta(a, block, module, sa) + 0.7 * delta(b, block, module, sb)
            got = delta(merged.tensors, block, module, merged.alpha / merged.rank)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_ties_by_hand_on_a_non_square_update() -> None:
    d1 = torch.tensor([[4.0, -1.0], [0.5, 2.0], [-3.0, 0.1]], dtype=torch.float64)
    d2 = torch.tensor([[2.5, 3.0], [1.0, -0.2], [-1.0, 5.0]], dtype=torch.float64)
    # density 0.5 keeps int(0.5 * 6) = 3 entries: d1 -> 4, 2, -3; d2 -> 2.5, 3, 5
    assert magnitude_prune(d1, 0.5).tolist() == [[4, 0], [0, 2], [-3, 0]]
    # elected signs: sums [[6.5, 3], [0, 2], [-3, 5]] -> + + / + + / - +; weighted agreeing entries averaged
    want = [[(4 * 0.5 + 2.5 * 2) / 2, 3 * 2], [0, 2 * 0.5], [-3 * 0.5, 5 * 2]]
    got = ties([d1, d2], [0.5, 2.0], density=0.5)
    assert got.tolist() == want
    torch.testing.assert_close(got, peft_ties([d1, d2], torch.tensor([0.5, 2.0], dtype=torch.float64), 0.5))
    # through whole adapters: A = identity, B = delta, scaling alpha/r = 1 -> the merged B @ A is exact (rank 2)
    eye = torch.eye(2, dtype=torch.float32)
    s1 = {lora_key(0, "v_proj", "A"): eye, lora_key(0, "v_proj", "B"): d1.float()}
    s2 = {lora_key(0, "v_proj", "A"): eye, lora_key(0, "v_proj", "B"): d2.float()}
    merged = merge_adapters([s1, s2], [0.5, 2.0], "ties", scalings=[1.0, 1.0], density=0.5)
    assert (merged.rank, merged.alpha) == (2, 2.0)
    torch.testing.assert_close(delta(merged.tensors, 0, "v_proj", 1.0), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_ties_matches_peft_on_random_adapters_and_keeps_the_rank() -> None:
    a, b = state(4, 3), state(4, 4)
    merged = merge_adapters([a, b], [0.6, 0.4], "ties", scalings=[2.0, 2.0], density=0.3)
    assert merged.rank == 4 and merged.tensors[lora_key(1, "v_proj", "A")].shape == (4, 32)
    for module in SHAPES:
        reference = peft_ties([delta(a, 1, module, 2.0), delta(b, 1, module, 2.0)],
                              torch.tensor([0.6, 0.4], dtype=torch.float64), 0.3)  # fmt: skip
        best_a, best_b = refactorize(reference, 4)  # the best rank-4 approximation of PEFT's result
        torch.testing.assert_close(delta(merged.tensors, 1, module, 1.0), (best_b @ best_a), rtol=1e-4, atol=1e-4)


def test_refactorize_pads_when_the_update_is_smaller_than_the_rank() -> None:
    d = torch.randn(3, 2, dtype=torch.float64)
    a, b = refactorize(d, 4)
    assert a.shape == (4, 2) and b.shape == (3, 4)
    torch.testing.assert_close(b @ a, d)


@pytest.mark.parametrize(
    ("states", "weights", "kw", "message"),
    [([state(4, 1)], [1.0], {}, "at least 2"),
     ([state(4, 1), state(4, 2)], [1.0], {}, "2 adapters, 1 weights"),
     ([state(4, 1), state(4, 2, blocks=1)], [1, 1], {}, "other modules"),
     ([state(4, 1), state(4, 2)], [1, float("nan")], {}, "finite"),
     ([state(4, 1), state(4, 2)], [1, 1], {"method": "ties", "density": 0.0}, "density"),
     ([state(4, 1), state(4, 2)], [1, 1], {"method": "svd"}, "unknown merge method")],
)  # fmt: skip
def test_bad_inputs_are_named(states: list, weights: list, kw: dict, message: str) -> None:
    method = kw.pop("method", "linear")
    with pytest.raises(ValueError, match=message):
        merge_adapters(states, weights, method, scalings=[1.0] * len(states), **kw)


def _publish(tmp_path: Path, key, version: str, seed: int, fingerprint: str = "sha256:base") -> Path:  # type: ignore[no-untyped-def]
    lora = LoraSettings(rank=4, alpha=8, target_modules=("q_proj", "v_proj"))
    info = AdapterInfo(version=version, round_id=f"round-{version}", base_model="/m", base_fingerprint=fingerprint,
                       contributors=(Contributor(peer_id="p1", samples=10, tokens=100),))  # fmt: skip
    write_adapter(tmp_path / version, state(4, seed), lora, info, key)
    return tmp_path / version


def test_merge_dirs_and_cli_write_signed_adapters_with_both_parents(tmp_path: Path) -> None:
    key = generate_signing_key(tmp_path / "key")
    a, b = _publish(tmp_path, key, "v1", 1), _publish(tmp_path, key, "v2", 2)
    manifest = merge_adapter_dirs([a, b], [0.5, 0.5], "ties", tmp_path / "m", signing_key=key,
                                  public_key=key.public_key())  # fmt: skip
    assert (manifest.version, manifest.parents, manifest.method) == ("v1-v2-ties", ("v1", "v2"), "merge-ties")
    assert manifest.parent_version is None and manifest.contributors[0].samples == 20
    _, tensors = load_adapter_tensors(tmp_path / "m", key.public_key())
    assert manifest.lora.rank == 4 and tensors[lora_key(0, "q_proj", "A")].shape == (4, 32)

    from swarm.cli import build_app

    out = tmp_path / "cli"
    args = ["adapters", "merge", str(a), str(b), "--weights", "0.25,0.75", "--method", "linear", "--out", str(out),
            "--signing-key", str(tmp_path / "key"), "--version", "mix1"]  # fmt: skip
    result = CliRunner().invoke(build_app(), args)
    assert result.exit_code == 0, result.output
    m2, t2 = load_adapter_tensors(out, key.public_key())
    assert (m2.version, m2.parents, m2.method, m2.lora.rank, m2.lora.alpha) == (
        "mix1",
        ("v1", "v2"),
        "merge-linear",
        8,
        8,
    )
    _, ta = load_adapter_tensors(a, key.public_key())
    _, tb = load_adapter_tensors(b, key.public_key())
    want = 0.25 * delta(ta, 1, "v_proj", 2.0) + 0.75 * delta(tb, 1, "v_proj", 2.0)
    torch.testing.assert_close(delta(t2, 1, "v_proj", 1.0), want, rtol=1e-5, atol=1e-5)


def test_merge_refuses_different_bases_and_unsigned_inputs(tmp_path: Path) -> None:
    key, other = generate_signing_key(tmp_path / "k1"), generate_signing_key(tmp_path / "k2")
    a, b = _publish(tmp_path, key, "v1", 1), _publish(tmp_path, key, "v2", 2, fingerprint="sha256:other")
    with pytest.raises(ValueError, match="different base models"):
        merge_adapter_dirs([a, b], [1, 1], "linear", tmp_path / "x", signing_key=key, public_key=key.public_key())
    c = _publish(tmp_path, other, "v3", 3)
    from swarm.cli import build_app

    args = ["adapters", "merge", str(a), str(c), "--weights", "1,1", "--out", str(tmp_path / "y"), "--signing-key",
            str(tmp_path / "k1")]  # fmt: skip
    result = CliRunner().invoke(build_app(), args)
    assert result.exit_code == 1 and "signature invalid" in result.output and not (tmp_path / "y").exists()
