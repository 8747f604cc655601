"""Typed run configuration: YAML + `key=value` overrides; unknown keys are errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from .data.loaders import PreferenceFormat
from .grit.config import GritConfig
from .losses.cita import CITAConfig
from .losses.registry import MethodConfig
from .strict import Strict

Dtype = Literal["auto", "bf16", "fp16", "fp32"]


class InferenceModelSection(Strict):
    """What identifies and loads a model (`models.load_model`); shared by training and evaluation configs."""

    name: str = "smollm2-135m-instruct"  # the embedded model, a hub id or a local path
    dtype: Dtype = "auto"  # auto = bf16 on a GPU that supports it, else fp32
    load_in_4bit: bool = False  # NF4 + double quantisation, bf16 compute (needs bitsandbytes and a GPU)
    # how bitsandbytes stores the packed 4-bit weights: bf16 lets FSDP2 shard them (it shards floating tensors only);
    # auto = bf16 under accelerate's FSDP, else uint8 (models.quant_storage)
    quant_storage: Literal["auto", "uint8", "bf16"] = "auto"
    trust_remote_code: bool = False
    attn_implementation: str | None = "sdpa"
    revision: str | None = None


class ModelSection(InferenceModelSection):
    gradient_checkpointing: bool = False


class LoraSection(Strict):
    r: int = Field(default=16, ge=1)
    alpha: int = Field(default=16, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    use_rslora: bool = False


class DataSection(Strict):
    path: str = "demo:preferences"
    format: PreferenceFormat = "generic"
    on_bad_row: Literal["error", "skip"] = "error"
    instruction: str | None = None  # for formats without a per-row instruction
    column_map: dict[str, str] = {}
    limit: int | None = Field(default=None, ge=1)
    val_fraction: float = Field(default=0.0, ge=0, lt=1)  # held-out validation pairs (never trained on)
    split_seed: int = 0  # the split's own seed: every arm and training seed sees the same train/val pairs
    max_length: int = Field(default=1024, ge=2)
    max_prompt_length: int = Field(default=512, ge=1)


class OptimizerSection(Strict):
    name: Literal["adamw", "adamw8bit", "grit"] = "adamw"
    lr: float = Field(default=5e-5, gt=0, allow_inf_nan=False)
    weight_decay: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0, allow_inf_nan=False)
    # GritConfig fields that differ from its defaults (docs/grit.md); only with name: grit. The inner
    # optimizer's lr, weight_decay, betas and eps come from this section unless set here.
    grit: dict[str, Any] = {}

    @field_validator("grit")
    @classmethod
    def _grit_fields(cls, v):  # a typo or a bad range fails when the config loads, not hours later
        GritConfig.model_validate(v)
        return v

    def grit_config(self) -> GritConfig:
        return GritConfig.model_validate(
            {"lr": self.lr, "weight_decay": self.weight_decay, "betas": self.betas, "eps": self.eps, **self.grit}
        )


class ScheduleSection(Strict):
    name: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)


class TrainSection(Strict):
    # Numbers are checked when the config loads: a zero or negative count would train nothing (or divide by zero).
    max_steps: int = Field(default=10, ge=1)
    micro_batch_size: int = Field(default=2, ge=1)  # pairs per micro-batch
    grad_accum: int = Field(default=4, ge=1)
    # Re-split each step's pairs (micro_batch_size x grad_accum per process, same order) into micro-batches of
    # at most this many packed tokens: fewer, larger forwards for short pairs, bounded memory for long ones.
    # The loss and gradient stay those of the step's pairs. "auto": sized at start-up (train/sizing.py);
    # null (or off): the plain micro_batch_size x grad_accum split.
    micro_batch_tokens: int | Literal["auto"] | None = "auto"
    # auto only: the peak GPU memory to size for (None: this process's share of the card's free memory)
    memory_budget_gib: float | None = Field(default=None, gt=0)
    # Attention over packed rows (train/attention.py): "varlen" = variable-length FlashAttention, "flex" =
    # FlexAttention with a document block mask (both CUDA; no dense [tokens x tokens] mask), "dense" = SDPA
    # with transformers' block-diagonal mask; "auto" = varlen on CUDA (flex where torch has no varlen), dense
    # elsewhere. Checked against dense on the GPU by benchmarks/verify_kernels.py (docs/benchmarks.md).
    packed_attention: Literal["auto", "varlen", "flex", "dense"] = "auto"
    # Regional torch.compile of each decoder layer (train/compile.py): "auto" = on CUDA, off on CPU.
    compile_layers: Literal["auto", "on", "off"] = "auto"
    # Each LoRA projection's up-projection, scale and sum in one addmm (train/fused_lora.py): "auto" = on CUDA.
    fused_lora: Literal["auto", "on", "off"] = "auto"
    # How a 4-bit (NF4) base's linear layers dequantise (train/nf4.py): "torch" = torch ops that the compiled
    # decoder layer fuses (needs compiled layers), "bitsandbytes" = its own ops; "auto" = torch where the layers
    # are compiled. The same weights either way (checked against bitsandbytes' dequantisation).
    nf4_kernel: Literal["auto", "torch", "bitsandbytes"] = "auto"
    # With gradient checkpointing, keep the checkpointed layers' saved inputs in pinned host memory until the
    # backward (train/offload.py): "auto" = on with CUDA and checkpointing; "on" needs checkpointing.
    offload_activations: Literal["auto", "on", "off"] = "auto"
    max_grad_norm: float | None = Field(default=1.0, ge=0)  # 0 or null: no clipping
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    packing: bool = True
    # Response tokens per LM-head chunk (train/policy.py): each holds up to three [chunk x vocabulary] fp32 buffers.
    # 256 rather than 1024: CITA's peak 0.15 GiB lower at the same speed (measured:
    # docs/archive/benchmarks_history.md, "NF4 dequantisation inside the compiled layer", call 4).
    # CHANGED_DEFAULTS keeps configs fingerprinted at 1024 resumable.
    logp_chunk_size: int = Field(default=256, ge=1)
    log_every: int = Field(default=1, ge=1)
    # The validation curve (train/validation.py): every val_every optimizer steps and after the last, the
    # validation split's pair accuracy (implicit reward at val_reward_beta) and the method's loss are logged as
    # val/*, with cumulative gpu_seconds; 0 = off. Needs data.val_fraction > 0. Training is unchanged by it.
    val_every: int = Field(default=0, ge=0)
    val_reward_beta: float = Field(default=0.1, gt=0, allow_inf_nan=False)
    val_batch_size: int = Field(default=8, ge=1)
    save_every: int = Field(default=0, ge=0)  # 0 = only at the end
    keep_checkpoints: int = Field(default=2, ge=1)
    on_nonfinite: Literal["error", "skip"] = "error"
    progress: bool = True

    @field_validator("micro_batch_tokens", mode="before")
    @classmethod
    def _tokens_off(cls, v):  # YAML reads a bare `off` as false
        return None if v is False or v == "off" else v

    @field_validator("compile_layers", "fused_lora", "offload_activations", mode="before")
    @classmethod
    def _yaml_on_off(cls, v):  # YAML reads a bare `on`/`off` as true/false
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v

    @field_validator("micro_batch_tokens")
    @classmethod
    def _tokens_positive(cls, v):
        if isinstance(v, int) and v <= 0:
            raise ValueError("micro_batch_tokens must be a positive number of tokens, 'auto' or null")
        return v

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, v):  # YAML reads a bare `no` as false
        return "no" if v is False else v


class TrainConfig(Strict):
    run_dir: str = "runs/train"
    seed: int = 0
    model: ModelSection = Field(default_factory=ModelSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection = Field(default_factory=DataSection)
    method: MethodConfig = Field(default_factory=CITAConfig)  # one of ecliptica.losses, chosen by `name`
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    train: TrainSection = Field(default_factory=TrainSection)
    tensorboard_dir: str | None = None  # shared log root (a study overlays its arms); default run_dir/tb
    run_name: str | None = None

    @field_validator("method", mode="before")
    @classmethod
    def _default_method(cls, v):  # a method block that names no method is the default method's (CITA)
        return {"name": "cita", **v} if isinstance(v, dict) and "name" not in v else v

    @model_validator(mode="after")
    def _check(self):
        if self.optimizer.grit and self.optimizer.name != "grit":
            raise ValueError("optimizer.grit settings given but optimizer.name is not 'grit'")
        if self.train.val_every and not self.data.val_fraction:
            raise ValueError(
                f"train.val_every: {self.train.val_every} scores the validation split, but data.val_fraction is 0: "
                "set data.val_fraction > 0, or train.val_every: 0"
            )
        return self

    def hash(self) -> str:
        return config_hash(without_added_defaults(self.model_dump(mode="json")))


def config_hash(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# Settings added after runs and studies already existed, with their defaults. At the default they are left out of
# a config's fingerprint (TrainConfig.hash, a study's run hashes) and out of resume comparisons, so a run or study
# begun before the setting existed goes on. Only settings that change speed or memory, never what is computed
# beyond rounding, belong here (fused_lora: benchmarks/verify_kernels.py and docs/archive/benchmarks_history.md,
# "a fused LoRA projection"; nf4_kernel: tests/train/test_nf4.py and the same file, "NF4 dequantisation inside the
# compiled layer").
# The validation curve's settings (val_*) change only what is logged, never the weights (tests/train/test_validation.py).
ADDED_SETTINGS = {
    ("train", "fused_lora"): "auto",
    ("train", "nf4_kernel"): "auto",
    ("train", "val_every"): 0,
    ("train", "val_reward_beta"): 0.1,
    ("train", "val_batch_size"): 8,
}


# Settings whose default changed after runs and studies already existed: (the old default, the new one). A config
# holding the new default is fingerprinted and compared on resume as if it held the old one, so a run or study begun
# under the old default goes on (a resumed run continues with the new value). Only settings that change speed or
# memory, never what is computed beyond rounding, belong here. logp_chunk_size: each response token's log-softmax is
# its own, so the chunk only changes the LM head's matmul shapes (docs/archive/benchmarks_history.md, "NF4
# dequantisation inside the compiled layer").
CHANGED_DEFAULTS = {("train", "logp_chunk_size"): (1024, 256)}


def without_added_defaults(d: dict) -> dict:
    """A TrainConfig dump (model_dump(mode="json")) as fingerprinted: without the ADDED_SETTINGS that hold their
    default, and with the CHANGED_DEFAULTS that hold the new default written as the old one."""
    out = dict(d)
    for (section, key), default in ADDED_SETTINGS.items():
        if isinstance(out.get(section), dict) and out[section].get(key, default) == default:
            out[section] = {k: v for k, v in out[section].items() if k != key}
    for (section, key), (old, new) in CHANGED_DEFAULTS.items():
        if isinstance(out.get(section), dict) and out[section].get(key) == new:
            out[section] = {**out[section], key: old}
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key.sub=value")
    key, value = text.split("=", 1)
    try:
        return key.strip().split("."), yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ValueError(f"override {text!r}: the value is not valid YAML ({_yaml_problem(e)})") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides or []:
        path, value = parse_override(item)
        node = raw
        for k in path[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {k!r} is not a section")
        node[path[-1]] = value
    return raw


def load_yaml(path: str | Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ValueError(f"{where}: YAML syntax error: {_yaml_problem(e)}; fix the file at that line") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be a mapping")
    return data


def _yaml_problem(e: yaml.YAMLError) -> str:
    return " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)


def load_config(path: str | Path | None, overrides: list[str] | None = None, cls=TrainConfig):
    raw = load_yaml(path) if path else {}
    raw = apply_overrides(raw, overrides or [])
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        where = f"{path}" if path else "config"
        raise ValueError(f"{where}: invalid configuration:\n{e}") from None


def save_config(cfg: BaseModel, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
