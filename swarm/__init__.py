"""Shared core of loraswarm: configs, spans with LoRA, the adapter format, DHT schemas, metrics.

Importing ``swarm`` (and ``swarm.config``) does not import torch.
"""

__version__ = "0.1.0"


def software_compatible(peer_version: str, required: str) -> bool:
    """Same major.minor (``0.1.3`` works with ``0.1.0``; ``0.2.0`` does not)."""
    return peer_version.split(".")[:2] == required.split(".")[:2] and peer_version.count(".") >= 1


from swarm.quantize import quiet_bitsandbytes  # noqa: E402 (torch-free)

quiet_bitsandbytes()
