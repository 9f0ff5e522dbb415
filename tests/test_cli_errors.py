"""No traceback for any user error: every sub-command driven with paths that do not exist and files of the wrong
kind exits with a documented code (never 0, never 1 = "a bug") and one line on stderr."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fundus_edge.cli import main


@pytest.fixture()
def junk(tmp_path: Path) -> dict[str, Path]:
    text = tmp_path / "notes.txt"
    text.write_text("not an image, not a CSV of labels\n")
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    folder = tmp_path / "empty"
    folder.mkdir()
    return {"missing": tmp_path / "missing", "text": text, "photo": photo, "folder": folder}


CASES = [
    ("screen", ["screen", "--bundle", "{missing}", "{photo}"]),
    ("screen-not-bundle", ["screen", "--bundle", "{folder}", "{photo}"]),
    ("check", ["check", "--bundle", "{missing}", "--val", "{text}"]),
    ("info", ["info", "--bundle", "{text}"]),
    ("build-missing-model", ["build", "--model", "{missing}", "--calib", "{folder}", "--val", "{text}",
                             "--out", "{folder}/out"]),
    ("quantize", ["quantize", "--onnx", "{text}", "--calib", "{folder}", "--out", "{folder}/q.onnx"]),
    ("bench", ["bench", "--bundle", "{missing}"]),
    ("compare", ["compare", "--bundle", "{missing}"]),
    ("quality-missing", ["quality", "{missing}"]),
    ("quality-empty", ["quality", "{folder}"]),
    ("quality-spec", ["quality", "--spec", "{photo}", "{photo}"]),
    ("quality-typo", ["quality", "calibrat", "--good", "{folder}"]),  # a mistyped sub-command, not an image
    ("emulate-typo", ["emulate", "--device", "rpi4", "set-up"]),
    ("devices", ["devices", "no-such-board"]),
    ("doctor", ["doctor", "--device", "no-such-board"]),
    ("emulate", ["emulate", "--device", "rpi4", "--bundle", "{missing}"]),
    ("package", ["package", "--device", "rpi4", "--bundle", "{missing}", "--out", "{folder}/pkg"]),
    ("results-export", ["results", "export", "--store", "{text}"]),
    ("results-verify", ["results", "verify", "--store", "{missing}"]),
    ("keys-verify", ["keys", "verify", "--bundle", "{missing}", "--trusted-keys", "{folder}"]),
]


@pytest.mark.parametrize(("name", "argv"), CASES, ids=[c[0] for c in CASES])
def test_user_errors_exit_cleanly(name: str, argv: list[str], junk: dict[str, Path],
                                  capsys: pytest.CaptureFixture[str]) -> None:
    args = [a.format(**{k: str(v) for k, v in junk.items()}) for a in argv]
    code = main(args)  # an uncaught exception fails the test with its traceback
    out, err = capsys.readouterr()
    assert code not in (0, 1), (code, err)
    assert "Traceback" not in err + out
    # a usage/bundle/... error is one line on stderr; per-image failures (10) are listed with the results
    assert "fundus-edge: error:" in err or (code == 10 and "ERROR" in out), (code, out, err)


def test_closed_pipe_is_quiet() -> None:
    """`fundus-edge ... | head -1`: no BrokenPipeError traceback, exit 141."""
    cmd = f"'{sys.executable}' -m fundus_edge devices | head -1; exit ${{PIPESTATUS[0]}}"
    proc = subprocess.run(cmd, shell=True, executable="/bin/bash", capture_output=True, text=True)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.returncode in (0, 141)
    assert proc.stdout.count("\n") == 1


def test_version_and_exit_codes_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("fundus-edge ")
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "exit codes:" in capsys.readouterr().out


def test_every_option_has_help() -> None:
    import argparse

    from fundus_edge.cli import make_parser

    def walk(parser: argparse.ArgumentParser, path: str) -> list[str]:
        out = []
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sub in a.choices.items():
                    out += walk(sub, f"{path} {name}")
            elif not a.help:
                out.append(f"{path}: {a.option_strings or a.dest}")
        return out

    assert walk(make_parser(), "fundus-edge") == []


def test_artifact_ids_never_swallow_image_paths() -> None:
    """`bench --artifact ID photo.jpg`: the photo stays an input (the old nargs='*' --artifacts took it)."""
    from fundus_edge.cli import make_parser

    args = make_parser().parse_args(["bench", "--bundle", "b", "--artifact", "onnx-int8", "photo.jpg"])
    assert args.artifacts == ["onnx-int8"] and args.images == ["photo.jpg"]
