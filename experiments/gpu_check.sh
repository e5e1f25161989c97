#!/usr/bin/env bash
# GPU check for scale-out (DDP, FSDP, DeepSpeed, vLLM), for a machine with one CUDA GPU and no network.
#   bash experiments/gpu_check.sh [--parts a,b] [--timeout SECONDS_PER_PART]
# 1. installs the wheels carried in ./wheels (pip --no-index: never the network) and says what is still missing;
# 2. runs experiments/gpu_check.py: every part in its own process with a time limit, one table at the end.
# Budget: under 8 minutes in all (parts default to 150 s each; most take 10-40 s).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ls wheels/*.whl >/dev/null 2>&1; then
  echo "[gpu_check] installing $(ls wheels/*.whl | wc -l) carried wheels from wheels/ (no index, no deps)"
  $PY -m pip install -q --no-index --no-deps --no-compile --find-links wheels wheels/*.whl 2>&1 | grep -v "^WARNING: Running pip as" | tail -5
else
  echo "[gpu_check] no wheels/ folder: using the installed packages only"
fi
missing=""
for mod in torch lightning transformers peft torchmetrics omegaconf deepspeed vllm; do
  $PY -c "import $mod" >/dev/null 2>&1 || missing="$missing $mod"
done
echo "[gpu_check] missing python modules:${missing:- none} (deepspeed and vllm are optional; torch, lightning, transformers, torchmetrics and omegaconf are required)"
for req in torch lightning transformers torchmetrics omegaconf; do
  case " $missing " in *" $req "*) echo "[gpu_check] cannot run without $req: put its wheel in wheels/"; exit 2;; esac
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "[gpu_check] nvidia-smi not found"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
timeout 470 $PY experiments/gpu_check.py --out "${OUT:-.}/gpu_check_results.json" "$@"
