"""SFT/DPO data layer: packing efficiency, packing time and the embedded defaults' build time.

(a) Embedded SFT default (this machine's stdlib) with a BPE trained like the demo's (vocab 8192 on
    ~12 MB of stdlib text): examples, rows and packing efficiency (real tokens / row capacity) at
    several ``max_seq_len``, against padded batches (one example per row, padded to the longest of
    each micro-batch of 8: the baseline packing replaces).
(b) A long-tailed (lognormal) length distribution: efficiency and the time of one epoch's packing
    (best-fit-decreasing) for 100k and 1M examples.
(c) Build time (read + parse + tokenise + pack) of the embedded SFT and DPO defaults.

    python bench/sft_data.py [--out /tmp/bench_sft_data]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np

from _machine import machine_line  # bench/ is on sys.path when a bench runs
from llm_pipeline.data.config import HELD_OUT_MODULES, PreferenceDataConfig, SFTDataConfig, SourceConfig
from llm_pipeline.data.preference import build_preference_sources
from llm_pipeline.data.sft import SFTBatchSource, build_sft_sources, pack_best_fit
from llm_pipeline.data.sources import iter_stdlib
from llm_pipeline.data.stdlib_chat import stdlib_functions
from llm_pipeline.data.tokenizer import iter_texts_capped, save_tokenizer, train_tokenizer


def demo_like_tokenizer(out: Path) -> Path:
    texts = (i.text for i in iter_stdlib(SourceConfig(include_docs=True)) if i.text)
    save_tokenizer(train_tokenizer(iter_texts_capped(texts, 12_000_000), vocab_size=8192), out)
    return out


def padded_fill(src: SFTBatchSource, micro: int) -> float:
    """Real tokens / batch slots over one epoch of one-example-per-row batches."""
    src.set_micro_batch_size(micro)
    for _ in range(-(-src.rows_per_epoch // micro)):
        src.next_batch()
    return src.stats()["batch_fill"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="/tmp/bench_sft_data")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(machine_line())
    print(f"# python {platform.python_version()}")

    t = time.perf_counter()
    functions = stdlib_functions(HELD_OUT_MODULES)
    print(f"stdlib functions parsed: {len(functions)} in {time.perf_counter() - t:.2f}s")
    tok_dir = demo_like_tokenizer(out / "tokenizer")

    print("\n(a)+(c) embedded SFT default")
    print("max_seq_len | train examples | rows | packing efficiency | padded fill (micro 8) | build s")
    for seq in (512, 1024, 2048):
        cfg = SFTDataConfig(max_seq_len=seq, rejects_path=str(out / "sft_rejects.jsonl"))
        t = time.perf_counter()
        train, _, report = build_sft_sources(cfg, tok_dir, micro_batch_size=8, show_progress=False)
        build = time.perf_counter() - t
        unpacked = SFTBatchSource(train.examples, max_seq_len=seq, micro_batch_size=8, packing=False, seed=0)
        r = report["train"]
        print(
            f"{seq} | {r['examples']:.0f} (truncated {r['truncated']:.0f}) | {r['rows_per_epoch']:.0f} | "
            f"{r['packing_efficiency']:.4f} | {padded_fill(unpacked, 8):.4f} | {build:.2f}"
        )

    cfg_p = PreferenceDataConfig(rejects_path=str(out / "dpo_rejects.jsonl"))
    t = time.perf_counter()
    _, _, report = build_preference_sources(cfg_p, tok_dir, micro_batch_size=8, show_progress=False)
    print(
        f"\nembedded DPO default (max_seq_len {cfg_p.max_seq_len}): {report['train']['pairs']:.0f} train / "
        f"{report['val']['pairs']:.0f} val pairs, rejected {report['rejected']}, {time.perf_counter() - t:.2f}s"
    )

    print("\n(b) lognormal lengths (mean e^5.5 ~ 245 tokens, sigma 1, clipped to [16, 4096]), rows of 4096")
    print("examples | rows | efficiency | BFD seconds per epoch")
    rng = np.random.default_rng(0)
    for n in (100_000, 1_000_000):
        lengths = np.clip(rng.lognormal(5.5, 1.0, n), 16, 4096).astype(np.int64)
        t = time.perf_counter()
        _, offsets = pack_best_fit(lengths, 4096, rng.permutation(n))
        secs = time.perf_counter() - t
        rows = len(offsets) - 1
        print(f"{n} | {rows} | {lengths.sum() / (rows * 4096):.4f} | {secs:.2f}")


if __name__ == "__main__":
    main()
