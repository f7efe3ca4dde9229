"""TorchScript is code: real exported models pass the op allow-list, models that reach outside are refused.

The attack these tests keep closed: a "model" whose forward() returns the bytes of
a file (the gateway's AES key, its TLS key, /proc/self/environ), encrypted and
signed with the product's own CLI, answered every caller with that file.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path
from typing import Any, Callable, List

import pytest
import torch
from torch import nn

from backends.torch import loader, torchscript_guard
from backends.torch.loader import ModelLoadError
from gateway.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.* in torch >= 2.9


def archive(module: Any) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(module, buffer)
    return buffer.getvalue()


def load(data: bytes) -> loader.LoadedModel:
    return loader.load_module(data, arch=None, device="cpu", allow_torchscript=True)


# -- real models: four families, traced and scripted ----------------------------------------------------


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 10), nn.Softmax(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16), nn.GELU(), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten())
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(32)
        self.out = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.encoder(self.embed(x))).mean(1))


class Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(1000, 16, mode="mean")
        self.fc = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc(self.bag(x)))


FAMILIES: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor]]] = {
    "mlp": (MLP, lambda: torch.rand(2, 64)),
    "cnn-batchnorm": (CNN, lambda: torch.rand(2, 1, 8, 8)),
    "transformer-encoder": (Encoder, lambda: torch.randint(0, 100, (2, 7))),
    "embedding-bag": (Bag, lambda: torch.randint(0, 1000, (2, 5))),
}


@pytest.mark.parametrize("how", ["trace", "script"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_real_exported_models_pass_the_allow_list(family: str, how: str) -> None:
    torch.manual_seed(0)
    make, sample = FAMILIES[family]
    model, x = make().eval(), sample()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.jit.trace(model, x, check_trace=False) if how == "trace" else torch.jit.script(model)
    loaded = load(archive(exported))
    assert loaded.format == "torchscript"
    with torch.inference_mode():
        assert torch.allclose(loaded.module(x), model(x), atol=1e-5)


def test_the_allow_list_never_holds_what_reaches_outside() -> None:
    ops = torchscript_guard.allowed_ops()
    assert "aten::linear" in ops and "prim::If" in ops
    for never in ("aten::from_file", "aten::save", "prim::Print", "prim::CallMethod", "prim::CallFunction",
                  "prim::PythonOp", "prim::SetAttr", "aten::empty", "aten::empty_like", "aten::new_empty",
                  "aten::set_", "aten::as_strided", "aten::copy_"):
        assert never not in ops, never


# -- models that reach outside ------------------------------------------------------------------------------

SECRET_PATH = "/tmp/maas-guard-test-secret"


class FromFile(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_file("/tmp/maas-guard-test-secret", size=32, dtype=torch.uint8).float() + x.sum()


@torch.jit.script
def read_key(path: str) -> torch.Tensor:
    return torch.from_file(path, size=32, dtype=torch.uint8)


class Helper(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return read_key("/tmp/maas-guard-test-secret").float() + x.sum()


class Save(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.save(x, "/tmp/maas-guard-test-out.pt")
        return x


class Prints(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        print(x)
        return x


class Remembers(nn.Module):
    """Keeps the last caller's input and hands it to the next caller, through allowed in-place ops."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("last", torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        previous = self.last * 1
        self.last.mul_(0).add_(x[0])
        return previous


class RemembersThroughOut(nn.Module):
    """The same through an ``out=`` argument: the op's name (aten::add) is allowed, its schema says it writes."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("last", torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        previous = self.last * 1
        torch.add(x[0], 0.0, out=self.last)
        return previous


class RemembersThroughBatchNorm(nn.Module):
    """batch_norm in training mode writes the batch's mean into running_mean: the next caller reads it."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(4))
        self.register_buffer("var", torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        previous = self.mean * 1
        nn.functional.batch_norm(x, self.mean, self.var, training=True, momentum=1.0)
        return previous


class RemembersInAList(nn.Module):
    """The same through a list attribute: aten::append is allowed for local lists, not for the module's."""

    __annotations__ = {"cache": List[torch.Tensor]}  # noqa: UP006 (a real type: this file's annotations are strings)

    def __init__(self) -> None:
        super().__init__()
        self.cache: List[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        previous = x * 0
        if len(self.cache) > 0:
            previous = self.cache[-1]
        self.cache.append(x)
        return previous


@torch.jit.script
class Box:
    def __init__(self) -> None:
        self.training = True
        self.last = torch.zeros(4)


class RemembersBehindATrainingFlag(nn.Module):
    """An object's own "training" attribute is not the module's: eval() does not clear it, so it is not folded."""

    def __init__(self) -> None:
        super().__init__()
        self.box = Box()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        previous = self.box.last * 1
        if self.box.training:
            self.box.last.add_(x[0])
        return previous


class LoadsSecretOnLoad(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.k = torch.zeros(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.k

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, bool]:
        return (self.k, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool]) -> None:
        self.k = torch.from_file("/tmp/maas-guard-test-secret", size=32, dtype=torch.uint8).float()
        self.training = state[1]


class Exported(nn.Module):
    """A harmless forward() and a second, exported method that reads a file: every method is walked."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @torch.jit.export
    def steal(self) -> torch.Tensor:
        return torch.from_file("/tmp/maas-guard-test-secret", size=32, dtype=torch.uint8)


class Inner(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_file("/tmp/maas-guard-test-secret", size=32, dtype=torch.uint8).float() + x.sum()


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Inner()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def hooked() -> Any:
    def hook(module: nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> torch.Tensor:
        return torch.from_file("/tmp/maas-guard-test-secret", size=32, dtype=torch.uint8).float()

    model = nn.Linear(4, 4)
    model.register_forward_hook(hook)
    return torch.jit.script(model)


@pytest.fixture(autouse=True)
def secret() -> Any:
    Path(SECRET_PATH).write_bytes(b"TOP-SECRET-AES-KEY-MATERIAL-1234")
    yield b"TOP-SECRET-AES-KEY-MATERIAL-1234"
    Path(SECRET_PATH).unlink(missing_ok=True)


@pytest.mark.parametrize("make, message", [
    (lambda: torch.jit.script(FromFile()), r"operation aten::from_file in forward \(it reads a file\)"),
    (lambda: torch.jit.script(Helper()), r"aten::from_file in forward \(in function read_key called from it\)"),
    (lambda: torch.jit.script(Save()), r"operation aten::save in forward \(it writes a file\)"),
    (lambda: torch.jit.script(Prints()), r"operation prim::Print in forward"),
    (lambda: torch.jit.script(Remembers()), r"aten::mul_ in forward writes into the module's own state"),
    (lambda: torch.jit.script(RemembersThroughOut()), r"aten::add in forward writes into the module's own state"),
    (lambda: torch.jit.script(RemembersThroughBatchNorm()), r"aten::batch_norm in forward writes into the module's"),
    (lambda: torch.jit.script(RemembersInAList()), r"aten::append in forward writes into the module's own state"),
    (lambda: torch.jit.script(RemembersBehindATrainingFlag()), r"aten::add_ in forward writes into the module's own"),
    (lambda: torch.jit.script(LoadsSecretOnLoad()), r"defines __setstate__.*runs while the model is loaded"),
    (lambda: torch.jit.script(Exported()), r"operation aten::from_file in steal"),
    (lambda: torch.jit.script(Outer()), r"operation aten::from_file in (inner\.)?forward"),
    (hooked, r"operation aten::from_file in forward hook hook"),
])
def test_models_that_reach_outside_are_refused_naming_the_operation(make: Callable[[], Any], message: str,
                                                                    secret: bytes) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = archive(make())
    with pytest.raises(ModelLoadError, match=message) as info:
        load(data)
    assert "\n" not in str(info.value) and secret.decode() not in str(info.value)


def test_a_custom_cpp_class_is_refused_before_loading() -> None:
    quantized = torch.ao.quantization.quantize_dynamic(MLP().eval(), {nn.Linear}, dtype=torch.qint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = archive(torch.jit.script(quantized))
    with pytest.raises(ModelLoadError, match=r"__setstate__|torch\.classes"):
        load(data)


class CallsACustomClass(nn.Module):
    """Holds a C++ custom-class object (quantized packed weights) and calls one of its methods."""

    def __init__(self) -> None:
        super().__init__()
        weight = torch.quantize_per_tensor(torch.rand(4, 4), 0.1, 0, torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(weight, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.packed.unpack()
        return x + w.dequantize().sum()


def test_a_call_into_a_custom_class_is_refused_in_the_graph_too() -> None:
    """The archive of such a model is refused before loading (torch.classes); the graph walk alone refuses it too."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(CallsACustomClass())
    with pytest.raises(torchscript_guard.TorchScriptRefused, match=r"operation prim::CallMethod in forward \(a call "
                       r"into a custom class"):
        torchscript_guard.check_module(scripted)
    with pytest.raises(ModelLoadError, match=r"torch\.classes|__setstate__"):
        load(archive(scripted))


def test_a_duplicated_archive_member_is_refused() -> None:
    import zipfile

    data = archive(torch.jit.script(MLP()))
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src:
        members = [(i.filename, src.read(i)) for i in src.infolist()]
    code = next(m for m in members if m[0].endswith(".py"))
    with zipfile.ZipFile(out, "w") as dst, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
        for name, content in [*members, code]:
            dst.writestr(name, content)
    with pytest.raises(ModelLoadError, match="lists a member twice"):
        load(out.getvalue())


# -- the attack end to end: encrypted and signed with the product's CLI, served with verify_key_file ------------


@pytest.mark.parametrize("make, op", [(FromFile, "aten::from_file"), (Save, "aten::save"),
                                      (Helper, "aten::from_file")])
async def test_signed_encrypted_attack_models_are_refused_at_load(tmp_path: Path, make: Callable[[], nn.Module],
                                                                  op: str, secret: bytes,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    from gateway.errors import ConfigError
    from tests.test_torch_backend import make_backend

    plain = tmp_path / "model.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain.write_bytes(archive(torch.jit.script(make())))
    assert main(["model", "keygen", "--out", str(tmp_path / "aes.key")]) == 0
    assert main(["model", "keygen", "--signing", "--out", str(tmp_path / "signer")]) == 0
    assert main(["model", "encrypt", str(plain), "--out", str(tmp_path / "model.pt.enc"),
                 "--key-file", str(tmp_path / "aes.key")]) == 0
    assert main(["model", "sign", str(tmp_path / "model.pt.enc"), "--key", str(tmp_path / "signer")]) == 0
    section = {"path": "model.pt.enc", "key_file": "aes.key", "verify_key_file": "signer.pub", "input_shape": [4]}
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ConfigError, match="model digits: this is a TorchScript model: a program") as refused:
        await make_backend(tmp_path, **section).start()
    with pytest.raises(ConfigError, match=f"operation {op} in forward") as info:
        await make_backend(tmp_path, allow_torchscript=True, **section).start()
    backend = make_backend(tmp_path, allow_torchscript=True, start_degraded=True, **section)
    await backend.start()
    assert not backend.ready()
    key_text = (tmp_path / "aes.key").read_text().strip()
    for text in (str(refused.value), str(info.value), caplog.text):
        assert secret.decode() not in text and key_text not in text
    assert op in caplog.text  # the degraded start logs the reason
    assert not Path("/tmp/maas-guard-test-out.pt").exists()

