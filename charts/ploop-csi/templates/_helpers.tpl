{{/* The driver's name: the CSIDriver object's and the provisioner of every class. */}}
{{- define "ploop-csi.driverName" -}}csi.ploop.io{{- end -}}

{{/*
The prefix of every object's name: the release name, or release-chart when
the release name does not already say ploop-csi, cut to 40 characters so
that the longest suffix still fits a 63-character label value.
*/}}
{{- define "ploop-csi.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "ploop-csi.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ include "ploop-csi.driverTag" . | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Selector labels of one component; they never change across upgrades. */}}
{{- define "ploop-csi.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "ploop-csi.driverTag" -}}
{{- .Values.image.driver.tag | default .Chart.AppVersion -}}
{{- end -}}

{{/* repository:tag, with @digest when one is given. */}}
{{- define "ploop-csi.image" -}}
{{- $ref := printf "%s:%s" .image.repository .tag -}}
{{- if .image.digest -}}{{- $ref = printf "%s@%s" $ref .image.digest -}}{{- end -}}
{{- $ref -}}
{{- end -}}

{{- define "ploop-csi.driverImage" -}}
{{- include "ploop-csi.image" (dict "image" .Values.image.driver "tag" (include "ploop-csi.driverTag" .)) -}}
{{- end -}}

{{- define "ploop-csi.sidecarImage" -}}
{{- $img := index .root.Values.image .name -}}
{{- include "ploop-csi.image" (dict "image" $img "tag" $img.tag) -}}
{{- end -}}

{{- define "ploop-csi.pluginDir" -}}
{{- printf "%s/plugins/%s" (.Values.kubeletDir | trimSuffix "/") (include "ploop-csi.driverName" .) -}}
{{- end -}}

{{- define "ploop-csi.shared" -}}
{{- if eq .Values.storage.mode "shared" -}}true{{- end -}}
{{- end -}}

{{/* The driver's flags common to both modes. */}}
{{- define "ploop-csi.commonArgs" -}}
- --nodeid=$(NODE_NAME)
- --endpoint=unix:///csi/csi.sock
- --drivername={{ include "ploop-csi.driverName" . }}
- --v={{ .Values.logLevel }}
{{- if include "ploop-csi.shared" . }}
- --storage-mode=shared
{{- end }}
{{- if .Values.metrics.enabled }}
- --metrics-address=:{{ .Values.metrics.port }}
{{- end }}
{{- end -}}

{{/* KUBERNETES_SERVICE_HOST/PORT for containers that talk to the API
server; used only when kubernetesAPI.host overrides the in-cluster address. */}}
{{- define "ploop-csi.apiEnv" -}}
- name: KUBERNETES_SERVICE_HOST
  value: {{ .Values.kubernetesAPI.host | quote }}
- name: KUBERNETES_SERVICE_PORT
  value: {{ .Values.kubernetesAPI.port | toString | quote }}
{{- end -}}
