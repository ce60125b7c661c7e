"""A Qwen3.5-style chat template (text part) for tests, and a tiny checkpoint that uses it.

Written after the template Qwen3.5 ships: tools listed as JSON in the system turn with the
instructions for the XML call format, an assistant's calls rendered as ``<function=NAME>``
with one ``<parameter=P>`` block per argument (arguments iterated as a mapping), tool results
as ``<tool_response>`` user turns, reasoning kept only after the last user query, and a
generation prompt that opens ``<think>\\n`` (or closes an empty block when thinking is off).
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.checkpoints import write_checkpoint

_TOOLS_FORMAT = (
    "\\n\\nIf you choose to call a function ONLY reply in the following format with NO suffix:"
    "\\n\\n<tool_call>\\n<function=example_function_name>\\n<parameter=example_parameter_1>\\n"
    "value_1\\n</parameter>\\n<parameter=example_parameter_2>\\nThis is the value for the second "
    "parameter\\nthat can span\\nmultiple lines\\n</parameter>\\n</function>\\n</tool_call>\\n\\n"
    "<IMPORTANT>\\nReminder:\\n- Function calls MUST follow the specified format: an inner "
    "<function=...></function> block must be nested within <tool_call></tool_call> XML tags\\n"
    "- Required parameters MUST be specified\\n- You may provide optional reasoning for your "
    "function call in natural language BEFORE the function call, but NOT after\\n- If there is "
    "no function call available, answer the question like normal with your current knowledge "
    "and do not tell the user about function calls\\n</IMPORTANT>"
)

QWEN35_TEMPLATE = """\
{%- if tools and tools is iterable and tools is not mapping %}
    {{- '<|im_start|>system\\n# Tools\\n\\nYou have access to the following functions:\\n\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- '\\n</tools>' }}
    {{- '""" + _TOOLS_FORMAT + """' }}
    {%- if messages[0].role == 'system' and messages[0].content | trim %}
        {{- '\\n\\n' + messages[0].content | trim }}
    {%- endif %}
    {{- '<|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content | trim + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == 'user' %}
        {%- set content = message.content | trim %}
        {%- if not (content.startswith('<tool_response>') and content.endswith('</tool_response>')) %}
            {%- set ns.multi_step_tool = false %}
            {%- set ns.last_query_index = index %}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content | trim %}
    {%- if message.role == 'system' %}
        {%- if not loop.first %}
            {{- raise_exception('System message must be at the beginning.') }}
        {%- endif %}
    {%- elif message.role == 'user' %}
        {{- '<|im_start|>user\\n' + content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content | trim + '\\n</think>\\n\\n' + content }}
        {%- else %}
            {{- '<|im_start|>assistant\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls and message.tool_calls is iterable and message.tool_calls is not mapping %}
            {%- for tool_call in message.tool_calls %}
                {%- if tool_call.function is defined %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {%- if loop.first and content | trim %}
                    {{- '\\n\\n' }}
                {%- elif not loop.first %}
                    {{- '\\n' }}
                {%- endif %}
                {{- '<tool_call>\\n<function=' + tool_call.name + '>\\n' }}
                {%- if tool_call.arguments is defined %}
                    {%- for args_name, args_value in tool_call.arguments | items %}
                        {{- '<parameter=' + args_name + '>\\n' }}
                        {%- if args_value is mapping or (args_value is sequence and args_value is not string) %}
                            {{- args_value | tojson }}
                        {%- else %}
                            {{- args_value | string }}
                        {%- endif %}
                        {{- '\\n</parameter>\\n' }}
                    {%- endfor %}
                {%- endif %}
                {{- '</function>\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or loop.previtem.role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}
        {%- if loop.last or loop.nextitem.role != 'tool' %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- else %}
        {{- '<think>\\n' }}
    {%- endif %}
{%- endif %}
"""


def write_qwen35_checkpoint(path: Path, tokenizer_dir: Path) -> Path:
    """A tiny random Qwen3 checkpoint whose ``tokenizer_config.json`` carries
    :data:`QWEN35_TEMPLATE` (so the server sees a model that writes XML tool calls)."""
    write_checkpoint(path, tokenizer_dir)
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = QWEN35_TEMPLATE
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return path
