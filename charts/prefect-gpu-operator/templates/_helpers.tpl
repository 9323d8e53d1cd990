{{/* Chart name, truncated to 63 characters. */}}
{{- define "prefect-gpu-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart unless the release already contains the chart name. */}}
{{- define "prefect-gpu-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "prefect-gpu-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every object carries. */}}
{{- define "prefect-gpu-operator.labels" -}}
helm.sh/chart: {{ include "prefect-gpu-operator.chart" . }}
{{ include "prefect-gpu-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "prefect-gpu-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "prefect-gpu-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "prefect-gpu-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "prefect-gpu-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- /* The operator's own certificate has its own name: Helm never owns it, so switching the
     source either way never makes Helm meet a Secret it did not create. */}}
{{- define "prefect-gpu-operator.webhookSecretName" -}}
{{- if eq .Values.webhook.tls.source "operator" }}
{{- printf "%s-webhook-tls-operator" (include "prefect-gpu-operator.fullname" .) }}
{{- else }}
{{- printf "%s-webhook-tls" (include "prefect-gpu-operator.fullname" .) }}
{{- end }}
{{- end }}

{{/* Namespaces whose pods never get WORKER_ID, as a JSON list: the webhook configuration's
     namespaceSelector and the operator's own guard both read this one list. */}}
{{- define "prefect-gpu-operator.webhookExcludedNamespaces" -}}
{{- concat (list "kube-system" .Release.Namespace) .Values.webhook.excludeNamespaces | uniq | toJson }}
{{- end }}

{{- define "prefect-gpu-operator.image" -}}
{{- printf "%s:%s" .repository (default $.Chart.AppVersion .tag) }}
{{- end }}

{{/* The pods' image pull secrets: the global list, then the component's own (call with
     (dict "root" $ "own" <list>)). Empty renders nothing. */}}
{{- define "prefect-gpu-operator.imagePullSecrets" -}}
{{- $secrets := concat .root.Values.imagePullSecrets .own | uniq }}
{{- with $secrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
