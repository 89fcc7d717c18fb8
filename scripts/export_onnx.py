"""Export a Stable Diffusion pipeline (with a DGQ recipe) to ONNX: the users' first command.

    python scripts/export_onnx.py --out exports/fashion-trt --target tensorrt

See ``--help`` (the same options as ``dgq export``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.cli import script_main
from export.cli import DESCRIPTION, add_arguments, run


def main(argv: list[str] | None = None) -> int:
    return script_main("export_onnx.py", DESCRIPTION, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
