"""Training as a deployment of its own (`sao-train/train` in prefect.yaml), on a multi-GPU pool.

    training:
      deployment: sao-train/train      # the round's train task runs this flow there and waits

The launcher inside is the config's (`training.launcher`: accelerate or torchrun with
`training.num_processes` ranks); the output folder is the round's, so a rerun resumes from its last
checkpoint and a finished run is not redone.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from tasks.training import train_model


@flow(name="sao-train", flow_run_name="train")
def train_flow(config_url: str, pairs_url: str, output_url: str) -> dict[str, Any]:
    """Train on `pairs_url` into `output_url` with the round config at `config_url`."""
    return train_model(config_url, pairs_url, output_url)
