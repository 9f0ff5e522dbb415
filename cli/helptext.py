"""Help for options that many commands share (or that were registered without a sentence): one place, so every
option in ``--help`` says what it does. A command's own help text always wins."""

from __future__ import annotations

import argparse

COMMON = {
    "--json": "print one JSON document on stdout (progress and errors stay on stderr)",
    "--bundle": "bundle directory (written by 'fundus-edge build'; verified before use)",
    "--threads": "inference threads (0: the backend's default)",
    "--out": "where to write the result (a directory unless the command says otherwise)",
    "--force": "replace an existing output directory",
    "--seed": "random seed (results are reproducible for a given seed)",
    "--num-classes": "number of model outputs, when the checkpoint does not say",
    "--calib-size": "how many calibration images to use (a seeded random subset of the folder)",
    "--calibrator": "int8 calibration method for activation ranges (minmax is what the gate was measured with)",
    "--precisions": "comma-separated precisions to build (fp32,int8)",
    "--fallback-max-trials": "accuracy-aware fallback: at most this many quantize-and-gate trials",
    "--fallback-max-seconds": "accuracy-aware fallback: time budget in seconds",
    "--exporter": "ONNX exporter: dynamo (torch.export, default) or legacy (TorchScript tracing)",
    "--export-atol": "largest |PyTorch - exported| logit difference the export parity check accepts",
    "--min-delta-auc": "gate: the int8 file's AUC may be at most this much below fp32's (e.g. -0.005)",
    "--min-delta-sensitivity": "gate: the int8 file's sensitivity at the locked threshold may drop at most this much",
    "--max-flip-rate": "gate: largest share of validation images whose decision int8 may change vs fp32",
    "--val": "labels CSV (APTOS, EyePACS, IDRiD, open-fundus or path,label layouts)",
    "--val-images": "image folder for --val (default: next to the CSV)",
    "--referable-from": "grades >= this are referable (default 2: moderate non-proliferative DR or worse)",
    "--n": "how many images to write",
    "--size": "image size in pixels",
    "--cameras": "synthetic camera colour profiles to cycle through",
    "--layout": "input tensor layout of the model (NCHW or NHWC)",
    "--exclude-nodes": "ONNX node names to keep in float",
    "--repeats": "warm runs per image",
    "--format": "model file format (onnx or tflite)",
    "--precision": "artifact precision (fp32 or int8)",
    "--memory-cap": "cap the emulated device's memory at its RAM (or this many MB)",
    "--device": "device profile name (see 'fundus-edge devices')",
    "--no-tarball": "leave the package as a directory (no .tar.gz)",
    "--store": "the SQLite result store",
    "--audit-log": "the append-only audit log (default: next to the store as NAME.audit.jsonl)",
    "--name": "a name for the key files (NAME.key, NAME.pub)",
    "--trusted-keys": "directory of trusted public keys (.pub)",
}


def fill_missing_help(parser: argparse.ArgumentParser, command: str = "") -> list[str]:
    """Give every option without help the shared sentence; return the options still without help."""
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                missing += fill_missing_help(sub, f"{command} {name}".strip())
            continue
        if action.help or "-h" in action.option_strings:
            continue
        key = next((o for o in action.option_strings if o in COMMON), None)
        if key is not None:
            action.help = COMMON[key]
        else:
            missing.append(f"{command}: {'/'.join(action.option_strings) or action.dest}")
    return missing
