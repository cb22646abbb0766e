"""A coordinated round where one of three replicas of a span is hostile publishes what the honest swarm trains,
with the adapter's held-out loss within 5% of centralized PEFT on the same micro-batches:

- a replica that poisons its gradients (x100, or sign-flipped at their honest size) is caught in the all-reduce,
  accused by both honest replicas, expelled and named in the round record;
- a replica that returns a wrong average for its part of every all-reduce (x -3) costs no epoch: every replica
  recomputes the average from what the members show; the members then average again in pairs, where the honest
  ones find who made the result wrong: it is accused by both, expelled and named.

Real processes: coordinator (in this process), three span servers of span 2-4 (one of them
``tests.integration.hostile_peer``: the real peer with its gradients scaled x100 or flipped before each
all-reduce, or its averager lying when it reduces) and a trainer hosting span 0-2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from coordinator.state import MemberState
from tests.integration.harness import Peer, coordinated_round, make_spec, wait_for
from tests.integration.test_swarm_exactness import _trainer_data

pytestmark = [pytest.mark.integration, pytest.mark.slow]
EPOCHS, TBS = 6, 64


#: how the hostile replica poisons the all-reduce -> what the honest replicas name it for
POISONS = {"x100": "gradient norm", "flip": "points against the group", "reduce": "pair average"}


@pytest.mark.timeout(480)
@pytest.mark.parametrize("poison", list(POISONS))
def test_a_hostile_replica_is_expelled_named_and_the_round_publishes_the_honest_result(
    tmp_path: Path, demo_base: Path, demo_data: Path, poison: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from swarm.adapter import verify_adapter
    from swarm.keys import load_public_key
    from swarm.reference import centralized_lora

    monkeypatch.setenv("HOSTILE_GRADIENTS", poison)  # read by tests.integration.hostile_peer only
    spec = make_spec(demo_base, demo_data, f"poisoned-{poison}", [0, 2, 4], epochs=EPOCHS, tbs=TBS)
    server, pub_path, common = coordinated_round(tmp_path, spec, roster_interval_s=1.0)
    unused = tmp_path / "unused.json"
    peers: list[Peer] = []
    try:
        for name in ("s1a", "s1b", "x"):
            module = "tests.integration.hostile_peer" if name == "x" else "swarm.cli"
            peers.append(Peer(tmp_path, name, unused, [*common, "--span-index", "1"], use_spec=False, module=module))
        ready = {p.name: p.ready() for p in peers}
        assert all(r["span"] == [2, 4] for r in ready.values()), ready
        hostile = ready["x"]["peer_id"]
        train = demo_data / "train.jsonl"
        trainer = Peer(
            tmp_path,
            "t0",
            unused,
            [*common, "--span-index", "0", "--data", str(train), "--eval-data", str(demo_data / "eval.jsonl")],
            use_spec=False,
        )
        peers.append(trainer)

        adapter = tmp_path / "coord" / "adapters" / "v1"
        wait_for(adapter.is_dir, 400, "the published adapter")
        member = server.ctx.store.get_member(spec.round_id, hostile)
        honest = [server.ctx.store.get_member(spec.round_id, ready[n]["peer_id"]) for n in ("s1a", "s1b")]
        assert all(m is not None and m.state is not MemberState.EXPELLED for m in honest)
        manifest = verify_adapter(adapter, load_public_key(pub_path))
        assert manifest.eval_loss_after < manifest.eval_loss_before
        assert member is not None and member.state is MemberState.EXPELLED, member
        assert POISONS[poison] in member.removed_reason and ready["s1a"]["peer_id"] in member.removed_reason
        assert hostile not in {c.peer_id for c in manifest.contributors}
        if poison == "reduce":  # its wrong parts cost no epoch: every replica recomputed the average
            for p in peers[:2]:
                assert "recomputed the average" in (p.dir / "log.txt").read_text(), f"{p.name} never recomputed"

        # the same micro-batches, grouped into the same steps, trained centrally
        steps = {e["step"]: e for e in trainer.events("step")}
        upto = max(mb["batch_no"] for e in steps.values() for mb in e["microbatches"])
        data, held_out = _trainer_data(spec, train, 0, 1, upto)
        per_step = [[data[mb["batch_no"]] for mb in steps[s]["microbatches"]] for s in sorted(steps)]
        _, reference = centralized_lora(spec, per_step, held_out[: 4 * spec.data.micro_batch_size])
        after = trainer.events("eval")[-1]["loss"]
        print(f"held-out loss: swarm with a {poison} poisoner {after:.4f}, centralized {reference:.4f}, "
              f"{len(steps)} steps; removed: {member.removed_reason}")  # fmt: skip
        assert abs(after - reference) <= 0.05 * reference, f"swarm {after:.4f} vs centralized {reference:.4f}"
        x_log = (peers[2].dir / "log.txt").read_text()
        assert "was removed from round" in x_log, "the expelled peer was not told why"
        status = server.ctx.store.list_members(spec.round_id)
        assert json.dumps([m.peer_id for m in status if m.state is MemberState.EXPELLED]) == json.dumps([hostile])
    finally:
        codes = [p.stop() for p in peers]
        server.stop()
    assert codes == [0] * len(peers), codes
    assert torch.isfinite(torch.tensor(after))
