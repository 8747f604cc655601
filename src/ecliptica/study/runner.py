"""Run a study: train every arm x seed with the one engine, evaluate each with the one evaluator
(baseline untrained), then write the paper's table and figures.

Phases are resumable: the SQLite store says what is done. Training runs first (each resumes from
its latest checkpoint if it was interrupted), then evaluation loads the base model once and swaps
adapters, then the report is rebuilt from the store.

With `workers > 1` the runs are spread over worker processes (one per GPU, or several sharing one
GPU when a small model leaves it idle): each worker claims runs in the store, so every run is
trained and evaluated exactly once, by the same code as the single-process path.

With `calibration` on, a calibration phase comes first: each trained arm's sweep is trained on the
train split and scored on the validation split (by the workers, each claiming sweep points, when
there are several), the config's rule picks each arm's settings, and only then are the final runs
registered, with them.
"""

from __future__ import annotations

import gc
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from ..config import config_hash, load_config, without_added_defaults
from ..runio import DirLock
from .calibration import calibrate, chosen_settings, register_points, stored_calibration_rows, write_calibration
from .config import ArmSpec, StudyConfig
from .store import StudyStore

# torch's compile caches, which each worker process gets to itself (StudyRunner._compile_caches)
COMPILE_CACHE_VARS = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


def load_study(path: str | Path, overrides: list[str] | None = None) -> StudyConfig:
    return load_config(path, overrides, cls=StudyConfig)


class StudyRunner:
    def __init__(self, cfg: StudyConfig, worker: str | None = None):
        """`worker` names a worker process started by `run(workers=N)`; it claims runs before touching them."""
        self.cfg = cfg
        self.worker = worker
        self.dir = Path(cfg.study_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.store = StudyStore(self.dir / "study.sqlite")
        self._given_back: dict[tuple[str, str], str] = {}  # run or sweep point -> the dead worker that held it
        self.crashed_workers: list[dict] = []
        self.plan: list[tuple[ArmSpec, int]] = [(arm, seed) for seed in cfg.seeds for arm in cfg.arms]
        if cfg.calibration.enabled:  # now, so a changed setting is refused before any work
            register_points(cfg, self.store)
        # each trained arm's calibrated settings ({} without calibration); None until the sweep is done
        self.calibrated = chosen_settings(cfg, self.store)
        if self.calibrated is not None:
            self._register_plan()
        # workers read this file; only the coordinator writes it, once the store accepted the calibration points
        # and (with the sweep done) the final runs; workers share the sweep, so it cannot wait for the choice
        if worker is None:
            tmp = self.dir / "study.yaml.tmp"
            tmp.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
            tmp.replace(self.dir / "study.yaml")

    def _register_plan(self) -> None:
        for arm, seed in self.plan:
            self.store.register(
                self.run_id(arm, seed), arm.name, seed, self._hash(arm, seed), self._describe(arm, seed)
            )

    def calibrate(self) -> None:
        """The calibration phase (resumable); afterwards the final runs are registered with the choices."""
        if self.calibrated is None:
            self.calibrated = calibrate(self.cfg, self.store)
            self._register_plan()

    def arm_config(self, arm: ArmSpec, seed: int):
        """The final run's TrainConfig: the study's shared settings + the arm's + its calibrated choice."""
        if self.calibrated is None:
            raise RuntimeError("calibration is unfinished; call calibrate() first")
        return self.cfg.arm_config(arm, seed, self.calibrated.get(arm.name))

    def run_id(self, arm: ArmSpec, seed: int) -> str:
        return self.cfg.run_id(arm, seed)

    def _describe(self, arm: ArmSpec, seed: int) -> dict:
        # keys added by later versions appear only when used, so existing stores keep their hashes
        d = {
            "arm": arm.model_dump(exclude={"instruction"} if arm.instruction is None else None),
            "seed": seed,
            "evaluation": self.cfg.evaluation_fingerprint(),
        }
        if self.cfg.evaluation_sets:
            d["evaluation_sets"] = self.cfg.eval_sets()
        if arm.trained:
            d["train"] = without_added_defaults(self.arm_config(arm, seed).model_dump(mode="json"))
        else:
            d["model"] = self.cfg.train.get("model", {})
        if arm.method == "prompt_only":
            d["instruction"] = self.cfg.prompt_instruction(arm)
        return d

    def _hash(self, arm: ArmSpec, seed: int) -> str:
        return config_hash(self._describe(arm, seed))

    # ---------------------------------------------------------------- phases
    def train_arm(self, name: str) -> list[dict]:
        """Train one arm (all seeds); returns the training summaries. Used by the per-arm notebooks."""
        if name not in {a.name for a in self.cfg.arms}:
            raise ValueError(f"no arm {name!r} in this study; arms: {[a.name for a in self.cfg.arms]}")
        with self._lock():
            self.store.release_all()  # claims of a killed earlier invocation (we hold the study)
            self.train_all(only=[name])
        return [self.store.get(self.run_id(a, s))["train_summary"] for a, s in self.plan if a.name == name]

    def train_all(self, only: list[str] | None = None) -> None:
        self.calibrate()
        for arm, seed in self.plan:
            if not arm.trained or (only is not None and arm.name not in only):
                continue
            rid = self.run_id(arm, seed)
            if self._claim(rid, lambda st: st not in self._not_to_train):
                self._train_one(arm, seed, rid)

    def _train_one(self, arm: ArmSpec, seed: int, rid: str) -> None:
        """Train a run this process has claimed (resuming from its latest checkpoint); releases the claim."""
        from ..train import Trainer

        try:
            tc = self.arm_config(arm, seed)
            print(
                f"[study] training {rid} ({arm.method}, optimizer={arm.optimizer}, "
                f"placement={tc.method.placement or 'method default'})",
                flush=True,
            )
            self.store.set_status(rid, "training")
            trainer = None
            try:  # setup too: a run that cannot even start is failed, with why, not left for the next worker
                # the store says this run is unfinished: continue its checkpoint, or train it again without one
                trainer = Trainer(tc, resume=True, restart_without_checkpoint=True).setup()
                summary = trainer.train()
            except Exception as e:
                self.store.set_status(rid, "failed", error=f"{type(e).__name__}: {e}")
                raise
            finally:
                del trainer
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            self.store.record_split("preference", summary["data"]["split"])
            self.store.set_status(rid, "trained", train_summary=summary)
        finally:
            self._release(rid)

    @property
    def _not_to_train(self) -> tuple[str, ...]:
        # a worker leaves failed runs alone (the coordinator retries them on the next invocation)
        return ("trained", "evaluated", "failed") if self.worker else ("trained", "evaluated")

    def evaluate_all(self, only: list[str] | None = None) -> None:
        """Evaluate every trained run and the baseline (or only the arms named in `only`). A worker also
        waits for runs other workers are still training, and evaluates them when they are done."""
        while True:
            rows = {r["run_id"]: r for r in self.store.all()}
            waiting = False
            for arm, seed in self.plan:
                rid = self.run_id(arm, seed)
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
                    if self._claim(rid, lambda st: st not in self._not_to_train):
                        self._train_one(arm, seed, rid)
                    waiting = True  # trained now, or another worker is training it: evaluated on a later pass
                    continue
                if not self._claim(
                    rid, lambda st, base=not arm.trained: st == "trained" or (base and st != "evaluated")
                ):
                    waiting = True
                    continue
                try:
                    self._evaluate_one(arm, seed, rid)
                finally:
                    self._release(rid)
            if not waiting:
                return
            time.sleep(2.0)

    _handle = None
    _prompts: dict = {}

    def _evaluate_one(self, arm: ArmSpec, seed: int, rid: str) -> None:
        """Evaluate one run on every named prompt set; the `test` set's record is the one the report reads."""
        from ..evaluation.model_handle import ModelHandle
        from ..evaluation.runner import prompts_from_config, run_eval
        from ..evaluation.summary import summarize_eval
        from .tb import write_eval_scalars

        run_dir = self._run_dir(arm, seed)
        records, summaries = {}, {}
        behaviour = (
            None
            if arm.method == "prompt_only"  # the same for every evaluation set
            else self._with_training_instruction(self.cfg.evaluation.behaviour.model_dump(), arm, seed)
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
                self._prompts = {**self._prompts, split: prompts_from_config(ecfg)}
            prompts = self._prompts[split]
            print(f"[study] evaluating {rid}" + (f" on {split}" if self.cfg.evaluation_sets else ""), flush=True)
            result = run_eval(ecfg, handle=self._handle, prompts=prompts)
            emb_path = _write_embeddings(result, prompts, out / "embeddings.npz")
            if split == "dev" and result.get("aqi_behaviour"):
                dev_weights = {**result["aqi_behaviour"]["learned"]["fit"], "fitted_on": f"dev ({out / 'eval.json'})"}
            summaries[split] = summarize_eval(result)
            records[split] = {
                "summary": summaries[split].model_dump(),
                "embeddings_path": str(emb_path),
                "eval_json": str(out / "eval.json"),
            }
            self.store.record_split(
                f"eval:{split}", {"n_prompts": result["data"]["n_prompts"], "data_hash": result["data"]["data_hash"]}
            )
            self.store.set_evaluation(rid, split, records[split])
        # beside the run's training curves; like the report, the test set's numbers
        write_eval_scalars(
            self.dir / "tensorboard" / rid,
            summaries["test"],
            step=(self.store.get(rid)["train_summary"] or {}).get("steps", 0),
        )
        self.store.set_status(rid, "evaluated", eval_result=records["test"])

    @property
    def _claimant(self) -> str:
        return self.worker or f"main-{os.getpid()}"

    def _lock(self) -> DirLock:
        """The coordinator holds the study directory; its workers (started by it) work under that hold."""
        return DirLock(self.dir, "study") if self.worker is None else _NoLock()

    def _with_training_instruction(self, behaviour: dict, arm: ArmSpec, seed: int) -> dict:
        """Behaviour settings that also evaluate with the instruction an arm was trained with (same text,
        same placement); the baseline gets every such variant, so each arm has a base to compare with.
        The headline (`behaviour.shown_placement`) stays as configured, `none` by default: comparable
        across arms. Arms trained on per-row instructions have no single text and keep `none` only."""
        arms = [a for a in self.cfg.arms if a.trained] if arm.method == "baseline" else [arm]
        placements = list(behaviour.get("placements", ["none"]))
        instruction = behaviour.get("instruction")
        for a in arms:
            tc = self.cfg.arm_config(a, seed)  # placement and instruction: calibration does not change them
            placement, text = tc.method.placement or _default_placement(a.method), tc.data.instruction
            if placement != "none" and (instruction or text):
                instruction = instruction or text
                placements = list(dict.fromkeys([*placements, placement]))
        return {**behaviour, "placements": placements, **({"instruction": instruction} if instruction else {})}

    def _claim(self, rid: str, needs_work) -> bool:
        """True if this process should work on `rid` now: it still needs the work and the store gave us
        the run (re-read after claiming: another process may just have finished it). The single-process
        path claims too, so nothing else touches a run while it trains or evaluates it."""
        if not self.store.claim(rid, self._claimant):
            return False
        if needs_work(self.store.get(rid)["status"]):
            return True
        self.store.release(rid)
        return False

    def _release(self, rid: str) -> None:
        self.store.release(rid)

    def _run_dir(self, arm: ArmSpec, seed: int) -> Path:
        if not arm.trained:
            return self.dir / "runs" / self.run_id(arm, seed)
        return Path(self.arm_config(arm, seed).run_dir)

    def records(self) -> list[dict]:
        return study_records(self.cfg)[0]

    def report(self) -> dict:
        return report_study(self.cfg)

    def run(self, workers: int = 1, devices: list[str] | None = None) -> dict:
        """Run the study and write its report; an incomplete study raises instead, naming every run left.
        With workers, `crashed_workers` then lists each worker that exited abnormally although the others
        redid all it held ({name, returncode, log}): the study is complete, but the caller should say so."""
        self.crashed_workers = []
        with self._lock():  # a second `ecliptica run` on this study stops here, naming this process
            if workers > 1:
                if self.calibrated is None:  # workers score the sweep points; the choice is made here
                    self._run_workers(workers, devices, phase="calibration")
                self.calibrate()
                self._run_workers(workers, devices)
            else:
                self.store.release_all()  # claims left by a killed earlier invocation
                self.train_all()
                self.evaluate_all()
            result = self.report()
        print(f"\n[study] results: {self.dir / 'results.md'}")
        print(f"[study] training curves and eval/ scalars: tensorboard --logdir {self.dir / 'tensorboard'}")
        return result

    def work(self) -> None:
        """A worker's whole job: while calibration is unfinished, score the sweep points nobody else is
        scoring; otherwise train what nobody else is training, then evaluate."""
        print(
            f"[study] {self.worker}: torch compile caches (this worker's own) "
            + " ".join(f"{v}={os.environ.get(v, '(torch default)')}" for v in COMPILE_CACHE_VARS),
            flush=True,
        )
        if self.calibrated is None:
            # points a dead worker held come back unclaimed, maybe after this worker's pass: pass again
            # until every point of this sweep is scored, failed, or being scored by another worker
            sweep_ids = {p["point_id"] for _, p, _ in register_points(self.cfg, self.store)}
            while True:
                calibrate(self.cfg, self.store, worker=self.worker)
                left = [p for p in self.store.calibration() if p["point_id"] in sweep_ids and p["status"] == "pending"]
                if not left:
                    return
                time.sleep(2.0)
        self.train_all()
        self.evaluate_all()

    def _run_workers(self, workers: int, devices: list[str] | None, phase: str = "runs") -> None:
        """Start `workers` processes on this study (round-robin over `devices`, e.g. GPU ids), show
        their progress, and clean up after any that dies so the others never wait for it."""
        from tqdm.auto import tqdm

        from ..models import resolve_model_path

        resolve_model_path(self.cfg.train.get("model", {}).get("name", "smollm2-135m-instruct"))  # convert once, here
        self.store.release_all()  # claims left by a killed earlier invocation
        for r in self.store.all():
            if r["status"] == "failed":  # retried, as in the single-process path
                self.store.set_status(r["run_id"], "pending")
        for p in self.store.calibration():
            if p["status"] == "failed":
                self.store.set_point(p["point_id"], "pending")
        logs = self.dir / "logs"
        logs.mkdir(exist_ok=True)
        threads = max(1, (os.cpu_count() or 1) // workers)
        procs = {}
        for i in range(workers):
            env = dict(os.environ)
            env.setdefault("OMP_NUM_THREADS", str(threads))
            if devices:
                env["CUDA_VISIBLE_DEVICES"] = devices[i % len(devices)]
                shared = sum(1 for j in range(workers) if devices[j % len(devices)] == devices[i % len(devices)])
            else:
                shared = workers  # all on the same default device (or the same CPU cores)
            env["ECLIPTICA_DEVICE_SHARED_BY"] = str(shared)
            name = f"worker{i}"
            env.update(self._compile_caches(name))
            log = open(logs / f"{name}.log", "ab")
            cmd = [sys.executable, "-m", "ecliptica.cli", "run", str(self.dir / "study.yaml"), "--worker", name]
            procs[name] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log)
        print(
            f"[study] {workers} workers{' on devices ' + ','.join(devices) if devices else ''}; logs in {logs}",
            flush=True,
        )
        trained_arms = {a.name for a in self.cfg.arms if a.trained}
        if phase == "calibration":
            n_work, desc = len(self.store.calibration()), "calibration sweep (train + score)"
        else:
            n_work, desc = (
                sum(1 for a, _ in self.plan if a.name in trained_arms) + len(self.plan),
                "study runs (train + eval)",
            )
        crashed = []
        with tqdm(total=n_work, desc=desc, unit="job") as bar:
            while procs:
                time.sleep(2.0)
                for name, (proc, log) in list(procs.items()):
                    if proc.poll() is None:
                        continue
                    log.close()
                    del procs[name]
                    if proc.returncode != 0:
                        crashed.append({"name": name, "returncode": proc.returncode, "log": logs / f"{name}.log"})
                        print(
                            f"[study] warning: {name} exited with status {proc.returncode} (see "
                            f"{logs / f'{name}.log'}); what it held goes back to the other workers",
                            file=sys.stderr,
                            flush=True,
                        )
                        self._abandon(name)
                if phase == "calibration":
                    done = sum(p["status"] == "scored" for p in self.store.calibration())
                else:
                    done = sum(
                        (r["status"] in ("trained", "evaluated") and r["arm"] in trained_arms)
                        + (r["status"] == "evaluated")
                        for r in self.store.all()
                    )
                bar.update(done - bar.n)
        if phase == "calibration":
            sweep_ids = {p["point_id"] for _, p, _ in register_points(self.cfg, self.store)}
            bad = [
                {"run_id": p["point_id"], "status": p["status"], "error": p["error"]}
                for p in self.store.calibration()
                if p["point_id"] in sweep_ids and p["status"] != "scored"
            ]
        else:
            bad = [r for r in self.store.all() if r["status"] != "evaluated"]
        self.crashed_workers += crashed
        if bad:  # never empty: a crashed worker whose work the others finished is only a warning
            what = "calibration points not scored" if phase == "calibration" else "runs not evaluated"
            raise RuntimeError(
                f"study incomplete: {what}: "
                + ", ".join(f"{r['run_id']} ({r['status']}{': ' + r['error'] if r['error'] else ''})" for r in bad)
                + (f"; workers that exited abnormally: {', '.join(c['name'] for c in crashed)}" if crashed else "")
                + f" (logs in {logs}); run the same command again to retry them"
            )

    def _compile_caches(self, name: str) -> dict[str, str]:
        """A worker's own torch compile caches, so that workers compiling at once never race on Inductor's and
        Triton's files. By default they live in STUDY_DIR/workers/<name>/, so a rerun of the study starts warm. A directory
        set in the environment (by the user, or by torch in this process) is kept as the parent, with a
        subdirectory per study and worker: two studies running at once never share one either."""
        study = f"{self.dir.name}-{hashlib.sha1(str(self.dir.resolve()).encode()).hexdigest()[:8]}"
        out = {}
        for var, sub in zip(COMPILE_CACHE_VARS, ("inductor", "triton")):
            parent = os.environ.get(var)
            out[var] = str(Path(parent) / study / name if parent else self.dir.resolve() / "workers" / name / sub)
        return out

    def _abandon(self, worker: str) -> None:
        """A worker died. The runs and sweep points it held go back to the other workers (a training run
        resumes from its latest checkpoint), once: if a second worker dies holding the same one, it is
        marked failed (the next invocation retries it), so one run that kills whichever process works on
        it cannot take every worker down. A trained run it was evaluating only goes back (marked failed,
        it would be trained again)."""
        for r in self.store.all():
            if r["worker"] == worker:
                first = self._given_back.get(("run", r["run_id"]))
                if r["status"] in ("pending", "training"):
                    if first:
                        self.store.set_status(
                            r["run_id"], "failed", error=f"{worker} exited while working on it, as {first} had before"
                        )
                    else:
                        self._given_back[("run", r["run_id"])] = worker
                self.store.release(r["run_id"])
        for p in self.store.calibration():
            if p["worker"] == worker:
                first = self._given_back.get(("point", p["point_id"]))
                if p["status"] == "pending":
                    if first:
                        self.store.set_point(
                            p["point_id"], "failed", error=f"{worker} exited while scoring it, as {first} had before"
                        )
                    else:
                        self._given_back[("point", p["point_id"])] = worker
                self.store.release_point(p["point_id"])


class _NoLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def _write_embeddings(result: dict, prompts, path: Path) -> Path:
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


def study_records(cfg: StudyConfig) -> tuple[list[dict], list[str]]:
    """One record per evaluated (arm, seed), read from the run directories (eval.json, summary.json),
    and the run ids not evaluated yet."""
    from .records import read_run

    records, missing = [], []
    for seed in cfg.seeds:
        for arm in cfg.arms:
            tc = cfg.arm_config(arm, seed) if arm.trained else None
            run_dir = Path(tc.run_dir) if tc else Path(cfg.study_dir) / "runs" / cfg.run_id(arm, seed)
            record = read_run(
                run_dir,
                arm=arm.name,
                seed=seed,
                method=arm.method,
                optimizer=arm.optimizer if tc else None,
                placement=(tc.method.placement or _default_placement(arm.method))
                if tc
                else ("system" if arm.method == "prompt_only" else "none"),
                overrides=arm.overrides,
            )
            if record is None:
                missing.append(cfg.run_id(arm, seed))
            else:
                records.append(record)
    return records, missing


def report_study(cfg: StudyConfig) -> dict:
    """Build the report from the run directories alone (no store needed: works on a copied study)."""
    from .report import build_report

    records, missing = study_records(cfg)
    notes = [f"Not evaluated yet, so left out: {', '.join(missing)}."] if missing else []
    rep = cfg.report
    with DirLock(cfg.study_dir, "study report"):  # no report while another process runs or reports this study
        return build_report(
            records,
            cfg.study_dir,
            n_resamples=rep.n_resamples,
            seed=rep.seed,
            alpha=rep.alpha,
            questions=cfg.questions,
            min_effect=rep.min_effect,
            arm_order=[a.name for a in cfg.arms],
            notes=notes,
            sections=_calibration_section(cfg),
        )


def _calibration_section(cfg: StudyConfig) -> list:
    """The sweep, the rule and each arm's choice (calibration.csv and its figure too), from the store or,
    in a copied study without one, from its calibration.csv."""
    rows = stored_calibration_rows(cfg.study_dir) if cfg.calibration.enabled else None
    if not rows:
        return []
    text = write_calibration(rows, Path(cfg.study_dir), cfg.calibration)
    return [lambda by_arm: text.rstrip("\n").splitlines()]


def _default_placement(method: str) -> str:
    from ..losses import get_method

    return get_method(method).default_placement
