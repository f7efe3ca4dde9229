"""Encrypted model artifacts: AES-256-GCM over fixed-size, individually authenticated chunks.

Why chunks: a multi-GB model must be decrypted without holding the ciphertext
and the plaintext in memory at once, and a flipped byte must be caught before
anything parses it. One GCM message per chunk gives both, as long as a chunk
cannot be moved, dropped or added — so every chunk's nonce and associated data
bind the file header, the chunk's index and whether it is the last one (the
STREAM construction of Hoang, Reyhanitabar, Rogaway and Vizár, as in Tink's
streaming AEAD).

Layout (all integers big-endian)::

    magic          8   b"\\x89MAASENC"
    version        1   1
    key id         8   first 8 bytes of SHA-256("maas-gateway key id v1" || key): names the key, reveals nothing
    chunk size     4   plaintext bytes per chunk (the last chunk may be shorter, even empty)
    plaintext      8   total plaintext bytes (2**64-1: unknown, the input was a pipe)
    salt          16   random; the file key is HKDF-SHA256(key, salt) so no two files share a GCM key
    nonce prefix   7   random
    header tag    16   GCM tag over the 52 header bytes (empty plaintext, reserved nonce)
    chunk 0..n-1       ciphertext || 16-byte tag; nonce = prefix || index (4) || final flag (1)

The associated data of chunk i is ``header || index || final``. The header tag
lets a reader tell "this header was altered" apart from "chunk 3 was altered",
and the key id tells "wrong key" apart from both. The authenticated plaintext
size tells the reader where the final chunk ends, so "file truncated" and
"data after final chunk" are reported as such (the final flag alone cannot
place the boundary when the final chunk is short and bytes were appended).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway import key_text

MAGIC = b"\x89MAASENC"
VERSION = 1
KEY_BYTES = 32  # AES-256
TAG_BYTES = 16
SALT_BYTES = 16
PREFIX_BYTES = 7
DEFAULT_CHUNK_SIZE = 1 << 20  # 1 MiB
MIN_CHUNK_SIZE = 1 << 10  # 1 KiB
MAX_CHUNK_SIZE = 1 << 26  # 64 MiB: bounds the memory a reader commits per chunk
MAX_CHUNKS = 0xFFFFFFFE  # index 0xFFFFFFFF is reserved for the header tag
_HEADER = struct.Struct(">8sB8sIQ16s7s")
HEADER_BYTES = _HEADER.size  # 52
UNKNOWN_SIZE = 0xFFFFFFFFFFFFFFFF
PREAMBLE_BYTES = HEADER_BYTES + TAG_BYTES  # what precedes chunk 0
_HKDF_INFO = b"maas-gateway artifact v1"
_KEY_ID_CONTEXT = b"maas-gateway key id v1"

Progress = Callable[[int], None]  # called with the number of input bytes just consumed


class ArtifactError(Exception):
    """The artifact cannot be decrypted; ``str()`` is one line saying why."""


class KeyProblem(ValueError):
    """A key is malformed or missing (kept apart from ArtifactError: it is the operator's input)."""


# ---------------------------------------------------------------------------
# keys


def new_key() -> bytes:
    return os.urandom(KEY_BYTES)


def encode_key(key: bytes) -> str:
    """base64url without padding: one line, safe in env vars and secret stores."""
    return base64.urlsafe_b64encode(key).rstrip(b"=").decode("ascii")


def decode_key(text: str, *, where: str) -> bytes:
    """Parse a base64url (or standard base64) 256-bit key; ``where`` names its source in errors, never its value."""
    cleaned = "".join(text.split())
    if not cleaned:
        raise KeyProblem(f"{where} is empty")
    try:
        key = base64.urlsafe_b64decode(cleaned.replace("+", "-").replace("/", "_") + "=" * (-len(cleaned) % 4))
    except (binascii.Error, ValueError):
        raise KeyProblem(f"{where} is not base64url text") from None
    if len(key) != KEY_BYTES:
        raise KeyProblem(f"{where} holds {len(key)} bytes; an AES-256 key is {KEY_BYTES} bytes (make one with "
                        "`maas-gateway model keygen`)")
    return key


def key_from_env(name: str) -> bytes:
    return decode_key(key_text.from_env(name, KeyProblem), where=f"environment variable {name}")


def key_from_file(path: os.PathLike[str] | str) -> bytes:
    return decode_key(key_text.from_file(path, KeyProblem), where=f"key file {path}")


def key_id(key: bytes) -> bytes:
    return hashlib.sha256(_KEY_ID_CONTEXT + key).digest()[:8]


# ---------------------------------------------------------------------------
# header


@dataclass(frozen=True, slots=True)
class Header:
    version: int
    key_id: bytes
    chunk_size: int
    plaintext_size: int | None  # None: unknown (written from a pipe)
    salt: bytes
    nonce_prefix: bytes
    raw: bytes  # the header bytes as written: what every tag authenticates


def chunk_count(plaintext_size: int, chunk_size: int) -> int:
    """Chunks written for ``plaintext_size`` bytes: at least one (an empty file has one empty final chunk)."""
    return max(1, -(-plaintext_size // chunk_size))


def is_encrypted(head: bytes) -> bool:
    return head.startswith(MAGIC)


def _file_key(key: bytes, salt: bytes) -> AESGCM:
    derived = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=_HKDF_INFO).derive(key)
    return AESGCM(derived)


def _nonce(prefix: bytes, index: int, final: bool) -> bytes:
    return prefix + struct.pack(">IB", index, 1 if final else 0)


def _ad(header: bytes, index: int, final: bool) -> bytes:
    return header + struct.pack(">IB", index, 1 if final else 0)


_HEADER_NONCE_INDEX = 0xFFFFFFFF


def parse_header(preamble: bytes, key: bytes) -> tuple[Header, AESGCM]:
    """Check magic, version, key id and the header tag; return the header and the file's cipher."""
    if len(preamble) < len(MAGIC) or not preamble.startswith(MAGIC):
        raise ArtifactError("not an encrypted maas-gateway artifact (bad magic bytes)")
    if len(preamble) < PREAMBLE_BYTES:
        raise ArtifactError("file truncated: header incomplete")
    magic, version, kid, chunk_size, size, salt, prefix = _HEADER.unpack_from(preamble)
    if version != VERSION:
        raise ArtifactError(f"header corrupted or unsupported artifact version {version} "
                            f"(this gateway reads version {VERSION})")
    if kid != key_id(key):
        raise ArtifactError(f"wrong key or corrupted header: the artifact names key id {kid.hex()}, "
                            f"the configured key is {key_id(key).hex()}")
    raw = preamble[:HEADER_BYTES]
    cipher = _file_key(key, salt)
    try:
        cipher.decrypt(_nonce(prefix, _HEADER_NONCE_INDEX, True), preamble[HEADER_BYTES:PREAMBLE_BYTES], b"hdr" + raw)
    except InvalidTag:
        raise ArtifactError("header corrupted or wrong key (header failed authentication)") from None
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:  # authenticated, so only a hostile writer gets here
        raise ArtifactError(f"chunk size {chunk_size} out of range")
    if size != UNKNOWN_SIZE and chunk_count(size, chunk_size) > MAX_CHUNKS:
        raise ArtifactError(f"plaintext size {size} out of range")
    return Header(version, kid, chunk_size, None if size == UNKNOWN_SIZE else size, salt, prefix, raw), cipher


# ---------------------------------------------------------------------------
# encrypt


def encrypt_stream(src: BinaryIO, dst: BinaryIO, key: bytes, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                   progress: Progress | None = None) -> int:
    """Encrypt ``src`` into ``dst``; memory is two chunks. Returns the plaintext size.

    The plaintext size goes in the header when ``src`` can tell it (a file);
    if the input then turns out to have changed size, encryption fails.
    """
    if len(key) != KEY_BYTES:
        raise KeyProblem(f"an AES-256 key is {KEY_BYTES} bytes")
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk size must be between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE} bytes")
    size = _remaining(src)
    salt, prefix = os.urandom(SALT_BYTES), os.urandom(PREFIX_BYTES)
    raw = _HEADER.pack(MAGIC, VERSION, key_id(key), chunk_size, UNKNOWN_SIZE if size is None else size, salt, prefix)
    cipher = _file_key(key, salt)
    dst.write(raw)
    dst.write(cipher.encrypt(_nonce(prefix, _HEADER_NONCE_INDEX, True), b"", b"hdr" + raw))
    total = 0
    index = 0
    current = _read_full(src, chunk_size)
    while True:
        following = _read_full(src, chunk_size) if len(current) == chunk_size else b""
        final = not following
        if index > MAX_CHUNKS:
            raise ValueError("input too large for this chunk size")
        dst.write(cipher.encrypt(_nonce(prefix, index, final), current, _ad(raw, index, final)))
        total += len(current)
        if progress is not None:
            progress(len(current))
        if final:
            if size is not None and total != size:
                raise ValueError("the input changed size while it was being encrypted")
            return total
        current, index = following, index + 1


def _remaining(src: BinaryIO) -> int | None:
    try:
        if not src.seekable():
            return None
        here = src.tell()
        end = src.seek(0, os.SEEK_END)
        src.seek(here)
        return end - here
    except (OSError, AttributeError, ValueError):
        return None


def _read_full(src: BinaryIO, size: int) -> bytes:
    """Read exactly ``size`` bytes unless EOF comes first (pipes return short reads)."""
    parts = []
    wanted = size
    while wanted:
        block = src.read(wanted)
        if not block:
            break
        parts.append(block)
        wanted -= len(block)
    return b"".join(parts) if len(parts) != 1 else parts[0]


# ---------------------------------------------------------------------------
# decrypt


def decrypt_chunks(src: BinaryIO, key: bytes, *, progress: Progress | None = None,
                   observe: Callable[[bytes], None] | None = None) -> Iterator[bytes]:
    """Yield authenticated plaintext chunks; raise ``ArtifactError`` at the first problem.

    A chunk is yielded only once it has been authenticated, but a caller must
    still treat the whole output as untrusted until the iterator ends without
    error (a truncation is only visible at the end). ``observe`` sees every
    input byte (for hashing the file in the same pass, e.g. for its signature).
    """
    preamble = _read_full(src, PREAMBLE_BYTES)
    if observe is not None:
        observe(preamble)
    header, cipher = parse_header(preamble, key)
    if progress is not None:
        progress(len(preamble))
    if header.plaintext_size is not None:
        yield from _decrypt_sized(src, header, cipher, progress, observe)
        return
    record_size = header.chunk_size + TAG_BYTES
    raw, prefix = header.raw, header.nonce_prefix
    index = 0
    record = _read_full(src, record_size)
    if not record:
        raise ArtifactError("file truncated: no chunks after the header")
    while True:
        following = _read_full(src, record_size) if len(record) == record_size else b""
        if observe is not None:
            observe(record)
        if len(record) < TAG_BYTES:
            raise ArtifactError(f"file truncated: chunk {index} incomplete")
        final = not following
        yield _open_or_explain(cipher, prefix, raw, index, final, record, progress)
        if final:
            return
        if index >= MAX_CHUNKS:
            raise ArtifactError("data after final chunk")
        record, index = following, index + 1


def _decrypt_sized(src: BinaryIO, header: Header, cipher: AESGCM, progress: Progress | None,
                   observe: Callable[[bytes], None] | None) -> Iterator[bytes]:
    """Decrypt a file whose (authenticated) header says how much plaintext it holds."""
    assert header.plaintext_size is not None
    size, chunk = header.plaintext_size, header.chunk_size
    count = chunk_count(size, chunk)
    raw, prefix = header.raw, header.nonce_prefix
    for index in range(count):
        final = index == count - 1
        expected = (size - index * chunk if final else chunk) + TAG_BYTES
        record = _read_full(src, expected)
        if observe is not None:
            observe(record)
        if not record:
            missing = count - index
            raise ArtifactError("file truncated: final chunk missing"
                                + (f" ({missing} chunks missing)" if missing > 1 else ""))
        if len(record) < expected:
            raise ArtifactError(f"file truncated: chunk {index} incomplete")
        yield _open_or_explain(cipher, prefix, raw, index, final, record, progress)
    extra = src.read(1)
    if extra:
        if observe is not None:
            observe(extra)
        raise ArtifactError("data after final chunk")


def _open(cipher: AESGCM, prefix: bytes, raw: bytes, index: int, final: bool, record: bytes) -> bytes | None:
    try:
        return cipher.decrypt(_nonce(prefix, index, final), record, _ad(raw, index, final))
    except InvalidTag:
        return None


def _open_or_explain(cipher: AESGCM, prefix: bytes, raw: bytes, index: int, final: bool, record: bytes,
                     progress: Progress | None) -> bytes:
    """One chunk's plaintext, counted as progress; ``ArtifactError`` saying why when it fails authentication."""
    plain = _open(cipher, prefix, raw, index, final, record)
    if plain is None:
        raise ArtifactError(_diagnose(cipher, prefix, raw, index, final, record))
    if progress is not None:
        progress(len(record))
    return plain


_REORDER_SEARCH = 64  # on failure, look this many positions either side for where a moved chunk belongs


def _diagnose(cipher: AESGCM, prefix: bytes, raw: bytes, index: int, final: bool, record: bytes) -> str:
    """Explain a chunk that failed authentication as precisely as the evidence allows.

    Only runs on the failure path, so trying the other final flag and nearby
    indices costs nothing in normal operation.
    """
    if _open(cipher, prefix, raw, index, not final, record) is not None:
        return "data after final chunk" if not final else "file truncated: final chunk missing"
    for distance in range(1, _REORDER_SEARCH + 1):
        for other in (index - distance, index + distance):
            if 0 <= other <= MAX_CHUNKS:
                for flag in (False, True):
                    if _open(cipher, prefix, raw, other, flag, record) is not None:
                        return (f"chunk {index} failed authentication: it is chunk {other} of this file "
                                "(chunks reordered)")
    return f"chunk {index} failed authentication (tampered, reordered or wrong key)"


def decrypt_stream(src: BinaryIO, dst: BinaryIO, key: bytes, *, progress: Progress | None = None) -> int:
    """Decrypt ``src`` into ``dst`` chunk by chunk; returns the plaintext size.

    ``dst`` receives authenticated chunks as they come; on error the caller
    must discard what was written (the CLI writes to a temporary file).
    """
    total = 0
    for plain in decrypt_chunks(src, key, progress=progress):
        dst.write(plain)
        total += len(plain)
    return total

