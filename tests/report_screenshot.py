"""Look at report.html as a person would: render a report.json into report.html and screenshot it in headless
Chromium (``apt-get install -y chromium``), then open the PNG.

    python tests/report_screenshot.py BUNDLE_OR_REPORT_DIR OUT_DIR [--description "IDRiD test, real, n=103"]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from fundus_edge.gate.report import write_reports


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report_dir", type=Path, help="a bundle or report folder holding report.json")
    ap.add_argument("out", type=Path)
    ap.add_argument("--description", help="set validation.description (what the build would fill)")
    ap.add_argument("--height", type=int, default=6000)
    args = ap.parse_args(argv)
    rep = json.loads((args.report_dir / "report.json").read_text())
    for key in ("figures", "figure_files"):
        rep.pop(key, None)
    if args.description:
        rep["validation"]["description"] = args.description
    write_reports(args.out, rep)
    browser = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        print("no Chromium found (apt-get install -y chromium); report.html written, no screenshot", file=sys.stderr)
        return 1
    shot = args.out / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size=1200,{args.height}", f"--screenshot={shot}", (args.out / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    print(shot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
