"""TorchScript is code: what a model may run before it is served.

A TorchScript archive carries programs, not just weights. Signatures and
encryption prove who made it, not that it is harmless: a ``forward()`` that
returns ``torch.from_file("/run/secrets/model.key")`` answers every caller with
the gateway's key. So an allowed TorchScript model is checked twice:

1. ``prescan`` reads the archive *before* ``torch.jit.load``: loading already
   runs code — a class's ``__setstate__`` is called by the unpickler — so an
   archive defining one, naming a custom C++ class (``torch.classes``), or with
   duplicate member names (two zip readers could disagree on which one counts)
   is refused unread.
2. ``check_module`` walks every graph the loaded module can run — every method
   of every submodule and every forward (pre-)hook, with called functions and
   methods inlined — and refuses the first operation that is not on the
   allow-list of pure tensor math (``torchscript_ops.txt``), naming it and the
   method it sits in. What inlining cannot resolve (a method of a custom class,
   a call through a function value) stays a call node, which is not on the list.
   It also refuses a write into anything the module holds (tensors, lists,
   objects; whatever an op's schema marks ``(a!)``, plus batch norm's running
   statistics) outside the module's ``self.training`` branches: state kept
   between requests would let one caller's data reach the next caller.

What this does not stop is in the README's security section: a listed operation
with a bug in its C++ kernel, or a model that computes something other than it
claims from its input and weights.
"""

from __future__ import annotations

import io
import re
import zipfile
from functools import lru_cache
from importlib import resources
from typing import Any, Iterator

MAX_CODE_BYTES = 64 << 20  # TorchScript source of a large model is a few MB; more is not a model

_WHY = {
    "aten::from_file": "it reads a file",
    "aten::save": "it writes a file",
    "prim::Print": "it prints",
    "aten::copy_": "it writes into an existing tensor",
    "prim::SetAttr": "it changes the module's attributes, keeping state between requests",
    "prim::CallMethod": "a call into a custom class the check cannot see into",
    "prim::CallFunction": "a call through a function value the check cannot see into",
    "prim::PythonOp": "it calls Python",
}
# ops whose output may share memory with an input: a write through the output reaches the input
_ALIASING = frozenset({
    "aten::view", "aten::reshape", "aten::flatten", "aten::unflatten", "aten::squeeze", "aten::unsqueeze",
    "aten::transpose", "aten::permute", "aten::t", "aten::expand", "aten::expand_as", "aten::select",
    "aten::slice", "aten::narrow", "aten::chunk", "aten::split", "aten::unbind", "aten::detach",
    "aten::contiguous", "aten::to", "aten::type_as", "aten::float", "aten::long", "aten::__getitem__",
    "aten::list", "aten::index", "prim::unchecked_cast", "prim::ListConstruct", "prim::ListUnpack",
    "prim::TupleConstruct", "prim::TupleUnpack", "prim::TupleIndex", "prim::DictConstruct",
})
_DEF = re.compile(r"^\s*def (\w+)\(", re.MULTILINE)


class TorchScriptRefused(Exception):
    """The TorchScript model must not be served; ``str()`` is one line saying why."""


@lru_cache(maxsize=1)
def allowed_ops() -> frozenset[str]:
    """The allow-list, read once from ``torchscript_ops.txt`` beside this module."""
    text = resources.files(__package__).joinpath("torchscript_ops.txt").read_text("utf-8")
    return frozenset(line.split("#", 1)[0].strip() for line in text.splitlines() if line.split("#", 1)[0].strip())


# ---------------------------------------------------------------------------
# before loading


def prescan(data: bytes) -> None:
    """Refuse an archive that would run code while ``torch.jit.load`` reads it."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        raise TorchScriptRefused("TorchScript archive is not a readable zip file") from None
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        raise TorchScriptRefused("TorchScript archive lists a member twice: which one is loaded is ambiguous")
    code = [i for i in infos if i.filename.endswith(".py") and "/code/" in f"/{i.filename}"]
    if sum(i.file_size for i in code) > MAX_CODE_BYTES:
        raise TorchScriptRefused(f"TorchScript archive carries more than {MAX_CODE_BYTES >> 20} MiB of code")
    for info in code:
        text = archive.read(info)
        if b"__setstate__" in text:
            raise TorchScriptRefused(f"TorchScript code defines __setstate__ ({info.filename}), which runs while the "
                                     "model is loaded, before any check")
        if b"torch.classes." in text:
            raise TorchScriptRefused(f"TorchScript code uses a custom C++ class (torch.classes, {info.filename}); "
                                     "only pure tensor math is allowed")
    for info in infos:
        if info.filename.endswith(".pkl") and info.file_size <= MAX_CODE_BYTES and b"torch.classes" in archive.read(info):
            raise TorchScriptRefused(f"TorchScript archive holds a custom C++ class object ({info.filename})")


# ---------------------------------------------------------------------------
# after loading


def graphs(module: Any) -> Iterator[tuple[str, Any]]:
    """(where, graph) for every method and hook of ``module`` and its submodules."""
    for path, sub in module.named_modules():
        prefix = f"{path}." if path else ""
        c = sub._c
        for name in sorted(set(c._method_names()) | set(c._type().method_names())):
            yield f"{prefix}{name}", c._get_method(name).graph
        for kind, hooks in (("forward pre-hook", c._get_forward_pre_hooks()), ("forward hook", c._get_forward_hooks())):
            for hook in hooks:
                yield f"{prefix}{kind} {hook.name}", hook.graph


def check_module(module: Any) -> int:
    """Raise ``TorchScriptRefused`` unless every graph of ``module`` is allowed; the number of graphs checked."""
    import torch

    allowed = allowed_ops()
    modules = {str(sub._c._type()) for _, sub in module.named_modules()}
    count = 0
    for where, graph in graphs(module):
        g = graph.copy()
        torch._C._jit_pass_inline(g)
        _check_block(g.block(), where, allowed)  # all code, the training branches too
        _serving_mode(torch, g, modules)
        _check_state(g.block(), where, set(), modules)
        count += 1
    return count


def _serving_mode(torch: Any, g: Any, modules: set[str]) -> None:
    """Fold a module's ``training`` to False and drop the branches it rules out: they never run when serving.

    Only the flag of a module (which ``eval()`` sets) is folded, never an attribute of that name on
    another object, whose value the model controls.
    """
    changed = False
    for node in list(_nodes(g.block())):
        if (node.kind() == "prim::GetAttr" and node.s("name") == "training"
                and str(node.input().type()) in modules):
            g.setInsertPoint(node)
            node.output().replaceAllUsesWith(g.insertConstant(False))
            changed = True
    if changed:
        torch._C._jit_pass_constant_propagation(g)
        torch._C._jit_pass_dce(g)


def _nodes(block: Any) -> Iterator[Any]:
    for node in block.nodes():
        yield node
        for sub in node.blocks():
            yield from _nodes(sub)


def _check_block(block: Any, where: str, allowed: frozenset[str]) -> None:
    for node in _nodes(block):
        kind = node.kind()
        if kind not in allowed:
            why = _WHY.get(kind, "not on the allow-list of pure tensor math")
            raise TorchScriptRefused(f"TorchScript model refused: operation {kind} in {where}{_called(node, where)} "
                                     f"({why})")


def _check_state(block: Any, where: str, state: set[Any], modules: set[str]) -> None:
    """Refuse a write into anything the module holds — a tensor, list, dict or object attribute — directly or
    through a view of it; what the schema marks ``(a!)`` is written."""
    for node in block.nodes():
        kind = node.kind()
        inputs = list(node.inputs())
        tainted = any(v in state for v in inputs)
        if kind == "prim::Loop" and tainted:
            for sub in node.blocks():
                state.update(sub.inputs())
        for sub in node.blocks():
            _check_state(sub, where, state, modules)
            if any(v in state for v in sub.returnNode().inputs()):
                state.update(node.outputs())
        if kind == "prim::GetAttr":
            if str(node.output().type()) not in modules:  # a submodule is walked through its own attributes
                state.add(node.output())
            continue
        if not tainted:
            continue
        schema = _schema(node)
        if any(inputs[i] in state for i in _mutated(schema, len(inputs))) or _updates_running_stats(node, inputs, state):
            raise TorchScriptRefused(f"TorchScript model refused: {kind} in {where} writes into the module's own "
                                     "state (a tensor, list or object it holds), kept between requests (one "
                                     "caller's data could reach the next)")
        if kind in _ALIASING or "Tensor(" in schema.rpartition(" -> ")[2]:
            state.update(node.outputs())


def _schema(node: Any) -> str:
    try:
        return str(node.schema())
    except Exception:  # prim:: nodes have no schema
        return ""


def _mutated(schema: str, count: int) -> list[int]:
    """Positions of the arguments ``schema`` writes into (``Tensor(a!) self``, ``*, Tensor(a!) out``)."""
    arrow = schema.rfind(" -> ")
    if "!" not in schema or arrow < 0:
        return []
    args = schema[schema.find("(") + 1:arrow - 1]  # between the name's "(" and the ")" before " -> "
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(args):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(args[start:i].strip())
            start = i + 1
    parts.append(args[start:].strip())
    parts = [p for p in parts if p != "*"]
    return [i for i, p in enumerate(parts) if "!" in p.split(" ")[0] and i < count]


def _updates_running_stats(node: Any, inputs: list[Any], state: set[Any]) -> bool:
    """batch_norm/instance_norm write their running mean and variance unless told not to (the schema does not say)."""
    if node.kind() not in ("aten::batch_norm", "aten::instance_norm") or len(inputs) < 6:
        return False
    if inputs[3] not in state and inputs[4] not in state:
        return False
    flag = inputs[5]
    return not (flag.node().kind() == "prim::Constant" and flag.toIValue() is False)


def _called(node: Any, where: str) -> str:
    """`` (in function F called from it)`` when the op was inlined from another function."""
    try:
        text = node.sourceRange().split("<--- HERE", 1)[0]
    except Exception:  # no source range recorded: the method name alone must do
        return ""
    names = _DEF.findall(text)
    method = where.rsplit(".", 1)[-1].split(" ")[-1]
    return f" (in function {names[-1]} called from it)" if names and names[-1] != method else ""
