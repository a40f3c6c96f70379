"""The wire format: msgpack maps, numpy arrays as raw bytes with dtype and shape, never pickle.

An array travels as ``{"__ndarray__": True, "dtype": "float32", "shape": [1, 2, 20], "data": b""}``
(little-endian numeric dtypes only). Every message is a map with a ``type``; replies carry
``ok: true``, or are ``{"type": "error", "ok": false, "error": ..., "expected": ..., "got": ...}``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np

PROTOCOL_VERSION = 1
DEFAULT_MAX_MESSAGE_BYTES = 16 * 2**20
ARRAY_MARKER = "__ndarray__"
ARRAY_KEYS = frozenset({ARRAY_MARKER, "dtype", "shape", "data"})
# Numeric dtypes only: no object, string or structured dtypes can come off the wire.
ALLOWED_DTYPES = frozenset(
    {
        "bool",
        "uint8",
        "int8",
        "uint16",
        "int16",
        "uint32",
        "int32",
        "uint64",
        "int64",
        "float16",
        "float32",
        "float64",
    }
)
MAX_NDIM = 8

# Fields of each request type: (required, optional).
REQUEST_FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "hello": (frozenset({"type"}), frozenset({"protocol"})),
    "health": (frozenset({"type"}), frozenset()),
    "reset": (frozenset({"type"}), frozenset()),
    "observe": (frozenset({"type", "obs"}), frozenset()),
    "infer": (frozenset({"type", "obs"}), frozenset({"mode", "steps", "sampler", "seed"})),
}
INFER_MODES = ("window", "step")


class ProtocolError(ValueError):
    """A malformed or out-of-order message: says what was expected and what came."""

    def __init__(self, error: str, expected: Any = None, got: Any = None):
        super().__init__(error)
        self.error, self.expected, self.got = error, expected, got

    def reply(self, request: str | None) -> dict[str, Any]:
        return error_reply(request, self.error, self.expected, self.got)


def error_reply(request: str | None, error: str, expected: Any = None, got: Any = None) -> dict:
    """The reply to a failed request (``request`` is its type, when known)."""
    return {
        "type": "error",
        "ok": False,
        "request": request,
        "error": error,
        "expected": expected,
        "got": got,
    }


def key_names(keys: Any) -> list[str]:
    """Map keys as sorted strings, for error replies (keys may be str or bytes)."""
    return sorted(k if isinstance(k, str) else repr(k) for k in keys)


def encode_array(array: np.ndarray) -> dict[str, Any]:
    array = np.ascontiguousarray(array)
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    return {
        ARRAY_MARKER: True,
        "dtype": dtype.name,
        "shape": list(array.shape),
        "data": array.astype(dtype, copy=False).tobytes(),
    }


def decode_array(obj: Any, name: str) -> np.ndarray:
    """An array from its wire form, checking every field; ``name`` says where it was found."""
    if not isinstance(obj, Mapping) or obj.get(ARRAY_MARKER) is not True:
        raise ProtocolError(
            f"{name} must be an array",
            expected=f"a map {{{ARRAY_MARKER}: true, dtype: str, shape: [int], data: bytes}}",
            got=type(obj).__name__,
        )
    if set(obj) != ARRAY_KEYS:
        raise ProtocolError(
            f"{name} has the wrong array fields",
            expected=sorted(ARRAY_KEYS),
            got=key_names(obj),
        )
    dtype, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
        raise ProtocolError(
            f"{name} has an unsupported dtype",
            expected=sorted(ALLOWED_DTYPES),
            got=repr(dtype)[:100],
        )
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise ProtocolError(
            f"{name} has an invalid shape",
            expected=f"a list of at most {MAX_NDIM} non-negative ints",
            got=repr(shape)[:200],
        )
    if not isinstance(data, bytes):
        raise ProtocolError(f"{name} data must be bytes", expected="bytes", got=type(data).__name__)
    itemsize = np.dtype(dtype).itemsize
    if len(data) != math.prod(shape) * itemsize:
        raise ProtocolError(
            f"{name} data size does not match its shape and dtype",
            expected=f"{math.prod(shape) * itemsize} bytes ({shape} x {itemsize})",
            got=f"{len(data)} bytes",
        )
    return np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)


def _to_wire(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return encode_array(obj)
    if isinstance(obj, Mapping):
        return {k: _to_wire(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_wire(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def pack(message: Mapping[str, Any]) -> bytes:
    """msgpack bytes of a message whose values may hold numpy arrays."""
    return msgpack.packb(_to_wire(message), use_bin_type=True)


def unpack(raw: bytes | str, max_bytes: int) -> dict[str, Any]:
    """The map of one incoming message; arrays stay in wire form until checked by the reader."""
    if isinstance(raw, str):
        raise ProtocolError(
            "messages must be binary msgpack frames", expected="binary frame", got="text frame"
        )
    if len(raw) > max_bytes:
        raise ProtocolError(
            "message too large", expected=f"at most {max_bytes} bytes", got=f"{len(raw)} bytes"
        )
    try:
        message = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:
        raise ProtocolError(
            "message is not valid msgpack", expected="one msgpack map", got=str(exc)[:200]
        ) from None
    if not isinstance(message, dict):
        raise ProtocolError(
            "message must be a msgpack map", expected="map", got=type(message).__name__
        )
    return message


def check_fields(message: Mapping[str, Any]) -> str:
    """The message's type, once its type is known and it has exactly the fields of that type."""
    kind = message.get("type")
    if not isinstance(kind, str) or kind not in REQUEST_FIELDS:
        raise ProtocolError(
            "unknown message type", expected=sorted(REQUEST_FIELDS), got=repr(kind)[:100]
        )
    required, optional = REQUEST_FIELDS[kind]
    missing, extra = required - set(message), set(message) - required - optional
    if missing or extra:
        raise ProtocolError(
            f"{kind!r} message has "
            + ", ".join(
                part
                for part in (
                    f"missing fields {sorted(missing)}" if missing else "",
                    f"unknown fields {key_names(extra)}" if extra else "",
                )
                if part
            ),
            expected={"required": sorted(required), "optional": sorted(optional)},
            got=key_names(message),
        )
    return kind


def decode_response(raw: bytes) -> dict[str, Any]:
    """A reply map with its arrays decoded (client side; replies are trusted to be well formed)."""
    message = msgpack.unpackb(raw, raw=False)
    return {
        k: decode_array(v, k).copy() if isinstance(v, dict) and ARRAY_MARKER in v else v
        for k, v in message.items()
    }
