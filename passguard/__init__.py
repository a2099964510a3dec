"""passguard: proves the Kuma passthrough cluster is idle before it is switched off."""

__version__ = "0.1.0"
