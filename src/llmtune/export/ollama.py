"""format=ollama: a Modelfile beside the GGUF, carrying the run's prompt format, instruction and sampling settings."""

from pathlib import Path

from llmtune.data.prompts import PromptFormat
from llmtune.files import write_atomic

TEMPERATURE = 0.2  # low: a tuned classifier or Q&A model should answer the same way each time
SYSTEM, PROMPT = "{{ .System }}", "{{ .Prompt }}"  # Ollama's Go-template fields for the system and user text


def modelfile_text(gguf_name: str, prompt_format: PromptFormat, num_predict: int | None) -> str:
    """The family's prompt template with the instruction as Ollama's SYSTEM and the input as its prompt, so
    `ollama run` builds the same prompt the run was tuned on. The answer template's closing text (e.g.
    <end_of_turn>) stops generation; a classifier's answer is at most num_predict tokens (its longest label)."""
    template = prompt_format.prompt_template.format(instruction=SYSTEM, input=PROMPT)
    closing = prompt_format.answer_template.split("{answer}", 1)[1]
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""', f'SYSTEM """{prompt_format.instruction}"""',
             f"PARAMETER temperature {TEMPERATURE}"]
    if closing.strip():
        lines.append(f'PARAMETER stop "{closing.strip()}"')
    if num_predict:
        lines.append(f"PARAMETER num_predict {num_predict}")
    return "\n".join(lines) + "\n"


def write_modelfile(out_dir: Path, gguf_name: str, prompt_format: PromptFormat, num_predict: int | None) -> Path:
    path = out_dir / "Modelfile"
    write_atomic(path, modelfile_text(gguf_name, prompt_format, num_predict))
    return path


def render_template(modelfile: str, system: str, prompt: str) -> str:
    """What Ollama sends the model for this Modelfile's TEMPLATE (plain field substitution: the templates written
    here use no conditionals)."""
    template = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    return template.replace(SYSTEM, system).replace(PROMPT, prompt)
