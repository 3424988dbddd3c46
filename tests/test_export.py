"""`muse export`: a trained model as a folder that loads back without the store."""

import json

import torch
from safetensors.torch import load_file

import muse
from muse.cli import main
from muse.models.transformer import load_transformer
from muse.models.vqgan import from_pretrained, load_decoder


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_export_writes_weights_config_and_a_model_card_that_load_back(trained_store, tmp_path, capsys, monkeypatch):
    _, store, arts = trained_store
    out = tmp_path / "base-export"
    assert main(["export", "base", "--out", str(out), "--store", str(store.root)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    model = muse.from_pretrained(out)
    assert _same(model, load_transformer(arts["base"].path)[0])
    assert load_file(str(out / "model.safetensors")).keys() == model.state_dict().keys()  # plain safetensors
    record = json.loads((out / "muse.json").read_text())
    assert record["kind"] == "base" and record["version"] == arts["base"].version
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: muse-pipeline")
    shards = arts["shards"]
    assert f"tokens v1 ({arts['tokens'].version}) [tokenize] from" in card
    assert f"shards:{shards.version}: {shards.manifest.metrics['written']} samples" in card
    assert shards.manifest.config["source_fingerprint"] in card
    assert f"| val_masked_acc | {arts['base'].manifest.metrics['val_masked_acc']} |" in card
    assert "![samples](sample.png)" in card and (out / "sample.png").is_file()

    for kind, load in (("decoder", load_decoder), ("vqgan-low", from_pretrained)):
        folder = tmp_path / kind
        assert main(["export", f"{kind}:{arts[kind].version}", "--out", str(folder), "--store", str(store.root)]) == 0
        assert _same(muse.from_pretrained(folder), load(arts[kind].path))
    capsys.readouterr()

    # Bad requests: one line each, nothing written or overwritten.
    before = sorted(p.name for p in out.iterdir())
    assert main(["export", "base", "--out", str(out), "--store", str(store.root)]) == 1
    assert "exists and is not empty" in capsys.readouterr().err and sorted(p.name for p in out.iterdir()) == before
    assert main(["export", "tokens", "--out", str(tmp_path / "t"), "--store", str(store.root)]) == 1
    assert "only trained models export" in capsys.readouterr().err and not (tmp_path / "t").exists()
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored token either
    assert main(["export", "superres", "--out", str(tmp_path / "s"), "--push-to-hub", "me/muse-superres",
                 "--store", str(store.root)]) == 1
    assert "no Hugging Face token" in capsys.readouterr().err
    assert (tmp_path / "s" / "model.safetensors").is_file()  # the export itself stays
