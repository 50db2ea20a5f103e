#!/usr/bin/env bash
# Docker engine for the container tests on a CI machine: install Debian's docker.io (and debootstrap, for the local
# base image) when missing, start dockerd in the background, wait until it answers, then build the CPU test image
# (containers/build.sh cpu-test). Always exits 0: when a step fails it says why, and the container tests skip.
set -uo pipefail
cd "$(dirname "$0")/.."
say() { echo "[docker-setup] $*" >&2; }
LOG="${DOCKERD_LOG:-/tmp/mmdd-dockerd.log}"

install() {
  command -v dockerd >/dev/null && command -v docker >/dev/null && command -v debootstrap >/dev/null && return 0
  [ "$(id -u)" = 0 ] || { say "not root: cannot apt-get install docker.io debootstrap"; return 1; }
  export DEBIAN_FRONTEND=noninteractive
  local pkgs=(docker.io debootstrap)
  apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/tmp/mmdd-apt.log 2>&1 \
    || { apt-get update -qq >>/tmp/mmdd-apt.log 2>&1 && apt-get install -y -qq --no-install-recommends "${pkgs[@]}" \
         >>/tmp/mmdd-apt.log 2>&1; } \
    || { say "apt-get install ${pkgs[*]} failed:"; tail -n 5 /tmp/mmdd-apt.log >&2; return 1; }
}

start() {
  docker info >/dev/null 2>&1 && { say "dockerd already running"; return 0; }
  [ "$(id -u)" = 0 ] || { say "not root: cannot start dockerd"; return 1; }
  # No iptables and no bridge: builds use --network host, method containers --network none.
  setsid nohup dockerd --iptables=false --bridge=none >"$LOG" 2>&1 < /dev/null &
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  say "dockerd did not answer within 30 s; last log lines:"; tail -n 15 "$LOG" >&2
  return 1
}

t0=$SECONDS
if install && start && containers/build.sh cpu-test >/dev/null; then
  say "Docker ready and CPU test image built in $((SECONDS - t0)) s"
else
  say "Docker is unavailable after $((SECONDS - t0)) s; the container tests will be skipped"
fi
exit 0
