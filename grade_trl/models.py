"""Loading policies, references and tokenizers from a hub id, a local path or the embedded default."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

ASSETS_DIR = Path(__file__).parent / "assets"
EMBEDDED_MODEL = "embedded"
"""Name that resolves to the bundled 5.3M-parameter `tiny-imdb-gpt2` (works offline)."""


def resolve_model_path(name_or_path: str) -> str:
    """Map `embedded` to the bundled model; return local paths and hub ids unchanged."""
    if name_or_path == EMBEDDED_MODEL:
        return str(ASSETS_DIR / "tiny-imdb-gpt2")
    return os.path.expanduser(name_or_path)


def looks_like_local_path(name_or_path: str) -> bool:
    """A hub id is `name` or `org/name`; anything else that is path-like is meant to be a local path."""
    return name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or os.path.exists(name_or_path)


NO_HUB_KERNELS = {"use_kernels": False}
"""transformers (5.x, with `kernels`, one of its own requirements) swaps layers for kernels fetched from the hub at
the model's first `.train()`/`.eval()` on a GPU. Off by default here: an offline GPU node then fails at that call
(seen on an H200 with HF_HUB_OFFLINE=1: "kernels-community/activation is not available in the local cache"), and a
run's numbers would depend on what the hub served that day. `model_init_kwargs: {use_kernels: true}` turns them on."""


def load_causal_lm(name_or_path: str, dtype: torch.dtype | str = torch.float32, **kwargs):
    path = resolve_model_path(name_or_path)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **{**NO_HUB_KERNELS, **kwargs})


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Tokenizer with left padding (generation continues at the right edge) and a pad token."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    return prepare_tokenizer(tokenizer)


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
