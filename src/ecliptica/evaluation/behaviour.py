"""Behaviour: greedy completions, refusal verdicts and refusal / over-refusal rates with intervals,
and the same on unsafe prompts wrapped in jailbreak templates.

Generation is batched with left padding (every row must end where generation starts; generate()
derives position ids from the attention mask, so a padded row decodes exactly like an unpadded one,
which the tests check). Each completion gets an XSTest class from a `RefusalJudge` (`refusal.py`'s
rules by default, a guard model through `judges.py`); a rate counts full and partial refusals. The
generator and the renderer are plain callables so the metric wiring can be tested with stubs and
reused with any backend.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ecliptica.data import Placement, PromptExample
from ecliptica.evaluation.config import BehaviourSection
from ecliptica.evaluation.inputs import encode, length_sorted_batches, model_device, pad_batch, render_user_prompt
from ecliptica.evaluation.jailbreaks import jailbreak_metrics, jailbreak_prompts
from ecliptica.evaluation.refusal import RefusalJudge, StringMatchJudge, describe_judge, judge_labels, refusal_metrics
from ecliptica.runio import write_jsonl

Generate = Callable[[Sequence[str]], list[str]]  # rendered prompts -> completions
Render = Callable[[str, Placement], str]  # (user prompt, placement) -> rendered prompt


def _cut_at_eos(ids: list[int], eos_ids: set[int]) -> list[int]:
    for k, t in enumerate(ids):
        if t in eos_ids:
            return ids[:k]
    return ids


@torch.inference_mode()
def generate_greedy(
    model, tokenizer, texts: Sequence[str], settings: BehaviourSection, progress: bool = True
) -> list[str]:
    """Greedy completions of rendered prompts, batched by length with left padding, in input order."""
    from transformers import GenerationConfig

    eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
    eos_ids = {tokenizer.eos_token_id} | set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    gen_cfg = GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=sorted(eos_ids),
        use_cache=True,
    )
    seqs = encode(tokenizer, texts, settings.max_length)
    device = model_device(model)
    completions: list[str] = [""] * len(seqs)
    batches = list(length_sorted_batches([len(s) for s in seqs], settings.batch_size))
    for batch in tqdm(batches, desc="generating", disable=not progress, leave=False):
        ids, mask = pad_batch([seqs[i] for i in batch], tokenizer.pad_token_id, "left", device)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
        for row, i in enumerate(batch):
            new = _cut_at_eos(out[row, ids.shape[1] :].tolist(), eos_ids)
            completions[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
    return completions


def handle_generator(handle, settings: BehaviourSection, progress: bool = True) -> Generate:
    """A `Generate` callable running the handle's current model (adapter or base)."""

    def generate(texts: Sequence[str]) -> list[str]:
        with handle.active() as model:
            return generate_greedy(model, handle.tokenizer, texts, settings, progress)

    return generate


def handle_renderer(tokenizer, instruction: str | None) -> Render:
    return lambda prompt, placement: render_user_prompt(tokenizer, prompt, placement, instruction)


def per_axiom_refusals(prompts: Sequence[PromptExample], refused: Sequence[bool]) -> dict[str, dict[str, Any]]:
    """Refusal rate on unsafe and over-refusal on safe prompts of each axiom (counts; no intervals)."""
    counts: dict[str, dict[str, list[int]]] = defaultdict(lambda: {"unsafe": [0, 0], "safe": [0, 0]})
    for p, r in zip(prompts, refused):
        cell = counts[p.axiom][p.label]
        cell[0] += int(r)
        cell[1] += 1
    rate = lambda c: c[0] / c[1] if c[1] else None  # noqa: E731
    return {
        a: {
            "refusal_rate_unsafe": rate(c["unsafe"]),
            "n_unsafe": c["unsafe"][1],
            "over_refusal_rate_safe": rate(c["safe"]),
            "n_safe": c["safe"][1],
        }
        for a, c in sorted(counts.items())
    }


def judged_completions(
    prompts: Sequence[PromptExample],
    generate: Generate,
    render: Render,
    placement: Placement,
    *,
    instruction: str | None = None,
    judge: RefusalJudge | None = None,
) -> list[dict[str, Any]]:
    """One record per prompt: rendered prompt, completion, XSTest class and `refused` (full or partial)."""
    judge = judge or StringMatchJudge()
    texts = [render(p.prompt, placement) for p in prompts]
    completions = generate(texts)
    classes = judge_labels([p.prompt for p in prompts], completions, judge)
    judge_name = describe_judge(judge)["name"]
    return [
        {
            "id": p.row_id,
            "axiom": p.axiom,
            "label": p.label,
            "placement": placement,
            "instruction": instruction if placement != "none" else None,
            "prompt": p.prompt,
            "rendered_prompt": text,
            "completion": c,
            "refusal_class": k,
            "refused": k != "full_compliance",
            "judge": judge_name,
        }
        for p, text, c, k in zip(prompts, texts, completions, classes)
    ]


def run_behaviour(
    prompts: Sequence[PromptExample],
    generate: Generate,
    render: Render,
    placements: Sequence[Placement] = ("none",),
    *,
    instruction: str | None = None,
    judge: RefusalJudge | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    generations_path: str | Path | None = None,
) -> dict[str, Any]:
    """Generate for every placement variant, judge refusals, and report rates with intervals.

    Returns {placement: refusal_metrics(...) + per_axiom}; writes one jsonl record per (prompt,
    placement) to `generations_path` when given.
    """
    results: dict[str, Any] = {}
    records: list[dict[str, Any]] = []
    for placement in placements:
        recs = judged_completions(prompts, generate, render, placement, instruction=instruction, judge=judge)
        metrics = refusal_metrics(
            [p.label for p in prompts], [r["refusal_class"] for r in recs], n_resamples=n_resamples, seed=seed
        )
        metrics["per_axiom"] = per_axiom_refusals(prompts, [r["refused"] for r in recs])
        metrics["n_prompts"] = len(prompts)
        results[placement] = metrics
        records += recs
    if generations_path is not None:
        write_jsonl(generations_path, records)
    return results


def run_jailbreaks(
    unsafe: Sequence[PromptExample],
    generate: Generate,
    render: Render,
    placement: Placement,
    *,
    templates: Sequence[str] | None = None,
    instruction: str | None = None,
    judge: RefusalJudge | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    generations_path: str | Path | None = None,
) -> dict[str, Any]:
    """Refusal rate on `unsafe` prompts wrapped in each jailbreak template (and unwrapped, as control)."""
    wrapped = jailbreak_prompts(unsafe, templates)
    records = judged_completions(wrapped, generate, render, placement, instruction=instruction, judge=judge)
    for rec, p in zip(records, wrapped):
        rec["template"] = p.axiom
    if generations_path is not None:
        write_jsonl(generations_path, records)
    result = jailbreak_metrics(records, n_resamples, seed)
    result["placement"] = placement
    return result
