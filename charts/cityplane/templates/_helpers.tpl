{{/* Names ---------------------------------------------------------------------------------- */}}

{{- define "cityplane.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped base name; component objects append "-<component>" (cut at 63). */}}
{{- define "cityplane.fullname" -}}
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
(dict "ctx" $ "component" "gateway") -> <fullname>-gateway. The base name is cut, never the
suffix, so long release names cannot make two objects' names collide.
*/}}
{{- define "cityplane.componentName" -}}
{{- $suffix := printf "-%s" .component }}
{{- $base := include "cityplane.fullname" .ctx | trunc (int (sub 63 (len $suffix))) | trimSuffix "-" }}
{{- printf "%s%s" $base $suffix }}
{{- end }}

{{- define "cityplane.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels --------------------------------------------------------------------------------- */}}

{{/*
Selector labels: only name, instance and component, never the chart or app version, because a
Deployment's spec.selector is immutable and an upgrade that changed it would fail.
*/}}
{{- define "cityplane.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cityplane.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "cityplane.labels" -}}
helm.sh/chart: {{ include "cityplane.chart" .ctx }}
{{ include "cityplane.selectorLabels" . }}
app.kubernetes.io/version: {{ include "cityplane.imageTag" .ctx | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: cityplane
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Image ---------------------------------------------------------------------------------- */}}

{{- define "cityplane.imageTag" -}}
{{- default .Chart.AppVersion .Values.image.tag }}
{{- end }}

{{- define "cityplane.image" -}}
{{- $registry := default .Values.image.registry .Values.global.imageRegistry }}
{{- $repository := .Values.image.repository }}
{{- if $registry }}{{ $repository = printf "%s/%s" $registry $repository }}{{ end }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" $repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" $repository (include "cityplane.imageTag" .) }}
{{- end }}
{{- end }}

{{- define "cityplane.imagePullSecrets" -}}
{{- $secrets := concat (default list .Values.global.imagePullSecrets) (default list .Values.imagePullSecrets) }}
{{- with $secrets }}
imagePullSecrets:
{{- range . }}
{{- if kindIs "string" . }}
  - name: {{ . }}
{{- else }}
  - name: {{ .name }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Service accounts ----------------------------------------------------------------------- */}}

{{- define "cityplane.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "cityplane.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "cityplane.operatorServiceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "cityplane.componentName" (dict "ctx" . "component" "operator")) .Values.operator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* URLs between the parts ----------------------------------------------------------------- */}}

{{- define "cityplane.registryUrl" -}}
{{- printf "http://%s.%s.svc:%v" (include "cityplane.componentName" (dict "ctx" . "component" "registry")) .Release.Namespace .Values.registry.service.port }}
{{- end }}

{{- define "cityplane.identityUrl" -}}
{{- printf "http://%s.%s.svc:%v" (include "cityplane.componentName" (dict "ctx" . "component" "identity")) .Release.Namespace .Values.identity.service.port }}
{{- end }}

{{/* The gateway's public URL (CityApps' status.url): its first ingress host, if any. */}}
{{- define "cityplane.gatewayUrl" -}}
{{- $ing := .Values.gateway.ingress }}
{{- if and $ing.enabled $ing.hosts }}
{{- printf "%s://%s" (ternary "https" "http" (gt (len $ing.tls) 0)) (first $ing.hosts).host }}
{{- end }}
{{- end }}

{{/* What tokens carry in `iss`: the public URL when set, else the in-cluster one. */}}
{{- define "cityplane.identityIssuer" -}}
{{- if .Values.identity.issuer }}
{{- .Values.identity.issuer | trimSuffix "/" }}
{{- else if and .Values.identity.ingress.enabled .Values.identity.ingress.host }}
{{- printf "%s://%s" (ternary "https" "http" (gt (len .Values.identity.ingress.tls) 0)) .Values.identity.ingress.host }}
{{- else }}
{{- include "cityplane.identityUrl" . }}
{{- end }}
{{- end }}

{{/* Secrets -------------------------------------------------------------------------------- */}}

{{- define "cityplane.adminTokensSecretName" -}}
{{- default (include "cityplane.componentName" (dict "ctx" . "component" "admin-tokens")) .Values.adminTokens.existingSecret }}
{{- end }}

{{/* The Secret the chart writes for passwords given as plain values. */}}
{{- define "cityplane.externalSecretName" -}}
{{- include "cityplane.componentName" (dict "ctx" . "component" "external") }}
{{- end }}

{{- define "cityplane.externalSecretNeeded" -}}
{{- $pg := .Values.postgresql }}
{{- $redis := .Values.redis }}
{{- if or (and $pg.enabled (not $pg.urlSecret.name) (not $pg.existingSecret) $pg.password) (and $redis.enabled (not $redis.urlSecret.name) (not $redis.existingSecret) $redis.password) }}true{{ end }}
{{- end }}

{{/*
CITYPLANE_DATABASE_URL for one part ("registry" or "identity"), as env entries. Passwords stay
in Secrets: Kubernetes expands $(VAR) from earlier entries of the same env list.
*/}}
{{- define "cityplane.databaseEnv" -}}
{{- $pg := .ctx.Values.postgresql }}
{{- if $pg.enabled }}
{{- if $pg.urlSecret.name }}
- name: CITYPLANE_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ $pg.urlSecret.name }}
      key: {{ index $pg.urlSecret (printf "%sKey" .part) }}
{{- else }}
- name: POSTGRESQL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ default (include "cityplane.externalSecretName" .ctx) $pg.existingSecret }}
      key: {{ ternary $pg.existingSecretPasswordKey "postgresql-password" (ne $pg.existingSecret "") }}
{{- $database := index $pg (printf "%sDatabase" .part) }}
- name: CITYPLANE_DATABASE_URL
  value: {{ printf "postgresql+asyncpg://%s:$(POSTGRESQL_PASSWORD)@%s:%v/%s%s" $pg.username $pg.host $pg.port $database (ternary (printf "?ssl=%s" $pg.ssl) "" (ne $pg.ssl "")) | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* CITYPLANE_REDIS_URL as env entries (read by the gateway's --redis and the hub). */}}
{{- define "cityplane.redisEnv" -}}
{{- $redis := .Values.redis }}
{{- if $redis.enabled }}
{{- if $redis.urlSecret.name }}
- name: CITYPLANE_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ $redis.urlSecret.name }}
      key: {{ $redis.urlSecret.key }}
{{- else }}
{{- $auth := "" }}
{{- if or $redis.existingSecret $redis.password }}
{{- $auth = ":$(REDIS_PASSWORD)@" }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ default (include "cityplane.externalSecretName" .) $redis.existingSecret }}
      key: {{ ternary $redis.existingSecretPasswordKey "redis-password" (ne $redis.existingSecret "") }}
{{- end }}
- name: CITYPLANE_REDIS_URL
  value: {{ printf "%s://%s%s:%v/%v" (ternary "rediss" "redis" $redis.tls) $auth $redis.host $redis.port $redis.database | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* Pods ----------------------------------------------------------------------------------- */}}

{{/*
What every pod shares: no service-link env vars (a Service named "<release>-registry" would
otherwise inject CITYPLANE_REGISTRY_PORT=tcp://… into every pod, and the CLI reads CITYPLANE_*),
the restricted security context, pull secrets.
*/}}
{{- define "cityplane.podDefaults" -}}
enableServiceLinks: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- include "cityplane.imagePullSecrets" . }}
{{- end }}

{{/* Scheduling knobs of one part: (dict "ctx" $ "part" .Values.gateway "component" "gateway") */}}
{{- define "cityplane.scheduling" -}}
{{- with .part.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .part.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .part.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .part.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if hasKey .part "topologySpreadConstraints" }}
topologySpreadConstraints:
{{- if .part.topologySpreadConstraints }}
  {{- toYaml .part.topologySpreadConstraints | nindent 2 }}
{{- else }}
  {{- range $key := list "kubernetes.io/hostname" "topology.kubernetes.io/zone" }}
  - maxSkew: 1
    topologyKey: {{ $key }}
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- include "cityplane.selectorLabels" (dict "ctx" $.ctx "component" $.component) | nindent 8 }}
  {{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* The ConfigMap of one part's CITYPLANE_* settings; pods carry its checksum to roll on change. */}}
{{- define "cityplane.settingsData" -}}
CITYPLANE_LOG_LEVEL: {{ .ctx.Values.logLevel | quote }}
{{- range $key, $value := .part.env }}
{{ $key }}: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{/* Checks across values that the JSON schema cannot express. */}}
{{- define "cityplane.validate" -}}
{{- $pg := .Values.postgresql }}
{{- $redis := .Values.redis }}
{{- if and $pg.enabled (not $pg.urlSecret.name) (not $pg.host) }}
{{- fail "postgresql.enabled needs postgresql.host (with a password) or postgresql.urlSecret.name" }}
{{- end }}
{{- if and $pg.enabled (not $pg.urlSecret.name) (not $pg.existingSecret) (not $pg.password) }}
{{- fail "postgresql.host needs postgresql.existingSecret or postgresql.password" }}
{{- end }}
{{- if and $redis.enabled (not $redis.urlSecret.name) (not $redis.host) }}
{{- fail "redis.enabled needs redis.host or redis.urlSecret.name" }}
{{- end }}
{{- if and (gt (int .Values.registry.replicaCount) 1) (not $pg.enabled) }}
{{- fail "registry.replicaCount > 1 needs postgresql.enabled: SQLite on one PVC serves one replica" }}
{{- end }}
{{- if and .Values.identity.enabled (gt (int .Values.identity.replicaCount) 1) (not (and $pg.enabled $redis.enabled)) }}
{{- fail "identity.replicaCount > 1 needs postgresql.enabled and redis.enabled" }}
{{- end }}
{{- if and .Values.identity.keySecret.previousKey (not .Values.identity.keySecret.existingSecret) }}
{{- fail "identity.keySecret.previousKey needs identity.keySecret.existingSecret (the Secret holding both)" }}
{{- end }}
{{- $as := .Values.gateway.autoscaling }}
{{- if and $as.enabled $as.targetCPUUtilizationPercentage (not (dig "requests" "cpu" "" (default dict .Values.gateway.resources))) }}
{{- fail "gateway.autoscaling on CPU needs gateway.resources.requests.cpu: utilization is measured against the request" }}
{{- end }}
{{- if and $as.enabled (gt (int $as.minReplicas) (int $as.maxReplicas)) }}
{{- fail "gateway.autoscaling.minReplicas must not exceed maxReplicas" }}
{{- end }}
{{- end }}
