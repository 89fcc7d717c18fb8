"""The bottom of the stack: what the method (``dgq``), the graphs (``export``), the engines
(``runtime``) and the application (``app``) all share, and nothing else.

Standard library only, so the device runtime can use it without the calibration stack:

- :mod:`common.errors`: ``DGQError``, the base of every error the project raises on purpose.
- :mod:`common.fsutil`: atomic file, folder and file-group writes.
- :mod:`common.constants`: target names and the default classifier-free guidance.

Layers, each importing only those below it: ``common`` <- ``dgq`` <- ``export`` <- ``runtime`` <- ``app``,
except that ``runtime`` imports neither ``dgq`` nor anything in ``export`` that does
(tests/test_layers.py checks it).
"""
