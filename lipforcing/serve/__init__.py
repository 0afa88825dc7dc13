"""``lipforcing serve``'s library side: the WebSocket protocol (:mod:`~lipforcing.serve.protocol`), the aiohttp
server (:mod:`~lipforcing.serve.server`) and its Prometheus metrics.  Needs the ``serve`` extra (aiohttp)."""
from __future__ import annotations

from lipforcing._lazy import lazy_attributes

_LAZY = {
    "LipSyncServer": "lipforcing.serve.server",
    "AvatarStore": "lipforcing.serve.server",
    "serve": "lipforcing.serve.server",
    "ProtocolError": "lipforcing.serve.protocol",
    "encode_frame": "lipforcing.serve.protocol",
    "decode_frame": "lipforcing.serve.protocol",
}

__all__ = list(_LAZY)

__getattr__ = lazy_attributes(globals(), _LAZY)
