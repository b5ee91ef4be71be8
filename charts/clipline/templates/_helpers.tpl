{{/*
Expand the name of the chart.
*/}}
{{- define "clipline.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name (at most 63 characters: some Kubernetes name
fields are limited to a DNS label). If the release name contains the chart name it is used
as the full name.
*/}}
{{- define "clipline.fullname" -}}
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

{{/*
Create chart name and version as used by the chart label.
*/}}
{{- define "clipline.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "clipline.labels" -}}
helm.sh/chart: {{ include "clipline.chart" . }}
{{ include "clipline.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: {{ include "clipline.name" . }}
{{- end }}

{{/*
Selector labels.
*/}}
{{- define "clipline.selectorLabels" -}}
app.kubernetes.io/name: {{ include "clipline.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels of one component: include with (dict "ctx" $ "component" "api").
*/}}
{{- define "clipline.componentLabels" -}}
{{ include "clipline.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Selector labels of one component: include with (dict "ctx" $ "component" "api").
*/}}
{{- define "clipline.componentSelectorLabels" -}}
{{ include "clipline.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Name of one component's objects: include with (dict "ctx" $ "component" "api").
*/}}
{{- define "clipline.componentName" -}}
{{- printf "%s-%s" (include "clipline.fullname" .ctx | trunc (int (sub 62 (len .component))) | trimSuffix "-") .component }}
{{- end }}

{{/*
The clipline deployment name (CLIPLINE_DEPLOYMENT): namespaces queues, Redis keys and the
shared-memory arena.
*/}}
{{- define "clipline.deploymentName" -}}
{{- $name := .Values.deploymentName | default .Release.Name }}
{{- if not (regexMatch "^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$" $name) }}
{{- fail (printf "deploymentName %q is not valid: use 1-40 lowercase letters, digits and '-' (set deploymentName when the release name is longer)" $name) }}
{{- end }}
{{- $name }}
{{- end }}

{{/*
The container image reference.
*/}}
{{- define "clipline.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
Service account of the operator.
*/}}
{{- define "clipline.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "clipline.componentName" (dict "ctx" . "component" "operator")) .Values.operator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Service account of the workloads that need no Kubernetes API access: the job API, Valkey
and the pods the operator creates (GPU daemon, workers).
*/}}
{{- define "clipline.workload.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "clipline.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Name of the default ClipPipeline.
*/}}
{{- define "clipline.pipeline.name" -}}
{{- default (include "clipline.fullname" .) .Values.pipeline.name }}
{{- end }}

{{/*
Secret holding the Redis URL, and its key.
*/}}
{{- define "clipline.redis.secretName" -}}
{{- if and (eq .Values.redis.mode "external") .Values.redis.external.existingSecret }}
{{- .Values.redis.external.existingSecret }}
{{- else if and (eq .Values.redis.mode "internal") .Values.redis.internal.auth.existingSecret }}
{{- .Values.redis.internal.auth.existingSecret }}
{{- else }}
{{- include "clipline.componentName" (dict "ctx" . "component" "redis") }}
{{- end }}
{{- end }}

{{- define "clipline.redis.secretKey" -}}
{{- if and (eq .Values.redis.mode "external") .Values.redis.external.existingSecret }}
{{- .Values.redis.external.existingSecretKey }}
{{- else }}url{{- end }}
{{- end }}

{{/*
Name of the in-chart Valkey objects.
*/}}
{{- define "clipline.valkey.name" -}}
{{- include "clipline.componentName" (dict "ctx" . "component" "valkey") }}
{{- end }}

{{/*
Environment shared by the chart's clipline containers.
*/}}
{{- define "clipline.commonEnv" -}}
- name: CLIPLINE_DEPLOYMENT
  value: {{ include "clipline.deploymentName" . | quote }}
- name: CLIPLINE_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "clipline.redis.secretName" . }}
      key: {{ include "clipline.redis.secretKey" . }}
- name: CLIPLINE_STATE_DIR
  value: /tmp/clipline
{{- end }}

{{/*
Selector of the pods the PodMonitor scrapes: those the operator creates for the default
ClipPipeline (GPU daemon and workers; instance = the pipeline's name) and the chart's
callback worker (instance = the release), none of which has a Service.
*/}}
{{- define "clipline.pipeline.podSelector" -}}
matchExpressions:
  - key: app.kubernetes.io/instance
    operator: In
    values: {{ uniq (list (include "clipline.pipeline.name" .) .Release.Name) | toJson }}
  - key: app.kubernetes.io/component
    operator: In
    values: [gpu-daemon, workers, callbacks]
{{- end }}

{{/*
Namespaces the operator watches (JSON list): operator.watchNamespaces, else the release's.
*/}}
{{- define "clipline.operator.namespaces" -}}
{{- if .Values.operator.watchNamespaces }}
{{- toJson (uniq .Values.operator.watchNamespaces) }}
{{- else }}
{{- toJson (list .Release.Namespace) }}
{{- end }}
{{- end }}

{{/*
The Secret of the generated API key, and the Secret/key of the API key file the API reads.
*/}}
{{- define "clipline.api.keySecretName" -}}
{{- include "clipline.componentName" (dict "ctx" . "component" "api-key") }}
{{- end }}

{{- define "clipline.api.keyFileSecret" -}}
{{- if .Values.api.auth.existingSecret }}
{{- .Values.api.auth.existingSecret }}
{{- else if .Values.api.auth.generateKey }}
{{- include "clipline.api.keySecretName" . }}
{{- end }}
{{- end }}

{{- define "clipline.api.keyFileKey" -}}
{{- if .Values.api.auth.existingSecret }}
{{- .Values.api.auth.existingSecretKey }}
{{- else }}keys{{- end }}
{{- end }}

{{/*
The Secret and key that hold the completion-callback signing secret: callbacks.existingSecret,
else the generated one; empty when callbacks are off.
*/}}
{{- define "clipline.callbacks.generatedSecretName" -}}
{{- include "clipline.componentName" (dict "ctx" . "component" "callback-secret") }}
{{- end }}

{{- define "clipline.callbacks.secretName" -}}
{{- if .Values.callbacks.existingSecret }}
{{- .Values.callbacks.existingSecret }}
{{- else if .Values.callbacks.generateSecret }}
{{- include "clipline.callbacks.generatedSecretName" . }}
{{- end }}
{{- end }}

{{- define "clipline.callbacks.secretKey" -}}
{{- if .Values.callbacks.existingSecret }}
{{- .Values.callbacks.existingSecretKey }}
{{- else }}secret{{- end }}
{{- end }}

{{/*
Artifact-store settings (`artifacts.*`) as literal env entries, for the job API and, through
the ClipPipeline's extraEnv, the workers. The credentials are not here: they come from
`artifacts.s3.existingSecret` through secretKeyRef (the API's env, the ClipPipeline's
`artifacts.secretRef`).
*/}}
{{- define "clipline.artifacts.env" -}}
{{- $a := .Values.artifacts }}
{{- if and (eq $a.store "s3") (not $a.s3.bucket) }}
{{- fail "artifacts.store=s3 needs artifacts.s3.bucket" }}
{{- end }}
- name: CLIPLINE_ARTIFACT_STORE
  value: {{ $a.store | quote }}
- name: CLIPLINE_ARTIFACT_TTL_S
  value: {{ int64 $a.ttlSeconds | quote }}
{{- if eq $a.store "s3" }}
- name: CLIPLINE_ARTIFACT_SERVE
  value: {{ $a.serve | quote }}
- name: CLIPLINE_ARTIFACT_URL_TTL_S
  value: {{ int64 $a.urlTtlSeconds | quote }}
- name: CLIPLINE_S3_BUCKET
  value: {{ $a.s3.bucket | quote }}
- name: CLIPLINE_S3_PREFIX
  value: {{ $a.s3.prefix | quote }}
{{- with $a.s3.endpoint }}
- name: CLIPLINE_S3_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with $a.s3.publicEndpoint }}
- name: CLIPLINE_S3_PUBLIC_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with $a.s3.region }}
- name: CLIPLINE_S3_REGION
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The Secret with the object store's access key pair; empty: none (the pods' identity).
*/}}
{{- define "clipline.artifacts.secretName" -}}
{{- if eq .Values.artifacts.store "s3" }}{{ .Values.artifacts.s3.existingSecret }}{{ end }}
{{- end }}

{{/*
The `helm test` hook: the Secret holding its bearer API key (tests.apiKey.existingSecret,
else the generated key's Secret; empty: no key, no test), and whether the workers accept
the private address of the media the test pod serves itself.
*/}}
{{- define "clipline.tests.keySecret" -}}
{{- if .Values.tests.apiKey.existingSecret }}
{{- .Values.tests.apiKey.existingSecret }}
{{- else if .Values.api.auth.generateKey }}
{{- include "clipline.api.keySecretName" . }}
{{- end }}
{{- end }}

{{- define "clipline.tests.keySecretKey" -}}
{{- if .Values.tests.apiKey.existingSecret }}
{{- .Values.tests.apiKey.existingSecretKey }}
{{- else }}key{{- end }}
{{- end }}

{{- define "clipline.tests.selfServed" -}}
{{- if or (not .Values.tests.videoUrl) (not .Values.tests.imageUrl) }}true{{ end }}
{{- end }}

{{- /* The test media Service's host name, when the test pod serves the media itself. */}}
{{- define "clipline.tests.mediaHost" -}}
{{- if and .Values.tests.enabled (include "clipline.tests.keySecret" .) (include "clipline.tests.selfServed" .) }}
{{- printf "%s.%s.svc" (include "clipline.componentName" (dict "ctx" . "component" "test-media")) .Release.Namespace }}
{{- end }}
{{- end }}

