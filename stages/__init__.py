"""Pipeline stages: pure Python, one module each, no Prefect and no imports of each other.

Every stage module declares
    NAME          the stage name used by the CLI, the flow and deployments
    INPUTS        artifact kinds it reads
    OUTPUTS       artifact kinds it writes
    CODE_VERSION  bumped whenever the stage's outputs change for the same config and inputs
    config_of(config) -> dict   the resolved config its outputs depend on (part of the version)
    run(config, inputs, store) -> Artifact | list[Artifact]
and may declare
    outputs(config, input_versions)   what each output's version hashes (muse/stage.py)
    preflight(config) -> str          what can be checked before anything runs; raises a UserError
    enabled(config) -> bool           False: full-train skips the stage
    inputs_of(config) -> tuple        the INPUTS it reads under this config (default: all of them)
"""
