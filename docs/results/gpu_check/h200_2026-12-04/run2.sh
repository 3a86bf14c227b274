#!/bin/bash
# Call 2 of the lease (as run, from the repository root; .whl = the wheels listed in README.md, .gpu/gpt2 = the GPT-2 tokenizer).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false USE_HUB_KERNELS=0
export HF_HOME=/tmp/hf TRACKIO_DIR=/tmp/trackio
G=docs/results/gpu_check
T=.gpu/gpt2
timeout 190 taskset -c 0-11 python3 benchmarks/gpu_check.py --tokenizer $T --output_dir $G/cost --stages step_cost fit --budget_s 135 > $OUT/cost.log 2>&1
echo "phase A rc $?"
timeout 215 taskset -c 0-11 python3 benchmarks/gpu_check.py --tokenizer $T --output_dir $G/recipes --stages recipes --budget_s 165 --recipes imdb_grade_ste imdb_reinforce imdb_ppo imdb_grpo imdb_grade imdb_cispo imdb_grade_gapped imdb_grade_rao imdb_grade_reinmax > $OUT/recipes.log 2>&1 &
timeout 215 taskset -c 0-11 python3 benchmarks/gpu_check.py --tokenizer $T --output_dir $G/gsm8k --stages gsm8k --budget_s 165 > $OUT/gsm8k.log 2>&1 &
timeout 215 taskset -c 12-15 python3 benchmarks/gpu_check.py --tokenizer $T --output_dir $G/fsdp --stages fsdp --budget_s 165 > $OUT/fsdp.log 2>&1 &
wait
for f in $G/*/gpu_check.md; do echo "## $f"; cat $f; echo; done > $OUT/tables.md
tar czf $OUT/gpu_check.tgz $G
cat $OUT/tables.md
