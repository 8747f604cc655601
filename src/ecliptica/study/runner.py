"""Run a study: train every arm x seed with the one engine, evaluate each with the one evaluator
(baseline untrained), then write the paper's table and figures.

Phases are resumable: the SQLite store says what is done. Training runs first (each resumes from
its latest checkpoint if it was interrupted), then evaluation loads the base model once and swaps
adapters, then the report is rebuilt from the store.
"""
from __future__ import annotations

import gc
import json
import logging
from pathlib import Path

import torch
import yaml

from ..config import config_hash, load_config
from .config import ArmSpec, StudyConfig
from .store import StudyStore

log = logging.getLogger(__name__)


def load_study(path: str | Path, overrides: list[str] | None = None) -> StudyConfig:
    return load_config(path, overrides, cls=StudyConfig)


class StudyRunner:
    def __init__(self, cfg: StudyConfig):
        self.cfg = cfg
        self.dir = Path(cfg.study_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.store = StudyStore(self.dir / "study.sqlite")
        (self.dir / "study.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        self.plan: list[tuple[ArmSpec, int]] = [(arm, seed) for seed in cfg.seeds for arm in cfg.arms]
        for arm, seed in self.plan:
            self.store.register(self.run_id(arm, seed), arm.name, seed, self._hash(arm, seed), self._describe(arm, seed))

    def run_id(self, arm: ArmSpec, seed: int) -> str:
        return self.cfg.run_id(arm, seed)

    def _describe(self, arm: ArmSpec, seed: int) -> dict:
        d = {"arm": arm.model_dump(), "seed": seed, "evaluation": self.cfg.evaluation}
        if arm.method != "baseline":
            d["train"] = self.cfg.arm_config(arm, seed).model_dump(mode="json")
        else:
            d["model"] = self.cfg.train.get("model", {})
        return d

    def _hash(self, arm: ArmSpec, seed: int) -> str:
        return config_hash(self._describe(arm, seed))

    # ---------------------------------------------------------------- phases
    def train_arm(self, name: str) -> list[dict]:
        """Train one arm (all seeds); returns the training summaries. Used by the per-arm notebooks."""
        if name not in {a.name for a in self.cfg.arms}:
            raise ValueError(f"no arm {name!r} in this study; arms: {[a.name for a in self.cfg.arms]}")
        self.train_all(only=[name])
        return [self.store.get(self.run_id(a, s))["train_summary"] for a, s in self.plan if a.name == name]

    def train_all(self, only: list[str] | None = None) -> None:
        from ..train import Trainer

        for arm, seed in self.plan:
            if only is not None and arm.name not in only:
                continue
            rid = self.run_id(arm, seed)
            row = self.store.get(rid)
            if arm.method == "baseline" or row["status"] in ("trained", "evaluated"):
                continue
            tc = self.cfg.arm_config(arm, seed)
            print(f"[study] training {rid} ({arm.method}, optimizer={arm.optimizer}, "
                  f"placement={tc.method.placement or 'method default'})", flush=True)
            self.store.set_status(rid, "training")
            trainer = Trainer(tc).setup()
            try:
                summary = trainer.train(resume=True)
            except Exception as e:
                self.store.set_status(rid, "failed", error=f"{type(e).__name__}: {e}")
                raise
            finally:
                del trainer
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            self.store.set_status(rid, "trained", train_summary=summary)

    def evaluate_all(self) -> None:
        from ..evaluation.runner import load_handle, run_eval
        from ..evaluation.config import EvalConfig

        handle = None
        for arm, seed in self.plan:
            rid = self.run_id(arm, seed)
            row = self.store.get(rid)
            if row["status"] == "evaluated":
                continue
            if arm.method != "baseline" and row["status"] != "trained":
                raise RuntimeError(f"{rid} is {row['status']}, not trained; cannot evaluate")
            run_dir = Path(self.cfg.arm_config(arm, seed).run_dir) if arm.method != "baseline" \
                else self.dir / "runs" / rid
            raw = {**self.cfg.evaluation, "out_dir": str(run_dir / "eval"), "progress": True,
                   "adapter": str(run_dir / "adapter") if arm.method != "baseline" else None,
                   "model": _eval_model_section(self.cfg.train.get("model", {}))}
            ecfg = EvalConfig.model_validate(raw)
            if handle is None:
                handle = load_handle(ecfg)
            print(f"[study] evaluating {rid}", flush=True)
            result = run_eval(ecfg, handle=handle)
            self.store.set_status(rid, "evaluated", eval_result=result)

    def records(self) -> list[dict]:
        out = []
        by_id = {r["run_id"]: r for r in self.store.all()}
        for arm, seed in self.plan:
            row = by_id[self.run_id(arm, seed)]
            ev = row["eval_result"] or {}
            summary = row["train_summary"]
            run_dir = Path(ev.get("out_dir", "")).parent if ev else None
            metrics_path = None
            if summary is not None and arm.method != "baseline":
                metrics_path = str(Path(self.cfg.arm_config(arm, seed).run_dir) / "metrics.jsonl")
            tc = self.cfg.arm_config(arm, seed) if arm.method != "baseline" else None
            out.append({
                "arm": arm.name, "seed": seed, "method": arm.method,
                "optimizer": arm.optimizer if arm.method != "baseline" else None,
                "placement": (tc.method.placement or _default_placement(arm.method)) if tc else "none",
                "overrides": dict(arm.overrides),
                "train": None if summary is None else {
                    k: summary.get(k) for k in ("train_seconds", "tokens_per_s", "peak_gpu_memory_gib", "train_tokens",
                                                "num_processes")},
                "metrics_path": metrics_path,
                "eval": ev.get("summary", {}),
                "embeddings_path": ev.get("embeddings_path"),
                "run_dir": str(run_dir) if run_dir else None,
            })
        return out

    def report(self) -> dict:
        from .report import build_report

        rep = self.cfg.report
        return build_report(self.records(), self.dir, n_resamples=rep.get("n_resamples", 1000),
                            seed=rep.get("seed", 0), alpha=rep.get("alpha", 0.05))

    def run(self) -> dict:
        self.train_all()
        self.evaluate_all()
        result = self.report()
        print(f"\n[study] results: {self.dir / 'results.md'}")
        print(f"[study] compare training curves: tensorboard --logdir {self.dir / 'tensorboard'}")
        return result


def _default_placement(method: str) -> str:
    from ..losses import get_method

    return get_method(method).default_placement


def _eval_model_section(model: dict) -> dict:
    keep = ("name", "dtype", "load_in_4bit", "trust_remote_code", "attn_implementation", "revision")
    return {k: v for k, v in model.items() if k in keep}


def run_study(path: str | Path, overrides: list[str] | None = None) -> dict:
    return StudyRunner(load_study(path, overrides)).run()


def print_table(study_dir: str | Path) -> None:
    p = Path(study_dir) / "results.md"
    print(p.read_text() if p.exists() else json.dumps({"error": f"{p} not found"}))
