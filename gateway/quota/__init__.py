"""Quotas: token buckets per (quota entry, subject, model), in Redis (global across replicas) or memory.

``store`` holds the contract and ``stores.open_store`` opens the configured one; ``matching`` picks the most
specific entry; ``concurrency`` holds and releases in-flight slots, and
``live_slots`` keeps the Redis slots of running requests from expiring;
``llm_tokens`` estimates and reconciles LLM token budgets. The stage that uses
them is ``gateway.stages.quota``.
"""

from __future__ import annotations

from .store import Limits, QuotaStore, StoreError, Verdict, bucket_id
from .stores import open_store

__all__ = ["Limits", "QuotaStore", "StoreError", "Verdict", "bucket_id", "open_store"]
