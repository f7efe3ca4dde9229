#!/usr/bin/env bash
# Start maas-gateway as a target of the reference harness (../shared/bench/run.sh):
#   START_CMD_GATEWAY="bash $PWD/bench/shared_harness_gateway.sh" \
#     ../shared/bench/run.sh direct envoy-jwt custom:gateway:18090:/v2/models/digits/infer
# Uses the harness's RS256 JWKS/issuer/audience; the policy allows tokens whose `role` claim is
# "inference" (the same RBAC Envoy's config does). Knobs: WORKERS (1), PIPELINE (auth | full),
# QUOTA_STORE (memory | redis://...), PROTOCOL (v2: the body is parsed and checked | raw: the v2 path is
# forwarded as is, the gateway core's own cost).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR=$(mktemp -d /tmp/maas-harness-XXXX)
cat > "$DIR/policy.yaml" <<YAML
rules:
  - {id: inference-role, roles: ["*"], models: [digits], actions: [infer, read], effect: allow,
     when: "subject.role == 'inference'"}
YAML
if [ "${PIPELINE:-full}" = full ]; then
  cat >> "$DIR/policy.yaml" <<YAML
quotas:
  - {roles: ["*"], models: ["*"], rate_per_s: 100000000, burst: 100000000}
YAML
fi
cat > "$DIR/gateway.yaml" <<YAML
server: {host: 127.0.0.1, port: ${BENCH_PORT}, upstream_timeout_s: 10}
admin: null
auth:
  jwt: {issuer: "https://issuer.bench.local", audience: digits-model, algorithms: [RS256], jwks_file: "${BENCH_JWKS_FILE}"}
policy: {file: $DIR/policy.yaml, watch: false}
models:
  digits:
    backend: {type: http, protocol: ${PROTOCOL:-v2}, upstreams: ["${BENCH_UPSTREAM_URL}"]$( [ "${PROTOCOL:-v2}" = raw ] && echo ", paths: [/v2/models/digits/infer]")}
YAML
if [ "${PIPELINE:-full}" = full ]; then
  cat >> "$DIR/gateway.yaml" <<YAML
quota: {store: "${QUOTA_STORE:-memory}", on_store_error: deny, key_prefix: "harness:"}
audit: {file: $DIR/audit.log}
YAML
fi
PY="$HERE/.venv/bin/python"; [ -x "$PY" ] || PY=python3
exec "$PY" -m gateway serve -c "$DIR/gateway.yaml" --workers "${WORKERS:-1}"
