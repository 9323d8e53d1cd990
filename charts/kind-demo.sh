#!/usr/bin/env bash
# The demo on a real cluster: kind (Kubernetes in Docker) with faked GPU capacity.
#
#   charts/kind-demo.sh          # create the cluster, install everything, run the bundled flow
#   charts/kind-demo.sh down     # delete the cluster
#
# Needs docker, kind, kubectl and helm on PATH; no GPU (the nodes advertise nvidia.com/gpu through
# their status, as Kubernetes documents for extended resources, and the model runs on the CPU).
#
# 1. a kind cluster with two worker nodes; worker 1 gets nvidia.com/gpu=1, worker 2 gets 2
# 2. the operator and worker images built from ./Dockerfile (targets operator and worker) and
#    loaded into kind; the worker image, which carries Prefect, also runs the Prefect server
# 3. a Prefect server (SQLite) in namespace "prefect", at http://prefect-server.prefect.svc:4200/api
# 4. the chart, with its self-signed webhook certificate, the default GPULimitPolicy for that
#    server and the bundled inference worker (one per GPU node)
# 5. the webhook shown on a prefect-worker pod (server-side dry run), the limits, and the bundled
#    embed-documents deployment run a few times on the inference workers
#
# Settings (environment): CLUSTER (default prefect-gpu-demo), IMAGE (prefect-gpu-operator:dev),
# WORKER_IMAGE (prefect-gpu-worker:dev), RUNS (flow runs to start, default 4).
set -euo pipefail

CLUSTER=${CLUSTER:-prefect-gpu-demo}
IMAGE=${IMAGE:-prefect-gpu-operator:dev}
WORKER_IMAGE=${WORKER_IMAGE:-prefect-gpu-worker:dev}
RUNS=${RUNS:-4}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RELEASE=prefect-gpu-operator
NAMESPACE=prefect-gpu-operator
WORKER=ds/$RELEASE-inference-worker
CONTEXT=kind-$CLUSTER

step() { printf '\n==> %s\n' "$*"; }
k() { kubectl --context "$CONTEXT" "$@"; }

for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || { echo "kind-demo.sh needs $tool on PATH" >&2; exit 1; }
done

if [[ ${1:-up} == down ]]; then
  kind delete cluster --name "$CLUSTER"
  exit 0
fi

step "kind cluster $CLUSTER: a control plane and two workers"
if ! kind get clusters | grep -qx "$CLUSTER"; then
  kind create cluster --name "$CLUSTER" --wait 120s --config - <<'EOF'
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
  - role: worker
  - role: worker
EOF
fi

step "fake GPUs: $CLUSTER-worker gets 1, $CLUSTER-worker2 gets 2 (status.capacity nvidia.com/gpu)"
for pair in "$CLUSTER-worker=1" "$CLUSTER-worker2=2"; do
  node=${pair%=*} count=${pair##*=}
  # As NVIDIA's GPU feature discovery labels a GPU node: the chart's GPU worker runs on these.
  k label node "$node" nvidia.com/gpu.present=true --overwrite
  k patch node "$node" --subresource=status --type=json \
    -p "[{\"op\": \"add\", \"path\": \"/status/capacity/nvidia.com~1gpu\", \"value\": \"$count\"}]"
  # The kubelet copies capacity to allocatable at its next status update.
  k wait "node/$node" --for=jsonpath='{.status.allocatable.nvidia\.com/gpu}'="$count" --timeout=120s
done
k get nodes -o custom-columns='NODE:.metadata.name,GPUS:.status.allocatable.nvidia\.com/gpu'

step "images $IMAGE and $WORKER_IMAGE (./Dockerfile), loaded into kind"
docker build --target operator -t "$IMAGE" "$REPO"
docker build --target worker -t "$WORKER_IMAGE" "$REPO"
kind load docker-image "$IMAGE" "$WORKER_IMAGE" --name "$CLUSTER"

step "Prefect server (SQLite) in namespace prefect"
k create namespace prefect --dry-run=client -o yaml | k apply -f -
k apply -n prefect -f - <<EOF
apiVersion: apps/v1
kind: Deployment
metadata:
  name: prefect-server
spec:
  selector:
    matchLabels: {app.kubernetes.io/name: prefect-server}
  template:
    metadata:
      labels: {app.kubernetes.io/name: prefect-server}
    spec:
      securityContext: {runAsNonRoot: true, runAsUser: 65532, fsGroup: 65532}
      containers:
        - name: prefect-server
          image: $WORKER_IMAGE
          imagePullPolicy: IfNotPresent
          args: [prefect, server, start, --host, 0.0.0.0, --port, "4200"]
          env:
            - {name: PREFECT_API_URL, value: "http://127.0.0.1:4200/api"}  # for kubectl exec ... prefect
            - {name: PREFECT_SERVER_ANALYTICS_ENABLED, value: "false"}
            - {name: PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE, value: prefect.server.concurrency.lease_storage.filesystem}
          ports: [{name: api, containerPort: 4200}]
          readinessProbe:
            httpGet: {path: /api/health, port: api}
            periodSeconds: 5
          volumeMounts: [{name: home, mountPath: /tmp}]
      volumes: [{name: home, emptyDir: {}}]
---
apiVersion: v1
kind: Service
metadata:
  name: prefect-server
spec:
  selector: {app.kubernetes.io/name: prefect-server}
  ports: [{name: api, port: 4200, targetPort: api}]
EOF
k rollout status -n prefect deploy/prefect-server --timeout=300s

step "the chart: operator + webhook (self-signed certificate), default policy, inference workers"
helm --kube-context "$CONTEXT" upgrade --install "$RELEASE" "$REPO/charts/prefect-gpu-operator" \
  --namespace "$NAMESPACE" --create-namespace \
  --set operator.image.repository="${IMAGE%:*}" --set operator.image.tag="${IMAGE##*:}" \
  --set defaultPolicy.enabled=true \
  --set defaultPolicy.spec.server.remoteApiUrl=http://prefect-server.prefect.svc:4200/api \
  --set inferenceWorker.enabled=true \
  --set inferenceWorker.image.repository="${WORKER_IMAGE%:*}" \
  --set inferenceWorker.image.tag="${WORKER_IMAGE##*:}" \
  --set inferenceWorker.prefectApiUrl=http://prefect-server.prefect.svc:4200/api \
  --wait --timeout 5m

step "the limits the operator made (one per GPU node, limit = its GPUs)"
k wait glp/default --for=condition=Ready --timeout=120s
k get glp
k exec -n prefect deploy/prefect-server -- prefect gcl ls

step "the webhook: a prefect-worker pod gets WORKER_ID from spec.nodeName (server-side dry run)"
k run prefect-worker-probe -n prefect --image="$WORKER_IMAGE" --restart=Never --dry-run=server \
  --labels=app.kubernetes.io/name=prefect-worker -o jsonpath='{.spec.containers[0].env}'
echo

step "the bundled embed-documents deployment (flows/prefect.yaml), $RUNS flow runs"
k exec -n "$NAMESPACE" "$WORKER" -- sh -c '
  set -e
  prefect work-pool inspect gpu-process-pool >/dev/null 2>&1 ||
    prefect work-pool create gpu-process-pool --type process
  rm -rf /tmp/flows && cp -r /opt/prefect-gpu-flows /tmp/flows && cd /tmp/flows
  prefect --no-prompt deploy --all'
echo "waiting for $RUNS flow runs..."
k exec -n "$NAMESPACE" "$WORKER" -- sh -c "
  for i in \$(seq $RUNS); do
    prefect deployment run embed-documents/embed-documents --watch --watch-timeout 600 >/dev/null &
  done
  wait"
k exec -n prefect deploy/prefect-server -- prefect flow-run ls --limit "$RUNS"

step "where the GPU step ran (each inference worker's log)"
k logs -n "$NAMESPACE" -l app.kubernetes.io/component=worker --tail=-1 --prefix | grep 'Embedded' || true

cat <<EOF

Done. Try:
  kubectl --context $CONTEXT patch node $CLUSTER-worker2 --subresource=status --type=json \\
    -p '[{"op": "replace", "path": "/status/capacity/nvidia.com~1gpu", "value": "1"}]'
  kubectl --context $CONTEXT exec -n prefect deploy/prefect-server -- prefect gcl ls
  kubectl --context $CONTEXT port-forward -n prefect svc/prefect-server 4200   # UI: http://localhost:4200
Delete the cluster: $0 down
EOF
