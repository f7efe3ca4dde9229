"""Builds maas-gateway: the request path's modules are compiled with mypyc (``gateway/native.py`` says which, and why).

``MAAS_GATEWAY_COMPILE=0 pip install ...`` installs pure Python (and removes a native build an earlier editable
install left in the checkout, so that what runs is what the files say); so does a machine with no C compiler.
"""

import os
import runpy
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
NATIVE = runpy.run_path(str(ROOT / "gateway" / "native.py"))  # stdlib only: readable before anything is installed
COMPILED = NATIVE["COMPILED"]


def native_files(keep: tuple[str, ...] = ()) -> list[Path]:
    """The in-place native build of an editable install beside the package's modules (but those of ``keep``),
    and mypyc's shared library."""
    found = [path for source, path in NATIVE["extensions"](ROOT).items() if source not in keep]
    return found + ([] if keep else list(ROOT.glob("*__mypyc.*.so")))


def have_compiler() -> bool:
    return any(shutil.which(name) for name in (os.environ.get("CC", ""), "cc", "gcc", "clang") if name)


compile_native = os.environ.get("MAAS_GATEWAY_COMPILE", "1") != "0"
if compile_native and not have_compiler():  # `pip install .` works anywhere: pure Python, said once
    print("maas-gateway: no C compiler found, installing pure Python (the request path runs ~1.7x slower)",
          file=sys.stderr)
    compile_native = False

if not compile_native:
    for path in native_files():
        path.unlink()
    setup()
else:
    from mypyc.build import mypycify

    for path in native_files(keep=COMPILED):  # a module an earlier build compiled and this one does not
        path.unlink()
    setup(ext_modules=mypycify(list(COMPILED), opt_level="3", debug_level="0"))
