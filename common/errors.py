"""The project's error base class.

Every error the project raises on purpose (a message a user can act on) derives from :class:`DGQError`,
so an entry point catches one class. Each layer defines its own subclasses beside the code that raises
them, and keeps the builtin base they had (``ValueError`` or ``RuntimeError``) as a second base, so
callers that catch the builtin keep working:

- ``dgq``: ``RecipeError`` (ValueError), ``ModelLoadError`` (RuntimeError).
- ``export``: ``ExportError`` (RuntimeError), ``LoweringError``, ``LintError``, ``ManifestError``,
  ``FeedError`` (ValueError).
- ``runtime``: ``EngineBuildError``, ``EngineCompatibilityError``, ``BackendUnavailable`` (ValueError),
  ``RunnerError`` (RuntimeError).
"""

from __future__ import annotations


class DGQError(Exception):
    """Base of the errors this project raises on purpose; the message says what to do about it."""


__all__ = ["DGQError"]
