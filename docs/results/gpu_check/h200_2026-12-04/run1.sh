#!/bin/bash
# Call 1 of the lease (as run; benchmarks/gpu_check.py then wrote its table only at the end of a stage, read the
# GPT-2 tokenizer with AutoTokenizer, and the models loaded with transformers' hub kernels on).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export HF_HOME=/tmp/hf TRACKIO_DIR=/tmp/trackio
G=docs/results/gpu_check
T=.gpu/gpt2
# CPU target of issue 8 on cores 12-15 (2 threads), beside the GPU work on cores 0-11
( timeout 520 taskset -c 12-15 python3 benchmarks/step_cost.py --device cpu --model gpt2-shaped-random --tokenizer $T --n_layer 12 --n_embd 768 --n_head 12 --batch_size 8 --new_tokens 24 48 --threads 2 --methods grade_ste reinforce --warmup 1 --repeats 3 --json $OUT/cpu_step_cost.json > $OUT/cpu_step_cost.log 2>&1 ) &
timeout 235 taskset -c 0-11 python3 benchmarks/gpu_check.py --tokenizer $T --output_dir $G/cost --stages step_cost fit --budget_s 175 > $OUT/cost.log 2>&1
timeout 270 taskset -c 0-11 python3 benchmarks/gpu_check.py --tokenizer $T --output_dir $G/recipes --stages recipes --budget_s 215 > $OUT/recipes.log 2>&1 &
timeout 270 taskset -c 0-11 python3 benchmarks/gpu_check.py --tokenizer $T --output_dir $G/gsm8k --stages gsm8k --budget_s 200 > $OUT/gsm8k.log 2>&1 &
timeout 270 taskset -c 0-11 python3 benchmarks/gpu_check.py --tokenizer $T --output_dir $G/fsdp --stages fsdp --budget_s 200 > $OUT/fsdp.log 2>&1 &
wait
