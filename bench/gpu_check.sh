#!/usr/bin/env bash
# The GPU check, one command on a machine with a CUDA GPU (about 6-11 minutes on one 80 GB GPU):
#   bash bench/gpu_check.sh [OUT_DIR]          (default runs/gpu_check)
# 1. tests/test_gpu.py: device choice (cuda, bf16, nccl); a bf16 student with an fp32 EMA teacher; the real entry
#    point for vision, speech and text with a checkpoint, a resume from it and layerdrop; a start with LOCAL_RANK=1
#    and one visible device; the feature monitor on vision (eval.every=1); the sin-cos table under a bf16 zero.Init;
# 2. bench/bench_gpu_step.py: the full bf16 step of vision/speech/text Base on one GPU: samples/s, TFLOP/s, MFU,
#    peak memory against pipeline.plan's figure.
# Writes OUT_DIR/gpu_check.json (one summary: tests passed/failed/skipped, per-preset figures) and the logs beside
# it; exits non-zero if a test failed or a step could not run.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/gpu_check}"
mkdir -p "$out"
# the interpreter: $PYTHON, else python, else python3 (many GPU images ship python3 alone)
py="${PYTHON:-$(command -v python || command -v python3)}"
# each stage's time limit (seconds): a hung stage still leaves the other's figures and the summary
tests_s="${GPU_CHECK_TESTS_S:-420}" steps_s="${GPU_CHECK_STEPS_S:-270}"
if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); run it on a GPU machine" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/nvidia-smi.csv" 2>&1
timeout "$tests_s" "$py" -m pytest tests/test_gpu.py -q -rA -p no:cacheprovider --junitxml="$out/tests.xml" \
    > "$out/tests.log" 2>&1
tests_rc=$?
timeout "$steps_s" "$py" bench/bench_gpu_step.py --size base --json "$out/steps.json" > "$out/steps.log" 2>&1
steps_rc=$?
"$py" - "$out" "$tests_rc" "$steps_rc" <<'PY'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
out, tests_rc, steps_rc = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
summary = {"tests_exit": tests_rc, "steps_exit": steps_rc,
           "gpu": (out / "nvidia-smi.csv").read_text().strip().splitlines()[-1]}
try:
    suite = ET.parse(out / "tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    summary["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    summary["failed"] = [c.get("name") for c in suite.iter("testcase")
                         if c.find("failure") is not None or c.find("error") is not None]
except (OSError, ET.ParseError) as exc:
    summary["tests"] = f"no report ({exc}); see tests.log"
try:
    summary["steps"] = json.loads((out / "steps.json").read_text())["steps"]
except (OSError, ValueError) as exc:
    summary["steps"] = f"no figures ({exc}); see steps.log"
(out / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")
print(json.dumps(summary))
PY
[ "$tests_rc" -eq 0 ] && [ "$steps_rc" -eq 0 ]
