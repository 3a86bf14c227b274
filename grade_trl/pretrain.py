"""Pre-train a small GPT-2 base model from scratch, like the bundled `assets/tiny-imdb-gpt2`.

Trains a byte-level BPE tokenizer (`<|endoftext|>` is id 0 and serves as bos/eos/pad/unk) on
IMDB train reviews (`<br />` removed, whitespace folded) and, optionally, GSM8K train rendered as
`Question: ...\\nAnswer: ...`; packs every document plus `<|endoftext|>` into one token stream cut
into `--context`-token blocks, and trains a GPT-2 with AdamW, linear warm-up and cosine decay.
A seeded share of the documents (`--eval_documents`) is held out for the validation loss.

The bundled model (about 150 s on one H100, bf16 autocast):

    python -m grade_trl.pretrain --imdb stanfordnlp/imdb --gsm8k openai/gsm8k --output_dir out/tiny-imdb-gpt2

A quick CPU check on the embedded IMDB sample:

    python -m grade_trl.pretrain --imdb embedded --output_dir /tmp/tiny --max_documents 2000 \\
        --max_steps 30 --batch_size 16

Writes to `--output_dir` (a new or empty folder; `--overwrite` writes over what a folder holds): the model
(safetensors), the tokenizer, `training_log.json` (a list of {step, train_loss, val_loss, tokens, t}, rewritten
atomically at every log step) and MODEL_CARD.md. Bad options and unreadable data are refused in one line before
anything is written. A SIGTERM or Ctrl-C during training saves the model as it is after the last finished step, with
a card that says so, and exits 143 or 130.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shlex
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from .errors import stop_in_one_line_while_importing

if __name__ == "__main__":  # Ctrl-C during the seconds of imports below: one line, not a traceback
    stop_in_one_line_while_importing()

import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from .cli import Command, Option, exit_process, range_error
from .data.gsm8k import load_gsm8k
from .data.imdb import clean_review, load_imdb
from .errors import Interrupted, UserError, loading, signals_raise
from .models import give_safetensors_umask_modes

logger = logging.getLogger(__name__)

EOS = "<|endoftext|>"


COMMAND = Command(
    prog="grade_trl.pretrain",
    description=__doc__.split("\n")[0],
    options=(
        Option("imdb", str, "stanfordnlp/imdb", "IMDB: hub id, file, folder (train.jsonl[.gz]) or `embedded`"),
        Option("gsm8k", str | None, None, "GSM8K: train.jsonl, its folder, or `openai/gsm8k`; skipped if unset"),
        Option("output_dir", str | None, None, "where the model, tokenizer, log and model card go (required)"),
        Option("vocab_size", int, 8192, "BPE vocabulary size, `<|endoftext|>` included"),
        Option("n_layer", int, 4, "transformer blocks"),
        Option("n_embd", int, 256, "hidden width"),
        Option("n_head", int, 4, "attention heads"),
        Option("context", int, 256, "block length in tokens (= n_positions)"),
        Option("batch_size", int, 256, "blocks per optimizer step"),
        Option("max_steps", int, 2882, "optimizer steps"),
        Option("learning_rate", float, 2e-3, "peak learning rate"),
        Option("warmup_steps", int, 200, "linear warm-up steps"),
        Option("min_lr_ratio", float, 0.1, "final learning rate as a fraction of the peak"),
        Option("weight_decay", float, 0.1, "AdamW weight decay (matrices only)"),
        Option("seed", int, 42, "seed for the document shuffle, model init and batch order"),
        Option("max_documents", int | None, None, "use at most this many documents (quick runs)"),
        Option("eval_documents", int, 500, "held-out documents for the validation loss"),
        Option("log_every", int, 100, "log train/val loss every this many steps"),
        Option("overwrite", bool, False, "write into an --output_dir that already holds files (over the files of the same names)"),
    ),
)

RANGES = {  # option -> (is the value right?, what is right): checked before anything loads
    "vocab_size": (lambda v: v >= 257, "an integer >= 257 (the 256 bytes and <|endoftext|>)"),
    "n_layer": (lambda v: v >= 1, "an integer >= 1"),
    "n_embd": (lambda v: v >= 1, "an integer >= 1"),
    "n_head": (lambda v: v >= 1, "an integer >= 1"),
    "context": (lambda v: v >= 2, "an integer >= 2 (tokens per block)"),
    "batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "max_steps": (lambda v: v >= 1, "an integer >= 1"),
    "learning_rate": (lambda v: v > 0, "a number > 0"),
    "warmup_steps": (lambda v: v >= 0, "an integer >= 0"),
    "min_lr_ratio": (lambda v: 0 <= v <= 1, "a number in [0, 1] (the final learning rate as a fraction of the peak)"),
    "weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "max_documents": (lambda v: v >= 2, "an integer >= 2 (or unset for all)"),
    "eval_documents": (lambda v: v >= 1, "an integer >= 1 (held-out documents for the validation loss)"),
    "log_every": (lambda v: v >= 1, "an integer >= 1"),
}


def check_options(args: SimpleNamespace) -> None:
    """Every option in range, the head count dividing the width, and the output folder writable and new or empty
    (unless --overwrite): one line naming the option, before anything loads or is written."""
    for key, value in vars(args).items():
        if problem := range_error(key, value, RANGES):
            raise UserError(f"--{problem}")
    if args.n_embd % args.n_head:
        raise UserError(f"--n_head: {args.n_head} heads do not divide --n_embd {args.n_embd}; give a divisor of it")
    if not args.output_dir:
        raise UserError("--output_dir is required: where the model, tokenizer, log and model card go")
    output_dir = Path(os.path.expanduser(args.output_dir))
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output_dir: {str(output_dir)!r} is a file; give a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not args.overwrite:
        raise UserError(f"--output_dir: {str(output_dir)!r} already holds files; give a new folder, or --overwrite to write over them")
    existing = next(p for p in (output_dir.absolute(), *output_dir.absolute().parents) if p.exists())
    if not os.access(existing, os.W_OK):
        raise UserError(f"--output_dir: cannot write into {str(existing)!r}; give a folder you can write to")
    if args.warmup_steps > args.max_steps:  # a short trial run with the default warm-up: allowed, but said
        logger.warning("--warmup_steps %d > --max_steps %d: the learning rate rises for the whole run and ends at %.3g, never at its "
                       "peak --learning_rate %g; give --warmup_steps below --max_steps for the warm-up then cosine schedule",
                       args.warmup_steps, args.max_steps, args.learning_rate * lr_factor(args.max_steps - 1, args.warmup_steps, args.max_steps, args.min_lr_ratio),
                       args.learning_rate)


def gsm8k_documents(source: str) -> list[str]:
    """GSM8K train rows (a hub id, a file, a folder with train.jsonl[.gz], or `embedded`) as `Question: ...\\nAnswer: ...`."""
    rows = load_gsm8k(source, "train")
    return [f"Question: {q}\nAnswer: {a}" for q, a in zip(rows["question"], rows["answer"])]


def load_documents(args: SimpleNamespace) -> tuple[list[str], list[str]]:
    """(train, eval) documents: IMDB train (+ GSM8K train), shuffled with the seed, capped, split."""
    with loading("--imdb", args.imdb):
        docs = [clean_review(text) for text in load_imdb(args.imdb, "train")["text"]]
    if args.gsm8k:
        with loading("--gsm8k", args.gsm8k):
            docs += gsm8k_documents(args.gsm8k)
    random.Random(args.seed).shuffle(docs)
    docs = docs[: args.max_documents]
    if args.eval_documents >= len(docs):
        raise UserError(f"--eval_documents: {args.eval_documents} leaves none of the {len(docs)} documents to train on; give fewer than {len(docs)}")
    return docs[args.eval_documents :], docs[: args.eval_documents]


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with `<|endoftext|>` as id 0."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],  # first, so id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def wrap_tokenizer(tokenizer: Tokenizer, context: int) -> PreTrainedTokenizerFast:
    """The transformers tokenizer, its `model_max_length` the model's positions (not transformers' 1e30 default)."""
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, pad_token=EOS, unk_token=EOS, model_max_length=context)


def pack(tokenizer: Tokenizer, texts: list[str], context: int, which: str = "training") -> torch.Tensor:
    """All documents, each followed by eos, as one stream cut into (n_blocks, context) blocks."""
    eos_id = tokenizer.token_to_id(EOS)
    stream = [i for enc in tokenizer.encode_batch(texts, add_special_tokens=False) for i in (*enc.ids, eos_id)]
    n_blocks = len(stream) // context
    if n_blocks == 0:
        key = "--eval_documents" if which == "held-out" else "--max_documents"
        raise UserError(f"{key}: the {len(texts)} {which} documents give {len(stream)} tokens, less than one --context {context} block; give more documents or a shorter --context")
    return torch.tensor(stream[: n_blocks * context]).view(n_blocks, context)  # (n_tokens,) -> (n_blocks, context)


def build_model(args: SimpleNamespace, vocab_size: int) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=args.context, n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    return GPT2LMHeadModel(config)


def make_optimizer(model: torch.nn.Module, args: SimpleNamespace) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases and layer norms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.95), fused=torch.cuda.is_available())


def lr_factor(step: int, warmup: int, max_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at 0-based `step`: linear warm-up, then cosine down to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def batch_indices(n_blocks: int, batch_size: int, generator: torch.Generator):
    """Endless batches of block indices: seeded epochs of random permutations, concatenated."""
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while len(pending) < batch_size:
            pending = torch.cat([pending, torch.randperm(n_blocks, generator=generator)])
        yield pending[:batch_size]
        pending = pending[batch_size:]


def autocast(device: torch.device):
    """bf16 autocast on CUDA, plain float32 elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def evaluate(model: GPT2LMHeadModel, blocks: torch.Tensor, batch_size: int) -> float:
    """Mean next-token loss (nats/token) over all eval blocks."""
    model.eval()
    device, total = model.device, 0.0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size].to(device)  # (b, context)
        with autocast(device):
            total += model(input_ids=batch, labels=batch).loss.item() * len(batch)
    model.train()
    return total / len(blocks)


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def train(model, train_blocks: torch.Tensor, eval_blocks: torch.Tensor, args, output_dir: Path, stop: list[int]) -> tuple[list[dict], int]:
    """The training loop: (the log of {step, train_loss, val_loss, tokens, t}, kept written to output_dir; the steps
    finished). It ends after the step in which `stop` (the signals received, `stop_handler`) became non-empty."""
    device = model.device
    optimizer = make_optimizer(model, args)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, args.warmup_steps, args.max_steps, args.min_lr_ratio)
    )
    batches = batch_indices(len(train_blocks), args.batch_size, torch.Generator().manual_seed(args.seed))
    log, window, start, finished = [], [], time.perf_counter(), 0
    model.train()
    for step in range(1, args.max_steps + 1):
        batch = train_blocks[next(batches)].to(device)  # (batch_size, context)
        with autocast(device):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        finished = step
        window.append(loss.item())
        if step == 1 or step % args.log_every == 0 or step == args.max_steps or stop:
            entry = {
                "step": step,
                "train_loss": round(sum(window) / len(window), 4),
                "val_loss": round(evaluate(model, eval_blocks, args.batch_size), 4),
                "tokens": step * args.batch_size * args.context,
                "t": round(time.perf_counter() - start, 1),
            }
            log.append(entry)
            window = []
            write_json_atomic(output_dir / "training_log.json", log)
            logger.info("step %(step)d  train %(train_loss).4f  val %(val_loss).4f  tokens %(tokens)d  %(t).1fs", entry)
        if stop:
            break
    return log, finished


def stop_handler(stop: list[int]):
    """A signal handler: the first SIGTERM/SIGINT is recorded in `stop` (the step finishes, the model is saved); a
    second one stops at once (`Interrupted`)."""

    def finish_the_step(signum, frame):
        if stop:
            raise Interrupted(signum)
        stop.append(signum)
        logger.warning("%s: finishing this step, then saving the model and stopping (send it again to stop at once)", signal_name(signum))

    return finish_the_step


def model_card(argv: list[str], model: GPT2LMHeadModel, n_train_tokens: int, log: list[dict], steps: int, tokens_seen: int, max_steps: int, stopped_by: str | None = None) -> str:
    n_params = sum(p.numel() for p in model.parameters())
    c = model.config
    stopped = (f"- **Stopped by {stopped_by} after step {steps} of {max_steps}**: the weights after step {steps}; the log's last "
               f"entry is step {log[-1]['step'] if log else 0}.\n") if stopped_by else ""
    losses = (f"- Last logged validation loss (held-out documents): {log[-1]['val_loss']:.4f} nats/token; "
              f"train loss {log[-1]['train_loss']:.4f} (`training_log.json`).\n") if log else ""
    return (
        f"# {c.n_layer}-layer GPT-2 pre-trained with grade_trl.pretrain\n\n"
        f"- {n_params / 1e6:.2f}M parameters ({c.n_layer} layers, {c.n_embd} wide, {c.n_head} heads, "
        f"context {c.n_positions}), vocabulary {c.vocab_size}; `<|endoftext|>` is id 0 (bos, eos, pad, unk).\n"
        f"- {n_train_tokens:,} training tokens; {steps} steps, {tokens_seen:,} tokens seen.\n"
        f"{stopped}{losses}\n"
        f"Command:\n\n```\npython -m grade_trl.pretrain {shlex.join(argv)}\n```\n"
    )


def pretrain(args: SimpleNamespace, argv: list[str]) -> list[dict]:
    """Train and save the tokenizer and model; returns the training log. Everything is checked and loaded before the
    output folder is made; a signal during training saves the model after its last finished step, then raises."""
    check_options(args)
    train_docs, eval_docs = load_documents(args)
    tokenizer = train_tokenizer(train_docs, args.vocab_size)
    train_blocks = pack(tokenizer, train_docs, args.context)
    eval_blocks = pack(tokenizer, eval_docs, args.context, which="held-out")
    logger.info(
        "%d train / %d eval documents, vocab %d, %d train / %d eval blocks of %d tokens",
        len(train_docs), len(eval_docs), tokenizer.get_vocab_size(), len(train_blocks), len(eval_blocks), args.context,
    )  # fmt: skip
    output_dir = Path(os.path.expanduser(args.output_dir))
    output_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(args, tokenizer.get_vocab_size()).to(device)
    stop: list[int] = []
    with signals_raise(handler=stop_handler(stop)):  # a first signal during training or the save: finish, save, then stop
        log, steps = train(model, train_blocks, eval_blocks, args, output_dir, stop)
        stopped = stop[0] if stop and steps < args.max_steps else None  # a signal in the last step: the run is complete
        model.save_pretrained(output_dir)
        give_safetensors_umask_modes(output_dir)
        wrap_tokenizer(tokenizer, args.context).save_pretrained(output_dir)
        card = model_card(argv, model, train_blocks.numel(), log, steps, steps * args.batch_size * args.context, args.max_steps,
                          stopped_by=signal_name(stopped) if stopped is not None else None)
        (output_dir / "MODEL_CARD.md").write_text(card)
    if stopped is not None:
        raise Interrupted(stopped, f"at step {steps} of {args.max_steps}; the model after step {steps}, its tokenizer, log and card are saved in {output_dir}")
    logger.info("saved to %s; final val loss %.4f", output_dir, log[-1]["val_loss"])
    return log


def signal_name(signum: int) -> str:
    import signal

    return signal.Signals(signum).name


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)

    def body(_, options, __) -> int:
        pretrain(SimpleNamespace(**options), argv)
        return 0

    return COMMAND.main(argv, body)


if __name__ == "__main__":
    exit_process(main)
