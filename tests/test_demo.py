import numpy as np

from muse.datasets.demo import COLOURS, SHAPES, make_sample, panoptic_ids, write_folder


def test_deterministic_and_independent_of_size():
    a, b = make_sample(3, 64, seed=1), make_sample(3, 64, seed=1)
    assert a.caption == b.caption and a.image.tobytes() == b.image.tobytes()
    assert make_sample(3, 64, seed=2).image.tobytes() != a.image.tobytes()


def test_captions_name_what_is_drawn():
    for i in range(40):
        s = make_sample(i, 64, seed=0)
        ids = panoptic_ids(s.panoptic)
        pixels = np.asarray(s.image).astype(int)
        for o in s.objects:
            assert o.colour in s.caption and o.shape in s.caption
            mask = ids == o.segment_id
            assert mask.sum() > 30
            mean = pixels[mask].mean(axis=0)
            assert np.abs(mean - COLOURS[o.colour]).max() < 25  # the masked pixels carry the named colour
            ys, xs = np.nonzero(mask)
            cx, cy = xs.mean() / 64, ys.mean() / 64
            expect = {"left": cx < 0.4, "right": cx > 0.6, "top": cy < 0.4, "bottom": cy > 0.6,
                      "center": 0.35 < cx < 0.65 and 0.35 < cy < 0.65}
            assert expect[o.position]
        assert set(np.unique(ids)) == {0, *(o.segment_id for o in s.objects)}
        assert {x["category_id"] for x in s.info()["segments_info"]} <= set(SHAPES.values())


def test_write_folder(tmp_path):
    out = write_folder(tmp_path / "demo", num_samples=3, image_size=32, seed=0)
    names = sorted(p.name for p in out.iterdir())
    assert names[:4] == ["000000.json", "000000.panoptic.png", "000000.png", "000000.txt"]
    assert len(names) == 12
