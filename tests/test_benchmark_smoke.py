"""benchmarks/step_cost.py runs every registry method end to end on a tiny setting and prints its table (no timing is checked)."""

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import torch

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
    argv = ["--model", "embedded", "--device", "cpu", "--threads", "1", "--batch_size", "4", "--new_tokens", "4",
            "--prompt_length", "8", "--warmup", "0", "--repeats", "1", "--json", str(tmp_path / "cost.json"), "--phases"]
    payload = step_cost.main(argv)
    out = capsys.readouterr().out

    header = "| method | step time (s) | peak memory (MiB) | saved for backward (MiB) | time vs REINFORCE | memory vs REINFORCE | saved vs REINFORCE |"
    assert header in out
    lines = out.splitlines()
    start = lines.index(header) + 2  # skip the alignment row
    rows = {}
    for line in lines[start : start + len(ROWS)]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = [float(c) for c in cells[1:]]
    assert tuple(rows) == ROWS
    for name, numbers in rows.items():
        assert len(numbers) == 6 and all(math.isfinite(x) and x > 0 for x in numbers), (name, numbers)
    assert rows["reinforce"][3:] == [1.0, 1.0, 1.0]
    assert (tmp_path / "cost.json").is_file()
    # every method generated exactly the requested length
    assert ", ".join(f"{name} T=4 4.0" for name in ROWS) in out
    # the minor page faults of each timed step, counted and printed
    assert all(len(r["step_minor_faults"]) == 1 and r["minor_faults"] == r["step_minor_faults"][0] >= 0 for r in payload["results"])
    assert "minor page faults per step (median" in out and f"grade_ste T=4 {next(r for r in payload['results'] if r['method'] == 'grade_ste')['minor_faults']:,.0f}" in out
    # --phases: one more step by phase, each method through its own call sites, and the call sites restored after
    for r in payload["results"]:
        phases = r["phases"]
        own = "soft rollout" if r["method"].startswith("grade") else "sample" if r["method"] in ("reinforce", "ppo") else "generate (TRL)"
        assert 0 < phases[own] < phases["forward"] and phases["backward"] > 0, (r["method"], phases)
        assert phases["forward"] + phases["backward"] + phases["clip and optimizer"] <= phases["total"] * 1.001, (r["method"], phases)
    import grade_trl.core.sampling
    import grade_trl.trainers.reinforce

    assert grade_trl.trainers.reinforce.sample is grade_trl.core.sampling.sample


def test_step_cost_sweeps_new_tokens_with_grade_switches_and_fits_the_growth_law(capsys, tmp_path):
    step_cost = load_script()
    argv = ["--model", "embedded", "--device", "cpu", "--threads", "1", "--batch_size", "4", "--new_tokens", "2", "4", "6", "--prompt_length", "8",
            "--warmup", "0", "--repeats", "1", "--methods", "grade_ste", "reinforce", "--rollout_checkpointing", "--relax_top_k", "16", "--bf16",
            "--account", "--plot", str(tmp_path / "curves.png"), "--json", str(tmp_path / "cost.json")]
    payload = step_cost.main(argv)
    out = capsys.readouterr().out
    assert "GRADE: rollout_cache chunked, recompute_reference_and_reward True, rollout_checkpointing, relax_top_k 16" in out and "bf16 autocast" in out
    assert "| grade_ste | " in out.split("curves (saved for backward")[1]  # one curve row per method with its fit
    assert set(payload["growth_laws"]) == {"grade_ste", "reinforce"} and all(law is not None for law in payload["growth_laws"].values())
    saved = {r["new_tokens"]: r["saved_mib"] for r in payload["results"] if r["method"] == "grade_ste"}
    assert saved[2] < saved[4] < saved[6]
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_gpu_check_smoke_runs_every_stage_and_writes_one_table(tmp_path, capsys):
    """benchmarks/gpu_check.py (the one command for a GPU machine) on CPU with tiny shapes and `--lanes 2`: the step
    cost and fit first, in this process; then each recipe run as its own gpu_check process (which runs it in-process,
    the path of `--lanes 1`), two at a time, each in OUTPUT_DIR/lanes/NAME, completing through the real runner; the
    sharded stages give their CPU skip rows in this process; one table and JSON, the lanes' rows in the order of the jobs.
    One IMDB recipe (GRADE-STE, the costliest) and one GSM8K recipe: the two lanes; imdb_ppo was a third job until
    2026-12-07 (the suite had grown past 15 minutes), the same path with another recipe."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT.parent / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    # two of the step-cost methods (every method's step cost runs in the test above, through the same script)
    payload = gpu_check.main(["--smoke", "--device", "cpu", "--tokenizer", "embedded", "--threads", "1", "--output_dir", str(tmp_path), "--lanes", "2",
                              "--recipes", "imdb_grade_ste", "--gsm8k_recipes", "gsm8k_grpo", "--sharded_recipes", "tiny/imdb_ppo",
                              "--cost_methods", "grade_ste", "reinforce"])
    rows = {(r["stage"], r["what"].split()[0]): r for r in payload["rows"]}
    assert sum(r["stage"] == "step_cost" for r in payload["rows"]) == 2 * 2  # float32 and bf16
    assert all(r["status"] == "ok" and r["seconds_per_step"] > 0 for r in payload["rows"] if r["stage"] in ("step_cost", "fit"))
    assert all("phases of a" in r["note"] for r in payload["rows"] if r["stage"] == "step_cost")  # where each step went
    assert [r["stage"] for r in payload["rows"]][-4:] == ["fsdp", "zero", "recipes", "gsm8k"]  # CPU: skip rows in-process, then the jobs in order
    for key, job in ((("recipes", "imdb_grade_ste"), "recipes_imdb_grade_ste"), (("gsm8k", "gsm8k_grpo"), "gsm8k_gsm8k_grpo")):
        assert rows[key]["status"] == "completed" and rows[key]["exit_code"] == 0 and rows[key]["steps"] == 1, rows[key]
        assert (tmp_path / "lanes" / job / f"{key[1]}_results.json").is_file()
    assert rows[("fsdp", "(all)")]["status"] == "skipped"  # FSDP and DeepSpeed need GPUs
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| recipes | imdb_grade_ste | completed |" in table and (tmp_path / "gpu_check.json").is_file()


def test_gpu_check_runs_at_most_lanes_jobs_at_once_and_keeps_the_jobs_order(tmp_path, monkeypatch):
    """`run_lanes` with 3 jobs on 2 lanes (each job a 1 s stand-in process for a gpu_check child): never more than
    2 run at once, the third starts when one ends, and the rows join the report in the order of the jobs whichever
    ends first. (The smoke test above runs 2 real jobs, which never queue.)"""
    import subprocess
    import sys
    import time
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT.parent / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    events, real_popen = tmp_path / "events.txt", subprocess.Popen
    durations = {"first": 3.0, "second": 1.0, "third": 0.5}  # the second ends first: its row still comes second
    monkeypatch.setattr(gpu_check, "lane_jobs", lambda args, stages: [(name, ["--stages", "recipes", "--recipes", name]) for name in durations])

    def stand_in(command, **kwargs):
        folder = Path(command[command.index("--output_dir") + 1])
        rows = [{"stage": "recipes", "what": folder.name, "status": "completed"}]
        script = (f"import json, time; log = open({str(events)!r}, 'a'); log.write('start {folder.name}\\n'); log.flush(); "
                  f"time.sleep({durations[folder.name]}); open({str(folder / 'gpu_check.json')!r}, 'w').write({json.dumps(json.dumps({'rows': rows}))}); "
                  f"log.write('end {folder.name}\\n')")
        return real_popen([sys.executable, "-c", script], **kwargs)

    monkeypatch.setattr(gpu_check.subprocess, "Popen", stand_in)
    args = SimpleNamespace(tokenizer="unused", device="cpu", max_steps=1, smoke=True, threads=None, lanes=2, budget_s=None)
    report = SimpleNamespace(rows=[], start=time.time(), write=lambda: None)
    gpu_check.run_lanes(args, ["recipes"], tmp_path, report)
    running, most = 0, 0
    for line in events.read_text().splitlines():
        running += 1 if line.startswith("start") else -1
        most = max(most, running)
    lines = events.read_text().splitlines()  # the first two start together, in either order (a loaded machine swapped them once)
    assert most == 2 and set(lines[:2]) == {"start first", "start second"}, lines
    assert lines.index("start third") > min(i for i, line in enumerate(lines) if line.startswith("end")), lines  # when a lane is free
    assert [row["what"] for row in report.rows] == ["first", "second", "third"]


def test_sharding_table_agrees_with_the_memory_model_and_orders_the_configs():
    """benchmarks/sharding_table.py (the README's config-by-size table): on one GPU its peak is memory_model.py's own
    prediction for gpt2-medium at batch 16 (computed there by a separate function), and per GPU a sharded config never
    needs more than ZeRO-2, nor ZeRO-2 more than one GPU; FSDP2 needs less than ZeRO-3 where it shards the reference
    (REINFORCE, PPO, and GRADE since it recomputes its reference a block at a time there), the same for TRL's GRPO
    (counted whole)."""
    spec = importlib.util.spec_from_file_location("sharding_table", SCRIPT.parent / "sharding_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    model = json.loads((SCRIPT.parent.parent / "docs" / "results" / "memory_model.json").read_text())
    layers, hidden = table.SHAPES["gpt2-medium"]
    one_gpu = table.per_gpu_gib(model, "grade_ste", "one GPU", layers, hidden, 16, 48, 8)
    assert one_gpu == pytest.approx(model["methods"]["grade_ste/float32"]["prediction"]["by_batch"]["16"]["peak_gib"], rel=1e-6)
    for name, (layers, hidden) in table.SHAPES.items():
        for method in table.METHODS:
            values = [table.per_gpu_gib(model, method, config, layers, hidden, 16, 48, 8) for config in table.CONFIGS]
            assert values[0] > values[1] > values[2] and values[1] > values[3], (name, method, values)
            assert (values[2] < values[3]) if method in ("grade_ste", "reinforce", "ppo") else (values[2] == values[3]), (name, method, values)
    assert "| gpt2-xl | 1558M | grade_ste |" in table.main(["--batch_size", "64"])
    # the GSM8K table: on one GPU the Qwen2 model's own prediction (memory_model_qwen2.predict) with chunked_scoring (every
    # column's scoring); ZeRO-2 needs less, ZeRO-3 less again, FSDP2 least (its reference sharded too)
    qwen2 = load_benchmark("memory_model_qwen2")
    fitted = json.loads((SCRIPT.parent.parent / "docs" / "results" / "memory_model_qwen2.json").read_text())
    for name, shape in qwen2.QWEN25.items():
        shape = {**shape, "vocab": qwen2.QWEN25_VOCAB}
        for method in table.QWEN2_METHODS:
            entries = [table.qwen2_entry(fitted, method, config) for config in table.CONFIGS]
            assert [entry["scoring"] for entry in entries] == ["chunked"] * 4
            values = [table.qwen2_per_gpu_gib(qwen2, method, entry, shape, config, 16, 256, 512, 8) for entry, config in zip(entries, table.CONFIGS)]
            assert values[0] == pytest.approx(qwen2.predict(entries[0], shape, 16, 256, 512)["peak_gib"], rel=1e-9)
            assert values[0] > values[1] > values[3] > values[2], (name, method, values)


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPT.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_qwen2_memory_model_fits_measured_steps_of_a_padded_vocabulary_and_predicts_qwen25(tmp_path, capsys):
    """benchmarks/memory_model_qwen2.py on a tiny grid: real REINFORCE steps of random Qwen2 models whose embeddings are
    padded past the tokenizer (as Qwen2.5's 151,936 rows over 151,665 tokens), fitted, checked on a larger shape and
    written with the Qwen2.5 predictions; `--from_json` gives the same predictions back without measuring."""
    qwen2 = load_benchmark("memory_model_qwen2")
    out_path = tmp_path / "qwen2.json"
    grid = {"layers": [1], "hidden": [64], "mlp_ratio": [2, 4], "batch": [2], "prompt": [8], "new_tokens": [4, 8], "vocab": [8192, 12288]}
    check = {"layers": 2, "hidden": 128, "heads": 2, "kv_heads": 1, "intermediate": 384, "vocab": 16384, "batch": 2, "prompt": 12, "new_tokens": 6}
    probe = {"hidden": 32, "intermediate": 64, "vocab": 16384, "batch": 4, "prompt": 4, "new_tokens": 16}  # a chunk moment of 16 x 2 positions
    out = qwen2.main(["--methods", "reinforce", "--dtypes", "float32", "--grid_points", "4", "--grid", json.dumps(grid), "--check", json.dumps(check),
                      "--probe", json.dumps(probe), "--threads", "1", "--json", str(out_path)])
    entry = out["methods"]["reinforce/float32"]
    assert entry["scoring"] == "chunked" and all(p["chunk_elements"] == p["batch"] * p["vocab"] * (p["new_tokens"] // 2) for p in entry["grid_points"])
    # a chunk's recompute and gradient hold a few float32 copies of its logits (20 bytes a logit on the 2-core VM)
    assert 4 <= entry["chunk_bytes_per_logit"] <= 64
    assert len(entry["grid_points"]) == 4 and {p["vocab"] for p in entry["grid_points"]} <= {8192, 12288}
    assert all(p["peak_mib"] > 0 and p["saved_mib"] > 0 for p in entry["grid_points"])
    v = entry["validation"]
    assert v["measured_step_peak_mib"] > 0 and math.isfinite(v["relative_error"])
    seven = out["predictions"]["by_method"]["reinforce/float32"]["Qwen2.5-7B"]
    assert seven["parameters"] == qwen2.parameters(vocab=qwen2.QWEN25_VOCAB, **qwen2.QWEN25["Qwen2.5-7B"]) and seven["resident_gib"] == pytest.approx(16 * seven["parameters"] / 2**30)
    assert "| reinforce | float32 | chunked |" in capsys.readouterr().out
    again = qwen2.main(["--from_json", str(out_path)])
    assert again["predictions"] == json.loads(out_path.read_text())["predictions"]


def test_qwen2_parameter_count_is_transformers_own():
    """memory_model_qwen2.parameters against Qwen2ForCausalLM's parameters (meta device), tied as Qwen2.5 up to 3B and untied as 7B."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    qwen2 = load_benchmark("memory_model_qwen2")
    for name in ("Qwen2.5-0.5B", "Qwen2.5-7B"):
        shape = qwen2.QWEN25[name]
        config = Qwen2Config(vocab_size=qwen2.QWEN25_VOCAB, hidden_size=shape["hidden"], intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
                             num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"], tie_word_embeddings=shape["tied"])
        with torch.device("meta"):
            model = Qwen2ForCausalLM(config)
        counted = sum(p.numel() for p in model.parameters())  # tied weights are one Parameter: counted once
        assert qwen2.parameters(vocab=qwen2.QWEN25_VOCAB, **shape) == counted, name
    assert qwen2.parameters(vocab=qwen2.QWEN25_VOCAB, **qwen2.QWEN25["Qwen2.5-0.5B"]) == 494_032_768  # the model card's 0.49B


def test_step_cost_refuses_a_rule_reward_for_grade_and_qwen2_flags_on_gpt2(capsys):
    step_cost = load_script()
    for argv, expected in ((["--reward", "rule", "--methods", "grade_ste", "reinforce"], "GRADE's methods need a differentiable reward"),
                           (["--model", "gpt2-shaped-random", "--n_kv_head", "2"], "shape --model qwen2-shaped-random only")):
        with pytest.raises(SystemExit) as exit_info:
            step_cost.parse_args(argv)
        assert exit_info.value.code == 2 and expected in capsys.readouterr().err


def test_memory_model_predicts_from_the_committed_fit_and_marks_the_floor(capsys):
    """`--from_json`: the committed fit's predictions again without measuring (the README's table), another shape given as
    LAYERS,HIDDEN, and a `*` where the end-of-backward floor, not the fit, sets the step peak (a journey audit: the
    switches row's -1% check was the floor formula's). A switches fit without bf16 is refused: it wrote an empty model."""
    spec = importlib.util.spec_from_file_location("memory_model", SCRIPT.parent / "memory_model.py")
    model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model)
    committed = json.loads((SCRIPT.parent.parent / "docs" / "results" / "memory_model.json").read_text())
    out = model.main(["--from_json", str(SCRIPT.parent.parent / "docs" / "results" / "memory_model.json")])
    for key, entry in committed["methods"].items():
        for batch in ("16", "64"):
            assert out["methods"][key]["prediction"]["by_batch"][int(batch)]["peak_gib"] == pytest.approx(entry["prediction"]["by_batch"][batch]["peak_gib"], rel=1e-9)
    table = capsys.readouterr().out
    assert "| grade_ste+switches | bf16 | 8.2 (1.6*) | 12.8 (6.2) | 625 / 622* (-1%) |" in table and "| grade_ste | float32 | 9.9 (3.3) |" in table
    larger = model.main(["--from_json", str(SCRIPT.parent.parent / "docs" / "results" / "memory_model.json"), "--predict", "36,1280", "--predict_batches", "8"])
    assert larger["methods"]["grade_ste/float32"]["prediction"]["by_batch"][8]["resident_gib"] > out["methods"]["grade_ste/float32"]["prediction"]["by_batch"][16]["resident_gib"]
    with pytest.raises(SystemExit) as exit_info:
        model.main(["--methods", "grade_ste+switches", "--dtypes", "float32"])
    assert exit_info.value.code == 2 and "add bf16 to --dtypes" in capsys.readouterr().err


def test_one_kernel_gelu_benchmark_counts_fewer_calls_for_the_fused_sampler(monkeypatch, capsys):
    """benchmarks/one_kernel_gelu.py: our sampler with GPT-2's activation as one kernel makes fewer aten calls than with
    the model's own gelu_new (tiny shape), and leaves the model's modules as they were."""
    spec = importlib.util.spec_from_file_location("one_kernel_gelu", SCRIPT.parent / "one_kernel_gelu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()  # the script sets the process's threads (and seed): later in-process runs must not inherit them
    monkeypatch.setattr("sys.argv", ["one_kernel_gelu.py", "--n_layer", "2", "--n_embd", "32", "--n_head", "2", "--new_tokens", "4", "--rounds", "2",
                                     "--threads", str(threads)])
    with torch.random.fork_rng():
        bench.main()
    assert torch.get_num_threads() == threads
    out = capsys.readouterr().out
    one, own = (int(count.replace(",", "")) for count in re.findall(r"([\d,]+) aten calls", out))
    assert one < own, out


def test_decode_graph_probe_runs_eagerly_on_cpu_and_its_backward_is_autograds():
    """benchmarks/gpu_lease/decode_graph_probe.py (for a GPU lease: eager against captured decode steps): on CPU it runs
    the eager loop, and its written-out backward gives autograd's input gradients through the same forward."""
    spec = importlib.util.spec_from_file_location("decode_graph_probe", SCRIPT.parent / "gpu_lease" / "decode_graph_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    result = probe.main(["--device", "cpu", "--n_layer", "2", "--n_embd", "32", "--n_head", "4", "--batch_sizes", "3", "1",
                         "--prompt_length", "4", "--new_tokens", "5", "--rounds", "1", "--check"])
    assert result["check_error"] < 1e-5
    assert [row["batch"] for row in result["rows"]] == [3, 1]
    assert all(row["eager_forward"] > 0 and row["eager_backward"] > 0 and "captured_forward" not in row for row in result["rows"])


def test_chunked_scoring_benchmark_measures_both_scorings_side_by_side(capsys):
    """benchmarks/chunked_scoring.py on a tiny random Qwen2 in chunks of two positions: the whole logits' and the chunked
    scoring's time, peak and saved bytes, interleaved; the chunked one saves no B x T x V tensor for backward."""
    from grade_trl.core import head_scoring

    default = head_scoring.CHUNK_ELEMENTS
    try:
        out = load_benchmark("chunked_scoring").main(["--layers", "1", "--hidden", "32", "--heads", "1", "--kv_heads", "1", "--intermediate", "64",
                                                      "--vocab", "16384", "--batch", "4", "--prompt", "4", "--new_tokens", "32",
                                                      "--chunk_elements", str(4 * 16384 * 2), "--repeats", "2", "--threads", "1"])
    finally:
        head_scoring.CHUNK_ELEMENTS = default
    logits_mib = 4 * 32 * 16384 * 4 / 2**20  # 8 MiB of float32 logits, against a 2 MiB head
    whole, chunked = out["summary"]["whole"], out["summary"]["chunked"]
    assert whole["saved_mib"] >= logits_mib and whole["saved_mib"] - chunked["saved_mib"] >= logits_mib
    assert chunked["peak_mib"] < whole["peak_mib"] and out["ratios"]["seconds"] > 0
    assert "| chunked |" in capsys.readouterr().out


def test_qwen2_model_counts_the_logits_a_chunked_scoring_holds():
    """memory_model_qwen2.scored_logits: the whole B T V without chunks, else one chunk's B V c, c = chunk // (B V) positions
    as grade_trl's position_chunks cuts them (at least one, at most T); the predictions assume grade_trl's own chunk, and
    a chunked fit's step peak takes the chunk moment S + k C where it is the largest."""
    from grade_trl.core.sampling import CHUNK_ELEMENTS, position_chunks

    qwen2 = load_benchmark("memory_model_qwen2")
    assert qwen2.SCORING_CHUNK_ELEMENTS == CHUNK_ELEMENTS
    for batch, new_tokens, vocab in ((16, 512, 151936), (8, 256, 65536), (2, 4, 8192), (64, 48, 50257)):
        parts = position_chunks((batch, new_tokens, vocab))
        assert qwen2.scored_logits(batch, new_tokens, vocab, CHUNK_ELEMENTS) == batch * vocab * (parts[0].stop - parts[0].start)
        assert qwen2.scored_logits(batch, new_tokens, vocab, None) == batch * new_tokens * vocab
    assert qwen2.scored_logits(16, 512, 151936, CHUNK_ELEMENTS) == 16 * 151936 * 27
    shape = {**qwen2.QWEN25["Qwen2.5-0.5B"], "vocab": qwen2.QWEN25_VOCAB}
    zero = dict.fromkeys(qwen2.FEATURES, 0.0)
    entry = {"scoring": "chunked", "saved_coefficients": {**zero, "1": 2.0**31}, "transient_coefficients": zero, "chunk_bytes_per_logit": 20.0}
    step = qwen2.step_peak(entry, shape, 16, 256, 512)
    assert step["decided_by"] == "chunk" and step["step_peak"] == 2.0**31 + 20.0 * 16 * 151936 * 27
    whole = qwen2.step_peak({k: v for k, v in entry.items() if k != "scoring"}, shape, 16, 256, 512)  # an old fit: the whole logits
    assert whole["decided_by"] == "chunk" and whole["step_peak"] == 2.0**31 + 20.0 * 16 * 512 * 151936
