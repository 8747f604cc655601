"""tools/stage_gguf.py: a checked GGUF split into one folder per device call, received part by part into a stage
folder, joins back to the same bytes on the last call; a damaged part is refused."""

import hashlib
import importlib.util
from pathlib import Path

import pytest

from ecliptica.split_gguf import SplitGGUF

_spec = importlib.util.spec_from_file_location("stage_gguf", Path(__file__).parent.parent / "tools" / "stage_gguf.py")
stage_gguf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stage_gguf)

DATA = bytes(range(256)) * 4 + b"tail"  # 1028 bytes: 3 parts of 300 and one of 128


def _spec_for(data: bytes) -> SplitGGUF:
    return SplitGGUF("fake", "fake.gguf", ("unused",), "0", len(data), hashlib.sha256(data).hexdigest(), "UNUSED_ENV")


def test_split_then_receive_every_part_gives_the_file_back(tmp_path, capsys):
    spec = _spec_for(DATA)
    src = tmp_path / "fake.gguf"
    src.write_bytes(DATA)
    folders = stage_gguf.split(spec, src, tmp_path / ".carry", 300)
    assert [f.name for f in folders] == ["part01", "part02", "part03", "part04"]
    assert [len(list(f.iterdir())) for f in folders] == [1] * 4  # one file per carried folder
    assert [next(f.iterdir()).stat().st_size for f in folders] == [300, 300, 300, 128]
    stage = tmp_path / ".stage"
    for f in reversed(folders[1:]):  # any order
        assert stage_gguf.receive(spec, f, stage) is None
    assert "missing [1]" in capsys.readouterr().out
    out = stage_gguf.receive(spec, folders[0], stage)
    assert out == stage / "fake.gguf" and out.read_bytes() == DATA
    assert [p.name for p in stage.iterdir()] == ["fake.gguf"]  # the parts are removed once joined


def test_a_damaged_part_is_refused_and_the_source_is_checked(tmp_path):
    spec = _spec_for(DATA)
    src = tmp_path / "fake.gguf"
    src.write_bytes(DATA)
    folders = stage_gguf.split(spec, src, tmp_path / ".carry", 600)
    part2 = next(folders[1].iterdir())
    part2.write_bytes(b"\x00" + part2.read_bytes()[1:])
    stage = tmp_path / ".stage"
    assert stage_gguf.receive(spec, folders[0], stage) is None
    with pytest.raises(ValueError, match=r"not the expected ones: .*part01-of-02, .*part02-of-02"):
        stage_gguf.receive(spec, folders[1], stage)
    assert not (stage / "fake.gguf").exists()

    src.write_bytes(DATA[:-1] + b"!")  # negative control: a source that is not the published file is never split
    with pytest.raises(ValueError, match="sha256"):
        stage_gguf.split(spec, src, tmp_path / ".carry2", 600)
    with pytest.raises(FileNotFoundError, match="no fake.gguf.partNN-of-MM file"):
        stage_gguf.receive(spec, tmp_path / "not_carried", stage)
