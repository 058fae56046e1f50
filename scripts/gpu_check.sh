#!/usr/bin/env bash
# The GPU check (docs/gpu.md): the trainer's test subset on CUDA, then the trainer benchmark on
# random-weight Qwen3-0.6B and Qwen3-4B shapes; a JSON and a Markdown report in OUT_DIR.
#
#   scripts/gpu_check.sh OUT_DIR            a machine with torch + CUDA; no network, no build step
#   scripts/gpu_check.sh --dry-run OUT_DIR  on CPU: the same phases with a tiny shape (the test suite runs this)
#   options: --tests run|collect|skip (default run), --budget-s N (whole run; default 470, dry run 3x: 1410)
#   CLORA_COMMIT=<sha>: the commit to report where the tree's .git is missing or stale (scripts/tree_commit.sh)
#
# Run from anywhere; it works in the repository root. Carried wheels (.gpu-wheels/) are installed
# into .gpu-site/ first. Each phase runs in its own process under its own time limit, cut so the
# whole run stays within the budget; a failed or timed-out phase is reported with its log's tail
# and the next phase still runs; the benchmark saves its JSON after every measurement. Exit 0
# only when every phase that ran passed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

DRY=0 TESTS=run BUDGET="" OUT=""
usage="usage: $0 [--dry-run] [--tests run|collect|skip] [--budget-s N] OUT_DIR"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --tests) TESTS="${2:-}"; shift ;;
    --tests=*) TESTS="${1#*=}" ;;
    --budget-s) BUDGET="${2:-}"; shift ;;
    --budget-s=*) BUDGET="${1#*=}" ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    -*) echo "$usage" >&2; exit 2 ;;
    *) OUT="$1" ;;
  esac
  shift
done
[ -n "$OUT" ] || { echo "$usage" >&2; exit 2; }
case "$TESTS" in run|collect|skip) ;; *) echo "--tests takes run, collect or skip" >&2; exit 2 ;; esac
# The dry run checks that nothing rotted, not speed: on a shared CPU its phases get 3x the time.
if [ "$DRY" -eq 1 ]; then SCALE=3; else SCALE=1; fi
BUDGET="${BUDGET:-$(( 470 * SCALE ))}"
case "$BUDGET" in *[!0-9]*) echo "--budget-s takes whole seconds" >&2; exit 2 ;; esac

PY="${PYTHON:-python3}"
# the commit these files are (before OUT exists: OUT may be inside the tree). Not plain `git rev-parse`:
# the device tool's copy of the tree carried a .git from an older commit (the H200 run of 2026-11-29
# from e4bc2ff printed 9867702); set CLORA_COMMIT=<sha> in the command where the tree has no true .git
export CLORA_CHECK_COMMIT="$(bash scripts/tree_commit.sh .)"
mkdir -p "$OUT/logs" || exit 2
OUT="$(cd "$OUT" && pwd)"
: > "$OUT/phases.tsv"
START=$SECONDS
FAILED=0
REPORT_RESERVE=20  # seconds kept for the report at the end

# limit WANT: WANT (times SCALE), or less if the budget has less left (after the report's reserve)
limit() {
  local want=$(( $1 * SCALE )) left=$(( BUDGET - (SECONDS - START) - REPORT_RESERVE ))
  if [ "$left" -lt "$want" ]; then echo "$left"; else echo "$want"; fi
}

# phase NAME LIMIT CMD...: run CMD with a time limit, output in OUT/logs/NAME.log, a line in OUT/phases.tsv
phase() {
  local name=$1 lim=$2; shift 2
  if [ "$lim" -lt 10 ]; then
    printf '%s\t-\t0\t%s\n' "$name" "$lim" >> "$OUT/phases.tsv"
    echo "== $name: SKIPPED, the ${BUDGET} s budget is spent"
    FAILED=1
    return
  fi
  echo "== $name (limit ${lim} s): $*"
  local t0=$SECONDS rc
  timeout -k 10 "$lim" "$@" > "$OUT/logs/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( SECONDS - t0 ))" "$lim" >> "$OUT/phases.tsv"
  if [ "$rc" -eq 0 ]; then
    echo "   ok ($(( SECONDS - t0 )) s)"
    return
  fi
  FAILED=1
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then echo "   TIMED OUT after ${lim} s"; else echo "   FAILED (exit $rc)"; fi
  echo "   last lines of $OUT/logs/$name.log:"
  tail -n 20 "$OUT/logs/$name.log" | sed 's/^/   | /'
}

{
  echo "clora GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(uname -n), commit $CLORA_CHECK_COMMIT"
  echo "python: $(command -v "$PY") ($("$PY" -V 2>&1)); dry run: $DRY; tests: $TESTS; budget: $BUDGET s"
  if command -v nvidia-smi > /dev/null; then timeout 15 nvidia-smi -L; fi
} 2>&1 | tee "$OUT/logs/header.log"

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"

SITE="$PWD/.gpu-site"
if ls .gpu-wheels/*.whl > /dev/null 2>&1; then
  rm -rf "$SITE"
  phase wheels "$(limit 60)" "$PY" scripts/gpu_wheels.py .gpu-wheels "$SITE"
  export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  printf 'wheels\t-\t0\t0\n' >> "$OUT/phases.tsv"
  echo "== wheels: no .gpu-wheels/*.whl here, using what $PY has (docs/gpu.md says how to fill it)"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

if [ "$DRY" -eq 1 ]; then
  export CLORA_IMAGE_ONLY=1 CLORA_TEST_DEVICES=cpu  # imports as on the GPU image; tests on cpu
  DEVICE=cpu SHAPES="tiny" ENV_FLAGS="" TEST_TIMEOUT=""
else
  export CLORA_TEST_DEVICES=cuda  # the cuda variants only; a missing CUDA device fails them
  DEVICE=cuda SHAPES="qwen3-0.6b qwen3-4b" ENV_FLAGS="--expect-cuda" TEST_TIMEOUT="--test-timeout=60"
fi

phase env "$(limit 60)" "$PY" -m clora.bench.gpu_check env "$OUT" $ENV_FLAGS
case "$TESTS" in
  # on the GPU a tiny-model test takes seconds: a hung one fails after 60 s and the rest still run
  run) phase tests "$(limit 150)" "$PY" -m clora.bench.gpu_check tests "$OUT" $TEST_TIMEOUT ;;
  collect) phase tests "$(limit 90)" "$PY" -m clora.bench.gpu_check tests "$OUT" --collect-only ;;
  skip) printf 'tests\t-\t0\t0\n' >> "$OUT/phases.tsv"; echo "== tests: skipped (--tests skip)" ;;
esac
for shape in $SHAPES; do
  case "$shape" in qwen3-4b) want=190 ;; qwen3-0.6b) want=110 ;; *) want=120 ;; esac
  lim=$(limit "$want")
  # the benchmark stops before a tenant count that would not fit 15 s before the hard limit
  phase "bench-$shape" "$lim" "$PY" -m clora.bench.gpu --shape "$shape" --device "$DEVICE" \
    --out "$OUT/bench-$shape.json" --budget-s $(( lim > 30 ? lim - 15 : lim ))
done

if ! timeout -k 5 60 "$PY" -m clora.bench.gpu_report "$OUT" > "$OUT/logs/report.log" 2>&1; then
  FAILED=1
  echo "== report FAILED:"
  tail -n 20 "$OUT/logs/report.log" | sed 's/^/   | /'
else
  cat "$OUT/gpu_check.md"
fi
echo "== total $(( SECONDS - START )) s; $( [ $FAILED -eq 0 ] && echo 'every phase passed' || echo 'SOME PHASES FAILED' ); results in $OUT"
exit $FAILED
