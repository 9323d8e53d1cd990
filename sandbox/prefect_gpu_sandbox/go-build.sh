# Sourced by install-tools.sh and install-node.sh: the Go toolchain and the wrapper module that
# builds Kubernetes commands from the Go module proxy.

log() { printf '[%s] %s\n' "$(basename "$0" .sh)" "$*" >&2; }

export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod

if ! command -v go >/dev/null; then
  for candidate in /usr/local/go/bin /usr/lib/go/bin; do
    [ -x "$candidate/go" ] && export PATH="$candidate:$PATH"
  done
fi
command -v go >/dev/null || { log "Go is required (https://go.dev/dl or apt-get install golang)"; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# build_kubernetes VERSION OUT_DIR COMMAND...: build k8s.io/kubernetes/cmd/COMMAND at VERSION.
# k8s.io/kubernetes replaces its staging modules with ./staging paths, which only work inside
# its own repository; a wrapper module pins each of them to its published v0.X.Y instead.
build_kubernetes() {
  local version=$1 out=$2 module
  shift 2
  local staging=v0.${version#v1.} minor=${version#v1.}
  minor=${minor%%.*}
  local wrapper
  wrapper=$(mktemp -d -p "$work")
  (
    cd "$wrapper"
    go mod init local/k8s-tools >/dev/null 2>&1
    local gomod
    gomod=$(go mod download -json "k8s.io/kubernetes@$version" \
      | python3 -c 'import json, sys; print(json.load(sys.stdin)["GoMod"])')
    # Derive the staging modules from kubernetes' own go.mod rather than hard-coding them.
    for module in $(grep -oE '^\s*k8s\.io/[A-Za-z0-9._-]+ => \./staging' "$gomod" | awk '{print $1}'); do
      go mod edit -replace="$module=$module@$staging"
    done
    go get "k8s.io/kubernetes@$version"
    local ldflags="-s -w" pkg
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
      ldflags="$ldflags -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
    done
    local packages=() command
    for command in "$@"; do packages+=("k8s.io/kubernetes/cmd/$command"); done
    go build -trimpath -ldflags "$ldflags" -o "$wrapper/out/" "${packages[@]}"
    for command in "$@"; do mv "$wrapper/out/$command" "$out/"; done
  )
}

# all_present DIR NAME...: whether every NAME is an executable in DIR.
all_present() {
  local dir=$1 name
  shift
  for name in "$@"; do [ -x "$dir/$name" ] || return 1; done
}
