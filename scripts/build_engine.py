"""Build TensorRT engines from a dgq export folder (one library call: runtime.build.build_engines).

python scripts/build_engine.py outputs/export --components unet --workspace-gib 2
"""

from __future__ import annotations

import sys

from app.cli import script_main
from runtime.build_cli import DESCRIPTION, add_arguments, run


def main(argv: list[str] | None = None) -> int:
    return script_main(
        "build_engine.py",
        DESCRIPTION,
        add_arguments,
        run,
        argv,
        verbose_help="debug logging (TensorRT's info messages too)",
    )


if __name__ == "__main__":
    sys.exit(main())
