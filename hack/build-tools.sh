#!/usr/bin/env bash
# Builds the pinned local control plane and tools into a cache outside the repo,
# keyed by the pinned versions, and prints the cache directory (its bin/ holds them).
#
#   hack/build-tools.sh              every tool
#   hack/build-tools.sh helm kubectl only those (what a test of one tool needs)
#
# Tools: etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok helm
# kubeconform actionlint promtool. Each is built once; a second call returns at once.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"

all_tools=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok helm kubeconform actionlint promtool)
k8s_cmds=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
wanted=("$@")
[ ${#wanted[@]} -gt 0 ] || wanted=("${all_tools[@]}")
for tool in "${wanted[@]}"; do
  [[ " ${all_tools[*]} " == *" $tool "* ]] || { echo "build-tools: unknown tool $tool (one of: ${all_tools[*]})" >&2; exit 2; }
done

cache_root=${IMAGEGEN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/imagegen-operator}
# The platform and the Go release are in the key too: a cache in a home folder shared
# between machines must not hand an arm64 etcd to an amd64 one. So is this script: its
# flags (the version stamped into the Kubernetes binaries, the stages copied) are part of
# what is built.
key=$( (cat "$here/versions.env" "$here"/k8s/go.* "$here"/etcd/go.* "$here"/etcd/*.go "$here"/k8s/*.go \
            "$here/build-tools.sh"
        go env GOOS GOARCH GOVERSION) | sha256sum | cut -c1-12)
dest="$cache_root/k8s-$K8S_VERSION-$key"
bin="$dest/bin"
mkdir -p "$bin"
# Two callers at once (a test and `make tools`) would build the same thing twice.
exec 9>"$dest/.lock"
flock 9
# Built into a staging folder, moved into bin/ once whole: a build cut short (a killed run)
# leaves no half-written binary that the next run would take for a built one.
stage="$dest/stage.$$"
rm -rf "$stage" && mkdir -p "$stage"
trap 'rm -rf "$stage"' EXIT
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false GOBIN="$stage"
# A module may ask for a newer Go than the one installed (promtool's go.mod says 1.26.7):
# Go then fetches that toolchain through the module proxy, where a packaged Go's default
# (GOTOOLCHAIN=local) would stop the build after the others' minutes.
# A GOTOOLCHAIN the caller set (local, for an offline build) stands.
export GOTOOLCHAIN="${GOTOOLCHAIN_FOR_TOOLS:-${GOTOOLCHAIN:-auto}}"

log() { echo "[build-tools] $*" >&2; }
wants() { [[ " ${wanted[*]} " == *" $1 "* ]]; }
need() { wants "$1" && [ ! -x "$bin/$1" ]; }

if need etcd; then
  log "building etcd $ETCD_VERSION"
  (cd "$here/etcd" && go build -trimpath -o "$stage/etcd" .)
fi

# The Kubernetes commands share most of their packages: one `go build` of all that are
# missing compiles each shared package once instead of once per command.
k8s_missing=()
for cmd in "${k8s_cmds[@]}"; do
  if need "$cmd"; then k8s_missing+=("k8s.io/kubernetes/cmd/$cmd"); fi
done
if [ ${#k8s_missing[@]} -gt 0 ]; then
  k8s_ldflags=""
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    k8s_ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1"
    k8s_ldflags+=" -X $pkg.gitMinor=$(echo "$K8S_VERSION" | cut -d. -f2)"
    k8s_ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  log "building ${k8s_missing[*]##*/} $K8S_VERSION (first time only; several minutes)"
  (cd "$here/k8s" && go build -trimpath -ldflags "-s -w $k8s_ldflags" -o "$stage/" "${k8s_missing[@]}")
fi

if need kwok; then
  log "building kwok $KWOK_VERSION"
  go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
fi
if wants kwok && [ ! -d "$dest/kwok-stages" ]; then
  # KWOK's default node and pod lifecycle stages ship in its module.
  moddir=$(cd "$here/etcd" && go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  rm -rf "$dest/kwok-stages.tmp" && mkdir -p "$dest/kwok-stages.tmp"
  for f in node/fast/node-initialize node/heartbeat-with-lease/node-heartbeat-with-lease \
           pod/fast/pod-ready pod/fast/pod-complete pod/fast/pod-delete; do
    cp "$moddir/kustomize/stage/$f.yaml" "$dest/kwok-stages.tmp/"
  done
  chmod -R u+w "$dest/kwok-stages.tmp" && mv "$dest/kwok-stages.tmp" "$dest/kwok-stages"
fi
if need helm; then
  log "building helm $HELM_VERSION"
  go install -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
fi
if need actionlint; then
  log "building actionlint $ACTIONLINT_VERSION"
  go install -trimpath -ldflags "-s -w" "github.com/rhysd/actionlint/cmd/actionlint@$ACTIONLINT_VERSION"
fi
if need kubeconform; then
  log "building kubeconform $KUBECONFORM_VERSION"
  go install -trimpath -ldflags "-s -w" "github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM_VERSION"
fi
if need promtool; then
  log "building promtool $PROMTOOL_VERSION (first time only; a few minutes)"
  go install -trimpath -ldflags "-s -w" "github.com/prometheus/prometheus/cmd/promtool@$PROMTOOL_VERSION"
fi
for built in "$stage"/*; do
  [ -e "$built" ] && mv -f "$built" "$bin/"
done
echo "$dest"
