"""Deployment: one .eqk file serving every width, and the integer inference runtime.

`export(supernet, path, configs=...)` writes the file (export.py); `load(path, bits=... |
config=..., max_bits=...)` returns an integer inference model (loader.py, runtime.py).
"""

from .export import export
from .loader import DeployedModel, load

__all__ = ["DeployedModel", "export", "load"]
