"""The model an evaluation scores, loaded on first use (model-free runs, e.g. HumanEval samples, need none)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class ModelHandle:
    """Loads the model and tokenizer on first use, so model-free runs (HumanEval samples) need neither."""

    def __init__(
        self,
        model_dir: str | Path | None,
        *,
        device: str = "auto",
        dtype: str | None = None,
        model: Any = None,
        tokenizer: Any = None,
    ) -> None:
        self.model_dir = model_dir
        self.device, self.dtype = device, dtype  # the eval config's: 'auto' = CUDA if present; bf16 on GPU
        self._model = model
        self._tokenizer = tokenizer

    @property
    def loaded(self) -> bool:
        return self._model is not None and self._tokenizer is not None

    def get(self) -> tuple[Any, Any]:
        if self._model is None:
            if self.model_dir is None:
                raise ValueError("this eval needs a model: pass a checkpoint directory")
            from llm_pipeline.checkpoint.hf import load_pretrained

            root = Path(self.model_dir)
            if (root / ".metadata").is_file() and not (root / "config.json").is_file():
                raise ValueError(
                    f"{root} is a training (DCP) checkpoint; evals read HF model directories: "
                    f"export it first (llm-pipeline export {root} OUT_DIR)"
                )
            device = resolve_device(self.device)
            dtype = self.dtype or ("bfloat16" if device.type == "cuda" else "float32")
            self._model = load_pretrained(self.model_dir, device=device, dtype=dtype).eval()
        if self._tokenizer is None:
            if self.model_dir is None:
                raise ValueError("a tokenizer is needed: pass a checkpoint directory with tokenizer.json")
            from llm_pipeline.data.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.model_dir)
        return self._model, self._tokenizer

    def completer(
        self,
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop_strings: tuple[str, ...] | list[str] = (),
        seed: int = 0,
    ) -> Callable[[list[str]], list[str]]:
        """``prompts -> completions`` by batched KV-cache generation; prompts too long for the context get ''."""
        from llm_pipeline.model.generate import encode_prompt, generate_text

        model, tok = self.get()
        ctx = model.config.max_position_embeddings
        calls = [0]

        def complete(prompts: list[str]) -> list[str]:
            lengths = [len(encode_prompt(tok, p)) for p in prompts]
            fit = [i for i, n in enumerate(lengths) if n < ctx]
            out = [""] * len(prompts)
            if fit:
                room = ctx - max(lengths[i] for i in fit)
                texts = generate_text(
                    model,
                    tok,
                    [prompts[i] for i in fit],
                    stop_strings=tuple(stop_strings),
                    max_new_tokens=min(max_new_tokens, room),
                    temperature=temperature,
                    top_p=top_p,
                    seed=seed + calls[0] if temperature > 0 else None,
                )
                for i, t in zip(fit, texts, strict=True):
                    out[i] = t
            calls[0] += 1
            return out

        return complete
