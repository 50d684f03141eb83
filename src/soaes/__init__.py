"""soaes: the composed toolkit (depends on all six soaes packages, provides the `soaes` CLI)."""

__version__ = "0.2.0"
