#!/usr/bin/env bash
# A real Apache Kafka broker (single-node KRaft on 127.0.0.1) for development,
# tests and CI, built from the jars Maven Central serves; no tarball, no Docker.
#
# usage:
#   kafka.sh install                      gather the jars into lib/ (once; fast after)
#   kafka.sh start  [PORT]                start a broker (default 9092, controller PORT+1)
#   kafka.sh stop   [PORT|all]            stop it (SIGTERM, then SIGKILL) and delete its data
#   kafka.sh restart [PORT]               stop and start it again, keeping its data
#   kafka.sh status [PORT]                say which brokers run (exit 3 when none / not that one)
#   kafka.sh topic  NAME [PARTITIONS] [PORT]   create a topic (replication factor 1)
#
# Diagnostics go to stderr; stdout carries only answers (start prints the
# bootstrap address as its last line), so scripts can capture them.
#
# Environment: JAVA_HOME (else java on PATH), KAFKA_HEAP_OPTS [-Xms512m -Xmx1g],
# KAFKA_READY_TIMEOUT_S [90], KAFKA_STOP_TIMEOUT_S [30], MAVEN_OPTS (passed to
# mvn by Maven itself, e.g. -Dmaven.repo.local=DIR for a CI cache).
#
# Secured listeners (start only; see docs/kafka.md, "Security"):
#   KAFKA_EXTRA_PROPERTIES=FILE  appended to the broker's server.properties (a later
#       key wins), e.g. listeners that add SASL_SSL://127.0.0.1:Q with their TLS and
#       SASL settings; keep PLAINTEXT://127.0.0.1:PORT and the CONTROLLER listener,
#       which the readiness probe and the controller use.
#   KAFKA_SCRAM_FILE=FILE  one 'SCRAM-SHA-512=[name=USER,password=PASS]' per line
#       (blank lines and '#' comments skipped), each stored at format time
#       (StorageTool format --add-scram): KRaft keeps SCRAM credentials in its metadata.
set -euo pipefail

HERE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
LIB=$HERE/lib
RUN_ROOT=$HERE/run
STAMP=$LIB/.installed
DEFAULT_PORT=9092
READY_TIMEOUT_S=${KAFKA_READY_TIMEOUT_S:-90}
STOP_TIMEOUT_S=${KAFKA_STOP_TIMEOUT_S:-30}
HEAP_OPTS=${KAFKA_HEAP_OPTS:--Xms512m -Xmx1g}
JAVA=${JAVA_HOME:+$JAVA_HOME/bin/}java
# One-shot tools start faster with the C1 compiler only and a small serial heap.
TOOL_JVM_OPTS=(-XX:TieredStopAtLevel=1 -XX:+UseSerialGC -Xmx256m -Xshare:auto
  "-Dlog4j2.configurationFile=$HERE/tools-log4j2.properties")

say() { echo "kafka.sh: $*" >&2; }
die() {
  say "$*"
  exit 1
}

# ---------------------------------------------------------------- install

pom_digest() { sha256sum "$HERE/pom.xml" | cut -d' ' -f1; }

installed() { [[ -f $STAMP && $(<"$STAMP") == "$(pom_digest)" ]]; }

# Jars are copied into a staging folder and renamed into place, so an
# interrupted download never leaves a half-filled lib/ that looks installed;
# the stamp holds the pom's digest, so editing pom.xml triggers a reinstall.
cmd_install() {
  if installed; then
    say "jars already installed ($(find "$LIB" -name '*.jar' | wc -l) in deploy/kafka/lib)"
    return 0
  fi
  command -v mvn >/dev/null || die "mvn not found: install Maven 3.8+ (Debian: apt-get install maven)"
  mkdir -p "$RUN_ROOT"
  (
    flock 9
    if installed; then exit 0; fi
    if [[ -n $(running_ports) ]]; then
      die "pom.xml changed while brokers run on ports: $(running_ports | tr '\n' ' ')- stop them first"
    fi
    local staging
    staging=$(mktemp -d "$RUN_ROOT/lib-staging.XXXXXX")
    trap 'rm -rf "$staging"' EXIT # an interrupted download leaves nothing behind
    say "downloading Kafka jars with Maven (first run only)..."
    local started=$SECONDS
    # Maven 3.8 prints colour resets even in batch mode; strip them from its errors.
    if ! mvn -B -q -f "$HERE/pom.xml" dependency:copy-dependencies -Dkafka.lib.dir="$staging" 2>&1 |
      sed 's/\x1b\[[0-9;]*m//g' >&2; then
      die "mvn dependency:copy-dependencies failed (is Maven Central reachable?)"
    fi
    chmod 755 "$staging" # mktemp made it private; the jars are not
    pom_digest >"$staging/.installed"
    rm -rf "$LIB"
    mv "$staging" "$LIB"
    say "installed $(find "$LIB" -name '*.jar' | wc -l) jars ($(du -sh "$LIB" | cut -f1)) in $((SECONDS - started)) s"
  ) 9>"$RUN_ROOT/install.lock"
}

# ---------------------------------------------------------------- helpers

valid_port() {
  if ! [[ $1 =~ ^[1-9][0-9]{3,4}$ ]] || (($1 < 1024 || $1 > 65534)); then
    die "port must be an integer in 1024..65534 (the controller takes PORT+1), got '$1'"
  fi
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# The pid file alone is not trusted: the pid must still be a JVM running
# kafka.Kafka on this very run folder's properties (pids get reused).
broker_pid() {
  local dir=$RUN_ROOT/$1 pid
  [[ -f $dir/pid ]] || return 1
  pid=$(<"$dir/pid")
  [[ -r /proc/$pid/cmdline ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "kafka.Kafka $dir/server.properties" || return 1
  echo "$pid"
}

running_ports() {
  local dir port
  for dir in "$RUN_ROOT"/*/; do
    [[ -d $dir ]] || continue
    port=$(basename "$dir")
    [[ $port =~ ^[0-9]+$ ]] && broker_pid "$port" >/dev/null && echo "$port"
  done
  return 0
}

# During startup the pid file's process is ours for sure, and its command
# line may not have turned into the JVM's yet (nohup has not exec'd).
launched_alive() { pid_running "$(<"$RUN_ROOT/$1/pid")"; }

# A zombie (exited, not yet reaped by whoever inherited it) is not running.
pid_running() {
  local state
  state=$(awk '/^State:/ {print $2}' "/proc/$1/status" 2>/dev/null) || return 1
  [[ -n $state && $state != Z ]]
}

rss_mib() { awk '/^VmRSS:/ {printf "%d", $2 / 1024}' "/proc/$1/status" 2>/dev/null || echo "?"; }

run_tool() { "$JAVA" "${TOOL_JVM_OPTS[@]}" -cp "$LIB/*" "$@"; }

require_java() {
  command -v "$JAVA" >/dev/null || die "java not found: install a JDK 17+ (Debian: apt-get install openjdk-17-jre-headless) or set JAVA_HOME"
  local major
  major=$("$JAVA" -XshowSettings:properties -version 2>&1 | awk -F'= ' '/java.specification.version/ {print $2}')
  ((${major%%.*} >= 17)) || die "Kafka 4 needs Java 17 or newer; $JAVA is Java $major"
}

# A Kafka Uuid is 16 random bytes in URL-safe base64 without padding; Kafka
# itself never hands out one that starts with '-', as it reads like an option.
new_cluster_id() {
  local id
  while :; do
    id=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')
    [[ $id == -* ]] || break
  done
  echo "$id"
}

write_properties() {
  local port=$1 ctl=$2 data=$3
  cat <<EOF
# Written by deploy/kafka/kafka.sh for one throwaway single-node broker.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$ctl
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$ctl
advertised.listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$ctl
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$data

# One node: every internal topic has one replica and needs one in sync.
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1

# Fast tests: one partition per internal topic, no wait before the first rebalance.
offsets.topic.num.partitions=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.num.partitions=1
group.initial.rebalance.delay.ms=0

# Topics are created on purpose, with their partition count (kafka.sh topic,
# tests/kafka_broker.py create_topic); a typo must not create a topic.
auto.create.topics.enable=false
num.partitions=1

# Large messages: a batch of NDJSON events may be several MB in one message.
message.max.bytes=10485760
replica.fetch.max.bytes=10485760

# A 2-core machine does not need Kafka's server-sized thread pools.
num.network.threads=2
num.io.threads=4
EOF
}

fail_start() {
  local port=$1 why=$2 dir=$RUN_ROOT/$1 pid
  say "broker on port $port did not come up: $why"
  say "---- last 60 lines of deploy/kafka/run/$port/broker.log ----"
  tail -n 60 "$dir/broker.log" >&2 || true
  say "---- end of log (the run folder is kept for inspection; 'kafka.sh stop $port' deletes it)"
  if [[ -f $dir/pid ]] && launched_alive "$port"; then kill -KILL "$(<"$dir/pid")" 2>/dev/null || true; fi
  exit 1
}

# Ready means: the port accepts connections, then an admin metadata call
# (list topics) answers, which only happens once the broker has registered
# with its controller and serves requests.
wait_ready() {
  local port=$1 deadline=$((SECONDS + READY_TIMEOUT_S)) left
  until port_open "$port"; do
    launched_alive "$port" || fail_start "$port" "the JVM exited"
    ((SECONDS < deadline)) || fail_start "$port" "port $port not open after ${READY_TIMEOUT_S} s"
    sleep 0.2
  done
  until
    left=$((deadline - SECONDS))
    ((left > 0)) && timeout "$left" "$JAVA" "${TOOL_JVM_OPTS[@]}" -cp "$LIB/*" \
      org.apache.kafka.tools.TopicCommand --bootstrap-server "127.0.0.1:$port" --list \
      --command-config "$RUN_ROOT/$port/admin.properties" >/dev/null 2>>"$RUN_ROOT/$port/probe.log"
  do
    launched_alive "$port" || fail_start "$port" "the JVM exited"
    ((SECONDS < deadline)) || fail_start "$port" "no answer to a metadata request after ${READY_TIMEOUT_S} s"
    sleep 0.5
  done
}

# ---------------------------------------------------------------- start / stop / status

cmd_start() {
  local port=${1:-$DEFAULT_PORT}
  valid_port "$port"
  local ctl=$((port + 1)) dir=$RUN_ROOT/$port pid data started
  cmd_install
  require_java
  if pid=$(broker_pid "$port"); then
    say "already running on port $port (pid $pid)"
    echo "127.0.0.1:$port"
    return 0
  fi
  ! port_open "$port" || die "127.0.0.1:$port is taken by another process; pick another port"
  ! port_open "$ctl" || die "127.0.0.1:$ctl (the controller port, PORT+1) is taken by another process; pick another port"
  local var
  for var in KAFKA_EXTRA_PROPERTIES KAFKA_SCRAM_FILE; do
    [[ -z ${!var:-} || -r ${!var} ]] || die "$var: cannot read '${!var}'"
  done

  started=$SECONDS
  rm -rf "$dir"
  mkdir -p "$dir"
  data=$(mktemp -d "$dir/data.XXXXXX")
  write_properties "$port" "$ctl" "$data" >"$dir/server.properties"
  if [[ -n ${KAFKA_EXTRA_PROPERTIES:-} ]]; then
    {
      echo
      echo "# From KAFKA_EXTRA_PROPERTIES ($KAFKA_EXTRA_PROPERTIES); a later key wins."
      cat "$KAFKA_EXTRA_PROPERTIES"
    } >>"$dir/server.properties"
  fi
  printf 'request.timeout.ms=5000\ndefault.api.timeout.ms=10000\n' >"$dir/admin.properties"

  local format_args=() line
  if [[ -n ${KAFKA_SCRAM_FILE:-} ]]; then
    while IFS= read -r line || [[ -n $line ]]; do
      [[ $line =~ ^[[:space:]]*(#|$) ]] && continue
      format_args+=(--add-scram "$line")
    done <"$KAFKA_SCRAM_FILE"
  fi
  # The credentials go on the tool's command line (a local, throwaway broker) but never
  # into a log: only the count is reported.
  run_tool kafka.tools.StorageTool format -t "$(new_cluster_id)" -c "$dir/server.properties" \
    --standalone "${format_args[@]}" >>"$dir/broker.log" 2>&1 ||
    fail_start "$port" "formatting the log dir failed"
  ((${#format_args[@]} == 0)) || say "stored $((${#format_args[@]} / 2)) SCRAM credential(s) at format time"

  launch "$port"
  wait_ready "$port"
  report_ready "$port" "$started"
}

# Restarting keeps the data folder: topics, messages and committed offsets
# must survive, as they do when a real broker restarts.
cmd_restart() {
  local port=${1:-$DEFAULT_PORT} started=$SECONDS
  valid_port "$port"
  [[ -f $RUN_ROOT/$port/server.properties ]] || die "no broker was started on port $port: use 'kafka.sh start $port'"
  require_java
  terminate "$port"
  ! port_open "$port" || die "127.0.0.1:$port is still taken after the broker stopped"
  echo "---- restart ----" >>"$RUN_ROOT/$port/broker.log"
  launch "$port"
  wait_ready "$port"
  report_ready "$port" "$started"
}

launch() {
  local port=$1 dir=$RUN_ROOT/$1
  # stdin from /dev/null and both outputs to the log: the JVM must hold none
  # of the caller's pipes, or a caller capturing our output would never see EOF.
  # shellcheck disable=SC2086  # HEAP_OPTS is a list of JVM flags
  nohup "$JAVA" $HEAP_OPTS -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent \
    -Djava.awt.headless=true "-Dlog4j2.configurationFile=$HERE/log4j2.properties" \
    -cp "$LIB/*" kafka.Kafka "$dir/server.properties" \
    </dev/null >>"$dir/broker.log" 2>&1 &
  echo $! >"$dir/pid"
}

report_ready() {
  local port=$1 started=$2 pid
  pid=$(broker_pid "$port")
  say "ready on port $port in $((SECONDS - started)) s (pid $pid, RSS $(rss_mib "$pid") MiB, log deploy/kafka/run/$port/broker.log)"
  echo "127.0.0.1:$port"
}

# SIGTERM lets the broker shut down cleanly (flush, close the log); SIGKILL
# only after KAFKA_STOP_TIMEOUT_S.
terminate() {
  local port=$1 pid waited=0
  if pid=$(broker_pid "$port"); then
    kill -TERM "$pid" 2>/dev/null || true
    while pid_running "$pid" && ((waited < STOP_TIMEOUT_S * 5)); do
      sleep 0.2
      waited=$((waited + 1))
    done
    if pid_running "$pid"; then
      say "port $port: no exit ${STOP_TIMEOUT_S} s after SIGTERM, sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      while pid_running "$pid"; do sleep 0.1; done
    fi
    say "stopped the broker on port $port (pid $pid)"
  fi
}

stop_one() {
  local port=$1
  [[ -d $RUN_ROOT/$port ]] || {
    say "no broker on port $port"
    return 0
  }
  terminate "$port"
  rm -rf "${RUN_ROOT:?}/$port"
}

cmd_stop() {
  local target=${1:-$DEFAULT_PORT} dir
  if [[ $target == all ]]; then
    for dir in "$RUN_ROOT"/*/; do
      [[ -d $dir && $(basename "$dir") =~ ^[0-9]+$ ]] && stop_one "$(basename "$dir")"
    done
    return 0
  fi
  valid_port "$target"
  stop_one "$target"
}

cmd_status() {
  local ports pid port
  if [[ $# -gt 0 ]]; then
    valid_port "$1"
    ports=$1
  else
    ports=$(running_ports)
  fi
  [[ -n $ports ]] || {
    echo "no broker running"
    return 3
  }
  for port in $ports; do
    if pid=$(broker_pid "$port"); then
      echo "running: bootstrap 127.0.0.1:$port, controller 127.0.0.1:$((port + 1)), pid $pid, RSS $(rss_mib "$pid") MiB"
    else
      echo "not running on port $port"
      return 3
    fi
  done
}

cmd_topic() {
  [[ $# -ge 1 ]] || die "usage: kafka.sh topic NAME [PARTITIONS] [PORT]"
  local name=$1 partitions=${2:-1} port=${3:-$DEFAULT_PORT}
  [[ $partitions =~ ^[1-9][0-9]*$ ]] || die "PARTITIONS must be a positive integer, got '$partitions'"
  valid_port "$port"
  installed || die "jars not installed: run 'kafka.sh install'"
  run_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "127.0.0.1:$port" --create \
    --if-not-exists --topic "$name" --partitions "$partitions" --replication-factor 1
  echo "$name"
}

main() {
  local cmd=${1:-}
  shift || true
  case $cmd in
  install) cmd_install ;;
  start) cmd_start "$@" ;;
  stop) cmd_stop "$@" ;;
  restart) cmd_restart "$@" ;;
  status) cmd_status "$@" ;;
  topic) cmd_topic "$@" ;;
  *)
    sed -n '5,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
  esac
}

main "$@"
