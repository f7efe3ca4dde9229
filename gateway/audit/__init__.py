"""The tamper-evident audit log: one JSON line per request, chained, sealed, witnessed.

Each line carries ``seq`` (its line number), ``prev`` (the hash of the line
before) and, with ``audit.key_env``/``key_file``, ``mac`` (HMAC-SHA256 of the line
without it): see ``chain.py``. So deleting, reordering or editing a line breaks
the chain where it happened, and with the key even a rewrite that recomputed
every ``prev`` is found. ``audit.witness`` records the chain head outside the
file after every flush (``witness.py``), so lines cut from the end show too.
Lines never contain a token, a key or a payload: only who, what, which rule
decided, and how it ended.

The writer (``writer.py``) is the file's only writer (an exclusive lock:
``logfile.py``), cuts a line torn by a crash on start and says so in a
``recovery`` line, keeps lines it cannot write in memory and, under
``audit.required``, makes the gateway unready and answer 503 until it can.
``maas-gateway audit verify`` (``verify.py``, ``cli.py``) checks all of it.
"""

from .chain import GENESIS, KeyProblem, Sealer, decode_key, line_hash, load_key
from .verify import Report, verify, verify_log
from .witness import WitnessError
from .writer import FLUSH_INTERVAL_S, KEYS, AuditLog, rfc3339_now

__all__ = ["FLUSH_INTERVAL_S", "GENESIS", "KEYS", "AuditLog", "KeyProblem", "Report", "Sealer", "WitnessError",
           "decode_key", "line_hash", "load_key", "rfc3339_now", "verify", "verify_log"]
