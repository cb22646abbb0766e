"""peer.trainer.in_flight: micro-batches in flight, (item, result) pairs in order, bounded depth, clean stop, errors kept."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from peer.trainer import StepResult, in_flight


class Recorder:
    def __init__(self, delay: float = 0.02, fail_on: int | None = None):
        self.delay, self.fail_on = delay, fail_on
        self.running = self.most = 0
        self.threads: set[str] = set()
        self.lock = threading.Lock()

    def step(self, batch: torch.Tensor) -> StepResult:  # any item type works
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.threads.add(threading.current_thread().name)
        time.sleep(self.delay * (1 + int(batch[0]) % 3))  # uneven durations: completion order differs
        with self.lock:
            self.running -= 1
        if self.fail_on is not None and int(batch[0]) == self.fail_on:
            raise RuntimeError(f"batch {self.fail_on} failed")
        return StepResult(loss=float(batch[0]), samples=1, tokens=1, seconds=0.0)


def batches(n: int) -> list[torch.Tensor]:
    return [torch.tensor([i]) for i in range(n)]


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_results_come_back_in_order_with_at_most_depth_in_flight(depth: int) -> None:
    rec = Recorder()
    losses = [f.result().loss for _, f in in_flight(rec.step, batches(10), depth)]
    assert losses == [float(i) for i in range(10)]
    assert rec.most == depth
    if depth == 1:
        assert rec.threads == {threading.current_thread().name}  # no worker thread for one at a time
    else:
        assert threading.current_thread().name not in rec.threads


def test_stop_ends_submission_and_drains_what_is_in_flight() -> None:
    rec, started = Recorder(), []

    def stop(n_in_flight: int) -> bool:
        started.append(n_in_flight)
        return len(started) > 5  # the 6th check stops: 5 micro-batches were started

    done = [f.result().loss for _, f in in_flight(rec.step, batches(50), 3, stop=stop)]
    assert done == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert rec.running == 0


@pytest.mark.parametrize("depth", [1, 3])
def test_an_error_is_delivered_with_its_micro_batch_and_the_others_go_on(depth: int) -> None:
    rec = Recorder(fail_on=2)
    outcomes = []
    for _, future in in_flight(rec.step, batches(6), depth):
        try:
            outcomes.append(future.result().loss)
        except RuntimeError as exc:
            outcomes.append(str(exc))
    assert outcomes == [0.0, 1.0, "batch 2 failed", 3.0, 4.0, 5.0]
