"""A hostile volunteer for tests: the real ``swarm peer``, except that its span's gradients are multiplied by 100
before every all-reduce (what a poisoner does; it declares the norm of what it sends, as honest peers do).

Run as ``python -m tests.integration.hostile_peer peer ...`` with the arguments of ``swarm peer``
(``tests.integration.harness.Peer(..., module="tests.integration.hostile_peer")``).
"""

from __future__ import annotations

from typing import Any

import torch

from peer import server
from swarm.cli import main

_honest_take = server.GradientStore.take


def _poisoned_take(self: Any, contents: Any, like: list[torch.nn.Parameter]) -> tuple[list[torch.Tensor], int]:
    sums, samples = _honest_take(self, contents, like)
    return [s * 100 for s in sums], samples


server.GradientStore.take = _poisoned_take  # type: ignore[method-assign]

if __name__ == "__main__":
    main()
