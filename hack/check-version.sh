#!/usr/bin/env bash
# Checks that every place naming the release version names VERSION (a release tag without
# its "v"): the Python package, the chart's appVersion (the operator image's default tag),
# and the server image the operator deploys by default. A tag pushed without bumping them
# would otherwise ship an operator that deploys the previous release's server.
#
#   hack/check-version.sh 0.2.0
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
version=${1:?usage: hack/check-version.sh VERSION}
status=0
check() {  # file, the line that must be there (a fixed string, whole line)
  grep -qxF -- "$2" "$root/$1" || { echo "check-version: $1 does not say: $2" >&2; status=1; }
}
check pyproject.toml "version = \"$version\""
check charts/imagegen-operator/Chart.yaml "appVersion: \"$version\""
check operator/imagegen_operator/render/deployment.py \
  "DEFAULT_SERVER_IMAGE = \"ghcr.io/imagegen-operator/imagegen-server:$version\""
exit $status
