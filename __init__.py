"""fundus-edge: from a trained fundus-screening model to an offline handheld device.

Folders in data-flow order: ``export`` (torch side) -> ``quantization`` -> ``gate`` -> ``bundle`` (the contract) ->
``runtime`` (torch-free, on the device; ``runtime.field`` for clinic use) <- ``devices``; ``pipeline`` runs the build
and check stages, ``cli`` is the command line. ``datasets`` and ``models`` hold readers and reference models.

Offline by construction: importing the package turns onnxruntime's telemetry off for this process and every process
it starts (onnxruntime >= 1.29 otherwise makes DNS lookups for a vendor events endpoint and keeps an event database
in the user's cache). The variables are set before onnxruntime can be imported through the kit.
"""

import os as _os

for _var in ("ORT_DISABLE_TELEMETRY", "ORT_TELEMETRY_DISABLED"):
    _os.environ[_var] = "1"

__version__ = "0.1.0"
__all__ = ["__version__"]
