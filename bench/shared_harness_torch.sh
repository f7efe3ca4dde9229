#!/usr/bin/env bash
# The reference harness's seed model (784 -> 128 -> 10 MLP, as in seed_flask_app.py) served by the local torch
# runner behind the full pipeline (JWT, policy, memory quota, validation, audit):
#   START_CMD_GWTORCH="bash $PWD/bench/shared_harness_torch.sh" \
#     ../shared/bench/run.sh seed-gunicorn custom:gwtorch:18092:/v2/models/digits/infer
# Knobs: WORKERS (2, like gunicorn -w 2), MAX_BATCH (64), BATCH_DELAY_MS (0: under this closed-loop load batches
# form from what queues while the previous batch runs; a delay only adds latency, measured: 2 ms costs ~40% at 16 conns).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$HERE/.venv/bin/python"; [ -x "$PY" ] || PY=python3
DIR=$(mktemp -d /tmp/maas-harness-torch-XXXX)
(cd "$HERE" && "$PY" -c "import sys; sys.path[:0] = ['bench', 'tests']; from bench_runner import write_weights; from pathlib import Path; write_weights(Path('$DIR/seed.safetensors'), 'seed-mlp')")
cat > "$DIR/policy.yaml" <<YAML
rules:
  - {id: inference-role, roles: ["*"], models: [digits], actions: [infer, read], effect: allow,
     when: "subject.role == 'inference'"}
quotas:
  - {roles: ["*"], models: ["*"], rate_per_s: 100000000, burst: 100000000}
YAML
cat > "$DIR/gateway.yaml" <<YAML
server: {host: 127.0.0.1, port: ${BENCH_PORT}}
admin: null
auth:
  jwt: {issuer: "https://issuer.bench.local", audience: digits-model, algorithms: [RS256], jwks_file: "${BENCH_JWKS_FILE}"}
policy: {file: $DIR/policy.yaml, watch: false}
quota: {store: memory}
audit: {file: $DIR/audit.log}
models:
  digits:
    backend: {type: torch, path: $DIR/seed.safetensors, arch: seed-mlp, input_name: input-0,
              max_batch_size: ${MAX_BATCH:-64}, max_batch_delay_ms: ${BATCH_DELAY_MS:-0}}
YAML
exec "$PY" -m gateway serve -c "$DIR/gateway.yaml" --workers "${WORKERS:-2}"
