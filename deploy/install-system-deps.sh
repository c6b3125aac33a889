#!/usr/bin/env bash
# System packages the tests use beyond Python: g++ (CPU kernels), clang-14 + libomp-14-dev
# (the ThreadSanitizer/Archer race-detector build), kcat (third-party Kafka producer),
# a JDK and Maven (the Kafka broker).  Installs only what is missing; needs root for apt.
set -euo pipefail

missing=()
command -v g++ >/dev/null || missing+=(g++)
command -v clang++-14 >/dev/null || missing+=(clang-14)
[ -e /usr/lib/llvm-14/lib/libarcher.so ] || missing+=(libomp-14-dev)
command -v kcat >/dev/null || missing+=(kcat)
command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || missing+=(maven)

if [ ${#missing[@]} -eq 0 ]; then
    echo "system packages: all present"
    exit 0
fi
echo "system packages: installing ${missing[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null; then SUDO="sudo"; else
        echo "need root to apt-get install ${missing[*]}; install them and rerun" >&2
        exit 1
    fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -q "${missing[@]}" || { $SUDO apt-get update -q && $SUDO apt-get install -y -q "${missing[@]}"; }
