{{/* Names, labels and the settings several templates share. */}}

{{- define "mxgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* <release>-<chart>, or just <release> when it already contains the chart name. Trimmed to 46 so that the
longest name, Service "<fullname>-redis-headless", stays within the 63 characters of a DNS label, and
StatefulSet "<fullname>-redis" within 52 (its pods' controller-revision-hash label adds 11 characters to it). */}}
{{- define "mxgate.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 46 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 46 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 46 | trimSuffix "-" -}}
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

{{/* The bundled Redis in replicated mode: a primary, two replicas and a sentinel in each of the three pods. */}}
{{- define "mxgate.redis.replicated" -}}
{{- if and (include "mxgate.redis.bundled" .) (eq .Values.redis.mode "replicated") -}}true{{- end -}}
{{- end -}}

{{- define "mxgate.redis.headless" -}}
{{- printf "%s-redis-headless" (include "mxgate.fullname" .) -}}
{{- end -}}

{{/* The bundled Redis's pods by their stable DNS names, pod 0 first, space-separated (one pod in standalone mode).
Fully qualified: the sentinels hand these names to clients as they are. */}}
{{- define "mxgate.redis.nodes" -}}
{{- $count := ternary 3 1 (eq .Values.redis.mode "replicated") -}}
{{- $names := list -}}
{{- range $i := until $count -}}
{{- $names = append $names (printf "%s-redis-%d.%s.%s.svc.%s" (include "mxgate.fullname" $) $i (include "mxgate.redis.headless" $) $.Release.Namespace $.Values.clusterDomain) -}}
{{- end -}}
{{- join " " $names -}}
{{- end -}}

{{/* The URL of the bundled Redis (standalone: its Service; replicated: the three sentinels), or redis.external.url,
which may not hold a password: the pods' spec would show it to everyone who may read Deployments. */}}
{{- define "mxgate.redis.url" -}}
{{- $external := .Values.redis.external.url -}}
{{- if $external -}}
{{- if or (regexMatch "^[^/]*//[^/@]*:[^/@]*@" $external) (contains "password=" $external) -}}
{{- fail "redis.external.url holds a password, which would be in the pods' spec for everyone who may read Deployments: put it in a Secret and name that in redis.external.existingSecret (mxgate reads it from the mounted file)" -}}
{{- end -}}
{{- $external -}}
{{- else if include "mxgate.redis.replicated" . -}}
{{- $sentinels := list -}}
{{- range splitList " " (include "mxgate.redis.nodes" .) -}}
{{- $sentinels = append $sentinels (printf "%s:26379" .) -}}
{{- end -}}
{{- printf "redis+sentinel://%s/%s/0" (join "," $sentinels) .Values.redis.replicated.masterName -}}
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

{{/* The TCP ports the NetworkPolicies open towards the external Redis, space-separated; empty for unix:// URLs.
Every HOST:PORT of the URL (a host without a port: 6379, or 26379 for a sentinel), and networkPolicyPorts: with
Sentinel the data nodes are reached on ports the URL does not name, 6379 unless networkPolicyPorts says otherwise. */}}
{{- define "mxgate.redis.externalPorts" -}}
{{- $e := .Values.redis.external -}}
{{- $scheme := lower (first (splitList "://" $e.url)) -}}
{{- if ne $scheme "unix" -}}
{{- $sentinel := hasSuffix "+sentinel" $scheme -}}
{{- $location := regexReplaceAll "^[^/]*//([^/?]*@)?" $e.url "" -}}
{{- $hosts := first (splitList "/" (first (splitList "?" $location))) -}}
{{- $ports := list -}}
{{- range splitList "," $hosts -}}
{{- $port := trimPrefix ":" (regexFind ":[0-9]+$" (trim .)) -}}
{{- $ports = append $ports (default (ternary "26379" "6379" $sentinel) $port) -}}
{{- end -}}
{{- range $e.networkPolicyPorts -}}
{{- $ports = append $ports (toString .) -}}
{{- end -}}
{{- if and $sentinel (not $e.networkPolicyPorts) -}}
{{- $ports = append $ports "6379" -}}
{{- end -}}
{{- join " " (uniq $ports) -}}
{{- end -}}
{{- end -}}

{{/* The environment of the bundled Redis's containers: what their scripts (redis-configmap.yaml) need to know about
the pod they run in. */}}
{{- define "mxgate.redis.podEnv" -}}
- name: REDIS_CONFIG_DIR
  value: /etc/redis
- name: REDIS_RUN_DIR
  value: /run/redis
- name: REDIS_DATA_DIR
  value: /data
- name: REDIS_PASSWORD_FILE
  value: /var/run/secrets/mxgate/redis/password
- name: REDIS_BIND
  value: "* -::*"
- name: REDIS_PORT
  value: "6379"
{{- if include "mxgate.redis.replicated" . }}
- name: SENTINEL_PORT
  value: "26379"
- name: POD_NAME
  valueFrom:
    fieldRef: {fieldPath: metadata.name}
- name: REDIS_SELF
  value: {{ printf "$(POD_NAME).%s.%s.svc.%s" (include "mxgate.redis.headless" .) .Release.Namespace .Values.clusterDomain | quote }}
- name: REDIS_NODES
  value: {{ include "mxgate.redis.nodes" . | quote }}
{{- end }}
{{- end -}}

{{/* ---- Redis memory: maxmemory below the container's memory limit ---- */}}

{{/* Bytes in a Kubernetes memory quantity ("1Gi", "800Mi", "1G", "1073741824"). */}}
{{- define "mxgate.quantityBytes" -}}
{{- $q := . -}}
{{- if kindIs "float64" $q -}}{{- $q = printf "%.0f" $q -}}{{- end -}}
{{- $q = toString $q -}}
{{- if not (regexMatch "^[0-9]+(Ki|Mi|Gi|Ti|k|M|G|T)?$" $q) -}}
{{- fail (printf "redis.resources.limits.memory %q: the chart reads whole numbers with an optional Ki, Mi, Gi, Ti, k, M, G or T (e.g. 1Gi), to compute maxmemory from it" $q) -}}
{{- end -}}
{{- $units := dict "" 1 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 -}}
{{- mul (regexFind "^[0-9]+" $q | atoi) (index $units (regexFind "[A-Za-z]*$" $q)) -}}
{{- end -}}

{{/* Bytes in a Redis memory size ("800mb", "1gb", "1g", bytes; the schema checks the form). */}}
{{- define "mxgate.redisBytes" -}}
{{- $v := lower (toString .) -}}
{{- $units := dict "" 1 "k" 1000 "kb" 1024 "m" 1000000 "mb" 1048576 "g" 1000000000 "gb" 1073741824 -}}
{{- mul (regexFind "^[0-9]+" $v | atoi) (index $units (regexFind "[a-z]*$" $v)) -}}
{{- end -}}

{{/* The bundled Redis's maxmemory: redis.maxmemory as given, or maxmemoryPercent of the container's memory limit.
Either way below the limit: a Redis that reaches its limit is killed by the kernel (and a restart replays the
whole AOF) instead of refusing writes, which mxgate turns into 451 for the senders to retry. */}}
{{- define "mxgate.redis.maxmemory" -}}
{{- $r := .Values.redis -}}
{{- $limit := dig "limits" "memory" "" $r.resources -}}
{{- $limitBytes := 0 -}}
{{- if $limit -}}{{- $limitBytes = include "mxgate.quantityBytes" $limit | atoi -}}{{- end -}}
{{- if $r.maxmemory -}}
{{- $bytes := include "mxgate.redisBytes" $r.maxmemory | atoi -}}
{{- if and $limit (ge $bytes $limitBytes) -}}
{{- fail (printf "redis.maxmemory (%s = %d bytes) must be below redis.resources.limits.memory (%v = %d bytes), with room for what maxmemory does not count (buffers, fragmentation, forks); or leave it empty for %d%% of the limit" $r.maxmemory $bytes $limit $limitBytes (int $r.maxmemoryPercent)) -}}
{{- end -}}
{{- $r.maxmemory -}}
{{- else if $limit -}}
{{- div (mul $limitBytes (int $r.maxmemoryPercent)) 100 -}}
{{- else -}}
{{- fail "redis.resources.limits.memory is unset and redis.maxmemory empty: the spool would grow until the node runs out of memory. Set the limit (maxmemory is then redis.maxmemoryPercent of it) or redis.maxmemory" -}}
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
    {{- with .Values.operator.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .Values.operator.envFrom }}
  envFrom:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  ports:
    - name: operator-health
      containerPort: 8080
      protocol: TCP
  {{- with .Values.operator.livenessProbe }}
  livenessProbe:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.operator.readinessProbe }}
  readinessProbe:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  resources:
    {{- toYaml .Values.operator.resources | nindent 4 }}
  {{- with .Values.operator.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: tmp
      mountPath: /tmp
    {{- include "mxgate.redisPasswordMount" . | nindent 4 }}
    {{- with .Values.operator.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
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
# The bundled Redis{{ if include "mxgate.redis.replicated" . }}: its data nodes, and the sentinels that say which is the primary{{ end }}.
- to:
    - podSelector:
        matchLabels:
          {{- include "mxgate.selectorLabels" (dict "ctx" . "component" "redis") | nindent 10 }}
  ports:
    - {port: 6379, protocol: TCP}
{{- if include "mxgate.redis.replicated" . }}
    - {port: 26379, protocol: TCP}
{{- end }}
{{- else if include "mxgate.redis.externalPorts" . }}
# The external Redis (its sentinels and data nodes).
- to:
    {{- toYaml .Values.redis.external.networkPolicyPeers | nindent 4 }}
  ports:
    {{- range splitList " " (include "mxgate.redis.externalPorts" .) }}
    - {port: {{ . }}, protocol: TCP}
    {{- end }}
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
