#!/usr/bin/env bash
# One call on the GPU machine: install the carried wheels, run the GPU tests, run the load benchmark.
#
#   bash benchmarks/gpu_session.sh            (from the repository root; carry .whl/ from fetch_wheels.sh)
#
# Everything lands in $OUT (where the results are collected; /tmp/hw-out when unset): session.log,
# machine.txt, gpu-tests.log, bench.log and bench-<gpu>-<date>.json (5 files). The JSON also goes to
# benchmarks/results/. Stays under ~9 minutes: each stage is time-boxed with `timeout`.
#
# Knobs (environment): TESTS_TIMEOUT (s, default 200), TOTAL (s, default 530), BENCH_ARGS (extra flags for
# bench_load.py, e.g. "--rank-gb 12 --skip sweep"), PYTEST_ARGS (e.g. "-k vmm"), SKIP_TESTS=1, SKIP_BENCH=1,
# SWEEP=1 (run sweep_bounce.py after the tests; SWEEP_BUDGET seconds, SWEEP_ARGS extra flags), AB=1 (run
# ab_settings.py after that, AB_ARGS its flags, AB_TIMEOUT its time box in seconds, default 150), SKIP_FF=1
# (bench_first_forward.py runs before bench_load.py unless set; FF_ARGS its flags, FF_TIMEOUT its time box),
# NODE=1 (run bench_node.py, every GPU at once through a daemon, instead of bench_load.py; NODE_ARGS its flags;
# same budget and time box; pair with SKIP_TESTS=1 SKIP_FF=1 to give it the whole session), COLD=1 (run
# bench_cold.py instead of bench_load.py: the cold read ceiling over several read shapes, and the daemon's
# read modes cold and partly cached with the peers cold in the same rotation, interleaved repetitions;
# COLD_ARGS its flags, e.g. "--reps 3 --skip partial_halves,sweep --modes auto,odirect --peers fastsafetensors,runai"
# (--modes: the daemon's read modes, --peers: '' for none; same budget and time box).
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/hw-out}"
mkdir -p "$OUT" benchmarks/results
TOTAL="${TOTAL:-530}"
TESTS_TIMEOUT="${TESTS_TIMEOUT:-200}"
SECONDS=0
log() { echo "[gpu_session ${SECONDS}s] $*" | tee -a "$OUT/session.log"; }

{
  date -u
  nvidia-smi || true
  nvidia-smi topo -m || true
  ls -la /dev/nvidia-fs* 2>&1 || true
  python3 --version
  nproc
  free -g
  df -h /tmp /dev/shm .
  cat /sys/devices/system/node/online 2>/dev/null || true
} > "$OUT/machine.txt" 2>&1

if ls .whl/*.whl >/dev/null 2>&1; then
  log "installing $(ls .whl/*.whl | wc -l) carried wheel(s) into /tmp/site"
  if ! timeout 120 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl 2>&1 | tail -5 | tee -a "$OUT/session.log"; then
    # one unusable wheel must not keep the others out: install them one by one
    for w in .whl/*.whl; do
      timeout 60 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$w" 2>&1 | tail -2 | tee -a "$OUT/session.log" || log "could not install $w"
    done
  fi
else
  log "no .whl/ carried: peers that are not installed are recorded as such"
fi
export PYTHONPATH=/tmp/site:$PWD/client:$PWD/daemon

# The loader's native engine (daemon/hotweightsd/loaders/hwfill.c) is built by pip install; this script runs
# from the source tree, so it uses a library carried beside the package (carry daemon/hotweightsd/loaders/_hwfill*.so),
# or builds one there when none loads and a C compiler exists (the daemon, the tests and the benchmarks all
# find it beside the package). Without either, loads run on the python workers and say so.
native_state() { python3 -c 'from hotweightsd.loaders import native as n; print(n.library_path(), "|", n.unavailable_reason() or "loads")'; }
if native_state | grep -qv "| loads$" && command -v cc >/dev/null 2>&1; then
  rm -f daemon/hotweightsd/loaders/_hwfill*.so
  cc -O2 -std=gnu11 -shared -fPIC -o daemon/hotweightsd/loaders/_hwfill.so daemon/hotweightsd/loaders/hwfill.c -ldl -lpthread \
    || log "building the native loader failed"
fi
log "native loader: $(native_state 2>&1 | tail -1)"

# GDS_UDEV_SHIM=1 (test machines only): these VMs have no /run/udev, and cuFile reads a file's block
# device attributes from udev's database even in compatibility mode, so it registers no file at all.
# One database entry for the disk behind /tmp lets the GDS path's correctness test run.
if [ -n "${GDS_UDEV_SHIM:-}" ] && [ ! -e /run/udev/data ]; then
  dev=$(mountpoint -d "$(df --output=target /tmp | tail -1)" 2>/dev/null)
  if [ -n "$dev" ]; then
    mkdir -p /run/udev/data && printf 'E:ID_FS_USAGE=filesystem\nE:ID_FS_TYPE=%s\nE:DEVTYPE=disk\n' \
      "$(df --output=fstype /tmp | tail -1)" > "/run/udev/data/b$dev" && touch /run/udev/control
    log "GDS_UDEV_SHIM: wrote /run/udev/data/b$dev for cuFile"
  fi
fi

timeout 60 python3 - <<'PY' 2>&1 | tee -a "$OUT/session.log"
import importlib, importlib.metadata as md
for mod, dist in [("torch", "torch"), ("cuda.bindings.driver", "cuda-bindings"), ("structlog", "structlog"),
                  ("grpc_health", "grpcio-health-checking"), ("fastsafetensors", "fastsafetensors"),
                  ("runai_model_streamer", "runai-model-streamer"), ("instanttensor", "instanttensor"),
                  ("cuda.bindings.cufile", "cuda-bindings")]:
    try:
        importlib.import_module(mod)
        try:
            v = md.version(dist)
        except md.PackageNotFoundError:
            v = "?"
        print(f"import {mod}: ok ({dist} {v})")
    except Exception as exc:
        print(f"import {mod}: FAILED {type(exc).__name__}: {exc}")
import torch
print("torch.cuda:", torch.cuda.is_available(), torch.cuda.device_count(), torch.version.cuda)
from hotweights.cuda import devices as cuda_driver
from hotweightsd.loaders import gds
print("hotweights cuda:", cuda_driver.device_count(), "device(s);", cuda_driver.unavailable_reason() or "usable")
print("hotweights gds:", gds.unavailable_reason() or "usable", "| cuFile library:", gds.library_reason() or "loads")
PY

rc_tests=0
if [ -z "${SKIP_TESTS:-}" ]; then
  log "GPU tests (time box ${TESTS_TIMEOUT}s)"
  timeout "$TESTS_TIMEOUT" python3 -m pytest -m gpu -q -rps -p no:cacheprovider tests/gpu ${PYTEST_ARGS:-} 2>&1 \
    | tee "$OUT/gpu-tests.log"
  rc_tests=${PIPESTATUS[0]}
  log "GPU tests exit code $rc_tests"
fi
# stage LOG TIMEBOX SCRIPT ARGS...: one benchmark script, time-boxed, its output to $OUT/LOG; sets $rc.
stage() {
  local logname=$1 box=$2 script=$3
  shift 3
  timeout --signal=TERM --kill-after=10 "$box" python3 "$script" --out "$OUT" --out benchmarks/results "$@" 2>&1 \
    | tee "$OUT/$logname"
  rc=${PIPESTATUS[0]}
}

rc_sweep=0
if [ -n "${SWEEP:-}" ]; then
  left=$((TOTAL - SECONDS))
  sweep_budget="${SWEEP_BUDGET:-$((left - 60))}"
  log "settings sweep (budget ${sweep_budget}s)"
  stage sweep.log "$((sweep_budget + 60))" benchmarks/sweep_bounce.py --budget "$sweep_budget" ${SWEEP_ARGS:-}
  rc_sweep=$rc
  log "sweep exit code $rc_sweep"
fi
if [ -n "${AB:-}" ]; then
  log "A/B of settings (time box ${AB_TIMEOUT:-150}s)"
  stage ab.log "${AB_TIMEOUT:-150}" benchmarks/ab_settings.py ${AB_ARGS:-}
  log "A/B exit code $rc"
  rc_sweep=$(( rc_sweep != 0 ? rc_sweep : rc ))
fi
if [ -z "${SKIP_FF:-}" ]; then
  log "first forward of a fresh serving process (time box ${FF_TIMEOUT:-360}s)"
  stage first-forward.log "${FF_TIMEOUT:-360}" benchmarks/bench_first_forward.py ${FF_ARGS:-}
  log "first forward exit code $rc"
  rc_sweep=$(( rc_sweep != 0 ? rc_sweep : rc ))
fi
if [ -n "${SKIP_BENCH:-}" ]; then
  exit $(( rc_tests != 0 ? rc_tests : rc_sweep ))
fi

left=$((TOTAL - SECONDS))
budget=$((left - 100))
if [ "$budget" -lt 60 ]; then
  log "only ${left}s left: running the benchmark with a ${budget}s budget anyway"
  budget=60
fi
if [ -n "${COLD:-}" ]; then
  log "cold and partly cached loads (budget ${budget}s, time box $((left - 10))s)"
  stage cold.log "$((left - 10))" benchmarks/bench_cold.py --budget "$budget" ${COLD_ARGS:-}
elif [ -n "${NODE:-}" ]; then
  log "node benchmark, $(nvidia-smi -L 2>/dev/null | wc -l) GPU(s) (budget ${budget}s, time box $((left - 10))s)"
  stage node.log "$((left - 10))" benchmarks/bench_node.py --budget "$budget" ${NODE_ARGS:-}
else
  log "benchmark (budget ${budget}s, time box $((left - 10))s)"
  stage bench.log "$((left - 10))" benchmarks/bench_load.py --budget "$budget" ${BENCH_ARGS:-}
fi
rc_bench=$rc
log "benchmark exit code $rc_bench; total ${SECONDS}s"
ls -la "$OUT" | tee -a "$OUT/session.log"
exit $(( rc_tests != 0 ? rc_tests : rc_bench ))
