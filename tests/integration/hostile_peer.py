"""A hostile volunteer for tests: the real ``swarm peer``, except that its span's gradients are poisoned before
every all-reduce: multiplied by 100 (``HOSTILE_GRADIENTS=x100``, the default) or sign-flipped (``flip``). It
declares the norm and sketch of what it sends, as honest peers do. With ``HOSTILE_GRADIENTS=reduce`` it sends
honest gradients but returns a wrong average (x -3) for its part of every all-reduce (:func:`lie_when_reducing`).

Run as ``python -m tests.integration.hostile_peer peer ...`` with the arguments of ``swarm peer``
(``tests.integration.harness.Peer(..., module="tests.integration.hostile_peer")``).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from peer import server
from swarm.cli import main

_honest_take = server.GradientStore.take
_MODE = os.environ.get("HOSTILE_GRADIENTS", "x100")
_FACTOR = {"x100": 100.0, "flip": -1.0, "reduce": 1.0}[_MODE]


def _poisoned_take(self: Any, contents: Any, like: list[torch.nn.Parameter]) -> tuple[list[torch.Tensor], int]:
    sums, samples = _honest_take(self, contents, like)
    return [s * _FACTOR for s in sums], samples


def lie_when_reducing(factor: float = -3.0) -> Any:
    """Make the averagers started from now on (hivemind forks them) return ``factor`` x the true average for the
    part of the all-reduce they reduce; returns the honest method, to put back (``TensorPartReducer``)."""
    from hivemind.averaging.partition import TensorPartReducer

    honest = TensorPartReducer.accumulate_part

    async def lying(self: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        return await honest(self, *args, **kwargs) * factor  # type: ignore[no-any-return]

    TensorPartReducer.accumulate_part = lying  # type: ignore[method-assign]
    return honest


if __name__ == "__main__":  # importing this module (for lie_when_reducing) changes nothing
    server.GradientStore.take = _poisoned_take  # type: ignore[method-assign]
    if _MODE == "reduce":
        lie_when_reducing()
    main()
