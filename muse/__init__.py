"""muse-pipeline: train Muse-style masked text-to-image transformers, end to end.

Import map: `muse.config` (presets and pydantic models), `muse.artifacts` (the
versioned store), `muse.datasets` (data formats, demo data), `muse.stages`
(one module per pipeline stage), `muse.flows` (the Prefect DAG), `muse.cli`.
"""

__version__ = "0.1.0"


def from_pretrained(directory):
    """The model of a folder written by `muse export` (see `muse.export`)."""
    from muse.export import load

    return load(directory)
