"""Shared fixtures: the embedded model (converted once per machine) and tiny random-init Llama models."""

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    from ecliptica.models import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_dir) -> Path:
    """A 2-layer random Llama with the embedded tokenizer: fast enough for end-to-end training tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    for f in embedded_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("chat_template.jinja", "special_tokens_map.json"):
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps its state per process. TRL's trainers (the loss references) initialise it with their
    own precision, and an Accelerator made later with another one is refused: start each test clean."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()


# Modules whose tests train models end to end, run studies with worker processes, execute notebooks or compile
# (each over 5 s on a 2-core machine, measured with --durations=0). `make test` runs everything; `make test-fast`,
# the inner loop, leaves them out.
SLOW_MODULES = {
    "tests/evaluation/test_learned_judge.py",
    "tests/study/test_runner.py",
    "tests/study/test_study_reliability.py",
    "tests/study/test_calibration.py",
    "tests/study/test_notebook.py",
    "tests/study/test_notebooks_run.py",
    "tests/train/test_reliability.py",
    "tests/train/test_compile.py",
    "tests/train/test_engine.py",
    "tests/train/test_validation.py",
    "tests/train/test_distributed.py",
    "tests/train/test_fsdp.py",
    "tests/train/test_reference_cache.py",
    "tests/grit/test_collection_paths.py",
    "tests/evaluation/test_evaluator.py",
    "tests/evaluation/test_aqi_discriminant.py",
    "tests/grit/test_guard.py",
    "tests/grit/test_factors.py",
    "tests/evaluation/test_preference_drift.py",
    "tests/train/test_fused_lora.py",
    "tests/evaluation/test_embeddings.py",
    "tests/evaluation/test_behaviour_aqi.py",
    "tests/evaluation/test_adapter_checks.py",
}


def pytest_collection_modifyitems(config, items):
    root = Path(str(config.rootpath))
    for item in items:
        if Path(str(item.path)).relative_to(root).as_posix() in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
