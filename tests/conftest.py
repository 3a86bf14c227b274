"""Shared fixtures. Everything runs offline on the bundled tiny-imdb-gpt2 (4 layers, 256 wide, vocab 8,192)."""

from __future__ import annotations

import atexit
import copy
import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from grade_trl.models import load_causal_lm, load_tokenizer
from grade_trl.rewards.sentiment import SentimentReward, SentimentRewardModel

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one of several pytest-xdist workers sharing the cores (the README's `-n 2`): one torch thread each, and in every
    # process a test starts, so that two workers on 2 cores do not run 4 threads. On the 2-core machine of 2026-12-06 the
    # suite took 14 min 5 s so against 24 min 56 s in one process with torch's 2 threads
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

if not os.environ.get("PYTEST_XDIST_WORKER"):
    # one disk cache of fitted gold judges for this session (grade_trl.rewards.judge.cache_folder), shared by the
    # pytest-xdist workers and every process a test starts (they inherit it): never the user's ~/.cache, and each
    # session fits again, as a fresh clone does. On 2026-12-07 the TF-IDF fit was about 5 s of each IMDB run's process.
    _JUDGE_CACHE = tempfile.mkdtemp(prefix="grade_trl_test_cache_")
    os.environ["GRADE_TRL_CACHE"] = _JUDGE_CACHE
    atexit.register(shutil.rmtree, _JUDGE_CACHE, ignore_errors=True)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_IMDB = SHARED / "data" / "imdb"


@contextmanager
def module_folder(tmp_path_factory, name: str):
    """A folder for a module-scoped fixture's runs, deleted once the module's tests are done: pytest deletes such folders
    only at the session's end, and the runs' checkpoints of every module together filled a CI machine's disk."""
    folder = tmp_path_factory.mktemp(name)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def launch_failure(name: str, result: subprocess.CompletedProcess) -> str:
    """What a failed multi-process launch said: the lines that name an error or a signal, then the end of stderr."""
    lines = [line for line in result.stderr.splitlines() if any(w in line for w in ("Error", "error:", "terminate", "Signal", "Traceback", "Abort"))]
    return f"{name}: exit {result.returncode}\n" + "\n".join(lines[:20]) + "\n...\n" + result.stderr[-2000:]


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("embedded")


@pytest.fixture(scope="session")
def _base_model():
    return load_causal_lm("embedded").eval()


@pytest.fixture
def policy(_base_model):
    torch.manual_seed(0)
    return copy.deepcopy(_base_model)


@pytest.fixture(scope="session")
def reward_model():
    """Untrained head on the frozen tiny backbone, seeded: enough to test plumbing and gradients."""
    torch.manual_seed(0)
    return SentimentRewardModel.from_backbone("embedded")


@pytest.fixture(scope="session")
def sentiment_reward(reward_model, tokenizer):
    return SentimentReward(reward_model, tokenizer)


@pytest.fixture
def prompts():
    return ["This movie was", "I watched it last night and honestly the acting", "Worst"]


# The longest test files first (their one-process seconds on 2 cores at 16878d8: 273, 179, 133, 97, 95, 78, 73, 73, 70,
# 63, 58): under `-n 2 --dist loadfile` each worker takes the next file when it is free, so a long file started last
# would run alone at the end while the other worker idles. The order within a file is kept (the sort is stable).
LONGEST_FILES_FIRST = ("test_sharded.py", "test_compare_analysis.py", "test_safety.py", "test_benchmark_smoke.py", "test_grade_cost.py",
                       "test_run_e2e.py", "test_trainer_api.py", "test_gsm8k.py", "test_reporting.py", "test_metrics.py", "test_resume.py")


STEP_PROMPTS = ["This movie was", "The acting in this film", "I expected", "Worst"]


def one_logged_step(config_class, trainer_class, output_dir, **settings):
    """One seeded optimizer step of a sampled method (REINFORCE, PPO) on the embedded model, a length reward, 4 prompts,
    2-6 new tokens at temperature 0.7 and top-p 0.9: (its first logged row, the trainer). `settings` adds or overrides
    config keys; two calls that differ in a setting meant to change nothing must log the same numbers."""
    from datasets import Dataset

    from grade_trl.rewards.length import LengthReward

    torch.manual_seed(0)
    args = config_class(**{
        "output_dir": str(output_dir), "max_steps": 1, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "max_new_tokens": 6,
        "min_new_tokens": 2, "temperature": 0.7, "top_p": 0.9, "learning_rate": 1e-3, "logging_steps": 1, "use_cpu": True, "disable_tqdm": True,
        "seed": 0, "report_to": [], **settings,
    })
    trainer = trainer_class(model="embedded", reward_funcs=[LengthReward(eos_token_id=0)], args=args, train_dataset=Dataset.from_dict({"prompt": STEP_PROMPTS * 2}))
    trainer.train()
    return next(h for h in trainer.state.log_history if "loss" in h), trainer


def pytest_configure(config):
    # pytest-xdist (3.8 here) hands out the files of `--dist loadfile` by their number of tests, most first, unless
    # told not to: that put the files with few long tests (test_grade_cost.py's 3-minute run among them) at the end,
    # where one worker ran them alone (2026-12-07: 2,060 s of CPU in 1,123 s on 2 cores). The order below is kept.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def write_intact(path) -> None:
    """A small file of the kind its name says, readable as such (what `resume.damage` checks): JSON, safetensors, torch."""
    if path.suffix == ".json":
        path.write_text("{}")
    elif path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({"weight": torch.zeros(2)}, str(path))
    else:
        torch.save({}, path)
