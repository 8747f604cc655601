"""The one training engine. Every method runs through `Trainer`: same loading, data order, precision,
batching, schedule and optimizer plumbing; only the loss (methods), the instruction placement and the
optimizer choice (AdamW or GRIT) differ between arms.

Built on accelerate (mixed precision, distributed launch, TensorBoard tracking); the loop itself is
small so every step is visible: forward -> loss -> backward, clip, optimizer step, schedule, log.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import TrainConfig, save_config
from ..data import (
    LoadOptions,
    describe_split,
    load_preferences,
    resolve_path,
    save_bad_rows,
    split_train_val,
    tokenize_pairs,
)
from ..data.tokenize import TokenizedData, TokenizeSettings
from ..losses import Ratio, ReferenceSettings, SequenceStats, build_loss
from ..models import apply_lora, describe_parameters, load_model, load_tokenizer, quant_storage
from ..provenance import git_commit, versions
from ..runio import (
    DirLock,
    atomic_dir,
    atomic_write_text,
    check_free_space,
    read_jsonl_tolerant,
    write_errors,
    write_jsonl,
)
from ..sharding import count_shard_units, full, full_state, is_sharded, load_sharded_adapter, shard_optimizer_state
from . import sizing
from .attention import resolve_packed_attention
from .batching import collate, split_by_tokens
from .compile import compile_decoder_layers, resolve_compile
from .fused_lora import fuse_lora_layers, resolve_fused_lora
from .nf4 import keep_out_of_ddp, resolve_nf4_kernel, use_torch_nf4
from .offload import resolve_offload
from .optim import build_optimizer, build_scheduler
from .policy import PolicyModel
from .reference import ReferenceCacheUse, reference_logps
from .safety import (
    TrainingWatch,
    UpdateSnapshot,
    all_finite,
    check_fresh_start,
    check_resumable,
    check_resume,
    complete_checkpoints,
    disk_needed,
    nonfinite_names,
)
from .state_io import load_state, save_state
from .summary import TrainSummary, write_train_summary
from .validation import ValidationCurve


class NonFiniteError(RuntimeError):
    pass


@dataclass
class StepResult:
    loss: float
    metrics: dict[str, float]
    tokens: int


def _mixed_precision(cfg: TrainConfig) -> str:
    mp = cfg.train.mixed_precision
    if mp != "auto":
        return mp
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def prepare_data(
    cfg: TrainConfig, tokenizer, placement: str, progress: bool = True, bad_rows_path: Path | None = None
) -> tuple[TokenizedData, dict]:
    """Load, validate, split and tokenise the training pairs and report what happened. Only the train part
    is trained on; the validation part (`data.val_fraction`, split by `data.split_seed`) is tokenised the
    same way and returned in info["val"] for held-out scoring (None without a validation part).
    With `bad_rows_path` (on_bad_row: skip) the skipped rows are written there and counted on the console,
    even when none or all were bad."""
    opts = LoadOptions(instruction=cfg.data.instruction, column_map=cfg.data.column_map)
    loaded = load_preferences(
        resolve_path(cfg.data.path), cfg.data.format, on_bad_row=cfg.data.on_bad_row, options=opts, limit=cfg.data.limit
    )
    if bad_rows_path is not None:
        save_bad_rows(loaded, bad_rows_path)
        print(
            f"[data] {cfg.data.path}: {loaded.report.rows_read} rows read, {len(loaded.report.bad_rows)} skipped "
            f"as bad (listed in {bad_rows_path})",
            flush=True,
        )
    train, val = split_train_val(loaded.examples, lambda e: e.row_id, cfg.data.val_fraction, cfg.data.split_seed)
    settings = TokenizeSettings(cfg.data.max_length, cfg.data.max_prompt_length)
    tokenized = tokenize_pairs(tokenizer, train, placement, settings, progress=progress)
    if not tokenized.pairs:
        raise ValueError(
            f"{cfg.data.path}: no training pairs left after validation and split "
            f"({loaded.report.rows_read} rows read, {len(loaded.report.bad_rows)} bad, "
            f"{len(val)} in validation)"
        )
    val_tokenized = tokenize_pairs(tokenizer, val, placement, settings, progress=False) if val else None
    split_ids = {"train": [e.row_id for e in train], "val": [e.row_id for e in val]}
    split = describe_split(split_ids["train"], split_ids["val"], cfg.data.val_fraction, cfg.data.split_seed)
    report = {
        "rows_read": loaded.report.rows_read,
        "kept": loaded.report.kept,
        "bad_rows": len(loaded.report.bad_rows),
        "filtered": dict(loaded.filtered),
        "train_pairs": len(train),
        "val_pairs": len(val),
        "split": split,
        "tokenization": tokenized.stats.as_dict(),
    }
    return tokenized, {"report": report, "loaded": loaded, "val": val_tokenized, "split_ids": {**split, **split_ids}}


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        resume: bool | None = None,
        overwrite: bool = False,
        restart_without_checkpoint: bool = False,
    ):
        """`resume`/`overwrite` given here are checked in setup(), before the model loads; `resume`
        may instead be passed to train(). A resume continues from a checkpoint and refuses a run it cannot
        continue (safety.check_resumable); `restart_without_checkpoint` instead trains such a run again from
        step 0, for a caller that owns the run directory and knows the run is unfinished (a study)."""
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.resume, self.overwrite = resume, overwrite
        self.restart_without_checkpoint = restart_without_checkpoint
        self._lock: DirLock | None = None
        self._start_checked = False
        self.summary: TrainSummary | None = None  # set when train() finishes the run

    # ------------------------------------------------------------------ setup
    def setup(self) -> Trainer:
        """Take the run directory (exclusive; proves it writable) before any slow work, then build."""
        if int(os.environ.get("RANK", "0")) == 0:  # one lock per run, held by the main process
            self._lock = DirLock(self.run_dir, "train").acquire()
        try:
            if self.resume is not None:
                self._check_start(self.resume)
            return self._setup()
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _check_start(self, resume: bool) -> None:
        if int(os.environ.get("RANK", "0")) == 0 and not self._start_checked:
            check_fresh_start(self.run_dir, resume, self.overwrite)
            if resume and not self.restart_without_checkpoint:
                check_resumable(self.run_dir, self.cfg.model_dump(mode="json"))
        self._start_checked = True

    def _setup(self) -> Trainer:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        cfg = self.cfg
        tb_dir = Path(cfg.tensorboard_dir) if cfg.tensorboard_dir else self.run_dir / "tb"
        self.accelerator = Accelerator(
            mixed_precision=_mixed_precision(cfg), log_with="tensorboard", project_dir=str(tb_dir)
        )
        acc = self.accelerator
        set_seed(cfg.seed)
        if torch.cuda.is_available():
            # cuDNN attention builds a plan per new sequence length; with packed, variable-length batches that
            # cost dominates step time (measured on an H200: docs/archive/benchmarks_history.md, "What limits
            # the step"). Flash/efficient SDPA don't.
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.loss_fn = build_loss(cfg.method)
        self.layout = self.loss_fn.layout
        self.placement = cfg.method.placement or self.loss_fn.default_placement
        self.tokenizer = load_tokenizer(cfg.model)
        skipped = self.run_dir / "skipped_rows.json" if cfg.data.on_bad_row == "skip" and acc.is_main_process else None
        if skipped is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.data, info = prepare_data(
            cfg, self.tokenizer, self.placement, progress=acc.is_main_process, bad_rows_path=skipped
        )
        self.data_report = info["report"]
        self.data_hash = self.data.fingerprint()
        self.val_data: TokenizedData | None = info["val"]
        t = cfg.train
        if t.val_every and (self.val_data is None or not self.val_data.pairs):
            raise ValueError(
                f"{cfg.data.path}: train.val_every is {t.val_every} but the validation split is empty "
                f"(data.val_fraction {cfg.data.val_fraction}, {info['report']['rows_read']} rows read)"
            )
        self.validation = ValidationCurve(
            t.val_every,
            t.max_steps,
            self.val_data.pairs if self.val_data else None,
            beta=t.val_reward_beta,
            batch_size=t.val_batch_size,
        )
        self.examples = self.layout.examples(self.data, cfg.data.max_length)  # what the data order draws
        if acc.is_main_process:  # the split's ids, so a reader can rebuild exactly what was held out
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "split.json").write_text(json.dumps(info["split_ids"]))

        model = load_model(cfg.model)
        model = apply_lora(model, cfg.lora, cfg.model.gradient_checkpointing)
        self.param_summary = describe_parameters(model)
        if acc.is_main_process:  # now that the adapter's size is known, and before any step is spent
            adapter_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
            t = cfg.train
            check_free_space(self.run_dir, *disk_needed(adapter_bytes, t.save_every, t.keep_checkpoints))
        self.packed_attention = resolve_packed_attention(
            cfg.train.packed_attention, acc.device, cfg.model.attn_implementation
        )
        self.offload_activations = resolve_offload(
            cfg.train.offload_activations, acc.device, cfg.model.gradient_checkpointing
        )
        self.policy = PolicyModel(model, cfg.train.logp_chunk_size, self.packed_attention, self.offload_activations)
        # before the compile, so the compiled layers trace the fused forward
        self.fused_lora_layers = (
            fuse_lora_layers(model, required=cfg.train.fused_lora == "on")
            if resolve_fused_lora(cfg.train.fused_lora, acc.device)
            else 0
        )
        if cfg.train.fused_lora == "on" and not self.fused_lora_layers:
            raise ValueError("train.fused_lora: on, but the model has no LoRA Linear layer to fuse")
        compiled = resolve_compile(cfg.train.compile_layers, acc.device)
        # before the compile too, so the compiled layers trace the torch dequantisation
        four_bit = getattr(model, "is_loaded_in_4bit", False)  # bitsandbytes places a 4-bit base itself
        self.nf4_kernel = None
        if cfg.train.nf4_kernel != "auto" and not four_bit:  # asked for explicitly, and it cannot take effect
            raise ValueError(
                f"train.nf4_kernel: {cfg.train.nf4_kernel} applies to a 4-bit model only; set "
                f"model.load_in_4bit: true, or train.nf4_kernel: auto"
            )
        if four_bit:
            self.nf4_kernel = resolve_nf4_kernel(cfg.train.nf4_kernel, compiled)
            if self.nf4_kernel == "torch":
                if use_torch_nf4(model, required=cfg.train.nf4_kernel == "torch") == 0:
                    self.nf4_kernel = "bitsandbytes"  # no layer could take it (e.g. bf16 storage, for FSDP): say so
                keep_out_of_ddp(self.policy)
        self.compiled_layers = compile_decoder_layers(model) if compiled else 0
        if not four_bit:
            self.policy.to(acc.device)
        # GRIT's factor taps sit on every lora_A module; the fused projection above and the compiled layers call
        # lora_A as a module, so the taps are in their graphs (tests/grit/test_collection_paths.py), and GRIT's
        # guard stops the run if too few factors become valid (grit/optimizer.py)
        optimizer, self.optimizer_hooks = build_optimizer(model, cfg)
        scheduler = build_scheduler(optimizer, cfg)
        self.policy, self.optimizer = acc.prepare(self.policy, optimizer)
        self.scheduler = scheduler
        self.peft_model = acc.unwrap_model(self.policy).peft_model
        # what the run is: FSDP2 shards the parameters (accelerate's fsdp_version: 2), DDP copies them
        sharded = any(is_sharded(p) for p in self.peft_model.parameters())
        self.sharding = "fsdp2" if sharded else ("ddp" if acc.num_processes > 1 else "none")
        self.shard_units = count_shard_units(self.policy)
        # after prepare: the cached values are computed as the loop would compute them (accelerate's autocast, the
        # sharded model under FSDP2)
        self.ref_cache, self.reference_cache = self._reference_cache()
        longest = max(self.layout.tokens(ex) for ex in self.examples)
        self.micro_batches = sizing.choose(
            cfg.train,
            cfg.data.max_length,
            self.layout,
            longest,
            acc.device,
            self.memory_probe() if acc.device.type == "cuda" else None,
        )
        acc.print(
            f"[ecliptica] micro_batch_tokens: {self.micro_batches.tokens} ({self.micro_batches.rule}); "
            f"packed attention: {self.packed_attention}; compiled decoder layers: {self.compiled_layers}; "
            f"fused LoRA layers: {self.fused_lora_layers}; "
            + (f"NF4 dequantisation: {self.nf4_kernel}; " if self.nf4_kernel else "")
            + f"activations offloaded to the host: {'yes' if self.offload_activations else 'no'}"
        )
        return self

    def _reference_cache(self) -> tuple[torch.Tensor | None, ReferenceCacheUse]:
        """The reference log-probs from the on-disk cache (train/reference.py) where the run asks for them."""
        cfg, acc = self.cfg, self.accelerator
        if not self.loss_fn.needs_reference:
            return None, ReferenceCacheUse("not used", f"method {cfg.method.name} needs no reference")
        if not (isinstance(cfg.method, ReferenceSettings) and cfg.method.precompute_reference):
            return None, ReferenceCacheUse("not used", "method.precompute_reference is off: computed in each step")
        numerics = {
            "device": acc.device.type,
            "mixed_precision": _mixed_precision(cfg),
            "packed_attention": self.packed_attention,
            "compiled_layers": self.compiled_layers,
            "nf4_kernel": self.nf4_kernel,
            "fused_lora_layers": self.fused_lora_layers,
            "sharding": self.sharding,
        }
        return reference_logps(
            self.policy,
            self.peft_model,
            self.examples,
            self.layout,
            self.tokenizer.pad_token_id,
            cfg,
            acc.device,
            numerics,
            progress=acc.is_main_process,
            write=acc.is_main_process,
        )

    # ------------------------------------------------------------------ data order
    def micro_batch_indices(self, micro_step: int) -> list[int]:
        """Example indices of this process's share of global micro-step `micro_step` (deterministic by seed)."""
        n = len(self.examples)
        mb, world, rank = (
            self.cfg.train.micro_batch_size,
            self.accelerator.num_processes,
            self.accelerator.process_index,
        )
        per_global = mb * world
        start = micro_step * per_global + rank * mb
        out = []
        for pos in range(start, start + mb):
            epoch, k = divmod(pos, n)
            out.append(int(self._permutation(epoch)[k]))
        return out

    def step_micro_batches(self, step: int) -> list[list[int]]:
        """This process's micro-batches for optimizer step `step`: grad_accum groups of micro_batch_size
        examples, or, with `micro_batch_tokens`, the same examples re-split by packed tokens."""
        ga = self.cfg.train.grad_accum
        groups = [self.micro_batch_indices(step * ga + k) for k in range(ga)]
        budget = self.micro_batches.tokens
        if budget is None:
            return groups
        idx = [i for g in groups for i in g]
        sizes = [self.layout.tokens(self.examples[i]) for i in idx]
        return split_by_tokens(idx, sizes, budget)

    def _permutation(self, epoch: int) -> torch.Tensor:
        cache = getattr(self, "_perm_cache", None)
        if cache is None or cache[0] != epoch:
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
            self._perm_cache = (epoch, torch.randperm(len(self.examples), generator=g))
        return self._perm_cache[1]

    # ------------------------------------------------------------------ one optimizer step
    def micro_step(
        self, idx: list[int], progress: float, token_denominator: float | None = None
    ) -> tuple[torch.Tensor, dict, int]:
        """The loss of the micro-batch of examples `idx` (forward only): (loss, metrics, tokens fed)."""
        batch = collate(
            [self.examples[i] for i in idx], self.layout, self.tokenizer.pad_token_id, packed=self.cfg.train.packing
        ).to(self.accelerator.device)
        self.optimizer_hooks.set_token_mask(batch.token_mask())
        ref = None
        if self.ref_cache is not None:
            ref = self.layout.by_role(self.ref_cache[torch.tensor(idx)]).to(self.accelerator.device)
        stats: SequenceStats = self.policy(
            batch, need_reference=self.loss_fn.needs_reference, need_token_kl=self.loss_fn.needs_token_kl, ref_logps=ref
        )
        stats.token_denominator = token_denominator
        loss, metrics = self.loss_fn(stats, progress)
        for name, extra in self.optimizer_hooks.extra_losses().items():  # e.g. GRIT's regularisers
            loss = loss + extra
            metrics[name] = extra.detach()
        return loss, metrics, batch.n_real_tokens

    def probe_pass(self, idx: list[int]) -> None:
        """One micro-batch's forward and backward in train mode, nothing synchronised or stepped; its gradients (and
        GRIT's factor sums) are dropped afterwards: what the memory probe measures (train/sizing.py)."""
        acc, was_training = self.accelerator, self.policy.training
        self.policy.train()  # as in training: checkpointing and dropout act only in train mode
        try:
            with acc.no_sync(self.policy):
                loss, _, _ = self.micro_step(idx, 0.0)
                acc.backward(loss)
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            self.policy.train(was_training)

    def memory_probe(self) -> sizing.Probe:
        """What the CUDA sizing probe needs of this run (train/sizing.py)."""
        acc = self.accelerator
        step0 = [i for k in range(self.cfg.train.grad_accum) for i in self.micro_batch_indices(k)]

        def smallest(n: int) -> int:
            return int(acc.gather(torch.tensor([n], device=acc.device)).min()) if acc.num_processes > 1 else n

        return sizing.Probe(
            self.probe_pass,
            {i: self.layout.tokens(self.examples[i]) for i in step0},
            [p for p in self.policy.parameters() if p.requires_grad],
            smallest,
        )

    def train_step(self, step: int) -> StepResult:
        cfg, acc = self.cfg, self.accelerator
        progress = step / max(cfg.train.max_steps - 1, 1)
        sums: dict[str, torch.Tensor] = {}
        dens: dict[str, torch.Tensor] = {}  # the denominators of Ratio metrics (means over only some examples)
        loss_total = torch.zeros((), device=acc.device)
        tokens = 0
        groups = self.step_micro_batches(step)
        n_examples = sum(len(g) for g in groups)
        n_resp = sum(self.layout.response_tokens(self.examples[i]) for g in groups for i in g)
        for k, idx in enumerate(groups):
            w = len(idx) / n_examples  # each example counts equally in the step, however the examples are grouped
            ctx = acc.no_sync(self.policy) if k < len(groups) - 1 else nullcontext()
            with ctx:
                # token means over the step's response tokens: (sum / (n_resp * w)) * w = sum / n_resp
                loss, metrics, ntok = self.micro_step(idx, progress, max(n_resp, 1) * w)
                # no finiteness check here: it would stall the host once per micro-batch, and a non-finite
                # loss also makes the gradient non-finite, so the check after clipping catches it before
                # anything is updated (and every data-parallel rank takes part in every backward)
                acc.backward(loss * w)
            loss_total += loss.detach() * w
            tokens += ntok
            for name, v in metrics.items():
                if isinstance(v, Ratio):
                    dens[name] = dens.get(name, 0) + v.den.detach().float().to(acc.device) * w
                    v = v.num
                sums[name] = sums.get(name, 0) + v.detach().float().to(acc.device) * w
        params = [p for p in self.policy.parameters() if p.requires_grad]
        max_norm = cfg.train.max_grad_norm if cfg.train.max_grad_norm else float("inf")
        grad_norm = full(acc.clip_grad_norm_(params, max_norm))  # sharded (FSDP2): the norm over every process
        loss_ok, norm_ok = torch.stack([torch.isfinite(loss_total).all(), torch.isfinite(grad_norm).all()]).tolist()
        if not loss_ok:
            return self._nonfinite(step, "loss")
        if not norm_ok:
            return self._nonfinite(step, "gradient norm")
        snapshot = UpdateSnapshot(params, self.optimizer) if cfg.train.on_nonfinite == "skip" else None
        self.optimizer.step()
        sums["loss"] = loss_total
        sums["grad_norm"] = grad_norm.detach().float()
        names, ratios = list(sums), list(dens)
        means = acc.reduce({k: sums[k].reshape(1).float() for k in names}, "mean")
        den_means = acc.reduce({k: dens[k].reshape(1).float() for k in ratios}, "mean")
        total_tokens = acc.reduce(torch.tensor([tokens], device=acc.device), "sum")
        # one host sync for the update check and every logged number (the token count, fetched after it, no
        # longer waits for the card)
        values = torch.cat(
            [all_finite(params).reshape(1).float()] + [means[k] for k in names] + [den_means[k] for k in ratios]
        ).tolist()
        if not values[0]:
            bad = nonfinite_names([(n, p) for n, p in self.policy.named_parameters() if p.requires_grad])
            if snapshot is not None:  # skip means the update is undone, not that the check is skipped
                snapshot.restore(params, self.optimizer)
            return self._nonfinite(step, f"parameters after the optimizer update ({len(bad)} tensors, e.g. {bad[0]})")
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        reduced = dict(zip(names, values[1 : 1 + len(names)]))
        for name, den in zip(ratios, values[1 + len(names) :]):
            if den > 0:
                reduced[name] /= den
            else:  # no example of its kind in this step (on any process): nothing to log
                del reduced[name]
        tokens = int(total_tokens.item())
        reduced["lr"] = self.scheduler.get_last_lr()[0]
        reduced.update({k: float(v) for k, v in self.optimizer_hooks.metrics().items()})
        return StepResult(reduced["loss"], reduced, tokens)

    def _nonfinite(self, step: int, what: str) -> StepResult:
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.train.on_nonfinite == "skip":
            self.nonfinite_skipped += 1
            return StepResult(float("nan"), {"skipped_nonfinite": 1.0}, 0)
        last = self.latest_checkpoint()
        raise NonFiniteError(
            f"non-finite {what} at step {step + 1}; training stopped. "
            f"Last good checkpoint: {last or 'none (set train.save_every)'}"
        )

    # ------------------------------------------------------------------ checkpoints
    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def _checkpoints(self) -> list[Path]:
        """Complete checkpoints (trainer.json is written last), oldest first."""
        return complete_checkpoints(self.ckpt_root)

    def latest_checkpoint(self) -> Path | None:
        done = self._checkpoints()
        return done[-1] if done else None

    def _whole_adapter(self) -> dict[str, torch.Tensor] | None:
        """The trainable tensors gathered whole where FSDP2 shards them (every process must call this, in step), for
        peft's save_pretrained(state_dict=...); None when nothing is sharded and peft reads the model itself."""
        named = [(n, p) for n, p in self.peft_model.named_parameters() if p.requires_grad]
        if not any(is_sharded(p) for _, p in named):
            return None
        return {n: full(p.detach()) for n, p in named}

    def _finite_adapter(self, where: str, whole: dict[str, torch.Tensor] | None = None) -> None:
        """Never write non-finite weights: the step checks should make this unreachable."""
        from peft import get_peft_model_state_dict

        bad = nonfinite_names(get_peft_model_state_dict(self.peft_model, state_dict=whole))
        if bad:
            raise NonFiniteError(
                f"refusing to write {where}: {len(bad)} adapter tensors are not finite "
                f"(e.g. {bad[0]}). Last good checkpoint: {self.latest_checkpoint() or 'none'}"
            )

    def save_checkpoint(self, step: int) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        # sharded (FSDP2): gathered whole on every process, so the checkpoint is the one a single process writes
        whole, optimizer_state = self._whole_adapter(), full_state(self.optimizer.state_dict())
        if acc.is_main_process:
            final = self.ckpt_root / f"step-{step}"
            self._finite_adapter(str(final), whole)
            with (
                write_errors(final, "the checkpoint", self._what_is_kept),
                atomic_dir(final) as tmp,
            ):  # a checkpoint exists only once it is complete
                self.peft_model.save_pretrained(tmp / "adapter", state_dict=whole)
                save_state(optimizer_state, tmp / "optimizer")
                save_state(self.scheduler.state_dict(), tmp / "scheduler")
                save_state(_rng_state(), tmp / "rng")
                (tmp / "trainer.json").write_text(
                    json.dumps(
                        {
                            "step": step,
                            "nonfinite_skipped": self.nonfinite_skipped,
                            "train_tokens": self.train_tokens,
                            "train_seconds": self.train_seconds,
                            # what resume checks against (safety.check_resume)
                            "config": self.cfg.model_dump(mode="json"),
                            "config_hash": self.cfg.hash(),
                            "data_hash": self.data_hash,
                        }
                    )
                )
            for old in sorted(self.ckpt_root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[
                : -self.cfg.train.keep_checkpoints
            ]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def _what_is_kept(self) -> str:
        """For a failed write: what the run still has to continue from."""
        last = self.latest_checkpoint()
        if last is not None:
            return f"the last good checkpoint, {last}, is kept: free some space, then resume with --resume"
        return (
            "there is no checkpoint to continue from (train.save_every: 0), so this training is lost: free some "
            "space and train again"
        )

    def resume_latest(self) -> int:
        """Load the newest checkpoint that reads back whole and finite (older ones are tried, with a
        warning, when it does not); it must match this run's config and data. Returns its step (0: none)."""
        ckpts = self._checkpoints()
        for path in reversed(ckpts):
            try:
                ckpt = _read_checkpoint(path)
            except Exception as e:  # noqa: BLE001 - any unreadable file makes the checkpoint unusable
                warnings.warn(
                    f"{path}: cannot be loaded ({type(e).__name__}: {e}); trying the previous checkpoint",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            check_resume(path, ckpt["meta"], self.cfg.model_dump(mode="json"), self.data_hash, self.cfg.train.max_steps)
            return self._apply_checkpoint(ckpt)
        if ckpts:
            raise RuntimeError(
                f"{self.ckpt_root}: no checkpoint could be loaded (see the warnings above); "
                f"start again with --overwrite"
            )
        return 0

    def _apply_checkpoint(self, ckpt: dict) -> int:
        from peft import set_peft_model_state_dict

        if self.sharding != "fsdp2":
            set_peft_model_state_dict(self.peft_model, ckpt["weights"])
        else:  # sharded (FSDP2): each process keeps its rows of the whole tensors the checkpoint holds
            load_sharded_adapter(self.peft_model, ckpt["weights"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        shard_optimizer_state(self.optimizer)
        self.scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"])
        meta = ckpt["meta"]
        self.nonfinite_skipped = meta["nonfinite_skipped"]
        self.train_tokens = meta["train_tokens"]
        self.train_seconds = meta["train_seconds"]
        return meta["step"]

    # ------------------------------------------------------------------ the loop
    def train(self, resume: bool | None = None, stop_after: int | None = None) -> dict:
        """Train to max_steps (or stop after `stop_after` steps, for tests: then {}). Returns the summary as
        summary.json holds it (the typed one is `self.summary`), the form a study's store keeps.
        The run directory's lock is released when this returns or raises."""
        self.summary = None
        try:
            self._train(bool(self.resume) if resume is None else resume, stop_after)
        finally:
            self._release()
        return {} if self.summary is None else self.summary.as_json()

    def _train(self, resume: bool, stop_after: int | None) -> None:
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.accelerator
        self._check_start(resume)
        self.nonfinite_skipped, self.train_tokens, self.train_seconds = 0, 0, 0.0
        self.watch = TrainingWatch()
        start = 0
        metrics_path = self.run_dir / "metrics.jsonl"
        if resume:
            start = self.resume_latest()
        if start == 0 and acc.is_main_process and metrics_path.exists():
            metrics_path.unlink()
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            _truncate_metrics(metrics_path, start)
        acc.init_trackers(cfg.run_name or self.run_dir.name, config=_flat_hparams(cfg))
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        bar = tqdm(
            total=cfg.train.max_steps,
            initial=start,
            desc=f"{cfg.method.name} train",
            disable=not (acc.is_main_process and cfg.train.progress),
            dynamic_ncols=True,
        )
        self.policy.train()
        last_metrics: dict = {}
        end = cfg.train.max_steps if stop_after is None else min(cfg.train.max_steps, stop_after)
        for step in range(start, end):
            t0 = time.perf_counter()
            result = self.train_step(step)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            self.train_seconds += dt
            self.train_tokens += result.tokens
            m = dict(result.metrics)
            m.update({"step_time_s": dt, "tokens_per_s": result.tokens / dt if dt > 0 else 0.0})
            if torch.cuda.is_available():
                m["memory/peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            validated = self.validation.due(step + 1)
            if validated:  # outside train_seconds: gpu_seconds counts training steps only
                m.update(self._validate(step + 1))
            last_metrics = m
            if acc.is_main_process:
                self.watch.update(step + 1, result.loss, result.metrics.get("grad_norm"))
            if (step + 1) % cfg.train.log_every == 0 or step + 1 == end or validated:
                acc.log(m, step=step + 1)
                if acc.is_main_process:
                    with write_errors(metrics_path, "the metrics log", self._what_is_kept), metrics_path.open("a") as f:
                        f.write(json.dumps({"step": step + 1, **m}) + "\n")
            bar.set_postfix(loss=f"{result.loss:.4f}")
            bar.update(1)
            if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0 and step + 1 < cfg.train.max_steps:
                self.save_checkpoint(step + 1)
        bar.close()
        if stop_after is not None and end < cfg.train.max_steps:
            acc.end_training()
            return
        self.summary = self._finish(last_metrics)
        acc.end_training()  # closes trackers and (multi-process) the process group: keep it last

    def _validate(self, step: int) -> dict[str, float]:
        """The validation metrics after optimizer step `step`, with the training compute spent so far."""
        acc = self.accelerator
        out = self.validation.score(
            acc.unwrap_model(self.policy),
            self.loss_fn,
            self.tokenizer.pad_token_id,
            step=step,
            max_length=self.cfg.data.max_length,
            show_bar=acc.is_main_process and self.cfg.train.progress,
        )
        return {**out, "gpu_seconds": self.train_seconds * acc.num_processes}

    def _epochs(self) -> float:
        """Passes over the training split that max_steps makes (examples drawn / training examples)."""
        t = self.cfg.train
        drawn = t.max_steps * t.grad_accum * t.micro_batch_size * self.accelerator.num_processes
        return drawn / len(self.examples)

    def _finish(self, last_metrics: dict) -> TrainSummary:
        acc = self.accelerator
        acc.wait_for_everyone()
        summary = TrainSummary(
            method=self.cfg.method.name,
            optimizer=self.cfg.optimizer.name,
            placement=self.placement,
            steps=self.cfg.train.max_steps,
            epochs=self._epochs(),
            train_seconds=self.train_seconds,
            train_tokens=self.train_tokens,
            tokens_per_s=self.train_tokens / self.train_seconds if self.train_seconds else 0.0,
            peak_gpu_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
            final_metrics=last_metrics,
            nonfinite_skipped=self.nonfinite_skipped,
            config_hash=self.cfg.hash(),
            data_hash=self.data_hash,
            data=self.data_report,
            parameters=self.param_summary,
            num_processes=acc.num_processes,
            sharding=self.sharding,
            shard_units=self.shard_units,
            reference_cache=self.reference_cache.as_dict(),
            quant_storage=str(quant_storage(self.cfg.model.quant_storage)) if self.cfg.model.load_in_4bit else None,
            micro_batch_tokens=self.micro_batches.tokens,
            micro_batch_rule=self.micro_batches.rule,
            packed_attention=self.packed_attention,
            compiled_layers=self.compiled_layers,
            fused_lora_layers=self.fused_lora_layers,
            nf4_kernel=self.nf4_kernel,
            offload_activations=self.offload_activations,
            device_shared_by=int(os.environ.get("ECLIPTICA_DEVICE_SHARED_BY", "1")),
            versions=versions(),
            git_commit=git_commit(),
            **self.optimizer_hooks.summary(),  # GRIT: physical vs effective LoRA parameters, what it did
            **self.validation.summary(),  # whether the validation curve ran, how often, at what cost
        )
        if self.nonfinite_skipped and self.nonfinite_skipped >= self.cfg.train.max_steps and acc.is_main_process:
            warnings.warn(
                f"all {self.nonfinite_skipped} steps were skipped as non-finite: the adapter in "
                f"{self.run_dir / 'adapter'} is untrained; lower optimizer.lr",
                RuntimeWarning,
                stacklevel=2,
            )
        whole = self._whole_adapter()
        if acc.is_main_process:
            adapter = self.run_dir / "adapter"
            self._finite_adapter(str(adapter), whole)
            kept = f"the previous adapter/ and summary.json, if any, are kept; {self._what_is_kept()}"
            with write_errors(adapter, "the final adapter", kept), atomic_dir(adapter) as tmp:
                self.peft_model.save_pretrained(tmp, state_dict=whole)
            with write_errors(self.run_dir / "summary.json", "the run summary", self._what_is_kept):
                atomic_write_text(self.run_dir / "summary.json", write_train_summary(summary))
        return summary


def _read_checkpoint(path: Path) -> dict:
    """Every file of a checkpoint, read before anything is applied: a corrupt file cannot leave the
    model half-restored. Non-finite weights make a checkpoint unusable, like a corrupt file."""
    from safetensors.torch import load_file

    weights = load_file(str(path / "adapter" / "adapter_model.safetensors"))
    bad = nonfinite_names(weights)
    if bad:
        raise ValueError(f"{len(bad)} adapter tensors are not finite (e.g. {bad[0]})")
    return {
        "meta": json.loads((path / "trainer.json").read_text()),
        "weights": weights,
        "optimizer": load_state(path / "optimizer"),
        "scheduler": load_state(path / "scheduler"),
        "rng": load_state(path / "rng"),
    }


def _rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate((3, tuple(s["python"]), s["python_pos"]))
    np.random.set_state(("MT19937", s["numpy"].numpy().astype(np.uint32), s["numpy_pos"], 0, 0.0))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint so the file has each step once."""
    if not path.exists():
        return
    write_jsonl(path, [row for row in read_jsonl_tolerant(path) if row["step"] <= step])  # a torn last line is dropped


def _flat_hparams(cfg: TrainConfig) -> dict:
    flat = {}
    for section, values in cfg.model_dump(mode="json").items():
        if isinstance(values, dict):
            for k, v in values.items():
                if isinstance(v, (int, float, str, bool)):
                    flat[f"{section}.{k}"] = v
        elif isinstance(values, (int, float, str, bool)):
            flat[section] = values
    return flat


def train(cfg: TrainConfig, resume: bool = False) -> TrainSummary:
    trainer = Trainer(cfg).setup()
    trainer.train(resume=resume)
    return trainer.summary
