"""benchmarks/step_cost.py runs end to end on a tiny setting and prints the five-row table (no timing is checked)."""

import importlib.util
import math
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_cost.py"
ROWS = ("GRADE (soft)", "GRADE-STE", "REINFORCE", "PPO", "TRL GRPO")


def load_script():
    spec = importlib.util.spec_from_file_location("step_cost", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_cost_prints_five_rows_with_ratios_to_reinforce(capsys, tmp_path):
    step_cost = load_script()
    argv = ["--model", "embedded", "--device", "cpu", "--threads", "1", "--batch_size", "4", "--max_new_tokens", "4",
            "--prompt_length", "8", "--warmup", "0", "--repeats", "1", "--json", str(tmp_path / "cost.json")]
    step_cost.main(argv)
    out = capsys.readouterr().out

    header = "| method | step time (s) | peak memory (MiB) | time vs REINFORCE | memory vs REINFORCE |"
    assert header in out
    lines = out.splitlines()
    start = lines.index(header) + 2  # skip the alignment row
    rows = {}
    for line in lines[start : start + len(ROWS)]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = [float(c) for c in cells[1:]]
    assert tuple(rows) == ROWS
    for name, numbers in rows.items():
        assert len(numbers) == 4 and all(math.isfinite(x) and x > 0 for x in numbers), (name, numbers)
    assert rows["REINFORCE"][2:] == [1.0, 1.0]
    assert (tmp_path / "cost.json").is_file()
    # every method generated exactly the requested length
    assert "GRADE (soft) 4.0, GRADE-STE 4.0, REINFORCE 4.0, PPO 4.0, TRL GRPO 4.0" in out
