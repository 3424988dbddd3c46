"""Deployments muse/full-train and muse/<stage> register against a real Prefect API."""

import asyncio

from muse.flows.dag import STAGES
from muse.flows.deployments import build_deployments


def test_deployments_register_with_expected_names(prefect_api, tmp_path):
    from prefect.client.orchestration import get_client

    deployments = build_deployments(store=str(tmp_path / "store"))
    for d in deployments:
        d.apply()

    async def read():
        async with get_client() as client:
            out = {}
            for name in ["full-train", *STAGES]:
                dep = await client.read_deployment_by_name(f"muse/{name}")
                out[name] = dep.parameters
            return out

    params = asyncio.run(read())
    assert set(params) == {"full-train", "shard", "segment", "train-vqgan", "tokenize", "train-base",
                           "train-guide", "train-superres", "finetune-decoder", "evaluate", "train-clip", "train-prior"}
    assert params["finetune-decoder"]["target"] == "finetune-decoder"
    assert params["full-train"] == {"target": "full-train", "preset": "tiny", "store": str(tmp_path / "store")}


def test_a_deployment_run_is_held_to_the_served_policy(prefect_api, tmp_path, monkeypatch):
    """Under `muse serve`'s policy a caller cannot move the store, read host files, pass a config file or set
    keys the server did not allow; each refusal is the run's one-line Failed message and nothing runs."""
    import pytest
    from prefect.exceptions import FailedRun

    from muse.flows.pipeline import muse
    from muse.flows.policy import POLICY_ENV, DeploymentPolicy

    store, data = tmp_path / "store", tmp_path / "data"
    data.mkdir()
    policy = DeploymentPolicy(str(store), (str(data),), ("demo.", "train_base.train.steps", "shard"))
    monkeypatch.setenv(POLICY_ENV, policy.to_env())
    refused = [
        ({"store": "memory://attacker"}, r"parameter store: runs of these deployments use"),
        ({"source": "/etc"}, r"parameter source: /etc is not under an allowed source folder"),
        ({"source": str(data / ".." / "elsewhere")}, r"is not under an allowed source folder"),
        ({"config_file": "/root/.aws/credentials"}, r"parameter config_file: not accepted"),
        ({"overrides": ["ray.address=ray://attacker:10001"]}, r"ray.address may not be set by a deployment run"),
        ({"overrides": ["shard.source=/etc"]}, r"parameter source: /etc is not under an allowed source folder"),
    ]
    for params, message in refused:
        with pytest.raises(FailedRun, match=message):
            muse(target="shard", **params)
    assert not store.exists()
    muse(target="shard", overrides=["demo.num_samples=4", "train_base.train.steps=2"])  # allowed keys
    assert (store / "shards").is_dir()
