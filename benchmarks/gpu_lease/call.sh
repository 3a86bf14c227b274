#!/bin/bash
# The next GPU lease's one call (about 9 minutes), from the repository root on the device, after prepare.sh here:
#   run(command="bash benchmarks/gpu_lease/call.sh", carry=[".whl", ".gpu"], timeout_s=600), then give_back.
# What it answers (issues 8 and 13; what is still open there, by the issues' closing notes of 2026-12-04):
#   A. alone on the GPU: where each method's step goes on the gpt2-medium shape (B16, T48, fp32: step_cost --phases
#      through gpu_check), GRADE-STE with the dynamic cache (cheaper backward on the CPU proxy, O(T^2) memory), and
#      GPT-2's decode step as one autograd node against per module (attention_grad_buffer.py --compare decode_block), and
#      the same step's arithmetic eager against captured as CUDA graphs (decode_graph_probe.py);
#   B. then, as one gpu_check command with lanes (the "one command under 10 minutes" of issue 13): the full-size IMDB
#      recipes never run on a GPU (cispo, gapped, rao, reinmax), gsm8k_reinforce, GRADE-STE / PPO / CISPO under
#      fsdp2.yaml and PPO / CISPO under zero3.yaml.
# Outputs: $OUT/*.log, $OUT/tables.md and $OUT/gpu_check.tgz (every gpu_check.md/.json), for docs/results/gpu_check/.
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false USE_HUB_KERNELS=0
export HF_HOME=/tmp/hf TRACKIO_DIR=/tmp/trackio PATH=/tmp/site/bin:$PATH
{ git log -1 --format='commit %H %s' 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, trl, accelerate, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'accelerate', accelerate.__version__, 'deepspeed', deepspeed.__version__)"
  echo "install $(( $(date +%s) - T0 )) s"; } > $OUT/versions.txt 2>&1
G=docs/results/gpu_check/next
T=.gpu/gpt2
# A (GPU alone)
timeout 150 python3 benchmarks/gpu_check.py --tokenizer $T --output_dir $G/cost --stages step_cost --precisions float32 \
  --cost_methods grade_ste reinforce ppo grpo --budget_s 110 > $OUT/cost.log 2>&1
echo "A1 rc $? at $(( $(date +%s) - T0 )) s" >> $OUT/versions.txt
timeout 60 python3 benchmarks/step_cost.py --model gpt2-shaped-random --tokenizer $T --methods grade_ste reinforce --rollout_cache dynamic \
  --phases --warmup 1 --repeats 2 --json $OUT/dynamic_cache.json > $OUT/dynamic_cache.log 2>&1
echo "A2 rc $? at $(( $(date +%s) - T0 )) s" >> $OUT/versions.txt
# A3: GPT-2's decode step as one autograd node against per module, side by side in one process (0.80x on the CPU proxy)
timeout 90 python3 benchmarks/attention_grad_buffer.py --compare decode_block --device cuda --new_tokens 48 --tokenizer $T --n_layer 24 \
  --n_embd 1024 --n_head 16 --batch_size 16 --rounds 4 --skip_calls > $OUT/decode_block.log 2>&1
echo "A3 rc $? at $(( $(date +%s) - T0 )) s" >> $OUT/versions.txt
# A4: what CUDA graphs would take off the decode loop: the one-node step's arithmetic for all 24 layers, 48 steps forward
# then backward, eager against captured (one graph per step and direction), batch 16 and 64 (decode_graph_probe.py)
timeout 60 python3 benchmarks/gpu_lease/decode_graph_probe.py --device cuda > $OUT/decode_graph_probe.log 2>&1
echo "A4 rc $? at $(( $(date +%s) - T0 )) s" >> $OUT/versions.txt
# B (one command, six lanes)
LEFT=$(( 560 - ($(date +%s) - T0) ))
timeout $LEFT python3 benchmarks/gpu_check.py --tokenizer $T --output_dir $G/runs --stages recipes gsm8k fsdp zero --lanes 6 --budget_s $(( LEFT - 80 )) \
  --recipes imdb_cispo imdb_grade_gapped imdb_grade_rao imdb_grade_reinmax --gsm8k_recipes gsm8k_reinforce \
  --sharded_recipes tiny/imdb_grade_ste tiny/imdb_ppo tiny/imdb_cispo --zero_configs zero3.yaml > $OUT/runs.log 2>&1
echo "B rc $? at $(( $(date +%s) - T0 )) s" >> $OUT/versions.txt
for f in $G/*/gpu_check.md; do echo "## $f"; cat $f; echo; done > $OUT/tables.md
tar czf $OUT/gpu_check.tgz $G
cat $OUT/versions.txt $OUT/tables.md
