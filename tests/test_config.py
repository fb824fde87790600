"""Every model x method x dataset composes from the real conf/ and resolves without a placeholder left."""

import itertools
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import compose_config
from llmtune.config import CONFIG_DIR, build_components
from llmtune.errors import UserError

GROUPS = {group: sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))
          for group in ("model", "method", "dataset")}
# A model's quirks (prompt format, dtype, source) meet a dataset only through its task: every model x method on one
# dataset of each task, and every method x dataset on two models (one tiny, the default). Their full product took a
# sixth of CI's test time (576 compositions at about 0.9 s each) for no case these miss.
TASK_DATASETS = ("sentiment_demo", "hr_demo")
COMBINATIONS = sorted({*itertools.product(GROUPS["model"], GROUPS["method"], TASK_DATASETS),
                       *itertools.product(("tiny", "gemma3_270m"), GROUPS["method"], GROUPS["dataset"])})


@pytest.mark.parametrize("model,method,dataset", COMBINATIONS)
def test_every_combination_composes(model, method, dataset, tmp_path):
    overrides = [f"model={model}", f"method={method}", f"dataset={dataset}", "dataset.path=some/file.csv"]
    if dataset == "synth_labels":  # its labels are the ones synth was given: the command line names them
        overrides.append("dataset.labels=[a,b]")
    cfg = compose_config(overrides, output_dir=tmp_path)
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert (resolved["model"]["name"], resolved["method"]["name"], resolved["dataset"]["name"]) == (model, method,
                                                                                                   dataset)
    assert resolved["method"].get("loss_on", "answer") in ("answer", "all")
    assert "{instruction}" in resolved["model"]["prompt_template"] and "{input}" in resolved["model"]["prompt_template"]
    assert "{answer}" in resolved["model"]["answer_template"]
    qa = resolved["task"]["_target_"].endswith("QuestionAnswering")
    assert qa == (dataset in ("hr_demo", "hr_policy_qa", "synth_qa"))  # the dataset file selects its task
    if qa and (method == "classifier" or resolved["method"].get("demonstrations")):
        with pytest.raises(UserError, match="is a Q&A task"):  # these need labels
            build_components(cfg)
    else:
        task, built = build_components(cfg)  # every component instantiates with its configured arguments
        labels = resolved["dataset"].get("labels")
        words = list(labels.values()) if isinstance(labels, dict) else labels  # {code: word} scores the words
        assert built.name == method and task.labels == (None if qa else words)


def test_groups_are_not_empty():
    assert {"gemma3_270m", "tiny"} <= set(GROUPS["model"])
    assert {"instruct", "causal"} <= set(GROUPS["method"])
    assert {"sentiment_demo", "financial_phrasebank"} <= set(GROUPS["dataset"])


def test_default_dataset_is_the_shipped_demo(tmp_path):
    cfg = compose_config([], output_dir=tmp_path)
    assert cfg.model.name == "gemma3_270m" and cfg.dataset.name == "sentiment_demo" and cfg.rag is False
    assert Path(cfg.dataset.path).is_file()


def test_config_problems_are_collected_into_one_error(tmp_path):
    cfg = compose_config(["method=classifier", "rag=true", "model.dtype=float33", "eval.batch_size=0"],
                         output_dir=tmp_path)
    with pytest.raises(UserError) as error:
        build_components(cfg)
    message = str(error.value)
    assert "rag=true" in message and "float33" in message and "eval.batch_size" in message
    assert "\n" not in message


@pytest.mark.parametrize("override,problem", [
    ("method.lora.r=8 +method.lora_rank=4", "method.lora_rank is not a setting of llmtune.methods.LanguageModelTuning"),
    ("+method.optimizer.betas2=[0.9,0.99]", "method.optimizer.betas2 is not a setting of torch.optim.AdamW (did you "
                                           "mean 'betas'?)"),
    ("method.optimizer._target_=torch.optim.AdamQ", "cannot be imported"),
    ("+method.scheduler.warmup_steps=10", "is not a setting of llmtune.training.module.cosine_with_warmup"),
    ("method.loss_on=prompt", "method.loss_on='prompt' must be 'answer'"),
])
def test_components_are_checked_against_their_signatures(override, problem, tmp_path):
    cfg = compose_config(override.split(), output_dir=tmp_path)
    with pytest.raises(UserError, match=re.escape(problem)):
        build_components(cfg)
