#!/usr/bin/env bash
# The GPU check, prepared: on a fresh GPU machine with this repository, in under 8 minutes,
#
#   bash bench/gpu_check.sh [OUT_DIR]        (default: runs/gpu-check)
#
# installs the GPU path (docker/install.sh --gpu --dev: vLLM's CUDA build), starts `hypergen
# serve` with the hypernetwork on the GPU (HYPERGEN_DEVICE=cuda) and vLLM beside it, runs the
# end-to-end smoke (adapter miss then hit, /generate, the OpenAI client), then
# bench/generate_latency.py, bench/serve_latency.py and bench/serve_throughput.py against it, and
# writes one JSON summary (OUT_DIR/summary.json). Every step has its own time limit and the whole
# script stops itself at 470 s; a step that fails or runs out of time is recorded, not fatal.
# Redis: the host's on 127.0.0.1:6379 if it answers, else none (in-process cache).
# A dry run of the script itself on a CPU host with hypergen installed: SKIP_INSTALL=1 DEVICE=cpu.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu-check}
mkdir -p "$out"
exec > >(tee "$out/log.txt") 2>&1
deadline=$((SECONDS + 470))
left() { echo $((deadline - SECONDS)); }
step() {  # step NAME SECONDS COMMAND...: runs with a limit, keeps stdout's last line as the result
  local name=$1 limit=$2; shift 2
  [ "$(left)" -lt "$limit" ] && limit=$(left)
  if [ "$limit" -le 5 ]; then echo "{\"skipped\": \"out of time\"}" > "$out/$name.json"; return; fi
  echo "== $name (limit ${limit}s)"
  if timeout "$limit" "$@" > "$out/$name.out"; then tail -n 1 "$out/$name.out" > "$out/$name.json"
  else echo "{\"failed\": \"exit $? (see $name.out)\"}" > "$out/$name.json"; fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" 2>&1
device=${DEVICE:-cuda}
[ -n "${SKIP_INSTALL:-}" ] || step install 240 bash docker/install.sh --gpu --dev
redis_url=""
(echo PING | timeout 2 bash -c 'cat > /dev/tcp/127.0.0.1/6379') 2>/dev/null && redis_url=redis://127.0.0.1:6379/0
port=8765
HYPERGEN_DEVICE=$device HYPERGEN_ENGINE=vllm HYPERGEN_MAX_LORAS=64 HYPERGEN_PORT=$port HYPERGEN_REDIS_URL=$redis_url VLLM_NO_USAGE_STATS=1 \
  .venv/bin/hypergen serve > "$out/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null' EXIT
url=http://127.0.0.1:$port
until curl -sf "$url/readyz" > /dev/null; do
  if ! kill -0 $server 2>/dev/null || [ "$(left)" -le 0 ]; then echo "server did not start"; break; fi
  sleep 2
done
step smoke 60 .venv/bin/python bench/smoke.py --url "$url"
step generate_latency 60 .venv/bin/python bench/generate_latency.py --device "$device"
step serve_latency 90 .venv/bin/python bench/serve_latency.py --url "$url"
step serve_throughput 120 .venv/bin/python bench/serve_throughput.py --url "$url"
.venv/bin/python - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def read(name):
    try:
        return json.loads((out / f"{name}.json").read_text())
    except (OSError, ValueError):
        return {"failed": "no result"}
summary = {"gpu": (out / "gpu.txt").read_text().strip(),
           **{n: read(n) for n in ("smoke", "generate_latency", "serve_latency", "serve_throughput")}}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary))
PY
