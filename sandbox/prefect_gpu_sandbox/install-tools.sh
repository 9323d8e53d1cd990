#!/usr/bin/env bash
# Build the local cluster's binaries from package registries only:
# kube-apiserver and kubectl from the Go module proxy (k8s.io/kubernetes through a wrapper
# module, see go-build.sh), etcd (Debian's 3.4 is too old for current kube-apiserver) and helm;
# the chart's checkers (kubeconform, helm-docs, actionlint); then the node's binaries
# (install-node.sh). Binaries are cached by version outside any checkout, so a second run only
# checks that they are there.
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.37.1}
ETCD_VERSION=${ETCD_VERSION:-v3.6.14}
HELM_VERSION=${HELM_VERSION:-v3.21.4}
KUBECONFORM_VERSION=${KUBECONFORM_VERSION:-v0.8.0}
HELM_DOCS_VERSION=${HELM_DOCS_VERSION:-v1.14.2}
ACTIONLINT_VERSION=${ACTIONLINT_VERSION:-v1.7.12}
CACHE=${PREFECT_GPU_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/prefect-gpu-operator}
BIN=${PREFECT_GPU_OPERATOR_TOOLS_BIN:-$CACHE/tools/$K8S_VERSION/bin}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=go-build.sh
source "$here/go-build.sh"
mkdir -p "$BIN"

if all_present "$BIN" kube-apiserver kubectl; then
  log "kube-apiserver and kubectl $K8S_VERSION cached in $BIN"
else
  log "building kube-apiserver and kubectl $K8S_VERSION (first run: tens of minutes)"
  build_kubernetes "$K8S_VERSION" "$BIN" kube-apiserver kubectl
fi

if all_present "$BIN" etcd; then
  log "etcd $ETCD_VERSION cached"
else
  log "building etcd $ETCD_VERSION"
  mkdir "$work/etcd" && cd "$work/etcd"
  go mod init local/etcd-tools >/dev/null 2>&1
  go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
  go build -trimpath -ldflags "-s -w" -o "$work/out/etcd" go.etcd.io/etcd/server/v3
  mv "$work/out/etcd" "$BIN/"
fi

if all_present "$BIN" helm; then
  log "helm $HELM_VERSION cached"
else
  log "building helm $HELM_VERSION"
  GOBIN="$work/out" go install -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  mv "$work/out/helm" "$BIN/"
fi

# go_tool NAME PACKAGE VERSION [LDFLAGS]: `go install` one command, rebuilt when VERSION changes.
go_tool() {
  local name=$1 package=$2 version=$3 ldflags=${4:-}
  if [ -x "$BIN/$name" ] && [ "$(cat "$BIN/.$name.version" 2>/dev/null)" = "$version" ]; then
    log "$name $version cached"
    return
  fi
  log "building $name $version"
  GOBIN="$work/out" go install -trimpath -ldflags "-s -w $ldflags" "$package@$version"
  mv "$work/out/$name" "$BIN/"
  echo "$version" > "$BIN/.$name.version"
}
# Their release builds stamp the version these -X flags set (`kubeconform -v`, helm-docs' footer).
go_tool kubeconform github.com/yannh/kubeconform/cmd/kubeconform "$KUBECONFORM_VERSION" \
  "-X main.version=$KUBECONFORM_VERSION"
go_tool helm-docs github.com/norwoodj/helm-docs/cmd/helm-docs "$HELM_DOCS_VERSION" \
  "-X main.version=${HELM_DOCS_VERSION#v}"
go_tool actionlint github.com/rhysd/actionlint/cmd/actionlint "$ACTIONLINT_VERSION"

K8S_VERSION=$K8S_VERSION PREFECT_GPU_OPERATOR_TOOLS_BIN=$BIN bash "$here/install-node.sh"

echo "$BIN"
