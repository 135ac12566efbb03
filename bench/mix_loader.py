"""The mixing loader's throughput against the single-source loader (goal: no slower than 0.95x).

Packs a corpus of stdlib text (this machine's, offline) into three packed folders with one tokenizer,
then times, for the same number of rows of the same shape:

- single: one ``TokenBatchLoader`` over one folder (what a single-source pretraining run reads);
- mixture: a ``WeightedMixture`` of three loaders at 0.5/0.3/0.2 (what ``data.sources`` reads),
  including its per-source accounting and the merge of the sources' rows into one batch.

The three folders are every third document of the corpus, so a row costs the same to read from any of
them and the difference between the two is the mixer's own work. (A row's document lookup is a binary
search over its folder's documents, about half of a row's instructions: with the single loader on a
folder of twice the documents of the others, as this bench had until 2026-12-07, the mixture's rows took
~6% fewer instructions, which flattered it.)

Each is timed ``--repeats`` times in alternation (best kept) after a warm-up; the ratio is mixture / single rows per
second. The figures depend on the machine's load: re-time on an idle machine before quoting them.

    python bench/mix_loader.py [--seq-len 2048] [--micro 8] [--batches 200] [--max-bytes 6000000]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path


def _corpus(out: Path, max_bytes: int) -> dict[str, Path]:
    from llm_pipeline.data.config import SourceConfig
    from llm_pipeline.data.pack import pack_documents
    from llm_pipeline.data.sources import iter_stdlib
    from llm_pipeline.data.tokenizer import save_tokenizer, train_tokenizer

    docs, total = [], 0
    for item in iter_stdlib(SourceConfig(held_out_modules=[])):
        if item.text and item.text.strip():
            docs.append({"id": item.doc_id, "text": item.text})
            total += len(item.text)
            if total >= max_bytes:
                break
    save_tokenizer(train_tokenizer((d["text"] for d in docs[:400]), vocab_size=8192), out / "tok")
    parts = {"web": docs[0::3], "code": docs[1::3], "math": docs[2::3]}  # alike: see the module docstring
    folders = {}
    for name, part in parts.items():
        import gzip

        (out / name / "clean").mkdir(parents=True)
        with gzip.open(out / name / "clean" / "00000.jsonl.gz", "wt", encoding="utf-8") as f:
            f.writelines(json.dumps(d) + "\n" for d in part)
        pack_documents(out / name / "clean", out / name / "packed", out / "tok", val_fraction=0.0, show_progress=False)
        folders[name] = out / name / "packed"
    return folders


def _rates(sources: list, batches: int, repeats: int) -> list[float]:
    """Best rows/s of each source, timed in alternation (so a change of the machine's load hits both alike)."""
    for source in sources:
        for _ in range(5):
            source.next_batch()
    best = [0.0] * len(sources)
    for _ in range(repeats):
        for k, source in enumerate(sources):
            t0 = time.process_time()  # CPU time of this process: steadier than wall time on a busy machine
            rows = 0
            for _ in range(batches):
                rows += next(iter(source.next_batch().values())).shape[0]
            best[k] = max(best[k], rows / max(time.process_time() - t0, 1e-9))
    return best


def main() -> None:
    from llm_pipeline.data.loader import PackedTokenDataset, TokenBatchLoader
    from llm_pipeline.data.mixing import WeightedMixture

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--max-bytes", type=int, default=6_000_000)
    args = ap.parse_args()
    logging.getLogger("llm_pipeline.data.mixing").setLevel(logging.ERROR)  # the small sources repeat: expected here
    with tempfile.TemporaryDirectory(prefix="mix-bench-") as tmp:
        folders = _corpus(Path(tmp), args.max_bytes)

        def loader(name: str) -> TokenBatchLoader:
            ds = PackedTokenDataset(folders[name], "train")
            return TokenBatchLoader(ds, seq_len=args.seq_len, micro_batch_size=args.micro, seed=0)

        single = loader("web")
        mixture = WeightedMixture({n: loader(n) for n in folders}, {"web": 0.5, "code": 0.3, "math": 0.2})
        mixture.set_seq_len(args.seq_len, args.micro)
        one, mixed = _rates([single, mixture], args.batches, args.repeats)
    print(f"rows of {args.seq_len} tokens, micro-batch {args.micro}, {args.batches} batches, best of {args.repeats}")
    print(f"single-source loader : {one:10.1f} rows/s ({one * args.seq_len / 1e6:.2f}M tokens/s)")
    print(f"3-source mixture     : {mixed:10.1f} rows/s ({mixed * args.seq_len / 1e6:.2f}M tokens/s)")
    per_batch = 1e6 * args.micro / mixed - 1e6 * args.micro / one
    print(f"mixer's own CPU time : {per_batch:10.1f} us per micro-batch of {args.micro} rows")
    print(f"ratio mixture/single : {mixed / one:.3f}x (goal >= 0.95x; re-time on an idle machine)")


if __name__ == "__main__":
    main()
