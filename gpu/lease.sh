#!/usr/bin/env bash
# The open speed measurements as named steps, run in the order given within one call's deadline
# (a device command may run 10 minutes; LEASE_SECONDS, default 560, is this call's share):
#   bash gpu/lease.sh serve-v1-2k serve-v3-2k serve-v3-profile gpu-tests ...
#   bash gpu/lease.sh 1   (a numbered part: a preset list of steps, below)
# A step that would start with under 20 s left is skipped and named in the log, so the next call can run it.
# Logs and JSON go to $OUT (log.txt + the scripts' own files). real-data needs ALPACA_ZH=<folder> carried.
# The *-tuned steps read the sweep result GEMV_SWEEP (default: this call's $OUT/gemv_sweep_chatglm.json; carry an earlier one).
set -u
OUT=${OUT:-/tmp/lease-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src
END=${LEASE_SECONDS:-560}; START=$(date +%s); LOG=$OUT/log.txt
step() {  # step NAME LIMIT cmd...
  local name=$1 limit=$2; shift 2
  local left=$(( END - ($(date +%s) - START) ))
  if [ "$left" -lt 20 ]; then echo "SKIP $name (no time left)" | tee -a "$LOG"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit $limit s, t=$(( $(date +%s) - START )))" | tee -a "$LOG"
  local t0=$(date +%s)
  timeout -k 5 "$limit" "$@" > "$OUT/step.out" 2>&1; local rc=$?
  tail -c 6000 "$OUT/step.out" >> "$LOG"; tail -n 6 "$OUT/step.out"
  [ "$(stat -c %s "$OUT/step.out")" -lt 4000000 ] && cp "$OUT/step.out" "$OUT/$name.out"  # the whole output, first errors included
  echo "=== $name rc=$rc $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
}
bench() { python3 -m chatglm_ft bench --random-weights --prefill-lengths 128,2048 --decode-tokens 64 --json "$@"; }
serve() { local name=$1; shift; SERVE_BENCH_NAME=$name python3 gpu/serve_bench.py "$@"; }
run_step() {
  case $1 in
  fixtures) step fixtures 30 python3 tests/fixtures/make_fixtures.py ;;
  gpu-tests-kernels) step gpu-tests-kernels 180 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels.py tests/test_quantize.py tests/test_model_glm2.py ;;
  gpu-tests) step gpu-tests 540 python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short -rfE --continue-on-collection-errors tests ;;
  v3-fp16) step v3-fp16 90 bash -c "$(declare -f bench); bench --config chatglm3 > $OUT/bench_v3_fp16.json" ;;
  v1-fp16) step v1-fp16 90 bash -c "$(declare -f bench); bench --config full > $OUT/bench_v1_fp16.json" ;;
  v3-int4) step v3-int4 90 bash -c "$(declare -f bench); bench --config chatglm3 --quantize int4 > $OUT/bench_v3_int4.json" ;;
  v1-int4) step v1-int4 90 bash -c "$(declare -f bench); bench --config full --quantize int4 > $OUT/bench_v1_int4.json" ;;
  # 128 streams with the server's default 2048-token slots: ChatGLM-6B's KV cache fits fewer slots than streams
  serve-v1-2k) step serve-v1-2k 200 bash -c "$(declare -f serve); serve serve_bench_full_2k.json --levels 128 --engine-only --max-context 2048" ;;
  serve-v3-2k) step serve-v3-2k 200 bash -c "$(declare -f serve); serve serve_bench_chatglm3_2k.json --config chatglm3 --levels 128 --engine-only --max-context 2048" ;;
  # 128 streams of 1024-token prompts: every step reads 128 long KV caches (ChatGLM-6B's are 16x larger)
  serve-v1-long) step serve-v1-long 220 bash -c "$(declare -f serve); serve serve_bench_full_long.json --levels 128 --engine-only --prompt 1024" ;;
  serve-v3-long) step serve-v3-long 220 bash -c "$(declare -f serve); serve serve_bench_chatglm3_long.json --config chatglm3 --levels 128 --engine-only --prompt 1024" ;;
  # the same with 512-token answers: decode (where the KV cache is read) rather than the prompts' prefill dominates
  serve-v1-long512) step serve-v1-long512 220 bash -c "$(declare -f serve); serve serve_bench_full_long512.json --levels 128 --engine-only --prompt 1024 --answer 512" ;;
  serve-v3-long512) step serve-v3-long512 220 bash -c "$(declare -f serve); serve serve_bench_chatglm3_long512.json --config chatglm3 --levels 128 --engine-only --prompt 1024 --answer 512" ;;
  serve-v3-profile) step serve-v3-profile 200 python3 gpu/serve_bench.py --config chatglm3 --levels 128 --profile ;;
  gemv-glm2) step gemv-glm2 150 python3 gpu/gemv_sweep.py --model chatglm2 --quick --rows 4,16,64,128 ;;
  gemv-v1) step gemv-v1 150 python3 gpu/gemv_sweep.py --model chatglm --quick --rows 4,16 ;;
  gemv-v1-int4) step gemv-v1-int4 120 python3 gpu/gemv_sweep.py --model chatglm --quick --widths 4 --rows 4 ;;
  # the model with the sweep's fastest tiles (split-K included where it won), beside the same run's defaults
  v1-int8) step v1-int8 90 bash -c "$(declare -f bench); bench --config full --quantize int8 > $OUT/bench_v1_int8.json" ;;
  v1-int8-tuned) step v1-int8-tuned 90 env CHATGLM_FT_GEMV_CONFIGS=${GEMV_SWEEP:-$OUT/gemv_sweep_chatglm.json} bash -c "$(declare -f bench); bench --config full --quantize int8 > $OUT/bench_v1_int8_tuned.json" ;;
  v1-fp16-tuned) step v1-fp16-tuned 90 env CHATGLM_FT_GEMV_CONFIGS=${GEMV_SWEEP:-$OUT/gemv_sweep_chatglm.json} bash -c "$(declare -f bench); bench --config full > $OUT/bench_v1_fp16_tuned.json" ;;
  v1-int4-tuned) step v1-int4-tuned 90 env CHATGLM_FT_GEMV_CONFIGS=${GEMV_SWEEP:-$OUT/gemv_sweep_chatglm.json} bash -c "$(declare -f bench); bench --config full --quantize int4 > $OUT/bench_v1_int4_tuned.json" ;;
  train-BC) step train-BC 150 python3 gpu/train_bench.py --config full --only B,C --steps 8 ;;
  serve-int8) step serve-int8 150 python3 gpu/serve_bench.py --quantize int8 --levels 1,128 --engine-only ;;
  serve-int4) step serve-int4 150 python3 gpu/serve_bench.py --quantize int4 --levels 1,128 --engine-only ;;
  # int8/int4 layers on the skinny kernel up to 128 rows (instead of dequantize + cuBLAS above 16)
  serve-int4-rows128) step serve-int4-rows128 150 env CHATGLM_FT_QUANT_GEMV_ROWS=128 bash -c "$(declare -f serve); serve serve_bench_int4_rows128.json --quantize int4 --levels 1,128 --engine-only" ;;
  serve-int8-rows128) step serve-int8-rows128 150 env CHATGLM_FT_QUANT_GEMV_ROWS=128 bash -c "$(declare -f serve); serve serve_bench_int8_rows128.json --quantize int8 --levels 1,128 --engine-only" ;;
  # float16 layers on the kernel's tall tiles up to 128 rows (serving steps, short prefills) against cuBLAS
  serve-v3) step serve-v3 150 bash -c "$(declare -f serve); serve serve_bench_chatglm3_128.json --config chatglm3 --levels 128 --engine-only" ;;
  serve-v3-rows128) step serve-v3-rows128 150 env CHATGLM_FT_GEMV_ROWS=128 bash -c "$(declare -f serve); serve serve_bench_chatglm3_rows128.json --config chatglm3 --levels 128 --engine-only" ;;
  serve-v1) step serve-v1 150 bash -c "$(declare -f serve); serve serve_bench_full_128.json --levels 128 --engine-only" ;;
  serve-v1-rows128) step serve-v1-rows128 150 env CHATGLM_FT_GEMV_ROWS=128 bash -c "$(declare -f serve); serve serve_bench_full_rows128.json --levels 128 --engine-only" ;;
  v3-fp16-rows128) step v3-fp16-rows128 90 env CHATGLM_FT_GEMV_ROWS=128 bash -c "$(declare -f bench); bench --config chatglm3 > $OUT/bench_v3_fp16_rows128.json" ;;
  v1-fp16-rows128) step v1-fp16-rows128 90 env CHATGLM_FT_GEMV_ROWS=128 bash -c "$(declare -f bench); bench --config full > $OUT/bench_v1_fp16_rows128.json" ;;
  attention-grouped) step attention-grouped 80 python3 gpu/serve_bench.py --attention --grouped ;;
  # real-data-no-cudnn: the same without SDPA's cuDNN backend, which builds a graph per new batch length
  # REAL_DATA_ONLY=synthetic,grouped,... and REAL_DATA_STEPS shorten them when time is short
  real-data|real-data-no-cudnn)
    if [ -z "${ALPACA_ZH:-}" ]; then echo "SKIP $1: needs ALPACA_ZH=<the alpaca_zh folder, carried>" | tee -a "$LOG"; return; fi
    local attention=default; [ "$1" = real-data-no-cudnn ] && attention=no-cudnn
    step "$1" 400 python3 gpu/real_data_bench.py --data "$ALPACA_ZH" --attention "$attention" --steps "${REAL_DATA_STEPS:-20}" ${REAL_DATA_ONLY:+--only "$REAL_DATA_ONLY"} ;;
  # the parts, in the order docs/benchmarks.md ("What the next lease measures") lists what is still open
  1) for s in fixtures gpu-tests; do run_step $s; done ;;
  2) for s in v1-int8 v3-fp16 v3-int4 serve-int4; do run_step $s; done ;;
  *) echo "unknown step $1" | tee -a "$LOG" ;;
  esac
}
nvidia-smi --query-gpu=name --format=csv,noheader | tee -a "$LOG"
for s in "${@:-1}"; do run_step "$s"; done
rm -f "$OUT/step.out"
