#!/usr/bin/env bash
# CI's Docker stage: build the project's image in both install profiles and run docker-compose.yml's
# stack end to end (tests/docker/test_docker_compose.py). scripts/test runs it at the end of a full run.
#
#   1. a Docker engine: the one already running, or else one started here (apt-get installs
#      docker.io, docker-compose, debootstrap and iptables when missing; dockerd runs with its own
#      data root, socket and PID, and is stopped by that PID at the end);
#   2. the base images, built locally because these machines reach no image registry: Debian
#      bookworm debootstrapped from the host's apt mirror (Python 3.11 and its headers, pip, venv), plus the host's
#      extra CA certificates (.ci/images/python.Dockerfile) and Label Studio 1.23.2 on top of it
#      (.ci/images/label-studio.Dockerfile) standing in for heartexlabs/label-studio;
#   3. `docker build` of the project's Dockerfile, PROFILE=molmo2 and PROFILE=molmo1, FROM that base
#      (the PYTHON_IMAGE build argument);
#   4. pytest tests/docker/test_docker_compose.py: each profile's image run, and the compose stack without
#      its GPU reservation driven through Label Studio in both token modes (the test does `up` and
#      `down -v` itself); tests/docker/test_docker_files.py again, now with a compose client; no skips;
#   5. clean-up: whatever the tests left of their compose projects; an engine started here is
#      stopped by its PID and its data root removed (an engine that was running keeps the images).
#
# Where it cannot run (no root, no apt-get, no Debian mirror) it says so and exits 3, unless the
# stage is required (CI=true or MOLMO_REQUIRE_DOCKER=1, which .ci/run sets): then that is a failure
# (exit 1). MOLMO_SKIP_DOCKER=1 leaves the stage out on purpose (said, exit 3; refused when required).
# The private engine's data (images, build cache: about 9 GB) stays in $STATE for a quicker next
# run; MOLMO_DOCKER_CLEAN=1 removes it at the end (slow on a slow disk: 7.7 min for 9.3 GB here, so
# not done by default; CI machines are fresh each time);
# MOLMO_TEST_PYTHON names the interpreter for pytest (default: .venv, made by scripts/_venv.sh).
# Extra arguments go to pytest. Timings and image sizes are printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

LS_VERSION=1.23.2
BASE_IMAGE=molmo-ci/python:3.11-bookworm-dev  # the stand-in for python:3.11-slim-bookworm
LS_IMAGE="molmo-ci/label-studio:$LS_VERSION"  # the stand-in for heartexlabs/label-studio
STATE="${MOLMO_DOCKER_STATE:-/var/lib/molmo-docker-ci}"  # a private engine's data root
RUN_DIR=/run/molmo-docker-ci                  # its socket, pid file and exec root
SUITE=bookworm

required=0
if [ "${CI:-}" = "true" ] || [ "${MOLMO_REQUIRE_DOCKER:-0}" = "1" ]; then required=1; fi

say() { echo "docker-ci: $*" >&2; }
not_run() {
  if [ "$required" = 1 ]; then
    say "FAILED: the Docker stage is required here (CI=true or MOLMO_REQUIRE_DOCKER=1) but cannot run: $*"
    exit 1
  fi
  say "the Docker stage did NOT run: $*"
  say "(it needs root, apt-get and a Debian mirror: CI has them; run .ci/docker.sh there or as root)"
  exit 3
}

if [ "${MOLMO_SKIP_DOCKER:-0}" = "1" ]; then
  [ "$required" = 1 ] && { say "FAILED: MOLMO_SKIP_DOCKER=1, but the Docker stage is required here"; exit 1; }
  say "the Docker stage did NOT run: MOLMO_SKIP_DOCKER=1"
  exit 3
fi
[ "$(id -u)" = 0 ] || not_run "not root (installing the engine, dockerd and debootstrap need it)"
command -v apt-get >/dev/null || not_run "no apt-get on this machine"

# -- timings ----------------------------------------------------------------------------------------
declare -a TIMINGS=()
stage_start=$(date +%s)
T0=0
begin() { T0=$(date +%s); say "[$1] ..."; }                     # begin NAME
end() { local s=$(( $(date +%s) - T0 )); TIMINGS+=("$1=${s}s"); say "[$1] done in $s s"; }
timed() { begin "$1"; "${@:2}"; end "$1"; }  # timed NAME COMMAND...: a failure ends the script

# -- 1. the engine ----------------------------------------------------------------------------------
install_engine() {
  local missing=()
  command -v dockerd >/dev/null || missing+=(docker.io)
  command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || missing+=(docker-compose)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v iptables >/dev/null || missing+=(iptables)
  [ "${#missing[@]}" -eq 0 ] && return 0
  say "apt-get install ${missing[*]}"
  apt-get update -q >"$WORK/apt.log" 2>&1 \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" \
      >>"$WORK/apt.log" 2>&1 \
    || { tail -20 "$WORK/apt.log" >&2; not_run "apt-get could not install ${missing[*]}"; }
}

# the MTU of the interface that carries the default route: the engine's bridge must not exceed it
# (1400 on these machines; a larger one stalls TLS downloads inside `docker build`)
host_mtu() {
  local iface
  iface=$(awk '$2 == "00000000" { print $1; exit }' /proc/net/route 2>/dev/null || true)
  cat "/sys/class/net/${iface:-none}/mtu" 2>/dev/null || echo 1500
}

DOCKERD_PID=
OWN_ENGINE=0
start_engine() {
  if docker info >/dev/null 2>&1; then
    say "using the Docker engine already running ($(docker info --format '{{.ServerVersion}}'))"
    return 0
  fi
  mkdir -p "$STATE" "$RUN_DIR"
  local mtu
  mtu=$(host_mtu)
  /usr/sbin/dockerd --data-root "$STATE" --exec-root "$RUN_DIR/exec" --pidfile "$RUN_DIR/dockerd.pid" \
    --host "unix://$RUN_DIR/docker.sock" --mtu "$mtu" >"$RUN_DIR/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  OWN_ENGINE=1
  export DOCKER_HOST="unix://$RUN_DIR/docker.sock"
  local deadline=$(( $(date +%s) + 60 ))
  until docker info >/dev/null 2>&1; do
    if ! kill -0 "$DOCKERD_PID" 2>/dev/null; then
      tail -20 "$RUN_DIR/dockerd.log" >&2
      not_run "dockerd exited at start (log above)"
    fi
    [ "$(date +%s)" -lt "$deadline" ] || { tail -20 "$RUN_DIR/dockerd.log" >&2; not_run "dockerd did not answer within 60 s"; }
    sleep 0.5
  done
  say "started dockerd $(docker info --format '{{.ServerVersion}}') (PID $DOCKERD_PID, MTU $mtu, data in $STATE)"
}

cleanup() {
  local rc=$?
  set +e
  begin cleanup
  if docker info >/dev/null 2>&1; then
    # whatever a failed or interrupted test left: this stage's compose projects only
    local left
    left=$(docker ps -aq --filter "label=com.docker.compose.project" --filter "name=molmo-ci-")
    [ -n "$left" ] && docker rm -f -v $left >/dev/null
    docker volume ls -q --filter "name=molmo-ci-" | xargs -r docker volume rm >/dev/null
    docker network ls -q --filter "name=molmo-ci-" | xargs -r docker network rm >/dev/null
  fi
  if [ "$OWN_ENGINE" = 1 ] && [ -n "$DOCKERD_PID" ]; then
    # images replaced by this run's builds go; the rest stays as the next run's build cache
    docker image prune -f >/dev/null
    local kept
    kept=$(docker system df --format '{{.Type}} {{.Size}}' | awk '$1 == "Images" {print $2}')
    say "stopping dockerd (PID $DOCKERD_PID)"
    kill -TERM "$DOCKERD_PID" 2>/dev/null
    timeout 60 tail --pid="$DOCKERD_PID" -f /dev/null || { say "dockerd still up after 60 s: SIGKILL"; kill -KILL "$DOCKERD_PID"; }
    wait "$DOCKERD_PID" 2>/dev/null
    if [ "${MOLMO_DOCKER_CLEAN:-0}" = "1" ]; then
      say "removing the engine's data in $STATE (MOLMO_DOCKER_CLEAN=1)"
      rm -rf "$STATE" "$RUN_DIR"
    else
      say "kept the engine's images ($kept) in $STATE: the next run's build cache" \
        "(remove them with MOLMO_DOCKER_CLEAN=1, or rm -rf $STATE)"
    fi
  elif docker info >/dev/null 2>&1; then
    say "left this stage's images in the running engine: molmo-backend:molmo2, molmo-backend:molmo1, $LS_IMAGE, $BASE_IMAGE"
  fi
  if [ -n "$WATCH_PID" ]; then
    kill "$WATCH_PID" 2>/dev/null
    wait "$WATCH_PID" 2>/dev/null
    say "least free on $(dirname "$STATE")'s disk during the stage: $(sort -n "$WORK/free.log" | head -1 | awk '{printf "%.1f GB", $1 / 1048576}')"
  fi
  [ -n "${WORK:-}" ] && rm -rf "$WORK"
  end cleanup
  TIMINGS+=("stage_total=$(( $(date +%s) - stage_start ))s")
  say "timings: ${TIMINGS[*]}"
  [ -n "${SIZES:-}" ] && say "image sizes: $SIZES"
  case "$rc" in
    0) say "the Docker stage passed" ;;
    3) ;;  # did not run: said where it stopped
    *) say "the Docker stage FAILED (exit $rc)" ;;
  esac
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# -- 2. the base images -----------------------------------------------------------------------------
# The Debian mirror this host's apt uses for $SUITE (deb822 .sources or one-line sources.list).
debian_mirror() {
  local files=(/etc/apt/sources.list.d/*.sources /etc/apt/sources.list /etc/apt/sources.list.d/*.list)
  awk -v suite="$SUITE" '
    FNR == 1 { uris = ""; suites = "" }
    /^URIs:/ { uris = $2 } /^Suites:/ { suites = $0 }
    /^URIs:|^Suites:/ { if (uris != "" && suites ~ ("[ :]" suite "( |$)") && uris !~ /security/) { print uris; exit } }
    /^$/ { uris = ""; suites = "" }
    /^deb / { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/ && $(i+1) == suite) { print $i; exit } }
  ' "${files[@]}" 2>/dev/null | head -1
}

build_base() {
  local mirror rootfs ctx
  if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    # kept from an earlier run (the private engine's data, or an engine that was running): a new
    # import would be a new base and rebuild every layer above it
    say "reusing $BASE_IMAGE"
    return 0
  fi
  mirror=$(debian_mirror)
  [ -n "$mirror" ] || not_run "no Debian $SUITE mirror in /etc/apt/sources.list*"
  rootfs="$WORK/rootfs"
  say "debootstrap $SUITE from $mirror"
  # libpython3-dev: the official image carries Python's headers (Triton builds against them)
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,libpython3-dev,ca-certificates \
    "$SUITE" "$rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log" >&2; return 1; }
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | docker import -c 'ENV LANG=C.UTF-8' - "molmo-ci/debian:$SUITE" >/dev/null
  rm -rf "$rootfs"
  ctx="$WORK/python-base"
  mkdir -p "$ctx/ca-certificates"
  cp .ci/images/python.Dockerfile "$ctx/Dockerfile"
  # the host's own CAs (these machines' TLS proxy signs with one of them)
  find /usr/local/share/ca-certificates -name '*.crt' -exec cp {} "$ctx/ca-certificates/" \; 2>/dev/null || true
  docker build -q --build-arg "BASE_IMAGE=molmo-ci/debian:$SUITE" -t "$BASE_IMAGE" "$ctx" >/dev/null
}

build_label_studio() {
  local ctx="$WORK/label-studio"
  mkdir -p "$ctx"
  cp .ci/images/label-studio.Dockerfile "$ctx/Dockerfile"
  docker build -q --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "LS_VERSION=$LS_VERSION" \
    -t "$LS_IMAGE" "$ctx" >/dev/null
}

# -- 3. the project's images ------------------------------------------------------------------------
build_backend() {  # build_backend PROFILE
  local log="$WORK/build-$1.log"
  if ! docker build --build-arg "PYTHON_IMAGE=$BASE_IMAGE" --build-arg "PROFILE=$1" \
      -t "molmo-backend:$1" . >"$log" 2>&1; then
    tail -40 "$log" >&2
    return 1
  fi
  grep -E '^Step [0-9]+/' "$log" | tail -1 >&2
}

image_size() { docker image inspect --format '{{.Size}}' "$1" | awk '{ printf "%.2f GB", $1 / 1e9 }'; }

# the least free space on the engine's file system during the stage (builds peak above what stays)
WATCH_PID=
watch_disk() {
  while :; do df -Pk "$(dirname "$STATE")" | awk 'NR==2 {print $4}'; sleep 5; done >"$WORK/free.log"
}

# -- run --------------------------------------------------------------------------------------------
WORK="$(mktemp -d /tmp/molmo-docker-ci.XXXXXX)"
watch_disk &
WATCH_PID=$!
export DOCKER_BUILDKIT=0  # BuildKit would pull its frontend from Docker Hub; the classic builder needs nothing
say "$(df -Ph / | awk 'NR==2 {print $4}') free on /, $(df -Ph "$(dirname "$STATE")" | awk 'NR==2 {print $4}') where the engine keeps its data"
timed install install_engine
timed engine start_engine
timed base_image build_base
timed build_molmo2 build_backend molmo2
timed build_molmo1 build_backend molmo1
timed build_label_studio build_label_studio
SIZES="molmo-backend:molmo2=$(image_size molmo-backend:molmo2), molmo-backend:molmo1=$(image_size molmo-backend:molmo1), $LS_IMAGE=$(image_size "$LS_IMAGE"), $BASE_IMAGE=$(image_size "$BASE_IMAGE")"
say "image sizes: $SIZES"
say "after the builds: images $(docker system df --format '{{.Type}} {{.Size}}' | awk '$1 == "Images" {print $2}') in all (layers shared), $(df -Ph "$(dirname "$STATE")" | awk 'NR==2 {print $4}') free"

if [ -n "${MOLMO_TEST_PYTHON:-}" ]; then
  python=$MOLMO_TEST_PYTHON  # an interpreter with the test requirements (the default: .venv)
else
  source scripts/_venv.sh
  ensure_venv
  python="$VENV/bin/python"
fi
# tests/docker/test_docker_files.py again too: its compose-client checks skip where no client is installed,
# as in the suite's main run on a fresh CI machine; here the client is installed. Nothing may skip.
status=0
begin e2e
MOLMO_DOCKER_STAGE=1 MOLMO_DOCKER_LS_IMAGE="$LS_IMAGE" \
  "$python" -m pytest -p no:cacheprovider --junitxml="$WORK/docker-tests.xml" \
  tests/docker/test_docker_compose.py tests/docker/test_docker_files.py "$@" || status=$?
end e2e
skipped=$("$python" -c 'import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
print(sum(int(s.get("skipped", 0)) for s in root.iter("testsuite")))' "$WORK/docker-tests.xml" 2>/dev/null) \
  || skipped="an unknown number of"
if [ "$skipped" != 0 ]; then
  say "FAILED: $skipped test(s) skipped in the Docker stage, where every one must run"
  status=1
fi
exit "$status"
