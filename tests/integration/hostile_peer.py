"""A hostile volunteer for tests: the real ``swarm peer``, except that its span's gradients are poisoned before
every all-reduce: multiplied by 100 (``HOSTILE_GRADIENTS=x100``, the default) or sign-flipped (``flip``). It
declares the norm and sketch of what it sends, as honest peers do.

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
_FACTOR = {"x100": 100.0, "flip": -1.0}[os.environ.get("HOSTILE_GRADIENTS", "x100")]


def _poisoned_take(self: Any, contents: Any, like: list[torch.nn.Parameter]) -> tuple[list[torch.Tensor], int]:
    sums, samples = _honest_take(self, contents, like)
    return [s * _FACTOR for s in sums], samples


server.GradientStore.take = _poisoned_take  # type: ignore[method-assign]

if __name__ == "__main__":
    main()
