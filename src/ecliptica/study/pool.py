"""What the local launcher's process slots keep to themselves: torch compile caches."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .execution import COMPILE_CACHE_VARS


def compile_caches(study_dir: Path, name: str) -> dict[str, str]:
    """A slot's own torch compile caches, so that processes compiling at once never race on Inductor's and
    Triton's files. By default they live in STUDY_DIR/workers/<name>/, so a rerun of the study starts warm. A
    directory set in the environment (by the user, or by torch in this process) is kept as the parent, with a
    subdirectory per study and slot: two studies running at once never share one either."""
    study_dir = Path(study_dir)
    study = f"{study_dir.name}-{hashlib.sha1(str(study_dir.resolve()).encode()).hexdigest()[:8]}"
    out = {}
    for var, sub in zip(COMPILE_CACHE_VARS, ("inductor", "triton")):
        parent = os.environ.get(var)
        out[var] = str(Path(parent) / study / name if parent else study_dir.resolve() / "workers" / name / sub)
    return out
