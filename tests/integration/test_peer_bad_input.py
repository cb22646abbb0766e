"""Remote calls with a wrong shape, dtype, NaN/Inf or bad metadata get a clear error and change nothing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import hivemind
import pytest
import torch
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker

from peer.inprocess import InProcessNode
from peer.remote import RemoteCallError, RemoteSpan, RemoteStaleStepError
from peer.roster_view import Membership
from swarm.lora import export_lora_state
from tests.integration.harness import in_process_server, tiny_spec

pytestmark = pytest.mark.integration
LOCAL = ["/ip4/127.0.0.1/tcp/0"]


class _OnlyListed(Membership):
    """A roster with fixed members."""

    enforced = True

    def __init__(self, members: set[str]):
        self.members = members

    def allows(self, peer_id: str, span: tuple[int, int] | None = None) -> bool:
        return peer_id in self.members


@pytest.mark.timeout(120)
def test_malformed_requests_are_refused(tiny_checkpoint: Callable[..., Path]) -> None:
    ckpt = tiny_checkpoint("llama", layers=4)
    spec = tiny_spec(ckpt, "bad", [0, 4])
    node = InProcessNode.start("bad")
    dht = node.dht
    client = hivemind.DHT(start=True, host_maddrs=LOCAL, initial_peers=dht.get_visible_maddrs())
    server, announcer = in_process_server(spec, spec.spans[0], node, request_wait=1.0)
    server.start(catch_up=False)
    try:
        p2p = RemoteExpertWorker.run_coroutine(client.replicate_p2p())
        remote = RemoteSpan(p2p, str(dht.peer_id), server.uid, timeout=20)
        before = export_lora_state(server.module)
        good, mb = torch.randn(2, 16, 32), ("trainer", 0)
        cases = {
            "shape [2, 15, 32]": torch.randn(2, 15, 32),
            "dtype float64": torch.randn(2, 16, 32, dtype=torch.float64),
            "NaN or Inf": torch.full((2, 16, 32), float("nan")),
        }
        for expected, tensor in cases.items():
            with pytest.raises(RemoteCallError, match=expected.replace("[", r"\[").replace("]", r"\]")):
                remote.forward(0, mb, tensor)
            with pytest.raises(RemoteCallError, match="hidden_states|grad_outputs"):
                remote.backward(0, mb, tensor, torch.randn(2, 16, 32))
        with pytest.raises(RemoteCallError, match="grad_outputs contains NaN or Inf"):
            remote.backward(0, mb, torch.full((2, 16, 32), float("inf")), good)
        with pytest.raises(RemoteCallError, match="TimeoutError: span 0-4 is still at epoch 0"):
            remote.forward(7, mb, good)  # a step the replica has not reached (waits request_wait, then says so)
        with pytest.raises(RemoteCallError, match="metadata step must be an int"):
            remote._run("rpc_forward", -1, mb, [good], good)
        assert export_lora_state(server.module).keys() == before.keys()
        assert all(torch.equal(before[k], v) for k, v in export_lora_state(server.module).items())
        assert server.samples_trained == 0
        out = remote.forward(0, mb, good)  # the server still answers good requests
        assert out.shape == good.shape and torch.isfinite(out).all()
        grad_in = remote.backward(0, mb, torch.randn(2, 16, 32), good)
        assert grad_in.shape == good.shape and server.samples_trained == 2
        # a backward whose forward ran elsewhere is recomputed from the inputs the client resends
        remote.backward(0, ("trainer", 1), torch.randn(2, 16, 32), good)
        assert server.samples_trained == 4
        with server.group.lock:
            server.group._advance(1)
        with pytest.raises(RemoteStaleStepError):
            remote.forward(0, mb, good)  # step 0 is over

        # where a roster decides, a caller that is not listed is refused before its request is read; a request
        # still being sent when the refusal closes the stream gets the refusal, not "Connection lost"
        server.members = _OnlyListed({"someone-else"})
        for size in (2, 4096):  # 8 MiB: far more than the socket buffers hold
            with pytest.raises(RemoteCallError, match="NOT_A_MEMBER"):
                remote.forward(1, (str(client.peer_id), 0), torch.randn(size, 16, 32))
        assert str(client.peer_id) in server.refused_callers and server.samples_trained == 4
    finally:
        announcer.stop(leave=False)
        server.shutdown()
        client.shutdown()
        dht.shutdown()
