"""Every notebook in comparative_study/ runs top to bottom on a tiny model, in one shared study directory.

One arm notebook runs in a Jupyter kernel, as `make lab` runs it (nbclient). The other notebooks' code cells,
exactly as committed, run in one in-process IPython shell: the same cell sources, magics included, and the
same library calls on the same study, without starting a kernel and importing torch once per notebook.
What a kernel adds beyond that (the .ipynb is valid, a kernel starts and runs its cells) the first notebook
proves, and the arm notebooks are the same cells but for `ARM` (test_notebook.py checks that).
"""

import sys
from pathlib import Path

from study_helpers import tiny_study_overrides

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "comparative_study").rglob("*.ipynb"))
IN_A_KERNEL = ROOT / "comparative_study" / "01_sft" / "sft.ipynb"

# The arms the notebooks train, and the baseline the evaluation reports against. Calibration is off: the notebooks
# call no calibration function of their own (the runner's calibration is tested end to end in test_calibration.py).
ARMS = (
    "["
    + ", ".join(
        ["{name: baseline, method: baseline}"]
        + [
            f"{{name: {m}{g}, method: {m}{', optimizer: grit' if g else ''}}}"
            for m in ("sft", "dpo", "cita")
            for g in ("", "_grit")
        ]
    )
    + "]"
)


def _overrides(study_dir: Path, model_dir: Path) -> list[str]:
    return [
        f"arms={ARMS}",
        "calibration.enabled=false",
        *tiny_study_overrides(study_dir, model_dir, steps=2),
    ]


def _configured(path: Path, study_dir: Path, model_dir: Path):
    """The notebook with its config cell pointed at the tiny model and the shared study directory."""
    import nbformat

    book = nbformat.read(path, as_version=4)
    cell = next(c for c in book.cells if c.cell_type == "code" and "OVERRIDES" in c.source)
    cell.source += f"\nSTUDY_DIR = {str(study_dir)!r}\nOVERRIDES = {_overrides(study_dir, model_dir)!r}\n"
    return book


def test_the_notebooks_are_all_covered():
    assert len(NOTEBOOKS) == 7 and IN_A_KERNEL in NOTEBOOKS  # six arms and the evaluation


def test_every_notebook_runs_top_to_bottom(tmp_path, tiny_model_dir, monkeypatch):
    from IPython.core.interactiveshell import InteractiveShell
    from nbclient import NotebookClient

    from ecliptica.study.store import StudyStore

    study_dir = tmp_path / "study"
    book = _configured(IN_A_KERNEL, study_dir, tiny_model_dir)
    NotebookClient(
        book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(IN_A_KERNEL.parent)}}
    ).execute()
    errors = [o for c in book.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors

    monkeypatch.setenv("MPLBACKEND", "Agg")
    # the shell installs its own __main__ module (without __spec__, which spawned processes of later tests need)
    monkeypatch.setitem(sys.modules, "__main__", sys.modules["__main__"])
    shell = InteractiveShell.instance()
    try:
        for path in NOTEBOOKS:
            if path == IN_A_KERNEL:
                continue
            monkeypatch.chdir(path.parent)  # the cells' relative paths (../../configs/...) are the notebook's
            shell.reset(new_session=False)  # each notebook starts with an empty namespace, as in its own kernel
            for i, cell in enumerate(
                c for c in _configured(path, study_dir, tiny_model_dir).cells if c.cell_type == "code"
            ):
                result = shell.run_cell(cell.source, store_history=False)
                assert result.success, (
                    f"{path.relative_to(ROOT)}, code cell {i}: {result.error_in_exec or result.error_before_exec}"
                )
    finally:
        InteractiveShell.clear_instance()

    # what the notebooks did, read from the study's store: every arm trained by its notebook, all evaluated
    rows = {r["run_id"]: r["status"] for r in StudyStore(study_dir / "study.sqlite").all()}
    arms = [p.parent.name.split("_", 1)[1] for p in NOTEBOOKS if p.parent.name[:2] != "07"]
    assert {f"{arm}-s0" for arm in arms} <= set(rows)
    assert all(rows[f"{arm}-s0"] == "evaluated" for arm in arms), rows
