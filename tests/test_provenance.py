"""versions() and git_commit() against independent references: the installed distributions' metadata and git."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess
from pathlib import Path

from packaging.requirements import Requirement

import ecliptica
from ecliptica import provenance
from ecliptica.provenance import CORE_PACKAGES, OPTIONAL_PACKAGES, git_commit, versions


def _installed(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def test_versions_match_installed_distribution_metadata():
    got = versions()
    for dist in ("ecliptica", *CORE_PACKAGES):
        assert got[dist] == importlib.metadata.version(dist), dist
    for dist in OPTIONAL_PACKAGES:
        assert got.get(dist) == _installed(dist), dist
    assert got["python"] == platform.python_version()


def test_versions_cover_training_and_evaluation_packages_and_are_json_strings():
    got = versions()
    assert {"ecliptica", "python", "torch", "transformers", "peft", "accelerate"} <= set(got)
    assert "trl" not in got  # never imported by ecliptica
    assert json.loads(json.dumps(got)) == got and all(isinstance(v, str) for v in got.values())


def test_optional_package_left_out_when_not_installed(monkeypatch):
    real = importlib.metadata.version

    def version(dist):
        if dist in OPTIONAL_PACKAGES:
            raise importlib.metadata.PackageNotFoundError(dist)
        return real(dist)

    monkeypatch.setattr(provenance.importlib.metadata, "version", version)
    assert not set(OPTIONAL_PACKAGES) & set(versions())


def test_git_commit_is_head_of_the_source_checkout_or_none():
    source = Path(ecliptica.__file__).resolve().parent
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=source)
    assert git_commit() == (head.stdout.strip() or None)


def test_git_commit_none_without_git(monkeypatch):
    def missing(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(provenance.subprocess, "run", missing)
    assert git_commit() is None


def test_core_packages_are_hard_dependencies_of_ecliptica():
    """versions() imports every core package: one that an install could lack would make it fail."""
    requirements = [Requirement(r) for r in importlib.metadata.requires("ecliptica") or []]
    assert set(CORE_PACKAGES) <= {r.name.lower() for r in requirements if r.marker is None}
