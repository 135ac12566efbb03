"""Tokenize cleaned documents into flat token shards (``llm-pipeline data pack``).

Layout (datatrove's, so its readers open our shards too)::

    packed/manifest.json           tokens, documents, source bytes per split; dtype; tokenizer sha256; config
    packed/train/00000.ds          little-endian token ids (uint16 when vocab <= 65,536, else uint32)
    packed/train/00000.ds.index    uint64 end offset (in tokens) of each document in the .ds file
    packed/train/00000.ds.loss     optional: one byte per token, 1 = train on it
    packed/val/...                 documents assigned to validation (source-given split, else hashed by id)
    packed/domain/, domain_val/    only when the source marks documents split=domain (a fine-tuning domain held
                                   out of pretraining, e.g. stdlib ``source.domain_modules``), hashed by id
    packed/docs/                   only when the source marks documents split=docs (stdlib ``source.docs_split``:
                                   documentation as a source of its own in a pretraining mixture)

Each document is ``<|bos|> text <|eos|>``. Input file i becomes shard i of each split, its documents in
input order, so the output is byte-identical for the same input and config whatever the number of
workers, the batch sizes and the encoder. The documents of all files form one stream of encode batches
of ``pack.batch_bytes`` of text, across file and split boundaries: while up to ``pack.workers`` batches
encode, the main thread reads the next one and writes finished ones. The encoder (``pack.encoder``) is
the tokenizer itself (``encode_batch_fast``, on its rayon threads) or, where the tokenizer converts
(:func:`~llm_pipeline.data.tokenizer.rank_bpe_encoder`: every tokenizer ``data tokenizer`` trains), the
same BPE as a tiktoken ``Encoding``: the same ids, 2.4-2.8x faster end to end on the demo corpus (it writes
uint32 arrays, no Python ints), checked against ``tokenizers`` on the first batch before anything is
written (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import chain
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tokenizers import Tokenizer

from llm_pipeline.config import config_to_dict
from llm_pipeline.data.config import DataConfig
from llm_pipeline.data.manifest import MANIFEST, read_manifest, write_json
from llm_pipeline.data.progress import progress_bar
from llm_pipeline.data.ray_cluster import ray_connection
from llm_pipeline.data.sources import iter_jsonl_documents
from llm_pipeline.data.tokenizer import BOS_TOKEN, EOS_TOKEN, TOKENIZER_FILE, load_tokenizer, rank_bpe_encoder
from llm_pipeline.hardware import usable_cores
from llm_pipeline.hashing import file_sha256, hash64, stable_hash

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "domain", "domain_val", "docs")
# Present in every manifest; the domain and docs splits only when the source gave them documents.
ALWAYS_SPLITS = ("train", "val")
# tiktoken's ids are compared with tokenizers' on this much of the first batch's text before a pack writes.
VERIFY_BYTES = 256 << 10


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab <= 65,536), else uint32: datatrove's token_size 2 or 4."""
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


class TokenShardWriter:
    """Write one ``.ds`` shard (+ ``.index``, optional ``.loss``) in datatrove's layout.

    Other stages (e.g. SFT examples with a prompt loss mask) write their token files through this class.
    """

    def __init__(self, path: str | os.PathLike[str], *, dtype: np.dtype, loss_mask: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self._tokens = open(self.path, "wb")  # noqa: SIM115 (closed in close())
        self._loss = open(f"{self.path}.loss", "wb") if loss_mask else None  # noqa: SIM115
        self.doc_ends: list[int] = []
        self.num_tokens = 0

    def write(self, tokens: np.ndarray | list[int], loss_mask: np.ndarray | list[bool] | None = None) -> None:
        """Append one document."""
        arr = np.asarray(tokens, dtype=self.dtype)
        arr.tofile(self._tokens)
        if self._loss is not None:
            mask = np.ones(len(arr), np.uint8) if loss_mask is None else np.asarray(loss_mask, np.uint8)
            if len(mask) != len(arr):
                raise ValueError(f"loss mask has {len(mask)} entries for {len(arr)} tokens")
            mask.tofile(self._loss)
        self.num_tokens += len(arr)
        self.doc_ends.append(self.num_tokens)

    def write_many(self, tokens: np.ndarray, doc_lengths: np.ndarray) -> None:
        """Append several documents given as one flat array and their lengths (fast path)."""
        tokens.astype(self.dtype, copy=False).tofile(self._tokens)
        if self._loss is not None:
            np.ones(len(tokens), np.uint8).tofile(self._loss)
        ends = np.cumsum(doc_lengths, dtype=np.int64) + self.num_tokens
        self.doc_ends.extend(int(e) for e in ends)
        self.num_tokens += len(tokens)

    def close(self) -> dict[str, Any]:
        self._tokens.close()
        if self._loss is not None:
            self._loss.close()
        np.asarray(self.doc_ends, dtype="<u8").tofile(f"{self.path}.index")
        return {"path": self.path.name, "tokens": self.num_tokens, "documents": len(self.doc_ends)}


def assign_split(
    doc_id: str, meta: dict[str, Any], *, val_fraction: float, seed: int, domain_val_fraction: float = 0.0
) -> str:
    """Source-given split (e.g. held-out stdlib modules) if any, else a stable hash of the id.

    A ``domain`` document (held out of pretraining for fine-tuning) goes to ``domain_val`` with
    probability ``domain_val_fraction``, by the same hash.
    """
    given = meta.get("split")
    u = hash64(f"{seed}:{doc_id}") / 2**64
    if given == "domain":
        return "domain_val" if u < domain_val_fraction else "domain"
    if given in SPLITS:
        return str(given)
    return "val" if u < val_fraction else "train"


class _FileShards:
    """Shard ``index`` of each split for one input file; a split's writer opens with its first document."""

    def __init__(self, job: dict[str, Any], dtype: np.dtype) -> None:
        self.job, self.dtype = job, dtype
        self.name = f"{job['index']:05d}.ds"
        self.writers: dict[str, TokenShardWriter] = {}
        self.text_bytes = dict.fromkeys(SPLITS, 0)

    def write(self, split: str, tokens: np.ndarray, lengths: np.ndarray) -> None:
        if split not in self.writers:
            path = Path(self.job["out"]) / split / self.name
            self.writers[split] = TokenShardWriter(path, dtype=self.dtype, loss_mask=self.job["loss_mask"])
        self.writers[split].write_many(tokens, lengths)

    def close(self) -> dict[str, Any]:
        """Per split with documents: its shard's tokens, documents, source bytes and sha256."""
        result: dict[str, Any] = {}
        for split in SPLITS:  # the manifest's order
            if split in self.writers:
                info = self.writers[split].close()
                path = Path(self.job["out"]) / split / self.name
                result[split] = {**info, "bytes": self.text_bytes[split], "sha256": file_sha256(path)}
        return result


class _Batch(NamedTuple):
    texts: list[str]
    dests: list[tuple[_FileShards, str]]  # per text: its file's shards and its split
    finished: list[_FileShards]  # files whose last document is in this batch or an earlier one


def _batches(jobs: list[dict[str, Any]], dtype: np.dtype, *, batch_bytes: int, batch_size: int) -> Iterator[_Batch]:
    """The documents of every file, in file order, cut into encode batches of ``batch_bytes`` of text
    (or ``batch_size`` documents) regardless of file and split boundaries: one stream of evenly sized
    batches keeps every tokenizer thread busy, where a batch per file and split ends in small ones."""
    texts: list[str] = []
    dests: list[tuple[_FileShards, str]] = []
    finished: list[_FileShards] = []
    size = 0
    for job in jobs:
        shards = _FileShards(job, dtype)
        file = Path(job["file"])
        for doc in iter_jsonl_documents(file.parent, file.name):
            split = assign_split(
                str(doc["id"]),
                doc["metadata"],
                val_fraction=job["val_fraction"],
                seed=job["seed"],
                domain_val_fraction=job["domain_val_fraction"],
            )
            nbytes = len(doc["text"].encode("utf-8", "surrogatepass"))
            shards.text_bytes[split] += nbytes
            texts.append(doc["text"])
            dests.append((shards, split))
            size += nbytes
            if size >= batch_bytes or len(texts) >= batch_size:
                yield _Batch(texts, dests, finished)
                texts, dests, finished, size = [], [], [], 0
        finished.append(shards)
    if texts or finished:
        yield _Batch(texts, dests, finished)


Ids = Callable[[list[str]], list[Any]]  # texts -> each text's ids (a list or a uint32 array)


def batch_encoder(tok: Tokenizer, choice: str) -> tuple[str, Ids]:
    """The encoder ``pack.encoder`` names: ``tokenizers``' ``encode_batch_fast``, or the same tokenizer as a
    tiktoken ``Encoding`` (2-3x faster, the same ids: :func:`rank_bpe_encoder`). ``auto`` takes tiktoken
    where the tokenizer converts; ``tiktoken`` refuses, with the reason, one that does not."""

    def hf(texts: list[str]) -> list[Any]:
        # ``Encoding.ids`` builds a new list each time: read it once
        return [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]  # releases the GIL

    if choice == "tokenizers":
        return "tokenizers", hf
    enc, why = rank_bpe_encoder(tok)
    if enc is None:
        if choice == "tiktoken":
            raise ValueError(f"pack.encoder=tiktoken: this tokenizer cannot be encoded by tiktoken: {why}; "
                             "set pack.encoder: tokenizers (or auto)")  # fmt: skip
        log.info("pack: encoding with tokenizers (tiktoken does not apply: %s)", why)
        return "tokenizers", hf
    specials = frozenset(enc.special_tokens_set)
    threads = encoder_threads()

    def one(texts: list[str]) -> list[Any]:  # encode_to_numpy releases the GIL
        return [enc.encode_to_numpy(t, allowed_special=specials, disallowed_special=()) for t in texts]

    def fast(texts: list[str]) -> list[Any]:
        """A batch spread over ``threads`` threads in runs of consecutive documents of about equal text."""
        parts = min(len(texts), 4 * threads)
        if threads == 1 or parts < 2:
            return one(texts)
        cuts = np.searchsorted(np.cumsum([len(t) for t in texts]), np.linspace(0, sum(map(len, texts)), parts + 1))
        runs = [texts[a:b] for a, b in zip([0, *cuts[1:-1]], [*cuts[1:-1], len(texts)], strict=True) if b > a]
        return [ids for run in _encode_pool(threads).map(one, runs) for ids in run]

    return "tiktoken", fast


def encoder_threads() -> int:
    """tiktoken's threads, chosen as ``tokenizers`` chooses its own: RAYON_NUM_THREADS, else the usable cores
    (affinity mask and container quota); one where TOKENIZERS_PARALLELISM turns parallelism off."""
    if os.environ.get("TOKENIZERS_PARALLELISM", "").lower() in ("0", "false", "off", "no"):
        return 1
    return int(os.environ.get("RAYON_NUM_THREADS") or 0) or max(1, int(usable_cores()))


_POOLS: dict[int, ThreadPoolExecutor] = {}
if hasattr(os, "register_at_fork"):  # a forked child inherits the pools but not their threads
    os.register_at_fork(after_in_child=_POOLS.clear)


def _encode_pool(threads: int) -> ThreadPoolExecutor:
    """tiktoken's threads, shared by every batch and pack of this process (as tokenizers keeps its rayon pool)."""
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="pack-encode")
    return _POOLS[threads]


def _checked(name: str, encode: Ids, tok: Tokenizer, batch: _Batch, choice: str) -> tuple[str, Ids]:
    """Compare tiktoken's ids with ``tokenizers``' on the first ``VERIFY_BYTES`` of text before anything is
    written: a difference falls back to ``tokenizers`` (``auto``) or stops the pack (``tiktoken``)."""
    if name == "tokenizers":
        return name, encode
    sample, size = [], 0
    for t in batch.texts:
        if size >= VERIFY_BYTES:
            break
        sample.append(t)
        size += len(t.encode("utf-8", "surrogatepass"))
    hf_name, hf = batch_encoder(tok, "tokenizers")
    for i, (a, b) in enumerate(zip(encode(sample), hf(sample), strict=True)):
        if list(a) != b:
            at = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            msg = (
                f"tiktoken's ids differ from tokenizers' in {batch.dests[i][0].job['file']} (document {i} of the "
                f"first batch) from token {at}: {list(a[at : at + 5])} against {b[at : at + 5]}"
            )
            if choice == "tiktoken":
                raise ValueError(f"pack.encoder=tiktoken: {msg}; set pack.encoder: tokenizers")
            log.warning("pack: %s: encoding with tokenizers", msg)
            return hf_name, hf
    return name, encode


def _encode(encode: Ids, batch: _Batch, bos: int, eos: int) -> list[tuple[_FileShards, str, np.ndarray, np.ndarray]]:
    """Encode a batch and frame each document as ``bos ids eos``: one flat array per (file, split), in order."""
    if not batch.texts:
        return []
    groups: dict[tuple[int, str], list[Any]] = {}
    owners: dict[tuple[int, str], _FileShards] = {}
    for (shards, split), ids in zip(batch.dests, encode(batch.texts), strict=True):
        key = (shards.job["index"], split)
        owners[key] = shards
        groups.setdefault(key, []).append(ids)
    out = []
    for key, ids in groups.items():
        lengths = np.fromiter(map(len, ids), np.int64, len(ids)) + 2
        dtype = owners[key].dtype
        tokens = np.empty(int(lengths.sum()), dtype)
        ends = np.cumsum(lengths)
        tokens[ends - lengths] = bos
        tokens[ends - 1] = eos
        body = np.ones(len(tokens), bool)
        body[ends - lengths] = body[ends - 1] = False
        if isinstance(ids[0], np.ndarray):  # tiktoken's arrays
            tokens[body] = np.concatenate(ids)
        else:  # tokenizers' lists of Python ints
            tokens[body] = np.fromiter(chain.from_iterable(ids), dtype, int(lengths.sum()) - 2 * len(ids))
        out.append((owners[key], key[1], tokens, lengths))
    return out


def _pack_files(
    jobs: list[dict[str, Any]],
    tok: Tokenizer,
    *,
    workers: int,
    batch_bytes: int,
    batch_size: int,
    encoder: str = "auto",
    on_file: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """Tokenize the files of ``jobs`` into their shards; returns each file's per-split shard info, in order.

    The main thread reads and writes while up to ``workers`` batches encode (both encoders release the
    GIL and spread each batch over their own threads: ``tokenizers``' rayon pool, :func:`_encode_pool`).
    Each file's documents reach its writers in input order, so the shards do not depend on the batching,
    on ``workers`` or on the encoder."""
    bos, eos = tok.token_to_id(BOS_TOKEN), tok.token_to_id(EOS_TOKEN)
    dtype = token_dtype(tok.get_vocab_size())
    results: dict[int, dict[str, Any]] = {}
    pending: deque[tuple[_Batch, Future[list[tuple[_FileShards, str, np.ndarray, np.ndarray]]]]] = deque()
    name, encode = batch_encoder(tok, encoder)
    checked = False

    def write_oldest() -> None:
        batch, future = pending.popleft()
        for shards, split, tokens, lengths in future.result():
            shards.write(split, tokens, lengths)
        for shards in batch.finished:
            results[shards.job["index"]] = shards.close()
            if on_file is not None:
                on_file()

    with ThreadPoolExecutor(workers) as pool:
        for batch in _batches(jobs, dtype, batch_bytes=batch_bytes, batch_size=batch_size):
            if not checked and batch.texts:
                name, encode = _checked(name, encode, tok, batch, encoder)
                checked = True
                log.info("pack: encoding with %s", name)
            pending.append((batch, pool.submit(_encode, encode, batch, bos, eos)))
            if len(pending) > workers:  # one batch read ahead of those encoding
                write_oldest()
        while pending:
            write_oldest()
    return [results[job["index"]] for job in jobs]


def _pack_file(job: dict[str, Any], tok: Tokenizer) -> dict[str, Any]:
    """Tokenize one cleaned input file into shard ``index`` of each split (a Ray task's unit of work)."""
    return _pack_files(
        [job], tok, workers=1, batch_bytes=job["batch_bytes"], batch_size=job["batch_size"], encoder=job["encoder"]
    )[0]


def _pack_task(tokenizer_file: str, job: dict[str, Any]) -> dict[str, Any]:
    """One Ray task: load the tokenizer in this worker, then pack one file (the same code as the local pool)."""
    os.environ["RAYON_NUM_THREADS"] = "1"  # one CPU per task, as the task asks Ray for
    return _pack_file(job, Tokenizer.from_file(tokenizer_file))


def _pack_on_ray(jobs: list[dict[str, Any]], tokenizer_file: str) -> Iterator[dict[str, Any]]:
    """Each file as a Ray task on the connected cluster; results in file order (the manifest's order)."""
    import ray

    task = ray.remote(num_cpus=1, max_retries=2)(_pack_task)
    refs = [task.remote(tokenizer_file, job) for job in jobs]
    for ref in refs:
        yield ray.get(ref)


def pack_fingerprint(cfg: DataConfig) -> str:
    """What the shards depend on. Not the encoder: both write the same bytes, and a changed fingerprint would
    re-pack and set every trained stage aside as trained on other data."""
    tok_sha = file_sha256(cfg.tokenizer_dir / TOKENIZER_FILE)
    settings = {k: v for k, v in config_to_dict(cfg.pack).items() if k != "encoder"}
    return stable_hash("pack", settings, read_manifest(cfg.clean_dir)["fingerprint"], tok_sha)


def pack_documents(
    input_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    tokenizer_file: str | os.PathLike[str],
    *,
    val_fraction: float = 0.01,
    seed: int = 0,
    workers: int = 1,
    batch_size: int = 256,
    batch_bytes: int = 1 << 20,
    encoder: str = "auto",
    loss_mask: bool = False,
    domain_val_fraction: float = 0.1,
    executor: str = "local",
    extra_manifest: dict[str, Any] | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Tokenize every ``*.jsonl.gz`` of ``input_dir`` into ``output_dir/{train,val}`` shards plus a manifest
    (and ``domain``/``domain_val`` shards for documents the source marked ``split=domain``).

    ``executor="ray"`` runs one task per file on the Ray cluster this process is connected to
    (:func:`~llm_pipeline.data.ray_cluster.ray_connection`); ``output_dir`` must be on a filesystem every
    node sees. The shards are the same bytes either way."""
    files = sorted(Path(input_dir).glob("*.jsonl.gz"))
    if not files:
        raise FileNotFoundError(f"no *.jsonl.gz documents in {input_dir}: run `llm-pipeline data clean` first")
    out = Path(output_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tok = load_tokenizer(tokenizer_file)
    if tok.token_to_id(BOS_TOKEN) is None or tok.token_to_id(EOS_TOKEN) is None:
        raise ValueError(f"tokenizer {tokenizer_file} lacks {BOS_TOKEN}/{EOS_TOKEN}: train one with `data tokenizer`")
    tok_file = str(Path(tokenizer_file) / TOKENIZER_FILE if Path(tokenizer_file).is_dir() else tokenizer_file)
    jobs = [
        {
            "file": str(f),
            "index": i,
            "out": str(out),
            "val_fraction": val_fraction,
            "seed": seed,
            "batch_size": batch_size,
            "batch_bytes": batch_bytes,
            "encoder": encoder,
            "loss_mask": loss_mask,
            "domain_val_fraction": domain_val_fraction,
        }
        for i, f in enumerate(files)
    ]
    for split in SPLITS:  # every split's folder, as datatrove's writers leave them, even when empty
        (out / split).mkdir()
    with progress_bar("pack", total=len(jobs), enabled=show_progress) as bar:
        if executor == "ray":
            results = []
            for r in _pack_on_ray(jobs, tok_file):
                results.append(r)
                bar.advance(1)
        else:
            results = _pack_files(
                jobs,
                tok,
                workers=workers,
                batch_bytes=batch_bytes,
                batch_size=batch_size,
                encoder=encoder,
                on_file=lambda: bar.advance(1),
            )
    vocab = tok.get_vocab_size()
    splits: dict[str, Any] = {}
    for s in SPLITS:
        shards = [r[s] for r in results if s in r]
        if not shards and s not in ALWAYS_SPLITS:
            continue
        splits[s] = {
            "tokens": sum(x["tokens"] for x in shards),
            "documents": sum(x["documents"] for x in shards),
            "bytes": sum(x["bytes"] for x in shards),
            "shards": [{**x, "path": f"{s}/{x['path']}"} for x in shards],
        }
    if splits["train"]["tokens"] == 0:
        raise ValueError(f"pack: no training documents in {input_dir} (all went to val? val_fraction={val_fraction})")
    if splits["val"]["documents"] == 0 and val_fraction > 0:
        log.warning("pack: the validation split is empty; raise pack.val_fraction or hold out modules")
    manifest = {
        "step": "pack",
        "format": "datatrove-ds",
        "dtype": token_dtype(vocab).name,
        "vocab_size": vocab,
        "tokenizer_sha256": file_sha256(tok_file),
        "bos_id": tok.token_to_id(BOS_TOKEN),
        "eos_id": tok.token_to_id(EOS_TOKEN),
        "loss_mask": loss_mask,
        "splits": splits,
        **(extra_manifest or {}),
    }
    write_json(out / MANIFEST, manifest)
    return manifest


def pack(cfg: DataConfig, *, show_progress: bool = True) -> dict[str, Any]:
    """The ``data pack`` step: cleaned documents + tokenizer -> ``<output_dir>/packed``."""
    fp = pack_fingerprint(cfg)
    p = cfg.pack
    engine = (
        ray_connection(cfg.clean.executor.ray_address, "pack.executor=ray")
        if p.executor == "ray"
        else contextlib.nullcontext()
    )
    with engine:
        manifest = pack_documents(
            cfg.clean_dir / "output",
            cfg.packed_dir,
            cfg.tokenizer_dir,
            val_fraction=p.val_fraction,
            seed=p.seed,
            workers=p.workers,
            batch_size=p.batch_size,
            batch_bytes=p.batch_bytes,
            encoder=p.encoder,
            loss_mask=p.save_loss_mask,
            domain_val_fraction=p.domain_val_fraction,
            executor=p.executor,
            extra_manifest={"fingerprint": fp, "config": config_to_dict(cfg)},
            show_progress=show_progress,
        )
    sp = manifest["splits"]
    log.info(
        "pack: train %d tokens / %d docs, val %d tokens / %d docs -> %s",
        sp["train"]["tokens"],
        sp["train"]["documents"],
        sp["val"]["tokens"],
        sp["val"]["documents"],
        cfg.packed_dir,
    )
    if "domain" in sp:
        log.info(
            "pack: domain %d tokens / %d docs, domain_val %d tokens / %d docs",
            sp["domain"]["tokens"],
            sp["domain"]["documents"],
            sp.get("domain_val", {}).get("tokens", 0),
            sp.get("domain_val", {}).get("documents", 0),
        )
    return manifest
