"""A remote call with a wrong shape, dtype or NaN/Inf gets a clear error and leaves the LoRA weights unchanged."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import hivemind
import pytest
import torch

from peer.announce import Announcer, record_validators
from peer.remote import RemoteCallError, RemoteSpan
from peer.server import SpanServer
from swarm.lora import export_lora_state
from tests.integration.harness import one_span_spec

pytestmark = pytest.mark.integration


@pytest.mark.timeout(120)
def test_malformed_tensors_are_refused(tiny_checkpoint: Callable[..., Path]) -> None:
    ckpt = tiny_checkpoint("llama", layers=4)
    spec = one_span_spec(ckpt, "bad", layers=4)
    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=record_validators("bad"))
    client = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=dht.get_visible_maddrs())
    server = SpanServer(spec, spec.spans[0], dht)
    server.start(catch_up=False)
    announcer = Announcer(
        dht,
        "bad",
        lambda: server.announcement(1.0),
        1.0,
    )
    try:
        from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker

        p2p = RemoteExpertWorker.run_coroutine(client.replicate_p2p())
        remote = RemoteSpan(p2p, str(dht.peer_id), server.uid, timeout=20)
        before = export_lora_state(server.module)
        good = torch.randn(2, 16, 32)
        cases = {
            "shape [2, 15, 32]": torch.randn(2, 15, 32),
            "dtype float64": torch.randn(2, 16, 32, dtype=torch.float64),
            "NaN or Inf": torch.full((2, 16, 32), float("nan")),
        }
        for expected, tensor in cases.items():
            with pytest.raises(RemoteCallError, match=expected.replace("[", r"\[").replace("]", r"\]")):
                remote.forward(tensor)
            with pytest.raises(RemoteCallError, match="hidden_states|grad_outputs"):
                remote.backward(tensor, torch.randn(2, 16, 32))
        with pytest.raises(RemoteCallError, match="grad_outputs contains NaN or Inf"):
            remote.backward(good, torch.full((2, 16, 32), float("inf")))
        after = export_lora_state(server.module)
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert server.backend.samples_trained == 0
        out = remote.forward(good)  # the server still answers good requests
        assert out.shape == good.shape and torch.isfinite(out).all()
        remote.backward(good, torch.randn(2, 16, 32))
        assert server.backend.samples_trained == 2
    finally:
        announcer.stop(leave=False)
        server.shutdown()
        client.shutdown()
