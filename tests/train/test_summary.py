"""The typed training summary reads every summary.json on record (older ones included) unchanged, and a
malformed one fails naming the file and the field."""

import json
from pathlib import Path

import pytest

from ecliptica.train.summary import TrainSummary, read_train_summary, write_train_summary

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = sorted((ROOT / "results").rglob("summary.json"))
# fields a summary.json written before they existed lacks, and what that older run did
ADDED = {"compiled_layers": 0, "fused_lora_layers": 0, "nf4_kernel": None, "offload_activations": False}


def test_there_are_committed_summaries_to_read():
    assert len(COMMITTED) >= 10  # otherwise the tests below prove nothing


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(p.relative_to(ROOT)))
def test_a_committed_summary_reads_back_to_the_same_json(path):
    raw = json.loads(path.read_text())
    typed = read_train_summary(path)
    again = json.loads(write_train_summary(typed))
    # every key on disk keeps its value, written the same way (an int stays an int); the only new keys are the later
    # fields at their documented defaults
    assert {k: json.dumps(again[k]) for k in raw} == {k: json.dumps(v) for k, v in raw.items()}
    assert {k: v for k, v in again.items() if k not in raw} == {k: v for k, v in ADDED.items() if k not in raw}
    assert typed.data.split.n_train == raw["data"]["split"]["n_train"]
    assert typed.data.rows_read == typed.data.kept + typed.data.bad_rows + sum(typed.data.filtered.values())


def _one(tmp_path, edit) -> Path:
    raw = json.loads(COMMITTED[0].read_text())
    edit(raw)
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(raw))
    return path


def test_a_missing_field_names_the_file_and_the_field(tmp_path):
    path = _one(tmp_path, lambda r: r["data"]["split"].pop("n_val"))
    with pytest.raises(
        ValueError, match=r"summary\.json: invalid training summary: data\.split\.n_val: Field required"
    ):
        read_train_summary(path)


def test_a_mistyped_or_unknown_field_names_the_file_and_the_field(tmp_path):
    path = _one(tmp_path, lambda r: r.update(steps="many"))
    with pytest.raises(ValueError, match=r"summary\.json: invalid training summary: steps: "):
        read_train_summary(path)
    path = _one(tmp_path, lambda r: r.update(stepz=3))
    with pytest.raises(ValueError, match=r"stepz: Extra inputs are not permitted"):
        read_train_summary(path)


def test_a_file_that_is_not_json_names_itself(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("{torn")
    with pytest.raises(ValueError, match=r"summary\.json: not a readable training summary"):
        read_train_summary(path)


def test_the_grit_block_is_typed():
    raw = json.loads(COMMITTED[0].read_text())
    grit = {
        "active": True,
        "valid_share": 1.0,
        "min_valid_share": 0.9,
        "preconditioned_steps": 3,
        "mean_precond_grad_ratio": 1.5,
        "geomean_precond_grad_ratio": 1.4,
        "factor_updates": 3,
        "inversions": 3,
        "reprojections": 0,
    }
    assert TrainSummary.model_validate({**raw, "grit": grit}).grit.preconditioned_steps == 3
    with pytest.raises(ValueError, match="grit.inversion"):
        TrainSummary.model_validate({**raw, "grit": {**grit, "inversion": 3}})
