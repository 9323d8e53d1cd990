"""The value sets the chart is rendered with and kubeconform validates: the defaults, every
documented switch flipped, and each way the README and the scripts install it.

A new value that changes what the chart renders adds its set here; test_kubeconform.py fails
when a boolean of values.yaml or a TLS source is flipped by no set.
"""

from __future__ import annotations

from typing import Any

RELEASE = "prefect-gpu-operator"
NAMESPACE = "prefect-gpu-operator"
PREFECT_API = "http://prefect-server.prefect.svc:4200/api"

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    # webhook.tls.source: the default (helm) is "defaults".
    "tls-operator": {"webhook": {"tls": {"source": "operator"}}},
    "tls-cert-manager": {"webhook": {"tls": {"source": "certManager"}}},
    "tls-cert-manager-cluster-issuer": {
        "webhook": {
            "tls": {
                "source": "certManager",
                "issuerRef": {"name": "ca", "kind": "ClusterIssuer", "group": "cert-manager.io"},
            }
        }
    },
    "default-policy": {"defaultPolicy": {"enabled": True}},
    "inference-worker": {"inferenceWorker": {"enabled": True}},
    "webhook-off": {"webhook": {"enabled": False}},
    "metrics-off": {"metrics": {"enabled": False}},
    "scrape-annotations-off": {"metrics": {"scrapeAnnotations": False}},
    "webhook-and-metrics-off": {"webhook": {"enabled": False}, "metrics": {"enabled": False}},
    "service-account-off": {"serviceAccount": {"create": False, "name": "gpu-operator"}},
    "pdb-off": {"operator": {"podDisruptionBudget": {"enabled": False}}},
    "service-monitor": {
        "metrics": {
            "serviceMonitor": {
                "enabled": True,
                "namespace": "monitoring",
                "labels": {"release": "kps"},
            }
        }
    },
    "grafana-dashboard": {
        "grafana": {
            "dashboards": {
                "enabled": True,
                "namespace": "monitoring",
                "annotations": {"grafana_folder": "GPU"},
            }
        }
    },
    "worker-report-off": {"operator": {"workerReport": {"enabled": False}}},
    # The GPU workers' slot metrics, scraped by a PodMonitor beside the operator's ServiceMonitor.
    "slots-metrics": {
        "inferenceWorker": {"enabled": True, "slotsMetrics": {"enabled": True, "port": 9500}},
        "metrics": {
            "serviceMonitor": {
                "enabled": True,
                "namespace": "monitoring",
                "labels": {"release": "kps"},
            }
        },
    },
    # OpenShift: the namespace's SecurityContextConstraints choose the ids; global pull secrets.
    "openshift": {
        "imagePullSecrets": [{"name": "registry"}],
        "podSecurityContext": {"runAsUser": None, "runAsGroup": None, "fsGroup": None},
        "inferenceWorker": {"enabled": True, "imagePullSecrets": [{"name": "gpu-registry"}]},
    },
    "one-replica": {"operator": {"replicas": 1}},
    # README "Installing in a cluster".
    "readme-install": {
        "defaultPolicy": {"enabled": True, "spec": {"server": {"remoteApiUrl": PREFECT_API}}}
    },
    # The cluster demo's install (demo/cluster.py): local images, the GPU worker with extra env.
    "cluster-demo": {
        "operator": {
            "image": {
                "repository": "localhost/prefect-gpu-operator",
                "tag": "dev",
                "pullPolicy": "Never",
            }
        },
        "inferenceWorker": {
            "enabled": True,
            "image": {
                "repository": "localhost/prefect-gpu-worker",
                "tag": "dev",
                "pullPolicy": "Never",
            },
            "prefectApiUrl": PREFECT_API,
            "gpus": 2,
            "extraEnv": [
                {"name": "PREFECT_WORKER_QUERY_SECONDS", "value": "1"},
                {
                    "name": "PREFECT_API_KEY",
                    "valueFrom": {"secretKeyRef": {"name": "prefect", "key": "api-key"}},
                },
            ],
            "extraEnvFrom": [{"secretRef": {"name": "prefect-settings"}}],
        },
    },
    # A Prefect API behind an HTTPS proxy and a private CA (README "GPULimitPolicy"), and a
    # self-hosted server with basic auth, a CA bundle and access headers.
    "behind-a-proxy": {
        "operator": {
            "extraEnv": [
                {"name": "HTTPS_PROXY", "value": "http://proxy.internal:3128"},
                {"name": "NO_PROXY", "value": ".svc,.cluster.local"},
                {"name": "SSL_CERT_FILE", "value": "/etc/ssl/corp/ca.crt"},
                {
                    "name": "PROXY_TOKEN",
                    "valueFrom": {"secretKeyRef": {"name": "proxy", "key": "token"}},
                },
            ],
            "extraEnvFrom": [{"configMapRef": {"name": "proxy-settings"}}],
            "extraVolumes": [{"name": "corp-ca", "configMap": {"name": "corp-ca"}}],
            "extraVolumeMounts": [
                {"name": "corp-ca", "mountPath": "/etc/ssl/corp", "readOnly": True}
            ],
        },
        "defaultPolicy": {
            "enabled": True,
            "spec": {
                "server": {
                    "remoteApiUrl": "https://prefect.internal.example/api",
                    "basicAuth": {
                        "valueFrom": {
                            "secretKeyRef": {"name": "prefect-basic-auth", "key": "auth-string"}
                        }
                    },
                    "caBundle": {
                        "valueFrom": {"configMapKeyRef": {"name": "prefect-ca", "key": "ca.crt"}}
                    },
                    "headers": [
                        {
                            "name": "CF-Access-Client-Secret",
                            "valueFrom": {"secretKeyRef": {"name": "cf-access", "key": "secret"}},
                        }
                    ],
                }
            },
        },
    },
    # Every free-form value filled, so each lands where its kind's schema accepts it.
    "everything-set": {
        "fullnameOverride": "gpu-operator",
        "operator": {
            "image": {"tag": "0.1.0", "pullPolicy": "Always"},
            "imagePullSecrets": [{"name": "registry"}],
            "logFormat": "plain",
            "resources": {"requests": {"cpu": 1, "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
            "podLabels": {"team": "ml"},
            "podAnnotations": {"example.com/owner": "ml"},
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops"}],
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {"key": "pool", "operator": "In", "values": ["ops"]}
                                ]
                            }
                        ]
                    }
                }
            },
            "priorityClassName": "system-cluster-critical",
            "podDisruptionBudget": {"minAvailable": 2},
        },
        "serviceAccount": {"annotations": {"example.com/role": "gpu-operator"}},
        "webhook": {
            "excludeNamespaces": ["batch"],
            "podSelectors": [{"matchLabels": {"team": "ml"}}],
            "timeoutSeconds": 3,
        },
        "defaultPolicy": {
            "enabled": True,
            "spec": {
                "server": {
                    "remoteApiUrl": "https://api.prefect.cloud/api",
                    "accountId": "6e0b4b5e-0000-4000-8000-000000000001",
                    "workspaceId": "6e0b4b5e-0000-4000-8000-000000000002",
                    "apiKey": {"valueFrom": {"secretKeyRef": {"name": "prefect", "key": "key"}}},
                },
                "nodeSelector": {"matchLabels": {"pool": "gpu"}},
                "slotsPerGpu": 2,
                "limitNameTemplate": "gpu:{node}",
                "deletionPolicy": "Retain",
            },
        },
        "inferenceWorker": {
            "enabled": True,
            "gpus": 2,
            "nodeSelector": {"pool": "gpu"},
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ],
            "resources": {"requests": {"cpu": "2", "memory": "4Gi"}},
        },
    },
}
