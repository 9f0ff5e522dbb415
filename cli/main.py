"""The ``fundus-edge`` command line.

Exit codes: 0 success; 1 unexpected error; 2 usage; 3 missing dependency; 4 bundle unusable (schema,
checksum or signature); 5 model load; 6 export; 7 quantization; 8 clinical gate failed; 9 data; 10 some images
could not be screened (the others were); 11 runners disagree beyond tolerance (``compare``; x86 vs an emulated
device); 12 device (does not fit, unsupported, invalid profile); 13 emulation could not run; 14 the result store
is unusable. ``--json`` prints one JSON document on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import FundusEdgeError
from .output import error

# One module per command group, each with ``register(subparsers)`` adding its sub-command(s). Registering must
# stay cheap: modules import heavy packages inside the command function, never at module level.
COMMAND_MODULES: tuple[str, ...] = (".screen", ".build", ".check", ".demo", ".quantize", ".bench", ".compare",
                                   ".quality", ".devices", ".field")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fundus-edge", description="Fundus screening models on offline edge devices.")
    p.add_argument("--version", action="version", version=f"fundus-edge {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name, __package__).register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except FundusEdgeError as exc:
        error(args, exc)
        return exc.exit_code
    except KeyboardInterrupt:
        print("fundus-edge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
