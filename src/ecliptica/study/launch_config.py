"""The study config's `launcher:` block: where each run's `ecliptica run-one` process runs (docs/scaling.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..config import Strict


class SubmititSettings(Strict):
    """Each run is one SLURM job (submitit); a sweep is submitted as one job array."""

    folder: str | None = None  # submitit's logs and job pickles; None: STUDY_DIR/slurm
    partition: str | None = None
    gpus_per_run: int = Field(1, ge=0)
    cpus_per_run: int = Field(8, ge=1)
    mem_gb: int | None = Field(None, ge=1)
    time_min: int = Field(240, ge=1)  # the job's time limit; a pre-empted or timed-out run is resubmitted
    array_parallelism: int = Field(64, ge=1)  # at most this many jobs of one array run at once
    # any other executor parameter, as submitit names it (e.g. {slurm_account: x, slurm_qos: y})
    additional: dict[str, str | int | float | bool] = {}
    cluster: Literal["slurm", "local", "debug"] | None = None  # None: slurm where sbatch exists; tests use debug


class RaySettings(Strict):
    """Each run is one Ray task reserving `num_gpus` (Ray sets CUDA_VISIBLE_DEVICES for it)."""

    address: str | None = None  # an existing cluster ("auto", "ray://host:10001"); None: start a local one
    num_gpus: float = Field(1, ge=0)
    num_cpus: float = Field(1, ge=0)


class LauncherSection(Strict):
    name: Literal["local", "submitit", "ray"] = "local"
    # launches of one run (the first included) before it is marked failed: a crash, an OOM kill, a pre-emption
    max_attempts: int = Field(3, ge=1)
    submitit: SubmititSettings = Field(default_factory=SubmititSettings)
    ray: RaySettings = Field(default_factory=RaySettings)
