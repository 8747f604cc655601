"""Provenance of a run: the versions of the code that produced it and the commit it came from.

Training (`train.engine`, summary.json) and evaluation (`evaluation.runner`, eval.json) both record
`versions()` and `git_commit()`, so every output of a study names the same packages.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import platform
import subprocess
from pathlib import Path

# Distribution name -> module. A run's numbers depend on each of them: the model stack (torch,
# transformers, peft, accelerate) and the numeric stack of the metrics (numpy's seeded generators
# behind data order and the bootstrap, scipy's quantiles and ranks, scikit-learn's indices, PCA and
# probe). All are hard dependencies of ecliptica, so importing them costs a run nothing new.
CORE_PACKAGES = {
    "torch": "torch",
    "transformers": "transformers",
    "peft": "peft",
    "accelerate": "accelerate",
    "numpy": "numpy",
    "scipy": "scipy",
    "scikit-learn": "sklearn",
}

# Recorded only where installed: bitsandbytes runs 4-bit models, 8-bit AdamW and the NF4 kernel
# whenever a config asks for them. trl is left out: ecliptica never imports it (only the benchmarks'
# reference recipes and the tests do), so it cannot change a run.
OPTIONAL_PACKAGES = ("bitsandbytes",)


def versions() -> dict[str, str]:
    """Versions of ecliptica, Python and the packages a run depends on, keyed by distribution name.

    Core packages report the imported module's ``__version__``: the code this process runs, which
    differs from the installed metadata when a source tree is on PYTHONPATH. Optional packages
    report the installed distribution's version without importing it (importing bitsandbytes takes
    seconds and probes for GPU kernels), and are absent where not installed.
    """
    from ecliptica import __version__

    out = {"ecliptica": __version__, "python": platform.python_version()}
    for dist, module in CORE_PACKAGES.items():
        out[dist] = str(importlib.import_module(module).__version__)
    for dist in OPTIONAL_PACKAGES:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def git_commit() -> str | None:
    """HEAD of the repository holding ecliptica's source, or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
