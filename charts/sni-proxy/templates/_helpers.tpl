{{/* Chart name, cut to the 63 characters of a DNS label. */}}
{{- define "sni-proxy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Full resource name: fullnameOverride, or the release name when it already contains the chart
name, or RELEASE-CHART; cut to 63 characters.
*/}}
{{- define "sni-proxy.fullname" -}}
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
{{- define "sni-proxy.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select the pods; never change them on a running release. */}}
{{- define "sni-proxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sni-proxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of every resource. */}}
{{- define "sni-proxy.labels" -}}
helm.sh/chart: {{ include "sni-proxy.chart" . }}
{{ include "sni-proxy.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/component: proxy
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Name of the ServiceAccount the pods run as. */}}
{{- define "sni-proxy.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "sni-proxy.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The container image: repository:tag, or repository@digest when a digest is set. */}}
{{- define "sni-proxy.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) -}}
{{- end -}}
{{- end -}}

{{/* Directory the ConfigMap is mounted at, and the config file inside it. */}}
{{- define "sni-proxy.configDir" -}}/etc/sni-proxy{{- end -}}
{{- define "sni-proxy.configFile" -}}config.yaml{{- end -}}

{{/*
Seconds (rounded up) of a duration in the proxy's syntax ("250ms", "30s", "5m", "24h", a
sequence of those such as "1m30s", or a bare 0). Anything else fails the render, naming the
value.
*/}}
{{- define "sni-proxy.durationSeconds" -}}
{{- $d := toString . -}}
{{- if eq $d "0" -}}
0
{{- else if regexMatch "^([0-9]+(ms|s|m|h))+$" $d -}}
{{- $ms := 0 -}}
{{- range regexFindAll "[0-9]+(ms|s|m|h)" $d -1 -}}
{{- $n := regexFind "^[0-9]+" . | atoi -}}
{{- $unit := trimPrefix (regexFind "^[0-9]+" .) . -}}
{{- $factor := get (dict "ms" 1 "s" 1000 "m" 60000 "h" 3600000) $unit -}}
{{- $ms = add $ms (mul $n $factor) -}}
{{- end -}}
{{- div (add $ms 999) 1000 -}}
{{- else -}}
{{- fail (printf "cannot read the duration %q (write e.g. 250ms, 30s, 5m, 24h)" $d) -}}
{{- end -}}
{{- end -}}

{{/*
A listener's PROXY protocol setting. YAML 1.1 reads an unquoted `off` as false; turn it back into
the proxy's "off" instead of rendering `proxy_protocol: false`.
*/}}
{{- define "sni-proxy.proxyProtocol" -}}
{{- if kindIs "bool" . -}}
{{- if . -}}
{{- fail "listeners[].proxyProtocol: true is not a mode; use \"off\", \"optional\" or \"required\"" -}}
{{- else -}}
off
{{- end -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end -}}

{{/*
The proxy's config file (docs/sni-proxy.md), as YAML. Listeners and the admin endpoint are
built from the chart's values (the address always binds .Values.bindAddress, so the Service and
the probes reach it); routes, limits, timeouts, keepalive and health are copied verbatim.
*/}}
{{- define "sni-proxy.config" -}}
{{- if not .Values.listeners -}}
{{- fail "listeners: the proxy needs at least one listener" -}}
{{- end -}}
{{- $bind := .Values.bindAddress | toString -}}
{{- $listeners := list -}}
{{- range $i, $l := .Values.listeners -}}
{{- if not $l.name -}}
{{- fail (printf "listeners[%d].name is required" $i) -}}
{{- end -}}
{{- if not $l.port -}}
{{- fail (printf "listeners[%d].port is required" $i) -}}
{{- end -}}
{{- $out := dict "name" $l.name "address" (printf "%s:%d" $bind (int $l.port)) -}}
{{- with $l.mode -}}
{{- $_ := set $out "mode" . -}}
{{- end -}}
{{- if hasKey $l "proxyProtocol" -}}
{{- $_ := set $out "proxy_protocol" (include "sni-proxy.proxyProtocol" $l.proxyProtocol) -}}
{{- end -}}
{{- with $l.trustedProxies -}}
{{- $_ := set $out "trusted_proxies" . -}}
{{- end -}}
{{- with $l.dataPath -}}
{{- $_ := set $out "data_path" . -}}
{{- end -}}
{{- with $l.maxClientHelloBytes -}}
{{- $_ := set $out "max_client_hello_bytes" (int .) -}}
{{- end -}}
{{- $listeners = append $listeners $out -}}
{{- end -}}
{{- $config := dict "admin" (dict "address" (printf "%s:%d" $bind (int .Values.admin.port))) -}}
{{- $_ := set $config "listeners" $listeners -}}
{{- $_ := set $config "routes" (.Values.routes | default (list)) -}}
{{- with .Values.unknownSni -}}
{{- $_ := set $config "unknown_sni" (toString .) -}}
{{- end -}}
{{- with .Values.limits -}}
{{- $_ := set $config "limits" . -}}
{{- end -}}
{{- with .Values.timeouts -}}
{{- $_ := set $config "timeouts" . -}}
{{- end -}}
{{- with .Values.keepalive -}}
{{- $_ := set $config "keepalive" . -}}
{{- end -}}
{{- with .Values.health -}}
{{- $_ := set $config "health" . -}}
{{- end -}}
{{- if kindIs "bool" .Values.accessLog -}}
{{- $_ := set $config "access_log" .Values.accessLog -}}
{{- end -}}
{{- with .Values.reloadInterval -}}
{{- $_ := set $config "reload_interval" (toString .) -}}
{{- end -}}
{{- if .Values.kubernetes.enabled -}}
{{- $kube := dict "namespace" .Release.Namespace -}}
{{- with .Values.kubernetes.istioSelector -}}
{{- $_ := set $kube "istio" (dict "selector" .) -}}
{{- end -}}
{{- with .Values.kubernetes.connectAllow -}}
{{- $_ := set $kube "connect_allow" (toString .) -}}
{{- end -}}
{{- with .Values.kubernetes.gatewayApi -}}
{{- if .enabled -}}
{{- $_ := set $kube "gateway_api" (dict "gateway_class" (toString .gatewayClass) "controller_name" (toString .controllerName)) -}}
{{- end -}}
{{- end -}}
{{- $_ := set $config "kubernetes" $kube -}}
{{- end -}}
{{- /* Sections in the order of docs/sni-proxy.md, so the file reads like the reference. */ -}}
{{- range $key := list "admin" "listeners" "routes" "unknown_sni" "limits" "timeouts" "keepalive" "health" "access_log" "reload_interval" "kubernetes" }}
{{- if hasKey $config $key }}
{{ toYaml (dict $key (get $config $key)) }}
{{- end }}
{{- end }}
{{- end -}}

{{/*
Fails the render unless the pod's grace period outlasts the preStop sleep plus the proxy's own
shutdown grace (timeouts.shutdown_grace, proxy default 30s).
*/}}
{{- define "sni-proxy.checkGracePeriod" -}}
{{- $grace := include "sni-proxy.durationSeconds" (dig "shutdown_grace" "30s" (.Values.timeouts | default dict)) | atoi -}}
{{- $preStop := int (.Values.preStopSleepSeconds | default 0) -}}
{{- $period := int .Values.terminationGracePeriodSeconds -}}
{{- if le $period (add $grace $preStop) -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be larger than preStopSleepSeconds (%d) + timeouts.shutdown_grace (%ds), or Kubernetes kills the proxy while it drains" $period $preStop $grace) -}}
{{- end -}}
{{- end -}}

{{/*
An int-or-string value (a count or a percentage). Helm reads numbers in values as float64, which
print as 1e+06 from 1000000 up; print whole numbers as integers.
*/}}
{{- define "sni-proxy.intOrString" -}}
{{- if kindIs "float64" . -}}
{{- int64 . -}}
{{- else -}}
{{- . -}}
{{- end -}}
{{- end -}}
