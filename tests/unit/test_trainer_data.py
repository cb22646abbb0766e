"""A peer joined through a coordinator reads only the data files its volunteer named (SECURITY.md)."""

from __future__ import annotations

import pytest

from peer.config import PeerConfig
from peer.training_loop import trainer_data
from swarm.config import DataSettings

SPEC_DATA = DataSettings(train_path="/home/volunteer/.ssh/id_rsa", eval_path="/etc/shadow", seq_len=16)


def test_a_coordinated_peer_never_reads_the_paths_a_spec_names() -> None:
    cfg = PeerConfig(coordinator="c:1", data_path="mine.jsonl")
    got = trainer_data(SPEC_DATA, cfg)
    assert (got.train_path, got.eval_path) == ("mine.jsonl", "")  # held out from its own data
    assert got.seq_len == 16  # the rest of the spec's data settings apply
    got = trainer_data(SPEC_DATA, cfg.model_copy(update={"eval_data_path": "held.jsonl"}))
    assert (got.train_path, got.eval_path) == ("mine.jsonl", "held.jsonl")
    with pytest.raises(ValueError, match="pass --data FILE$"):
        trainer_data(SPEC_DATA, PeerConfig(coordinator="c:1", trainer=True))


def test_a_spec_file_the_volunteer_passed_is_theirs() -> None:
    got = trainer_data(SPEC_DATA, PeerConfig(round_spec="mine.json"))
    assert (got.train_path, got.eval_path) == (SPEC_DATA.train_path, SPEC_DATA.eval_path)
    got = trainer_data(SPEC_DATA, PeerConfig(round_spec="mine.json", data_path="a", eval_data_path="b"))
    assert (got.train_path, got.eval_path) == ("a", "b")
    with pytest.raises(ValueError, match="or set data.train_path"):
        trainer_data(DataSettings(), PeerConfig(round_spec="mine.json"))
