{{/*
The helpers `helm create` makes (name, fullname, chart, labels, selectorLabels,
serviceAccountName), plus the image reference and the peering name.
*/}}

{{/* The chart name, truncated to 63 characters (the DNS label limit of names). */}}
{{- define "imagegen-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of the release's objects: the release name, plus the chart name unless
the release name already contains it; truncated to 63 characters.
*/}}
{{- define "imagegen-operator.fullname" -}}
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

{{/* Chart name and version, as used by the helm.sh/chart label. */}}
{{- define "imagegen-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object of the release. */}}
{{- define "imagegen-operator.labels" -}}
helm.sh/chart: {{ include "imagegen-operator.chart" . }}
{{ include "imagegen-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: imagegen-operator
{{- end }}

{{/* The labels that select the operator pods; they never change, as a selector cannot. */}}
{{- define "imagegen-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "imagegen-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* The ServiceAccount the operator runs as. */}}
{{- define "imagegen-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "imagegen-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name must name an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator image: repository and tag (appVersion by default), or a digest. */}}
{{- define "imagegen-operator.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* The name of the ClusterKopfPeering object the operator pods share. */}}
{{- define "imagegen-operator.peeringName" -}}
{{- default (include "imagegen-operator.fullname" .) .Values.peering.name }}
{{- end }}

{{/* The name of the metrics Service. */}}
{{- define "imagegen-operator.metricsServiceName" -}}
{{- printf "%s-metrics" (include "imagegen-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The name of the uninstall check's Job, ServiceAccount and role: within 63 characters with
its suffix (a Job's name becomes a label of its pod).
*/}}
{{- define "imagegen-operator.uninstallCheckName" -}}
{{- printf "%s-uninstall-check" (include "imagegen-operator.fullname" . | trunc 47 | trimSuffix "-") }}
{{- end }}

{{/* The uninstall check's labels: not the operator's selector labels (the metrics Service
must not pick its pod). */}}
{{- define "imagegen-operator.uninstallCheckLabels" -}}
helm.sh/chart: {{ include "imagegen-operator.chart" . }}
app.kubernetes.io/name: {{ include "imagegen-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: uninstall-check
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}
