#!/usr/bin/env python3
"""Model extraction against the bundled digits model behind the real gateway, per hardening setting (issue 14).

An attacker with one token, 30 labelled digits and a budget of N queries (rows)
trains a copy of the model from the gateway's answers with two published
methods, and we measure the copy's agreement with the real model on the
held-out digits (the 20 % the model never saw):

* **knockoff**: Knockoff-Nets-style queries from a "natural but different"
  distribution: a mix of uniform-noise images, mixups of two seed digits and
  noisy seed digits, asked in batches of 10;
* **jacobian**: Papernot et al.'s Jacobian-based dataset augmentation: train
  the copy on what is known, step every known point by lambda * sign of the
  copy's gradient for its label (lambda = 0.1 of the pixel range), ask the
  new points, repeat (the set doubles every round).

Honest callers send held-out digits one at a time; their accuracy is the share
of answers whose label is right, and "flagged" counts the honest streams that
ever got an alarm (403 or a ``monitors`` entry in the audit line).

Each setting is a policy in a real gateway (JWT auth, policy, quotas, output
hardening, monitors, audit) served over HTTP on loopback; the copies are small
torch MLPs (64-64-10) trained with the soft labels when scores come back,
one-hot labels otherwise. A stream of N = 3000 is asked once per (setting,
attacker, seed) and the copy is trained on its first 100/300/1000/3000
answers: a budget-N attacker asks exactly those queries (Jacobian rounds are
deterministic, the last one cut at the budget). Settings ``shipped`` and
``degrade`` load ``policies/protected-classifier.yaml`` itself; only its
``rate_per_s`` is raised (to 100 000 rows/s) so the bench finishes in minutes;
budgets per day/month, outputs and monitors are as shipped (``degrade`` puts
the deny-on-alarm rule in shadow mode, so the alarm answers noisy labels).

    .venv/bin/python bench/extraction.py                   # the whole table, 3 seeds (a few minutes)
    .venv/bin/python bench/extraction.py --seeds 1 --settings label,shipped
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUDGETS = (100, 300, 1000, 3000)
JACOBIAN_LAMBDA = float(os.environ.get("JACOBIAN_LAMBDA", "0.1"))  # step, as a share of the pixel range (Papernot: 0.1)
JACOBIAN_TAU = int(os.environ.get("JACOBIAN_TAU", "3"))
SECRET = "bench-extraction-hs256-secret-0123456789abcdef"
NOISE_KEY = "bench-extraction-noise-key-0123456789"
SHIPPED = ROOT / "policies" / "protected-classifier.yaml"

SETTINGS: dict[str, dict[str, Any]] = {
    "full": {"label": "full scores", "outputs": None},
    "top1": {"label": "top-1 + rounded score", "outputs": {"top_k": 1, "round_decimals": 2}},
    "label": {"label": "label only", "outputs": {"label_only": True}},
    "laplace3": {"label": "Laplace noise, eps = 3 (repeatable)", "outputs": {"noise_epsilon": 3}},
    "rows": {"label": "label only + rows budget (per_day 1000)", "outputs": {"label_only": True},
             "quota": {"cost": "rows", "rate_per_s": 100000, "burst": 100000, "per_day": 1000}},
    "degrade": {"label": "shipped, alarm => label_only + noise", "policy": "degrade"},
    "shipped": {"label": "shipped example policy (deny on alarm)", "policy": "shipped"},
}


# ---------------------------------------------------------------------------- the gateway

def policy_for(name: str, directory: Path) -> Path:
    setting = SETTINGS[name]
    if "policy" in setting:
        doc = yaml.safe_load(SHIPPED.read_text())
        for quota in doc["quotas"]:
            quota["rate_per_s"], quota["burst"] = 100000, 64  # keep the 64-row burst: the batch cap as shipped
        if setting["policy"] == "degrade":
            for rule in doc["rules"]:
                if rule["id"] == "deny-callers-in-extraction-alarm":
                    rule["mode"] = "shadow"
        for monitor in doc.get("monitors", []):
            if monitor.get("reference"):
                monitor["reference"] = str(SHIPPED.parent / monitor["reference"])
    else:
        doc = {"roles": {"partner": [], "model-owner": []},
               "rules": [{"id": "use", "roles": ["partner", "model-owner"], "models": ["digits"],
                          "actions": ["infer"], "effect": "allow"}],
               "outputs": [{"id": "partners", "roles": ["partner"], "models": ["digits"], **setting["outputs"]}]
               if setting["outputs"] else []}
        if setting.get("quota"):
            doc["quotas"] = [{"roles": ["partner"], "models": ["digits"], **setting["quota"]}]
    path = directory / f"policy-{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


async def start_gateway(name: str, directory: Path) -> Any:
    from gateway.config import load_config
    from gateway.server import start

    config = {
        "server": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "auth": {"jwt": {"issuer": "bench", "audience": "maas", "algorithms": ["HS256"],
                         "hs256_secret_env": "BENCH_EXTRACTION_SECRET"}},
        "policy": {"file": str(policy_for(name, directory)), "watch": False},
        "quota": {"store": "memory"},
        "audit": {"file": str(directory / f"audit-{name}.log")},
        "hardening": {"noise_key_env": "BENCH_EXTRACTION_NOISE_KEY"},
        "models": {"digits": {"backend": {"type": "torch", "arch": "digits-mlp", "max_batch_delay_ms": 0,
                                          "path": str(ROOT / "backends/torch/assets/digits.safetensors")}}},
    }
    path = directory / f"gateway-{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return await start(load_config(path), port=0, admin_port=0)


def token(subject: str, roles: list[str]) -> str:
    import jwt

    now = int(time.time())
    return jwt.encode({"sub": subject, "roles": roles, "iss": "bench", "aud": "maas", "iat": now, "exp": now + 3600},
                      SECRET, algorithm="HS256")


class Oracle:
    """One caller's view of the model through the gateway: rows in, (soft) labels out, until refused."""

    def __init__(self, session: Any, url: str, subject: str, roles: list[str]) -> None:
        self.session, self.url = session, url + "/v2/models/digits/infer"
        self.headers = {"Authorization": f"Bearer {token(subject, roles)}"}
        self.refused: int | None = None  # rows answered before the first refusal

    async def ask(self, rows: np.ndarray, answered: int = 0) -> np.ndarray | None:
        """[n, 10] targets (probabilities, or one-hot when only labels come back); None once refused."""
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [len(rows), 64],
                            "data": np.round(rows, 3).reshape(-1).tolist()}]}
        async with self.session.post(self.url, json=body, headers=self.headers) as r:
            if r.status != 200:
                if self.refused is None:
                    self.refused = answered
                return None
            outputs = {o["name"]: o for o in (await r.json())["outputs"]}
        n = len(rows)
        if "output" in outputs:
            return np.asarray(outputs["output"]["data"], dtype=np.float64).reshape(n, 10)
        idx = np.asarray(outputs["top_k_indices"]["data"], dtype=np.int64).reshape(n, -1)
        target = np.zeros((n, 10))
        if "top_k_scores" in outputs and idx.shape[1] > 1:  # several scores: softmax-free, as given, then normalised
            val = np.clip(np.asarray(outputs["top_k_scores"]["data"]).reshape(n, -1), 0, None)
            np.put_along_axis(target, idx, val, axis=1)
            sums = target.sum(axis=1, keepdims=True)
            target = np.where(sums > 0, target / np.maximum(sums, 1e-9), np.eye(10)[idx[:, 0]])
        elif "top_k_scores" in outputs:  # top-1 and its score: the rest spread evenly
            score = np.clip(np.asarray(outputs["top_k_scores"]["data"]).reshape(n), 0, 1)
            target += ((1 - score) / 9)[:, None]
            target[np.arange(n), idx[:, 0]] = score
        else:
            target[np.arange(n), idx[:, 0]] = 1.0
        return target


# ---------------------------------------------------------------------------- the copies

def train_copy(x: np.ndarray, y: np.ndarray, seed: int, epochs: int = 300) -> Any:
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=1e-4)
    xs = torch.tensor(x / 16.0, dtype=torch.float32)
    ys = torch.tensor(y, dtype=torch.float32)
    for _ in range(epochs):
        opt.zero_grad()
        loss = -(ys * torch.log_softmax(model(xs), dim=1)).sum(dim=1).mean()
        loss.backward()
        opt.step()
    return model


def predict(model: Any, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(x / 16.0, dtype=torch.float32)).argmax(dim=1).numpy()


def jacobian_step(model: Any, x: np.ndarray, labels: np.ndarray, lam: float) -> np.ndarray:
    import torch

    xs = torch.tensor(x / 16.0, dtype=torch.float32, requires_grad=True)
    out = model(xs)
    out.gather(1, torch.tensor(labels).view(-1, 1)).sum().backward()
    assert xs.grad is not None
    return np.clip(x + lam * 16.0 * np.sign(xs.grad.numpy()), 0, 16)


# ---------------------------------------------------------------------------- the attacks

async def knockoff(oracle: Oracle, seeds_x: np.ndarray, budget: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    asked = 0
    while asked < budget:
        n = min(10, budget - asked)
        kind = rng.integers(0, 3, n)
        a, b = seeds_x[rng.integers(0, len(seeds_x), n)], seeds_x[rng.integers(0, len(seeds_x), n)]
        lam = rng.uniform(0, 1, (n, 1))
        rows = np.where((kind == 0)[:, None], rng.uniform(0, 16, (n, 64)),
                        np.where((kind == 1)[:, None], lam * a + (1 - lam) * b,
                                 np.clip(a + rng.normal(0, 3, (n, 64)), 0, 16)))
        got = await oracle.ask(rows, asked)
        asked += n
        if got is None:
            break
        xs.append(rows)
        ys.append(got)
    return (np.concatenate(xs) if xs else np.zeros((0, 64))), (np.concatenate(ys) if ys else np.zeros((0, 10)))


async def jacobian(oracle: Oracle, seeds_x: np.ndarray, seeds_y: np.ndarray, budget: int,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    known_x, known_y = seeds_x.copy(), np.eye(10)[seeds_y]  # the attacker's own labelled digits
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    asked, rounds = 0, 0
    while asked < budget:
        model = train_copy(np.concatenate([known_x, *xs]), np.concatenate([known_y, *ys]), seed, epochs=150)
        pool = np.concatenate([known_x, *xs])
        labels = predict(model, pool)
        # step towards the copy's decision boundary (against its label's gradient), where a copy learns the most;
        # Papernot's periodic step size flips the direction every JACOBIAN_TAU rounds so points do not escape
        sign = -1.0 if (rounds // JACOBIAN_TAU) % 2 == 0 else 1.0
        new = jacobian_step(model, pool, labels, JACOBIAN_LAMBDA * sign)
        rounds += 1
        for i in range(0, len(new), 10):
            if asked >= budget:
                break
            rows = new[i:i + min(10, budget - asked)]
            got = await oracle.ask(rows, asked)
            asked += len(rows)
            if got is None:
                return _stack(xs, ys)
            xs.append(rows)
            ys.append(got)
    return _stack(xs, ys)


def _stack(xs: list[np.ndarray], ys: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return (np.concatenate(xs) if xs else np.zeros((0, 64))), (np.concatenate(ys) if ys else np.zeros((0, 10)))


# ---------------------------------------------------------------------------- one setting

async def run_setting(name: str, seeds: int, honest_streams: int, directory: Path) -> dict[str, Any]:
    import aiohttp

    from backends.torch.train_digits import split

    x_train, x_test, y_train, y_test = (np.asarray(a) for a in split())
    running = await start_gateway(name, directory)
    url = f"http://127.0.0.1:{running.port}"
    result: dict[str, Any] = {"setting": SETTINGS[name]["label"]}
    try:
        async with aiohttp.ClientSession() as session:
            owner = Oracle(session, url, "owner", ["model-owner"])
            truth = await owner.ask(x_test)
            assert truth is not None
            real = truth.argmax(axis=1)
            for attack in ("knockoff", "jacobian"):
                agreement: dict[int, list[float]] = {n: [] for n in BUDGETS}
                flagged_at: list[int | None] = []
                for seed in range(seeds):
                    rng = np.random.default_rng(1000 + seed)
                    pick = rng.choice(len(x_train), 30, replace=False)
                    seeds_x, seeds_y = x_train[pick], y_train[pick]
                    oracle = Oracle(session, url, f"{attack}-{seed}", ["partner"])
                    if attack == "knockoff":
                        qx, qy = await knockoff(oracle, seeds_x, max(BUDGETS), rng)
                    else:
                        qx, qy = await jacobian(oracle, seeds_x, seeds_y, max(BUDGETS), seed)
                    flagged_at.append(oracle.refused)
                    for n in BUDGETS:
                        x = np.concatenate([seeds_x, qx[:n]])
                        y = np.concatenate([np.eye(10)[seeds_y], qy[:n]])
                        copy = train_copy(x, y, seed)
                        agreement[n].append(float((predict(copy, x_test) == real).mean()))
                result[attack] = {n: float(np.mean(v)) for n, v in agreement.items()}
                result[f"{attack}_cut_off_after"] = flagged_at
            accuracy, flagged = [], 0
            for h in range(honest_streams):
                rng = np.random.default_rng(50 + h)
                order = rng.choice(len(x_test), 120, replace=False)
                oracle = Oracle(session, url, f"honest-{h}", ["partner"])
                right = 0
                for i in order:
                    got = await oracle.ask(x_test[i:i + 1])
                    if got is None:
                        break
                    right += int(got[0].argmax() == y_test[i])
                accuracy.append(right / len(order))
                flagged += oracle.refused is not None
            running.gateway.audit.flush()
            lines = [json.loads(x) for x in (directory / f"audit-{name}.log").read_text().splitlines() if x.strip()]
            alarmed = {x["subject"] for x in lines if x.get("monitors")}
            for attack in ("knockoff", "jacobian"):  # rows answered before a request saw the caller in alarm
                flagged_rows: list[int | None] = []
                for seed in range(seeds):
                    mine = [x for x in lines if x["subject"] == f"{attack}-{seed}"]
                    first = next((i for i, x in enumerate(mine) if x.get("monitors")), None)
                    flagged_rows.append(None if first is None else 10 * first)  # the attackers ask 10 rows a request
                result[f"{attack}_flagged_at"] = flagged_rows
            flagged = len({f"honest-{h}" for h in range(honest_streams)} & alarmed) or flagged
            result["honest_accuracy"] = float(np.mean(accuracy))
            result["honest_flagged"] = f"{flagged}/{honest_streams}"
    finally:
        await running.stop()
    return result


def print_table(results: list[dict[str, Any]]) -> None:
    head = "| answers the attacker gets | attack | " + " | ".join(f"N={n}" for n in BUDGETS)
    print(head + " | flagged at (rows, per seed) | cut off after (rows) | honest accuracy | honest flagged |")
    print("|" + " --- |" * (len(BUDGETS) + 6))
    for r in results:
        for attack in ("knockoff", "jacobian"):
            cells = " | ".join(f"{100 * r[attack][n]:.0f} %" for n in BUDGETS)
            cut = ", ".join("-" if c is None else str(c) for c in r[f"{attack}_cut_off_after"])
            flagged = ", ".join("-" if c is None else str(c) for c in r[f"{attack}_flagged_at"])
            print(f"| {r['setting']} | {attack} | {cells} | {flagged} | {cut} | {100 * r['honest_accuracy']:.1f} % "
                  f"| {r['honest_flagged']} |")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--honest", type=int, default=5, help="honest streams per setting (15 for shipped/degrade)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    os.environ["BENCH_EXTRACTION_SECRET"] = SECRET
    os.environ["BENCH_EXTRACTION_NOISE_KEY"] = NOISE_KEY
    import logging

    import torch

    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    results = []
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="maas-extraction-") as tmp:
        for name in args.settings.split(","):
            streams = 15 if SETTINGS[name].get("policy") else args.honest
            results.append(await run_setting(name, args.seeds, streams, Path(tmp)))
            print(f"# {name}: done after {time.time() - started:.0f} s", file=sys.stderr)
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
