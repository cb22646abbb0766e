"""Request checks shared by the handlers; each failure names the field and what is allowed."""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Sequence

import grpc

from swarm.config import RoundSpec, SpanRange
from swarm.keys import MAX_SPEC_NONCE
from swarm.proto import coordinator_pb2 as pb


class HandlerError(Exception):
    """A request that must fail with gRPC status ``code``; the servicer aborts the call with it."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> HandlerError:
    return HandlerError(grpc.StatusCode.INVALID_ARGUMENT, message)


_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def check_name(field: str, value: str) -> str:
    """Peer ids and versions become file names: letters, digits, '.', '-', '_' (1-128 chars)."""
    if not value:
        raise invalid(f"{field} must be non-empty")
    if not _NAME_RE.match(value) or value in (".", ".."):
        raise invalid(f"{field} {value[:64]!r} may only use letters, digits, '.', '-', '_' (1-128 chars)")
    return value


MAX_MULTIADDRS, MAX_MULTIADDR_CHARS = 16, 256


def check_multiaddrs(addrs: Sequence[str], field: str = "multiaddrs") -> None:
    """At most :data:`MAX_MULTIADDRS` entries, each non-blank and at most :data:`MAX_MULTIADDR_CHARS` chars."""
    if len(addrs) > MAX_MULTIADDRS:
        raise invalid(f"{field}: at most {MAX_MULTIADDRS}, got {len(addrs)}")
    for i, addr in enumerate(addrs):
        if not addr.strip() or len(addr) > MAX_MULTIADDR_CHARS:
            raise invalid(f"{field}[{i}] must be a multiaddr such as /ip4/1.2.3.4/tcp/31337 "
                          f"(1-{MAX_MULTIADDR_CHARS} chars)")  # fmt: skip


def check_nonce(nonce: bytes) -> bytes:
    """A request's ``spec_nonce``: at most :data:`swarm.keys.MAX_SPEC_NONCE` bytes."""
    if len(nonce) > MAX_SPEC_NONCE:
        raise invalid(f"spec_nonce has {len(nonce)} bytes; at most {MAX_SPEC_NONCE}")
    return nonce


def check_count(field: str, value: int, *, minimum: int = 0) -> int:
    if value < minimum:
        raise invalid(f"{field} must be >= {minimum}, got {value}")
    return value


def check_real(field: str, value: float, *, minimum: float | None = None) -> float:
    if not math.isfinite(value):
        raise invalid(f"{field} must be a finite number, got {value}")
    if minimum is not None and value < minimum:
        raise invalid(f"{field} must be >= {minimum:g}, got {value}")
    return value


def span_index(spec: RoundSpec, span: pb.Span, field: str = "span") -> int:
    """Index of ``span`` among the round's spans, or INVALID_ARGUMENT listing them."""
    for i, s in enumerate(spec.spans):
        if (s.start, s.end) == (span.start, span.end):
            return i
    allowed = ", ".join(f"[{s.start}, {s.end})" for s in spec.spans)
    raise invalid(f"{field} [{span.start}, {span.end}) is not one of round {spec.round_id!r}'s spans: {allowed}")


def span_message(span: SpanRange) -> pb.Span:
    return pb.Span(start=span.start, end=span.end)


_SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


def check_safetensors(data: bytes, field: str = "safetensors") -> dict[str, dict]:
    """Parse and check a safetensors file's header without loading tensors; returns the tensor table.

    Checks: header length and JSON, each tensor's dtype, shape and byte range, and that the
    ranges tile the data section exactly.
    """
    if len(data) < 8:
        raise invalid(f"{field} is {len(data)} bytes: not a safetensors file (needs an 8-byte header size)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise invalid(f"{field} header claims {n} bytes but the file has {len(data) - 8} after the size")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise invalid(f"{field} header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise invalid(f"{field} header must be a JSON object")
    header.pop("__metadata__", None)
    if not header:
        raise invalid(f"{field} holds no tensors")
    body = len(data) - 8 - n
    ranges = []
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise invalid(f"{field} tensor {name!r} needs dtype, shape and data_offsets") from None
        if dtype not in _SAFETENSORS_DTYPES:
            raise invalid(f"{field} tensor {name!r} has unknown dtype {dtype!r}")
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise invalid(f"{field} tensor {name!r} has a bad shape {shape!r}")
        if math.prod(shape) * _SAFETENSORS_DTYPES[dtype] != end - begin or not 0 <= begin <= end <= body:
            raise invalid(f"{field} tensor {name!r}: data_offsets {[begin, end]} do not fit dtype and shape")
        ranges.append((begin, end))
    ranges.sort()
    covered = 0
    for begin, end in ranges:
        if begin != covered:
            raise invalid(f"{field} tensor data overlaps or leaves gaps at byte {covered}")
        covered = end
    if covered != body:
        raise invalid(f"{field} has {body - covered} trailing bytes after the tensors")
    return header
