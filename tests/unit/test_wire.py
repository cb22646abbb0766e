"""Wire compression of activations (peer.transport): bytes per element, dtype on the wire, round trip error."""

from __future__ import annotations

import pytest
import torch

from peer.transport import WIRE_COMPRESSIONS, decode_parts, encode, wire_bytes, wire_dtype


@pytest.mark.parametrize(
    ("name", "bytes_per_element", "tolerance"),
    [("none", 4.0, 0.0), ("float16", 2.0, 1e-3), ("bfloat16", 2.0, 1e-2), ("uint8", 1.0, 0.1)],
)
def test_each_compression_shrinks_the_tensor_and_decodes_close(name: str, bytes_per_element: float, tolerance: float):
    x = torch.randn(4, 16, 256, generator=torch.Generator().manual_seed(0))
    parts = encode(x, name)
    assert wire_bytes(parts) / x.numel() == pytest.approx(bytes_per_element, rel=0.1)  # 8-bit adds a codebook
    (raw,) = decode_parts(parts)
    assert raw.dtype == wire_dtype(name, torch.float32)
    (y,) = decode_parts(parts, torch.float32)
    assert y.shape == x.shape and y.dtype == torch.float32
    # mean abs error relative to the mean magnitude (8-bit clips rare outliers, so not the max)
    assert (y - x).abs().mean().item() <= tolerance * x.abs().mean().item()


def test_large_tensors_are_split_into_parts_and_joined_back() -> None:
    x = torch.randn(8, 512, 256)  # 4 MiB in fp32: more than one streaming part
    parts = encode(x, "none")
    assert len(parts) > 1
    (y,) = decode_parts(parts, torch.float32)
    assert torch.equal(x, y)


def test_the_choices_match_the_round_spec() -> None:
    from typing import get_args

    from swarm.config import WireSettings

    assert set(get_args(WireSettings.model_fields["compression"].annotation)) == set(WIRE_COMPRESSIONS)
