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
                           "train-superres", "finetune-decoder", "evaluate"}
    assert params["finetune-decoder"]["target"] == "finetune-decoder"
    assert params["full-train"] == {"target": "full-train", "preset": "tiny", "store": str(tmp_path / "store")}
