#!/usr/bin/env bash
# Profile a running gateway under wrk load with py-spy (pip install py-spy). VARIANT=auth|full (see overhead.py).
# Output: /tmp/maasprof/profile.txt (collapsed stacks), /tmp/maasprof/wrk.txt
set -e
cd "$(dirname "$0")/.."
python - <<'PY' &
import sys, json, time, subprocess, os
sys.path.insert(0, "tests"); sys.path.insert(0, "bench")
from pathlib import Path
import overhead as o
from harness import Keys
work = Path("/tmp/maasprof"); import shutil; shutil.rmtree(work, ignore_errors=True); work.mkdir()
keys = Keys(work/"idp")
(work/"token").write_text("Bearer " + keys.token("bench", ["inference"]))
(work/"body.json").write_text(json.dumps(o.V2_BODY)); (work/"post.lua").write_text(o.WRK_LUA)
up, upp = o.start_upstream(work)
cfg = o.gateway_config(work, "gw", os.environ.get("VARIANT","auth"), upp, keys, None)
import yaml; d = yaml.safe_load(cfg.read_text()); d["server"]["port"] = 18999; cfg.write_text(yaml.safe_dump(d))
gw = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "-c", str(cfg)])
(work/"gw.pid").write_text(str(gw.pid))
o.wait_port(18999)
time.sleep(40)
gw.terminate(); os.killpg(up.pid, 15)
PY
sleep 6
BODY_FILE=/tmp/maasprof/body.json AUTH="$(cat /tmp/maasprof/token)" timeout 30 wrk -t2 -c16 -d12s -s /tmp/maasprof/post.lua http://127.0.0.1:18999/v2/models/digits/infer > /tmp/maasprof/wrk.txt &
sleep 2
py-spy record ${PYSPY_OPTS:---nonblocking} -r 997 -p $(cat /tmp/maasprof/gw.pid) -d 8 -f raw -o /tmp/maasprof/profile.txt >/dev/null 2>&1 || true
wait
