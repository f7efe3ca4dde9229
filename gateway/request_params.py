"""``request.params.*``: the few request parameters a policy may reason about, read once from the body.

WHY a fixed, small vocabulary rather than the raw body: a policy must be able
to refuse the documented levers for stealing a model (``logprobs`` and
``logit_bias`` expose an LLM's last layer; a 4,096-row v2 batch averages noise
away) without the security team learning every API's spelling. Each LLM API
names the same thing differently (``max_tokens``, ``max_completion_tokens``,
``max_output_tokens``, Ollama's ``options.num_predict``); here they are one
name. The names and their "absent" values are the contract in PRODUCT.md:

========== ==================================================== ================
name       read from                                            when absent
========== ==================================================== ================
n          ``n``                                                1
stream     ``stream``                                           false
logprobs   ``logprobs`` or ``top_logprobs`` asked for           false
logit_bias ``logit_bias`` present                               false
tools      the names of ``tools`` (function or tool ``name``)   [] (empty list)
tool_choice ``tool_choice`` (a string, or the named function)   unknown
max_tokens whichever of ``max_tokens``, ``max_completion_tokens``,
           ``max_output_tokens``, ``options.num_predict``        unknown
temperature ``temperature`` (or ``options.temperature``)        unknown
batch      v2 infer: the first dimension of the inputs (largest) unknown
binary     v2 infer: binary tensor extension used                false
========== ==================================================== ================

"Unknown" means the key is left out: reading it in ``when`` is unknown, with
three-valued logic (a deny rule on it applies, an allow rule does not). A value
of the wrong type is left out too, never guessed. This module is a leaf: it
imports nothing of the gateway, so the policy compiler can take ``PARAM_NAMES``
from here without a cycle.
"""

from __future__ import annotations

from typing import Any, Mapping

PARAM_NAMES = frozenset({"n", "stream", "logprobs", "logit_bias", "tools", "tool_choice", "max_tokens",
                         "temperature", "batch", "binary"})
_MAX_TOKENS_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
_EMPTY: Mapping[str, Any] = {}


def _number(value: Any) -> int | float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value


def _tool_names(tools: Any) -> list[str]:
    """Function/tool names of an OpenAI/Anthropic/Responses ``tools`` list; a built-in tool by its ``type``."""
    names: list[str] = []
    if not isinstance(tools, list):
        return names
    for tool in tools:
        if not isinstance(tool, dict):
            continue
        fn = tool.get("function")
        name = fn.get("name") if isinstance(fn, dict) else tool.get("name")
        if not isinstance(name, str):
            name = tool.get("type")  # Responses built-ins: {"type": "web_search"}
        if isinstance(name, str):
            names.append(name)
    return names


def llm_params(body: Any) -> dict[str, Any]:
    """``request.params`` of an LLM JSON body (OpenAI, Anthropic Messages, Responses, Ollama)."""
    if not isinstance(body, dict):
        return {}
    n = _number(body.get("n"))
    params: dict[str, Any] = {
        "n": n if n is not None else 1,
        "stream": body.get("stream") is True,
        "logprobs": bool(body.get("logprobs")) or body.get("top_logprobs") not in (None, 0, False),
        "logit_bias": body.get("logit_bias") is not None,
        "tools": _tool_names(body.get("tools")),
    }
    choice = body.get("tool_choice")
    if isinstance(choice, str):
        params["tool_choice"] = choice
    elif isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else choice.get("name", choice.get("type"))
        if isinstance(name, str):
            params["tool_choice"] = name
    raw_options = body.get("options")
    options: Mapping[str, Any] = raw_options if isinstance(raw_options, dict) else _EMPTY
    for key in _MAX_TOKENS_KEYS:
        value = _number(body.get(key))
        if value is not None:
            params["max_tokens"] = value
            break
    else:
        value = _number(options.get("num_predict"))
        if value is not None:
            params["max_tokens"] = value
    temperature = _number(body.get("temperature"))
    if temperature is None:
        temperature = _number(options.get("temperature"))
    if temperature is not None:
        params["temperature"] = temperature
    return params


def v2_batch(body: Any) -> int | None:
    """The batch size of a v2 infer body: the largest first dimension of its inputs (None when unreadable).

    The largest, not the first: a row-counted budget must not be cheated by a
    small first input in front of a large one (the validate stage refuses
    inputs that disagree with their data; this only has to be safe).
    """
    inputs = body.get("inputs") if isinstance(body, dict) else None
    if not isinstance(inputs, list) or not inputs:
        return None
    best: int | None = None
    for item in inputs:
        shape = item.get("shape") if isinstance(item, dict) else None
        if not isinstance(shape, list) or not shape:
            continue
        first = shape[0]
        if isinstance(first, int) and not isinstance(first, bool) and first >= 0:
            best = first if best is None else max(best, first)
    return best


def v2_params(body: Any, binary_header: bool = False) -> dict[str, Any]:
    """``request.params`` of a v2 infer body: ``batch`` and ``binary``."""
    params: dict[str, Any] = {"binary": binary_header}
    if isinstance(body, dict):
        inputs = body.get("inputs")
        if isinstance(inputs, list) and not binary_header:
            params["binary"] = any(isinstance(i, dict) and isinstance(i.get("parameters"), dict)
                                   and "binary_data_size" in i["parameters"] for i in inputs)
    batch = v2_batch(body)
    if batch is not None:
        params["batch"] = batch
    return params
