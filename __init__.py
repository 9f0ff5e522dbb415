"""fundus-edge: from a trained PyTorch fundus-screening model to an offline handheld device.

Subpackages: ``export`` (torch side), ``quantization``, ``runtime`` (torch-free, on the device), ``devices``,
``datasets`` (synthetic generator, label readers), ``models`` (reference models).
"""

__version__ = "0.1.0"
