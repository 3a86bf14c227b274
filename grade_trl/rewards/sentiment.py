"""A learned sentiment reward: frozen causal-LM backbone + 2-layer MLP head, value P(positive).

The backbone shares the policy's vocabulary, so GRADE's relaxed tokens can be embedded
(`SoftTokens.embed(E)`) and the reward differentiated end to end. The head is trained on
mean-pooled hidden states of the reward-model split and saved as safetensors.

Legend: B batch, T tokens, V vocabulary, H hidden.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from ..core.precision import at_least_float32
from ..core.sharding import input_embedding_matrix
from ..core.soft_rollout import position_ids_from_mask
from ..core.soft_tokens import SoftTokens, as_soft_tokens
from ..models import give_safetensors_umask_modes, load_pretrained, resolve_model_path
from .base import completion_text, prompt_text

logger = logging.getLogger(__name__)

HEAD_FILE, META_FILE = "head.safetensors", "reward_model.json"


class SentimentRewardModel(nn.Module):
    """Frozen backbone -> masked mean pool over real tokens -> Linear(H, H) -> ReLU -> Linear(H, 2)."""

    def __init__(self, backbone: nn.Module, backbone_name: str):
        super().__init__()
        self.backbone = backbone.requires_grad_(False).eval()
        self.backbone_name = backbone_name
        hidden = backbone.config.hidden_size
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2))

    @classmethod
    def from_backbone(cls, name_or_path: str, dtype=torch.float32) -> "SentimentRewardModel":
        backbone = load_pretrained(AutoModel, resolve_model_path(name_or_path), dtype=dtype)  # whole: replicated under ZeRO-3 too
        return cls(backbone, name_or_path)

    def train(self, mode: bool = True):  # the backbone stays in eval mode (no dropout) whatever the head does
        super().train(mode)
        self.backbone.eval()
        return self

    @property
    def embedding_matrix(self) -> torch.Tensor:  # (V, H)
        # The reward model is replicated on every process (never prepared for sharding: it has no optimizer), so
        # this is the parameter itself; `input_embedding_matrix` gathers it should a caller shard the backbone.
        return input_embedding_matrix(self.backbone)

    def pooled(self, attention_mask: torch.Tensor, input_ids=None, inputs_embeds=None) -> torch.Tensor:
        """Mean of the last hidden states over positions where attention_mask is 1. Returns (B, H)."""
        mask = attention_mask.long()
        hidden = self.backbone(
            input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids_from_mask(mask)
        ).last_hidden_state  # (B, T, H)
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    def p_positive(self, pooled: torch.Tensor) -> torch.Tensor:
        logits = self.head(pooled.to(next(self.head.parameters()).dtype))  # (B, 2); a float64 model keeps float64
        return F.softmax(at_least_float32(logits), dim=-1)[:, 1]  # (B,)

    def score_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.p_positive(self.pooled(attention_mask, input_ids=input_ids))

    def score_soft(self, soft_tokens: SoftTokens, attention_mask: torch.Tensor) -> torch.Tensor:
        """P(positive) of relaxed tokens, embedded with the backbone's E (`SoftTokens.embed`: y @ E, or E[token] for
        straight-through steps), differentiable in the relaxed values. On one-hot tokens it equals `score_ids`."""
        return self.p_positive(self.pooled(attention_mask, inputs_embeds=as_soft_tokens(soft_tokens).embed(self.embedding_matrix)))

    def save(self, path: str | os.PathLike, metadata: dict) -> None:
        from ..results import write_json_atomic

        # Metadata first, the head last and atomically: runs started side by side (compare --jobs) that
        # find the head file can load a complete one.
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path / META_FILE, {"backbone": self.backbone_name, **metadata})
        partial = path / f".{HEAD_FILE}.{os.getpid()}.tmp"
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, str(partial))
        os.replace(partial, path / HEAD_FILE)
        give_safetensors_umask_modes(path)

    def load_head(self, path: str | os.PathLike) -> None:
        """The head saved at `path` (and its metadata) into this model, whose backbone must have the head's width."""
        self.head.load_state_dict(load_file(str(Path(path) / HEAD_FILE)))
        self.metadata = read_head_metadata(path)

    @classmethod
    def load(cls, path: str | os.PathLike, backbone_name: str | None = None) -> "SentimentRewardModel":
        model = cls.from_backbone(backbone_name or read_head_metadata(path)["backbone"])
        model.load_head(path)
        return model


def read_head_metadata(path: str | os.PathLike) -> dict:
    """A saved head's `reward_model.json` (its backbone, accuracy, data), without loading the backbone."""
    return json.loads((Path(path) / META_FILE).read_text())


def has_trained_head(path: str | os.PathLike | None) -> bool:
    return path is not None and (Path(path) / HEAD_FILE).is_file() and (Path(path) / META_FILE).is_file()


class SentimentReward:
    """TRL-compatible reward: P(positive) of each completion (or prompt + completion).

    `include_prompt` decides what is scored; it must be the same for every method in a comparison,
    which is why it lives on the reward object rather than in any trainer.

    Given `completion_ids` (every trainer here passes them, as TRL's do), it scores those tokens, up to the first
    EOS, instead of re-tokenizing the decoded text: decoding and re-encoding can give another token sequence than
    the one the policy sampled (and GRADE differentiated), with another score. That needs the policy's and the
    reward's vocabularies to be the same (`tokenizer` is the policy's; GRADE needs it anyway); ids outside the
    reward's vocabulary fall back to the text.
    """

    differentiable = True

    def __init__(self, model: SentimentRewardModel, tokenizer, include_prompt: bool = False, max_length: int = 128, batch_size: int = 32):
        # A reward is a frozen judge: GRADE's gradient flows through it into the soft tokens, never into it.
        self.model, self.tokenizer = model.requires_grad_(False).eval(), tokenizer
        self.include_prompt, self.max_length, self.batch_size = include_prompt, max_length, batch_size
        self.__name__ = "sentiment"

    def to(self, device) -> "SentimentReward":
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.model.embedding_matrix.device

    @torch.no_grad()
    def __call__(self, prompts, completions, completion_ids=None, **kwargs) -> list[float]:
        rows = self._token_rows(prompts, completion_ids) if completion_ids is not None else None
        if rows is not None:
            return self._score_rows(rows)
        completions = [completion_text(c) for c in completions]
        texts = [prompt_text(p, self.tokenizer) + c for p, c in zip(prompts, completions)] if self.include_prompt else completions
        return self._score_rows(self.tokenizer(texts, truncation=True, max_length=self.max_length, add_special_tokens=False)["input_ids"])

    def _token_rows(self, prompts, completion_ids) -> list[list[int]] | None:
        """The token ids to score: (prompt ids +) completion ids before the first EOS, at most `max_length`."""
        eos, vocab = self.tokenizer.eos_token_id, self.model.embedding_matrix.shape[0]
        rows = []
        for prompt, ids in zip(prompts, completion_ids):
            ids = [int(i) for i in ids]
            if eos is not None and eos in ids:
                ids = ids[: ids.index(eos)]
            if self.include_prompt:
                ids = self.tokenizer(prompt_text(prompt, self.tokenizer), add_special_tokens=False)["input_ids"] + ids
            if any(i < 0 or i >= vocab for i in ids):
                return None
            rows.append(ids[: self.max_length])
        return rows

    def _score_rows(self, rows: list[list[int]]) -> list[float]:
        scores = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            width = max(1, max(len(r) for r in chunk))
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for i, row in enumerate(chunk):  # right padding: the score pools over the mask, positions follow it
                ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row, dtype=torch.long), 1
            scores.extend(self.model.score_ids(ids.to(self.device), mask.to(self.device)).tolist())
        return scores

    def score_soft(self, soft_tokens: SoftTokens, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.score_soft(soft_tokens, attention_mask)


@torch.no_grad()
def pooled_features(model: SentimentRewardModel, tokenizer, texts: list[str], max_length: int, batch_size: int = 64) -> torch.Tensor:
    feats = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length, add_special_tokens=False)
        feats.append(model.pooled(enc["attention_mask"].to(model.embedding_matrix.device), input_ids=enc["input_ids"].to(model.embedding_matrix.device)).float().cpu())
    return torch.cat(feats)


def train_sentiment_head(
    model: SentimentRewardModel,
    tokenizer,
    train_texts: list[str],
    train_labels: list[int],
    eval_texts: list[str],
    eval_labels: list[int],
    max_length: int = 128,
    epochs: int = 10,
    learning_rate: float = 1e-3,
    batch_size: int = 64,
    seed: int = 42,
) -> dict:
    """Train the head on frozen, mean-pooled backbone features; return train/held-out accuracy.

    The backbone is frozen, so its features are computed once; training the head on them is the
    same optimisation as training through the backbone, at a fraction of the cost.
    """
    logger.info("sentiment reward head: backbone features of %d + %d held-out reviews (up to %d tokens), then %d epochs ...",
                len(train_texts), len(eval_texts), max_length, epochs)
    generator = torch.Generator().manual_seed(seed)
    x_train, x_eval = pooled_features(model, tokenizer, train_texts, max_length), pooled_features(model, tokenizer, eval_texts, max_length)
    y_train, y_eval = torch.tensor(train_labels), torch.tensor(eval_labels)
    head = model.head.float().cpu().requires_grad_(True)
    torch.manual_seed(seed)
    for layer in head:
        if isinstance(layer, nn.Linear):
            layer.reset_parameters()
    optimizer = torch.optim.AdamW(head.parameters(), lr=learning_rate, weight_decay=0.01)
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(head(x_train[idx]), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        train_acc = (head(x_train).argmax(-1) == y_train).float().mean().item()
        eval_acc = (head(x_eval).argmax(-1) == y_eval).float().mean().item()
    model.head.requires_grad_(False).to(model.embedding_matrix.device)
    logger.info("sentiment head: train accuracy %.3f, held-out accuracy %.3f", train_acc, eval_acc)
    return {"train_accuracy": train_acc, "heldout_accuracy": eval_acc, "train_size": len(train_texts), "heldout_size": len(eval_texts), "max_length": max_length}
