"""Format detection by content, loading into registered architectures, and TorchScript."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from backends.torch import archs, loader
from backends.torch.loader import ModelLoadError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.* in torch >= 2.9

BUNDLED = Path(__file__).resolve().parents[1] / "backends" / "torch" / "assets" / "digits.safetensors"


def digits_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {k: v.contiguous() for k, v in archs.DigitsMLP().state_dict().items()}


def test_sniff_by_content() -> None:
    assert loader.sniff(BUNDLED.read_bytes()) == "safetensors"
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(archs.DigitsMLP()), buffer)
    assert loader.sniff(buffer.getvalue()) == "torchscript"
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buffer)
    assert loader.sniff(buffer.getvalue()) == "torch-save"
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buffer, _use_new_zipfile_serialization=False)
    assert loader.sniff(buffer.getvalue()) == "pickle"
    assert loader.sniff(b"") == "unknown"
    assert loader.sniff(b"PK\x03\x04garbage") == "unknown"
    assert loader.sniff(b"\x00" * 64) == "unknown"


def test_torch_save_checkpoint_is_refused_with_a_reason() -> None:
    buffer = io.BytesIO()
    torch.save(digits_state(), buffer)
    with pytest.raises(ModelLoadError, match="torch.save checkpoint.*convert to safetensors"):
        loader.load_module(buffer.getvalue(), arch="digits-mlp", device="cpu")


def test_safetensors_into_builtin_arch() -> None:
    state = digits_state()
    loaded = loader.load_module(save(state), arch="digits-mlp", device="cpu")
    assert loaded.format == "safetensors" and loaded.input_shape == (64,) and loaded.output_shape == (10,)
    for name, tensor in loaded.module.state_dict().items():
        assert torch.equal(tensor, state[name])
    assert not loaded.module.training


def test_safetensors_needs_an_arch() -> None:
    with pytest.raises(ModelLoadError, match="need `arch:`"):
        loader.load_module(save(digits_state()), arch=None, device="cpu")


def test_strict_loading_names_the_mismatch() -> None:
    state = digits_state()
    del state["fc2.bias"]
    state["extra"] = torch.zeros(1)
    with pytest.raises(ModelLoadError, match="weights do not fit arch 'digits-mlp'.*fc2.bias.*extra"):
        loader.load_module(save(state), arch="digits-mlp", device="cpu")
    state = digits_state()
    state["fc1.weight"] = torch.zeros(3, 64)
    with pytest.raises(ModelLoadError, match="size mismatch"):
        loader.load_module(save(state), arch="digits-mlp", device="cpu")


def test_weights_for_another_arch_are_refused() -> None:
    with pytest.raises(ModelLoadError, match="do not fit arch 'seed-mlp'"):
        loader.load_module(BUNDLED.read_bytes(), arch="seed-mlp", device="cpu")


def test_malformed_safetensors() -> None:
    data = bytearray(save(digits_state()))
    with pytest.raises(ModelLoadError, match="malformed"):
        loader.load_module(bytes(data[:-100]), arch="digits-mlp", device="cpu")


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ModelLoadError, match="unrecognised model format"):
        loader.load_module(b"\x00" * 64, arch="digits-mlp", device="cpu")


def test_torchscript_loads_without_arch() -> None:
    scripted = torch.jit.script(archs.DigitsMLP())
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    with pytest.raises(ModelLoadError, match="TorchScript model: a program"):
        loader.load_module(buffer.getvalue(), arch=None, device="cpu")
    loaded = loader.load_module(buffer.getvalue(), arch=None, device="cpu", allow_torchscript=True)
    assert loaded.format == "torchscript"
    x = torch.rand(3, 64) * 16
    with torch.inference_mode():
        assert torch.equal(loaded.module(x), scripted(x))


def test_corrupt_torchscript_is_one_line() -> None:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(archs.DigitsMLP()), buffer)
    data = buffer.getvalue()
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            if not item.filename.endswith("constants.pkl") and "/code/" not in item.filename:
                continue
            dst.writestr(item, src.read(item))
    with pytest.raises(ModelLoadError, match="TorchScript archive cannot be loaded") as info:
        loader.load_module(out.getvalue(), arch=None, device="cpu", allow_torchscript=True)
    assert "\n" not in str(info.value)


# -- the registry -------------------------------------------------------------


@pytest.fixture
def tiny_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "tiny_arch_for_tests.py").write_text(textwrap.dedent("""
        import torch
        class Tiny(torch.nn.Module):
            input_shape = (2,)
            def __init__(self):
                super().__init__()
                self.lin = torch.nn.Linear(2, 3)
            def forward(self, x):
                return self.lin(x)
        class WithBuffer(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = torch.nn.Linear(2, 3)
                self.register_buffer("scale", torch.full((3,), 2.0), persistent=False)  # not in the file
            def forward(self, x):
                return self.lin(x) * self.scale
        class NotAModule:
            pass
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "tiny_arch_for_tests"


def test_dotted_path_arch(tiny_module: str) -> None:
    cls = archs.resolve(f"{tiny_module}:Tiny")
    loaded = loader.load_module(save({k: v.contiguous() for k, v in cls().state_dict().items()}),
                                arch=f"{tiny_module}:Tiny", device="cpu")
    assert loaded.input_shape == (2,)


def test_arch_with_non_persistent_buffer_is_built_for_real(tiny_module: str) -> None:
    cls = archs.resolve(f"{tiny_module}:WithBuffer")
    state = {k: v.contiguous() for k, v in cls().state_dict().items()}
    loaded = loader.load_module(save(state), arch=f"{tiny_module}:WithBuffer", device="cpu")
    assert not any(t.is_meta for t in (*loaded.module.parameters(), *loaded.module.buffers()))
    with torch.inference_mode():
        assert torch.allclose(loaded.module(torch.zeros(1, 2)), state["lin.bias"] * 2)


def test_half_precision_weights_are_cast_to_the_arch_dtype() -> None:
    state = {k: v.half() for k, v in digits_state().items()}
    loaded = loader.load_module(save(state), arch="digits-mlp", device="cpu")
    assert all(p.dtype == torch.float32 for p in loaded.module.parameters())


def test_entry_point_arch(tiny_module: str, tmp_path: Path) -> None:
    dist = tmp_path / "tiny_arch_pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tiny-arch-pkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[maas_gateway.archs]\ntiny = {tiny_module}:Tiny\n")
    assert archs.resolve("tiny").__name__ == "Tiny"


@pytest.mark.parametrize("name,message", [
    ("no-such-arch", "unknown arch 'no-such-arch'"),
    ("no_such_module_xyz:Thing", "cannot import no_such_module_xyz"),
    ("tiny_arch_for_tests:Missing", "has no Missing"),
    ("tiny_arch_for_tests:NotAModule", "is not an nn.Module class"),
])
def test_bad_arch_names(tiny_module: str, name: str, message: str) -> None:
    with pytest.raises(archs.ArchError, match=message):
        archs.resolve(name)
