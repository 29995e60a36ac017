{{- define "meshward.fullname" -}}
{{- printf "%s-operator" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "meshward.serviceAccountName" -}}
{{- default (include "meshward.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "meshward.labels" -}}
app.kubernetes.io/name: meshward
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: meshward
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "meshward.selectorLabels" -}}
app.kubernetes.io/name: meshward
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}
