"""The encrypted artifact format: round trips, key handling, streaming, and header checks."""

from __future__ import annotations

import io
import os

import pytest

from backends.torch import artifact
from backends.torch.artifact import ArtifactError, KeyProblem

CHUNK = artifact.MIN_CHUNK_SIZE


def encrypt(data: bytes, key: bytes, chunk: int = CHUNK) -> bytes:
    out = io.BytesIO()
    artifact.encrypt_stream(io.BytesIO(data), out, key, chunk_size=chunk)
    return out.getvalue()


def decrypt(blob: bytes, key: bytes) -> bytes:
    out = io.BytesIO()
    artifact.decrypt_stream(io.BytesIO(blob), out, key)
    return out.getvalue()


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 5 * CHUNK + 17])
def test_round_trip_any_size(size: int) -> None:
    key = artifact.new_key()
    data = os.urandom(size)
    blob = encrypt(data, key)
    assert decrypt(blob, key) == data
    chunks = artifact.chunk_count(size, CHUNK)
    assert len(blob) == artifact.PREAMBLE_BYTES + size + chunks * artifact.TAG_BYTES


def test_ciphertext_reveals_nothing_and_differs_each_time() -> None:
    key = artifact.new_key()
    data = b"weights " * 1000
    a, b = encrypt(data, key), encrypt(data, key)
    assert a != b  # fresh salt and nonce prefix per file
    assert b"weights" not in a


class ShortReads(io.RawIOBase):
    """A pipe-like reader returning at most 100 bytes per read."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        return self._data.read(min(n, 100) if n >= 0 else 100)


def test_short_reads_from_pipes_are_handled() -> None:
    key = artifact.new_key()
    data = os.urandom(4 * CHUNK + 5)
    out = io.BytesIO()
    artifact.encrypt_stream(ShortReads(data), out, key, chunk_size=CHUNK)  # type: ignore[arg-type]
    plain = io.BytesIO()
    artifact.decrypt_stream(ShortReads(out.getvalue()), plain, key)  # type: ignore[arg-type]
    assert plain.getvalue() == data


def test_decryption_streams_chunk_by_chunk() -> None:
    """Memory stays bounded: the decryptor never yields (or holds) more than a chunk at a time."""
    key = artifact.new_key()
    data = os.urandom(10 * CHUNK)
    blob = encrypt(data, key)
    reads: list[int] = []

    class Counting(io.BytesIO):
        def read(self, n: int | None = -1) -> bytes:  # type: ignore[override]
            assert n is not None and 0 < n <= CHUNK + artifact.TAG_BYTES + artifact.PREAMBLE_BYTES
            reads.append(n)
            return super().read(n)

    pieces = list(artifact.decrypt_chunks(Counting(blob), key))
    assert b"".join(pieces) == data
    assert max(len(p) for p in pieces) == CHUNK
    assert len(reads) >= 10


def test_progress_reports_every_byte() -> None:
    key = artifact.new_key()
    data = os.urandom(3 * CHUNK + 3)
    seen: list[int] = []
    blob = io.BytesIO()
    artifact.encrypt_stream(io.BytesIO(data), blob, key, chunk_size=CHUNK, progress=seen.append)
    assert sum(seen) == len(data)
    seen.clear()
    artifact.decrypt_stream(io.BytesIO(blob.getvalue()), io.BytesIO(), key, progress=seen.append)
    assert sum(seen) == len(blob.getvalue())


def test_key_encoding_round_trip_and_padding_tolerance() -> None:
    key = artifact.new_key()
    text = artifact.encode_key(key)
    assert len(text) == 43 and "=" not in text and "\n" not in text
    assert artifact.decode_key(text, where="x") == key
    assert artifact.decode_key(text + "=\n", where="x") == key


@pytest.mark.parametrize("text,message", [
    ("", "is empty"),
    ("not base64 !!", "not base64url"),
    ("c2hvcnQ", "holds 5 bytes"),
])
def test_bad_keys_are_named_not_echoed(text: str, message: str) -> None:
    with pytest.raises(KeyProblem, match=message) as info:
        artifact.decode_key(text, where="environment variable K")
    assert "environment variable K" in str(info.value)
    if text:
        assert text not in str(info.value)  # the key's value never appears in an error


def test_key_from_env_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAAS_TEST_NO_SUCH_KEY", raising=False)
    with pytest.raises(KeyProblem, match="MAAS_TEST_NO_SUCH_KEY is not set"):
        artifact.key_from_env("MAAS_TEST_NO_SUCH_KEY")


def test_wrong_key_is_named_by_key_id() -> None:
    key, other = artifact.new_key(), artifact.new_key()
    blob = encrypt(b"x" * 5000, key)
    with pytest.raises(ArtifactError, match="wrong key") as info:
        decrypt(blob, other)
    assert artifact.key_id(key).hex() in str(info.value)
    assert artifact.key_id(other).hex() in str(info.value)


def test_not_an_artifact() -> None:
    with pytest.raises(ArtifactError, match="bad magic"):
        decrypt(b"\x00" * 100, artifact.new_key())


def test_unknown_version() -> None:
    key = artifact.new_key()
    blob = bytearray(encrypt(b"abc", key))
    blob[len(artifact.MAGIC)] = 9
    with pytest.raises(ArtifactError, match="unsupported artifact version 9"):
        decrypt(bytes(blob), key)


def test_header_only_is_truncation() -> None:
    key = artifact.new_key()
    blob = encrypt(b"abc", key)
    with pytest.raises(ArtifactError, match="file truncated"):
        decrypt(blob[:artifact.PREAMBLE_BYTES], key)
    with pytest.raises(ArtifactError, match="header incomplete"):
        decrypt(blob[:20], key)


def test_chunk_size_bounds_are_enforced_on_write() -> None:
    with pytest.raises(ValueError):
        encrypt(b"x", artifact.new_key(), chunk=16)


def _piped(data: bytes, key: bytes) -> bytes:
    """Encrypt from a non-seekable source: the header says 'size unknown' and only the final flag guards the end."""
    out = io.BytesIO()
    artifact.encrypt_stream(ShortReads(data), out, key, chunk_size=CHUNK)  # type: ignore[arg-type]
    return out.getvalue()


def test_piped_artifact_truncation_is_caught_by_the_final_flag() -> None:
    key = artifact.new_key()
    blob = _piped(os.urandom(3 * CHUNK), key)
    record = CHUNK + artifact.TAG_BYTES
    with pytest.raises(ArtifactError, match="file truncated: final chunk missing"):
        decrypt(blob[:-record], key)


def test_piped_artifact_extension_is_caught_by_the_final_flag() -> None:
    key = artifact.new_key()
    blob = _piped(os.urandom(3 * CHUNK), key)
    record = CHUNK + artifact.TAG_BYTES
    with pytest.raises(ArtifactError, match="data after final chunk"):
        decrypt(blob + blob[artifact.PREAMBLE_BYTES:artifact.PREAMBLE_BYTES + record], key)


def test_input_that_changes_size_while_encrypting_fails() -> None:
    class Growing(io.BytesIO):
        def seek(self, pos: int, whence: int = 0) -> int:  # reports a smaller size than it will deliver
            result = super().seek(pos, whence)
            return result - 10 if whence == os.SEEK_END else result

    with pytest.raises(ValueError, match="changed size"):
        artifact.encrypt_stream(Growing(os.urandom(3000)), io.BytesIO(), artifact.new_key(), chunk_size=CHUNK)
