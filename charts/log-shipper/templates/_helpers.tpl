{{/* Chart name, cut to the 63 characters of a DNS label. */}}
{{- define "log-shipper.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Full resource name: fullnameOverride, or the release name when it already contains the chart
name, or RELEASE-CHART; cut to 63 characters.
*/}}
{{- define "log-shipper.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* chart-version, for the helm.sh/chart label. */}}
{{- define "log-shipper.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select the pods; never change them on a running release. */}}
{{- define "log-shipper.selectorLabels" -}}
app.kubernetes.io/name: {{ include "log-shipper.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of every resource. */}}
{{- define "log-shipper.labels" -}}
helm.sh/chart: {{ include "log-shipper.chart" . }}
{{ include "log-shipper.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/component: log-shipper
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Name of the ServiceAccount the pods run as. */}}
{{- define "log-shipper.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "log-shipper.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The container image: repository:tag, or repository@digest when a digest is set. */}}
{{- define "log-shipper.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) -}}
{{- end -}}
{{- end -}}

{{/*
A whole number from values: Helm reads numbers as float64, which print as 1.048576e+06 from
1000000 up; print them as integers.
*/}}
{{- define "log-shipper.int" -}}
{{- int64 . -}}
{{- end -}}

{{/* An int-or-string value (a count or a percentage), whole numbers printed as integers. */}}
{{- define "log-shipper.intOrString" -}}
{{- if kindIs "float64" . -}}
{{- int64 . -}}
{{- else -}}
{{- . -}}
{{- end -}}
{{- end -}}

{{/*
updateStrategy.maxUnavailable, checked: maxSurge is always 0, so 0 (or "0%") here would let the
rollout never replace a pod (Kubernetes rejects the DaemonSet).
*/}}
{{- define "log-shipper.maxUnavailable" -}}
{{- $v := include "log-shipper.intOrString" .Values.updateStrategy.maxUnavailable -}}
{{- if regexMatch "^0+%?$" $v -}}
{{- fail (printf "updateStrategy.maxUnavailable must not be %s: maxSurge is always 0 (two shippers on a node would share the checkpoint directory), so the rollout could never replace a pod" $v) -}}
{{- end -}}
{{- $v -}}
{{- end -}}

{{/*
The admin server's address as HOST:PORT (IPv6 in brackets). Fails on a loopback host: the
kubelet's probes and Prometheus come to the pod IP.
*/}}
{{- define "log-shipper.adminAddress" -}}
{{- $host := toString .Values.admin.host -}}
{{- if or (hasPrefix "127." $host) (eq $host "::1") -}}
{{- fail (printf "admin.host: %s is a loopback address, but the kubelet's probes and Prometheus reach the admin server on the pod IP; use 0.0.0.0 or ::" $host) -}}
{{- end -}}
{{- if contains ":" $host -}}
{{- printf "[%s]:%d" $host (int64 .Values.admin.port) -}}
{{- else -}}
{{- printf "%s:%d" $host (int64 .Values.admin.port) -}}
{{- end -}}
{{- end -}}

{{/* Where the checkpoint directory is mounted in the container (the config's input.checkpoint_dir). */}}
{{- define "log-shipper.checkpointDir" -}}
/var/lib/log-shipper
{{- end -}}

{{/* Where the ConfigMap is mounted in the container. */}}
{{- define "log-shipper.configDir" -}}
/etc/log-shipper
{{- end -}}

{{/* One store of the config; takes the store's values. Strings as JSON (a YAML subset). */}}
{{/*
A store's settings, called with (dict "name" "seed" "store" .Values.stores.seed). An https URL
needs tls.secretName (the agent refuses an https store without a CA bundle); an http one takes
none.
*/}}
{{- define "log-shipper.store" -}}
{{- $s := .store -}}
{{- $tls := $s.tls | default dict -}}
url: {{ toJson $s.url }}
protocol: {{ $s.protocol }}
{{- if $s.tenant }}
tenant: {{ toJson $s.tenant }}
{{- end }}
{{- if hasPrefix "https://" $s.url }}
{{- if not $tls.secretName }}
{{- fail (printf "stores.%s.tls.secretName: an https store needs a Secret with ca.crt, the CA bundle its certificate is checked against" .name) }}
{{- end }}
{{- $dir := printf "/etc/log-shipper/tls/%s" .name }}
ca: {{ printf "%s/ca.crt" $dir }}
{{- if $tls.clientCertificate }}
cert: {{ printf "%s/tls.crt" $dir }}
key: {{ printf "%s/tls.key" $dir }}
{{- end }}
{{- else if $tls.secretName }}
{{- fail (printf "stores.%s.tls.secretName: TLS settings are for an https URL only" .name) }}
{{- end }}
{{- end -}}

{{/*
The agent's config file (log-shipper/src/config.rs; every section refuses unknown fields).
Every knob is written out, so the file says what the agent does.
*/}}
{{- define "log-shipper.config" -}}
{{- $in := .Values.input -}}
{{- $d := .Values.delivery -}}
{{- if gt (int64 $in.maxEntryBytes) (int64 $d.batchBytes) -}}
{{- fail (printf "delivery.batchBytes (%d) must be at least input.maxEntryBytes (%d): a batch holds at least one entry" (int64 $d.batchBytes) (int64 $in.maxEntryBytes)) -}}
{{- end -}}
admin:
  # /metrics, /healthz, /readyz
  address: {{ toJson (include "log-shipper.adminAddress" .) }}
input:
  path: {{ toJson $in.path }}
  checkpoint_dir: {{ toJson (include "log-shipper.checkpointDir" .) }}
  max_entry_bytes: {{ include "log-shipper.int" $in.maxEntryBytes }}
  partial_timeout: {{ $in.partialTimeout }}
  rescan_interval: {{ $in.rescanInterval }}
  max_open_files: {{ include "log-shipper.int" $in.maxOpenFiles }}
stores:
  seed:
    {{- include "log-shipper.store" (dict "name" "seed" "store" .Values.stores.seed) | nindent 4 }}
  shoot:
    {{- include "log-shipper.store" (dict "name" "shoot" "store" .Values.stores.shoot) | nindent 4 }}
delivery:
  batch_bytes: {{ include "log-shipper.int" $d.batchBytes }}
  batch_wait: {{ $d.batchWait }}
  request_timeout: {{ $d.requestTimeout }}
  min_backoff: {{ $d.minBackoff }}
  max_backoff: {{ $d.maxBackoff }}
  max_outage: {{ $d.maxOutage }}
  outage_policy: {{ $d.outagePolicy }}
{{- if .Values.lifecycle.enabled }}
# Shoot lifecycle from Cluster resources, through the pod's service account.
kubernetes:
  sync_timeout: {{ .Values.lifecycle.syncTimeout }}
  {{- with .Values.lifecycle.routing }}
  routing: {{ toJson . }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* "true" when the ClusterRole and its binding are rendered. */}}
{{- define "log-shipper.rbac" -}}
{{- if and .Values.lifecycle.enabled .Values.rbac.create -}}
true
{{- end -}}
{{- end -}}

{{/*
Fails when input.path and the chart's own mounts (the checkpoint and config directories) would
overlap in the container.
*/}}
{{- define "log-shipper.checkMounts" -}}
{{- $in := trimSuffix "/" .Values.input.path -}}
{{- range $other := list (include "log-shipper.checkpointDir" $) (include "log-shipper.configDir" $) -}}
{{- if or (eq $in "") (eq $in $other) (hasPrefix (printf "%s/" $in) $other) (hasPrefix (printf "%s/" $other) $in) -}}
{{- fail (printf "input.path (%s) must not be %s, inside it or above it: both are mounted in the pod" $.Values.input.path $other) -}}
{{- end -}}
{{- end -}}
{{- end -}}
