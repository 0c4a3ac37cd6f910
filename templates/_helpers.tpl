{{/*
Shared by the parent chart and every subchart in charts/ (Helm's named templates are global), so that
each part names the others' objects (the VAP names the gateway's ServiceAccount, the gateway the chain's
ConfigMap) the same way. Each takes the root context of its chart; subcharts see the same Release.
*/}}

{{- define "trustcap.name" -}}
trustcap
{{- end -}}

{{/* The release's base name, 63 characters at most (a DNS label). */}}
{{- define "trustcap.fullname" -}}
{{- if contains "trustcap" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-trustcap" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* A component's object name: (dict "root" $ "component" "operator"). */}}
{{- define "trustcap.component" -}}
{{- printf "%s-%s" (include "trustcap.fullname" .root) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "trustcap.systemNamespace" -}}
{{- default .Release.Namespace .Values.global.systemNamespace -}}
{{- end -}}

{{- define "trustcap.selectorLabels" -}}
app.kubernetes.io/name: {{ include "trustcap.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "trustcap.labels" -}}
{{ include "trustcap.selectorLabels" . }}
app.kubernetes.io/part-of: trustcap
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end -}}

{{/* An image reference: (dict "root" $ "repository" "trustcap/operator"); the tag defaults to appVersion. */}}
{{- define "trustcap.image" -}}
{{- $g := .root.Values.global.image -}}
{{- printf "%s%s:%s" $g.registry .repository (default .root.Chart.AppVersion $g.tag) -}}
{{- end -}}

{{- define "trustcap.imagePullSecrets" -}}
{{- with .Values.global.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The ServiceAccount user name the API server sees for a component's pods. */}}
{{- define "trustcap.serviceAccountUser" -}}
{{- printf "system:serviceaccount:%s:%s" .root.Release.Namespace (include "trustcap.component" .) -}}
{{- end -}}

{{/* True when the cluster serves the Prometheus Operator's API. */}}
{{- define "trustcap.hasMonitoring" -}}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1" }}true{{ end -}}
{{- end -}}

{{/* Pod security of every part that needs no host privilege. */}}
{{- define "trustcap.restrictedContainer" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 65534
runAsGroup: 65534
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The chain's environment for a process that reads TRUSTCAP_CHAIN_* (the operator). */}}
{{- define "trustcap.chainEnv" -}}
{{- if .Values.global.chain.enabled }}
- name: TRUSTCAP_CHAIN_RPC
  valueFrom:
    configMapKeyRef:
      name: {{ include "trustcap.component" (dict "root" . "component" "chain") }}
      key: rpcUrl
- name: TRUSTCAP_CHAIN_DEPLOYMENT
  value: /etc/trustcap/chain/deployment.json
- name: TRUSTCAP_CHAIN_KEYS
  value: /etc/trustcap/chain-keys/keys.json
{{- end }}
{{- end -}}

{{/* The ConfigMap that holds deployment.json. */}}
{{- define "trustcap.chainDeploymentConfigMap" -}}
{{- default (include "trustcap.component" (dict "root" . "component" "chain")) .Values.global.chain.existingConfigMap -}}
{{- end -}}

{{/* Every CRD the chart installs from crds/ (and crds/kopf-peering/), comma-separated, read from the files. */}}
{{- define "trustcap.crdNames" -}}
{{- $names := list -}}
{{- range $path, $_ := .Files.Glob "crds/**.yaml" -}}
{{- $doc := $.Files.Get $path | fromYaml -}}
{{- $names = append $names $doc.metadata.name -}}
{{- end -}}
{{- join "," $names -}}
{{- end -}}
