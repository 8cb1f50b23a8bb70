{{/* The release's full name, cut to the 63 characters a name may have. */}}
{{- define "mlsched.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The name of one component's objects: dict "root" $ "component" "predictor". */}}
{{- define "mlsched.componentName" -}}
{{- printf "%s-%s" (include "mlsched.fullname" .root) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The environment variable of a config key: log.format is MLSCHED__LOG__FORMAT. */}}
{{- define "mlsched.envName" -}}
{{- printf "MLSCHED__%s" (. | replace "." "__" | upper) -}}
{{- end -}}

{{/* The config keys of .Values.config as container env entries. */}}
{{- define "mlsched.configEnv" -}}
{{- range $key, $value := .Values.config }}
- name: {{ include "mlsched.envName" $key }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end -}}

{{/* Labels every object carries. */}}
{{- define "mlsched.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: mlsched
{{- end -}}

{{/* Selector labels of one component: dict "root" $ "component" "executor-fast". */}}
{{- define "mlsched.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "mlsched.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "mlsched.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "mlsched.image" -}}
{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}
{{- end -}}

{{/* NATS_URL and DATABASE_URL from the connection Secret. */}}
{{- define "mlsched.connectionEnv" -}}
- name: NATS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.connection.secretName }}
      key: NATS_URL
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.connection.secretName }}
      key: DATABASE_URL
{{- end -}}

{{/*
A worker Deployment: dict "root" $ "component" "executor-fast" "binary"
"mlsched-executor" "spec" <the component's values> "env" <list of extra env>.
*/}}
{{- define "mlsched.worker" -}}
{{- $root := .root -}}
{{- $name := include "mlsched.componentName" (dict "root" $root "component" .component) -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $name }}
  labels:
    {{- include "mlsched.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  {{- if not $root.Values.autoscaling.enabled }}
  replicas: {{ .spec.replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxSurge: 25%
      maxUnavailable: 0
  selector:
    matchLabels:
      {{- include "mlsched.selector" (dict "root" $root "component" .component) | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "mlsched.selector" (dict "root" $root "component" .component) | nindent 8 }}
        app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
        app.kubernetes.io/part-of: mlsched
      annotations:
        checksum/config: {{ include (print $root.Template.BasePath "/configmap.yaml") $root | sha256sum }}
        prometheus.io/scrape: "true"
        prometheus.io/port: {{ $root.Values.metrics.port | quote }}
        {{- with $root.Values.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ include "mlsched.serviceAccountName" $root }}
      automountServiceAccountToken: false
      # Longer than the drain grace: SIGTERM stops fetching, in-flight jobs finish
      # within graceSeconds, the rest is handed back and the store flushed.
      terminationGracePeriodSeconds: {{ add .spec.graceSeconds $root.Values.shutdown.marginSeconds }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ .component }}
          image: {{ include "mlsched.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: [{{ .binary | quote }}]
          envFrom:
            - configMapRef:
                name: {{ include "mlsched.fullname" $root }}
          env:
            {{- include "mlsched.connectionEnv" $root | nindent 12 }}
            - name: MLSCHED__SHUTDOWN__GRACE_S
              value: {{ .spec.graceSeconds | quote }}
            {{- with .env }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          ports:
            - name: metrics
              containerPort: {{ $root.Values.metrics.port }}
              protocol: TCP
          startupProbe:
            httpGet: {path: /healthz, port: metrics}
            periodSeconds: 2
            failureThreshold: 30
          livenessProbe:
            httpGet: {path: /healthz, port: metrics}
            periodSeconds: 10
            timeoutSeconds: 3
            failureThreshold: 3
          readinessProbe:
            httpGet: {path: /readyz, port: metrics}
            periodSeconds: 5
            timeoutSeconds: 3
            failureThreshold: 2
          resources:
            {{- toYaml .spec.resources | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
      volumes:
        - name: tmp
          emptyDir:
            sizeLimit: 64Mi
      {{- with $root.Values.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $root.Values.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $root.Values.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end -}}
