"""The coordinator's hivemind DHT node: a child process (plus its p2pd) that dies with the coordinator.

hivemind runs the DHT in a forked process that spawns the ``p2pd`` daemon. If the coordinator is
killed (SIGKILL, OOM) both would live on, holding their port. Here the DHT process puts itself and
its p2pd in their own process group and asks Linux to send it SIGTERM when its parent dies
(``PR_SET_PDEATHSIG``); on SIGTERM it takes the whole group down. ``dht.shutdown()`` is unchanged.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from types import FrameType

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils.crypto import RSAPrivateKey

from coordinator.config import CoordinatorConfig

_PR_SET_PDEATHSIG = 1


def _end_group(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.killpg(0, signal.SIGTERM)  # p2pd and this process


class OwnedDHT(hivemind.DHT):
    """A ``hivemind.DHT`` whose process (and p2pd) exits when the process that started it dies."""

    def run_in_background(self, await_ready: bool = True, timeout: float | None = None) -> None:
        self._owner_pid = os.getpid()
        super().run_in_background(await_ready=await_ready, timeout=timeout)

    def run(self) -> None:  # in the DHT process
        os.setpgid(0, 0)
        signal.signal(signal.SIGTERM, _end_group)  # replaces a handler inherited from the coordinator
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != self._owner_pid:  # the coordinator died before prctl took effect
            return
        super().run()


def start_dht(config: CoordinatorConfig) -> tuple[hivemind.DHT, bytes]:
    """Start the DHT node; call before the gRPC server starts threads (the node is a forked process).

    Returns the node and the subkey (owner marker) of the RSA key it signs its records with: what it stores
    under that subkey, nobody else can overwrite (hivemind's ``RSASignatureValidator``).
    """
    validator = RSASignatureValidator(RSAPrivateKey())
    try:
        dht = OwnedDHT(
            start=True,
            host_maddrs=list(config.effective_dht_host_maddrs),
            announce_maddrs=list(config.dht_announce_maddrs) or None,
            initial_peers=list(config.dht_initial_peers),
            record_validators=[validator],
        )
        return dht, validator.local_public_key
    except Exception as e:  # hivemind raises several types for bad maddrs or unreachable peers
        raise OSError(
            f"cannot start the DHT node on {list(config.effective_dht_host_maddrs)} with initial peers "
            f"{list(config.dht_initial_peers)}: {type(e).__name__}: {e} (fix --dht-host-maddrs / "
            "--dht-initial-peers, or run with --no-dht)"
        ) from e


def visible_maddrs(dht: hivemind.DHT) -> tuple[str, ...]:
    """Full multiaddrs (with ``/p2p/<peer id>``) other nodes use to join through this one."""
    return tuple(str(a) for a in dht.get_visible_maddrs())
