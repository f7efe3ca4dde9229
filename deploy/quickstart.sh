#!/usr/bin/env bash
# Install maas-gateway and start it in front of the sample upstream, with a fresh API key.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q .
cd deploy/examples
if [ ! -s api_keys.yaml ]; then
  echo "Your API key (shown once):"
  maas-gateway keys create --subject quickstart --roles data-scientist --file api_keys.yaml --id quickstart
fi
python ../sample_upstream.py --port 8000 & UP=$!
trap 'kill $UP 2>/dev/null' EXIT
echo 'try: curl -s localhost:8080/v2/models/digits/infer -H "X-API-Key: <key>" -H "Content-Type: application/json" -d @digits_request.json'
maas-gateway serve -c gateway.yaml
