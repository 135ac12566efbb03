"""Evaluation throughput: batched log-likelihood vs one request at a time and vs lm-eval's HFLM; sandboxed
HumanEval with N workers.

0. ARC-shaped requests (a question context of --ctx tokens or less and four answers of 2-12 tokens each):
   our lm-eval path (``loglikelihood_shared``: each context once, its KV cache shared by the answers,
   what the ``lm_eval`` eval's ``PipelineLM`` runs) against lm-eval's ``HFLM`` on the same token ids and
   weights; the same log-likelihoods are checked, then the ratio is printed (goal: >= 2x).

1. MMLU-shaped requests (a shared context of --ctx tokens and four one-token continuations per
   question) on a randomly initialised model: ``loglikelihood`` batched (shared-context grouping,
   --batch questions per forward) against two baselines: one forward per request, and lm-eval's
   ``HFLM`` (the EleutherAI harness, same batch size, on ``transformers.LlamaForCausalLM`` with the
   same weights). All runs must give the same log-likelihoods (checked) before ratios are printed.
2. The 164 canonical HumanEval solutions executed in the sandbox with 1 worker (baseline) and with
   --workers workers: executions/s and the ratio.

    python bench/eval_throughput.py [--preset tiny] [--questions 32] [--ctx 256] [--batch 16] [--workers 2]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from _machine import machine_line  # bench/ is on sys.path when a bench runs
from llm_pipeline.eval.humaneval import build_program, load_problems
from llm_pipeline.eval.loglik import loglikelihood, loglikelihood_shared
from llm_pipeline.eval.sandbox import Sandbox, SandboxLimits
from llm_pipeline.model import build_model, get_preset


def mmlu_like_requests(n_questions: int, ctx_len: int, vocab: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for _ in range(n_questions):
        n = int(torch.randint(ctx_len // 2, ctx_len + 1, (1,), generator=g))
        ctx = torch.randint(0, vocab, (n,), generator=g).tolist()
        reqs.extend((ctx, [letter]) for letter in (10, 11, 12, 13))
    return reqs


def arc_like_requests(n_questions: int, ctx_len: int, vocab: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for _ in range(n_questions):
        n = int(torch.randint(ctx_len // 2, ctx_len + 1, (1,), generator=g))
        ctx = torch.randint(0, vocab, (n,), generator=g).tolist()
        for _ in range(4):
            k = int(torch.randint(2, 13, (1,), generator=g))
            reqs.append((ctx, torch.randint(0, vocab, (k,), generator=g).tolist()))
    return reqs


def bench_arc(args: argparse.Namespace) -> None:
    """Our lm_eval backend's scoring vs lm-eval's HFLM on ARC-shaped requests."""
    cfg = get_preset(args.preset)
    model = build_model(cfg, seed=0).eval()
    torch.set_num_threads(args.threads)
    reqs = arc_like_requests(args.questions, args.ctx, cfg.vocab_size, seed=1)
    loglikelihood_shared(model, reqs[:8], batch_size=4)  # warm-up
    t0 = time.perf_counter()
    ours = loglikelihood_shared(model, reqs, batch_size=args.batch)
    t_ours = time.perf_counter() - t0
    shape = f"{len(reqs)} requests ({args.questions} questions x 4 answers of 2-12 tokens), ctx <= {args.ctx}"
    print(f"ARC-shaped log-likelihood, preset {args.preset}, {shape}")
    print(f"  ours (shared-context KV cache, {args.batch} contexts/forward): {len(reqs) / t_ours:8.1f} requests/s")
    if args.lm_eval:
        t_lm = time_lm_eval(model, reqs, ours, args.batch)
        print(f"  lm-eval HFLM (batch {args.batch}, transformers model):       {len(reqs) / t_lm:8.1f} requests/s")
        print(f"  ratio ours / lm-eval HFLM: {t_lm / t_ours:.2f}x   (goal >= 2x; same log-likelihoods, checked)")


def bench_loglik(args: argparse.Namespace) -> None:
    cfg = get_preset(args.preset)
    model = build_model(cfg, seed=0).eval()
    torch.set_num_threads(args.threads)
    reqs = mmlu_like_requests(args.questions, args.ctx, cfg.vocab_size)
    loglikelihood(model, reqs[:8], batch_size=4)  # warm-up

    t0 = time.perf_counter()
    base = [loglikelihood(model, [r], batch_size=1)[0] for r in reqs]
    t_base = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = loglikelihood(model, reqs, batch_size=args.batch)
    t_ours = time.perf_counter() - t0
    worst = max(abs(a[0] - b[0]) for a, b in zip(base, ours, strict=True))
    assert worst < 1e-3, f"batched and single log-likelihoods differ by {worst}"
    shape = f"{len(reqs)} requests ({args.questions} questions x 4), ctx <= {args.ctx}"
    print(f"log-likelihood, preset {args.preset}, {shape}")
    print(f"  one request per forward (baseline): {len(reqs) / t_base:8.1f} requests/s")
    print(f"  batched ({args.batch} contexts/forward, shared): {len(reqs) / t_ours:8.1f} requests/s")
    print(f"  ratio: {t_base / t_ours:.2f}x   (max |delta loglik| {worst:.1e})")
    if args.lm_eval:
        t_lm = time_lm_eval(model, reqs, ours, args.batch)
        print(f"  lm-eval HFLM (batch {args.batch}, transformers model): {len(reqs) / t_lm:8.1f} requests/s")
        print(f"  ratio ours / lm-eval: {t_lm / t_ours:.2f}x")


def time_lm_eval(model, reqs, reference, batch_size: int) -> float:
    """lm-eval's HFLM._loglikelihood_tokens on a transformers copy of ``model`` (same token ids)."""
    import transformers
    from lm_eval.models.huggingface import HFLM
    from tokenizers import Tokenizer, models, pre_tokenizers

    from llm_pipeline.checkpoint.hf import hf_config_dict

    hc = transformers.LlamaConfig(
        **{k: v for k, v in hf_config_dict(model.config, torch.float32).items() if k != "dtype"}
    )
    hf = transformers.LlamaForCausalLM._from_config(hc, attn_implementation="sdpa").eval()
    hf.load_state_dict(model.state_dict())
    raw = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<unk>", pad_token="<unk>")
    lm = HFLM(pretrained=hf, tokenizer=tok, batch_size=batch_size, device="cpu")
    requests = [(("", ""), list(ctx), list(cont)) for ctx, cont in reqs]
    t0 = time.perf_counter()
    theirs = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    dt = time.perf_counter() - t0
    worst = max(abs(a[0] - b[0]) for a, b in zip(theirs, reference, strict=True))
    assert worst < 1e-3, f"lm-eval and our log-likelihoods differ by {worst}"
    return dt


def bench_sandbox(args: argparse.Namespace) -> None:
    problems = load_problems()
    programs = [build_program(p, p["canonical_solution"]) for p in problems.values()]
    rates = {}
    for workers in (1, args.workers):
        with Sandbox(SandboxLimits(timeout_s=10), workers=workers) as sb:
            iso = sb.isolation()
            t0 = time.perf_counter()
            results = sb.run_many(programs)
            dt = time.perf_counter() - t0
        assert all(r is not None and r.passed for r in results), "a canonical solution failed"
        rates[workers] = len(programs) / dt
        print(
            f"  sandbox, {workers} worker(s): {rates[workers]:6.1f} executions/s ({len(programs)} programs, {dt:.1f}s)"
        )
    print(f"  isolation: network={iso['network']}, filesystem={iso['filesystem']}, uid drop={iso['uid_drop']}")
    print(f"  ratio {args.workers} workers / 1 worker: {rates[args.workers] / rates[1]:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--questions", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-lm-eval", dest="lm_eval", action="store_false", help="skip the lm-eval baseline")
    ap.add_argument("--no-sandbox", dest="sandbox", action="store_false", help="skip the HumanEval sandbox part")
    args = ap.parse_args()
    print(machine_line())
    print(f"python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_arc(args)
    bench_loglik(args)
    if not args.sandbox:
        return
    print("HumanEval canonical solutions in the sandbox")
    bench_sandbox(args)


if __name__ == "__main__":
    main()
