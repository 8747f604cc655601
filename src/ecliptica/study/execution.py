"""Executing runs: claim a run in the store, train it (resuming its checkpoint), evaluate it.

A `RunExecutor` works for one process: the single-process study, or one worker of the pool (pool.py).
It keeps the evaluation base model and prompt sets loaded across the runs it evaluates (adapters are
swapped in unmerged), per instance.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ArmSpec
from .plan import StudyPlan

# torch's compile caches, which each worker process gets to itself (pool.compile_caches)
COMPILE_CACHE_VARS = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


class RunExecutor:
    def __init__(self, plan: StudyPlan, worker: str | None = None):
        """`worker` names a worker process started by the pool; it claims runs before touching them."""
        self.planning = plan
        self.cfg = plan.cfg
        self.store = plan.store
        self.dir = plan.dir
        self.worker = worker
        self._handle = None  # the evaluation base model, loaded once
        self._prompts: dict = {}  # evaluation set name -> prompts

    # ---------------------------------------------------------------- training
    def train_all(self, only: list[str] | None = None) -> None:
        self.planning.calibrate()
        for arm, seed in self.planning.plan:
            if not arm.trained or (only is not None and arm.name not in only):
                continue
            rid = self.planning.run_id(arm, seed)
            if self.claim(rid, lambda st: st not in self.not_to_train):
                self.train_one(arm, seed, rid)

    def train_one(self, arm: ArmSpec, seed: int, rid: str) -> None:
        """Train a run this process has claimed (resuming from its latest checkpoint); releases the claim."""
        try:
            tc = self.planning.arm_config(arm, seed)
            print(
                f"[study] training {rid} ({arm.method}, optimizer={arm.optimizer}, "
                f"placement={tc.method.placement or 'method default'})",
                flush=True,
            )
            self.store.set_status(rid, "training")
            try:  # setup too: a run that cannot even start is failed, with why, not left for the next worker
                summary = train_run(tc)
            except Exception as e:
                self.store.set_status(rid, "failed", error=f"{type(e).__name__}: {e}")
                raise
            self.store.record_split("preference", summary["data"]["split"])
            self.store.set_status(rid, "trained", train_summary=summary)
        finally:
            self.release(rid)

    @property
    def not_to_train(self) -> tuple[str, ...]:
        # a worker leaves failed runs alone (the coordinator retries them on the next invocation)
        return ("trained", "evaluated", "failed") if self.worker else ("trained", "evaluated")

    # ---------------------------------------------------------------- evaluation
    def evaluate_all(self, only: list[str] | None = None) -> None:
        """Evaluate every trained run and the baseline (or only the arms named in `only`). A worker also
        waits for runs other workers are still training, and evaluates them when they are done."""
        while True:
            rows = {r["run_id"]: r for r in self.store.all()}
            waiting = False
            for arm, seed in self.planning.plan:
                rid = self.planning.run_id(arm, seed)
                status = rows[rid]["status"]
                if status == "evaluated" or (self.worker and status == "failed"):
                    continue
                if only is not None and arm.name not in only:
                    continue
                ready = not arm.trained or status == "trained"
                if not ready:
                    if self.worker is None:
                        raise RuntimeError(f"{rid} is {status}, not trained; cannot evaluate")
                    # unclaimed yet untrained: its worker died and the coordinator gave it back, maybe after
                    # every other worker had passed it in train_all, so whoever waits here trains it
                    if self.claim(rid, lambda st: st not in self.not_to_train):
                        self.train_one(arm, seed, rid)
                    waiting = True  # trained now, or another worker is training it: evaluated on a later pass
                    continue
                if not self.claim(
                    rid, lambda st, base=not arm.trained: st == "trained" or (base and st != "evaluated")
                ):
                    waiting = True
                    continue
                try:
                    self.evaluate_one(arm, seed, rid)
                finally:
                    self.release(rid)
            if not waiting:
                return
            time.sleep(2.0)

    def evaluate_one(self, arm: ArmSpec, seed: int, rid: str) -> None:
        """Evaluate one run on every named prompt set and record it in the store."""
        from .tb import write_eval_scalars

        ev = self.evaluation(arm, seed, rid)
        for split, record in ev.records.items():
            self.store.record_split(f"eval:{split}", ev.splits[f"eval:{split}"])
            self.store.set_evaluation(rid, split, record)
        # beside the run's training curves; like the report, the test set's numbers
        write_eval_scalars(
            self.dir / "tensorboard" / rid,
            ev.summaries["test"],
            step=(self.store.get(rid)["train_summary"] or {}).get("steps", 0),
        )
        self.store.set_status(rid, "evaluated", eval_result=ev.records["test"])

    def evaluation(self, arm: ArmSpec, seed: int, rid: str) -> Evaluation:
        """Evaluate one run on every named prompt set (files in its run directory; the store is untouched);
        the `test` set's record is the one the report reads. run-one calls this too."""
        from ..evaluation.model_handle import ModelHandle
        from ..evaluation.runner import prompts_from_config, run_eval
        from ..evaluation.summary import summarize_eval
        from .frontier_runs import evaluate_checkpoints

        run_dir = self.planning.run_dir(arm, seed)
        ev = Evaluation({}, {}, {})
        behaviour = (
            None
            if arm.method == "prompt_only"  # the same for every evaluation set
            else self.planning.with_training_instruction(self.cfg.evaluation.behaviour.model_dump(), arm, seed)
        )
        dev_weights = None  # the learned layer pooling of the behaviour AQI: fitted on dev, applied to test
        for split, data in sorted(self.cfg.eval_sets().items(), key=lambda kv: kv[0] == "test"):
            out = run_dir / "eval" / split if self.cfg.evaluation_sets else run_dir / "eval"
            if arm.method == "prompt_only":
                ecfg = self.cfg.eval_config(out, None, data=data, system_instruction=self.cfg.prompt_instruction(arm))
            else:
                ecfg = self.cfg.eval_config(
                    out, run_dir / "adapter" if arm.trained else None, behaviour=behaviour, data=data
                )
            if split == "test" and dev_weights is not None:
                ecfg.behaviour_aqi.layer_weights = dev_weights
            if self._handle is None:  # one base for every arm; adapters are swapped in unmerged
                self._handle = ModelHandle.load(ecfg.model)
            if split not in self._prompts:
                self._prompts[split] = prompts_from_config(ecfg)
            prompts = self._prompts[split]
            print(f"[study] evaluating {rid}" + (f" on {split}" if self.cfg.evaluation_sets else ""), flush=True)
            result = run_eval(ecfg, handle=self._handle, prompts=prompts)
            emb_path = write_embeddings(result, prompts, out / "embeddings.npz")
            if split == "dev" and result.get("aqi_behaviour"):
                dev_weights = {**result["aqi_behaviour"]["learned"]["fit"], "fitted_on": f"dev ({out / 'eval.json'})"}
            ev.summaries[split] = summarize_eval(result)
            ev.records[split] = {
                "summary": ev.summaries[split].model_dump(),
                "embeddings_path": str(emb_path),
                "eval_json": str(out / "eval.json"),
            }
            ev.splits[f"eval:{split}"] = {
                "n_prompts": result["data"]["n_prompts"],
                "data_hash": result["data"]["data_hash"],
            }
        evaluate_checkpoints(self, arm, run_dir, behaviour, dev_weights)  # the frontier's earlier steps, if any
        return ev

    # ---------------------------------------------------------------- claims
    @property
    def claimant(self) -> str:
        return self.worker or f"main-{os.getpid()}"

    def claim(self, rid: str, needs_work) -> bool:
        """True if this process should work on `rid` now: it still needs the work and the store gave us
        the run (re-read after claiming: another process may just have finished it). The single-process
        path claims too, so nothing else touches a run while it trains or evaluates it."""
        if not self.store.claim(rid, self.claimant):
            return False
        if needs_work(self.store.get(rid)["status"]):
            return True
        self.store.release(rid)
        return False

    def release(self, rid: str) -> None:
        self.store.release(rid)


def train_run(tc) -> dict:
    """Train one run (resuming from its latest checkpoint); returns its summary. run-one calls this too."""
    from ..train import Trainer

    trainer = None
    try:
        # the store says this run is unfinished: continue its checkpoint, or train it again without one
        trainer = Trainer(tc, resume=True, restart_without_checkpoint=True).setup()
        return trainer.train()
    finally:
        del trainer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@dataclass
class Evaluation:
    records: dict[str, dict]  # evaluation set -> {summary, embeddings_path, eval_json}
    summaries: dict  # evaluation set -> EvalSummary
    splits: dict[str, dict]  # "eval:<set>" -> {n_prompts, data_hash}


def write_embeddings(result: dict, prompts, path: Path) -> Path:
    """What the run's `aqi` was computed from, with labels, axioms and prompt ids, for the paired tests.

    The discriminant headline: the band's held-out projections the evaluator saved (float64, so
    the study reproduces the recorded AQI exactly); otherwise the reported layer's embeddings.
    """
    import numpy as np

    from ..evaluation.embeddings import load_cached
    from ..evaluation.runner import BAND_PROJECTIONS

    if result.get("aqi_layers"):
        X = np.load(path.parent / BAND_PROJECTIONS)["Z"]
    else:
        emb = load_cached(Path(result["embeddings"]["cache_path"]))
        X = np.asarray(emb.at(result["embeddings"]["reported_layer"]), dtype=np.float32)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(
        tmp,
        X=X,
        labels=np.array([p.label for p in prompts]),
        axioms=np.array([p.axiom for p in prompts]),
        prompt_ids=np.array([p.row_id for p in prompts]),
    )
    tmp.replace(path)
    return path
