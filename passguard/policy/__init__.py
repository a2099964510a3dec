"""Kuma's passthrough semantics as a pure model: no I/O, no aiohttp, no config."""
