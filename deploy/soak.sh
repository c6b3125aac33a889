#!/usr/bin/env bash
# Kill -9 soak of the Kafka path (SPEC §2.7): the tables after many crashes and restarts
# must equal those of one uninterrupted run.
#
# usage: deploy/soak.sh [--kills N] [--events N] [--partitions P] [--seed S]
#                       [--batch-size N] [--checkpoint-interval DUR] [--max-delay SECONDS]
#                       [--work DIR] [--keep]
#
# 1. generates --events synthetic events into a fresh topic of --partitions partitions;
# 2. runs `gpu-pipeline run --until-idle` on it once, uninterrupted, into database A;
# 3. starts the same job into database B again and again, each time kill -9'ing it after a
#    random delay in [0.1 s, --max-delay] (default: half the uninterrupted run's time), until
#    --kills kills (default 50) have landed on a running process;
# 4. runs the job to completion, then compares every table of A and B: row count and a
#    content hash (sum of cityHash64 of each row as TSV), versioned tables read with FINAL.
# Exit 0 when all tables match, 1 when one differs, 2 on a setup error.
#
# Environment: KAFKA_BOOTSTRAP (a broker to use; else one is started with
# deploy/kafka/kafka.sh on a free port and stopped at exit), GPU_PIPELINE (the command,
# default .venv/bin/gpu-pipeline).
set -euo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
GP=${GPU_PIPELINE:-$ROOT/.venv/bin/gpu-pipeline}
KAFKA_SH=$ROOT/deploy/kafka/kafka.sh
TABLES=(events sessions late_events dead_letters traffic_1m product_5m)
VERSIONED=" traffic_1m product_5m "

KILLS=50 EVENTS=2000000 PARTITIONS=4 SEED=7 BATCH_SIZE=20000 INTERVAL=1s MAX_DELAY="" WORK="" KEEP=0
usage() {
  sed -n '4,6p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
while [[ $# -gt 0 ]]; do
  case $1 in
  --kills) KILLS=$2 ;;
  --events) EVENTS=$2 ;;
  --partitions) PARTITIONS=$2 ;;
  --seed) SEED=$2 ;;
  --batch-size) BATCH_SIZE=$2 ;;
  --checkpoint-interval) INTERVAL=$2 ;;
  --max-delay) MAX_DELAY=$2 ;;
  --work) WORK=$2 ;;
  --keep) KEEP=1 && shift && continue ;;
  *) usage ;;
  esac
  shift 2 || usage
done
for n in KILLS EVENTS PARTITIONS BATCH_SIZE; do
  [[ ${!n} =~ ^[0-9]+$ ]] || { echo "soak: --${n,,} must be a non-negative integer" >&2; exit 2; }
done
[[ -x $GP ]] || { echo "soak: $GP not found; run 'make' first or set GPU_PIPELINE" >&2; exit 2; }

say() { echo "soak: $*" >&2; }
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-pipeline-soak.XXXXXX")}
mkdir -p "$WORK"
STARTED_PORT=""
RUN_PID=""
cleanup() {
  if [[ -n $RUN_PID ]] && kill -0 "$RUN_PID" 2>/dev/null; then kill -9 "$RUN_PID" 2>/dev/null || true; fi
  if [[ -n $STARTED_PORT ]]; then bash "$KAFKA_SH" stop "$STARTED_PORT" >/dev/null 2>&1 || true; fi
  if ((KEEP == 0)); then rm -rf "$WORK"; else say "kept $WORK"; fi
}
trap cleanup EXIT

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if [[ -n ${KAFKA_BOOTSTRAP:-} ]]; then
  BOOTSTRAP=$KAFKA_BOOTSTRAP
else
  for _ in $(seq 100); do
    port=$((20000 + RANDOM % 10000))
    if port_free "$port" && port_free $((port + 1)); then break; fi
  done
  bash "$KAFKA_SH" install
  BOOTSTRAP=$(bash "$KAFKA_SH" start "$port" | tail -1)
  STARTED_PORT=$port
fi

TOPIC=soak-$(date +%s)-$RANDOM
URL=kafka://$BOOTSTRAP/$TOPIC
say "broker $BOOTSTRAP, topic $TOPIC, work dir $WORK"
"$GP" generate --events "$EVENTS" --seed "$SEED" --out "$URL" --partitions "$PARTITIONS"

# One job per database: its own group, checkpoints and embedded ClickHouse.
run_args() {
  local name=$1
  echo --source "$URL" --until-idle --idle-timeout 3s --progress never \
    --group-id "soak-$name-$TOPIC" --sink "chdb://$WORK/$name/clickhouse" \
    --checkpoint-dir "$WORK/$name/checkpoints" --checkpoint-interval "$INTERVAL" \
    --batch-size "$BATCH_SIZE"
}

say "uninterrupted run into $WORK/reference"
started=$(date +%s.%N)
# shellcheck disable=SC2046  # run_args holds no spaces of its own
"$GP" run $(run_args reference) >"$WORK/reference.log" 2>&1 || {
  tail -30 "$WORK/reference.log" >&2
  say "the uninterrupted run failed"
  exit 2
}
reference_s=$(awk -v s="$started" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')
MAX_DELAY=${MAX_DELAY:-$(awk -v r="$reference_s" 'BEGIN { d = r / 2; printf "%.1f", (d < 2 ? 2 : d) }')}
say "uninterrupted run took $reference_s s; kills land 0.1-$MAX_DELAY s after each start"

landed=0 starts=0 completed=0
while ((landed < KILLS)); do
  starts=$((starts + 1))
  # shellcheck disable=SC2046
  "$GP" run $(run_args crashed) >>"$WORK/crashed.log" 2>&1 &
  RUN_PID=$!
  delay=$(awk -v max="$MAX_DELAY" -v r="$RANDOM" 'BEGIN { srand(r); printf "%.2f", 0.1 + rand() * (max - 0.1) }')
  sleep "$delay"
  kill -9 "$RUN_PID" 2>/dev/null || true
  status=0
  wait "$RUN_PID" 2>/dev/null || status=$?
  RUN_PID=""
  if ((status == 137)); then
    landed=$((landed + 1))
    say "kill $landed/$KILLS after $delay s"
  elif ((status == 0)); then
    completed=1
    say "the job completed before kill $((landed + 1)); use more --events for more kills"
    break
  else
    tail -30 "$WORK/crashed.log" >&2
    say "a run exited with status $status on its own"
    exit 1
  fi
done

if ((completed == 0)); then
  say "final run to completion"
  # shellcheck disable=SC2046
  "$GP" run $(run_args crashed) >>"$WORK/crashed.log" 2>&1 || {
    tail -30 "$WORK/crashed.log" >&2
    say "the final run failed"
    exit 1
  }
fi

fingerprint() {
  local name=$1 table=$2 final=""
  [[ $VERSIONED == *" $table "* ]] && final=FINAL
  "$GP" query --sink "chdb://$WORK/$name/clickhouse" --format csv \
    "SELECT count(), sum(cityHash64(formatRow('TSV', *))) FROM clickstream.$table $final" | tail -1
}

mismatches=0
printf '%-14s %-34s %-34s\n' table uninterrupted "after $landed kills" >&2
for table in "${TABLES[@]}"; do
  a=$(fingerprint reference "$table")
  b=$(fingerprint crashed "$table")
  mark=""
  if [[ $a != "$b" ]]; then
    mark="  <-- differs"
    mismatches=$((mismatches + 1))
  fi
  printf '%-14s %-34s %-34s%s\n' "$table" "$a" "$b" "$mark" >&2
done
if ((mismatches)); then
  say "$mismatches table(s) differ after $landed kills in $starts starts"
  KEEP=1
  exit 1
fi
say "all ${#TABLES[@]} tables identical after $landed kills in $starts starts"
