"""An outsider in a public round's DHT (not a member of the coordinator's signed roster) changes nothing.

Coordinator + two honest peers (a span server and a trainer) in real processes; the outsider is a real hivemind
DHT node with a real span server in the test process. It announces a server of span 0-2 with a throughput far
above the honest one (every router would send it nearly all micro-batches), publishes a trainer step record that
never closes (replicas would wait for it forever), calls the honest server's forward directly, and writes a
roster signed by another key. The round must publish an adapter that verifies and lowers held-out loss, with no
micro-batch sent to the outsider and its direct call refused.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.utils import get_dht_time

from peer.inprocess import InProcessNode
from swarm.config import SpanRange
from tests.integration.harness import Peer, coordinated_round, in_process_server, make_spec, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.timeout(420)
def test_an_outsider_is_not_routed_to_served_or_waited_for(tmp_path: Path, demo_base: Path, demo_data: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from hivemind.dht.crypto import RSASignatureValidator

    from peer.announce import Announcer
    from peer.remote import RemoteCallError, RemoteSpan
    from peer.step_records import StepRecorder
    from swarm.adapter import verify_adapter
    from swarm.keys import load_public_key
    from swarm.roster import roster_key, sign_roster

    spec = make_spec(demo_base, demo_data, "outsider", [0, 2, 4], epochs=3)
    # The outsider's node starts before the coordinator: hivemind forks a DHT's process, and forking this test
    # process while the coordinator's threads run can hang the child. The coordinator's DHT joins it.
    node = InProcessNode.start(spec.round_id)
    outsider = node.dht
    server, pub_path, common = coordinated_round(
        tmp_path, spec, roster_interval_s=1.0, dht_initial_peers=tuple(str(m) for m in outsider.get_visible_maddrs())
    )
    peers: list[Peer] = [Peer(tmp_path, "server0", tmp_path / "unused.json", common, use_spec=False)]
    cleanup: list = []
    try:
        ready = peers[0].ready()
        span = spec.spans[spec.span_index(SpanRange(start=ready["span"][0], end=ready["span"][1]))]
        # the outsider claims the same span (the one the trainer needs from the network)
        fake, _ = in_process_server(spec, span, node, request_wait=5.0)
        announcer = Announcer(outsider, spec.round_id, partial(fake.announcement, 1e6), period=1.0,
                              identity=node.identity, private_key=node.key)  # fmt: skip
        recorder = StepRecorder(outsider, spec.round_id, node.identity, private_key=node.key)
        served: list[int] = []
        fake.on_served = lambda kind, n, seconds: served.append(n)
        fake.start(catch_up=False)
        announcer.start()
        cleanup += [recorder.finish, partial(announcer.stop, leave=False), fake.shutdown]
        recorder.open(0)  # "a trainer still working on step 0": never closed
        forged = {"format": 1, "round_id": spec.round_id, "state": "training", "time": 1e12, "spans": [[0, 2], [2, 4]],
                  "peers": [{"peer_id": str(outsider.peer_id), "span": list(ready["span"]), "throughput": 1e6,
                             "epoch": 0, "multiaddrs": []}]}  # fmt: skip
        outsider.store(roster_key(spec.round_id), sign_roster(forged, Ed25519PrivateKey.generate()),
                       subkey=RSASignatureValidator(node.key).local_public_key,
                       expiration_time=get_dht_time() + 2)  # fmt: skip

        data = ["--data", str(demo_data / "train.jsonl"), "--eval-data", str(demo_data / "eval.jsonl")]
        peers.append(Peer(tmp_path, "trainer0", tmp_path / "unused.json", [*common, *data], use_spec=False))

        # the outsider calls the honest span server directly: refused before any compute
        p2p = RemoteExpertWorker.run_coroutine(outsider.replicate_p2p())
        remote = RemoteSpan(p2p, ready["peer_id"], fake.uid, timeout=20)
        x = torch.randn(2, spec.data.seq_len, fake.hidden)
        with pytest.raises(RemoteCallError, match="NOT_A_MEMBER"):
            remote.forward(0, (str(outsider.peer_id), 0), x)

        adapter = tmp_path / "coord" / "adapters" / "v1"
        wait_for(adapter.is_dir, 300, "the published adapter")
        manifest = verify_adapter(adapter, load_public_key(pub_path))
        assert manifest.eval_loss_after < manifest.eval_loss_before
        assert not served, f"the outsider's span server was sent {sum(served)} samples"
        assert fake.samples_trained == 0
        trainer_log = (peers[1].dir / "log.txt").read_text()
        assert "failing over" not in trainer_log, "the trainer tried a server that is not in the roster"
    finally:
        for stop in cleanup:
            stop()
        codes = [p.stop() for p in peers]
        server.stop()
        outsider.shutdown()
    assert codes == [0] * len(peers), codes
