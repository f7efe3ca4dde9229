"""LLM token estimates (reserved up front) and actual use (charged when the request ends)."""

from __future__ import annotations

from gateway.quota import llm_tokens


def test_chat_estimate_is_prompt_chars_over_four_plus_max_tokens():
    body = {"model": "chat", "messages": [{"role": "user", "content": "x" * 10},
                                          {"role": "user", "content": [{"type": "text", "text": "y" * 7}]}],
            "max_tokens": 50}
    prompt, total = llm_tokens.estimate(body, "/v1/chat/completions", default=256)
    assert prompt == 5  # ceil(17 / 4)
    assert total == 55


def test_default_when_no_max_tokens_and_cap_applies():
    body = {"messages": [{"role": "user", "content": "abcd"}]}
    assert llm_tokens.estimate(body, "/v1/chat/completions", default=256) == (1, 257)
    assert llm_tokens.estimate(body, "/v1/chat/completions", default=256, cap=100) == (1, 101)
    assert llm_tokens.estimate({**body, "max_completion_tokens": 9}, "/v1/chat/completions", 256) == (1, 10)


def test_choices_multiply_and_embeddings_have_no_completion():
    assert llm_tokens.estimate({"prompt": "abcdefgh", "max_tokens": 10, "n": 3}, "/v1/completions", 256) == (2, 32)
    assert llm_tokens.estimate({"input": ["abcd", "efgh"]}, "/v1/embeddings", 256) == (2, 2)


def test_hostile_values_never_lower_the_estimate_below_default():
    for bad in (-5, "100", None, True, float("nan"), float("inf"), [1]):
        _, total = llm_tokens.estimate({"prompt": "", "max_tokens": bad}, "/v1/completions", 256)
        assert total == 256
    assert llm_tokens.estimate("not a dict", "/v1/completions", 256) == (0, 256)


def test_actual_use_rules():
    assert llm_tokens.actual(42, True, 500) == 42  # upstream usage wins, below the reservation
    assert llm_tokens.actual(900, True, 500) == 900  # and above it
    assert llm_tokens.actual(0, True, 500) == 0
    assert llm_tokens.actual(None, True, 500) == 500  # answered, usage never arrived: the whole reservation
    assert llm_tokens.actual(None, False, 500) == 0  # the upstream never answered 2xx
