"""Each model config renders its family's prompt exactly; chat templates and few-shot demonstrations."""

import functools

import huggingface_hub
import pytest
from conftest import compose_config
from omegaconf import OmegaConf
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from llmtune.data.prompts import PromptFormat, with_demonstrations
from llmtune.errors import UserError
from llmtune.models.loader import prepare_model_dir

DATASET = OmegaConf.create({"instruction": "Classify the sentiment."})
TEXT, LABEL = "Profit rose.", "positive"

PLAIN = ("Classify the sentiment.\n[Profit rose.] =", " positive")
GEMMA = ("<start_of_turn>user\nClassify the sentiment.\n\nProfit rose.<end_of_turn>\n<start_of_turn>model\n",
         "positive<end_of_turn>")
LLAMA3 = ("<|start_header_id|>user<|end_header_id|>\n\nClassify the sentiment.\n\nProfit rose.<|eot_id|>"
          + "<|start_header_id|>assistant<|end_header_id|>\n\n", "positive<|eot_id|>")
MISTRAL = ("[INST] Classify the sentiment.\n\nProfit rose. [/INST]", "positive</s>")
MISTRAL_V3 = ("[INST] Classify the sentiment.\n\nProfit rose.[/INST]", "positive</s>")
PHI3 = ("<|user|>\nClassify the sentiment.\n\nProfit rose.<|end|>\n<|assistant|>\n", "positive<|end|>")
ALPACA = ("### Instruction:\nClassify the sentiment.\n\n### Input:\nProfit rose.\n\n### Response:\n", "positive")

# model config: (prompt, answer, use_chat_template)
EXPECTED = {
    "gemma3_270m": (*PLAIN, False),
    "tiny": (*PLAIN, False),
    "phi2": (*PLAIN, False),
    "llama2_7b": (*ALPACA, False),
    "gemma2b": (*GEMMA, True),
    "gemma7b": (*GEMMA, True),
    "llama3_8b": (*LLAMA3, True),
    "mistral7b_v02": (*MISTRAL, True),
    "mistral7b_v03": (*MISTRAL_V3, True),
    "phi3_mini": (*PHI3, True),
}
HUB_ONLY = ["gemma2b", "gemma7b", "llama2_7b", "llama3_8b", "mistral7b_v02", "mistral7b_v03", "phi2", "phi3_mini"]

# The chat templates the families' tokenizers ship (tokenizer_config.json): google/gemma-7b-it,
# meta-llama/Meta-Llama-3-8B-Instruct, mistralai/Mistral-7B-Instruct-v0.2, microsoft/Phi-3-mini-4k-instruct (current
# revision), and mistralai/Mistral-7B-Instruct-v0.3 cut down to its user/assistant turns (its tool calls left out).
CHAT_TEMPLATES = {
    "gemma7b": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
        "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
    ),
    "llama3_8b": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
        "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
        "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "mistral7b_v02": (
        "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
    ),
    "mistral7b_v03": (
        "{{- bos_token }}{%- for message in messages %}{%- if message['role'] == 'user' %}"
        "{{- '[INST] ' + message['content'] + '[/INST]' }}{%- elif message['role'] == 'assistant' %}"
        "{{- ' ' + message['content']|trim + eos_token}}{%- endif %}{%- endfor %}"
    ),
    "phi3_mini": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
        "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
        "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
    ),
}
# Each tokenizer's BOS, and whether it adds BOS itself when encoding (Phi-3's current tokenizer does not).
TOKENIZER_BOS = {"gemma7b": ("<bos>", True), "llama3_8b": ("<|begin_of_text|>", True), "mistral7b_v02": ("<s>", True),
                 "mistral7b_v03": ("<s>", True), "phi3_mini": ("<s>", False)}


@functools.cache
def model_cfg(name: str):
    return compose_config([f"model={name}"]).model


def tokenizer_with(chat_template: str | None, bos: str = "<bos>", adds_bos: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in code: only its BOS behaviour and its chat template matter here."""
    words = Tokenizer(models.WordLevel({"<unk>": 0, bos: 1, "<eos>": 2, "a": 3}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        words.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, bos_token=bos, eos_token="<eos>", unk_token="<unk>")
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_model_renders_its_family_format(name):
    prompt, answer, use_chat_template = EXPECTED[name]
    cfg = model_cfg(name)
    prompt_format = PromptFormat.from_config(cfg, DATASET)
    assert prompt_format.prompt(TEXT) == prompt
    assert prompt_format.answer(LABEL) == answer
    assert cfg.use_chat_template is use_chat_template


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_tokenizer_chat_template_renders_the_configured_prompt_without_a_second_bos(name):
    bos, adds_bos = TOKENIZER_BOS[name]
    tokenizer = tokenizer_with(CHAT_TEMPLATES[name], bos, adds_bos)
    prompt_format = PromptFormat.from_config(model_cfg(name), DATASET, tokenizer)
    assert prompt_format.prompt(TEXT) == EXPECTED[name][0]  # no BOS text: encoding adds it (Phi-3: none)
    assert tokenizer(prompt_format.prompt(TEXT)).input_ids.count(1) == (1 if adds_bos else 0)


def test_chat_template_is_used_only_when_configured_and_present():
    chat = "{{ bos_token }}{{ '{' }}user: {{ messages[0]['content'] }}{{ '}' }}\nbot:"
    instruct = model_cfg("gemma2b")
    from_tokenizer = PromptFormat.from_config(instruct, DATASET, tokenizer_with(chat))
    assert from_tokenizer.prompt(TEXT) == "{user: Classify the sentiment.\n\nProfit rose.}\nbot:"
    assert from_tokenizer.answer(LABEL) == "positive<end_of_turn>"  # the answer still closes the family's turn
    # A tokenizer that adds no BOS keeps the one the template writes.
    kept = PromptFormat.from_config(instruct, DATASET, tokenizer_with(chat, adds_bos=False))
    assert kept.prompt(TEXT) == "<bos>{user: Classify the sentiment.\n\nProfit rose.}\nbot:"
    assert PromptFormat.from_config(instruct, DATASET, tokenizer_with(None)).prompt(TEXT) == GEMMA[0]
    assert PromptFormat.from_config(model_cfg("phi2"), DATASET, tokenizer_with(chat)).prompt(TEXT) == PLAIN[0]


ROWS = [{"id": f"{label}-{i}", "text": f"{label} news {i}", "label": label}
        for label in ("positive", "negative", "neutral") for i in range(6)]
LABELS = ["positive", "negative", "neutral"]


def demonstrated_answers(prompt_format: PromptFormat) -> list[str]:
    blocks = prompt_format.instruction.split("\n\n")[1:]
    return [block.split("\nAnswer: ")[1] for block in blocks]


def test_demonstrations_are_balanced_seeded_and_shuffled():
    base = PromptFormat.from_config(model_cfg("gemma2b"), DATASET)
    few = with_demonstrations(base, ROWS, LABELS, shots_per_label=2, seed=1)
    answers = demonstrated_answers(few)
    assert sorted(answers) == sorted(LABELS * 2)
    assert answers != sorted(answers, key=LABELS.index)  # not grouped by label
    assert few.instruction.startswith("Classify the sentiment.\n\nText: ")
    assert with_demonstrations(base, ROWS, LABELS, shots_per_label=2, seed=1) == few
    assert with_demonstrations(base, ROWS, LABELS, shots_per_label=2, seed=2).instruction != few.instruction
    custom = with_demonstrations(base, ROWS, LABELS, shots_per_label=1, seed=1, template="{input} => {answer}")
    assert all(" => " in block for block in custom.instruction.split("\n\n")[1:])
    assert with_demonstrations(base, ROWS, LABELS, shots_per_label=0, seed=1) == base


def test_demonstrations_are_a_prefix_shared_by_every_prompt():
    few = with_demonstrations(PromptFormat.from_config(model_cfg("gemma2b"), DATASET), ROWS, LABELS, 3, seed=0)
    prompts = [few.prompt(text) for text in ("Profit rose.", "Sales fell.", "The board met.")]
    shared = "<start_of_turn>user\n" + few.instruction + "\n\n"
    assert all(prompt.startswith(shared) for prompt in prompts)


def test_too_few_rows_for_the_shots_is_one_line_naming_the_fix():
    rows = [row for row in ROWS if row["label"] != "neutral"] + ROWS[-1:]  # a single neutral row
    with pytest.raises(UserError) as error:
        with_demonstrations(PromptFormat.from_config(model_cfg("tiny"), DATASET), rows, LABELS, 2, seed=0)
    message = str(error.value)
    assert "'neutral'" in message and "method.demonstrations.shots_per_label" in message and "\n" not in message


@pytest.mark.parametrize("name", HUB_ONLY)
def test_hub_only_model_offline_fails_with_one_line_naming_the_fix(name, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty HF cache
    cfg = model_cfg(name)
    with pytest.raises(UserError) as error:
        prepare_model_dir(cfg, tmp_path)
    message = str(error.value)
    assert cfg.source.hub_id in message and "is not in the Hugging Face cache" in message and "model.path=" in message
    assert "\n" not in message


def test_a_family_format_is_switched_on_the_command_line_and_a_typo_is_caught():
    from llmtune.config import check_overrides

    switched = compose_config(["model=llama3_8b", "prompt@model=alpaca"]).model
    assert PromptFormat.from_config(switched, DATASET).prompt(TEXT) == ALPACA[0] and not switched.use_chat_template
    check_overrides(["model=llama3_8b", "prompt@model=alpaca"])  # accepted as Hydra accepts it
    with pytest.raises(UserError, match="prompt=alpacca is not a known prompt config .*did you mean 'alpaca'"):
        check_overrides(["prompt@model=alpacca"])
