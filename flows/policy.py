"""What a deployment run may choose: the trust boundary between a Prefect API caller and the serving host.

`muse serve` fixes the policy for every run it executes and hands it to them through the
environment (`MUSE_DEPLOYMENT_POLICY`, inherited by the run processes; set it on a work pool's
workers the same way). A run under a policy uses the served store only, reads sources only
under the allowed folders (the demo always), takes no config file, and sets only the override
keys the server allows (by prefix). `muse run` has no policy: its caller already owns the host.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from muse.config import ConfigError, parse_override

POLICY_ENV = "MUSE_DEPLOYMENT_POLICY"


@dataclass(frozen=True)
class DeploymentPolicy:
    """Fixed when deployments are served; every run is checked against it before anything runs."""

    store: str  # the only store runs use
    sources: tuple[str, ...] = ()  # folders a run's `source` must resolve under
    overrides: tuple[str, ...] = ()  # override key prefixes a run may set, e.g. "train_base.train.steps"

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> "DeploymentPolicy | None":
        text = os.environ.get(POLICY_ENV)
        if not text:
            return None
        data = json.loads(text)
        return cls(data["store"], tuple(data["sources"]), tuple(data["overrides"]))

    def check(self, store: str | None, config_file: str | None, overrides: list[str]) -> str:
        """The store the run uses; a ConfigError naming the refused parameter (never echoing file contents)."""
        if store not in (None, self.store):
            raise ConfigError(f"parameter store: runs of these deployments use {self.store}; it cannot be changed")
        if config_file is not None:
            raise ConfigError("parameter config_file: not accepted from a deployment run; use allowed overrides")
        for text in overrides:
            key = ".".join(parse_override(text)[0])
            if not any(key == p or key.startswith(p.rstrip(".") + ".") for p in self.overrides):
                allowed = ", ".join(self.overrides) or "none (start `muse serve --allow-set KEY`)"
                raise ConfigError(f"parameter overrides: {key} may not be set by a deployment run; allowed: {allowed}")
        return self.store

    def check_source(self, source: str | None) -> None:
        """The run's resolved data source (the `source` parameter or an allowed override) is the demo or lies
        under an allowed folder."""
        if source is None:
            return
        resolved = Path(source).resolve() if "://" not in source else None
        if resolved is None or not any(resolved.is_relative_to(Path(root).resolve()) for root in self.sources):
            allowed = ", ".join(self.sources) or "none (start `muse serve --allow-source DIR`)"
            raise ConfigError(f"parameter source: {source} is not under an allowed source folder: {allowed}")
