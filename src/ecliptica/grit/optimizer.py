"""GritOptimizer: K-FAC rank-space preconditioning + Fisher-guided reprojection around AdamW/SGD.

The class is a ``torch.optim.Optimizer`` whose ``param_groups``/``state``/``defaults``
are the inner optimizer's, so LR schedulers, GradScaler and accelerate's wrapper
act on the inner optimizer directly. See docs/grit.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from ..sharding import full, is_sharded, write_full
from .config import GritConfig
from .factors import FactorBank, FactorCollector
from .layers import LoraLayerRef, find_lora_layers
from .precondition import damped_cholesky, precondition_stack
from .regularizers import regularization_loss
from .reproject import choose_ranks, projectors, relative_change, sorted_eigh

# Inner-state entries that are linear in the gradient; they are projected together
# with the weights at reprojection. Second moments are left alone (see docs).
_LINEAR_MOMENTS = ("exp_avg", "momentum_buffer")


@dataclass
class _ShapeGroup:
    """LoRA A (side "left") or B (side "right") params of one bank with one shape/dtype."""

    bank: FactorBank
    side: str
    modules: list[nn.Module]  # the lora_A or lora_B Linear of each layer
    slots: torch.Tensor  # bank slot of each param (on the bank's device)
    slot_list: list[int]  # same, on host (no sync when some grads are missing)

    @property
    def params(self) -> list[nn.Parameter]:
        # read from the modules at each use: FSDP2 (fully_shard) replaces a module's parameters by sharded ones
        # after this optimizer is built
        return [m.weight for m in self.modules]


def _build_inner(params: Iterable, cfg: GritConfig) -> Optimizer:
    if cfg.inner == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


class GritInactiveError(RuntimeError):
    """Too few valid curvature factors after warm-up: GRIT would be training as its inner optimizer."""


class GritOptimizer(Optimizer):
    def __init__(
        self,
        model: nn.Module,
        config: GritConfig | None = None,
        adapter_name: str = "default",
        params: Iterable | None = None,
    ):
        self.__dict__["_ready"] = False  # property setters ignore Optimizer.__init__'s writes
        self.config = config or GritConfig()
        self.layers: list[LoraLayerRef] = find_lora_layers(model, adapter_name)
        if not self.layers:
            raise ValueError(f"no trainable LoRA layers for adapter {adapter_name!r}")
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        self.inner = _build_inner(params, self.config)
        super().__init__(self.inner.param_groups, self.inner.defaults)
        self.__dict__["_ready"] = True

        self.collector = FactorCollector(self.layers)
        self.banks: list[FactorBank] = list(self.collector.banks.values())
        self._groups = self._shape_groups()
        self._num_steps = 0
        self._has_factors = False
        self._counters = {"factor_updates": 0, "inversions": 0, "reprojections": 0}
        self._last: dict[str, Any] = {}  # device tensors, synced only in metrics()
        # over preconditioned steps, on the device: sum of ||P g|| / ||g|| and of its log (for the summary)
        dev = self.banks[0].device
        self._ratio_stats = torch.zeros(3, device=dev)  # [sum ratio, sum log ratio, steps]
        self._last_guard: int | None = None
        self._host_ranks: list[int] | None = None  # effective_ranks()' host copy

    # -- delegation to the inner optimizer ------------------------------------
    @property
    def param_groups(self):
        return self.inner.param_groups

    @param_groups.setter
    def param_groups(self, value):
        if self._ready:
            self.inner.param_groups = value

    @property
    def state(self):
        return self.inner.state

    @state.setter
    def state(self, value):
        if self._ready:
            self.inner.state = value

    @property
    def defaults(self):
        return self.inner.defaults

    @defaults.setter
    def defaults(self, value):
        if self._ready:
            self.inner.defaults = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self._ready:
            self.inner.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)
        # Factor sums follow the gradients: whatever the grads forget, so do they.
        self.collector.clear()
        for bank in self.banks:
            bank.reset_sums()

    # -- engine-facing API ------------------------------------------------------
    def set_token_mask(self, mask: torch.Tensor | None) -> None:
        """[batch, seq] bool/0-1 mask of tokens that count (None: all). Call before forward."""
        self.collector.token_mask = None if mask is None else mask.detach()

    def remove_hooks(self) -> None:
        self.collector.remove()

    def regularization_loss(self) -> torch.Tensor:
        return regularization_loss(self.layers, self.collector.slots, self.config)

    def extra_losses(self) -> dict[str, torch.Tensor]:
        """The optional regularisers as an extra loss term (none when both are off)."""
        cfg = self.config
        if (cfg.curvature_reg or cfg.subspace_reg) and is_sharded(self.layers[0].lora_A.weight):
            raise NotImplementedError(
                "optimizer.grit.curvature_reg / subspace_reg under FSDP2 (sharded LoRA weights) is not supported: "
                "set both to 0, or train without sharding (DDP)"
            )
        reg = self.regularization_loss()
        return {"loss/grit_reg": reg} if reg.requires_grad else {}

    def valid_share(self) -> float:
        """Share of the (layer, side) curvature factors that are valid now (one host sync)."""
        valid = sum((b.valid_a.sum() + b.valid_g.sum()).to(self.banks[0].device) for b in self.banks)
        return float(valid) / (2 * len(self.layers))

    def _missing_factors(self) -> tuple[int, int, list[str]]:
        """(factors expected to be valid, how many of them are not, 'name (sides: reason)' of each layer missing
        one). A Sigma_g is expected
        only where B is non-zero: with B still at its zero init (or kept there by a zero learning rate) v = s g B
        is zero, and no curvature can be measured on that side yet."""
        b_moved = torch.stack(
            [full(layer.lora_B.weight.detach()).abs().amax().to(self.banks[0].device) > 0 for layer in self.layers]
        ).tolist()
        # one transfer per bank, not three per layer
        host = {id(b): (b.valid_a.tolist(), b.valid_g.tolist(), b.initialized.tolist()) for b in self.banks}
        expected, n_bad, missing = 0, 0, []
        for layer, (bank, j), moved in zip(self.layers, self.collector.slots, b_moved):
            valid_a, valid_g, initialized = (values[j] for values in host[id(bank)])
            sides = [("a", valid_a)] + ([("g", valid_g)] if moved else [])
            expected += len(sides)
            bad = [side for side, ok in sides if not ok]
            n_bad += len(bad)
            if bad:
                why = "no tokens reached its factor tap" if not initialized else "zero or non-finite covariance"
                missing.append(f"{layer.name} ({'+'.join(bad)}: {why})")
        return expected, n_bad, missing

    def summary(self) -> dict[str, Any]:
        """What GRIT did, for summary.json: whether its factors were valid, how much preconditioning changed the
        gradient, and physical vs effective LoRA parameters."""
        total, log_total, n = self._ratio_stats.tolist()
        return {
            "lora_parameters": self.parameter_counts(),
            "grit": {
                "active": bool(n) and self._has_factors,
                "valid_share": self.valid_share(),
                "min_valid_share": self.config.min_valid_share,
                "preconditioned_steps": int(n),
                "mean_precond_grad_ratio": total / n if n else None,
                "geomean_precond_grad_ratio": math.exp(log_total / n) if n else None,
                **{k: int(v) for k, v in self._counters.items()},
            },
        }

    def _guard(self) -> None:
        cfg, done = self.config, self._num_steps + 1
        if cfg.min_valid_share == 0.0 or done < cfg.guard_steps:
            return
        if self._last_guard is not None and done - self._last_guard < cfg.guard_every:
            return
        self._last_guard = done
        expected, n_bad, missing = self._missing_factors()
        share = 1.0 - n_bad / expected
        if share < cfg.min_valid_share:
            raise GritInactiveError(
                f"GRIT: {share:.0%} of the {expected} curvature factors expected by step {done} are valid "
                f"(optimizer.grit.min_valid_share: {cfg.min_valid_share}); without them GRIT trains as plain "
                f"{cfg.inner}. {len(missing)} layers lack a valid factor, e.g. {'; '.join(missing[:4])}"
            )

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        loss = None
        if closure is not None:  # run it first so it cannot overwrite preconditioned grads
            with torch.enable_grad():
                loss = closure()
        cfg, t = self.config, self._num_steps
        if self.collector.enabled:
            self._update_factors()
            self._guard()
        reproject = self._reprojection_due(t + 1)
        raw = (
            {p: p.grad.detach().clone() for g in self._groups for p in g.params if p.grad is not None}
            if reproject
            else None
        )
        if self._has_factors and t >= cfg.precondition_warmup:
            self._precondition()
        self.inner.step()
        if reproject:
            self._reproject(raw)
        self._num_steps = t + 1
        self.collector.enabled = self._num_steps % cfg.factor_update_steps == 0
        return loss

    # -- internals ------------------------------------------------------------
    def _shape_groups(self) -> list[_ShapeGroup]:
        buckets: dict[tuple, list] = {}
        for layer, (bank, j) in zip(self.layers, self.collector.slots):
            for side, m in (("left", layer.lora_A), ("right", layer.lora_B)):
                p = m.weight
                key = (id(bank), side, tuple(p.shape), p.dtype, p.device)
                buckets.setdefault(key, [bank, side, [], []])
                buckets[key][2].append(m)
                buckets[key][3].append(j)
        return [_ShapeGroup(b, s, ps, torch.tensor(js, device=b.device), js) for b, s, ps, js in buckets.values()]

    def _update_factors(self) -> None:
        cfg = self.config
        self.collector.harvest()
        for bank in self.banks:
            bank.all_reduce_sums(cfg.ddp_grads_averaged)
            bank.update_ema(cfg.ema_decay, cfg.g_factor_scale == "tokens")
            bank.reset_sums()
            for side in ("a", "g"):
                chol, valid, damp, esc = damped_cholesky(
                    getattr(bank, f"{side}_ema"), bank.initialized, cfg.damping, cfg.damping_mode, cfg.max_damping_tries
                )
                getattr(bank, f"chol_{side}").copy_(chol)
                getattr(bank, f"valid_{side}").copy_(valid)
                getattr(bank, f"damping_{side}").copy_(damp)
                bank.escalations += esc
        self._has_factors = True
        self._counters["factor_updates"] += 1
        self._counters["inversions"] += 1

    def _factor_for(self, group: _ShapeGroup) -> torch.Tensor:
        # kfac: B sees its input covariance (Sigma_a), A its output-grad covariance (Sigma_g).
        # paper (authors' code): swapped.
        use_a = (group.side == "right") == (self.config.convention == "kfac")
        return group.bank.chol_a if use_a else group.bank.chol_g

    def _precondition(self) -> None:
        raw_sq, pre_sq = [], []
        for group in self._groups:
            params = [p for p in group.params if p.grad is not None]
            if not params:
                continue
            slots = (
                group.slots
                if len(params) == len(group.params)
                else torch.tensor(
                    [j for p, j in zip(group.params, group.slot_list) if p.grad is not None], device=group.slots.device
                )
            )
            chol = self._factor_for(group)[slots]
            if is_sharded(params[0].grad):  # FSDP2: M^-1 G mixes the rows of A, so solve on whole gradients
                out, r2, p2 = precondition_stack([full(p.grad) for p in params], chol, group.side)
                for p, g in zip(params, out.unbind(0)):
                    write_full(p.grad, g)
            else:
                out, r2, p2 = precondition_stack([p.grad for p in params], chol, group.side)
                torch._foreach_copy_([p.grad for p in params], list(out.unbind(0)))  # one launch, not one per layer
            raw_sq.append(r2)
            pre_sq.append(p2)
        if raw_sq:
            dev = raw_sq[0].device
            raw, pre = sum(x.to(dev) for x in raw_sq), sum(x.to(dev) for x in pre_sq)
            self._last["raw_sq"], self._last["pre_sq"] = raw, pre
            # a step with a zero raw gradient has no ratio; masked, not branched on, so there is no host sync
            ratio = (pre / raw.clamp_min(torch.finfo(raw.dtype).tiny)).sqrt()
            ok = (raw > 0) & torch.isfinite(ratio)
            zero = torch.zeros_like(ratio)
            self._ratio_stats.add_(
                torch.stack([torch.where(ok, ratio, zero), torch.where(ok, ratio.log(), zero), ok.to(ratio.dtype)]).to(
                    self._ratio_stats
                )
            )

    def _reprojection_due(self, completed: int) -> bool:
        cfg = self.config
        return (
            cfg.reproject_steps > 0
            and self._has_factors
            and completed >= max(cfg.reproject_warmup, 1)
            and completed % cfg.reproject_steps == 0
        )

    def _reproject(self, raw_grads: dict[nn.Parameter, torch.Tensor]) -> None:
        cfg = self.config
        for bank in self.banks:
            eye = torch.eye(bank.r, device=bank.device).expand(bank.n, -1, -1)
            valid = bank.initialized & torch.isfinite(bank.a_ema).all((-1, -2))
            evals, evecs = sorted_eigh(bank.a_ema, valid)
            k = torch.where(valid, choose_ranks(evals, cfg), torch.full_like(bank.ranks, bank.r))
            bank.proj_a.copy_(torch.where(valid[:, None, None], projectors(evecs, k), eye))
            if cfg.reproject_sides == "two":
                valid_g = (
                    bank.initialized
                    & torch.isfinite(bank.g_ema).all((-1, -2))
                    & (torch.diagonal(bank.g_ema, dim1=-2, dim2=-1).sum(-1) > 0)
                )
                _, evecs_g = sorted_eigh(bank.g_ema, valid_g)
                bank.proj_g.copy_(torch.where(valid_g[:, None, None], projectors(evecs_g, k), eye))
            else:
                bank.proj_g.copy_(eye)
            bank.ranks.copy_(k)
        self._host_ranks = None

        deltas, grams = [], {id(b): [torch.zeros(b.n, b.r, b.r, device=b.device) for _ in range(2)] for b in self.banks}
        for group in self._groups:
            bank, left = group.bank, group.side == "left"
            proj = (bank.proj_a if left else bank.proj_g)[group.slots]
            old = torch.stack([full(p.detach()) for p in group.params]).float()  # whole, where FSDP2 shards them
            new = proj @ old if left else old @ proj
            gram = old @ old.transpose(1, 2) if left else old.transpose(1, 2) @ old
            grams[id(bank)][0 if left else 1][group.slots] = gram
            for i, p in enumerate(group.params):
                if p in raw_grads:
                    deltas.append((full(raw_grads[p]).float() * (new[i] - old[i])).sum())
                write_full(p.data, new[i])
                state = self.inner.state.get(p, {})
                for key in _LINEAR_MOMENTS:
                    m = state.get(key)
                    if isinstance(m, torch.Tensor) and m.shape == p.shape:
                        m_f = full(m).float()
                        write_full(m, proj[i] @ m_f if left else m_f @ proj[i])
        changes = [relative_change(grams[id(b)][1], grams[id(b)][0], b.proj_g, b.proj_a) for b in self.banks]
        dev = self.banks[0].device
        self._last["reproj_loss_delta"] = sum(d.to(dev) for d in deltas) if deltas else None
        self._last["reproj_rel_change"] = torch.cat([c.to(dev) for c in changes]).mean()
        self._counters["reprojections"] += 1

    # -- introspection ----------------------------------------------------------
    def effective_ranks(self) -> dict[str, int]:
        # ranks change only at a reprojection or a state load, so they are copied to the host once then
        # (one transfer per bank), not once per layer at every logged step
        if self._host_ranks is None:
            per_bank = {id(bank): bank.ranks.tolist() for bank in self.banks}
            self._host_ranks = [per_bank[id(bank)][j] for bank, j in self.collector.slots]
        return {layer.name: k for layer, k in zip(self.layers, self._host_ranks)}

    def parameter_counts(self) -> dict[str, float]:
        """Physical LoRA parameters vs effective ones (effective rank x (in + out))."""
        ranks = self.effective_ranks()
        physical = sum(layer.rank * layer.width for layer in self.layers)
        effective = sum(ranks[layer.name] * layer.width for layer in self.layers)
        return {
            "physical": physical,
            "effective": effective,
            "effective_ratio": effective / physical if physical else 1.0,
        }

    def metrics(self) -> dict[str, float]:
        """Scalars for logging; the only place that syncs device values to host, and only once."""
        out = {f"grit/{k}": float(v) for k, v in self._counters.items()}
        dev = self.banks[0].device
        # the mean damping over valid factors, as masked sums (boolean indexing would sync per bank)
        damp_sum = sum(((b.damping_a * b.valid_a).sum() + (b.damping_g * b.valid_g).sum()).to(dev) for b in self.banks)
        n_valid = sum((b.valid_a.sum() + b.valid_g.sum()).to(dev) for b in self.banks)
        device_values = {
            "damp_sum": damp_sum,
            "n_valid": n_valid,
            "escalations": sum(b.escalations.sum().to(dev) for b in self.banks),
        }
        for key in ("raw_sq", "pre_sq", "reproj_loss_delta", "reproj_rel_change"):
            if self._last.get(key) is not None:
                device_values[key] = self._last[key]
        keys = list(device_values)
        host = dict(zip(keys, torch.stack([device_values[k].to(dev).float() for k in keys]).tolist()))
        out["grit/damping"] = host["damp_sum"] / host["n_valid"] if host["n_valid"] else 0.0
        out["grit/valid_share"] = host["n_valid"] / (2 * len(self.layers))
        out["grit/damping_escalations"] = host["escalations"]
        ranks = self.effective_ranks()
        out["grit/effective_rank"] = sum(ranks.values()) / len(ranks)
        for name, k in ranks.items():
            out[f"grit/effective_rank/{name}"] = float(k)
        if "raw_sq" in host:
            raw = host["raw_sq"]
            out["grit/precond_grad_ratio"] = (host["pre_sq"] / raw) ** 0.5 if raw > 0 else 1.0
        if "reproj_loss_delta" in host:
            out["grit/reprojection_loss_delta"] = host["reproj_loss_delta"]
        if "reproj_rel_change" in host:
            out["grit/reprojection_rel_change"] = host["reproj_rel_change"]
        counts = self.parameter_counts()
        out["grit/params_effective_ratio"] = counts["effective_ratio"]
        return out

    # -- checkpointing ----------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus a ``grit`` entry (factors, counters)."""
        sd = self.inner.state_dict()
        sd["grit"] = {
            "num_steps": self._num_steps,
            "has_factors": self._has_factors,
            "collect": self.collector.enabled,
            "counters": dict(self._counters),
            "ratio_stats": self._ratio_stats.clone(),
            "last_guard": self._last_guard,
            "layer_names": [layer.name for layer in self.layers],
            "banks": [bank.state_dict() for bank in self.banks],
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        grit = state_dict.pop("grit", None)
        self.inner.load_state_dict(state_dict)
        if grit is None:
            return
        names = [layer.name for layer in self.layers]
        if grit["layer_names"] != names:
            raise ValueError("GRIT state was saved for different LoRA layers")
        for bank, bank_state in zip(self.banks, grit["banks"]):
            bank.load_state_dict(bank_state)
        self._host_ranks = None
        self._num_steps = grit["num_steps"]
        self._has_factors = grit["has_factors"]
        self.collector.enabled = grit["collect"]
        self._counters = dict(grit["counters"])
        if "ratio_stats" in grit:  # absent from checkpoints written before the summary recorded it
            self._ratio_stats.copy_(grit["ratio_stats"])
            self._last_guard = grit["last_guard"]
