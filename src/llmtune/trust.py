"""What a run folder may make llmtune do. A run's config.yaml names classes to instantiate (`_target_`) and a model to
load; a folder someone sends you must not run code of their choosing. Loading a run instantiates only llmtune's own
components and torch's optimizers, and never honours trust_remote_code, unless the command line says
trust_remote_code=true."""

from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig

from llmtune.errors import UserError

TRUSTED_PREFIXES = ("llmtune.", "torch.optim.", "transformers.", "lightning.pytorch.", "bitsandbytes.optim.")


def targets(node) -> list[str]:
    """Every `_target_` in a config subtree."""
    if isinstance(node, DictConfig):
        own = [str(node["_target_"])] if "_target_" in node else []
        return own + [t for key in node.keys() if key != "_target_" for t in targets(node._get_node(key))]
    if isinstance(node, ListConfig):
        return [t for item in node for t in targets(item)]
    return []


def instantiate_trusted(node: DictConfig, trust_remote_code: bool = False, **kwargs):
    """instantiate(node) if every class it names is llmtune's own (or torch's optimizers, ...); else one error line."""
    foreign = [t for t in targets(node) if not t.startswith(TRUSTED_PREFIXES)]
    if foreign and not trust_remote_code:
        raise UserError(f"the run's config.yaml names {', '.join(foreign)}, which is not an llmtune component; "
                        "loading it would run that code: pass trust_remote_code=true if you trust who made the run")
    return instantiate(node, **kwargs)


def check_run_is_trusted(cfg: DictConfig, run_dir, trust_remote_code: bool) -> None:
    """A run folder's config.yaml that asks for remote code, or names a model folder of its own choosing, is loaded
    only when the command line says trust_remote_code=true."""
    if trust_remote_code:
        return
    if cfg.model.get("trust_remote_code"):
        raise UserError(f"{run_dir} was made with model.trust_remote_code=true: loading it runs Python code from its "
                        "model's files; pass trust_remote_code=true if you trust who made the run")
    if cfg.model.get("path"):
        raise UserError(f"{run_dir} loads its base model from model.path={cfg.model.path}, a folder its config.yaml "
                        "names; pass trust_remote_code=true if you trust who made the run")
