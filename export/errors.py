"""The export layer's general error, raised by the float and the Q/DQ export alike."""

from __future__ import annotations

from common.errors import DGQError


class ExportError(DGQError, RuntimeError):
    """A pipeline, recipe or component this exporter cannot turn into the documented graph."""


__all__ = ["ExportError"]
