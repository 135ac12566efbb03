"""Generation throughput: our batched KV-cache generator vs ``transformers``' ``generate``, same model and settings.

One model (a preset, random weights: throughput does not depend on them) is saved as an HF folder and loaded
by both: ours (:func:`llm_pipeline.model.generate.generate`) and ``transformers.LlamaForCausalLM.generate``
with its default dynamic KV cache. Both decode the same left-padded prompts greedily for exactly
``--new-tokens`` tokens (no early stop, so both produce the same number of tokens), after one warm-up call.
Prints tokens/s of each and the ratio (ours / transformers; goal >= 1x), and checks that the greedy
tokens agree (fp32).

    python bench/generate_throughput.py [--preset tiny] [--batch 16] [--prompt-len 32] [--new-tokens 64]

CPU figures depend on load: re-time on an idle machine (the RL stage's generation runs on this path).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()

    from transformers import LlamaForCausalLM as HFLlama

    from llm_pipeline.checkpoint.hf import save_pretrained
    from llm_pipeline.model import build_model, get_preset
    from llm_pipeline.model.generate import generate

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    ours = build_model(get_preset(args.preset), seed=0).to(device=device, dtype=dtype).eval()
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(ours, Path(tmp) / "m")
        theirs = HFLlama.from_pretrained(Path(tmp) / "m", torch_dtype=dtype).to(device).eval()
    g = torch.Generator().manual_seed(0)
    vocab = ours.config.vocab_size
    lengths = [max(1, args.prompt_len - (i % 4) * (args.prompt_len // 8)) for i in range(args.batch)]  # ragged
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
    width = max(lengths)
    ids = torch.zeros(args.batch, width, dtype=torch.long)
    mask = torch.zeros(args.batch, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)

    def run_ours() -> list[list[int]]:
        return generate(ours, prompts, max_new_tokens=args.new_tokens, temperature=0.0)

    @torch.no_grad()
    def run_theirs() -> list[list[int]]:
        out = theirs.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
            do_sample=False, pad_token_id=0, eos_token_id=None,
        )  # fmt: skip
        return out[:, width:].tolist()

    def timed(fn) -> tuple[float, list[list[int]]]:
        fn()  # warm-up
        times, out = [], []
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), out

    t_ours, tok_ours = timed(run_ours)
    t_theirs, tok_theirs = timed(run_theirs)
    tokens = args.batch * args.new_tokens
    same = sum(a == b for a, b in zip(tok_ours, tok_theirs, strict=True))
    print(f"model {args.preset} on {device} ({args.dtype}), batch {args.batch}, prompts <= {args.prompt_len} tokens "
          f"(ragged, left-padded), {args.new_tokens} new tokens, greedy, median of {args.repeats}")  # fmt: skip
    print(f"ours:         {tokens / t_ours:10.1f} tokens/s ({t_ours:.3f}s)")
    print(f"transformers: {tokens / t_theirs:10.1f} tokens/s ({t_theirs:.3f}s)")
    print(f"ratio ours/transformers: {t_theirs / t_ours:.2f}x (goal >= 1x); identical greedy rows: {same}/{args.batch}")


if __name__ == "__main__":
    main()
