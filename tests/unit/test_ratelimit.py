"""The per-peer token bucket for unverified callers (limits.unverified_*)."""

from __future__ import annotations

from passguard.web.ratelimit import PeerRateLimit, peer_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_then_the_rate() -> None:
    clock = Clock()
    rl = PeerRateLimit(clock)
    assert [rl.take("a", 2.0, 3) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert rl.take("a", 2.0, 3) == 0.5  # one token every half second
    assert rl.take("b", 2.0, 3) == 0.0  # another peer has its own bucket
    clock.now += 0.5
    assert rl.take("a", 2.0, 3) == 0.0
    assert rl.take("a", 2.0, 3) > 0
    clock.now += 100  # refilled up to the burst, not beyond
    assert [rl.take("a", 2.0, 3) for _ in range(4)][-1] > 0


def test_the_table_is_bounded() -> None:
    rl = PeerRateLimit(Clock(), max_peers=100)
    for n in range(1000):
        rl.take(f"10.0.{n // 256}.{n % 256}", 1.0, 1)
    assert len(rl) == 100


def test_peer_keys() -> None:
    assert peer_key("192.0.2.7") == ("192.0.2.7", False)
    assert peer_key("127.0.0.1") == ("127.0.0.1", True)
    assert peer_key("::1")[1] is True
    # One host's /64 is one bucket; an IPv4-mapped address is the IPv4 one.
    assert peer_key("2001:db8:1:2::5")[0] == peer_key("2001:db8:1:2:ffff::9")[0] == \
        "2001:db8:1:2::/64"
    assert peer_key("::ffff:192.0.2.7") == ("192.0.2.7", False)
    assert peer_key("fe80::1%eth0")[0] == "fe80::/64"
