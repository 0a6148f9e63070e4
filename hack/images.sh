#!/usr/bin/env bash
# Builds both images from their Dockerfiles, the ones users build:
#
#   hack/images.sh [--optional] [operator|server]...       (make images, make test)
#
# With docker when there is one, else podman. Base images are build arguments
# (PYTHON_IMAGE for both); unset, the official one is used, pulled when it is not here.
# Where no registry answers (or with IMAGEGEN_LOCAL_BASE=1) the Python base is made
# locally from Debian packages instead (mmdebstrap + import), for machines that reach
# Debian's mirrors and PyPI but no image registry. Prints one line per image: name,
# size, seconds.
#
# --optional (make test): without a container engine, say so and build nothing; the
# image tests then report themselves skipped. IMAGEGEN_INSTALL_ENGINE=1 (CI) first
# installs podman from Debian's packages where there is none and apt-get may run.
set -euo pipefail
# Errors inside $(...) stop the script too (bash leaves -e off there by default).
shopt -s inherit_errexit
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
tag=${IMAGEGEN_IMAGE_TAG:-dev}
optional=0
if [ "${1:-}" = --optional ]; then optional=1; shift; fi
wanted=("$@")
[ ${#wanted[@]} -gt 0 ] || wanted=(operator server)
log() { echo "[images] $*" >&2; }

# What rootful podman needs on Debian; runc because crun wants a cgroup layout some
# sandboxes lack, mmdebstrap and Debian's keyring for the local base.
PODMAN_PACKAGES=(podman buildah runc uidmap fuse-overlayfs mmdebstrap debian-archive-keyring)
install_podman() {
  [ "${IMAGEGEN_INSTALL_ENGINE:-0}" = 1 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
    || return 1
  log "installing ${PODMAN_PACKAGES[*]} from Debian's packages"
  local apt=(apt-get -o DPkg::Lock::Timeout=600 -y -q)  # an apt run at boot may hold the lock
  # `update` takes the lists' lock without waiting (the timeout above is dpkg's only).
  update() { for _ in $(seq 40); do "${apt[@]}" update >&2 && return 0; sleep 15; done; return 1; }
  DEBIAN_FRONTEND=noninteractive "${apt[@]}" install --no-install-recommends \
    "${PODMAN_PACKAGES[@]}" >&2 \
    || { update && DEBIAN_FRONTEND=noninteractive "${apt[@]}" install \
         --no-install-recommends "${PODMAN_PACKAGES[@]}" >&2; }
}

engine=${CONTAINER_ENGINE:-}
if [ -z "$engine" ]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then engine=docker
  elif command -v podman >/dev/null || install_podman; then engine=podman
  elif [ $optional = 1 ] && [ "${IMAGEGEN_REQUIRE_IMAGES:-0}" != 1 ]; then
    log "neither docker nor podman: no images built, the image tests will be skipped"
    exit 0
  else echo "images: neither docker nor podman found" >&2; exit 2
  fi
fi

build_args=()
if [ "$engine" = podman ]; then
  # Settings of our own, so nothing global changes: runc (crun needs a cgroup layout some
  # sandboxes lack), cgroupfs, file events, and ulimits a sandbox lets us keep.
  conf_dir=${XDG_CACHE_HOME:-$HOME/.cache}/imagegen-operator/podman
  mkdir -p "$conf_dir"
  cat > "$conf_dir/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
  export CONTAINERS_CONF="$conf_dir/containers.conf"
  build_args+=(--network host)
fi
# An intercepting proxy's CA, when the host has one for pip: mounted for the build's
# RUN steps only, never copied into an image.
if [ -f /etc/pip.conf ] && [ "$engine" = podman ]; then
  build_args+=(-v /etc/pip.conf:/etc/pip.conf:ro)
  ca=$(sed -n 's/^cert *= *//p' /etc/pip.conf | head -1)
  [ -z "$ca" ] || [ ! -f "$ca" ] || build_args+=(-v "$ca:$ca:ro")
fi

local_base() {
  # python3 from Debian bookworm: what python:3.x-slim-bookworm is, made from packages.
  local name=localhost/imagegen-python:bookworm
  if $engine image inspect "$name" >/dev/null 2>&1; then echo "$name"; return; fi
  command -v mmdebstrap >/dev/null || install_podman \
    || { echo "images: no registry answers and mmdebstrap is missing for a local base" >&2; exit 2; }
  log "making $name from Debian packages (mmdebstrap)"
  local tarball
  tarball=$(mktemp --suffix=.tar)
  mmdebstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
    bookworm "$tarball" >&2
  $engine import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' "$tarball" "$name" >&2
  rm -f "$tarball"
  echo "$name"
}

# The Dockerfiles' default base, read from them so it is stated once.
default_base() {
  sed -n "s/^ARG $2=//p" "$1" | head -1
}

# Local base when asked, or when the default base is neither here nor pullable.
use_local_base() {
  [ "${IMAGEGEN_LOCAL_BASE:-0}" = 1 ] && return 0
  [ -z "${!2:-}" ] || return 1
  local base
  base=$(default_base "$1" "$2")
  $engine image inspect "$base" >/dev/null 2>&1 && return 1
  if $engine pull "$base" >&2; then return 1; fi
  log "$base cannot be pulled: using a Python base made from Debian packages"
}

build() {  # name dockerfile base-arg
  local name=$1 dockerfile=$2 base_arg=$3 args=("${build_args[@]}")
  if use_local_base "$dockerfile" "$base_arg"; then
    args+=(--build-arg "$base_arg=$(local_base)")
    [ "$engine" = podman ] && args+=(--pull=never)
  elif [ -n "${!base_arg:-}" ]; then
    args+=(--build-arg "$base_arg=${!base_arg}")
  fi
  local start=$SECONDS previous
  previous=$($engine image inspect "$name:$tag" --format '{{.Id}}' 2>/dev/null || true)
  log "building $name:$tag from $dockerfile with $engine"
  $engine build "${args[@]}" -f "$dockerfile" -t "$name:$tag" . >&2
  # The image this tag named before is left untagged: gigabytes for the server. Drop it
  # (and only it) unless something else still uses it.
  if [ -n "$previous" ] && [ "$previous" != "$($engine image inspect "$name:$tag" --format '{{.Id}}')" ]; then
    $engine rmi "$previous" >/dev/null 2>&1 || true
  fi
  local size
  size=$($engine image inspect "$name:$tag" --format '{{.Size}}')
  echo "$name:$tag $((size / 1000000))MB $((SECONDS - start))s"
}

for image in "${wanted[@]}"; do
  case $image in
    operator) build localhost/imagegen-operator operator/Dockerfile PYTHON_IMAGE ;;
    server) build localhost/imagegen-server inference_image/Dockerfile PYTHON_IMAGE ;;
    *) echo "images: unknown image $image (operator or server)" >&2; exit 2 ;;
  esac
done
