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


# A name ending in a data or weights file's extension is a file, not a hub id (`data.jsonl` run from another folder
# was reported as "the hub cannot be reached"); hub ids are `name` or `org/name`.
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".arrow", ".txt", ".gz", ".safetensors", ".bin", ".pt", ".yaml", ".yml")


def looks_like_local_path(name_or_path: str) -> bool:
    """A hub id is `name` or `org/name`; anything else that is path-like (or names a file by its extension) is meant
    to be a local path."""
    return (name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or name_or_path.lower().endswith(FILE_SUFFIXES)
            or os.path.exists(name_or_path))


PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def unreachable_hub_id(value: str) -> str | None:
    """Why the hub id `value` cannot load here, found in a second; None when it may load: a local path, `embedded`, a
    copy in a local cache, HF_HUB_OFFLINE set (the libraries then answer from the cache at once), a proxy configured
    (not probed), or the hub's host accepting a connection.

    Without this, an unreachable hub is found by huggingface_hub's retries: five per file with a 1-8 s back-off, so
    the one-line error came after 50 s for a model id and 27 s for a data set id (measured on a machine without
    network). Only a failed TCP connection to the hub's host counts: any answer means the libraries decide."""
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if not value or value == "embedded" or looks_like_local_path(value) or constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in PROXY_VARIABLES):
        return None
    folder = value.replace("/", "--")
    caches = [Path(constants.HF_HUB_CACHE) / f"{kind}--{folder}" for kind in ("models", "datasets")]
    try:
        import datasets.config

        caches.append(Path(datasets.config.HF_DATASETS_CACHE) / value.replace("/", "___"))  # a data set prepared before
    except ImportError:
        pass
    if any(cache.exists() for cache in caches):
        return None
    endpoint = urlsplit(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=5).close()
    except OSError as error:  # no such host, refused, unreachable, timed out
        return f"the hub ({constants.ENDPOINT}) cannot be reached from here ({error.strerror or type(error).__name__}) and no local cache holds it"
    return None


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


def give_safetensors_umask_modes(folder: str | os.PathLike) -> None:
    """Give the `*.safetensors` files in `folder` that are mode 0600 the mode a plain `open()` would have given them
    (0666 less the umask, 0644 under the usual 022), as every other file of a saved model has.

    safetensors 0.8 writes through a temporary file that it renames into place, and the temporary file is always
    0600 (safetensors/safetensors#782, fix open upstream): a model trained on a shared machine was readable by its
    owner alone, and another user's `from_pretrained` failed. Only 0600 files are changed, so a mode the user set
    on purpose stays."""
    mask = os.umask(0)
    os.umask(mask)  # reading the umask means setting it; restored at once
    for path in Path(folder).glob("*.safetensors"):
        if path.is_file() and path.stat().st_mode & 0o777 == 0o600 and 0o666 & ~mask != 0o600:
            path.chmod(0o666 & ~mask)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")
"""A local model folder has a tokenizer when it holds one of these (transformers 5 otherwise builds an empty one from
`config.json` without a word, and the run fails much later)."""


def has_tokenizer_files(name_or_path: str) -> bool:
    """False only for a local folder without any tokenizer file; hub ids and `embedded` pass."""
    path = resolve_model_path(name_or_path)
    return not os.path.isdir(path) or any(os.path.exists(os.path.join(path, name)) for name in TOKENIZER_FILES)


def learned_positions(config) -> int | None:
    """How many positions a model config's learned absolute position embeddings hold (GPT-2's `n_positions`; a
    `max_position_embeddings` without rotary embeddings), or None where positions are rotary or not named: a RoPE
    model runs past its `max_position_embeddings`, a learned table does not."""
    if config is None:
        return None
    if isinstance(getattr(config, "n_positions", None), int):
        return config.n_positions
    rotary = any(name.startswith("rope") or name == "rotary_dim" for name in vars(config)) or getattr(config, "position_embedding_type", "absolute") != "absolute"
    limit = getattr(config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) and not rotary else None


def positions_problem(max_prompt_length: int, key: str, max_new_tokens: int, limit: int | None, model: str) -> str | None:
    """The one-line error of a prompt and a completion longer than a model's learned positions (`limit`, None: no
    limit), naming the new-token key `key`; None where they fit. The runner's check before loading and the trainers'
    at construction share it."""
    if limit is None or max_prompt_length + max_new_tokens <= limit:
        return None
    return (f"{key}: max_prompt_length {max_prompt_length} + {key} {max_new_tokens} = {max_prompt_length + max_new_tokens} tokens, but {model} "
            f"has {limit} positions; lower one of them")


def position_limit(name_or_path: str, **kwargs) -> int | None:
    """`learned_positions` of a local model folder's config (`kwargs`: `trust_remote_code`, `revision`, as the model is
    loaded with); None for a hub id (no second round of hub requests before the model's own) and where the config
    cannot be read here (the model's own load then says why)."""
    from transformers import AutoConfig

    path = resolve_model_path(name_or_path)
    if not os.path.isdir(path):
        return None
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError):
        return None
    return learned_positions(config)


_VOLATILE_CONFIG_KEYS = {"transformers_version", "dtype", "torch_dtype", "_name_or_path", "architectures", "use_cache"}


def fingerprint(name_or_path: str) -> str | None:
    """What tells a local model folder's weights apart, for a reward head trained on them: every weights file's name,
    size and three samples of 256 KiB (start, middle, end: the header and tensor values), and the config without the
    keys a re-save rewrites (`transformers_version`, `dtype`, ...). A model retrained or rebuilt into the folder
    changes it (unless it changes only values outside the samples: not a proof); a byte-identical copy elsewhere, or a
    re-save by another transformers version, does not. None for a hub id (a revision does not change under its name)
    and for a folder that is not there."""
    import hashlib
    import json

    path = Path(resolve_model_path(name_or_path))
    if not path.is_dir():
        return None
    digest = hashlib.sha256()
    config = path / "config.json"
    if config.is_file():
        values = json.loads(config.read_text())
        digest.update(json.dumps({k: v for k, v in values.items() if k not in _VOLATILE_CONFIG_KEYS}, sort_keys=True).encode())
    sample = 1 << 18
    for file in sorted(f for f in path.iterdir() if f.is_file() and f.suffix in (".safetensors", ".bin") and not f.name.startswith("training_args")):
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}:".encode())
        with open(file, "rb") as f:
            for offset in sorted({0, max(0, size // 2 - sample // 2), max(0, size - sample)}):
                f.seek(offset)
                digest.update(f.read(sample))
    return digest.hexdigest()[:16]


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Tokenizer with left padding (generation continues at the right edge) and a pad token. A folder with a
    tokenizer_config.json but nothing to build the tokenizer from is a ValueError saying so in one line (transformers'
    own is five, the first ending "from one of:"). A bare folder of GPT-2's vocab.json and merges.txt (no
    tokenizer_config.json to name a class, no tokenizer.json) is read as GPT-2's byte-level BPE (`GPT2TokenizerFast`),
    which AutoTokenizer cannot tell."""
    path = resolve_model_path(name_or_path)
    if is_bare_bpe_folder(path):
        from transformers import GPT2TokenizerFast

        return prepare_tokenizer(GPT2TokenizerFast.from_pretrained(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except ValueError as error:
        if not str(error).startswith("Couldn't instantiate the backend tokenizer"):
            raise
        raise ValueError("its tokenizer files cannot build a tokenizer (no tokenizer.json, nor the vocabulary its tokenizer_config.json's class reads: "
                         "vocab.json and merges.txt for GPT-2, a sentencepiece model, ...); copy the tokenizer of the model it was trained with into it") from None
    return prepare_tokenizer(tokenizer)


def is_bare_bpe_folder(path: str) -> bool:
    """A folder holding vocab.json and merges.txt and neither tokenizer.json nor tokenizer_config.json."""
    def has(name):
        return os.path.isfile(os.path.join(path, name))

    return os.path.isdir(path) and has("vocab.json") and has("merges.txt") and not has("tokenizer.json") and not has("tokenizer_config.json")


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
