#!/usr/bin/env bash
# Build mmdd-bench's Docker images; tags carry the suite version from pyproject.toml.
#
#   containers/build.sh base     [--python 3.11]              local Debian bookworm base with Python (debootstrap; root)
#   containers/build.sh cpu-test [--base IMAGE] [--python X.Y] CPU test image (runs this machine's venv, mounted read-only)
#   containers/build.sh gpu      [--base IMAGE] [-- DOCKER-BUILD-ARGS...]   the suite's GPU image
#
# Environment: DEBIAN_MIRROR (base), MMDD_BUILD_CA (gpu: a CA bundle pip must trust, e.g. behind a TLS proxy;
# defaults to $PIP_CERT when that file exists). Builds use --network host, so they work with a daemon started
# without a bridge network (dockerd --bridge=none).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
version="$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$repo/pyproject.toml" | head -n1)"
python_version="3.11"
base=""
target="${1:-}"
[ $# -gt 0 ] && shift
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --base) base="$2"; shift 2 ;;
    --python) python_version="$2"; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
base_tag="mmdd-base:bookworm-py${python_version}"

# Legacy builder when the buildx plug-in is missing (Debian's docker.io has none; a plain Dockerfile needs none).
if ! docker buildx version >/dev/null 2>&1; then export DOCKER_BUILDKIT=0; fi

say() { echo "[containers/build.sh] $*" >&2; }

build_base() {
  if [ "$(id -u)" != 0 ]; then say "the local base needs root (debootstrap); or pass --base IMAGE"; exit 1; fi
  command -v debootstrap >/dev/null || { say "debootstrap missing: apt-get install -y debootstrap"; exit 1; }
  local rootfs t0=$SECONDS
  rootfs="$(mktemp -d /tmp/mmdd-rootfs.XXXXXX)"
  trap "rm -rf '$rootfs'" EXIT
  say "debootstrap bookworm with python${python_version} into $rootfs"
  debootstrap --variant=minbase --include="python${python_version}-minimal,libpython${python_version}-stdlib" \
    bookworm "$rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$rootfs.log" 2>&1 \
    || { tail -n 20 "$rootfs.log" >&2; rm -f "$rootfs.log"; exit 1; }
  rm -f "$rootfs.log"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
         "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
  tar --numeric-owner -C "$rootfs" -c . \
    | docker import -c 'ENV LANG=C.UTF-8' -c 'CMD ["/bin/bash"]' -m "debootstrap bookworm minbase" - "$base_tag" >/dev/null
  rm -rf "$rootfs"
  trap - EXIT
  say "built $base_tag in $((SECONDS - t0)) s"
}

build_cpu_test() {
  local from="${base:-$base_tag}" tag="mmdd-bench:${version}-cpu-test" t0=$SECONDS sha
  if [ -z "$base" ] && ! docker image inspect "$base_tag" >/dev/null 2>&1; then build_base; fi
  sha="$(sha256sum "$here/Dockerfile.cpu" | cut -c1-16)"
  docker build -q --network host -f "$here/Dockerfile.cpu" --build-arg "BASE_IMAGE=$from" \
    --build-arg "MMDD_VERSION=$version" --build-arg "PYTHON_VERSION=$python_version" \
    --label "org.mmdd.dockerfile-sha=$sha" -t "$tag" "$here" >&2
  say "built $tag from $from in $((SECONDS - t0)) s"
  echo "$tag"
}

build_gpu() {
  local tag="mmdd-bench:${version}-gpu" ctx ca="${MMDD_BUILD_CA:-${PIP_CERT:-}}" t0=$SECONDS
  [ -f "$repo/README.md" ] || { say "README.md is missing (pyproject.toml's readme): the package cannot build"; exit 1; }
  ctx="$(mktemp -d /tmp/mmdd-context.XXXXXX)"
  trap "rm -rf '$ctx'" EXIT
  mkdir -p "$ctx/containers"
  (cd "$repo" && tar -c --exclude=__pycache__ --exclude='*.pyc' pyproject.toml requirements.lock tools/lockfile.py README.md \
    benchmark methods) | tar -x -C "$ctx"
  cp "$here/Dockerfile.gpu" "$ctx/containers/"
  if [ -n "$ca" ] && [ -f "$ca" ]; then cp "$ca" "$ctx/containers/extra-ca.crt"; fi
  docker build --network host -f "$ctx/containers/Dockerfile.gpu" ${base:+--build-arg "BASE_IMAGE=$base"} \
    --build-arg "MMDD_VERSION=$version" -t "$tag" "${extra[@]}" "$ctx" >&2
  rm -rf "$ctx"
  trap - EXIT
  say "built $tag in $((SECONDS - t0)) s"
  echo "$tag"
}

case "$target" in
  base) build_base ;;
  cpu-test) build_cpu_test ;;
  gpu) build_gpu ;;
  *) sed -n '2,12p' "$0" >&2; exit 2 ;;
esac
