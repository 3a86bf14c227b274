#!/bin/bash
# Call 2 of the 2026-12-04 evening lease (as run): what call 1 left (GRADE under fsdp2.yaml after the fix of the
# one-process alias; REINFORCE and PPO under ZeRO-2/3; the IMDB GRPO recipe; GSM8K REINFORCE).
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false USE_HUB_KERNELS=0
export HF_HOME=/tmp/hf TRACKIO_DIR=/tmp/trackio PATH=/tmp/site/bin:$PATH
G=docs/results/gpu_check
T=.gpu/gpt2
B=190
timeout $((B+70)) python3 benchmarks/gpu_check.py --tokenizer $T --output_dir $G/fsdp_2 --stages fsdp --budget_s $B --sharded_recipes tiny/imdb_grade_ste tiny/imdb_ppo > $OUT/fsdp_2.log 2>&1 &
timeout $((B+70)) python3 benchmarks/gpu_check.py --tokenizer $T --output_dir $G/zero3_2 --stages zero --zero_configs zero3.yaml --budget_s $B --sharded_recipes tiny/imdb_reinforce tiny/imdb_ppo > $OUT/zero3_2.log 2>&1 &
timeout $((B+70)) python3 benchmarks/gpu_check.py --tokenizer $T --output_dir $G/zero2_2 --stages zero --zero_configs zero2.yaml --budget_s $B --sharded_recipes tiny/imdb_reinforce tiny/imdb_ppo > $OUT/zero2_2.log 2>&1 &
timeout $((B+70)) python3 benchmarks/gpu_check.py --tokenizer $T --output_dir $G/recipes_c --stages recipes --budget_s $B --recipes imdb_grpo > $OUT/recipes_c.log 2>&1 &
timeout $((B+70)) python3 benchmarks/gpu_check.py --tokenizer $T --output_dir $G/gsm8k_2 --stages gsm8k --budget_s $B --gsm8k_recipes gsm8k_reinforce > $OUT/gsm8k_2.log 2>&1 &
wait
echo "done at $(( $(date +%s) - T0 )) s" > $OUT/versions.txt
for f in $G/*_2/gpu_check.md $G/recipes_c/gpu_check.md; do echo "## $f"; cat $f; echo; done > $OUT/tables.md
tar czf $OUT/gpu_check.tgz $G
cat $OUT/versions.txt $OUT/tables.md
