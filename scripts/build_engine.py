"""Build TensorRT engines from a dgq export folder (one library call: runtime.build.build_engines).

python scripts/build_engine.py outputs/export --components unet --workspace-gib 2
"""

from __future__ import annotations

import argparse
import logging
import sys

from runtime.build_cli import DESCRIPTION, add_arguments, run

log = logging.getLogger("build_engine")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="build_engine.py", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (TensorRT's info messages too)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return run(args)
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError) as err:
        # EngineBuildError and ManifestError are ValueErrors
        log.error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
