#!/usr/bin/env bash
# Builds the local control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl) and the tools (kwok, helm, kubeconform) once, into a
# cache outside the repo, keyed by the pinned versions. Prints the bin directory.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"

cache_root=${IMAGEGEN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/imagegen-operator}
key=$(cat "$here/versions.env" "$here"/k8s/go.* "$here"/etcd/go.* "$here"/etcd/*.go "$here"/k8s/*.go | sha256sum | cut -c1-12)
dest="$cache_root/k8s-$K8S_VERSION-$key"
bin="$dest/bin"
mkdir -p "$bin"
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false GOBIN="$bin"

log() { echo "[build-tools] $*" >&2; }

need() { [ ! -x "$bin/$1" ]; }

if need etcd; then
  log "building etcd $ETCD_VERSION"
  (cd "$here/etcd" && go build -trimpath -o "$bin/etcd" .)
fi

k8s_ldflags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  k8s_ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1"
  k8s_ldflags+=" -X $pkg.gitMinor=$(echo "$K8S_VERSION" | cut -d. -f2)"
  k8s_ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
for cmd in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  if need "$cmd"; then
    log "building $cmd $K8S_VERSION (first time only; several minutes)"
    (cd "$here/k8s" && go build -trimpath -ldflags "-s -w $k8s_ldflags" -o "$bin/$cmd" "k8s.io/kubernetes/cmd/$cmd")
  fi
done

if need kwok; then
  log "building kwok $KWOK_VERSION"
  GOFLAGS="$GOFLAGS" go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
fi
if [ ! -d "$dest/kwok-stages" ]; then
  # KWOK's default node and pod lifecycle stages ship in its module.
  moddir=$(cd "$here/etcd" && go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  mkdir -p "$dest/kwok-stages.tmp"
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
if need kubeconform; then
  log "building kubeconform $KUBECONFORM_VERSION"
  go install -trimpath -ldflags "-s -w" "github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM_VERSION"
fi
echo "$dest"
