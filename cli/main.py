"""The ``fundus-edge`` command line.

Exit codes: 0 success; 1 unexpected error; 2 usage; 3 missing dependency; 4 bundle unusable (schema,
checksum or signature); 5 model load; 6 export; 7 quantization; 8 clinical gate failed; 9 data; 10 some images
could not be screened (the others were); 11 runners disagree beyond tolerance (``compare``; x86 vs an emulated
device); 12 device (does not fit, unsupported, invalid profile); 13 emulation could not run; 14 the result store
is unusable; 15 the gate could not show its margins (INSUFFICIENT EVIDENCE). ``--json`` prints one JSON
document on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import FundusEdgeError, UsageError
from .helptext import fill_missing_help
from .output import error

EXIT_CODES = """exit codes:
  0 success                        8 clinical gate failed
  1 unexpected error (a bug)       9 data (labels file or image folder unusable)
  2 usage (arguments, files)      10 some images could not be screened (the others were)
  3 missing dependency (extra)    11 runners disagree beyond tolerance (compare, emulated device)
  4 bundle unusable               12 device (does not fit, unsupported, invalid profile)
  5 model load                    13 emulation could not run
  6 export                        14 result store unusable
  7 quantization                  15 gate: insufficient evidence (bounds not inside the margins)
                                 141 output pipe closed (e.g. '| head')"""

# One module per command group, each with ``register(subparsers)`` adding its sub-command(s). Registering must
# stay cheap: modules import heavy packages inside the command function, never at module level.
COMMAND_MODULES: tuple[str, ...] = (".screen", ".build", ".check", ".demo", ".quantize", ".bench", ".compare",
                                   ".quality", ".devices", ".field", ".results")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fundus-edge", description="Fundus screening models on offline edge devices.",
                                epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"fundus-edge {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name, __package__).register(sub)
    fill_missing_help(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        from .segment import segmentation_command

        code: int = (segmentation_command(args) or args.func)(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at interpreter exit
        return code
    except FundusEdgeError as exc:
        error(args, exc)
        return exc.exit_code
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, without a traceback at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:  # a path the user gave that cannot be read or written
        where = f" ({exc.filename})" if exc.filename else ""
        error(args, UsageError(f"{exc.strerror or exc}{where}: check the path and its permissions"))
        return UsageError.exit_code
    except UnicodeDecodeError as exc:  # a binary file given where a text file (CSV, JSON, TOML) belongs
        error(args, UsageError(f"a file given as text (CSV, JSON or TOML) is not text: {exc.reason} at byte "
                               f"{exc.start}; check which file goes with which option"))
        return UsageError.exit_code
    except KeyboardInterrupt:
        print("fundus-edge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
