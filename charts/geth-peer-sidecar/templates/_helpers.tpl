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

{{/*
The admission policies' CEL after the `registry` variable (the registry
ConfigMap's name), shared by both policies' variables. Keep in step with
deploy/components/admission-policy/policy.yaml (the same text).
*/}}
{{- define "gps.callerVariables" -}}
- name: pod
  expression: >-
    'authentication.kubernetes.io/pod-name' in request.userInfo.extra
    ? request.userInfo.extra['authentication.kubernetes.io/pod-name'][0] : ''
- name: podUid
  expression: >-
    'authentication.kubernetes.io/pod-uid' in request.userInfo.extra
    ? request.userInfo.extra['authentication.kubernetes.io/pod-uid'][0] : ''
{{- end -}}

{{- define "gps.leasePolicyBody" -}}
{{ include "gps.callerVariables" . }}
- name: obj
  expression: "request.operation == 'DELETE' ? oldObject : object"
- name: labelled
  expression: >-
    has(variables.obj.metadata.labels)
    && 'geth-peer-sidecar.io/registry' in variables.obj.metadata.labels
    && variables.obj.metadata.labels['geth-peer-sidecar.io/registry'] == variables.registry
    && variables.obj.metadata.name.startsWith(variables.registry + '.')
    && (request.operation != 'UPDATE' || (has(oldObject.metadata.labels)
        && 'geth-peer-sidecar.io/registry' in oldObject.metadata.labels
        && oldObject.metadata.labels['geth-peer-sidecar.io/registry'] == variables.registry))
validations:
  - expression: "variables.pod != '' && variables.podUid != ''"
    message: >-
      the token is not bound to a pod (no authentication.kubernetes.io/pod-name
      and pod-uid): only a pod's own projected service-account token writes the registry
    reason: Forbidden
  - expression: variables.labelled
    message: >-
      only this registry's member Leases (labelled geth-peer-sidecar.io/registry,
      named <registry>.<pod>): no other Lease in the namespace
    reason: Forbidden
  - expression: >-
      request.operation == 'DELETE'
      || variables.obj.metadata.name == variables.registry + '.' + variables.pod
    message: "a pod creates and updates only its own Lease, <registry>.<its pod name>"
    reason: Forbidden
  - expression: >-
      request.operation == 'DELETE'
      || (has(object.metadata.ownerReferences) && object.metadata.ownerReferences.exists(r,
          r.kind == 'Pod' && r.name == variables.pod && r.uid == variables.podUid))
    message: "a pod's Lease carries an ownerReference to that pod (its UID)"
    reason: Forbidden
{{- end -}}

{{- define "gps.configmapPolicyBody" -}}
{{ include "gps.callerVariables" . }}
- name: newData
  expression: "has(object.data) ? object.data : {}"
- name: oldData
  expression: "oldObject != null && has(oldObject.data) ? oldObject.data : {}"
validations:
  - expression: "variables.pod != ''"
    message: >-
      the token is not bound to a pod (no authentication.kubernetes.io/pod-name):
      only a pod's own projected service-account token writes the registry
    reason: Forbidden
  - expression: "object.metadata.name == variables.registry"
    message: "the service account writes only the registry ConfigMap"
    reason: Forbidden
  - expression: >-
      ('external-peers.json' in variables.newData) == ('external-peers.json' in variables.oldData)
      && (!('external-peers.json' in variables.newData)
          || variables.newData['external-peers.json'] == variables.oldData['external-peers.json'])
    message: "external-peers.json is written by operators only, never by a sidecar"
    reason: Forbidden
  - expression: >-
      variables.newData.all(k, !k.startsWith('member.') || k == 'member.' + variables.pod
      || (k in variables.oldData && variables.oldData[k] == variables.newData[k]))
    message: >-
      a pod adds or changes only its own member key, member.<its pod name>
      (removing another member's key is allowed)
    reason: Forbidden
{{- end -}}
