"""The toolchain's orchestration: ``build`` (model -> gated bundle, as stages) and ``check`` (re-gate a bundle)."""

# Import order matters until the bundle <-> runtime cycle is broken: bundle/read.py imports runtime.preprocess,
# whose package __init__ imports bundle.read, so whoever imports bundle.read first gets a half-initialised module.
# Importing the runtime package first makes every pipeline entry point safe.
from .. import runtime as _runtime  # noqa: F401
