#!/usr/bin/env bash
# Long GPU jobs across device calls: one call is limited to 10 minutes, a job started in its own
# process session (setsid) runs on until the lent machine goes back, and the next call waits on it.
#
#   bash benchmarks/gpu_bg.sh start NAME 'COMMAND'   # start COMMAND in the background, log /root/jobs/NAME.log
#   bash benchmarks/gpu_bg.sh wait SECONDS [FILE...] # wait until every job ended or SECONDS passed;
#                                                   # copy the logs and FILEs (that exist) to $OUT
#   bash benchmarks/gpu_bg.sh kill NAME
#
# A job's exit status lands in /root/jobs/NAME.rc. Keep the calls back to back: the machine goes
# back after 30 s without a call (docs/results.md says how the recipe runs were made).
set -uo pipefail
jobs_dir=${DBLLM_JOBS_DIR:-/root/jobs}
mkdir -p "$jobs_dir"
cmd=${1:?start, wait or kill}; shift
case "$cmd" in
  start)
    name=$1; shift
    rm -f "$jobs_dir/$name.rc"
    setsid nohup bash -c "cd '$PWD'; export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1; ( $1 ); echo \$? > '$jobs_dir/$name.rc'" \
      > "$jobs_dir/$name.log" 2>&1 < /dev/null &
    echo $! > "$jobs_dir/$name.pid"
    echo "started $name (pid $(cat "$jobs_dir/$name.pid")), log $jobs_dir/$name.log"
    ;;
  wait)
    limit=$1; shift
    t0=$(date +%s)
    while :; do
      running=0
      for pid_file in "$jobs_dir"/*.pid; do
        [ -e "$pid_file" ] || continue
        name=$(basename "$pid_file" .pid)
        [ -e "$jobs_dir/$name.rc" ] || running=$((running + 1))
      done
      [ "$running" -eq 0 ] && break
      [ $(( $(date +%s) - t0 )) -ge "$limit" ] && break
      sleep 5
    done
    for pid_file in "$jobs_dir"/*.pid; do
      [ -e "$pid_file" ] || continue
      name=$(basename "$pid_file" .pid)
      status=running; [ -e "$jobs_dir/$name.rc" ] && status="exit $(cat "$jobs_dir/$name.rc")"
      echo "== $name: $status"
      tail -c 2500 "$jobs_dir/$name.log" | tr '\r' '\n' | grep -v '^\s*$' | tail -12
      [ -n "${OUT:-}" ] && cp "$jobs_dir/$name.log" "$OUT/$name.log"
    done
    for f in "$@"; do
      [ -e "$f" ] && [ -n "${OUT:-}" ] && cp "$f" "$OUT/$(basename "$(dirname "$f")")_$(basename "$f")"
    done
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null
    ;;
  kill)
    kill -- -"$(cat "$jobs_dir/$1.pid")" 2>/dev/null && echo "killed $1"
    ;;
  *) echo "unknown command $cmd" >&2; exit 2 ;;
esac
