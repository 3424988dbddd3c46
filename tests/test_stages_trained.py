"""train-base, train-superres, finetune-decoder, evaluate and `muse generate` on the session's small store."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from muse import generate, sampling
from muse.cli import main
from muse.generate import TextToImage
from muse.labelled_grid import LINE_HEIGHT, MIN_CELL
from muse.models.transformer import load_transformer
from muse.models.vqgan import from_pretrained, load_decoder
from muse.stage import execute
from muse.stages.finetune_decoder import tokenizer_digest


def test_transformer_artifacts(trained_store):
    _, _, arts = trained_store
    for kind, target in (("base", "tokens_low"), ("superres", "tokens_high")):
        m = arts[kind].manifest.metrics
        assert m["steps"] == 4 and 0 <= m["val_masked_acc"] <= 1 and "train_masked_acc" in m
        side = 4
        assert m["train_tokens_per_s"] == pytest.approx(m["train_samples_per_s"] * side * side, rel=1e-3)
        assert m["train_flops_per_s"] > m["train_tokens_per_s"] and "train_mfu" not in m  # no peak_tflops set
        model, config = load_transformer(arts[kind].path)
        assert config["target"] == target and model.spec.side == 4
        assert (arts[kind].path / "tensorboard").is_dir()
        # a sample grid at the final checkpoint: 2 rows (samples, reconstructions) of up to 8 images, each 32 px
        # scaled to 96, with a label column and a caption band
        grid = np.asarray(Image.open(arts[kind].path / "previews" / "samples-step-0000004.png"))
        assert grid.shape[0] == 2 * MIN_CELL + 3 * LINE_HEIGHT + 6 and grid.std() > 0
        assert (grid[2 * MIN_CELL:] < 100).any() and (grid[:, :40] < 100).any()  # caption text, row names
    assert load_transformer(arts["superres"].path)[0].spec.cond_codebook_size > 0


def test_decoder_is_larger_and_the_tokenizer_is_untouched(trained_store):
    _, _, arts = trained_store
    decoder = load_decoder(arts["decoder"].path)
    tokenizer = from_pretrained(arts["vqgan-high"].path)
    old = sum(p.numel() for n, p in tokenizer.named_parameters() if n.startswith("decoder."))
    assert sum(p.numel() for p in decoder.decoder.parameters()) > old
    config = json.loads((arts["decoder"].path / "config.json").read_text())
    assert config["tokenizer_sha256"] == tokenizer_digest(tokenizer)  # bit-identical encoder and codebook
    m = arts["decoder"].manifest.metrics
    assert {"old_psnr", "new_psnr", "psnr_gain"} <= set(m) and m["initialised_tensors"] > 0
    assert (arts["decoder"].path / "previews" / "input-old-new.png").is_file()
    assert arts["decoder"].manifest.details["lpips"].startswith("off: no loss.vgg_weights")


def test_report_has_the_figures_and_the_lineage(trained_store):
    _, _, arts = trained_store
    m = arts["report"].manifest.metrics
    assert m["prompts"] == 4 and m["prompt_split"] == "val"
    for part in ("colour", "shape", "position"):
        assert 0 <= m[f"alignment_{part}"] <= 1
    assert "random" in m["clip_weights"] and m["fid"] is None and "inception" in m["fid_skipped"]
    assert m["vqgan-low_val_psnr"] == arts["vqgan-low"].manifest.metrics["psnr"]
    lineage = arts["report"].manifest.details["lineage"]
    assert lineage["decoder"] == arts["decoder"].version and lineage["base"] == arts["base"].version
    assert len(list((arts["report"].path / "samples").glob("*.png"))) == 4
    # each link of the chain graded on the val images' own tokens, in the report and as a Prefect table
    links = json.loads((arts["report"].path / "report.json").read_text())["alignment_by_link"]
    assert [r["link"] for r in links] == ["base samples through the vqgan-low decoder", "vqgan-low reconstruction",
                                          "vqgan-high reconstruction", "decoder on true high-res tokens",
                                          "super-res from true low-res tokens"]
    assert all(r["images"] == 4 and all(0 <= r[p] <= 1 for p in ("colour", "shape", "position")) for r in links)
    assert arts["report"].manifest.details["tables"]["alignment-by-link"] == links


def test_the_base_link_grades_the_very_samples_the_report_generated(trained_store):
    from muse.datasets.shards import read_samples
    from muse.stages.evaluate import alignment, grade_samples

    cfg, store, arts = trained_store
    c = cfg.evaluate
    samples = [s for _, s in zip(range(c.num_prompts), read_samples(arts["shards"].path, "val"))]
    pipe = TextToImage.from_store(store, pins={k: arts[k] for k in ("base", "superres", "decoder")})
    tokens = pipe.generate_tokens([s["caption"] for s in samples], sampling=cfg.sampling,
                                  seed=c.seed)
    # the report's samples are these tokens decoded: the base row must come from the same draw
    saved = [np.asarray(Image.open(arts["report"].path / "samples" / f"{s['key']}.png")) for s in samples]
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(saved, generate.to_images(pipe.decode_tokens(tokens))))
    side = pipe.vq_low.cfg.token_side
    with torch.no_grad():
        low_images = generate.to_images(pipe.vq_low.decode_codes(tokens["tokens_low"].view(-1, side, side)))
    base_row = json.loads((arts["report"].path / "report.json").read_text())["alignment_by_link"][0]
    assert base_row == {"link": "base samples through the vqgan-low decoder", "images": len(samples),
                        **alignment(grade_samples(low_images, samples))}


def test_a_random_weight_clip_score_is_the_same_for_the_same_images(trained_store):
    from muse.datasets.shards import read_samples
    from muse.stages.evaluate import clip_score

    cfg, _, arts = trained_store
    samples = [s for _, s in zip(range(cfg.evaluate.num_prompts), read_samples(arts["shards"].path, "val"))]
    images = [Image.open(arts["report"].path / "samples" / f"{s['key']}.png").convert("RGB") for s in samples]
    torch.manual_seed(1234)  # whatever the global RNG holds, the random CLIP weights come from the report's seed
    again = clip_score(images, [s["caption"] for s in samples], cfg.evaluate, torch.device("cpu"))
    assert again["clip_score"] == arts["report"].manifest.metrics["clip_score"] and "random" in again["clip_weights"]


def test_same_seed_same_image_and_the_finetuned_decoder_is_used(trained_store):
    cfg, store, arts = trained_store
    pipe = TextToImage.from_store(store)
    assert pipe.decoder is not None and pipe.lineage["decoder"] == arts["decoder"].version
    a = pipe.generate_tokens(["a red circle on the left"], steps=4, superres_steps=2, seed=5)
    b = pipe.generate_tokens(["a red circle on the left"], steps=4, superres_steps=2, seed=5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # its own super-res guidance: the base tokens stay, the super-res pass samples under 2
    scales = []
    original_decode = sampling.decode
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(generate, "decode", lambda model, *args, **kw: scales.append(args[4].guidance_scale)
                   or original_decode(model, *args, **kw))
        c = pipe.generate_tokens(["a red circle on the left"], steps=4, superres_steps=2, seed=5,
                                 superres_guidance_scale=2.0)
    assert torch.equal(c["tokens_low"], a["tokens_low"])
    assert scales == [cfg.sampling.base.guidance_scale, 2.0] and cfg.sampling.superres.guidance_scale != 2.0
    images = pipe(["a red circle on the left"], steps=4, superres_steps=2)
    assert images[0].size == (32, 32)


def test_superres_alone_from_given_low_res_tokens(trained_store):
    _, store, _ = trained_store
    pipe = TextToImage.from_store(store)
    low = torch.randint(0, pipe.vq_low.cfg.codebook_size, (2, 16), generator=torch.Generator().manual_seed(0))
    out = pipe.generate_tokens(["a red circle", "a blue square"], superres_steps=2, tokens_low=low, seed=1)
    assert torch.equal(out["tokens_low"], low) and out["tokens_high"].shape == (2, 16)
    other = pipe.generate_tokens(["a red circle", "a blue square"], superres_steps=2, tokens_low=low.flip(0), seed=1)
    assert not torch.equal(other["tokens_high"], out["tokens_high"])  # the given grids condition super-res
    with pytest.raises(ValueError, match=r"tokens_low has shape \(2, 15\)"):
        pipe.generate_tokens(["a red circle", "a blue square"], tokens_low=low[:, :15])


def test_generate_cli_with_a_prompts_file(trained_store, tmp_path, capsys):
    _, store, _ = trained_store
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "red", "prompt": "a red circle"}\n{"id": "blue", "prompt": "a blue square", '
                       '"negative": "red", "seed": 3}\n')
    out = tmp_path / "out"
    assert main(["generate", "--prompts", str(prompts), "--out", str(out), "--steps", "3", "--superres-steps", "2",
                 "--store", str(store.root)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["blue.png", "red.png"]
    assert main(["generate", "a green triangle", "--out", str(out), "--steps", "2", "--no-superres",
                 "--store", str(store.root)]) == 0
    assert (out / "0000.png").is_file()
    halton = tmp_path / "halton"
    assert main(["generate", "a green triangle", "--out", str(halton), "--steps", "2", "--no-superres", "--order",
                 "halton", "--store", str(store.root)]) == 0
    assert (halton / "0000.png").read_bytes() != (out / "0000.png").read_bytes()  # the flag reaches the sampler
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "prompt": "ok"}\n{"prompt": "no id"}\n')
    assert main(["generate", "--prompts", str(bad), "--store", str(store.root)]) == 2
    assert f"{bad}:2: field 'id'" in capsys.readouterr().err


def test_new_decoder_beats_the_old_one_on_val_after_a_short_run(pipeline_store, tmp_path):
    """On codes that carry signal: a 4-step tokenizer's codes let a decoder only memorise the 18 training
    images of the session store, so this test trains its own high-res tokenizer on 96 images first."""
    from muse.artifacts.store import ArtifactStore
    from muse.config import TrainOverride
    from muse.stages import finetune_decoder, segment, shard, train_vqgan

    cfg, _, arts = pipeline_store
    cfg = cfg.model_copy(update={
        "demo": cfg.demo.model_copy(update={"num_samples": 96}),
        "train_vqgan": cfg.train_vqgan.model_copy(update={"overrides": {"high": TrainOverride(steps=100, batch_size=8)}}),
        "finetune_decoder": cfg.finetune_decoder.model_copy(update={"superres_rows": 0,  # the tokenizer's codes
            "train": cfg.finetune_decoder.train.model_copy(update={"steps": 60, "batch_size": 4, "lr": 3e-4})})})
    upstream = ArtifactStore(tmp_path / "upstream")
    shards = execute(shard, cfg, {}, upstream)
    segments = execute(segment, cfg, {"shards": shards}, upstream)
    tokenizers = {a.kind: a for a in execute(train_vqgan, cfg, {"shards": shards, "segments": segments}, upstream)}
    store = ArtifactStore(tmp_path / "store")
    out = execute(finetune_decoder, cfg, {"shards": shards, "vqgan-high": tokenizers["vqgan-high"]}, store)
    m = out.manifest.metrics
    assert m["new_psnr"] > m["old_psnr"] + 0.2, m  # deterministic on CPU: 16.65 -> 17.09 dB here
    assert store.kinds() == ["decoder"]  # nothing else was written  # nothing else was written


def test_a_decoder_learns_superres_codes_when_asked_and_its_pairs_repeat(trained_store, tmp_path):
    """`finetune_decoder.superres_rows`: super-res and tokens join the decoder's inputs and version, and it trains
    on other codes than the tokenizer's: super-res's samples for the train images, which repeat exactly for a seed
    (a resumed run trains on the same pairs). What it buys end to end is measured in bench/ (a 4-step super-res's
    codes carry too little to show it here)."""
    from muse.artifacts.store import ArtifactStore
    from muse.datasets.decode import image_decoder
    from muse.datasets.shards import shard_files
    from muse.lora import load_trained
    from muse.stages import finetune_decoder
    from muse.superres_codes import write_pairs

    cfg, _, arts = trained_store
    store = ArtifactStore(tmp_path / "store")

    def run(rows: int):
        section = cfg.finetune_decoder.model_copy(update={"superres_rows": rows})
        config = cfg.model_copy(update={"finetune_decoder": section})  # given the inputs it reads, as the flow does
        return execute(finetune_decoder, config, {k: arts[k] for k in finetune_decoder.inputs_of(config)}, store)

    learnt, control = run(64), run(0)
    assert learnt.manifest.inputs["superres"] == arts["superres"].version
    assert learnt.manifest.inputs["tokens"] == arts["tokens"].version and "superres" not in control.manifest.inputs
    assert learnt.version != control.version
    weights = [load_decoder(a.path).state_dict() for a in (learnt, control)]
    assert not all(torch.equal(v, weights[1][k]) for k, v in weights[0].items())  # trained on other codes
    tokenizer = from_pretrained(arts["vqgan-high"].path)
    superres = load_trained(store, arts["superres"])
    pairs = [tmp_path / f"pairs{i}.npz" for i in range(2)]
    for path in pairs:
        count = write_pairs(superres, arts["superres"].path, arts["tokens"].path,
                            shard_files(arts["shards"].path, "train"), image_decoder(tokenizer.cfg.resolution), 64,
                            cfg.finetune_decoder.train.seed, path, torch.device("cpu"))
    first, again = np.load(pairs[0]), np.load(pairs[1])
    assert count == len(first["codes"]) == len(first["images"]) > 8  # every train row of the small store
    assert np.array_equal(first["codes"], again["codes"]) and np.array_equal(first["images"], again["images"])
    images = torch.from_numpy(first["images"]).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        own = tokenizer.encode(images)[1].flatten(1).numpy()  # the tokenizer's codes of the same images
    assert first["codes"].shape == own.shape and first["codes"].max() < tokenizer.cfg.codebook_size
    assert not np.array_equal(first["codes"], own)  # super-res's samples, not the tokenizer's reconstructions
    with pytest.raises(ValueError, match=r"train row key '.*' has no image in the shards' train tars"):
        write_pairs(superres, arts["superres"].path, arts["tokens"].path, [], image_decoder(tokenizer.cfg.resolution),
                    4, 0, tmp_path / "none.npz", torch.device("cpu"))


def test_superres_codes_are_guided_only_when_the_sampler_asks(trained_store):
    """`sample_codes` at guidance 0 (the tiny preset's super-res pass) draws what the conditional branch alone draws,
    and a positive scale changes the codes (the control: the unconditional branch is really used when asked)."""
    from muse.contracts import TokensSchema
    from muse.datasets.tokens import TokenTable, collate
    from muse.lora import load_trained
    from muse.superres_codes import sample_codes
    from muse.transformer_training import CaptionMemory

    cfg, store, arts = trained_store
    superres = load_trained(store, arts["superres"])
    schema = TokensSchema.of(arts["tokens"].path)
    table = TokenTable(arts["tokens"].path, "train", ["caption", "tokens_low", "text_emb", "text_len"])
    batch = collate([table[i] for i in range(8)])
    text = CaptionMemory(schema.text.encoder, True, torch.device("cpu"))

    def sampler(scale: float):  # a constant scale from the first step: a few-step model reads the text weakly
        return cfg.sampling.superres.model_copy(update={"guidance_scale": scale, "guidance_schedule": "constant",
                                                        "steps": 8})

    def codes(scale: float) -> torch.Tensor:
        return sample_codes(superres, sampler(scale), batch, text, torch.Generator().manual_seed(0))

    emb, mask = text(batch)
    memory, memory_mask = superres.memory(emb, mask, batch["tokens_low"], None, None)
    alone = sampling.decode(superres, memory, memory_mask, None, None, sampler(0.0), torch.Generator().manual_seed(0))
    assert torch.equal(codes(0.0), alone)
    assert not torch.equal(codes(20.0), alone)


def test_the_text_encoder_that_made_the_tokens_is_the_one_recorded(pipeline_store, tmp_path):
    """Rerunning train-base with another text encoder configured still trains on (and records) the encoder that
    embedded the tokens, so generation encodes prompts the way training saw them."""
    from muse.artifacts.store import ArtifactStore
    from muse.stages import train_base

    cfg, _, arts = pipeline_store
    other = cfg.tokenize.text_encoder.model_copy(update={"kind": "clip", "random_weights": True})
    cfg = cfg.model_copy(update={"tokenize": cfg.tokenize.model_copy(update={"text_encoder": other})})
    store = ArtifactStore(tmp_path / "store")
    base = execute(train_base, cfg, {"tokens": arts["tokens"]}, store)
    _, config = load_transformer(base.path)
    assert config["text_encoder"] == json.loads((arts["tokens"].path / "_schema.json").read_text())["text"]["encoder"]
    assert config["text_encoder"]["kind"] == "minilm"


def test_random_weight_text_encoders_are_the_same_in_every_process():
    from muse.config import TextEncoderConfig
    from muse.models.text import load_text_encoder

    cfg = TextEncoderConfig(kind="clip", random_weights=True, max_length=8)
    torch.manual_seed(123)  # the global RNG's state must not matter
    a, _ = load_text_encoder(cfg).encode(["a red circle"])
    torch.manual_seed(7)
    b, _ = load_text_encoder(cfg).encode(["a red circle"])
    assert torch.equal(a, b)
    c, _ = load_text_encoder(cfg.model_copy(update={"random_seed": 1})).encode(["a red circle"])
    assert not torch.equal(a, c)


def test_generation_defaults_to_the_sampler_settings_the_models_were_trained_with(pipeline_store, tmp_path, capsys):
    """A store trained with a preset's sampler settings (muse-256 guides the base at 4.0) samples with them from the
    Python API and `muse generate`, with no flags; flags still override."""
    import shutil

    from muse.artifacts.store import ArtifactStore
    from muse.stages import train_base, train_superres

    cfg, _, arts = pipeline_store
    cfg = cfg.model_copy(update={"sampling": cfg.sampling.model_validate(
        {"base": {"steps": 5, "guidance_scale": 4.0}, "superres": {"steps": 3, "guidance_scale": 0.5, "top_k": 7}})})
    store = ArtifactStore(tmp_path / "store")
    for kind in ("vqgan-low", "vqgan-high"):  # the tokenizers the transformers name, as a shared store holds them
        store.root.joinpath(kind).mkdir(parents=True)
        shutil.copytree(arts[kind].path, store.root / kind / arts[kind].version)
        (store.root / kind / "latest").write_text(arts[kind].version)
    execute(train_base, cfg, {"tokens": arts["tokens"]}, store)
    execute(train_superres, cfg, {"tokens": arts["tokens"]}, store)
    pipe = TextToImage.from_store(store)
    assert pipe.sampling == cfg.sampling
    default = pipe.generate_tokens(["a red circle on the left"], seed=3)
    explicit = pipe.generate_tokens(["a red circle on the left"], seed=3, sampling=cfg.sampling)
    assert all(torch.equal(default[k], explicit[k]) for k in default)
    out = tmp_path / "out"
    assert main(["generate", "a red circle on the left", "--seed", "3", "--store", str(store.root), "--out", str(out)]) == 0
    assert np.array_equal(np.asarray(Image.open(out / "0000.png")), np.asarray(pipe(["a red circle on the left"], seed=3)[0]))
    assert main(["generate", "a red circle on the left", "--seed", "3", "--steps", "2", "--store", str(store.root),
                 "--out", str(tmp_path / "other")]) == 0
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "other" / "0000.png")),
                              np.asarray(Image.open(out / "0000.png")))


def test_a_longer_run_continues_the_shorter_one_when_the_schedule_allows(pipeline_store, tmp_path, caplog):
    """train-base for 8 steps after a committed 4-step run of the same config resumes at step 4 (constant schedule)
    and ends with exactly the weights of 8 steps from scratch; under a cosine schedule it trains from step 0."""
    import logging

    from safetensors.torch import load_file

    from muse.artifacts.store import ArtifactStore
    from muse.stages import train_base

    cfg, _, arts = pipeline_store

    def trained(store, steps, schedule):
        train = cfg.train_base.train.model_copy(update={"steps": steps, "schedule": schedule, "warmup_steps": 2})
        c = cfg.model_copy(update={"train_base": cfg.train_base.model_copy(update={"train": train})})
        art = execute(train_base, c, {"tokens": arts["tokens"]}, store)
        return art, load_file(str(next(art.path.glob("*.safetensors"))))

    for schedule in ("constant", "cosine"):
        shared, fresh = ArtifactStore(tmp_path / f"{schedule}-shared"), ArtifactStore(tmp_path / f"{schedule}-fresh")
        short, _ = trained(shared, 4, schedule)
        with caplog.at_level(logging.INFO):
            caplog.clear()
            longer, weights = trained(shared, 8, schedule)
        scratch, expected = trained(fresh, 8, schedule)
        assert longer.version == scratch.version and longer.manifest.metrics["steps"] == 8
        assert all(torch.equal(weights[k], expected[k]) for k in expected)  # continuing changed nothing
        resumed = "resumed from" in caplog.text
        if schedule == "constant":
            assert resumed and longer.manifest.details["continued_from"] == f"base:{short.version} at step 4"
        else:
            assert not resumed and "continued_from" not in longer.manifest.details
            assert "training from step 0" in caplog.text


def test_train_base_warm_starts_from_a_trained_base_and_lists_it_in_its_lineage(trained_store, tmp_path):
    """`train_base.init: base:VERSION` begins from that model's weights (a near-zero learning rate leaves them
    there; from random weights it would not), is part of the version and the manifest's inputs; an unknown
    version, another kind or another architecture is refused in one line naming the key."""
    import shutil

    from muse.artifacts.store import ArtifactStore
    from muse.config import ConfigError
    from muse.stages import train_base

    cfg, _, arts = trained_store
    store = ArtifactStore(tmp_path / "store")  # its own: the session's store keeps its latest base
    for kind in ("base", "superres"):
        shutil.copytree(arts[kind].path, store.root / kind / arts[kind].version)
    start = store.get("base", arts["base"].version)
    # another seed than the trained base's: random weights of this run are not those the 4-step base started from
    slow = cfg.train_base.train.model_copy(update={"lr": 1e-12, "warmup_steps": 0, "seed": 1})

    def run(**update):
        section = cfg.train_base.model_copy(update={"train": slow, **update})
        return execute(train_base, cfg.model_copy(update={"train_base": section}), {"tokens": arts["tokens"]}, store)

    warm = run(init=f"base:{start.version}")
    assert warm.version != start.version and warm.manifest.inputs["base"] == start.version
    assert warm.manifest.details["init"] == f"base:{start.version}"
    assert any(line.startswith(f"base v1 ({start.version})") for line in store.made_from(warm))
    original = load_transformer(start.path)[0].state_dict()
    assert all(torch.allclose(v, original[k], atol=1e-6) for k, v in load_transformer(warm.path)[0].state_dict().items())
    cold = run()  # the same near-zero rate from random weights: far from the trained ones
    assert not all(torch.allclose(v, original[k], atol=1e-3) for k, v in load_transformer(cold.path)[0].state_dict().items())

    with pytest.raises(ConfigError, match=r"train_base.init 'base:000000000000': no such artifact"):
        run(init="base:000000000000")
    with pytest.raises(ConfigError, match=r"train_base.init 'superres:.*': this trains a base model"):
        run(init=f"superres:{arts['superres'].version}")
    wider = cfg.train_base.model.model_copy(update={"dim": 48})
    with pytest.raises(ConfigError, match=r"train_base.init .*architecture is not the one this run builds \(dim 32 != 48"):
        run(init=f"base:{start.version}", model=wider)


def test_lora_trains_only_the_adapters_and_loads_back_on_its_base(trained_store, tmp_path):
    """`train_base.lora` on top of `init` trains the adapters alone (every other weight of the base stays
    bit-identical), commits only them, and loads back on its base, in the sampler and with plain peft."""
    import shutil

    from safetensors.torch import load_file

    from muse.artifacts.store import ArtifactStore
    from muse.config import LoraConfig
    from muse.lora import ADAPTER_WEIGHTS, adapter_state, load_adapter, load_trained
    from muse.stages import train_base

    cfg, _, arts = trained_store
    store = ArtifactStore(tmp_path / "store")
    for kind in ("base", "vqgan-low"):
        shutil.copytree(arts[kind].path, store.root / kind / arts[kind].version)
    start = store.get("base", arts["base"].version)
    section = cfg.train_base.model_copy(update={"init": start.ref, "lora": LoraConfig(rank=2)})
    lora = execute(train_base, cfg.model_copy(update={"train_base": section}), {"tokens": arts["tokens"]}, store)

    assert not (lora.path / "model.safetensors").exists() and lora.manifest.inputs["base"] == start.version
    size = (lora.path / ADAPTER_WEIGHTS).stat().st_size
    assert size < (start.path / "model.safetensors").stat().st_size / 4
    m = lora.manifest.metrics
    assert 0 < m["trained_parameters"] < m["parameters"] / 4
    # unmerged: the base's weights untouched, the adapters trained away from peft's B = 0 start
    base_state = load_transformer(start.path)[0].state_dict()
    unmerged = load_adapter(load_transformer(start.path)[0], lora.path)
    for name, value in unmerged.state_dict().items():
        if "lora_" not in name:
            assert torch.equal(value, base_state[name.replace(".base_layer", "")]), name
    assert any(v.abs().sum() > 0 for k, v in adapter_state(unmerged).items() if "lora_B" in k)
    saved = load_file(str(lora.path / ADAPTER_WEIGHTS))
    assert saved.keys() == adapter_state(unmerged).keys()
    assert all(torch.equal(saved[k], v) for k, v in adapter_state(unmerged).items())  # bit-identical round trip
    # merged in the sampler: only the adapted projections moved
    merged = load_trained(store, lora).state_dict()
    assert merged.keys() == base_state.keys()
    moved = {k for k in merged if not torch.equal(merged[k], base_state[k])}
    assert moved and all(k.rsplit(".", 2)[-2] in ("qkv", "q", "kv", "out") for k in moved)
    images = TextToImage(store, device="cpu", pins={"base": lora})(["a red circle"], steps=2)
    assert images[0].size[0] > 0
    # the negative control: the same run without lora trains every weight and writes full weights
    full = execute(train_base, cfg.model_copy(update={"train_base": section.model_copy(update={"lora": None})}),
                   {"tokens": arts["tokens"]}, store)
    assert (full.path / "model.safetensors").is_file()
    assert full.manifest.metrics["trained_parameters"] == full.manifest.metrics["parameters"]
    # exported: the merged weights load without the store, the adapters travel beside them
    from muse import from_pretrained
    from muse.export import export

    out = export(store, lora.ref, tmp_path / "export")
    assert (out / ADAPTER_WEIGHTS).is_file() and "LoRA adapters trained on `base:" in (out / "README.md").read_text()
    exported = from_pretrained(out).state_dict()
    assert all(torch.equal(exported[k], v) for k, v in merged.items())


def test_a_tokenizer_warm_starts_from_a_trained_one_and_lists_it_in_its_lineage(pipeline_store, tmp_path):
    """`train_vqgan.init.low: vqgan-low:VERSION` begins vqgan-low from that tokenizer's weights (a near-zero
    learning rate leaves them there; from random weights it would not) and pins it in version and lineage; the
    other tokenizers start as before; another kind, an unknown version or another architecture are refused."""
    import shutil

    from muse.artifacts.store import ArtifactStore
    from muse.config import ConfigError
    from muse.stages import train_vqgan

    cfg, _, arts = pipeline_store
    store = ArtifactStore(tmp_path / "store")
    for kind in ("shards", "segments", "vqgan-low", "vqgan-high"):
        shutil.copytree(arts[kind].path, store.root / kind / arts[kind].version)
    start = store.get("vqgan-low", arts["vqgan-low"].version)
    slow = cfg.train_vqgan.train.model_copy(update={"lr": 1e-12, "warmup_steps": 0, "seed": 1})

    def run(**update):
        section = cfg.train_vqgan.model_copy(update={"train": slow, **update})
        made = execute(train_vqgan, cfg.model_copy(update={"train_vqgan": section}),
                       {k: arts[k] for k in ("shards", "segments")}, store)
        return {a.kind: a for a in made}

    warm = run(init={"low": start.ref})
    low = warm["vqgan-low"]
    assert low.manifest.inputs["vqgan-low"] == start.version and low.manifest.details["init"] == start.ref
    assert "vqgan-low" not in warm["vqgan-high"].manifest.inputs and "init" not in warm["vqgan-high"].manifest.details
    trained = from_pretrained(start.path).state_dict()
    # the codebook moves by its EMA update whatever the learning rate: it is compared by distance below
    warm_state = from_pretrained(low.path).state_dict()
    assert all(torch.allclose(v, trained[k], atol=1e-6) for k, v in warm_state.items() if not k.startswith("quantizer."))
    cold = run()["vqgan-low"]  # the negative control: the same run from random weights
    assert cold.version != low.version
    cold_state = from_pretrained(cold.path).state_dict()
    assert not all(torch.allclose(v, trained[k], atol=1e-3) for k, v in cold_state.items() if not k.startswith("quantizer."))
    codebook = "quantizer._codebook.embed"
    assert (warm_state[codebook] - trained[codebook]).abs().mean() < (cold_state[codebook] - trained[codebook]).abs().mean()

    with pytest.raises(ConfigError, match=r"train_vqgan.init.low 'vqgan-low:000000000000': no such artifact"):
        run(init={"low": "vqgan-low:000000000000"})
    with pytest.raises(ConfigError, match=r"train_vqgan.init.high 'vqgan-low:.*': this trains a vqgan-high model"):
        run(init={"high": start.ref})
    wider = cfg.train_vqgan.low.model_copy(update={"ch": cfg.train_vqgan.low.ch * 2})
    with pytest.raises(ConfigError, match=r"train_vqgan.init.low .*architecture is not the one train_vqgan.low builds"):
        run(init={"low": start.ref}, low=wider)


def test_evaluate_reports_fid_on_the_fid_network_with_its_protocol(trained_store, inception_weights, tmp_path):
    """With Inception weights, the report has FID and says how it was measured; the real images' statistics are
    cached per dataset version and resolution, so the next evaluation of the same data reads them back."""
    import shutil

    from muse.artifacts.store import ArtifactStore
    from muse.stages import evaluate

    cfg, _, arts = trained_store
    store = ArtifactStore(tmp_path / "store")
    for art in arts.values():
        shutil.copytree(art.path, store.root / art.kind / art.version)
    with_fid = cfg.evaluate.model_copy(update={"inception_weights": str(inception_weights)})
    report = execute(evaluate, cfg.model_copy(update={"evaluate": with_fid}), arts, store)
    m = report.manifest.metrics
    assert m["fid"] > 0 and m["fid_samples"] == 4 and "fid_skipped" not in m
    assert m["fid_protocol"].startswith(f"FID-4 at 32 px against all val images of shards:{arts['shards'].version}")
    assert m["fid_protocol"].endswith("computed") and "open_clip ViT-B-32" in m["clip_protocol"]
    assert len(list(store.cache_dir("fid").glob("*.npz"))) == 1
    again = with_fid.model_copy(update={"num_prompts": 3})
    m = execute(evaluate, cfg.model_copy(update={"evaluate": again}), arts, store).manifest.metrics
    assert m["fid_protocol"].startswith("FID-3") and m["fid_protocol"].endswith("from the cache")
