"""Shared core of loraswarm: configs, spans with LoRA, the adapter format, DHT schemas, metrics.

Importing ``swarm`` (and ``swarm.config``) does not import torch.
"""

__version__ = "0.1.0"

from swarm.quantize import quiet_bitsandbytes  # noqa: E402 (torch-free)

quiet_bitsandbytes()
