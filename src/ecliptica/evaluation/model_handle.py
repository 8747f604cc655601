"""The evaluated model: one loaded base plus a switchable LoRA adapter (or none).

A study evaluates several arms that share a base model. `ModelHandle` loads (or receives) the base
once; `set_adapter(path)` attaches an adapter unmerged (PeftModel.from_pretrained / load_adapter),
dropping the previous one, and `set_adapter(None)` evaluates the base (adapter disabled). Merging
is only a speed-up, applied temporarily (`merged()`), and refused for 4-bit bases: merging LoRA
deltas into NF4 weights re-quantises them and changes the model being evaluated.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from ecliptica.config import InferenceModelSection
from ecliptica.evaluation.adapter_check import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterError,
    check_adapter_files,
    check_adapter_fits,
)
from ecliptica.evaluation.inputs import inference_device
from ecliptica.models import load_model, load_tokenizer, resolve_model_path

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def adapter_hash(path: str | Path) -> str:
    """sha256 of the adapter weights' bytes and its config (rank/alpha change outputs too)."""
    path = Path(path)
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: no {ADAPTER_WEIGHTS} (is this a saved LoRA adapter directory?)")
    config = path / ADAPTER_CONFIG
    parts = [file_sha256(weights), file_sha256(config) if config.is_file() else ""]
    return hashlib.sha256(":".join(parts).encode()).hexdigest()


def model_fingerprint(name: str, model=None) -> str:
    """Identity of the base: name plus the resolved directory's config.json and weight-file stats.

    Weight files are identified by size and mtime rather than hashed (a 7B model is ~14 GB); a
    rewritten checkpoint gets a new mtime, so the cache can only miss, never go stale. Hub ids that
    are not local directories fall back to the loaded model's config.
    """
    resolved = Path(resolve_model_path(name))
    h = hashlib.sha256(name.encode())
    if resolved.is_dir():
        config = resolved / "config.json"
        h.update(config.read_bytes() if config.is_file() else b"")
        for f in sorted(resolved.iterdir()):
            if f.suffix in _WEIGHT_SUFFIXES:
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    elif model is not None:
        h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    return h.hexdigest()


class ModelHandle:
    """A base model and tokenizer that can switch adapters without reloading the base."""

    def __init__(self, model, tokenizer, name: str):
        from peft import PeftModel

        if isinstance(model, PeftModel):
            raise TypeError("pass the base model; attach adapters with ModelHandle.set_adapter(path)")
        self.base = model.eval()
        self.tokenizer = tokenizer
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.name = name
        self.fingerprint = model_fingerprint(name, model)
        self._peft = None
        self.adapter_path: str | None = None
        self.adapter_hash: str | None = None

    @classmethod
    def load(cls, cfg: InferenceModelSection, device: str | None = None) -> ModelHandle:
        """Load the base onto `device` (default: the first visible GPU, else the CPU; a study worker sees
        only its own card). A 4-bit base is already placed by bitsandbytes and is not moved."""
        model = load_model(cfg)
        if not getattr(model, "is_loaded_in_4bit", False):
            model = model.to(device or inference_device())
        return cls(model, load_tokenizer(cfg), cfg.name)

    @property
    def is_4bit(self) -> bool:
        return bool(getattr(self.base, "is_loaded_in_4bit", False))

    @property
    def dtype(self) -> str:
        return "nf4" if self.is_4bit else str(next(self.base.parameters()).dtype).replace("torch.", "")

    def set_adapter(self, path: str | Path | None) -> None:
        """Evaluate with the LoRA adapter saved at `path` (unmerged), or with none (the base). The adapter is
        checked first (adapter_check): readable, finite, trained on this base, and shaped for its layers."""
        if path is None:
            self.adapter_path = self.adapter_hash = None
            return
        from peft import PeftModel

        config, tensors = check_adapter_files(path, self.name)
        check_adapter_fits(path, config, tensors, self.base)
        del tensors
        digest = adapter_hash(path)
        name = f"eval_{digest[:12]}"
        try:
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self.base, str(path), adapter_name=name, is_trainable=False)
            elif name not in self._peft.peft_config:
                self._peft.load_adapter(str(path), adapter_name=name, is_trainable=False)
        except (RuntimeError, ValueError, KeyError) as e:  # what the checks above do not foresee, in one line
            lines = [x.strip() for x in str(e).splitlines() if x.strip()]
            first = next((x for x in lines if "size mismatch" in x), lines[0] if lines else type(e).__name__)
            more = f" (and {len(lines) - 1} more lines)" if len(lines) > 1 else ""
            raise AdapterError(f"{path}: PEFT cannot load this adapter onto {self.name}: {first}{more}") from e
        self._peft.set_adapter(name)
        for old in [a for a in self._peft.peft_config if a != name]:
            self._peft.delete_adapter(old)  # one arm at a time: don't accumulate adapters in memory
        self._peft.eval()
        self.adapter_path, self.adapter_hash = str(path), digest

    @contextmanager
    def active(self) -> Iterator[Any]:
        """The evaluated model: adapter on if one is set, else the base (adapter layers disabled)."""
        if self._peft is not None and self.adapter_path is None:
            with self._peft.disable_adapter():
                yield self._peft
        else:
            yield self._peft if self._peft is not None else self.base

    def merged(self, enabled: bool = True):
        """Temporarily merge the adapter into full-precision weights (speed only); unmerged on exit."""
        if not enabled or self._peft is None or self.adapter_path is None:
            return nullcontext()
        if self.is_4bit:
            raise ValueError(
                "merge_adapter is not allowed for a 4-bit base: it would re-quantise the "
                "merged weights and evaluate a different model; evaluate unmerged instead"
            )
        return self._merge_context()

    @contextmanager
    def _merge_context(self):
        self._peft.merge_adapter()
        try:
            yield
        finally:
            self._peft.unmerge_adapter()

    def identity(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "model_fingerprint": self.fingerprint,
            "dtype": self.dtype,
            "adapter": self.adapter_path,
            "adapter_hash": self.adapter_hash,
        }
