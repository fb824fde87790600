"""Methods on a causal language model that scores (or generates) answers after a prompt: tuned with LoRA or fully
(instruct, causal, qlora), or prompted as it is (zeroshot, fewshot)."""

from contextlib import nullcontext

from omegaconf import DictConfig, OmegaConf

from llmtune.data.prompts import with_demonstrations
from llmtune.errors import UserError
from llmtune.methods.base import Method, TrainedMethod, print_trainable
from llmtune.models.loader import load_base_model
from llmtune.models.lora import add_lora
from llmtune.training.module import next_token_loss
from llmtune.training.setup import encode_rows, make_loaders


class LanguageModelTuning(TrainedMethod):
    """Prompt -> answer tokens with next-token loss where loss_on puts labels (answer: the answer only; all: every
    token), on a frozen base (4-bit with quantization) with LoRA, or every weight with full_finetune."""

    def __init__(self, name: str, loss_on: str, lora: DictConfig, optimizer: DictConfig, scheduler: DictConfig,
                 quantization: DictConfig | None = None, gradient_checkpointing: bool = False,
                 full_finetune: bool = False, label_smoothing: float = 0.0, neftune_noise_alpha: float = 0.0):
        super().__init__(name, lora, optimizer, scheduler, full_finetune, label_smoothing, neftune_noise_alpha,
                         loss_on=loss_on, quantization=quantization, gradient_checkpointing=gradient_checkpointing)
        if loss_on not in ("answer", "all"):
            raise UserError(f"method.loss_on={loss_on!r} must be 'answer' (the answer's tokens) or 'all' (every token)")
        self.loss_on = loss_on

    def build(self, model_cfg, task, model_dir) -> None:
        if self.full_finetune:  # AdamW steps on every weight: in bf16 most of those small steps would round away
            model_cfg = model_cfg.copy()
            model_cfg.dtype = "float32"
        self.tokenizer, model = load_base_model(model_dir, model_cfg, self.settings.quantization)
        self.model = model if self.full_finetune else add_lora(model, model_cfg, self.settings)
        print_trainable(self.model)

    def run_dtype(self, model_cfg) -> str:
        """float32 for full fine-tuning (see build): predict loads model/ as the run scored it."""
        return "float32" if self.full_finetune else model_cfg.dtype

    def base_predictions(self, task, rows, zero_shot, eval_cfg):
        with nullcontext() if self.full_finetune else self.model.disable_adapter():  # LoRA attached, switched off
            return super().base_predictions(task, rows, zero_shot, eval_cfg)

    def loaders(self, task, splits, prompt_format, trainer_cfg, seed):
        def encode(rows):
            return encode_rows(rows, self.tokenizer, prompt_format, self.loss_on, task.target,
                               task.answer_ends_with_eos)
        if self.settings.get("gradient_checkpointing"):
            # transformers turns the KV cache off inside checkpointed layers, so a shared prefix's cache would come
            # back empty and the rows would train without their instruction: every row carries its own prefix.
            trainer_cfg = OmegaConf.merge(trainer_cfg, {"share_prefix": False})
        return make_loaders(encode(splits["train"]), encode(splits["val"]), trainer_cfg, self.tokenizer.pad_token_id,
                            seed)

    loss = staticmethod(next_token_loss)


class Prompting(Method):
    """The base model as it is, prompted with the instruction (zeroshot) or with demonstrations k labelled training
    rows per label (fewshot, drawn and ordered by the seed); nothing is trained or saved."""

    def __init__(self, name: str, demonstrations: DictConfig | None = None, quantization: DictConfig | None = None):
        super().__init__(name, demonstrations=demonstrations, quantization=quantization)
        self.demonstrations = demonstrations
        self._base = None  # (rows, prompt format, predictions): zero-shot test predictions are the base's

    def build(self, model_cfg, task, model_dir) -> None:
        self.tokenizer, self.model = load_base_model(model_dir, model_cfg, self.settings.quantization)

    def prompt_format(self, zero_shot, task, splits, seed):
        if not self.demonstrations:
            return zero_shot
        return with_demonstrations(zero_shot, splits["train"], task.labels, seed=seed, **self.demonstrations)

    def base_predictions(self, task, rows, zero_shot, eval_cfg):
        predictions = super().base_predictions(task, rows, zero_shot, eval_cfg)
        self._base = (rows, zero_shot, predictions)
        return predictions

    def predictions(self, task, rows, prompt_format, eval_cfg, desc):
        if self._base is not None and self._base[0] is rows and self._base[1] == prompt_format:
            return self._base[2]  # the same model and prompt on the same rows: scored once
        return super().predictions(task, rows, prompt_format, eval_cfg, desc)
