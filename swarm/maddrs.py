"""Reading multiaddr strings without a multiaddr library (peers send them; parse, never trust)."""

from __future__ import annotations


def tcp_endpoint(addr: str) -> tuple[str, str, int] | None:
    """``(ip4|ip6, host, port)`` of a plain TCP multiaddr (no relay circuit, port 1-65535), else None."""
    parts = addr.strip("/").split("/")
    if len(parts) < 4 or parts[0] not in ("ip4", "ip6") or parts[2] != "tcp" or "p2p-circuit" in parts:
        return None
    try:
        port = int(parts[3])
    except ValueError:
        return None
    return (parts[0], parts[1], port) if 0 < port < 65536 else None


__all__ = ["tcp_endpoint"]
