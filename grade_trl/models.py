"""Loading policies, references and tokenizers from a hub id, a local path or the embedded default."""

from __future__ import annotations

import os
from contextlib import contextmanager
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


@contextmanager
def whole_weights():
    """Within the block, `from_pretrained` loads every weight whole on this process, also under DeepSpeed ZeRO-3.

    Under a ZeRO-3 launch, TrainingArguments registers its DeepSpeed config with transformers, and from then on
    every `from_pretrained` partitions the model as it loads (`deepspeed.zero.Init`). That suits the policy DeepSpeed
    trains, but a frozen model (the reference, the reward model's backbone, the judge) is never wrapped in a
    DeepSpeed engine: its partitioned weights would have no hooks to gather them, and a copy of a partitioned model
    (the reference is a copy of the policy) is not a model. So these load whole, replicated on every process as
    under FSDP2 (README, "Past one GPU"), and the policy is partitioned when its engine is built. A no-op otherwise."""
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:  # pragma: no cover - transformers without its DeepSpeed integration
        yield
        return
    registered = hf_deepspeed._hf_deepspeed_config_weak_ref  # private, but transformers offers no getter
    config = registered() if registered is not None else None
    if config is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)


def load_pretrained(model_class, path: str, **kwargs):
    """`model_class.from_pretrained(path, **kwargs)` as grade_trl loads every model it builds itself (the policy, the
    reward model's backbone, the judge): without hub kernels unless `kwargs` say otherwise (`NO_HUB_KERNELS`), and
    whole on this process (`whole_weights`)."""
    with whole_weights():
        return model_class.from_pretrained(path, **{**NO_HUB_KERNELS, **kwargs})


def load_causal_lm(name_or_path: str, dtype: torch.dtype | str = torch.float32, **kwargs):
    """A causal LM, whole on this process (`load_pretrained`), in float32 unless `dtype` says otherwise."""
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    return load_pretrained(AutoModelForCausalLM, resolve_model_path(name_or_path), dtype=dtype, **kwargs)


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "tokenizer_config.json", "vocab.txt")
"""A local model folder has a tokenizer when it holds one of these (transformers 5 otherwise builds an empty one from
`config.json` without a word, and the run fails much later)."""


def has_tokenizer_files(name_or_path: str) -> bool:
    """False only for a local folder without any tokenizer file; hub ids and `embedded` pass."""
    path = resolve_model_path(name_or_path)
    return not os.path.isdir(path) or any(os.path.exists(os.path.join(path, name)) for name in TOKENIZER_FILES)


def position_limit(name_or_path: str) -> int | None:
    """How many positions the model's config allows (GPT-2's `n_positions`, others' `max_position_embeddings`), or
    None where the config names none."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model_path(name_or_path))
    for name in ("n_positions", "max_position_embeddings"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return None


def fingerprint(name_or_path: str) -> str | None:
    """What tells a local model folder's contents apart (its config, its weights file's size and first MiB, which
    holds the header and the first tensor's values): a model retrained or rebuilt into the same folder changes it.
    None for a hub id (a cached revision does not change under its name)."""
    import hashlib

    path = Path(resolve_model_path(name_or_path))
    if not path.is_dir():
        return None
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        file = path / name
        if file.is_file():
            digest.update(f"{name}:{file.stat().st_size}:".encode())
            with open(file, "rb") as f:
                digest.update(f.read(1 << 20))
    return digest.hexdigest()[:16]


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Tokenizer with left padding (generation continues at the right edge) and a pad token."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    return prepare_tokenizer(tokenizer)


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
