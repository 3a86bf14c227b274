"""benchmarks/step_cost.py runs every registry method end to end on a tiny setting and prints its table (no timing is checked)."""

import importlib.util
import math
from pathlib import Path

from grade_trl.methods import METHODS

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_cost.py"
ROWS = tuple(METHODS)


def load_script():
    spec = importlib.util.spec_from_file_location("step_cost", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_cost_prints_a_row_per_registry_method_with_ratios_to_reinforce(capsys, tmp_path):
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
    assert rows["reinforce"][2:] == [1.0, 1.0]
    assert (tmp_path / "cost.json").is_file()
    # every method generated exactly the requested length
    assert ", ".join(f"{name} 4.0" for name in ROWS) in out
