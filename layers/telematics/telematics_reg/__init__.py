"""Shared library of the telematics registration service (packaged as a Lambda layer)."""

from __future__ import annotations

__version__ = "0.1.0"
