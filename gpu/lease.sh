#!/usr/bin/env bash
# The open speed measurements, in priority order, for one GPU lease of 10-minute commands:
#   bash gpu/lease.sh 1; ...; bash gpu/lease.sh 5   (each stays under ~9 minutes)
# Each step is cut at its own limit and at the part's deadline; logs and JSON go to $OUT (log.txt + the
# scripts' own files). part 5, the real-data training run, needs ALPACA_ZH=<folder>.
set -u
PART=${1:-1}
OUT=${OUT:-/tmp/lease-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src
END=540; START=$(date +%s); LOG=$OUT/log.txt
step() {  # step NAME LIMIT cmd...
  local name=$1 limit=$2; shift 2
  local left=$(( END - ($(date +%s) - START) ))
  if [ "$left" -lt 20 ]; then echo "SKIP $name (no time left)" | tee -a "$LOG"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit $limit s)" | tee -a "$LOG"
  local t0=$(date +%s)
  timeout -k 5 "$limit" "$@" > "$OUT/step.out" 2>&1; local rc=$?
  tail -c 6000 "$OUT/step.out" >> "$LOG"; tail -n 6 "$OUT/step.out"
  echo "=== $name rc=$rc $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
}
bench() { python3 -m chatglm_ft bench --random-weights --prefill-lengths 128,2048 --decode-tokens 64 --json "$@"; }
nvidia-smi --query-gpu=name --format=csv,noheader | tee -a "$LOG"
case $PART in
1)
  step fixtures 30 python3 tests/fixtures/make_fixtures.py
  step gpu-tests 240 python3 -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors tests
  step v3-fp16 70 bash -c "$(declare -f bench); bench --config chatglm3 > $OUT/bench_v3_fp16.json"
  step v3-int4 70 bash -c "$(declare -f bench); bench --config chatglm3 --quantize int4 > $OUT/bench_v3_int4.json"
  step v1-int4 70 bash -c "$(declare -f bench); bench --config full --quantize int4 > $OUT/bench_v1_int4.json" ;;
2)
  # 128 streams with the server's default 2048-token slots: ChatGLM-6B's KV cache fits fewer slots than streams
  step serve-v1-2k 150 bash -c "SERVE_BENCH_NAME=serve_bench_full_2k.json python3 gpu/serve_bench.py --levels 128 --engine-only --max-context 2048"
  step serve-v3-2k 170 bash -c "SERVE_BENCH_NAME=serve_bench_chatglm3_2k.json python3 gpu/serve_bench.py --config chatglm3 --levels 128 --engine-only --max-context 2048"
  step serve-v3-profile 200 python3 gpu/serve_bench.py --config chatglm3 --levels 128 --profile ;;
3)
  step gemv-glm2 90 python3 gpu/gemv_sweep.py --model chatglm2 --quick --rows 4,16,64,128
  step train-BC 150 python3 gpu/train_bench.py --config full --only B,C --steps 8
  step serve-int8 150 python3 gpu/serve_bench.py --quantize int8 --levels 1,128 --engine-only
  step serve-int4 150 python3 gpu/serve_bench.py --quantize int4 --levels 1,128 --engine-only ;;
4)  # int8/int4 layers on the skinny kernel up to 128 rows (instead of dequantize + cuBLAS above 16): serving, prefill
  export CHATGLM_FT_QUANT_GEMV_ROWS=128
  step v1-int4-rows128 70 bash -c "$(declare -f bench); bench --config full --quantize int4 > $OUT/bench_v1_int4_rows128.json"
  step serve-int4-rows128 150 bash -c "SERVE_BENCH_NAME=serve_bench_int4_rows128.json python3 gpu/serve_bench.py --quantize int4 --levels 1,128 --engine-only"
  step serve-int8-rows128 150 bash -c "SERVE_BENCH_NAME=serve_bench_int8_rows128.json python3 gpu/serve_bench.py --quantize int8 --levels 1,128 --engine-only"
  step attention-grouped 80 python3 gpu/serve_bench.py --attention --grouped ;;
5)
  if [ -z "${ALPACA_ZH:-}" ]; then echo "part 5 needs ALPACA_ZH=<the alpaca_zh folder, carried to this machine>"; exit 2; fi
  step real-data 500 python3 gpu/real_data_bench.py --data "$ALPACA_ZH" --steps 20 ;;
esac
rm -f "$OUT/step.out"
