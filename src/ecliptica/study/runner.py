"""Run a study: train every arm x seed with the one engine, evaluate each with the one evaluator
(baseline untrained), then write the paper's table and figures.

Phases are resumable: the SQLite store says what is done. Training runs first (each resumes from
its latest checkpoint if it was interrupted), then evaluation loads the base model once and swaps
adapters, then the report is rebuilt from the store.
"""
from __future__ import annotations

import gc
from pathlib import Path

import torch
import yaml

from ..config import config_hash, load_config
from .config import ArmSpec, StudyConfig
from .store import StudyStore



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
        from ..evaluation.config import EvalConfig
        from ..evaluation.model_handle import ModelHandle
        from ..evaluation.runner import prompts_from_config, run_eval
        from ..models import ModelConfig

        handle = prompts = None
        for arm, seed in self.plan:
            rid = self.run_id(arm, seed)
            row = self.store.get(rid)
            if row["status"] == "evaluated":
                continue
            if arm.method != "baseline" and row["status"] != "trained":
                raise RuntimeError(f"{rid} is {row['status']}, not trained; cannot evaluate")
            run_dir = self._run_dir(arm, seed)
            raw = {**self.cfg.evaluation, "out_dir": str(run_dir / "eval"),
                   "adapter": str(run_dir / "adapter") if arm.method != "baseline" else None,
                   "model": _eval_model_section(self.cfg.train.get("model", {}))}
            ecfg = EvalConfig.model_validate(raw)
            if handle is None:  # one base for every arm; adapters are swapped in unmerged
                handle = ModelHandle.load(ModelConfig(**ecfg.model.model_dump()))
                prompts = prompts_from_config(ecfg)
            print(f"[study] evaluating {rid}", flush=True)
            result = run_eval(ecfg, handle=handle, prompts=prompts)
            emb_path = _write_embeddings(result, prompts, run_dir / "eval" / "embeddings.npz")
            record = {"summary": _eval_summary(result), "embeddings_path": str(emb_path),
                      "eval_json": str(run_dir / "eval" / "eval.json")}
            self.store.set_status(rid, "evaluated", eval_result=record)

    def _run_dir(self, arm: ArmSpec, seed: int) -> Path:
        if arm.method == "baseline":
            return self.dir / "runs" / self.run_id(arm, seed)
        return Path(self.cfg.arm_config(arm, seed).run_dir)

    def records(self) -> list[dict]:
        out = []
        by_id = {r["run_id"]: r for r in self.store.all()}
        for arm, seed in self.plan:
            row = by_id[self.run_id(arm, seed)]
            ev = row["eval_result"] or {}
            summary = row["train_summary"]
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
                "run_dir": str(self._run_dir(arm, seed)),
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


def _write_embeddings(result: dict, prompts, path: Path) -> Path:
    """The reported layer's embeddings with labels, axioms and prompt ids, for the paired tests."""
    import numpy as np

    from ..evaluation.embeddings import load_cached

    emb = load_cached(Path(result["embeddings"]["cache_path"]))
    X = np.asarray(emb.at(result["embeddings"]["reported_layer"]), dtype=np.float32)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, X=X, labels=np.array([p.label for p in prompts]), axioms=np.array([p.axiom for p in prompts]),
             prompt_ids=np.array([p.row_id for p in prompts]))
    tmp.replace(path)
    return path


def _eval_summary(result: dict) -> dict:
    """The numbers the study table needs, from one eval.json."""
    s, aqi = result["summary"], result["aqi"]["overall"]
    out = {"aqi": {"value": s["aqi"], "low": s["aqi_low"], "high": s["aqi_high"]},
           "probe_auroc": {"value": s.get("probe_auroc"), "low": s.get("probe_auroc_low"),
                           "high": s.get("probe_auroc_high")},
           "benign_ppl": s.get("perplexity"), "benign_kl": s.get("kl_mean_token"), "collapsed": s.get("collapsed"),
           "n_prompts": aqi.get("n")}
    behaviour = result.get("behaviour") or {}
    if behaviour:
        first = behaviour.get("none") or next(iter(behaviour.values()))
        for key, name in (("refusal_rate_unsafe", "refusal_unsafe"), ("over_refusal_rate_safe", "over_refusal_safe")):
            r = first[key]
            out[name] = {"rate": r["rate"], "low": r["low"], "high": r["high"], "n": r["total"]}
    return out


def _default_placement(method: str) -> str:
    from ..losses import get_method

    return get_method(method).default_placement


def _eval_model_section(model: dict) -> dict:
    from ..config import InferenceModelSection

    return {k: v for k, v in model.items() if k in InferenceModelSection.model_fields}


def run_study(path: str | Path, overrides: list[str] | None = None) -> dict:
    return StudyRunner(load_study(path, overrides)).run()
