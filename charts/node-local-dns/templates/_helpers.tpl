{{/* Chart name, cut to the 63 characters of a DNS label. */}}
{{- define "node-local-dns.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Full resource name: fullnameOverride, or the release name when it already contains the chart
name, or RELEASE-CHART; cut to 63 characters.
*/}}
{{- define "node-local-dns.fullname" -}}
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
{{- define "node-local-dns.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select the pods; never change them on a running release. */}}
{{- define "node-local-dns.selectorLabels" -}}
app.kubernetes.io/name: {{ include "node-local-dns.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of every resource. */}}
{{- define "node-local-dns.labels" -}}
helm.sh/chart: {{ include "node-local-dns.chart" . }}
{{ include "node-local-dns.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/component: dns-cache
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Name of the ServiceAccount the pods run as. */}}
{{- define "node-local-dns.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "node-local-dns.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The container image: repository:tag, or repository@digest when a digest is set. */}}
{{- define "node-local-dns.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) -}}
{{- end -}}
{{- end -}}

{{/*
An int-or-string value (a count or a percentage). Helm reads numbers in values as float64, which
print as 1e+06 from 1000000 up; print whole numbers as integers.
*/}}
{{- define "node-local-dns.intOrString" -}}
{{- if kindIs "float64" . -}}
{{- int64 . -}}
{{- else -}}
{{- . -}}
{{- end -}}
{{- end -}}

{{/* "true" when the count or percentage is zero (0, "0", "0%"), else empty. */}}
{{- define "node-local-dns.isZero" -}}
{{- if regexMatch "^0+%?$" (include "node-local-dns.intOrString" . | toString) -}}
true
{{- end -}}
{{- end -}}

{{/*
"true" when the DaemonSet rolls with a surge (a new pod next to the old one on a node), else
empty. Fails the render when neither surge nor unavailability is allowed (Kubernetes would
reject the DaemonSet).
*/}}
{{- define "node-local-dns.surge" -}}
{{- $u := .Values.updateStrategy -}}
{{- $noSurge := include "node-local-dns.isZero" $u.maxSurge -}}
{{- if and $noSurge (include "node-local-dns.isZero" $u.maxUnavailable) -}}
{{- fail "updateStrategy: maxSurge and maxUnavailable cannot both be 0 (the rollout could never replace a pod)" -}}
{{- end -}}
{{- if not $noSurge -}}
true
{{- end -}}
{{- end -}}

{{/* "true" when node-local-dns is told to leave its rules and interface in place on exit. */}}
{{- define "node-local-dns.skipTeardown" -}}
{{- $v := .Values.skipTeardown -}}
{{- if eq (toString $v) "auto" -}}
{{- include "node-local-dns.surge" . -}}
{{- else if kindIs "bool" $v -}}
{{- if $v }}true{{ end -}}
{{- else -}}
{{- fail (printf "skipTeardown must be auto, true or false, not %q" (toString $v)) -}}
{{- end -}}
{{- end -}}

{{/* An IP address as the host part of HOST:PORT: IPv6 in brackets. */}}
{{- define "node-local-dns.hostPart" -}}
{{- if contains ":" . -}}
[{{ . }}]
{{- else -}}
{{ . }}
{{- end -}}
{{- end -}}

{{/*
Every address node-local-dns listens on, space-separated: localIPs, then the kube-dns ClusterIP
when set. Fails the render on an empty or repeated address.
*/}}
{{- define "node-local-dns.listenIPs" -}}
{{- $ips := list -}}
{{- if not .Values.localIPs -}}
{{- fail "localIPs: at least one address is required" -}}
{{- end -}}
{{- range $i, $ip := .Values.localIPs -}}
{{- $ips = append $ips (toString $ip) -}}
{{- end -}}
{{- with .Values.kubeDNS.clusterIP -}}
{{- if has (toString .) $ips -}}
{{- fail (printf "kubeDNS.clusterIP (%s) must not also be one of localIPs" (toString .)) -}}
{{- end -}}
{{- $ips = append $ips (toString .) -}}
{{- end -}}
{{- if ne (len $ips) (len (uniq $ips)) -}}
{{- fail (printf "localIPs: every address must appear once, got %s" (join ", " $ips)) -}}
{{- end -}}
{{- join " " $ips -}}
{{- end -}}

{{/* The address the health endpoint and the probes use: the first of localIPs. */}}
{{- define "node-local-dns.healthIP" -}}
{{- first .Values.localIPs | toString -}}
{{- end -}}

{{/* force_tcp or prefer_udp. */}}
{{- define "node-local-dns.transport" -}}
{{- if . }}force_tcp{{ else }}prefer_udp{{ end -}}
{{- end -}}

{{/*
One server block of the Corefile. Takes a dict: zone, cache (the cache directive, possibly
multi-line), to (forward target), transport, health (address or empty), imports (list), and
root (the chart context).
*/}}
{{- define "node-local-dns.serverBlock" -}}
{{ .zone }}:53 {
    errors
    {{ .cache }}
    reload
    loop
    bind {{ .bind }}
    forward . {{ .to }} {
        {{ .transport }}
    }
    prometheus :{{ .metricsPort }}
{{- with .health }}
    health {{ . }}
{{- end }}
{{- range .imports }}
    import {{ . }}
{{- end }}
}
{{- end -}}

{{/*
The Corefile template (Corefile.base): the upstream node-local-dns layout with the install-time
values filled in and the run-time placeholders __PILLAR__CLUSTER__DNS__ and
__PILLAR__UPSTREAM__SERVERS__ left for node-local-dns.
*/}}
{{- define "node-local-dns.corefile" -}}
{{- $bind := include "node-local-dns.listenIPs" . -}}
{{- $metricsPort := int .Values.metricsPort -}}
{{- $cluster := "__PILLAR__CLUSTER__DNS__" -}}
{{- $clusterTransport := include "node-local-dns.transport" .Values.forceTCPToClusterDNS -}}
{{- $c := .Values.cache.clusterZone -}}
{{- $clusterCache := printf "cache {\n        success %d %d\n        denial %d %d\n    }" (int $c.successCapacity) (int $c.successTTL) (int $c.denialCapacity) (int $c.denialTTL) -}}
{{- $otherCache := printf "cache %d" (int .Values.cache.otherZonesTTL) -}}
{{- $health := printf "%s:%d" (include "node-local-dns.hostPart" (include "node-local-dns.healthIP" .)) (int .Values.healthPort) -}}
{{- $imports := .Values.imports | default (list) -}}
{{- $common := dict "bind" $bind "metricsPort" $metricsPort -}}
{{- $blocks := list -}}
{{- $blocks = append $blocks (merge (dict "zone" .Values.clusterDomain "cache" $clusterCache "to" $cluster "transport" $clusterTransport "health" $health "imports" $imports) $common) -}}
{{- range $zone := list "in-addr.arpa" "ip6.arpa" -}}
{{- $blocks = append $blocks (merge (dict "zone" $zone "cache" $otherCache "to" $cluster "transport" $clusterTransport "health" "" "imports" (list)) $common) -}}
{{- end -}}
{{- if .Values.forwardExternalToClusterDNS -}}
{{- $blocks = append $blocks (merge (dict "zone" "." "cache" $otherCache "to" $cluster "transport" $clusterTransport "health" "" "imports" $imports) $common) -}}
{{- else -}}
{{- $blocks = append $blocks (merge (dict "zone" "." "cache" $otherCache "to" "__PILLAR__UPSTREAM__SERVERS__" "transport" (include "node-local-dns.transport" .Values.forceTCPToUpstreamDNS) "health" "" "imports" $imports) $common) -}}
{{- end -}}
{{- range $blocks }}
{{ include "node-local-dns.serverBlock" . }}
{{- end }}
{{- range .Values.extraServerBlocks }}
{{ . | trim }}
{{- end }}
{{- end -}}

{{/*
The container's capabilities: drop every one, then add what node-local-dns needs:
NET_ADMIN (the dummy interface, its addresses, iptables rules), NET_BIND_SERVICE (port 53) and,
when it manages iptables rules, NET_RAW (the iptables-legacy backend opens a raw socket).
*/}}
{{- define "node-local-dns.capabilities" -}}
{{- $add := list "NET_ADMIN" "NET_BIND_SERVICE" -}}
{{- if .Values.iptables.setup -}}
{{- $add = append $add "NET_RAW" -}}
{{- end -}}
{{- if .Values.fastPath.enabled -}}
{{- $add = concat $add (list "BPF" "PERFMON") -}}
{{- end -}}
{{- toYaml (dict "drop" (list "ALL") "add" $add) -}}
{{- end -}}

{{/* node-local-dns's arguments (k8s-dns-node-cache's flags), as a YAML list. */}}
{{- define "node-local-dns.args" -}}
{{- $args := list "-localip" (include "node-local-dns.listenIPs" . | replace " " ",") "-conf" "/etc/Corefile" "-upstreamsvc" .Values.kubeDNSUpstream.name "-health-port" (toString (int .Values.healthPort)) -}}
{{- if ne (int .Values.errorMetricsPort) 9353 -}}
{{- $args = concat $args (list "-metrics-listen-address" (printf "0.0.0.0:%d" (int .Values.errorMetricsPort))) -}}
{{- end -}}
{{- if include "node-local-dns.skipTeardown" . -}}
{{- $args = append $args "-skipteardown" -}}
{{- end -}}
{{- if not .Values.iptables.setup -}}
{{- $args = append $args "-setupiptables=false" -}}
{{- end -}}
{{- with .Values.fastPath -}}
{{- if .enabled -}}
{{- if not .interfaces -}}
{{- fail "fastPath.interfaces: name at least one interface when fastPath.enabled is true" -}}
{{- end -}}
{{- $args = concat $args (list (printf "--fast-path-mode=%s" .mode) (printf "--fast-path-interfaces=%s" (join "," .interfaces))) -}}
{{- end -}}
{{- end -}}
{{- $args = concat $args (.Values.extraArgs | default (list)) -}}
{{- toYaml $args -}}
{{- end -}}
