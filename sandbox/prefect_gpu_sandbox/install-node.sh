#!/usr/bin/env bash
# Build a real node's binaries from package registries only, beside the control plane's:
# kubelet, kube-controller-manager, kube-scheduler and kube-proxy of the same Kubernetes release,
# containerd 2 with ctr and its runc shim, runc (with seccomp: pods run under RuntimeDefault),
# and the CNI plugins; install the Debian packages the node runs with when they are missing.
# Each binary is cached by the module version it was built from (`go version -m`), so a second
# run only checks.
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.37.1}
CONTAINERD_VERSION=${CONTAINERD_VERSION:-v2.4.2}
RUNC_VERSION=${RUNC_VERSION:-v1.5.3}
CNI_PLUGINS_VERSION=${CNI_PLUGINS_VERSION:-v1.10.0}
CACHE=${PREFECT_GPU_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/prefect-gpu-operator}
BIN=${PREFECT_GPU_OPERATOR_TOOLS_BIN:-$CACHE/tools/$K8S_VERSION/bin}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=go-build.sh
source "$here/go-build.sh"
mkdir -p "$BIN/cni"

# kube-proxy programs Services with iptables and flushes conntrack entries; busybox-static is the
# root filesystem of the images the node is given (its pause image and the tests' image).
RUNTIME_PACKAGES=(iptables conntrack busybox-static libseccomp2)
# runc links libseccomp through cgo.
BUILD_PACKAGES=(libseccomp-dev pkg-config gcc libc6-dev)

apt_install() {
  local missing=() package
  for package in "$@"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' \
      || missing+=("$package")
  done
  [ ${#missing[@]} -eq 0 ] && return
  [ "$(id -u)" -eq 0 ] || { log "needs root to install ${missing[*]} (apt-get)"; exit 1; }
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# built_from MODULE VERSION BINARY...: whether every BINARY was built from MODULE at VERSION.
built_from() {
  local module=$1 version=$2 binary
  shift 2
  for binary in "$@"; do
    [ -x "$binary" ] || return 1
    go version -m "$binary" 2>/dev/null | awk -v m="$module" -v v="$version" \
      '$1 == "mod" && $2 == m && $3 == v { found = 1 } END { exit !found }' || return 1
  done
}

apt_install "${RUNTIME_PACKAGES[@]}"

node_commands=(kubelet kube-controller-manager kube-scheduler kube-proxy)
if built_from k8s.io/kubernetes "$K8S_VERSION" "${node_commands[@]/#/$BIN/}"; then
  log "${node_commands[*]} $K8S_VERSION cached"
else
  log "building ${node_commands[*]} $K8S_VERSION (a few minutes)"
  build_kubernetes "$K8S_VERSION" "$BIN" "${node_commands[@]}"
fi

containerd_commands=(containerd ctr containerd-shim-runc-v2)
module=github.com/containerd/containerd/v2
if built_from "$module" "$CONTAINERD_VERSION" "${containerd_commands[@]/#/$BIN/}"; then
  log "containerd $CONTAINERD_VERSION cached"
else
  log "building containerd $CONTAINERD_VERSION"
  mkdir "$work/containerd" && cd "$work/containerd"
  go mod init local/containerd-tools >/dev/null 2>&1
  go get "$module@$CONTAINERD_VERSION"
  go build -trimpath -tags "no_btrfs no_devmapper no_zfs" \
    -ldflags "-s -w -X $module/version.Version=$CONTAINERD_VERSION" \
    -o "$work/out/" "${containerd_commands[@]/#/$module/cmd/}"
  for command in "${containerd_commands[@]}"; do mv "$work/out/$command" "$BIN/"; done
fi

if built_from github.com/opencontainers/runc "$RUNC_VERSION" "$BIN/runc"; then
  log "runc $RUNC_VERSION cached"
else
  log "building runc $RUNC_VERSION"
  apt_install "${BUILD_PACKAGES[@]}"
  # Without cgo and the seccomp tag every pod fails: "seccomp: config provided but seccomp not
  # supported".
  CGO_ENABLED=1 GOBIN="$work/out" go install -trimpath -tags seccomp \
    -ldflags "-s -w -X main.version=${RUNC_VERSION#v}" \
    "github.com/opencontainers/runc@$RUNC_VERSION"
  mv "$work/out/runc" "$BIN/"
fi

# The CNI plugins live in a directory of their own, which containerd searches.
module=github.com/containernetworking/plugins
cni_plugins=(bridge host-local loopback portmap)
if built_from "$module" "$CNI_PLUGINS_VERSION" "${cni_plugins[@]/#/$BIN/cni/}"; then
  log "CNI plugins $CNI_PLUGINS_VERSION cached"
else
  log "building CNI plugins $CNI_PLUGINS_VERSION"
  packages=()
  for package in main/bridge ipam/host-local main/loopback meta/portmap; do
    packages+=("$module/plugins/$package@$CNI_PLUGINS_VERSION")
  done
  GOBIN="$BIN/cni" go install -trimpath -ldflags "-s -w" "${packages[@]}"
fi

# The tests' fake GPU device plugin (never part of an image), from the sources beside this
# script: cached by a hash of them, which the binary prints (-trimpath drops -ldflags from the
# build settings `go version -m` shows).
plugin_sources=("$here/fake-device-plugin"/{main.go,go.mod,go.sum})
plugin_hash=$(cat "${plugin_sources[@]}" | sha256sum | cut -c1-16)
if [ -x "$BIN/fake-device-plugin" ] \
  && [ "$("$BIN/fake-device-plugin" -version)" = "$plugin_hash" ]; then
  log "fake-device-plugin $plugin_hash cached"
else
  log "building fake-device-plugin $plugin_hash"
  (cd "$here/fake-device-plugin" && go build -trimpath \
    -ldflags "-s -w -X main.sourceHash=$plugin_hash" -o "$work/out/fake-device-plugin" .)
  mv "$work/out/fake-device-plugin" "$BIN/"
fi
