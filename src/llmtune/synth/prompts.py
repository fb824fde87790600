"""The teacher's and the judge's prompts: versioned YAML files in conf/synth/ (or a folder given with prompts=DIR),
their texts written with $placeholders (string.Template), so the JSON examples in them need no escaping."""

import hashlib
import string
from dataclasses import dataclass
from pathlib import Path

import yaml

from llmtune.config import CONFIG_DIR
from llmtune.errors import UserError

SHIPPED_PROMPTS = Path(CONFIG_DIR) / "synth"


@dataclass(frozen=True)
class PromptFile:
    name: str  # the file's stem: qa, labelled, judge_qa, judge_labelled
    path: Path
    version: str
    texts: dict[str, str]  # system, user, and any other template the kind uses (user_with_document)

    def messages(self, user_key: str = "user", **values) -> list[dict]:
        """The system message and one user message, the placeholders filled in."""
        return [{"role": "system", "content": self._render("system", values)},
                {"role": "user", "content": self._render(user_key, values)}]

    def _render(self, key: str, values: dict) -> str:
        return string.Template(self.texts[key]).substitute(values).strip()  # placeholders checked at load

    def record(self) -> dict:
        """What provenance.json keeps of the prompt: its version and its texts."""
        return {"file": str(self.path), "version": self.version, **self.texts}

    def fingerprint(self) -> dict:
        """What a resumed out= must match: the version and the texts' hash."""
        text = yaml.safe_dump(self.texts, sort_keys=True, allow_unicode=True)
        return {"version": self.version, "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}


def load_prompt(name: str, fills: set[str], folder: Path | None, user: str = "user") -> PromptFile:
    """conf/synth/NAME.yaml, or folder/NAME.yaml where prompts=DIR holds one. `version`, `system` and the user text
    (`user`, or e.g. `user_with_document`) are required, and their placeholders must be among those synth `fills`:
    checked here, before any request."""
    needed = ("system", user)
    path = folder / f"{name}.yaml" if folder is not None and (folder / f"{name}.yaml").is_file() else (
        SHIPPED_PROMPTS / f"{name}.yaml")
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise UserError(f"cannot read the prompt file {path} ({' '.join(str(error).split())[:200]}); fix it or "
                        "remove it from prompts=") from None
    if not isinstance(content, dict) or "version" not in content:
        raise UserError(f"prompt file {path} needs a `version:` and the texts {', '.join(needed)}")
    missing = [key for key in needed if not isinstance(content.get(key), str) or not content[key].strip()]
    if missing:
        raise UserError(f"prompt file {path} has no text for {', '.join(missing)}; add it (see {SHIPPED_PROMPTS})")
    for key in needed:
        check_placeholders(path, key, content[key], fills)
    return PromptFile(name=name, path=path, version=str(content["version"]),
                      texts={key: content[key] for key in needed})


def check_placeholders(path: Path, key: str, text: str, filled: set[str]) -> None:
    for match in string.Template.pattern.finditer(text):
        name = match.group("named") or match.group("braced")
        if match.group("invalid") is not None:
            raise UserError(f"prompt file {path}, {key}: a lone $ at character {match.start('invalid')}; write a "
                            "literal dollar sign as $$")
        if name is not None and name not in filled:
            raise UserError(f"prompt file {path}, {key}: synth fills no ${name}; the placeholders are "
                            f"{', '.join('$' + known for known in sorted(filled))}")
