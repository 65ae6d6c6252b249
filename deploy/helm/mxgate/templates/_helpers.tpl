{{/* Names, labels and the settings several templates share. */}}

{{- define "mxgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* <release>-<chart>, or just <release> when it already contains the chart name. Trimmed to 50 so that
suffixes such as "-operator" and "-redis-headless" stay within the 63 characters of a DNS label. */}}
{{- define "mxgate.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "mxgate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "mxgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mxgate
{{- end -}}

{{/* Selector labels of one component: gateway, operator or redis. Call with (dict "ctx" $ "component" "..."). */}}
{{- define "mxgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mxgate.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "mxgate.componentLabels" -}}
{{ include "mxgate.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "mxgate.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "mxgate.gatewayServiceAccount" -}}
{{- printf "%s-gateway" (include "mxgate.fullname" .) -}}
{{- end -}}

{{- define "mxgate.operatorServiceAccount" -}}
{{- printf "%s-operator" (include "mxgate.fullname" .) -}}
{{- end -}}

{{- define "mxgate.peering" -}}
{{- default (include "mxgate.fullname" .) .Values.operator.peering -}}
{{- end -}}

{{- define "mxgate.sidecar" -}}
{{- if eq .Values.operator.mode "sidecar" -}}true{{- end -}}
{{- end -}}

{{/* ---- Redis: the URL every mxgate process uses, and the Secret with its password ---- */}}

{{- define "mxgate.redis.bundled" -}}
{{- if not .Values.redis.external.url -}}true{{- end -}}
{{- end -}}

{{- define "mxgate.redis.url" -}}
{{- if .Values.redis.external.url -}}
{{- .Values.redis.external.url -}}
{{- else -}}
{{- printf "redis://%s-redis:6379/0" (include "mxgate.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "mxgate.redis.secretName" -}}
{{- if .Values.redis.external.url -}}
{{- .Values.redis.external.existingSecret -}}
{{- else -}}
{{- default (printf "%s-redis" (include "mxgate.fullname" .)) .Values.redis.auth.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "mxgate.redis.secretKey" -}}
{{- if .Values.redis.external.url -}}{{ .Values.redis.external.key }}{{- else -}}{{ .Values.redis.auth.key }}{{- end -}}
{{- end -}}

{{/* The TCP port of the external Redis, for the NetworkPolicy; empty for unix:// URLs. */}}
{{- define "mxgate.redis.externalPort" -}}
{{- $url := urlParse .Values.redis.external.url -}}
{{- if ne $url.scheme "unix" -}}
{{- $parts := splitList ":" $url.host -}}
{{- if gt (len $parts) 1 -}}{{ last $parts }}{{- else -}}6379{{- end -}}
{{- end -}}
{{- end -}}

{{- define "mxgate.redisPasswordDir" -}}/var/run/secrets/mxgate/redis{{- end -}}

{{/* Redis settings as the environment every mxgate command reads (MXGATE_REDIS_URL, MXGATE_REDIS_PASSWORD_FILE):
the processes get them, and so does `kubectl exec ... mxgate status`. One YAML list item each. */}}
{{- define "mxgate.redisEnv" -}}
- name: MXGATE_REDIS_URL
  value: {{ include "mxgate.redis.url" . | quote }}
{{- if include "mxgate.redis.secretName" . }}
- name: MXGATE_REDIS_PASSWORD_FILE
  value: {{ printf "%s/password" (include "mxgate.redisPasswordDir" .) | quote }}
{{- end }}
{{- end -}}

{{/* The volume and mount with the Redis password (only the one key, as file "password"). */}}
{{- define "mxgate.redisPasswordVolume" -}}
{{- if include "mxgate.redis.secretName" . -}}
- name: redis-password
  secret:
    secretName: {{ include "mxgate.redis.secretName" . }}
    defaultMode: 0440
    items:
      - key: {{ include "mxgate.redis.secretKey" . }}
        path: password
{{- end -}}
{{- end -}}

{{- define "mxgate.redisPasswordMount" -}}
{{- if include "mxgate.redis.secretName" . -}}
- name: redis-password
  mountPath: {{ include "mxgate.redisPasswordDir" . }}
  readOnly: true
{{- end -}}
{{- end -}}

{{/* ---- Security contexts: non-root, read-only root filesystem, no capabilities ---- */}}

{{- define "mxgate.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "mxgate.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* ---- The operator container, shared by the operator Deployment and sidecar mode ---- */}}

{{/* No --priority: `mxgate operator` picks a random one per process, because kopf pauses every replica of a peering
when two live ones tie. kopf's settings.scanning is off in mxgate operator, which is why the Role needs no
cluster-wide rules (operator-rbac.yaml). */}}
{{- define "mxgate.operatorContainer" -}}
- name: operator
  image: {{ include "mxgate.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args:
    - --log-level
    - {{ .Values.log.level }}
    - --log-format
    - {{ .Values.log.format }}
    - operator
    - --namespace
    - {{ .Release.Namespace | quote }}
    - --peering
    - {{ include "mxgate.peering" . | quote }}
    - --health-listen
    - 0.0.0.0:8080
    {{- with .Values.operator.extraArgs }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  env:
    {{- include "mxgate.redisEnv" . | nindent 4 }}
    - name: POD_NAMESPACE
      valueFrom:
        fieldRef: {fieldPath: metadata.namespace}
    # kopf's peering identity: the pod's name shows which replica is active in the KopfPeering's status.
    - name: POD_ID
      valueFrom:
        fieldRef: {fieldPath: metadata.name}
    {{- with .Values.operator.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: operator-health
      containerPort: 8080
      protocol: TCP
  livenessProbe:
    httpGet: {path: /healthz, port: operator-health}
    periodSeconds: 10
    timeoutSeconds: 3
    failureThreshold: 6
  readinessProbe:
    httpGet: {path: /healthz, port: operator-health}
    periodSeconds: 10
    timeoutSeconds: 3
  resources:
    {{- toYaml .Values.operator.resources | nindent 4 }}
  securityContext:
    {{- include "mxgate.containerSecurityContext" . | nindent 4 }}
  volumeMounts:
    - name: tmp
      mountPath: /tmp
    {{- include "mxgate.redisPasswordMount" . | nindent 4 }}
    {{- if include "mxgate.sidecar" . }}
    # Sidecar mode: the pod does not automount its token; only this container gets it.
    - name: kube-api-access
      mountPath: /var/run/secrets/kubernetes.io/serviceaccount
      readOnly: true
    {{- end }}
{{- end -}}

{{/* ---- NetworkPolicy egress rules shared by gateway and operator pods ---- */}}

{{/* Egress every mxgate pod needs: DNS and Redis. */}}
{{- define "mxgate.netpol.commonEgress" -}}
# DNS: Redis's Service name, and MX lookups for delivery.
- ports:
    - {port: 53, protocol: UDP}
    - {port: 53, protocol: TCP}
{{- if include "mxgate.redis.bundled" . }}
# The bundled Redis.
- to:
    - podSelector:
        matchLabels:
          {{- include "mxgate.selectorLabels" (dict "ctx" . "component" "redis") | nindent 10 }}
  ports:
    - {port: 6379, protocol: TCP}
{{- else if include "mxgate.redis.externalPort" . }}
# The external Redis.
- to:
    {{- toYaml .Values.redis.external.networkPolicyPeers | nindent 4 }}
  ports:
    - {port: {{ include "mxgate.redis.externalPort" . }}, protocol: TCP}
{{- end }}
{{- end -}}

{{- define "mxgate.netpol.apiServerEgress" -}}
# The kube-apiserver, for the operator (kopf).
- to:
    {{- range .Values.networkPolicy.apiServer.cidrs }}
    - ipBlock: {cidr: {{ . }}}
    {{- end }}
  ports:
    {{- range .Values.networkPolicy.apiServer.ports }}
    - {port: {{ . }}, protocol: TCP}
    {{- end }}
{{- end -}}
