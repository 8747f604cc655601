"""Embedding throughput for AQI: N prompts through a random-init Llama shape (no weights needed), bf16.

    python benchmarks/bench_embeddings.py --tokenizer TOKDIR --prompts ../shared/data/xstest_subset.csv \
        --shape llama3-8b --n 1000 --batch-size 64
Prints one JSON line: card, shape, n prompts, mean prompt tokens, seconds (after one warm-up batch).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from ecliptica.data import load_prompts
from ecliptica.evaluation.config import EmbeddingsSection
from ecliptica.evaluation.embeddings import compute_embeddings, render_prompts, user_char_spans

SHAPES = {
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
    "llama3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8
    ),
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--format", default="xstest")
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    a = p.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    tok.pad_token = tok.pad_token or tok.eos_token
    prompts = load_prompts(a.prompts, a.format).examples
    prompts = [prompts[i % len(prompts)] for i in range(a.n)]
    settings = EmbeddingsSection(batch_size=a.batch_size)
    texts = render_prompts(tok, prompts, settings)
    chars = user_char_spans(tok, prompts, settings, texts)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128256, max_position_embeddings=4096, tie_word_embeddings=False, **SHAPES[a.shape])
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16 if dev == "cuda" else torch.float32).eval()
    compute_embeddings(model, tok, texts[: a.batch_size], settings, chars[: a.batch_size], progress=False)  # warm-up
    if dev == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    emb = compute_embeddings(model, tok, texts, settings, chars, progress=False)
    if dev == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    card = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    print(
        "RESULT",
        json.dumps(
            {
                "card": card,
                "shape": a.shape,
                "n_prompts": a.n,
                "batch_size": a.batch_size,
                "mean_prompt_tokens": emb.info["mean_prompt_tokens"],
                "seconds": round(dt, 2),
                "prompts_per_s": round(a.n / dt, 1),
                "torch": torch.__version__,
            }
        ),
    )


if __name__ == "__main__":
    main()
