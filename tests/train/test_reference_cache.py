"""The on-disk reference cache: read back (no reference forward) by a run with the same key, whatever its seed or
method, missed by a change in any keyed input, equal to log-probs computed independently, and whole under
concurrent writers."""

import threading
import warnings

import pytest
import torch
from safetensors.torch import load_file

from ecliptica.config import TrainConfig
from ecliptica.data import TokenizedData, TokenizedPair
from ecliptica.losses.layout import PAIRED, UNPAIRED
from ecliptica.train import Trainer
from ecliptica.train import policy as policy_module
from ecliptica.train.reference import read_cache, reference_inputs, reference_key, write_cache


def _cfg(run_dir, model_dir, method="dpo", seed=3, **data):
    return TrainConfig.model_validate(
        {
            "run_dir": str(run_dir),
            "seed": seed,
            "model": {"name": str(model_dir), "dtype": "fp32"},
            "lora": {"r": 4, "alpha": 8},
            "method": {"name": method, "precompute_reference": True},
            "data": {"limit": 8, "max_length": 160, "max_prompt_length": 96, **data},
            "optimizer": {"lr": 5e-3},
            "schedule": {"name": "constant"},
            "train": {"max_steps": 1, "micro_batch_size": 2, "grad_accum": 1, "progress": False},
        }
    )


@pytest.fixture
def reference_forwards(monkeypatch, tmp_path):
    """Counts forwards without gradient (the reference's: adapter disabled) of every PolicyModel."""
    monkeypatch.setenv("ECLIPTICA_CACHE", str(tmp_path / "cache"))
    count = {"n": 0}
    hidden = policy_module.PolicyModel._hidden

    def counted(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            count["n"] += 1
        return hidden(self, *args, **kwargs)

    monkeypatch.setattr(policy_module.PolicyModel, "_hidden", counted)
    return count


def _run(cfg, count, with_summary=False):
    count["n"] = 0
    summary = Trainer(cfg).setup().train()
    return (summary["reference_cache"], count["n"]) + ((summary,) if with_summary else ())


def test_second_run_reads_the_cache_across_seeds_and_methods(tmp_path, tiny_model_dir, reference_forwards):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    first, n_first, summary = _run(_cfg(tmp_path / "a", tiny_model_dir), reference_forwards, with_summary=True)
    pairs = summary["data"]["train_pairs"]
    assert first["status"] == "built" and n_first == -(-pairs // 2)  # one forward per micro-batch of 2 pairs
    cached = load_file(first["path"])["ref_logps"]
    # another seed and another method of the same layout score the same sequences: the same file, no forward
    for sub, method, seed in (("b", "dpo", 4), ("c", "ipo", 3)):
        use, n = _run(_cfg(tmp_path / sub, tiny_model_dir, method, seed), reference_forwards)
        assert (use["status"], use["key"], n) == ("hit", first["key"], 0)
    # a negative control: without the cache, every step computes its reference (one no-grad forward)
    off = _cfg(tmp_path / "d", tiny_model_dir)
    off.method.precompute_reference = False
    use, n = _run(off, reference_forwards)
    assert use["status"] == "not used" and "precompute_reference" in use["reason"] and n == 1

    # the cached values against plain HF forwards of the base model (the adapter disabled), one sequence at a time
    trainer = Trainer(_cfg(tmp_path / "e", tiny_model_dir)).setup()
    base = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), tmp_path / "a" / "adapter"
    ).eval()
    expected = []
    with torch.no_grad(), base.disable_adapter():
        for prompt, response in PAIRED.sequences(trainer.examples):
            ids = torch.tensor([list(prompt) + list(response)])
            logprobs = torch.log_softmax(base(input_ids=ids).logits[0].float(), -1)
            pos = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
            expected.append(logprobs[pos, torch.tensor(response)].sum())
    trainer._release()
    assert cached.shape == (len(trainer.examples), 2)
    # the layout lists the sequences role by role (every chosen, then every rejected); the cache is [examples, roles]
    torch.testing.assert_close(cached.T.reshape(-1), torch.stack(expected), rtol=1e-4, atol=1e-4)


def test_a_changed_input_misses_the_cache(tmp_path, tiny_model_dir, reference_forwards):
    first, _ = _run(_cfg(tmp_path / "a", tiny_model_dir), reference_forwards)
    use, n = _run(
        _cfg(tmp_path / "b", tiny_model_dir, max_prompt_length=8), reference_forwards
    )  # prompts cut: other ids
    assert use["status"] == "built" and use["key"] != first["key"] and n > 0
    use, n = _run(_cfg(tmp_path / "c", tiny_model_dir, method="kto"), reference_forwards)  # other layout
    assert use["status"] == "built" and use["key"] != first["key"] and n > 0


PAIRS = [TokenizedPair((1, 2), (3,), (4, 5), "r1"), TokenizedPair((6,), (7, 8), (9,), "r2")]


def _inputs(model_dir, layout=PAIRED, examples=None, numerics=None, **changes):
    raw = _cfg("run", model_dir).model_dump(mode="json")
    for dotted, value in changes.items():  # section__key=value
        section, key = dotted.split("__")
        raw[section][key] = value
    cfg = TrainConfig.model_validate(raw)
    examples = examples or PAIRS
    numerics = numerics or {"device": "cpu", "mixed_precision": "no", "packed_attention": "dense"}
    return reference_inputs(cfg, layout, examples, numerics)


def test_every_keyed_input_changes_the_key_and_nothing_else_does(tmp_path, tiny_model_dir):
    key = reference_key(_inputs(tiny_model_dir))
    assert reference_key(_inputs(tiny_model_dir)) == key  # deterministic
    same = [{"method__beta": 0.3}, {"optimizer__lr": 1e-3}, {"train__max_steps": 7, "train__grad_accum": 4}]
    for changes in same:  # the method's settings, the optimizer, the schedule of steps: not the reference's inputs
        assert reference_key(_inputs(tiny_model_dir, **changes)) == key, changes
    other = tmp_path / "other_model"
    other.mkdir()
    (other / "config.json").write_text("{}")
    changed = [
        _inputs(tiny_model_dir, model__name=str(other)),
        _inputs(tiny_model_dir, model__dtype="bf16"),
        _inputs(tiny_model_dir, model__attn_implementation="eager"),
        _inputs(tiny_model_dir, train__packing=False),
        _inputs(tiny_model_dir, train__micro_batch_size=4),
        _inputs(tiny_model_dir, train__logp_chunk_size=64),
        _inputs(tiny_model_dir, layout=UNPAIRED, examples=UNPAIRED.examples(TokenizedData(PAIRS), 16)),
        _inputs(tiny_model_dir, examples=[TokenizedPair((1, 2), (3,), (4, 6), "r1")]),
        _inputs(tiny_model_dir, numerics={"device": "cuda", "mixed_precision": "no", "packed_attention": "dense"}),
        _inputs(tiny_model_dir, numerics={"device": "cpu", "mixed_precision": "bf16", "packed_attention": "dense"}),
    ]
    keys = [reference_key(i) for i in changed]
    assert key not in keys and len(set(keys)) == len(keys)
    # rewritten weights in the same directory are another model
    before = reference_key(_inputs(other, model__name=str(other)))
    (other / "model.safetensors").write_bytes(b"x")
    assert reference_key(_inputs(other, model__name=str(other))) != before


def test_concurrent_writers_leave_a_whole_file(tmp_path):
    path = tmp_path / "reference" / "k.safetensors"
    values = [torch.full((50, 2), float(i)) for i in range(8)]
    errors = []

    def write(v):
        try:
            for _ in range(5):
                write_cache(path, v, {"k": 1})
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=write, args=(v,)) for v in values]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    got = read_cache(path, (50, 2))
    assert got is not None and any(torch.equal(got, v) for v in values)  # one writer's values, whole
    assert [p.name for p in path.parent.iterdir()] == ["k.safetensors"]  # no temporary file left


def test_an_unreadable_cache_file_is_rebuilt_and_said(tmp_path):
    path = tmp_path / "k.safetensors"
    path.write_bytes(b"not safetensors")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert read_cache(path, (2, 2)) is None
    assert any("unreadable" in str(w.message) for w in caught)
    write_cache(path, torch.zeros(3, 2), {})
    with pytest.warns(RuntimeWarning, match=r"\(3, 2\) log-probs, \(2, 2\) expected"):
        assert read_cache(path, (2, 2)) is None
