"""A finished run, loaded to predict: its config, tokenizer, model and prompt format.

The model is the run's adapter on its base (`adapter/`), the fully fine-tuned `model/`, or an exported folder or GGUF
file (`llmtune export`). `llmtune predict`, `llmtune serve` and the export's parity check all go through here, so
they classify exactly as the run's own evaluation did. The run's Method says how its model loads, what it reads (a
prompt, or for a classification head the raw text) and how it scores the labels.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmtune.data.prompts import PROMPT_FILE, PromptFormat
from llmtune.data.truncation import truncate_texts
from llmtune.errors import UserError
from llmtune.methods import Method, method_of
from llmtune.tasks import Task, task_of
from llmtune.trust import check_run_is_trusted
from llmtune.evaluation.generation import answer_questions, closing_texts
from llmtune.evaluation.scoring import label_choice



@dataclass
class LoadedRun:
    run_dir: Path
    cfg: DictConfig
    tokenizer: object
    model: object
    prompt_format: PromptFormat
    labels: list[str] | None  # None for Q&A runs
    method: Method  # how the model reads a text and scores the labels
    # rag=true: the run's retriever, adding `context` (and `retrieved`) to rows {"text": ...}; None for rag=false
    add_context: Callable[[list[dict]], None] | None = None
    # Temperature scaling fitted on the run's validation split (metrics.json: calibration.temperature); 1.0: none
    temperature: float = 1.0
    # The tokenizer as structured generation reads it (structured.JsonVocabulary), built when first needed
    _json_vocabulary: object = field(default=None, init=False, repr=False)

    def prompts(self, texts: list[str], prompt_format: PromptFormat | None = None) -> list[str]:
        """Each text's prompt as the run built it: with rag=true, what the run's retriever finds goes in too."""
        rows = [{"text": text} for text in self.cut(texts)]
        if self.add_context is not None:
            self.add_context(rows)
        return self.method.model_inputs(rows, prompt_format or self.prompt_format)

    def cut(self, texts: list[str]) -> list[str]:
        """The texts cut as the run cut its rows (dataset.max_input_tokens), before retrieval and the prompt."""
        return truncate_texts(texts, self.tokenizer, self.cfg.dataset.get("max_input_tokens"),
                              self.cfg.dataset.get("truncation", "head"))[0]

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def generates(self) -> bool:
        """Whether the model continues text (a language model), or only classifies (a classification head)."""
        return self.method.generates

    def classify(self, texts: list[str], batch_size: int | None = None, desc: str = "classifying") -> list[dict]:
        """[{label, confidence, scores}] per text: label scoring, the softmax over the labels as confidence."""
        if self.labels is None:
            raise UserError(f"run {self.run_dir} is a Q&A run: it generates answers and has no labels to classify "
                            "into; use a classification run")
        return self.classify_prompts(self.prompts(texts), batch_size, desc)

    def classify_prompts(self, prompts: list[str], batch_size: int | None = None, desc: str = "classifying"
                         ) -> list[dict]:
        """classify() for prompts already built with prompts() (e.g. checked for length first)."""
        logits = self.method.label_logits(self.model, self.tokenizer, prompts, self.labels, self.prompt_format,
                                          batch_size or self.cfg.eval.batch_size, desc)
        # The run's calibration, as its predictions.jsonl has it
        probs = torch.softmax(logits / self.temperature, dim=1)
        records = []
        for p in probs:
            label, scores = label_choice(self.labels, p)
            records.append({"label": label, "confidence": round(float(p.max()), 5), "scores": scores})
        return records

    def answer(self, texts: list[str], batch_size: int | None = None, desc: str = "answering") -> list[dict]:
        """[{answer (, sources)}] per question, generated as the run's evaluation generates (greedy by default, the
        first line kept); rag=true runs also name the chunks the answer was given."""
        rows = [{"id": i, "text": text, "answer": "", "tokens": []} for i, text in enumerate(self.cut(texts))]
        if self.add_context is not None:
            self.add_context(rows)
        predictions = answer_questions(self.model, self.tokenizer, rows, self.prompt_format,
                                       self.cfg.eval.generation, batch_size or self.cfg.eval.batch_size, desc)
        return [{"answer": p["predicted"],
                 **({"sources": [f"{c['source']} p.{c['page']}" for c in r["retrieved"]]} if "retrieved" in r else {})}
                for p, r in zip(predictions, rows)]

    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
                 stop: list[str] | None = None, end_texts: list[str] | None = None,
                 json_schema: dict | None = None) -> dict:
        """Continue one prompt: {text, finish_reason (stop|length), prompt_tokens, completion_tokens}.
        temperature 0 is greedy decoding (reproducible). stop and end_texts (what closes an answer in the prompt
        format, stop_texts()) both end the text where they appear. json_schema (structured.enforceable_schema's):
        the text is JSON matching it, generated until that JSON is complete (or max_new_tokens); end_texts then only
        end it as tokens, once the JSON is complete, since a closing text such as a line break may also sit inside
        the JSON."""
        if not self.generates:
            raise UserError(f"{self.run_dir} is a method={self.method.name} run: its model classifies and does not "
                            "generate text; classify with it, or use a run of an LM method")
        from transformers import LogitsProcessorList, StoppingCriteriaList

        from llmtune.evaluation.generation import DecodedTextStop, stop_token_ids

        self.model.eval()
        inputs = self.tokenizer(prompt, return_tensors="pt").to(self.model.device)
        prompt_length = inputs.input_ids.shape[1]
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        ends = [text for text in end_texts or [] if text]
        markers = [marker for marker in stop or [] if marker] + (ends if json_schema is None else [])
        # A stop text that is one token (e.g. <end_of_turn>) ends generation as EOS does; any other ends it once the
        # decoded text holds it, instead of generating up to max_new_tokens only to cut there.
        stop_ids = stop_token_ids(self.model, self.tokenizer, markers + ends)
        stop_at_text = [DecodedTextStop(self.tokenizer, prompt_length,
                                        lambda text: any(marker in text for marker in markers))] if markers else []
        constraint = [] if json_schema is None else [self.json_logits(json_schema, prompt_length, ends)]
        output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, use_cache=True, eos_token_id=stop_ids,
                                     pad_token_id=self.tokenizer.pad_token_id,
                                     stopping_criteria=StoppingCriteriaList(stop_at_text),
                                     logits_processor=LogitsProcessorList(constraint), **sampling)
        new_ids = output[0, prompt_length:]
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        ended = len(new_ids) < max_new_tokens or (len(new_ids) and int(new_ids[-1]) in stop_ids)
        cut = False
        for marker in markers:  # the answer template's closing text (e.g. <end_of_turn>) ends an answer too
            if marker in text:
                text, ended, cut = text[:text.index(marker)], True, True
        if json_schema is not None and ended and not cut and not valid_json(text):
            # Only the constraint's own failure ends the text early: it allows an end once the JSON is complete,
            # and allows nothing but the end when it finds no token to continue with (it logs why).
            raise RuntimeError(f"constrained generation stopped before the JSON was complete: {text[-80:]!r}")
        return {"text": text, "finish_reason": "stop" if ended else "length",
                "prompt_tokens": int(prompt_length), "completion_tokens": int(len(new_ids))}

    def json_logits(self, json_schema: dict, prompt_length: int, end_texts: list[str]):
        """The logits processor that keeps generation to JSON matching json_schema, ended by the model's EOS or the
        prompt format's closing token."""
        from llmtune.evaluation.generation import stop_token_ids
        from llmtune.structured import JsonLogits, JsonVocabulary

        if self._json_vocabulary is None:  # one pass over the vocabulary, on the first structured request
            self._json_vocabulary = JsonVocabulary.of(self.tokenizer, self.model.config.get_text_config().vocab_size)
        return JsonLogits(self._json_vocabulary, json_schema, prompt_length,
                          stop_token_ids(self.model, self.tokenizer, end_texts))

    def stop_texts(self) -> list[str]:
        """What follows an answer in this prompt format (e.g. "<end_of_turn>"), as generation stop strings."""
        return closing_texts(self.prompt_format)


def run_config(run_dir: Path) -> DictConfig:
    """The run's resolved config (config.yaml, written when the run started)."""
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist: pass a folder under outputs/ that a run wrote")
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir} has no config.yaml, so it is not an llmtune run directory: pass the folder a run "
                        "wrote (outputs/<date>/<time>-<id>_<model>-<method>-rag=<bool>)")
    return OmegaConf.load(path)


def prompt_format_of(run_dir: Path, cfg: DictConfig, tokenizer) -> PromptFormat:
    saved = PromptFormat.load(run_dir)
    if saved is not None:
        return saved
    if cfg.method.get("demonstrations"):
        raise UserError(f"{run_dir} has no {PROMPT_FILE} (written by runs since llmtune 0.1), so its few-shot "
                        "demonstrations are unknown: run the few-shot job again")
    return PromptFormat.from_config(cfg.model, cfg.dataset, tokenizer)


def load_run(run_dir: str | Path, model_path: str | Path | None = None, dtype: str | None = None,
             dequantize: bool = False, trust_remote_code: bool = False, quantize: str | None = None) -> LoadedRun:
    """Load a run to predict with: model_path (an exported folder with config.json, or a .gguf file) or else the
    run's own weights on its base model. dtype overrides the model's configured dtype. dequantize: a 4-bit base
    (qlora) is loaded as trained, then turned back into plain tensors of dtype, ready for merging the adapter.
    quantize="int8": the decoder's linear layers in int8, for predict and serve (llmtune.models.int8)."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    check_run_is_trusted(cfg, run_dir, trust_remote_code)  # the folder may come from someone else
    task, method = task_of(cfg, trust_remote_code), method_of(cfg, trust_remote_code)
    torch_dtype = getattr(torch, dtype or method.run_dtype(cfg.model))
    tokenizer, model = method.load_finished(run_dir, cfg, task.labels, Path(model_path) if model_path else None,
                                            torch_dtype, dequantize, trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if quantize == "int8":
        from llmtune.models.int8 import quantize_linears_int8

        model = quantize_linears_int8(model)
    add_context = _run_retriever(cfg, task) if cfg.get("rag") else None  # config checks refuse rag for a head
    return LoadedRun(run_dir, cfg, tokenizer, model.eval(), prompt_format_of(run_dir, cfg, tokenizer), task.labels,
                     method, add_context, fitted_temperature(run_dir))


def valid_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def fitted_temperature(run_dir: Path) -> float:
    """The temperature the run fitted on its validation split; 1.0 for a run without one (or written before)."""
    path = run_dir / "metrics.json"
    summary = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return float((summary.get("calibration") or {}).get("temperature", 1.0))


def _run_retriever(cfg: DictConfig, task: Task) -> Callable[[list[dict]], None]:
    """The run's retriever, rebuilt from its config (the index comes from the cache when unchanged) over the run's own
    training split, drawn again with its seed."""
    return task.retriever(cfg.retriever, task.load_splits(cfg.seed)["train"], cfg.paths.cache_dir)[0]


def load_language_model(run_dir: Path, cfg: DictConfig, trained: bool, model_path: Path | None,
                        torch_dtype: torch.dtype, dequantize: bool = False, trusted: bool = False):
    """A language-model run's (tokenizer, model): an exported folder or GGUF file, or the run's own weights."""
    if model_path is not None:
        return _load_exported(model_path, torch_dtype)
    return _load_own_weights(run_dir, cfg, trained, torch_dtype, dequantize, trusted)


def _load_own_weights(run_dir: Path, cfg: DictConfig, trained: bool, torch_dtype: torch.dtype, dequantize: bool,
                      trusted: bool):
    from llmtune.models.loader import load_base_model, prepare_model_dir
    from llmtune.models.merging import merged_for_inference

    if (run_dir / "model" / "config.json").is_file():  # method.full_finetune=true
        return _load_exported(run_dir / "model", torch_dtype)
    adapter = run_dir / "adapter"
    if trained and not (adapter / "adapter_config.json").is_file():
        raise UserError(f"{run_dir} has no adapter/ (the run did not finish?): check {run_dir / 'status.json'} "
                        "and pick a completed run")
    model_cfg = OmegaConf.merge(cfg.model, {"dtype": str(torch_dtype).removeprefix("torch.")})
    quantization = cfg.method.get("quantization")
    tokenizer, model = load_base_model(prepare_model_dir(model_cfg, cfg.paths.cache_dir, trusted), model_cfg,
                                       quantization)
    if quantization and dequantize:
        # The NF4 values the adapter was trained against, not the original weights: merging into those would change
        # what the adapter corrects. Merging into 4-bit weights directly would round the adapter away.
        model = model.dequantize(dtype=torch_dtype)
    elif quantization:
        from llmtune.models.lora import keep_4bit_layout_trainable

        # Score with the 4-bit layout the run trained and evaluated with (bitsandbytes' repacked CPU inference
        # layout also fails on layers narrower than its 64-value block, e.g. the tiny model's).
        keep_4bit_layout_trainable(model)
    if trained:
        from peft import PeftModel

        # Folded into the weights unless 4-bit: predict and serve only infer, at the bare base's speed
        model = merged_for_inference(PeftModel.from_pretrained(model, adapter))
    return tokenizer, model


def _load_exported(path: Path, torch_dtype: torch.dtype):
    """An exported model: a folder saved with save_pretrained, or one GGUF file (transformers de-quantises it)."""
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file {path} does not exist: run llmtune export RUN_DIR format=gguf first")
        source = dict(pretrained_model_name_or_path=path.parent, gguf_file=path.name)
        # transformers keeps GGUF weights packed and its kernels compute in fp32: another dtype only adds casts.
        torch_dtype = torch.float32
    elif (path / "config.json").is_file():
        source = dict(pretrained_model_name_or_path=path, use_safetensors=True)
    else:
        raise UserError(f"model={path} is neither a model folder (config.json) nor a .gguf file: pass what "
                        "llmtune export wrote")
    tokenizer = AutoTokenizer.from_pretrained(**source)
    model = AutoModelForCausalLM.from_pretrained(**source, dtype=torch_dtype)
    return tokenizer, model
