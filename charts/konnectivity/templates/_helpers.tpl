{{/* Chart name, cut to the 63 characters of a DNS label. */}}
{{- define "konnectivity.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Full resource name: fullnameOverride, or the release name when it already contains the chart
name, or RELEASE-CHART; cut to 55 characters (room for the -server and -agent suffixes).
*/}}
{{- define "konnectivity.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 55 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 55 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 55 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Names of the server's and the agent's objects. */}}
{{- define "konnectivity.serverName" -}}{{ include "konnectivity.fullname" . }}-server{{- end -}}
{{- define "konnectivity.agentName" -}}{{ include "konnectivity.fullname" . }}-agent{{- end -}}
{{/* The Service agents connect to (it lists servers that are not Ready yet: see service.yaml). */}}
{{- define "konnectivity.agentServiceName" -}}{{ include "konnectivity.fullname" . }}-server-agents{{- end -}}

{{/* chart-version, for the helm.sh/chart label. */}}
{{- define "konnectivity.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Labels that select the pods of one component; never change them on a running release. Takes a
dict: root (the chart context) and component (server or agent).
*/}}
{{- define "konnectivity.selectorLabels" -}}
app.kubernetes.io/name: {{ include "konnectivity.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Labels of every resource of one component (dict: root, component). */}}
{{- define "konnectivity.labels" -}}
helm.sh/chart: {{ include "konnectivity.chart" .root }}
{{ include "konnectivity.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Values.image.tag | default .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The container image: repository:tag, or repository@digest when a digest is set. */}}
{{- define "konnectivity.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) -}}
{{- end -}}
{{- end -}}

{{/* Name of the server's ServiceAccount (deployment mode). */}}
{{- define "konnectivity.serverServiceAccountName" -}}
{{- default (include "konnectivity.serverName" .) .Values.server.serviceAccount.name -}}
{{- end -}}

{{/* Name of the agents' ServiceAccount: the one their tokens must belong to. */}}
{{- define "konnectivity.agentServiceAccountName" -}}
{{- default (include "konnectivity.agentName" .) .Values.agent.serviceAccount.name -}}
{{- end -}}

{{/* Namespace of the agents' ServiceAccount, as the server checks it. */}}
{{- define "konnectivity.agentNamespace" -}}
{{- default .Release.Namespace .Values.auth.agentNamespace -}}
{{- end -}}

{{/* The server's --mode from server.proxyProtocol. */}}
{{- define "konnectivity.serverMode" -}}
{{- if eq .Values.server.proxyProtocol "GRPC" -}}grpc{{- else -}}http-connect{{- end -}}
{{- end -}}

{{/* Secret names of the server's TLS material (empty values: derived from the release). */}}
{{- define "konnectivity.clusterTLSSecret" -}}
{{- default (printf "%s-cluster-tls" (include "konnectivity.serverName" .)) .Values.server.tls.clusterSecretName -}}
{{- end -}}
{{- define "konnectivity.frontendTLSSecret" -}}
{{- default (printf "%s-frontend-tls" (include "konnectivity.serverName" .)) .Values.server.tls.frontendSecretName -}}
{{- end -}}

{{/* Where the server reads its files. */}}
{{- define "konnectivity.clusterTLSDir" -}}/etc/konnectivity-server/cluster-tls{{- end -}}
{{- define "konnectivity.frontendTLSDir" -}}/etc/konnectivity-server/frontend-tls{{- end -}}
{{- define "konnectivity.kubeconfigDir" -}}/etc/konnectivity-server/kubeconfig{{- end -}}
{{/* Where the agent reads its projected token and the cluster CA. */}}
{{- define "konnectivity.agentSecretsDir" -}}/var/run/secrets/konnectivity-agent{{- end -}}

{{/* The EgressSelectorConfiguration's file name (ConfigMap key). */}}
{{- define "konnectivity.egressSelectorFile" -}}egress-selector-configuration.yaml{{- end -}}

{{/*
Whole seconds of a duration in the binaries' syntax ("500ms", "30s", "5m", "1h", sequences such
as "1m30s", or 0), rounded up. Anything else fails the render naming the value.
*/}}
{{- define "konnectivity.durationSeconds" -}}
{{- $d := toString . -}}
{{- if eq $d "0" -}}
0
{{- else if regexMatch "^([0-9]+(ms|s|m|h))+$" $d -}}
{{- $ms := 0 -}}
{{- range regexFindAll "[0-9]+(ms|s|m|h)" $d -1 -}}
{{- $n := regexFind "^[0-9]+" . | atoi -}}
{{- $unit := trimPrefix (regexFind "^[0-9]+" .) . -}}
{{- $ms = add $ms (mul $n (get (dict "ms" 1 "s" 1000 "m" 60000 "h" 3600000) $unit)) -}}
{{- end -}}
{{- div (add $ms 999) 1000 -}}
{{- else -}}
{{- fail (printf "cannot read the duration %q (write e.g. 500ms, 30s, 5m, 1h)" $d) -}}
{{- end -}}
{{- end -}}

{{/*
An int-or-string value (a count or a percentage). Helm reads numbers in values as float64; print
whole numbers as integers.
*/}}
{{- define "konnectivity.intOrString" -}}
{{- if kindIs "float64" . -}}
{{- int64 . -}}
{{- else -}}
{{- . -}}
{{- end -}}
{{- end -}}

{{/* Checks across values that the schema cannot express; each failure names the values. */}}
{{- define "konnectivity.check" -}}
{{- $s := .Values.server -}}
{{- if and (eq $s.mode "deployment") (eq $s.proxyProtocol "GRPC") -}}
{{- fail "server.proxyProtocol GRPC needs server.mode sidecar: kube-apiserver speaks gRPC to konnectivity only over a Unix socket (use HTTPConnect for the deployment mode)" -}}
{{- end -}}
{{- $grace := include "konnectivity.durationSeconds" $s.gracefulShutdownTimeout | atoi -}}
{{- if le (int $s.terminationGracePeriodSeconds) $grace -}}
{{- fail (printf "server.terminationGracePeriodSeconds (%d) must be larger than server.gracefulShutdownTimeout (%ds), or Kubernetes kills the server while its tunnels finish" (int $s.terminationGracePeriodSeconds) $grace) -}}
{{- end -}}
{{- $drain := include "konnectivity.durationSeconds" .Values.agent.drainTimeout | atoi -}}
{{- if le (int .Values.agent.terminationGracePeriodSeconds) $drain -}}
{{- fail (printf "agent.terminationGracePeriodSeconds (%d) must be larger than agent.drainTimeout (%ds): after SIGTERM the agent sends DRAIN and waits that long for open tunnels" (int .Values.agent.terminationGracePeriodSeconds) $drain) -}}
{{- end -}}
{{- if and .Values.agent.enabled (not .Values.agent.proxyServerHost) (or (eq $s.mode "sidecar") (not $s.enabled)) -}}
{{- fail "agent.proxyServerHost is required with server.mode sidecar or server.enabled false: the chart renders no agent Service to default to" -}}
{{- end -}}
{{- end -}}

{{/* The server's arguments (upstream proxy-server's flags), as a YAML list. */}}
{{- define "konnectivity.serverArgs" -}}
{{- $s := .Values.server -}}
{{- $args := list (printf "--mode=%s" (include "konnectivity.serverMode" .)) -}}
{{- if eq $s.mode "sidecar" -}}
{{- $args = concat $args (list (printf "--uds-name=%s/%s" $s.sidecar.udsDir $s.sidecar.udsFile) "--delete-existing-uds-file=true" "--server-port=0") -}}
{{- else -}}
{{- $dir := include "konnectivity.frontendTLSDir" . -}}
{{- $args = concat $args (list (printf "--server-port=%d" (int $s.ports.frontend)) (printf "--server-cert=%s/tls.crt" $dir) (printf "--server-key=%s/tls.key" $dir) (printf "--server-ca-cert=%s/ca.crt" $dir)) -}}
{{- end -}}
{{- $cdir := include "konnectivity.clusterTLSDir" . -}}
{{- $args = concat $args (list (printf "--agent-port=%d" (int $s.ports.agent)) (printf "--cluster-cert=%s/tls.crt" $cdir) (printf "--cluster-key=%s/tls.key" $cdir)) -}}
{{- $args = concat $args (list (printf "--health-port=%d" (int $s.ports.health)) (printf "--admin-port=%d" (int $s.ports.admin)) (printf "--admin-bind-address=%s" $s.adminBindAddress)) -}}
{{- $args = append $args (printf "--server-count=%d" (int $s.replicas)) -}}
{{- $args = append $args (printf "--keepalive-time=%s" $s.keepaliveTime) -}}
{{- $args = append $args (printf "--proxy-strategies=%s" (join "," $s.proxyStrategies)) -}}
{{- $args = append $args (printf "--graceful-shutdown-timeout=%s" $s.gracefulShutdownTimeout) -}}
{{- if .Values.quic.enabled -}}
{{- $args = append $args (printf "--agent-quic-port=%d" (int .Values.quic.port)) -}}
{{- end -}}
{{- if .Values.auth.enabled -}}
{{- $args = concat $args (list (printf "--agent-namespace=%s" (include "konnectivity.agentNamespace" .)) (printf "--agent-service-account=%s" (include "konnectivity.agentServiceAccountName" .)) (printf "--authentication-audience=%s" .Values.auth.audience)) -}}
{{- if $s.kubeconfigSecretName -}}
{{- $args = append $args (printf "--kubeconfig=%s/kubeconfig" (include "konnectivity.kubeconfigDir" .)) -}}
{{- end -}}
{{- end -}}
{{- $args = concat $args ($s.extraArgs | default (list)) -}}
{{- toYaml $args -}}
{{- end -}}

{{/* The agent's arguments (upstream proxy-agent's flags), as a YAML list. */}}
{{- define "konnectivity.agentArgs" -}}
{{- $a := .Values.agent -}}
{{- $host := $a.proxyServerHost | default (printf "%s.%s.svc" (include "konnectivity.agentServiceName" .) .Release.Namespace) -}}
{{- $dir := include "konnectivity.agentSecretsDir" . -}}
{{- $args := list (printf "--proxy-server-host=%s" $host) (printf "--proxy-server-port=%d" (int ($a.proxyServerPort | default .Values.server.ports.agent))) (printf "--ca-cert=%s/ca.crt" $dir) -}}
{{- if .Values.auth.enabled -}}
{{- $args = append $args (printf "--service-account-token-path=%s/token" $dir) -}}
{{- end -}}
{{- $args = append $args "--agent-identifiers=host=$(NODE_NAME)&ipv4=$(HOST_IP)" -}}
{{- $args = concat $args (list (printf "--health-server-port=%d" (int $a.ports.health)) (printf "--admin-server-port=%d" (int $a.ports.admin))) -}}
{{- $args = append $args (printf "--keepalive-time=%s" $a.keepaliveTime) -}}
{{- $args = append $args (printf "--drain-timeout=%s" $a.drainTimeout) -}}
{{- if .Values.quic.enabled -}}
{{- $args = concat $args (list "--transport=auto" (printf "--proxy-server-quic-port=%d" (int .Values.quic.port))) -}}
{{- end -}}
{{- $args = concat $args ($a.extraArgs | default (list)) -}}
{{- toYaml $args -}}
{{- end -}}

{{/*
The server container (both modes; the sidecar mode renders it into the kube-apiserver patch).
*/}}
{{- define "konnectivity.serverContainer" -}}
{{- $s := .Values.server -}}
name: konnectivity-server
image: {{ include "konnectivity.image" . | quote }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
command:
  - konnectivity-server
args:
  {{- include "konnectivity.serverArgs" . | nindent 2 }}
env:
  - name: LOG_FORMAT
    value: {{ .Values.logging.format | quote }}
  - name: RUST_LOG
    value: {{ .Values.logging.level | quote }}
  {{- with $s.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
ports:
  - name: agent
    containerPort: {{ int $s.ports.agent }}
    protocol: TCP
  {{- if .Values.quic.enabled }}
  - name: agent-quic
    containerPort: {{ int .Values.quic.port }}
    protocol: UDP
  {{- end }}
  {{- if eq $s.mode "deployment" }}
  - name: frontend
    containerPort: {{ int $s.ports.frontend }}
    protocol: TCP
  {{- end }}
  - name: health
    containerPort: {{ int $s.ports.health }}
    protocol: TCP
  - name: admin
    containerPort: {{ int $s.ports.admin }}
    protocol: TCP
{{- if eq $s.mode "deployment" }}
{{- /*
Ready once at least one agent is connected (upstream's readiness), so the frontend Service sends
kube-apiserver only to servers that can dial. Not in sidecar mode: it would keep kube-apiserver's
pod unready until an agent connects, and agents may need a Ready kube-apiserver to get there.
*/}}
readinessProbe:
  httpGet:
    path: /readyz
    port: health
  {{- toYaml $s.readinessProbe | nindent 2 }}
{{- end }}
livenessProbe:
  httpGet:
    path: /healthz
    port: health
  {{- toYaml $s.livenessProbe | nindent 2 }}
{{- with $s.resources }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.containerSecurityContext | nindent 2 }}
volumeMounts:
  - name: konnectivity-cluster-tls
    mountPath: {{ include "konnectivity.clusterTLSDir" . }}
    readOnly: true
  {{- if eq $s.mode "sidecar" }}
  - name: {{ $s.sidecar.udsVolumeName }}
    mountPath: {{ $s.sidecar.udsDir }}
  {{- else }}
  - name: konnectivity-frontend-tls
    mountPath: {{ include "konnectivity.frontendTLSDir" . }}
    readOnly: true
  {{- end }}
  {{- if and .Values.auth.enabled $s.kubeconfigSecretName }}
  - name: konnectivity-kubeconfig
    mountPath: {{ include "konnectivity.kubeconfigDir" . }}
    readOnly: true
  {{- end }}
{{- end -}}

{{/* The server's volumes except the sidecar's socket directory. */}}
{{- define "konnectivity.serverVolumes" -}}
- name: konnectivity-cluster-tls
  secret:
    secretName: {{ include "konnectivity.clusterTLSSecret" . }}
{{- if eq .Values.server.mode "deployment" }}
- name: konnectivity-frontend-tls
  secret:
    secretName: {{ include "konnectivity.frontendTLSSecret" . }}
{{- end }}
{{- if and .Values.auth.enabled .Values.server.kubeconfigSecretName }}
- name: konnectivity-kubeconfig
  secret:
    secretName: {{ .Values.server.kubeconfigSecretName }}
{{- end }}
{{- end -}}
