"""Typed records between stages and the one tar reader: wrong or missing fields are errors naming file and field."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from muse.contracts import ContractError, TokensSchema, TransformerRecord, metric
from muse.datasets.tars import TarBroken, has_ending, iter_tar, member_key, tar_keys


def test_a_trained_transformers_record_reads_back_and_a_missing_field_is_named(trained_store, tmp_path):
    _, _, arts = trained_store
    record = TransformerRecord.of(arts["base"].path)
    assert record.target == "tokens_low" and record.cond is None and record.sampling is not None
    assert record.tokenizers["tokens_low"] == f"vqgan-low:{arts['vqgan-low'].version}"
    schema = TokensSchema.of(arts["tokens"].path)
    assert schema.geometry["tokens_low"].side == 4 and schema.text.max_length == record.max_length
    broken = json.loads((arts["base"].path / "config.json").read_text())
    del broken["tokenizers"]
    (tmp_path / "config.json").write_text(json.dumps(broken))
    with pytest.raises(ContractError, match=r"config.json: tokenizers: Field required"):
        TransformerRecord.of(tmp_path)
    with pytest.raises(ContractError, match=r"_schema.json: missing"):
        TokensSchema.of(tmp_path)


def test_a_metric_another_stage_needs_is_an_error_when_absent(trained_store):
    _, _, arts = trained_store
    assert metric(arts["vqgan-low"], "psnr") == arts["vqgan-low"].manifest.metrics["psnr"]
    with pytest.raises(ContractError, match=r"vqgan-low:\w+: no metric 'psnr_db'"):
        metric(arts["vqgan-low"], "psnr_db")


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_one_key_rule_for_every_reader(tmp_path):
    assert member_key("dir.v2/cat.seg.PNG") == ("dir.v2/cat", "seg.png")
    assert member_key("cat.jpg") == ("cat", "jpg")
    data = _tar([("a.jpg", b"1"), ("a.txt", b"x"), ("d.v2/b.panoptic.png", b"2"), ("d.v2/b.txt", b"y")])
    path = tmp_path / "s.tar"
    path.write_bytes(data)
    assert [(k, sorted(f)) for k, f in iter_tar(path)] == [("a", ["jpg", "txt"]), ("d.v2/b", ["panoptic.png", "txt"])]
    assert [k for k, _ in iter_tar(io.BytesIO(data))] == tar_keys(path) == ["a", "d.v2/b"]
    assert has_ending(path, "panoptic.png") and not has_ending(path, "json")


def test_a_tar_cut_short_says_which_sample_it_broke_off_in(tmp_path):
    data = _tar([("a.txt", b"x" * 600), ("b.txt", b"y" * 2000), ("c.txt", b"z")])
    cut = io.BytesIO(data[:1024 + 512 + 512 + 100])  # a's header and data, b's header, part of b's data
    seen = []
    with pytest.raises(TarBroken) as e:
        for key, _ in iter_tar(cut):
            seen.append(key)
    assert seen == ["a"] and e.value.key == "b" and e.value.samples == 1 and e.value.__cause__ is not None
