#!/usr/bin/env python3
"""Chat-template fixtures: conversations rendered by transformers' `apply_chat_template`.

    /opt/pyref/bin/python scripts/make_chat_template_fixtures.py

Writes ``fixtures/chat_templates.json``: for each template and conversation, the text
``apply_chat_template(messages, chat_template=..., tokenize=False, add_generation_prompt=g)`` gives for
g in (False, True), the ids ``tokenize=True`` gives with the byte-level BPE tokenizer of
``fixtures/gguf/tiny-bpe.gguf`` (its BOS ``<|im_start|>`` and EOS ``<|im_end|>`` are the template's
``bos_token``/``eos_token``), or the error message when the template raises. The templates are written
here to exercise what Hugging Face templates use (loops, ``namespace``, ``raise_exception``, Python
string methods, ``tojson``, whitespace control), plus SmolLM2-135M-Instruct's own template (Apache-2.0,
read from its GGUF, see scripts/get_smollm2.sh) when that file is in the cache.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import transformers
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("PEFT_CACHE", Path.home() / ".cache" / "peft-rs"))
SMOLLM2 = CACHE / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"

TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "headers": (
        "{{ bos_token }}{% set system = namespace(text='Be brief.') %}\n"
        "{% if messages[0].role == 'system' %}\n"
        "    {% set system.text = messages[0].content | trim %}\n"
        "    {% set messages = messages[1:] %}\n"
        "{% endif %}\n"
        "<|header|>system<|end_header|>\n\n{{ system.text }}{{ eos_token }}\n"
        "{% for message in messages %}\n"
        "    {% if message['role'] not in ['user', 'assistant'] %}\n"
        "        {{ raise_exception('unknown role ' + message['role']) }}\n"
        "    {% endif %}\n"
        "<|header|>{{ message.role }}<|end_header|>\n\n{{ message.content.strip() }}{{ eos_token }}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}<|header|>assistant<|end_header|>\n\n{% endif %}"
    ),
    "inst": (
        "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
        "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
        "{{- bos_token }}"
        "{%- for message in loop_messages %}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{- raise_exception('roles must alternate user/assistant/user/...') }}{%- endif %}"
        "{%- if message['role'] == 'user' %}"
        "{%- if loop.last and system is defined %}{{- '[INST] ' + system + '\n\n' + message['content'] + '[/INST]' }}"
        "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
        "{%- else %}{{- ' ' + message['content'] + eos_token }}{%- endif %}"
        "{%- endfor %}"
    ),
    "json": (
        "{% for message in messages %}{{ message | tojson }}\n"
        "{% if message.content.startswith('#') %}(heading){% endif %}"
        "{{ message.content.split(' ') | length }} words, {{ message.content | upper | replace('A', 'a') }}\n"
        "{% endfor %}{% if add_generation_prompt %}{{ {'role': 'assistant', 'n': messages | length} | tojson(indent=2) }}{% endif %}"
    ),
}

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": " You are a pirate. "}, {"role": "user", "content": "Where is the gold?"}],
    [
        {"role": "user", "content": "Give three tips for staying healthy."},
        {"role": "assistant", "content": "Eat well, sleep, move."},
        {"role": "user", "content": "Why sleep?"},
    ],
    [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "# Title\nSay 'hello' — café, 東京 ☕"},
        {"role": "assistant", "content": "  Bonjour  \n"},
    ],
    [{"role": "assistant", "content": "I speak first."}],
]


def main():
    tok = AutoTokenizer.from_pretrained(ROOT / "fixtures" / "gguf", gguf_file="tiny-bpe.gguf")
    templates = dict(TEMPLATES)
    sources = {name: "written for this fixture" for name in templates}
    if SMOLLM2.is_file():
        smol = AutoTokenizer.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name)
        templates["smollm2"] = smol.chat_template
        sources["smollm2"] = "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), tokenizer.chat_template of its GGUF"
    cases = []
    for name, template in templates.items():
        for messages in CONVERSATIONS:
            for generation in (False, True):
                case = {"template": name, "messages": messages, "add_generation_prompt": generation}
                try:
                    case["text"] = tok.apply_chat_template(
                        messages, chat_template=template, tokenize=False, add_generation_prompt=generation
                    )
                    ids = tok.apply_chat_template(
                        messages, chat_template=template, tokenize=True, add_generation_prompt=generation, return_dict=False
                    )
                    case["ids"] = list(ids)
                except Exception as e:  # the template's own raise_exception (a TemplateError)
                    case["error"] = str(e)
                cases.append(case)
    out = {
        "transformers": transformers.__version__,
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "templates": templates,
        "sources": sources,
        "cases": cases,
    }
    path = ROOT / "fixtures" / "chat_templates.json"
    path.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(cases)} cases ({sum('error' in c for c in cases)} raising) written to {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
