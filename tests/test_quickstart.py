"""The quickstart's corpus and its offline behaviour (the whole run is the README's own command in CI)."""

import collections

import numpy as np
from PIL import Image

from raytl.commands import quickstart


def test_digits_corpus(tmp_path):
    assert quickstart.write_digits(str(tmp_path / "train"), str(tmp_path / "new")) == 1797
    train = list((tmp_path / "train").glob("*/*.png"))
    new = list((tmp_path / "new").glob("*/*.png"))
    assert len(train) == 1797 - quickstart.HELD_OUT and len(new) == quickstart.HELD_OUT
    assert set(collections.Counter(p.parent.name for p in train)) == {str(d) for d in range(10)}
    image = Image.open(train[0])
    assert image.size == (64, 64) and image.mode == "L" and np.asarray(image).max() > 100
    mtime = train[0].stat().st_mtime_ns
    quickstart.write_digits(str(tmp_path / "train"), str(tmp_path / "new"))  # a rerun writes nothing again
    assert train[0].stat().st_mtime_ns == mtime


def test_offline_falls_back_to_random_weights_and_says_so(monkeypatch, capsys):
    def unavailable(*args, **kwargs):
        raise OSError("no network")

    # even where the weights are cached or the network is open, the download fails here
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", unavailable)
    assert quickstart.choose_weights() == "random"
    err = capsys.readouterr().err
    assert "ImageNet VGG16 weights are not available here" in err and "seeded random weights" in err
