"""A trainer-only peer (``--trainer-only``: a GPU too small for any span, or a volunteer who brings data) joins a
coordinated round without hosting a span, trains it through the others' span servers, and the round publishes."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from tests.integration.harness import Peer, coordinated_round, make_spec, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.timeout(480)
def test_a_trainer_that_hosts_no_span_trains_a_round_to_publication(
    tmp_path: Path, demo_base: Path, demo_data: Path
) -> None:
    from swarm.adapter import verify_adapter
    from swarm.keys import load_public_key

    spec = make_spec(demo_base, demo_data, "trainer-only", [0, 2, 4], epochs=3)
    server, pub_path, joins = coordinated_round(tmp_path, spec)
    peers: list[Peer] = []
    try:
        common = [*joins, "--metrics-port", "0"]
        for name in ("server0", "server1"):  # span hosts that train nothing
            peers.append(Peer(tmp_path, name, tmp_path / "unused.json", [*common, "--no-trainer"], use_spec=False))
        data = ["--data", str(demo_data / "train.jsonl"), "--eval-data", str(demo_data / "eval.jsonl")]
        trainer = Peer(tmp_path, "trainer", tmp_path / "unused.json", [*common, "--trainer-only", *data],
                       use_spec=False)  # fmt: skip
        peers.append(trainer)
        assert sorted(tuple(p.ready()["span"]) for p in peers[:2]) == [(0, 2), (2, 4)]
        ready = trainer.ready()
        assert ready["span"] is None and ready["epoch"] is None
        assert "a trainer that hosts no span (--trainer-only)" in (trainer.dir / "log.txt").read_text()
        health = json.loads(
            urllib.request.urlopen(f"http://127.0.0.1:{ready['metrics_port']}/health", timeout=10).read()
        )
        assert health["span"] is None and health["roster"]["listed"], health

        adapter = tmp_path / "coord" / "adapters" / "v1"
        wait_for(adapter.is_dir, 360, "the published adapter")
        manifest = verify_adapter(adapter, load_public_key(pub_path))
        assert manifest.eval_loss_after < manifest.eval_loss_before
        evals = trainer.events("eval")
        print(f"trainer-only round: eval {manifest.eval_loss_before:.4f} -> {manifest.eval_loss_after:.4f}; "
              f"trainer evals {[round(e['loss'], 4) for e in evals]}")  # fmt: skip
        members = {m.peer_id: m for m in server.ctx.store.list_members("trainer-only")}
        trainer_record = members[ready["peer_id"]]
        assert trainer_record.span_index == -1 and trainer_record.session_samples > 0
    finally:
        codes = [p.stop() for p in peers]
        server.stop()
    assert codes == [0] * len(peers), codes
