#!/usr/bin/env python3
"""What running the model in a secret-free worker process would cost the local runner (issue 13, part 4).

The question: should the torch runner execute models in a child process that
holds no gateway secret (no AES key, TLS key or API-key file in its memory,
environment or readable files), the parent decrypting and handing over the
weights? The price is one round trip per *batch*: the batch's input goes to the
child and its output comes back. This measures that price against the forward
pass itself, on the seed's model (784 -> 128 -> 10) and the runner's batch
sizes, with the child started exactly as such a worker would be: an empty
environment, weights sent over its stdin as safetensors bytes, then batches as
raw float32 over pipes.

    python bench/bench_worker_ipc.py            # ~10 s

It does not build the worker; it tells whether one fits in the issue's 10 %
throughput budget (the README's security section quotes the result).
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time

import numpy as np

CHILD = r"""
import struct, sys
import numpy as np, torch
from safetensors.torch import load
from backends.torch.archs import instantiate
torch.set_num_threads(int(sys.argv[1]))
src, dst = sys.stdin.buffer, sys.stdout.buffer
(n,) = struct.unpack("<Q", src.read(8))
model = instantiate("seed-mlp")
model.load_state_dict(load(src.read(n)))
model.eval()
while head := src.read(8):
    (rows,) = struct.unpack("<Q", head)
    x = torch.from_numpy(np.frombuffer(bytearray(src.read(rows * 784 * 4)), np.float32).reshape(rows, 784))
    with torch.inference_mode():
        out = model(x).numpy()
    dst.write(out.tobytes()); dst.flush()
"""


def main() -> None:
    import torch
    from safetensors.torch import save

    from backends.torch.archs import instantiate

    threads = max(1, min(4, (os.cpu_count() or 2) // 2))
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = instantiate("seed-mlp").eval()
    weights = save(model.state_dict())
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(threads)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, env={"PYTHONPATH": root, "PATH": "/usr/bin:/bin"}, cwd=root)
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write(struct.pack("<Q", len(weights)) + weights)
    child.stdin.flush()
    print(f"seed-mlp, {threads} torch thread(s); per batch, median of many")
    print(f"{'batch':>5} {'in-process us':>14} {'worker us':>10} {'added us':>9}")
    for rows in (1, 8, 64):
        x = np.random.rand(rows, 784).astype(np.float32)

        def local() -> np.ndarray:
            with torch.inference_mode():
                return model(torch.from_numpy(x)).numpy()

        def remote() -> np.ndarray:
            child.stdin.write(struct.pack("<Q", rows) + x.tobytes())  # type: ignore[union-attr]
            child.stdin.flush()  # type: ignore[union-attr]
            return np.frombuffer(child.stdout.read(rows * 10 * 4), np.float32).reshape(rows, 10)  # type: ignore[union-attr]

        assert np.allclose(local(), remote(), atol=1e-5)
        times = {}
        for name, fn in (("local", local), ("remote", remote)):
            samples = []
            for _ in range(2000 if rows < 64 else 800):
                t0 = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t0)
            times[name] = float(np.median(samples)) * 1e6
        print(f"{rows:>5} {times['local']:>14.0f} {times['remote']:>10.0f} {times['remote'] - times['local']:>9.0f}")
    child.stdin.close()
    child.wait(timeout=10)


if __name__ == "__main__":
    main()
