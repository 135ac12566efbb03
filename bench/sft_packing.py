"""SFT packing: how full the rows are, and training tokens/s of packed vs padded batches at equal loss.

(a) Packing efficiency (real tokens / row capacity) of best-fit-decreasing on the demo's SFT set
    (the embedded stdlib default, the demo's tokenizer, rows of 512) and on a long-tailed lognormal
    length distribution (rows of 4,096 and of 512). Goal >= 95% on both.
(b) Forward + backward over the same examples with the same model and objective (the SFT stage's
    CausalLMObjective, trained tokens only): packed rows (per-example attention and positions)
    against padded batches, one example per row padded to the longest of its micro-batch, in three
    orders: the random order the data layer serves (the baseline, `data.packing: false`); HF's
    `group_by_length` (transformers' own `get_length_grouped_indices`, as its Trainer calls it with
    the micro-batch as batch size: random megabatches of up to 50 micro-batches, each sorted by
    length); and all examples sorted by length (an upper bound no trainer serves). The examples
    timed are the first N of HF's order over the whole training set, so the HF variant is what its
    Trainer computes in an epoch's first N examples. Tokens/s counts real tokens; the mean loss per
    trained token of every variant must agree (same examples, same weights, no update). Goal: packed
    >= 2x the random-order baseline and >= 1.1x HF's group_by_length on CPU. Rounds alternate; the
    median counts.

    python bench/sft_packing.py [--examples 512] [--rounds 3] [--dtype fp32|bf16] [--model DIR]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from _machine import load, machine_line  # bench/ is on sys.path when a bench runs
from llm_pipeline.data.config import SFTDataConfig
from llm_pipeline.data.sft import SFTBatchSource, TokenExamples, build_sft_sources, pack_best_fit
from llm_pipeline.model import build_model, get_preset
from llm_pipeline.train.objectives import CausalLMObjective

DEMO_TOKENIZER = Path("runs/demo/data/tokenizer")


class InOrder(SFTBatchSource):
    """Padded batches in the examples' own order (HF's group_by_length order, or sorted by length)."""

    def _build_epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.examples)
        return np.arange(n), np.arange(n + 1, dtype=np.int64)


def lognormal_efficiency(n: int, capacity: int, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(5.5, 1.0, n), 16, capacity).astype(np.int64)
    _, offsets = pack_best_fit(lengths, capacity, rng.permutation(n))
    return float(lengths.sum() / ((len(offsets) - 1) * capacity))


def one_pass(model: torch.nn.Module, source: SFTBatchSource, objective: CausalLMObjective, dtype: str, micro: int):
    """Forward + backward over every row once (no update): (seconds, real tokens, loss sum, trained tokens,
    token slots computed, padding included)."""
    loss_sum, count, tokens, slots = 0.0, 0, 0, 0
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
    start = time.perf_counter()
    while source.position < source.rows_per_rank:
        # Every row once, no filler rows (those only keep several ranks in step): the last micro-batch is short.
        source.set_micro_batch_size(min(micro, source.rows_per_rank - source.position))
        batch = source.next_batch()
        with autocast:
            out = objective(model, batch)
        out.loss_sum.backward()
        loss_sum += float(out.loss_sum.detach())
        count += objective.count(batch)
        tokens += int((batch["document_ids"] >= 0).sum())
        slots += batch["input_ids"].numel()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start, tokens, loss_sum, count, slots


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=512, help="training examples timed in (b)")
    ap.add_argument("--seq", type=int, default=512, help="row length (the demo's max_seq_len)")
    ap.add_argument("--micro", type=int, default=8, help="rows per forward, packed and padded alike")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--model", help="HF model folder (default: a randomly initialised `tiny` preset)")
    ap.add_argument("--tokenizer", default=str(DEMO_TOKENIZER), help="the demo's tokenizer (`make demo` writes it)")
    ap.add_argument("--out", default="/tmp/bench_sft_packing")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(machine_line())

    tok = Path(args.tokenizer)
    if not (tok / "tokenizer.json").is_file():
        from sft_data import demo_like_tokenizer  # bench/sft_data.py: trained like the demo's

        tok = demo_like_tokenizer(Path(args.out) / "tokenizer")
    rejects = str(Path(args.out) / "sft_rejects.jsonl")

    print("\n(a) packing efficiency (real tokens / row capacity), best-fit-decreasing")
    full, _, report = build_sft_sources(
        SFTDataConfig(max_seq_len=args.seq, rejects_path=rejects), tok, micro_batch_size=1, show_progress=False
    )
    r = report["train"]
    print(f"demo SFT set, rows of {args.seq}: {r['examples']:.0f} examples -> {r['rows_per_epoch']:.0f} rows, "
          f"efficiency {r['packing_efficiency']:.4f}")  # fmt: skip
    for capacity in (4096, 512):
        eff = lognormal_efficiency(100_000, capacity)
        print(f"lognormal (median e^5.5 ~ 245 tokens, sigma 1, clipped to [16, {capacity}]), 100k examples, "
              f"rows of {capacity}: efficiency {eff:.4f}")  # fmt: skip

    print(f"\n(b) forward + backward over the same {args.examples} examples, {args.dtype}, micro-batch {args.micro}")
    from transformers.trainer_pt_utils import get_length_grouped_indices

    ex = full.examples
    n = min(args.examples, len(ex))
    # HF's group_by_length over the whole training set, as its Trainer orders an epoch (batch size: the
    # micro-batch, no gradient accumulation); the first n examples it serves are the ones timed.
    hf_order = get_length_grouped_indices(
        [int(x) for x in ex.lengths], args.micro, generator=torch.Generator().manual_seed(0)
    )
    picked = [ex.example(i) for i in hf_order[:n]]
    examples = TokenExamples.from_lists(picked)  # in HF's order
    by_length = TokenExamples.from_lists(sorted(picked, key=lambda e: len(e[0])))
    common = dict(max_seq_len=args.seq, micro_batch_size=args.micro, seed=0, repeat=False)
    variants = {
        "packed": (lambda: SFTBatchSource(examples, packing=True, **common), True),
        "padded (random order, baseline)": (lambda: SFTBatchSource(examples, packing=False, **common), False),
        "padded (HF group_by_length)": (lambda: InOrder(examples, packing=False, **common), False),
        "padded (all sorted by length)": (lambda: InOrder(by_length, packing=False, **common), False),
    }
    if args.model:
        from llm_pipeline.checkpoint.hf import load_pretrained

        model = load_pretrained(args.model)
    else:
        model = build_model(get_preset("tiny"), seed=0)
    if model.config.vocab_size < examples.tokens.max() + 1:
        raise SystemExit("the model's vocabulary is smaller than the tokenizer's: pass --model with a matching one")
    times: dict[str, list[float]] = {k: [] for k in variants}
    stats: dict[str, tuple[int, float, int]] = {}
    for _ in range(args.rounds):
        for name, (make, packed) in variants.items():
            objective = CausalLMObjective(trained_only=True, document_attention=packed)
            secs, tokens, loss, count, slots = one_pass(model, make(), objective, args.dtype, args.micro)
            times[name].append(secs)
            stats[name] = (tokens, loss, count, slots)
    base = statistics.median(times["padded (random order, baseline)"])
    ref_loss = stats["packed"][1] / stats["packed"][2]
    print("variant | median s | real tokens/s | vs baseline | token slots (with padding) | "
          "mean loss per trained token | rel. diff vs packed")  # fmt: skip
    for name in variants:
        secs = statistics.median(times[name])
        tokens, loss, count, slots = stats[name]
        mean = loss / count
        print(f"{name} | {secs:.2f} | {tokens / secs:,.0f} | {base / secs:.2f}x | {slots:,} | {mean:.6f} | "
              f"{abs(mean - ref_loss) / ref_loss:.1e}")  # fmt: skip
    packed_s = statistics.median(times["packed"])
    print(
        "packed vs: "
        + ", ".join(f"{name} {statistics.median(times[name]) / packed_s:.2f}x" for name in variants if name != "packed")
    )
    print(
        f"real tokens {stats['packed'][0]:,} in each variant; trained tokens {stats['packed'][2]:,}; "
        f"rounds {args.rounds}: {', '.join(f'{k} {[round(t, 1) for t in v]}' for k, v in times.items())}"
    )
    print(f"# load average at end {load()}")


if __name__ == "__main__":
    main()
