{{/* Resource name: the release name, unless it already carries the chart name. */}}
{{- define "gps.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Name of the geth StatefulSet and its headless Service (pods are <this>-0, ...). */}}
{{- define "gps.gethName" -}}
{{- printf "%s-geth" (include "gps.fullname" .) | trunc 52 | trimSuffix "-" -}}
{{- end -}}

{{/* Common labels; app.kubernetes.io/name and instance come with each object. */}}
{{- define "gps.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "gps.gethSelector" -}}
app.kubernetes.io/name: geth
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "gps.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* The registry ConfigMap: configmapName, else derived from the release. */}}
{{- define "gps.configmapName" -}}
{{- .Values.configmapName | default (printf "%s-static-nodes" (include "gps.fullname" .)) -}}
{{- end -}}
