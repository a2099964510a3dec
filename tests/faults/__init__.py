"""Fault injection: broken proxies, a broken control plane, a broken state directory.

``hostile.HostileProxies`` is a raw TCP server whose every path prefix
misbehaves in one way (hang, reset, truncate, stream forever, trickle, lie
about its format, ...). The tests run a real passguard ``Daemon`` in-process
against those, real Envoys and the stand-in Kuma CP (``tests.kuma_cp``), and
check that the daemon stays healthy, that the other targets keep their
cadence and their verdicts, and that each broken target is reported unknown
with its reason while the gate follows ``gate.on_insufficient_data``.
"""
