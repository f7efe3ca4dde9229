"""The bounded caches of ``gateway.cache``: each keeps its bound and evicts by its documented rule."""

from __future__ import annotations

from gateway.cache import ClearWhenFull, Lru


def test_clear_when_full_reads_like_a_dict() -> None:
    cache: ClearWhenFull[str, int] = ClearWhenFull(3)
    assert cache.put("a", 1) == 1
    cache["b"] = 2
    assert cache.get("a") == 1 and cache["b"] == 2 and "b" in cache
    assert cache.get("missing") is None and cache.get("missing", 7) == 7
    cache["x"] = 0
    assert cache.get("x") == 0  # falsy values are values (None is reserved for "absent" only in callers' get)


def test_clear_when_full_empties_itself_when_an_insert_finds_it_full() -> None:
    cache: ClearWhenFull[str, int] = ClearWhenFull(3)
    for i, key in enumerate("abc"):
        cache.put(key, i)
    cache.put("a", 10)  # overwriting a present key is not growth: nothing is cleared
    assert dict(cache) == {"a": 10, "b": 1, "c": 2}
    cache.put("d", 3)
    assert dict(cache) == {"d": 3}
    for i in range(1000):
        cache[f"k{i}"] = i
        assert len(cache) <= 3


def test_clear_when_full_of_size_zero_stores_nothing() -> None:
    cache: ClearWhenFull[str, int] = ClearWhenFull(0)
    assert cache.put("a", 1) == 1  # the value still comes back to the caller
    cache["b"] = 2
    assert len(cache) == 0 and cache.get("a") is None
    assert ClearWhenFull(-5).maxsize == 0


def test_clear_when_full_keeps_the_same_dict_object() -> None:
    cache: ClearWhenFull[str, int] = ClearWhenFull(1)
    get = cache.get  # callers may hold the bound read method
    cache["a"] = 1
    cache["b"] = 2
    assert get("b") == 2 and get("a") is None


def test_lru_drops_the_least_recently_used() -> None:
    cache: Lru[str, int] = Lru(3)
    for i, key in enumerate("abc"):
        cache.put(key, i)
    assert cache.get("a") == 0  # a read is a use: "a" is now the most recent
    cache.put("d", 3)
    assert "b" not in cache and list(cache) == ["c", "a", "d"]
    cache.put("c", 20)  # a write is a use too
    cache.put("e", 4)
    assert list(cache) == ["d", "c", "e"] and cache.get("c") == 20
    assert len(cache) == 3


def test_lru_peek_does_not_count_as_a_use() -> None:
    cache: Lru[str, int] = Lru(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.peek("a") == 1
    cache.put("c", 3)
    assert "a" not in cache and cache.peek("b") == 2


def test_lru_pop_clear_and_size_zero() -> None:
    cache: Lru[str, int] = Lru(2)
    cache.put("a", 1)
    assert cache.pop("a") == 1 and cache.pop("a") is None and len(cache) == 0
    cache.put("b", 2)
    cache.clear()
    assert cache.get("b") is None
    off: Lru[str, int] = Lru(0)
    off.put("a", 1)
    assert len(off) == 0 and off.get("a") is None


def test_lru_stays_bounded_under_a_flood() -> None:
    cache: Lru[int, int] = Lru(100)
    hot = 0
    cache.put(hot, 0)
    for i in range(1, 10_000):
        cache.put(i, i)
        assert cache.get(hot) == 0  # an entry in steady use survives any number of new ones
        assert len(cache) <= 100
