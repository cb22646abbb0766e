"""Programs the netns tests run inside a namespace (stdlib + hivemind only; prints one JSON line as its result).

node.py dht OUT_FILE KEY WANT [INITIAL_PEER]   a DHT node: store KEY, wait until WANT is readable
node.py sink PORT                              accept one TCP connection, count its bytes
node.py source HOST PORT MBYTES                send MBYTES to HOST:PORT
node.py connect HOST PORT                      try to open a TCP connection (2 s timeout)
"""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Callable


def dht(out_file: str, key: str, want: str, initial: str = "") -> dict[str, object]:
    import hivemind
    from hivemind.utils.timed_storage import get_dht_time

    node = hivemind.DHT(
        start=True, host_maddrs=["/ip4/0.0.0.0/tcp/0"], initial_peers=[initial] if initial else [], use_auto_relay=False
    )
    with open(out_file + ".tmp", "w") as f:
        json.dump([str(m) for m in node.get_visible_maddrs()], f)
    import os

    os.replace(out_file + ".tmp", out_file)
    deadline, found = time.monotonic() + 90, None
    started = time.monotonic()
    while time.monotonic() < deadline and found is None:
        node.store(key, f"hello from {key}", expiration_time=get_dht_time() + 120)
        got = node.get(want, latest=True)
        found = got.value if got is not None else None
        if found is None:
            time.sleep(0.5)
    time.sleep(5)  # let the other node read our key too before we leave
    node.shutdown()
    return {"found": found, "seconds": round(time.monotonic() - started, 2)}


def sink(port: str) -> dict[str, object]:
    server = socket.create_server(("0.0.0.0", int(port)))
    print(json.dumps({"listening": int(port)}), flush=True)
    conn, addr = server.accept()
    total, first, last = 0, None, None
    while chunk := conn.recv(1 << 16):
        now = time.monotonic()
        first = first or now
        last = now
        total += len(chunk)
    return {"bytes": total, "seconds": (last or 0) - (first or 0), "peer": addr[0]}


def source(host: str, port: str, mbytes: str) -> dict[str, object]:
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(b"x" * int(float(mbytes) * 1_000_000))
    return {"sent": True}


def connect(host: str, port: str) -> dict[str, object]:
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
        return {"connected": True}
    except OSError as exc:
        return {"connected": False, "error": type(exc).__name__ + ": " + str(exc)}


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    roles: dict[str, Callable[..., dict[str, object]]] = {
        "dht": dht,
        "sink": sink,
        "source": source,
        "connect": connect,
    }
    result = roles[role](*args)
    print(json.dumps(result), flush=True)
