import pytest

from muse.config import ConfigError, PipelineConfig, dump_config, load_config, parse_override, preset_names


def test_presets_load_and_validate():
    assert {"tiny", "muse-256", "muse-512"} <= set(preset_names())
    for name in preset_names():
        cfg = load_config(name)
        assert isinstance(cfg, PipelineConfig) and cfg.preset == name
    tiny = load_config("tiny")
    assert tiny.train_vqgan.low.token_side == 16 and tiny.train_vqgan.high.token_side == 16
    big = load_config("muse-256")
    assert big.train_vqgan.low.downsample == 16 and big.train_vqgan.low.token_side == 16
    assert big.train_vqgan.high.token_side == 64 and big.train_vqgan.high.codebook_size == 8192
    for name in ("muse-256", "muse-512"):  # the transformers sample from an EMA of their weights, as aMUSEd does
        cfg = load_config(name)
        assert cfg.train_base.train.ema_decay == cfg.train_superres.train.ema_decay == 0.9999
    assert tiny.train_base.train.ema_decay == 0  # not at the demo's 2000 steps: an EMA that long would lag


def test_overrides_are_typed_and_applied():
    cfg = load_config("tiny", overrides=["train_base.train.lr=3e-4", "segment.segmenters=[masks, human]"])
    assert cfg.train_base.train.lr == pytest.approx(3e-4)
    assert cfg.segment.segmenters == ["masks", "human"]
    assert parse_override("shard.source=data/x.tar") == (["shard", "source"], "data/x.tar")


@pytest.mark.parametrize(
    "override, message",
    [
        ("train_base.foo=1", "unknown key train_base.foo"),
        ("train_base.train.lr=abc", "train_base.train.lr: Input should be a valid number"),
        ("train_vqgan.high.resolution=100", "not divisible by the downsampling factor 8"),
        ("shard.val_fraction=1.5", "shard.val_fraction"),
        ("nosection.key=1", "unknown key nosection"),
        ("novalue", "expected section.key=value"),
        ("train_base.train.lr=.inf", "train_base.train.lr: Input should be a finite number"),
        ("train_base.train.steps=true", "steps needs a number, got True"),
        ("segment.segmenters=sometimes", "segment.segmenters"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides=[override])
    assert message in str(e.value)
    assert len(str(e.value).splitlines()) == 1


def test_config_file_merges_over_preset_and_errors_name_the_file(tmp_path):
    good = tmp_path / "mine.yaml"
    good.write_text("train_base:\n  train:\n    steps: 7\n")
    cfg = load_config("tiny", config_file=good)
    assert cfg.train_base.train.steps == 7
    assert cfg.train_base.model.dim == load_config("tiny").train_base.model.dim  # untouched keys survive

    bad = tmp_path / "bad.yaml"
    bad.write_text("train_base: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_config("tiny", config_file=bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("shard:\n  samples_per_shrd: 3\n")
    with pytest.raises(ConfigError, match="typo.yaml: unknown key shard.samples_per_shrd"):
        load_config("tiny", config_file=typo)
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config("nope")
    twice = tmp_path / "twice.yaml"
    twice.write_text("train_base:\n  train: {steps: 3}\n  train: {steps: 4}\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: invalid YAML at line 3, column 3: duplicate key 'train'"):
        load_config("tiny", config_file=twice)
    secret = tmp_path / "credentials.yaml"
    secret.write_text("aws_access_key_id: AKIAEXAMPLESECRET\n  oops: [\n")
    with pytest.raises(ConfigError) as e:
        load_config("tiny", config_file=secret)
    assert "AKIAEXAMPLESECRET" not in str(e.value) and "credentials.yaml: invalid YAML at line 2" in str(e.value)


def test_dump_round_trips():
    cfg = load_config("tiny", overrides=["demo.seed=5"])
    import yaml

    again = PipelineConfig.model_validate(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


def test_a_tokenizer_knob_its_quantizer_or_architecture_ignores_leaves_the_version_alone():
    from muse.stage import output_versions
    from muse.stages import train_vqgan

    def version(*overrides):
        cfg = load_config("tiny", overrides=list(overrides))
        return output_versions(train_vqgan, cfg, {"shards": "s", "segments": "g"})["vqgan-low"]

    fsq = ("train_vqgan.low.quantizer=fsq", "train_vqgan.low.codebook_size=1000")
    assert version(*fsq) == version(*fsq, "train_vqgan.low.kmeans_init=false", "train_vqgan.low.code_dim=8")
    assert version(*fsq) != version(*fsq[:1], "train_vqgan.low.fsq_levels=[10, 10, 10]", fsq[1])
    assert version() == version("train_vqgan.low.fsq_levels=[4, 4, 4, 4]")
    assert version() != version("train_vqgan.low.kmeans_init=false") != version(*fsq)
    assert version() == version("train_vqgan.low.mid_block=false")  # vqvae (the tiny preset) has no middle block
    assert version("train_vqgan.low.arch=taming") != version("train_vqgan.low.arch=taming",
                                                             "train_vqgan.low.mid_block=false")


def test_each_tokenizer_is_versioned_on_what_it_reads():
    """Re-segmenting or changing the scene tokenizer leaves the image tokenizers (and what is made from them)
    alone; changing one image tokenizer leaves the other; knobs that do not change weights change no version."""
    from muse.stage import output_versions
    from muse.stages import train_base, train_vqgan

    def versions(*overrides, segments="g"):
        return output_versions(train_vqgan, load_config("tiny", overrides=list(overrides)),
                               {"shards": "s", "segments": segments})

    base = versions()
    assert len(set(base.values())) == 3
    for changed in (versions("train_vqgan.seg.codebook_size=64"), versions(segments="other"),
                    versions("train_vqgan.overrides.seg.steps=9")):
        assert changed["vqgan-low"] == base["vqgan-low"] and changed["vqgan-high"] == base["vqgan-high"]
        assert changed["vqseg"] != base["vqseg"]
    high = versions("train_vqgan.high.codebook_size=128")
    assert high["vqgan-low"] == base["vqgan-low"] and high["vqgan-high"] != base["vqgan-high"]
    assert versions("train_vqgan.train.log_every=7", "train_vqgan.train.checkpoint_every=9") == base
    assert versions("train_vqgan.loss.l1_weight=2")["vqseg"] == base["vqseg"]  # the scene tokenizer has no such loss

    def base_version(*overrides):
        return output_versions(train_base, load_config("tiny", overrides=list(overrides)), {"tokens": "t"})["base"]

    assert base_version("train_base.train.checkpoint_every=7", "train_base.train.compile=true",
                        "train_base.train.peak_tflops=989") == base_version()
    assert base_version("train_base.train.lr=0.01") != base_version()


def test_gpus_puts_every_training_stage_on_gpu_workers_and_set_still_wins():
    from muse.config import WorkersConfig, gpu_workers

    cfg = load_config("tiny", overrides=gpu_workers(4) + ["train_prior.workers.num_workers=1"])
    sections = {name for name in PipelineConfig.model_fields
                if isinstance(getattr(getattr(cfg, name), "workers", None), WorkersConfig)}
    assert sections == {"train_vqgan", "train_base", "train_superres", "finetune_decoder", "train_clip",
                        "train_guide", "train_prior"}
    for name in sections - {"train_prior"}:
        assert getattr(cfg, name).workers.num_workers == 4 and getattr(cfg, name).workers.use_gpu
    assert cfg.train_prior.workers.num_workers == 1  # a later --set wins
    assert load_config("tiny").train_base.workers.num_workers == 1  # the negative control: no --gpus, one worker
    with pytest.raises(ConfigError, match="--gpus 0"):
        gpu_workers(0)
