{{/*
The chart name, at most 63 characters (a DNS label).
*/}}
{{- define "tokend.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of the release's resources: the release name, suffixed with the chart name
unless it already contains it; at most 63 characters.
*/}}
{{- define "tokend.fullname" -}}
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
The name of the migration hook's resources (Job and its hook-scoped ServiceAccount,
ConfigMap and Secret).
*/}}
{{- define "tokend.migrationName" -}}
{{- printf "%s-migrate" (include "tokend.fullname" . | trunc 55 | trimSuffix "-") }}
{{- end }}

{{/*
name-version, for the helm.sh/chart label.
*/}}
{{- define "tokend.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels of the server pods. The component keeps the migration Job's pod out of the
Service, the PodDisruptionBudget and the NetworkPolicy.
*/}}
{{- define "tokend.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tokend.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end }}

{{/*
Labels shared by every resource, whatever its component.
*/}}
{{- define "tokend.commonLabels" -}}
helm.sh/chart: {{ include "tokend.chart" . }}
app.kubernetes.io/name: {{ include "tokend.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tokend
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Labels of the server's resources.
*/}}
{{- define "tokend.labels" -}}
{{ include "tokend.commonLabels" . }}
app.kubernetes.io/component: server
{{- end }}

{{/*
Labels of the migration hook's resources and pod.
*/}}
{{- define "tokend.migrationLabels" -}}
{{ include "tokend.commonLabels" . }}
app.kubernetes.io/component: migration
{{- end }}

{{/*
The ServiceAccount the server pods run as.
*/}}
{{- define "tokend.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tokend.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The Secret the chart creates (database URL and/or pepper given as values).
*/}}
{{- define "tokend.secretName" -}}
{{- include "tokend.fullname" . }}
{{- end }}

{{/*
"true" when the chart creates a Secret: a database URL or a pepper given as a value.
*/}}
{{- define "tokend.createSecret" -}}
{{- if or (and (not .Values.database.sqlite) .Values.database.url (not .Values.database.existingSecret)) (and .Values.pepper.value (not .Values.pepper.existingSecret)) }}true{{ end }}
{{- end }}

{{/*
The data of the chart's Secret (shared by the Secret and the migration hook's copy).
*/}}
{{- define "tokend.secretData" -}}
{{- if and (not .Values.database.sqlite) .Values.database.url (not .Values.database.existingSecret) }}
database-url: {{ .Values.database.url | b64enc | quote }}
{{- end }}
{{- if and .Values.pepper.value (not .Values.pepper.existingSecret) }}
pepper: {{ .Values.pepper.value | b64enc | quote }}
{{- end }}
{{- end }}

{{/*
"true" when a pepper is configured (a value or an existing Secret).
*/}}
{{- define "tokend.pepperEnabled" -}}
{{- if or .Values.pepper.value .Values.pepper.existingSecret }}true{{ end }}
{{- end }}

{{/*
The image reference: repository@digest, or repository:tag (tag defaults to appVersion).
*/}}
{{- define "tokend.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
The SQLite database URL (file on the /data volume).
*/}}
{{- define "tokend.sqliteUrl" -}}
sqlite:///data/tokend.db?mode=rwc
{{- end }}

{{/*
"true" when Kubernetes runs a preStop `sleep` action (beta and on by default since 1.30).
*/}}
{{- define "tokend.preStopSleep" -}}
{{- if and (gt (int .Values.preStopSleepSeconds) 0) (semverCompare ">=1.30.0-0" .Capabilities.KubeVersion.Version) }}true{{ end }}
{{- end }}

{{/*
The least number of replicas the Deployment runs (the HPA's minimum when autoscaling).
*/}}
{{- define "tokend.minReplicas" -}}
{{- if .Values.autoscaling.enabled }}{{ int .Values.autoscaling.minReplicas }}{{ else }}{{ int .Values.replicaCount }}{{ end }}
{{- end }}

{{/*
The OTLP collector's port, from otel.endpoint (4317 when it names none).
*/}}
{{- define "tokend.otlpPort" -}}
{{- $host := (urlParse .Values.otel.endpoint).host }}
{{- if regexMatch ":[0-9]+$" $host }}{{ regexFind "[0-9]+$" $host }}{{ else }}4317{{ end }}
{{- end }}

{{/*
A TOML float: a number always written with a decimal point or an exponent.
*/}}
{{- define "tokend.tomlFloat" -}}
{{- $s := printf "%v" (float64 .) }}
{{- if regexMatch "[.eE]" $s }}{{ $s }}{{ else }}{{ $s }}.0{{ end }}
{{- end }}

{{/*
Refuse values that cannot work, with a message that says what to change. Included by every
template that depends on them, so `helm template` and `helm install` both stop.
*/}}
{{- define "tokend.validate" -}}
{{- $v := .Values }}
{{- if $v.database.sqlite }}
{{- if or (gt (int $v.replicaCount) 1) $v.autoscaling.enabled }}
{{- fail "database.sqlite supports exactly one replica: set replicaCount: 1 or use PostgreSQL (database.url / database.existingSecret)" }}
{{- end }}
{{- if or $v.database.url $v.database.existingSecret }}
{{- fail "database.sqlite is true but database.url or database.existingSecret is set too: choose SQLite or PostgreSQL" }}
{{- end }}
{{- else }}
{{- if not (or $v.database.url $v.database.existingSecret) }}
{{- fail "tokend needs a database: set database.url (postgres://...) or database.existingSecret, or database.sqlite: true for a single-replica SQLite install" }}
{{- end }}
{{- if and $v.database.url $v.database.existingSecret }}
{{- fail "set one of database.url and database.existingSecret, not both" }}
{{- end }}
{{- end }}
{{- if and $v.pepper.value $v.pepper.existingSecret }}
{{- fail "set one of pepper.value and pepper.existingSecret, not both" }}
{{- end }}
{{- if and $v.tls.enabled (not $v.tls.existingSecret) }}
{{- fail "tls.enabled needs tls.existingSecret: a kubernetes.io/tls Secret with tls.crt and tls.key (and ca.crt for tls.clientAuth)" }}
{{- end }}
{{- if and (ne $v.tls.clientAuth "none") (not $v.tls.enabled) }}
{{- fail "tls.clientAuth needs tls.enabled: true" }}
{{- end }}
{{- if and $v.database.sqlite (has "ReadWriteMany" $v.persistence.accessModes) }}
{{- fail "database.sqlite needs a ReadWriteOnce volume: SQLite's locking is not safe on shared (ReadWriteMany, NFS) filesystems" }}
{{- end }}
{{- if and $v.autoscaling.enabled (gt (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" }}
{{- end }}
{{- /* After the drain tokend still needs up to 2 s to close connections, 3 s to write the
last uses and, with traces, 5 s to export the last spans. */}}
{{- $afterDrain := ternary 10 5 (not (empty $v.otel.endpoint)) }}
{{- if gt (add (int $v.drainTimeoutSeconds) (int $v.preStopSleepSeconds) $afterDrain) (int $v.terminationGracePeriodSeconds) }}
{{- fail (printf "preStopSleepSeconds + drainTimeoutSeconds + %d s of exit work (closing connections, writing last uses%s) must fit in terminationGracePeriodSeconds, or the kubelet kills tokend before it is done" $afterDrain (ternary ", exporting spans" "" (not (empty $v.otel.endpoint)))) }}
{{- end }}
{{- end }}

{{/*
tokend.toml. Only keys tokend knows (an unknown key stops it at start). The database URL is
never here: it comes from TOKEND_DATABASE_URL (a Secret, or the SQLite path).
*/}}
{{- define "tokend.configToml" -}}
# tokend settings, rendered by the tokend Helm chart. TOKEND_* environment variables
# (extraEnv) override them; the database URL comes from TOKEND_DATABASE_URL.
listen = {{ printf "0.0.0.0:%d" (int .Values.containerPorts.grpc) | toJson }}
token_prefix = {{ .Values.tokenPrefix | toJson }}
migrate_on_start = {{ if .Values.database.sqlite }}true{{ else }}false{{ end }}
{{- if include "tokend.pepperEnabled" . }}
pepper_file = "/etc/tokend/pepper/pepper"
{{- end }}
drain_timeout_ms = {{ mul (int .Values.drainTimeoutSeconds) 1000 }}
{{- if .Values.tls.enabled }}
health_listen = {{ printf "0.0.0.0:%d" (int .Values.containerPorts.health) | toJson }}
{{- end }}

[log]
format = {{ .Values.log.format | toJson }}
filter = {{ .Values.log.level | toJson }}

[database]
max_connections = {{ int .Values.database.maxConnections }}

[cache]
max_tokens = {{ int .Values.cache.maxTokens }}

[metrics]
listen = {{ printf "0.0.0.0:%d" (int .Values.metrics.port) | toJson }}
{{- if .Values.otel.endpoint }}

[otel]
endpoint = {{ .Values.otel.endpoint | toJson }}
sample_ratio = {{ include "tokend.tomlFloat" .Values.otel.sampleRatio }}
service_name = {{ .Values.otel.serviceName | toJson }}
{{- end }}
{{- if .Values.tls.enabled }}

[tls]
cert_file = "/etc/tokend/tls/tls.crt"
key_file = "/etc/tokend/tls/tls.key"
{{- if ne .Values.tls.clientAuth "none" }}
client_ca_file = "/etc/tokend/tls/ca.crt"
client_auth_optional = {{ if eq .Values.tls.clientAuth "optional" }}true{{ else }}false{{ end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The container's environment. Call with (dict "ctx" $ "hook" true|false): the migration hook
reads the hook-scoped copy of the chart's Secret, which exists before the release's own.
*/}}
{{- define "tokend.env" -}}
{{- $ctx := .ctx -}}
- name: TOKEND_DATABASE_URL
{{- if $ctx.Values.database.sqlite }}
  value: {{ include "tokend.sqliteUrl" $ctx | quote }}
{{- else }}
  valueFrom:
    secretKeyRef:
{{- if $ctx.Values.database.existingSecret }}
      name: {{ $ctx.Values.database.existingSecret | quote }}
      key: {{ $ctx.Values.database.existingSecretKey | quote }}
{{- else }}
      name: {{ ternary (include "tokend.migrationName" $ctx) (include "tokend.secretName" $ctx) .hook | quote }}
      key: database-url
{{- end }}
{{- end }}
{{- with $ctx.Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The pod's volumes. Call with (dict "ctx" $ "hook" true|false).
*/}}
{{- define "tokend.volumes" -}}
{{- $ctx := .ctx -}}
{{- $own := ternary (include "tokend.migrationName" $ctx) (include "tokend.secretName" $ctx) .hook -}}
- name: config
  configMap:
    name: {{ ternary (include "tokend.migrationName" $ctx) (include "tokend.fullname" $ctx) .hook | quote }}
    items:
      - key: tokend.toml
        path: tokend.toml
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- /* `migrate` reads neither the pepper nor the certificates: the hook Job mounts neither,
so it never waits for a TLS Secret created in the same install, nor holds the pepper. */}}
{{- if and (include "tokend.pepperEnabled" $ctx) (not .hook) }}
- name: pepper
  secret:
    secretName: {{ default $own $ctx.Values.pepper.existingSecret | quote }}
    defaultMode: 288 # 0440: read-only for the owner and the fsGroup (65532)
    items:
      - key: {{ ternary $ctx.Values.pepper.existingSecretKey "pepper" (not (empty $ctx.Values.pepper.existingSecret)) | quote }}
        path: pepper
{{- end }}
{{- if and $ctx.Values.tls.enabled (not .hook) }}
- name: tls
  secret:
    secretName: {{ $ctx.Values.tls.existingSecret | quote }}
    defaultMode: 288 # 0440: read-only for the owner and the fsGroup (65532)
    items:
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
{{- if ne $ctx.Values.tls.clientAuth "none" }}
      - key: ca.crt
        path: ca.crt
{{- end }}
{{- end }}
{{- if and $ctx.Values.database.sqlite (not .hook) }}
- name: data
{{- if $ctx.Values.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ default (printf "%s-data" (include "tokend.fullname" $ctx)) $ctx.Values.persistence.existingClaim | quote }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- end }}
{{- with $ctx.Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The container's volume mounts. Call with (dict "ctx" $ "hook" true|false). The settings file
is mounted alone (subPath) so /etc/tokend/pepper and /etc/tokend/tls are plain directories;
a change of the ConfigMap rolls the pods through the checksum/config annotation.
*/}}
{{- define "tokend.volumeMounts" -}}
{{- $ctx := .ctx -}}
- name: config
  mountPath: /etc/tokend/tokend.toml
  subPath: tokend.toml
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- if and (include "tokend.pepperEnabled" $ctx) (not .hook) }}
- name: pepper
  mountPath: /etc/tokend/pepper
  readOnly: true
{{- end }}
{{- if and $ctx.Values.tls.enabled (not .hook) }}
- name: tls
  mountPath: /etc/tokend/tls
  readOnly: true
{{- end }}
{{- if and $ctx.Values.database.sqlite (not .hook) }}
- name: data
  mountPath: /data
{{- end }}
{{- with $ctx.Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}
