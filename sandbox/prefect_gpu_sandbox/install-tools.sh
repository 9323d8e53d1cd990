#!/usr/bin/env bash
# Build the local control plane's binaries from package registries only:
# kube-apiserver and kubectl from the Go module proxy (k8s.io/kubernetes through a wrapper
# module that pins each staging module to its published v0.X.Y), etcd (Debian's 3.4 is too old
# for current kube-apiserver) and helm; and the chart's checkers: kubeconform, helm-docs and
# actionlint. Binaries are cached by version outside any checkout, so a second run only checks
# that they are there.
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.37.1}
ETCD_VERSION=${ETCD_VERSION:-v3.6.14}
HELM_VERSION=${HELM_VERSION:-v3.21.4}
KUBECONFORM_VERSION=${KUBECONFORM_VERSION:-v0.8.0}
HELM_DOCS_VERSION=${HELM_DOCS_VERSION:-v1.14.2}
ACTIONLINT_VERSION=${ACTIONLINT_VERSION:-v1.7.12}
CACHE=${PREFECT_GPU_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/prefect-gpu-operator}
BIN=${PREFECT_GPU_OPERATOR_TOOLS_BIN:-$CACHE/tools/$K8S_VERSION/bin}

export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
mkdir -p "$BIN"
log() { printf '[install-tools] %s\n' "$*" >&2; }

if ! command -v go >/dev/null; then
  for candidate in /usr/local/go/bin /usr/lib/go/bin; do
    [ -x "$candidate/go" ] && export PATH="$candidate:$PATH"
  done
fi
# Only a build needs Go: a run that finds everything cached works without it.
need_go() {
  command -v go >/dev/null || { log "Go is required (https://go.dev/dl or apt-get install golang)"; exit 1; }
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [ -x "$BIN/kube-apiserver" ] && [ -x "$BIN/kubectl" ]; then
  log "kube-apiserver and kubectl $K8S_VERSION cached in $BIN"
else
  log "building kube-apiserver and kubectl $K8S_VERSION (first run: tens of minutes)"
  need_go
  staging=v0.${K8S_VERSION#v1.}
  minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  mkdir "$work/k8s" && cd "$work/k8s"
  go mod init local/k8s-tools >/dev/null 2>&1
  gomod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["GoMod"])')
  # Derive the staging modules from kubernetes' own go.mod rather than hard-coding them.
  for module in $(grep -oE '^\s*k8s\.io/[A-Za-z0-9._-]+ => \./staging' "$gomod" | awk '{print $1}'); do
    go mod edit -replace="$module=$module@$staging"
  done
  go get "k8s.io/kubernetes@$K8S_VERSION"
  v=k8s.io/component-base/version
  c=k8s.io/client-go/pkg/version
  ldflags="-s -w"
  for pkg in $v $c; do
    ldflags="$ldflags -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
  done
  go build -trimpath -ldflags "$ldflags" -o "$work/out/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl
  mv "$work/out/kube-apiserver" "$work/out/kubectl" "$BIN/"
fi

if [ -x "$BIN/etcd" ]; then
  log "etcd $ETCD_VERSION cached"
else
  log "building etcd $ETCD_VERSION"
  need_go
  mkdir "$work/etcd" && cd "$work/etcd"
  go mod init local/etcd-tools >/dev/null 2>&1
  go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
  go build -trimpath -ldflags "-s -w" -o "$work/out/etcd" go.etcd.io/etcd/server/v3
  mv "$work/out/etcd" "$BIN/"
fi

if [ -x "$BIN/helm" ]; then
  log "helm $HELM_VERSION cached"
else
  log "building helm $HELM_VERSION"
  need_go
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
  need_go
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

echo "$BIN"
