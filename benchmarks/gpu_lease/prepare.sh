#!/bin/bash
# Prepare, on the development machine, what a GPU lease's call needs and cannot fetch there (the device has no network):
#   .whl/      wheels of the versions this project is tested with, for the device's Python 3.12 (its image has torch,
#              older transformers/accelerate/peft, no trl, datasets or DeepSpeed); DeepSpeed as a pure-Python wheel
#   .gpu/gpt2  the GPT-2 tokenizer (the hub is unreachable there)
# Both are git-excluded here and travel with `carry`. Then: run(command="bash benchmarks/gpu_lease/call.sh",
# carry=[".whl", ".gpu"], timeout_s=600), and give the machine back.
#
#   bash benchmarks/gpu_lease/prepare.sh [PATH/TO/gpt2 tokenizer folder, default ../shared/tokenizers/gpt2]
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
TOKENIZER=${1:-../shared/tokenizers/gpt2}
mkdir -p .git/info && for path in .whl/ .gpu/; do grep -qsxF "$path" .git/info/exclude || echo "$path" >> .git/info/exclude; done
rm -rf .whl && mkdir -p .whl .gpu
# Versions pinned to what CI tests (pyproject's ranges resolved on 2026-12-04); the device's own torch stays.
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
  transformers==5.25.0 trl==1.16.0 accelerate==1.16.0 datasets==5.2.0 peft==0.21.2 huggingface_hub==2.4.0 tokenizers==0.23.3 \
  kernels==0.19.1 hf-xet==1.8.0 httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5 click==8.5.1 tomlkit==0.15.3 \
  regex==2026.12.2 fsspec==2026.9.0 dill==0.4.1 multiprocess==0.70.19 \
  hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
DS_BUILD_OPS=0 pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl  # pure Python: its ops would be built on first use
rm -rf .gpu/gpt2 && cp -r "$TOKENIZER" .gpu/gpt2
du -sh .whl .gpu
