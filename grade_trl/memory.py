"""Where a training step's memory goes: deterministic measurements that hold on any device.

`SavedTensorAccount` counts the bytes autograd keeps for backward (through
`torch.autograd.graph.saved_tensors_hooks`), by model and component (attention with its KV cache, MLP,
norms, embeddings, LM head, and labelled phases outside the models such as the relaxation or the KL).
A storage is counted once, however many tensors or views of it are saved; parameters are not counted
(they are resident anyway). The number is the same on every machine for the same shapes and dtypes.

`peak_allocated` measures the peak of bytes allocated during a block, from the PyTorch profiler's memory
events (allocations and frees of the CPU or CUDA allocator, in time order), relative to its start: the
CPU counterpart of `torch.cuda.max_memory_allocated` (no allocator caching, no RSS noise).

`MemoryModel` predicts a step's peak on another shape from these measurements (see its docstring).
"""

from __future__ import annotations

import re
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

import torch

COMPONENT_PATTERNS = (  # (component, pattern on one module-path element); the outermost match in a path wins
    ("attention", re.compile(r"(^|_)(attn|attention|self_attn)$")),
    ("mlp", re.compile(r"(^|_)(mlp|feed_forward|ffn)$")),
    ("lm_head", re.compile(r"^lm_head$")),
    ("embedding", re.compile(r"^(wte|wpe|embed_tokens|embed_positions|embeddings)$")),
    ("norm", re.compile(r"(norm|^ln_\w+|^ln_f)$")),
    ("head", re.compile(r"^(head|score|value_head|v_head)$")),
)


def component_of(module_path: str) -> str | None:
    """`transformer.h.3.attn.c_attn` -> attention; `lm_head` -> lm_head; a path with no known part -> None."""
    for part in module_path.split("."):
        for component, pattern in COMPONENT_PATTERNS:
            if pattern.search(part):
                return component
    return None


class SavedTensorAccount:
    """Bytes saved for backward inside a `with` block, by label: `model/component` inside a registered model's
    modules, else the innermost `phase(...)` label, else "other".

        account = SavedTensorAccount({"policy": policy, "reference": ref})
        with account:
            with account.phase("kl"):
                ...
            loss.backward()   # after the block, or inside it: saving happens in the forward
        account.bytes   # {"policy/attention": ..., "kl": ...}
    """

    def __init__(self, models: dict[str, torch.nn.Module] | None = None):
        self.models = dict(models or {})
        self.bytes: dict[str, int] = defaultdict(int)
        self.tensors: dict[str, int] = defaultdict(int)
        self._seen: set[tuple] = set()
        self._module_stack: list[str] = []
        self._phase_stack: list[str] = []
        self._handles = []
        self._hooks = None
        self._parameter_storages: set[int] = set()

    # -- labels
    @contextmanager
    def phase(self, label: str):
        self._phase_stack.append(label)
        try:
            yield
        finally:
            self._phase_stack.pop()

    def label(self) -> str:
        if self._module_stack:
            return self._module_stack[-1]
        return self._phase_stack[-1] if self._phase_stack else "other"

    def _push(self, name: str):
        def hook(module, args, kwargs=None):
            self._module_stack.append(name)

        return hook

    def _pop(self, module, args, output):
        if self._module_stack:
            self._module_stack.pop()

    # -- saved tensors
    def _pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        if isinstance(tensor, torch.nn.Parameter) or (tensor.is_leaf and tensor.requires_grad) or storage.data_ptr() in self._parameter_storages:
            return tensor  # weights (or views of them, e.g. a tied LM head's transpose) are resident whatever the step does
        key = (storage.data_ptr(), tensor.device.type)
        if storage.nbytes() and key not in self._seen:
            self._seen.add(key)
            label = self.label()
            self.bytes[label] += storage.nbytes()
            self.tensors[label] += 1
        return tensor

    def __enter__(self):
        self._parameter_storages = {p.untyped_storage().data_ptr() for model in self.models.values() for p in model.parameters()}
        for model_name, model in self.models.items():
            for module_name, module in model.named_modules():
                component = component_of(module_name)
                if component is None:
                    continue
                name = f"{model_name}/{component}"
                self._handles.append(module.register_forward_pre_hook(self._push(name)))
                self._handles.append(module.register_forward_hook(self._pop))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return False

    @property
    def total(self) -> int:
        return sum(self.bytes.values())

    def by_model(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for label, nbytes in self.bytes.items():
            out[label.split("/")[0]] += nbytes
        return dict(out)


@contextmanager
def peak_allocated(device: torch.device | str = "cpu"):
    """Yields a dict that, after the block, holds `peak_bytes` (the highest allocated bytes above the block's start)
    and `net_bytes` (allocated at the end minus at the start), from the profiler's allocator events of `device`."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    result: dict[str, int] = {}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, profile_memory=True) as prof:
        yield result
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and _on(e, device)]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    result.update(peak_bytes=peak, net_bytes=live)


def _on(event, device: torch.device) -> bool:
    kind = str(event.device_type()).rsplit(".", 1)[-1].lower()
    return kind == device.type


@dataclass
class StepShape:
    """What a step's memory depends on: the model's shape, the batch and the lengths."""

    layers: int
    hidden: int
    vocab: int
    batch: int  # completions
    prompt_tokens: int
    new_tokens: int
