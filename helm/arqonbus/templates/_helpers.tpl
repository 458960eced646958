{{/* Names */}}
{{- define "arqonbus.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "arqonbus.fullname" -}}
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

{{- define "arqonbus.natsName" -}}
{{- printf "%s-nats" (include "arqonbus.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "arqonbus.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "arqonbus.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "arqonbus.selectorLabels" -}}
app.kubernetes.io/name: {{ include "arqonbus.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end -}}

{{- define "arqonbus.natsSelectorLabels" -}}
app.kubernetes.io/name: {{ include "arqonbus.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: nats
{{- end -}}

{{- define "arqonbus.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* NATS URLs the gateways connect to (comma-separated, no credentials). */}}
{{- define "arqonbus.natsUrls" -}}
{{- if .Values.nats.enabled -}}
{{- $scheme := ternary "tls" "nats" .Values.nats.tls.enabled -}}
{{- $urls := list -}}
{{- range $i := until (int .Values.nats.replicas) -}}
{{- $urls = append $urls (printf "%s://%s-%d.%s-headless.%s.svc:4222" $scheme (include "arqonbus.natsName" $) $i (include "arqonbus.natsName" $) $.Release.Namespace) -}}
{{- end -}}
{{- join "," $urls -}}
{{- else -}}
{{- join "," .Values.nats.external.urls -}}
{{- end -}}
{{- end -}}

{{- define "arqonbus.devAuth" -}}
{{- if has "dev" .Values.gateway.auth.methods }}true{{ end -}}
{{- end -}}

{{- define "arqonbus.scheme" -}}
{{- ternary "wss" "ws" .Values.gateway.tls.enabled -}}
{{- end -}}

{{/* Drain budget: preStop + drain + 5 s for the audit events. */}}
{{- define "arqonbus.drainBudget" -}}
{{- add .Values.gateway.preStopSleepSeconds .Values.gateway.drainTimeoutSeconds 5 -}}
{{- end -}}

{{/*
Validation: collect every problem, then fail once with all of them.
*/}}
{{- define "arqonbus.validate" -}}
{{- $e := list -}}
{{- $g := .Values.gateway -}}
{{- $a := $g.auth -}}
{{- if and (has "dev" $a.methods) (not $a.insecureDevAuthAnyClientMayClaimAnyTenant) -}}
{{- $e = append $e "gateway.auth.methods has dev: dev auth lets any client claim any tenant; set gateway.auth.insecureDevAuthAnyClientMayClaimAnyTenant=true to accept that (development only)" -}}
{{- end -}}
{{- if has "jwt" $a.methods -}}
{{- if and $a.jwt.jwksUrl $a.jwt.existingSecret -}}
{{- $e = append $e "gateway.auth.jwt: set jwksUrl or existingSecret, not both" -}}
{{- else if and (not $a.jwt.jwksUrl) (not $a.jwt.existingSecret) -}}
{{- $e = append $e "gateway.auth.jwt: jwt auth needs a key source: jwksUrl, or existingSecret with secretKey and keyType" -}}
{{- else if and $a.jwt.existingSecret (not $a.jwt.secretKey) -}}
{{- $e = append $e "gateway.auth.jwt.secretKey: name the key of gateway.auth.jwt.existingSecret that holds the key file" -}}
{{- end -}}
{{- end -}}
{{- if and $g.tls.enabled (not $g.tls.existingSecret) -}}
{{- $e = append $e "gateway.tls.enabled needs gateway.tls.existingSecret (a kubernetes.io/tls Secret)" -}}
{{- end -}}
{{- $budget := int (include "arqonbus.drainBudget" .) -}}
{{- if le (int $g.terminationGracePeriodSeconds) $budget -}}
{{- $e = append $e (printf "gateway.terminationGracePeriodSeconds (%d) must be greater than preStopSleepSeconds + drainTimeoutSeconds + 5 (%d), or pods are killed mid-drain" (int $g.terminationGracePeriodSeconds) $budget) -}}
{{- end -}}
{{- if and .Values.nats.enabled .Values.nats.external.urls -}}
{{- $e = append $e "nats: set nats.enabled=false to use nats.external.urls (both are set)" -}}
{{- end -}}
{{- if and (not .Values.nats.enabled) (not .Values.nats.external.urls) -}}
{{- $e = append $e "nats: nats.enabled=false needs nats.external.urls" -}}
{{- end -}}
{{- range .Values.nats.external.urls -}}
{{- if contains "@" . -}}
{{- $e = append $e (printf "nats.external.urls: %s has credentials in it; use nats.auth.existingSecret" .) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.nats.enabled (lt (int .Values.nats.replicas) 3) -}}
{{- $e = append $e "nats.replicas must be 3 or more: tenant streams are replicated 3 ways" -}}
{{- end -}}
{{- if and (ne .Values.nats.auth.type "none") (not .Values.nats.auth.existingSecret) -}}
{{- $e = append $e (printf "nats.auth.type=%s needs nats.auth.existingSecret" .Values.nats.auth.type) -}}
{{- end -}}
{{- if and .Values.nats.enabled (has .Values.nats.auth.type (list "creds" "nkey")) -}}
{{- $e = append $e "nats.auth.type creds/nkey needs an operator-mode NATS: use nats.external (e.g. the official NATS chart)" -}}
{{- end -}}
{{- if and .Values.nats.tls.enabled (not .Values.nats.tls.existingSecret) -}}
{{- $e = append $e "nats.tls.enabled needs nats.tls.existingSecret (ca.crt, tls.crt, tls.key)" -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) -}}
{{- $e = append $e "autoscaling.minReplicas is greater than autoscaling.maxReplicas" -}}
{{- end -}}
{{- if and .Values.ingress.enabled (not .Values.ingress.host) -}}
{{- $e = append $e "ingress.enabled needs ingress.host" -}}
{{- end -}}
{{- if and .Values.provision.enabled (not .Values.provision.tenants) -}}
{{- $e = append $e "provision.enabled needs provision.tenants" -}}
{{- end -}}
{{- if $e -}}
{{- fail (printf "\n\nVALUES ERRORS (%d):\n  - %s\n" (len $e) (join "\n  - " $e)) -}}
{{- end -}}
{{- end -}}

{{/* Env shared by the gateway, the provision Job: NATS connection and credentials. */}}
{{- define "arqonbus.natsEnv" -}}
- name: ARQONBUS_NATS
  valueFrom:
    configMapKeyRef:
      name: {{ include "arqonbus.fullname" . }}
      key: ARQONBUS_NATS
{{- $n := .Values.nats.auth }}
{{- if eq $n.type "userPassword" }}
- name: ARQONBUS_NATS_USER
  valueFrom:
    secretKeyRef:
      name: {{ $n.existingSecret }}
      key: {{ $n.userKey }}
- name: ARQONBUS_NATS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $n.existingSecret }}
      key: {{ $n.passwordKey }}
{{- else if eq $n.type "token" }}
- name: ARQONBUS_NATS_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $n.existingSecret }}
      key: {{ $n.tokenKey }}
{{- else if eq $n.type "creds" }}
- name: ARQONBUS_NATS_CREDS_FILE
  value: /etc/arqonbus/nats-auth/{{ $n.fileKey }}
{{- else if eq $n.type "nkey" }}
- name: ARQONBUS_NATS_NKEY_SEED_FILE
  value: /etc/arqonbus/nats-auth/{{ $n.fileKey }}
{{- end }}
{{- if .Values.nats.tls.enabled }}
- name: ARQONBUS_NATS_TLS_CA
  value: /etc/arqonbus/nats-tls/ca.crt
- name: ARQONBUS_NATS_TLS_CERT
  value: /etc/arqonbus/nats-tls/tls.crt
- name: ARQONBUS_NATS_TLS_KEY
  value: /etc/arqonbus/nats-tls/tls.key
{{- end }}
{{- end -}}

{{- define "arqonbus.natsVolumeMounts" -}}
{{- if has .Values.nats.auth.type (list "creds" "nkey") }}
- name: nats-auth
  mountPath: /etc/arqonbus/nats-auth
  readOnly: true
{{- end }}
{{- if .Values.nats.tls.enabled }}
- name: nats-tls
  mountPath: /etc/arqonbus/nats-tls
  readOnly: true
{{- end }}
{{- end -}}

{{- define "arqonbus.natsVolumes" -}}
{{- if has .Values.nats.auth.type (list "creds" "nkey") }}
- name: nats-auth
  secret:
    secretName: {{ .Values.nats.auth.existingSecret }}
    defaultMode: 0400
{{- end }}
{{- if .Values.nats.tls.enabled }}
- name: nats-tls
  secret:
    secretName: {{ .Values.nats.tls.existingSecret }}
    defaultMode: 0400
{{- end }}
{{- end -}}
