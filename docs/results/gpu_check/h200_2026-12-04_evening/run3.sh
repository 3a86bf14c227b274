#!/bin/bash
# Call 1 of the 2026-12-04 evening lease (as run, from the repository root; .whl = the wheels, DeepSpeed 0.19.8 and its
# requirements added; .gpu/gpt2 = the GPT-2 tokenizer).
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false USE_HUB_KERNELS=0
export HF_HOME=/tmp/hf TRACKIO_DIR=/tmp/trackio PATH=/tmp/site/bin:$PATH
python3 -c "import deepspeed, torch; print('deepspeed', deepspeed.__version__, 'torch', torch.__version__)" > $OUT/versions.txt 2>&1
echo "install $(( $(date +%s) - T0 )) s" >> $OUT/versions.txt
G=docs/results/gpu_check
T=.gpu/gpt2
# A: step cost alone on the GPU (fp32, B16, T48)
timeout 150 python3 benchmarks/gpu_check.py --tokenizer $T --output_dir $G/cost --stages step_cost --precisions float32 --cost_methods grade_ste reinforce ppo grpo --budget_s 110 > $OUT/cost.log 2>&1
echo "A rc $? at $(( $(date +%s) - T0 )) s" >> $OUT/versions.txt
# B: six lanes at once
B=270
timeout $((B+60)) python3 benchmarks/gpu_check.py --tokenizer $T --output_dir $G/fsdp --stages fsdp --budget_s $B --sharded_recipes tiny/imdb_grade_ste tiny/imdb_grpo tiny/imdb_reinforce tiny/imdb_ppo > $OUT/fsdp.log 2>&1 &
timeout $((B+60)) python3 benchmarks/gpu_check.py --tokenizer $T --output_dir $G/zero3 --stages zero --zero_configs zero3.yaml --budget_s $B --sharded_recipes tiny/imdb_grade_ste tiny/imdb_grpo tiny/imdb_reinforce tiny/imdb_ppo > $OUT/zero3.log 2>&1 &
timeout $((B+60)) python3 benchmarks/gpu_check.py --tokenizer $T --output_dir $G/zero2 --stages zero --zero_configs zero2.yaml --budget_s $B --sharded_recipes tiny/imdb_grade_ste tiny/imdb_grpo tiny/imdb_reinforce tiny/imdb_ppo > $OUT/zero2.log 2>&1 &
timeout $((B+60)) python3 benchmarks/gpu_check.py --tokenizer $T --output_dir $G/recipes_a --stages recipes --budget_s $B --recipes imdb_reinforce imdb_ppo imdb_grpo imdb_cispo > $OUT/recipes_a.log 2>&1 &
timeout $((B+60)) python3 benchmarks/gpu_check.py --tokenizer $T --output_dir $G/recipes_b --stages recipes --budget_s $B --recipes imdb_grade imdb_grade_gapped imdb_grade_rao imdb_grade_reinmax > $OUT/recipes_b.log 2>&1 &
timeout $((B+60)) python3 benchmarks/gpu_check.py --tokenizer $T --output_dir $G/gsm8k --stages gsm8k --budget_s $B --gsm8k_recipes gsm8k_grpo gsm8k_reinforce > $OUT/gsm8k.log 2>&1 &
wait
echo "B done at $(( $(date +%s) - T0 )) s" >> $OUT/versions.txt
for f in $G/*/gpu_check.md; do echo "## $f"; cat $f; echo; done > $OUT/tables.md
tar czf $OUT/gpu_check.tgz $G
cat $OUT/versions.txt $OUT/tables.md
