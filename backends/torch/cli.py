"""``maas-gateway model keygen | encrypt | decrypt | sign | verify``.

Key material is written with mode 0600 from the first byte (the file is
created with that mode, never chmod-ed after), existing keys are never
overwritten without ``--force``, and no key is ever printed unless asked for
with ``--out -``. Outputs are written to a temporary file beside the target and
renamed into place, so a failed decryption never leaves partial plaintext.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import IO, Any, BinaryIO, Callable, TypeVar

from gateway.errors import CliError

from . import artifact, signing
from .artifact import ArtifactError, KeyProblem
from .signing import SignatureError

_T = TypeVar("_T")

PROGRESS_MIN_BYTES = 8 << 20  # below 8 MiB the work is over before a bar is worth drawing


class ProgressBar:
    """A one-line progress bar on a terminal; silent when ``stream`` is not a TTY (pipes, CI logs)."""

    def __init__(self, label: str, total: int, stream: IO[str] | None = None, *, min_bytes: int = PROGRESS_MIN_BYTES):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = total >= min_bytes and _isatty(self.stream)
        self.label, self.total, self.done = label, max(total, 1), 0
        self._last = 0.0

    def __call__(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and self.done < self.total:
            return
        self._last = now
        frac = min(1.0, self.done / self.total)
        width = 30
        bar = "#" * int(frac * width)
        self.stream.write(f"\r{self.label:8} [{bar:<{width}}] {frac:4.0%} {self.done / 2**20:8.1f}/"
                          f"{self.total / 2**20:.1f} MiB")
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


# ---------------------------------------------------------------------------
# file helpers


def _write_secret(path: str, data: bytes, *, force: bool) -> None:
    """Create ``path`` with mode 0600 (the mode is set at creation, so no moment exists where it is readable)."""
    if path == "-":
        sys.stdout.write(data.decode())
        sys.stdout.flush()
        return
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise CliError(f"{path} already exists; refusing to overwrite a key (use --force)") from None
    except OSError as exc:
        raise CliError(f"{path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # --force on an existing file: tighten it too
        f.write(data)


def _write_public(path: Path, data: bytes, *, force: bool) -> None:
    if path.exists() and not force:
        raise CliError(f"{path} already exists; refusing to overwrite (use --force)")
    path.write_bytes(data)
    path.chmod(0o644)


def _input(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise CliError(f"{path}: file not found")
    if not p.is_file():
        raise CliError(f"{path}: not a regular file")
    return p


def _key(args: argparse.Namespace) -> bytes:
    try:
        if args.key_env:
            return artifact.key_from_env(args.key_env)
        return artifact.key_from_file(args.key_file)
    except KeyProblem as exc:
        raise CliError(str(exc)) from None


def _transform(args: argparse.Namespace, label: str,
               work: Callable[[BinaryIO, BinaryIO, Callable[[int], None]], None], mode: int) -> Path:
    src_path = _input(args.input)
    out = Path(args.out)
    if out.resolve() == src_path.resolve():
        raise CliError("--out must differ from the input file")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    bar = ProgressBar(label, src_path.stat().st_size)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with open(src_path, "rb") as src, os.fdopen(fd, "wb") as dst:
            work(src, dst, bar)
        os.replace(tmp, out)
    except ArtifactError as exc:
        raise CliError(f"{src_path}: {exc}") from None
    except OSError as exc:
        raise CliError(f"{exc.filename or out}: {exc.strerror}") from None
    finally:
        bar.finish()
        if tmp.exists():
            tmp.unlink()
    return out


# ---------------------------------------------------------------------------
# commands


def cmd_keygen(args: argparse.Namespace) -> int:
    if args.signing:
        if args.out == "-":
            raise CliError("--signing needs a file for --out (it writes FILE and FILE.pub)")
        signing_key = signing.new_signing_key()
        pub = Path(args.out + ".pub")
        if pub.exists() and not args.force:
            raise CliError(f"{pub} already exists; refusing to overwrite (use --force)")
        _write_secret(args.out, signing.private_pem(signing_key), force=args.force)
        _write_public(pub, signing.public_pem(signing_key.public_key()), force=True)
        print(f"wrote {args.out} (private, 0600) and {pub} (public); key id "
              f"{signing.public_key_id(signing_key.public_key())}", file=sys.stderr)
        return 0
    key = artifact.new_key()
    _write_secret(args.out, (artifact.encode_key(key) + "\n").encode("ascii"), force=args.force)
    if args.out != "-":
        print(f"wrote {args.out} (AES-256 key, 0600); key id {artifact.key_id(key).hex()}", file=sys.stderr)
    return 0


def cmd_encrypt(args: argparse.Namespace) -> int:
    _input(args.input)
    key = _key(args)
    chunk = args.chunk_size

    def work(src: BinaryIO, dst: BinaryIO, bar: Callable[[int], None]) -> None:
        artifact.encrypt_stream(src, dst, key, chunk_size=chunk, progress=bar)

    if not artifact.MIN_CHUNK_SIZE <= chunk <= artifact.MAX_CHUNK_SIZE:
        raise CliError(f"--chunk-size must be between {artifact.MIN_CHUNK_SIZE} and {artifact.MAX_CHUNK_SIZE}")
    out = _transform(args, "encrypt", work, 0o644)
    print(f"wrote {out} (key id {artifact.key_id(key).hex()})", file=sys.stderr)
    return 0


def cmd_decrypt(args: argparse.Namespace) -> int:
    _input(args.input)
    key = _key(args)

    def work(src: BinaryIO, dst: BinaryIO, bar: Callable[[int], None]) -> None:
        artifact.decrypt_stream(src, dst, key, progress=bar)

    out = _transform(args, "decrypt", work, 0o600)  # plaintext weights: owner-only
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _with_bar(label: str, target: Path, run: Callable[[ProgressBar], _T]) -> _T:
    """``run(bar)`` with a progress bar over ``target``'s size; the bar's line is finished even on failure."""
    bar = ProgressBar(label, target.stat().st_size)
    try:
        return run(bar)
    finally:
        bar.finish()


def cmd_sign(args: argparse.Namespace) -> int:
    target = _input(args.artifact)
    if not 1 <= args.version <= signing.MAX_MODEL_VERSION:
        raise CliError(f"--version must be between 1 and {signing.MAX_MODEL_VERSION}")
    try:
        key = signing.load_private_key(Path(args.key))
        out = _with_bar("sign", target, lambda bar: signing.sign_file(target, key, bar, args.version))
    except SignatureError as exc:
        raise CliError(str(exc)) from None
    print(f"wrote {out} (model version {args.version}, key id {signing.public_key_id(key.public_key())})",
          file=sys.stderr)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    if args.oms is not None:
        return _verify_oms(args)
    if args.pub is None or args.oms_key or args.oms_cert:
        raise CliError("give --pub PUBLIC.pem (a maas-gateway .sig), or --oms SIGNATURE with --oms-key or --oms-cert")
    target = _input(args.artifact)
    try:
        public = signing.load_public_key(Path(args.pub))
        sig = _with_bar("verify", target, lambda bar: signing.verify_file(target, public, bar))
    except SignatureError as exc:
        raise CliError(f"{target}: {exc}", code=1) from None
    print(f"{target}: signature valid (model version {sig.model_version}, key id {sig.key_id}, sha256 {sig.sha256})")
    return 0


def _verify_oms(args: argparse.Namespace) -> int:
    """An OpenSSF Model Signing signature over a plain model file or folder."""
    from .oms import OmsError, verify_path

    if args.pub is not None or (args.oms_key is None) == (args.oms_cert is None):
        raise CliError("--oms needs --oms-key PUB.pem or --oms-cert CERT.pem (exactly one), and no --pub")
    target = Path(args.artifact)
    if not target.exists():
        raise CliError(f"{target}: file or folder not found")
    try:
        verify_path(target, Path(args.oms), public_key=Path(args.oms_key) if args.oms_key else None,
                    certificate=Path(args.oms_cert) if args.oms_cert else None)
    except OmsError as exc:
        raise CliError(f"{target}: {exc}", code=1) from None
    print(f"{target}: OMS signature valid ({'key' if args.oms_key else 'certificate'} mode)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    model = subparsers.add_parser("model", help="model artifacts: keys, encryption, signatures")
    sub = model.add_subparsers(dest="model_command", required=True, parser_class=type(model))

    p = sub.add_parser("keygen", help="a 256-bit AES key (base64url), or with --signing an Ed25519 pair")
    p.add_argument("--out", required=True, help="key file (0600); '-' prints an AES key for a secret store")
    p.add_argument("--signing", action="store_true", help="Ed25519 signing pair: FILE (private) and FILE.pub")
    p.add_argument("--force", action="store_true", help="overwrite an existing key file")
    p.set_defaults(func=cmd_keygen)

    for name, func, help_text in (("encrypt", cmd_encrypt, "encrypt a model (chunked AES-256-GCM)"),
                                  ("decrypt", cmd_decrypt, "decrypt an encrypted model (written 0600)")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("input", metavar="IN")
        p.add_argument("--out", required=True)
        keys = p.add_mutually_exclusive_group(required=True)
        keys.add_argument("--key-file", help="file holding the base64url key")
        keys.add_argument("--key-env", help="environment variable holding the base64url key")
        if name == "encrypt":
            p.add_argument("--chunk-size", type=int, default=artifact.DEFAULT_CHUNK_SIZE,
                           help=f"plaintext bytes per authenticated chunk (default {artifact.DEFAULT_CHUNK_SIZE})")
        p.set_defaults(func=func)

    p = sub.add_parser("sign", help="write ARTIFACT.sig (Ed25519 over the artifact's SHA-256, name and version)")
    p.add_argument("artifact")
    p.add_argument("--key", required=True, help="private key PEM from `model keygen --signing`")
    p.add_argument("--version", type=int, default=1, metavar="N",
                   help="the model's release number (default 1); a backend's min_version refuses older ones")
    p.set_defaults(func=cmd_sign)

    p = sub.add_parser("verify", help="exit 0 if ARTIFACT's signature is valid, else 1 with the reason")
    p.add_argument("artifact")
    p.add_argument("--pub", help="public key PEM: check ARTIFACT.sig (prints the signed model version)")
    p.add_argument("--oms", metavar="SIGNATURE", help="an OpenSSF Model Signing signature over a plain file or folder")
    p.add_argument("--oms-key", metavar="PUB.pem", help="with --oms: the signer's EC public key (key mode)")
    p.add_argument("--oms-cert", metavar="CERT.pem", help="with --oms: the certificate chain (certificate mode)")
    p.set_defaults(func=cmd_verify)
