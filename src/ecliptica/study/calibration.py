"""The calibration phase: compare methods at their best, not at one shared learning rate.

For every trained arm, each point of a small sweep (learning rates, x GRIT dampings for GRIT arms) is
trained on the train split (seed `calibration.seed`) and scored on the held-out validation split:

  val_accuracy = rewards/accuracies of the validation pairs against the base  (evaluation/validation.py)
  val_margin   = rewards/margins on the same pairs
  benign_kl    = mean token KL(model || base) on the benign drift pairs (the study's evaluation.drift set)

`choose` applies the rule fixed in the config (CalibrationSection); the sweep and the choice go to the
store, and each arm's final runs use its chosen point (`chosen_settings`). Nothing here reads the
evaluation prompt sets, so the choice cannot be tuned on the test set.
"""

from __future__ import annotations

import csv
import gc
import json
from pathlib import Path
from typing import Any

import torch

from ..config import TrainConfig
from .config import ArmSpec, CalibrationSection, StudyConfig
from .store import StudyStore

ROW_FIELDS = (
    "arm",
    "lr",
    "damping",
    "status",
    "val_accuracy",
    "val_margin",
    "benign_kl",
    "n_val_pairs",
    "epochs",
    "feasible",
    "chosen",
)


def sweep(cfg: StudyConfig, arm: ArmSpec) -> list[dict[str, Any]]:
    """The arm's sweep points: {point_id, arm, lr, damping (None = the study's), settings (dotted keys)}."""
    cal = cfg.calibration
    dampings: list[float | None] = list(cal.grit_dampings) if arm.optimizer == "grit" and cal.grit_dampings else [None]
    points = []
    for lr in cal.lrs:
        for d in dampings:
            settings = {"optimizer.lr": lr, **({"optimizer.grit.damping": d} if d is not None else {})}
            pid = f"{arm.name}-lr{lr:g}" + (f"-d{d:g}" if d is not None else "")
            points.append({"point_id": pid, "arm": arm.name, "lr": lr, "damping": d, "settings": settings})
    return points


def point_config(cfg: StudyConfig, arm: ArmSpec, point: dict) -> TrainConfig:
    """The arm's training config at one sweep point, in its own directory under STUDY_DIR/calibration."""
    tc = cfg.arm_config(arm, cfg.calibration.seed, calibrated=point["settings"])
    root = Path(cfg.study_dir) / "calibration"
    tc.run_dir = str(root / point["point_id"])
    tc.run_name = f"cal-{point['point_id']}"
    tc.tensorboard_dir = str(root / "tensorboard")
    if cfg.calibration.max_steps is not None:
        tc.train.max_steps = cfg.calibration.max_steps
        tc.train.save_every = min(tc.train.save_every, cfg.calibration.max_steps)
    return tc


def choose(rows: list[dict], cal: CalibrationSection) -> tuple[dict, str]:
    """The rule of `cal` over one arm's scored rows ({lr, benign_kl, val_accuracy, ...}); returns (row, why)."""
    if not rows:
        raise ValueError("no scored calibration points to choose from")
    feasible = [r for r in rows if r["benign_kl"] <= cal.kl_bound]
    if not feasible:
        best = min(rows, key=lambda r: (r["benign_kl"], r["lr"]))
        return best, f"no point has benign KL <= {cal.kl_bound:g}: the smallest KL ({best['benign_kl']:.4g})"
    top = max(r["val_accuracy"] for r in feasible)
    tied = [r for r in feasible if r["val_accuracy"] >= top - cal.accuracy_tolerance]
    best = min(tied, key=lambda r: (r["lr"], r["benign_kl"]))
    why = f"best validation accuracy ({top:.4g}) with benign KL <= {cal.kl_bound:g}"
    if len(tied) > 1:
        why += f"; {len(tied)} points tied, the smaller lr wins"
    return best, why


def flat_row(point: dict) -> dict:
    """A store row as the report reads it (one name per number, from the scorer to the CSV column)."""
    s = point.get("scores") or {}
    val, benign = s.get("val", {}), s.get("benign", {})
    return {
        "point_id": point["point_id"],
        "arm": point["arm"],
        "lr": point["lr"],
        "damping": point["damping"],
        "status": point["status"],
        "val_accuracy": val.get("rewards/accuracies"),
        "val_margin": val.get("rewards/margins"),
        "n_val_pairs": val.get("n_pairs"),
        "benign_kl": benign.get("kl_mean_token"),
        "epochs": s.get("epochs"),
        "feasible": s.get("feasible"),
        "chosen": point.get("chosen", False),
        "why": s.get("why"),
    }


def calibration_rows(store: StudyStore) -> list[dict]:
    """Every sweep point of the study, flattened: what the report's calibration table and figure show."""
    return [flat_row(p) for p in store.calibration()]


def chosen_settings(cfg: StudyConfig, store: StudyStore) -> dict[str, dict] | None:
    """{arm: dotted settings} once every point of every calibrated arm's *current* sweep is scored and the
    stored choice is the rule's choice over those points; None otherwise, so calibration runs (again).
    A choice stored before the sweep grew (a new lr in the config) is not reused: it never saw the new points.
    Arms not calibrated (calibration off, or not in calibration.arms) use the shared settings ({})."""
    out: dict[str, dict] = {a.name: {} for a in cfg.arms if a.trained}
    stored = {p["point_id"]: p for p in store.calibration()}
    for arm in cfg.calibrated_arms():
        points = sweep(cfg, arm)
        current = [stored.get(q["point_id"]) for q in points]
        if any(p is None or p["status"] != "scored" for p in current):
            return None
        best, _ = choose([flat_row(p) for p in current], cfg.calibration)
        if [p["point_id"] for p in current if p["chosen"]] != [best["point_id"]]:
            return None  # chosen over another sweep (or not yet): calibrate() chooses again, training nothing
        out[arm.name] = next(q for q in points if q["point_id"] == best["point_id"])["settings"]
    return out


def register_points(cfg: StudyConfig, store: StudyStore) -> list[tuple[ArmSpec, dict, TrainConfig]]:
    """Every (arm, sweep point, training config) of the study, registered in the store (idempotent)."""
    plan = [(arm, p, point_config(cfg, arm, p)) for arm in cfg.calibrated_arms() for p in sweep(cfg, arm)]
    for arm, p, tc in plan:
        store.register_point(p["point_id"], arm.name, p["lr"], p["damping"], tc.hash())
    return plan


def calibrate(cfg: StudyConfig, store: StudyStore, worker: str | None = None) -> dict[str, dict] | None:
    """Train and score every sweep point not yet scored (resumable), then store each arm's choice and
    return the chosen settings. A `worker` only trains and scores the points it claims (returns None);
    the coordinator chooses once every worker is done."""
    arms = cfg.calibrated_arms()
    plan = register_points(cfg, store)
    benign = None
    for arm, p, tc in plan:
        pid = p["point_id"]
        status = store.point(pid)["status"]
        if status == "scored" or (worker and status == "failed"):
            continue
        if worker and not store.claim_point(pid, worker):
            continue
        try:
            if store.point(pid)["status"] == "scored":  # finished by another worker meanwhile
                continue
            benign = benign or _benign_pairs(cfg)
            print(f"[study] calibration {pid} ({arm.method}, optimizer={arm.optimizer})", flush=True)
            try:
                scores = _train_and_score(tc, benign, cfg)
            except Exception as e:
                store.set_point(pid, "failed", error=f"{type(e).__name__}: {e}")
                raise
            store.record_split("preference", scores["split"])
            store.set_point(pid, "scored", scores=scores)
        finally:
            if worker:
                store.release_point(pid)
    if worker:
        return None
    points = {q["point_id"]: q for q in store.calibration()}  # one read: every worker has finished
    for arm in arms:
        # this config's sweep only: points a previous config left in the store do not compete
        ids = [p["point_id"] for a, p, _ in plan if a.name == arm.name]
        rows = [flat_row(points[i]) for i in ids if points[i]["status"] == "scored"]
        best, why = choose(rows, cfg.calibration)
        point = points[best["point_id"]]
        point["scores"].update({"why": why, "feasible": best["benign_kl"] <= cfg.calibration.kl_bound})
        store.set_point(best["point_id"], "scored", scores=point["scores"])
        store.set_chosen(arm.name, best["point_id"])
        print(
            f"[study] calibration: {arm.name} -> lr {best['lr']:g}"
            + (f", damping {best['damping']:g}" if best["damping"] is not None else "")
            + f" ({why})",
            flush=True,
        )
    settings = chosen_settings(cfg, store)
    assert settings is not None  # every arm was just chosen
    return settings


def score_point(cfg: StudyConfig, tc: TrainConfig) -> dict:
    """Train one sweep point and score it (what run-one does for a point)."""
    return _train_and_score(tc, _benign_pairs(cfg), cfg)


def _benign_pairs(cfg: StudyConfig):
    from ..evaluation.drift import load_benign_pairs

    d = cfg.evaluation.drift
    return load_benign_pairs(d.path, d.format, d.category, d.limit), d


def _train_and_score(tc: TrainConfig, benign, cfg: StudyConfig) -> dict:
    from ..evaluation.inputs import tokenize_scored_pairs
    from ..evaluation.validation import preference_scores, response_kl
    from ..train import Trainer

    examples, drift = benign
    # the store says this point is unscored: continue its checkpoint, or train it again without one
    trainer = Trainer(tc, resume=True, restart_without_checkpoint=True).setup()
    try:
        if trainer.val_data is None or not trainer.val_data.pairs:
            raise ValueError(
                f"{tc.data.path}: the validation split is empty (val_fraction {tc.data.val_fraction}); "
                "calibration needs validation pairs"
            )
        trainer.train()
        summary = trainer.summary
        policy = trainer.accelerator.unwrap_model(trainer.policy)
        pad, bs = trainer.tokenizer.pad_token_id, cfg.calibration.batch_size
        val = preference_scores(policy, trainer.val_data.pairs, pad, beta=cfg.calibration.reward_beta, batch_size=bs)
        # tokenised exactly as the evaluation's drift check does, so benign_kl and eval kl_mean_token compare
        kl = response_kl(policy, tokenize_scored_pairs(trainer.tokenizer, examples, drift), pad, batch_size=bs)
    finally:
        del trainer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    scores = {
        "val": val,
        "benign": kl,
        "steps": summary.steps,
        "epochs": summary.epochs,
        "train_seconds": summary.train_seconds,
        "split": summary.data.split.model_dump(),
        "config_hash": tc.hash(),
    }
    Path(tc.run_dir, "calibration.json").write_text(json.dumps(scores, indent=1))
    return scores


def stored_calibration_rows(study_dir: str | Path) -> list[dict] | None:
    """The sweep as the report shows it: from the study's store when it has one, else from the
    calibration.csv a previous report wrote (a copied or committed study); None if neither exists."""
    study_dir = Path(study_dir)
    if (study_dir / "study.sqlite").exists():
        rows = calibration_rows(StudyStore(study_dir / "study.sqlite"))
        if rows:
            return rows
    path = study_dir / "calibration.csv"
    if not path.exists():
        return None
    with path.open(newline="") as f:
        return [_parse_csv_row(r, path, i) for i, r in enumerate(csv.DictReader(f), start=2)]


def _parse_csv_row(row: dict, path: Path, line: int) -> dict:
    flags = {"True": True, "False": False, "": None}
    out: dict[str, Any] = {"arm": row["arm"], "status": row["status"]}
    try:
        for key in ("lr", "damping", "val_accuracy", "val_margin", "benign_kl", "n_val_pairs", "epochs"):
            out[key] = float(row[key]) if row[key] != "" else None
        out["n_val_pairs"] = int(out["n_val_pairs"]) if out["n_val_pairs"] is not None else None
        out["feasible"], out["chosen"] = flags[row["feasible"]], bool(flags[row["chosen"]])
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}, line {line}: unreadable calibration row ({type(e).__name__}: {e})") from None
    return out


def write_calibration(rows: list[dict], out_dir: Path, cal: CalibrationSection) -> str:
    """calibration.csv, figures/calibration_sweep.{png,pdf}, and the markdown section (returned)."""
    from .figures import calibration_sweep

    out_dir = Path(out_dir)
    with (out_dir / "calibration.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=ROW_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    calibration_sweep(rows, cal.kl_bound, out_dir / "figures" / "calibration_sweep")
    fmt = lambda v, spec=".3f": "" if v is None else format(v, spec)  # noqa: E731
    lines = [
        "## Calibration (validation split; the final runs use each arm's chosen point)",
        "",
        f"Rule: the highest validation preference accuracy (rewards/accuracies against the base) among points "
        f"with benign token KL to the base <= {cal.kl_bound:g}; accuracies within {cal.accuracy_tolerance:g} "
        "tie, ties go to the smaller lr; with no point inside the bound, the smallest KL. "
        "Figure: `figures/calibration_sweep`.",
        "",
        "| arm | lr | damping | val accuracy | val margin | benign KL | epochs | chosen |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        chosen = ("yes" + ("" if r["feasible"] else " (KL bound not met)")) if r["chosen"] else ""
        lines.append(
            f"| {r['arm']} | {r['lr']:g} | {fmt(r['damping'], 'g')} | {fmt(r['val_accuracy'])} | "
            f"{fmt(r['val_margin'])} | {fmt(r['benign_kl'], '.4f')} | {fmt(r['epochs'], '.2f')} | {chosen} |"
        )
    return "\n".join(lines) + "\n"
