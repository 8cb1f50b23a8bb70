{{/* The worker components: executor-<lane> for each lane, then predictor. */}}
{{- define "mlsched.components" -}}
{{- range $lane, $_ := .Values.executors }}
- executor-{{ $lane }}
{{- end }}
- predictor
{{- end -}}
