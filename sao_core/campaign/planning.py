"""Planning a campaign's next round: which round it is and which model it starts from.

A campaign's rounds live under {root}/{campaign}/round_{k:03d}-{hash}; the next round starts from the model
the ledger's CURRENT names (a full model folder, or a base plus an adapter), else from the recipe's model.
"""

from __future__ import annotations

from sao_core.campaign.ledger import current
from sao_core.config import RoundConfig
from sao_core.errors import ConfigError, ModelNotFoundError
from sao_core.store import storage
from sao_core.store.layout import load_config
from sao_core.store.storage import normalise_url, parent_url
from sao_core.store.trained import finished_run


def campaign_of_round(round_dir: str) -> tuple[str, str]:
    """(root, campaign) of a round folder {root}/{campaign}/round_{k:03d}-{hash}."""
    campaign_dir = parent_url(normalise_url(round_dir))
    root, _, campaign = campaign_dir.rpartition("/")
    return root, campaign


def round_model(round_dir: str) -> str:
    """The output folder of the round's finished training run: {round}/model/{training hash of its
    resolved config}, else the one finished run under {round}/model/. ModelNotFoundError if none or several."""
    from sao_core.training.outputs import training_hash

    round_dir = normalise_url(round_dir)
    models = storage.join(round_dir, "model")
    expected: str | None
    try:
        cfg = load_config(storage.join(round_dir, "resolved_config.yaml"))
        expected = storage.join(models, training_hash(cfg))
    except ConfigError:  # a round written under older config keys: look for its runs instead
        expected = None
    if expected and finished_run(expected) is not None:
        return expected
    storage.forget_listing(models)
    found = [
        normalise_url(parent_url(m))
        for m in storage.list_files(models, "*/manifest.json")
        if finished_run(parent_url(m))
    ]
    if len(found) == 1:
        return found[0]
    if not found:
        raise ModelNotFoundError(
            f"round {round_dir} has no finished training run under {models}/: train it first "
            "(sao run, or sao train), or name the model"
        )
    raise ModelNotFoundError(
        f"round {round_dir} has {len(found)} trained models ({', '.join(found)}): name one"
    )


def start_model(cfg: RoundConfig) -> tuple[str, str | None]:
    """(model.path, model.adapter) of the model round cfg.run.round starts from (SAO.md step 7): round 1
    from the config's model; a later round from the campaign's current promotion, or from the config's
    model while nothing has been promoted (every round so far failed its gate)."""
    if cfg.run.round > 1:
        promoted = current(cfg.run.root, cfg.run.campaign)
        if promoted is not None:
            return promoted.model_path, promoted.model_adapter
    return cfg.model.path, cfg.model.adapter
