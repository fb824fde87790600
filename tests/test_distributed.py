"""Beyond one process: trainer=ddp runs two processes on this CPU (gloo) as one run, the samplers shard one draw
across ranks, and the presets for GPUs (fsdp, deepspeed) compose into their Lightning strategies."""

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import compose_config
from hydra.utils import instantiate
from test_trust import write_learnable_data

from llmtune.data import batching

LEARNABLE = ["model=tiny", "method=classifier", "method.optimizer.lr=1e-2", "trainer.max_epochs=8",
             "dataset.split.train_per_class=10", "dataset.split.val_per_class=5", "dataset.split.test_per_class=10",
             "eval.baseline=false"]


def llmtune(args: list[str], cwd: Path, cache_dir: Path, model_dir: Path) -> subprocess.CompletedProcess:
    """`python -m llmtune ARGS` from cwd (its outputs/ is the run's), on the session's tiny model."""
    env = {**os.environ, "LLMTUNE_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    result = subprocess.run([sys.executable, "-m", "llmtune", *args, f"model.path={model_dir}"], cwd=cwd,
                            capture_output=True, text=True, env=env, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def split_digests(run_dir: Path) -> dict[str, str]:
    """{log file: the data-split digest its rank logged}."""
    found = {}
    for log in run_dir.glob("*.log"):
        match = re.search(r"rank (\d+): data split (\w+)", log.read_text(encoding="utf-8"))
        if match:
            found[log.name] = match.group(2)
    return found


@pytest.fixture(scope="module")
def learnable(tmp_path_factory) -> Path:
    return write_learnable_data(tmp_path_factory.mktemp("data") / "learnable.csv")


def test_ddp_on_two_cpu_processes_is_one_run_with_the_metrics_of_one_process(tmp_path, learnable, cache_dir,
                                                                             tiny_model_dir):
    common = [*LEARNABLE, f"dataset.path={learnable}"]
    # trainer.batch_size is the batch of a step, whatever the processes: each of two takes 3 of every batch of 6.
    llmtune([*common, "trainer.batch_size=6", "hydra.run.dir=single"], tmp_path, cache_dir, tiny_model_dir)
    llmtune([*common, "trainer=ddp", "trainer.devices=2", "trainer.batch_size=6"], tmp_path, cache_dir,
            tiny_model_dir)

    folders = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(folders) == 1, folders  # the ranks shared the folder rank 0's Hydra made
    ddp_dir = folders[0]
    assert len(list(tmp_path.rglob("metrics.json"))) == 2  # one each: the single run's and the ddp run's
    assert len(list(ddp_dir.rglob(".hydra"))) == 1 and (ddp_dir / "rank_1.log").is_file()
    assert json.loads((ddp_dir / "status.json").read_text())["status"] == "completed"

    single, ddp = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "single", ddp_dir))
    assert (single["train"]["processes"], ddp["train"]["processes"]) == (1, 2)
    assert ddp["train"]["strategy"] == "DDPStrategy"
    # Each rank trained on its half of every batch: the same steps, and (summed over ranks) the same tokens.
    assert ddp["train"]["steps"] == single["train"]["steps"] == 40
    assert ddp["train"]["tokens"] == single["train"]["tokens"]
    assert single["run"]["n_test"] == ddp["run"]["n_test"] == 30
    # The same batches; the loss differs only in averaging (two halves' means, not one mean over all tokens) and
    # float order, so the paths stay close. Tolerance: 0.1 accuracy.
    for split in ("tuned", "val"):
        one, two = single["results"][split]["accuracy"], ddp["results"][split]["accuracy"]
        assert one >= 0.9 and two >= 0.9 and abs(one - two) <= 0.1, (split, one, two)

    digests = split_digests(ddp_dir)  # both ranks logged the split they drew: the same one
    assert set(digests) == {"__main__.log", "rank_1.log"} and len(set(digests.values())) == 1


def test_a_ddp_grid_gives_each_job_its_own_ranks_folder_and_split(tmp_path, cache_dir, tiny_model_dir):
    llmtune(["-m", "trainer=ddp", "trainer.devices=2", "trainer.max_epochs=1", "dataset.split.train_per_class=8",
             "dataset.split.test_per_class=4", "eval.baseline=false", "seed=1,2"], tmp_path, cache_dir,
            tiny_model_dir)
    jobs = sorted(p for p in (tmp_path / "outputs" / "multirun").glob("*/*/*") if p.is_dir())
    assert [p.name[0] for p in jobs] == ["0", "1"], jobs
    digests = []
    for job in jobs:
        summary = json.loads((job / "metrics.json").read_text())
        assert summary["train"]["processes"] == 2 and summary["run"]["seed"] == int(job.name[0]) + 1
        ranks = split_digests(job)
        assert set(ranks) == {"__main__.log", "rank_1.log"} and len(set(ranks.values())) == 1
        digests.append(next(iter(ranks.values())))
    assert digests[0] != digests[1]  # each job's ranks ran that job (its seed), not the grid's first
    # Rank 1 of the second job was not left waiting for the first job's peers: both finished.
    assert all(json.loads((job / "status.json").read_text())["status"] == "completed" for job in jobs)


def test_a_qlora_ddp_run_resumes_from_its_checkpoint_on_every_rank(tmp_path, cache_dir, tiny_model_dir):
    """QLoRA under ddp (each rank holds its own 4-bit base), killed after its first epoch and continued."""
    common = ["method=qlora", "trainer=ddp", "trainer.devices=2", "dataset.split.train_per_class=8",
              "dataset.split.test_per_class=4", "eval.baseline=false", "hydra.run.dir=run"]
    llmtune([*common, "trainer.max_epochs=1"], tmp_path, cache_dir, tiny_model_dir)
    first = json.loads((tmp_path / "run" / "metrics.json").read_text())["train"]
    llmtune(["resume=run", "trainer.max_epochs=2"], tmp_path, cache_dir, tiny_model_dir)
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    second = summary["train"]
    assert second["resumed_from_step"] == first["steps"] > 0
    assert second["steps"] == 2 * first["steps"] and second["processes"] == 2
    assert summary["run"]["method"] == "qlora" and (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("kind", ["pooled", "packed"])
def test_the_ranks_share_every_batch_of_one_draw(monkeypatch, world, kind):
    lengths = [5 + (i * 7) % 23 for i in range(61)]

    def sampler():
        return (batching.LengthPoolBatchSampler(lengths, 4, 3, seed=7) if kind == "pooled"
                else batching.PackedBatchSampler(lengths, 4, 40, seed=7))

    whole = list(sampler())
    shares = []
    for rank in range(world):
        monkeypatch.setattr(batching, "shard", lambda rank=rank: (rank, world))
        drawn = sampler()
        shares.append(list(drawn))
        assert len(drawn) == len(shares[-1])  # what Lightning plans with is what it gets
    assert len({len(share) for share in shares}) == 1  # every rank steps as often as the others
    kept = [batch for batch in whole if len(batch) >= world]
    assert len(kept) >= len(whole) - 1 and len(shares[0]) == len(kept)  # at most a short last batch left out
    for step, batch in enumerate(kept):  # step k of every rank: a disjoint part of the one draw's batch k
        parts = [share[step] for share in shares]
        assert sorted(map(repr, sum(parts, []))) == sorted(map(repr, batch)) and all(parts)

    # A checkpoint's position (rank 0's count) puts every rank back at its own next batch.
    monkeypatch.setattr(batching, "shard", lambda: (1, world))
    resumed = sampler()
    resumed.load_state_dict({"epoch": 0, "batches": 2})
    assert list(resumed) == shares[1][2:]


def test_more_processes_than_rows_in_a_batch_is_one_line_before_any_work(tmp_path, cache_dir, tiny_model_dir):
    env = {**os.environ, "LLMTUNE_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "llmtune", "model=tiny", "trainer=ddp", "trainer.devices=4",
                             "trainer.batch_size=2"], cwd=tmp_path, capture_output=True, text=True, env=env,
                            timeout=300, check=False)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "llmtune: error: trainer.batch_size=2 is smaller than the 4 processes of trainer.devices=4 x "
        "trainer.num_nodes=1; each needs a share of every batch: set trainer.batch_size to 4 or more"]


def test_fsdp_preset_wraps_each_decoder_layer_of_the_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from llmtune.training.strategies import LayerWiseFSDP, decoder_layer_classes

    cfg = compose_config(["model=tiny", "trainer=fsdp"])
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, LayerWiseFSDP)
    assert strategy.kwargs["use_orig_params"] is True and cfg.trainer.precision == "bf16-mixed"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules="all-linear"))
    assert decoder_layer_classes(model) == {LlamaDecoderLayer}


@pytest.mark.parametrize("preset, stage", [("deepspeed_zero2", 2), ("deepspeed_zero3", 3)])
def test_deepspeed_presets_are_arguments_of_lightnings_strategy(preset, stage):
    """DeepSpeed is not installed here (it needs CUDA to be useful): the preset's options are checked against the
    strategy's signature, as instantiating it would."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    cfg = compose_config(["model=tiny", f"trainer={preset}"])
    options = {k: v for k, v in cfg.trainer.strategy.items() if k != "_target_"}
    assert cfg.trainer.strategy._target_ == "lightning.pytorch.strategies.DeepSpeedStrategy"
    inspect.signature(DeepSpeedStrategy).bind(**options)
    assert options["stage"] == stage


def test_every_preset_keeps_the_default_trainer_settings():
    default = compose_config(["model=tiny"]).trainer
    for preset in ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"):
        trainer = compose_config(["model=tiny", f"trainer={preset}"]).trainer
        changed = {key for key in trainer if trainer.get(key) != default.get(key)}
        assert changed <= {"strategy", "devices", "precision", "select"}, (preset, changed)
        assert trainer.select == ("last" if preset.startswith("deepspeed") else "best")
        assert trainer.use_distributed_sampler is False  # the samplers shard themselves
