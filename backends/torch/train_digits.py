"""Rebuild the bundled digits model: train, report held-out accuracy, write and sign the assets.

    python -m backends.torch.train_digits            # writes backends/torch/assets/
    python -m backends.torch.train_digits --out DIR --signing-key-out demo_signing.pem

Trains the ``digits-mlp`` architecture on scikit-learn's bundled 8x8 digits
(1,797 images, no download) with a fixed seed and a fixed 80/20 stratified
split, prints the accuracy on the held-out 20 %, saves the weights as
safetensors and signs them with a *freshly generated* Ed25519 key. Only the
public key is kept (``digits_signing.pub``): the private key exists for the
length of this run unless ``--signing-key-out`` asks for it, so nobody —
including whoever rebuilt the assets — can later sign a different model that
the demo would trust.

scikit-learn is a build-time dependency only (``pip install .[train]``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
MODEL_FILE = "digits.safetensors"
PUBLIC_KEY_FILE = "digits_signing.pub"
SEED = 0
TEST_FRACTION = 0.2
EPOCHS = 200
LEARNING_RATE = 0.01
WEIGHT_DECAY = 1e-3


def split() -> tuple[object, object, object, object]:
    """The fixed train/held-out split: (x_train, x_test, y_train, y_test), x as float32 pixel values 0..16."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.data.astype(np.float32)
    y = digits.target.astype(np.int64)
    return tuple(train_test_split(x, y, test_size=TEST_FRACTION, random_state=SEED, stratify=y))  # type: ignore[return-value]


def train() -> tuple[object, float, int]:
    """Train a DigitsMLP; returns (model, held-out accuracy, held-out sample count)."""
    import torch
    import torch.nn.functional as F

    from .archs import DigitsMLP

    torch.manual_seed(SEED)
    x_train, x_test, y_train, y_test = split()
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)  # type: ignore[arg-type]
    model = DigitsMLP()
    optimiser = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    for _ in range(EPOCHS):  # full batch: 1,437 samples fit in one step
        optimiser.zero_grad()
        loss = F.cross_entropy(model.logits(xt), yt)
        loss.backward()
        optimiser.step()
    model.eval()
    with torch.inference_mode():
        predicted = model(torch.from_numpy(x_test)).argmax(dim=1)  # type: ignore[arg-type]
    correct = int((predicted == torch.from_numpy(y_test)).sum())  # type: ignore[arg-type]
    return model, correct / len(y_test), len(y_test)  # type: ignore[arg-type]


def write_assets(out: Path, signing_key_out: Path | None = None) -> tuple[float, int]:
    from safetensors.torch import save_file

    from . import signing

    model, accuracy, count = train()
    out.mkdir(parents=True, exist_ok=True)
    weights = out / MODEL_FILE
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}  # type: ignore[attr-defined]
    save_file(state, str(weights), metadata={"arch": "digits-mlp", "held_out_accuracy": f"{accuracy:.4f}"})
    weights.chmod(0o644)  # a public asset (safetensors writes 0600)
    key = signing.new_signing_key()
    signing.sign_file(weights, key)
    (out / PUBLIC_KEY_FILE).write_bytes(signing.public_pem(key.public_key()))
    if signing_key_out is not None:
        fd = os.open(signing_key_out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(signing.private_pem(key))
    return accuracy, count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ASSETS, help="directory for the assets (default: the bundled ones)")
    parser.add_argument("--signing-key-out", type=Path, help="also keep the private signing key here (0600)")
    args = parser.parse_args(argv)
    try:
        import sklearn  # noqa: F401
    except ImportError:
        print("error: scikit-learn is needed to rebuild the model: pip install '.[train]'", file=sys.stderr)
        return 1
    accuracy, count = write_assets(args.out, args.signing_key_out)
    size = (args.out / MODEL_FILE).stat().st_size
    print(f"held-out accuracy: {accuracy:.2%} on {count} samples")
    print(f"wrote {args.out / MODEL_FILE} ({size} bytes), {MODEL_FILE}.sig and {PUBLIC_KEY_FILE}")
    return 0 if accuracy >= 0.95 else 1


if __name__ == "__main__":
    raise SystemExit(main())
