"""A request rate per peer address for callers nothing vouches for (``limits.unverified_*``).

``POST /v1/admission`` takes no token (the API server cannot send one), so
without client certificates anyone who reaches the port may ask, and every
answer is an audit entry written with an fsync. A token bucket per peer
bounds what one address can cost; a caller with a valid token or client
certificate is not limited here (it can be revoked instead).

IPv6 peers are counted per /64: one host usually holds a whole /64, and
counting single addresses would give it 2**64 buckets. The table keeps the
``MAX_PEERS`` most recently seen peers: a peer pushed out starts again with
a full bucket, which bounds memory, not a caller with that many addresses.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable

MAX_PEERS = 10_000


def peer_key(remote: str) -> tuple[str, bool]:
    """The bucket of ``remote`` and whether it is a loopback address."""
    try:
        ip = ipaddress.ip_address(remote.partition("%")[0])
    except ValueError:
        return remote, False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, 64), strict=False)), ip.is_loopback
    return str(ip), ip.is_loopback


class PeerRateLimit:
    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 max_peers: int = MAX_PEERS) -> None:
        self._clock = clock
        self._max = max_peers
        # peer -> (tokens left, when counted); least recently seen first.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, rate: float, burst: int) -> float:
        """Take one request from ``key``'s bucket: 0.0 if it may go on,
        otherwise the seconds until it may."""
        now = self._clock()
        tokens, at = self._buckets.pop(key, (float(burst), now))
        tokens = min(float(burst), tokens + (now - at) * rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / rate
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
        return wait


__all__ = ["MAX_PEERS", "PeerRateLimit", "peer_key"]
