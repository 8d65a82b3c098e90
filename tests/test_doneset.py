"""The done set of a resumed run: exact membership by 128-bit hashes, even when first halves match."""

import numpy as np

from raytl.files import doneset


def test_contains_exactly_the_done_paths():
    paths = [f"s3://b/{label}/{i}.jpg" for label in ("cat", "dog") for i in range(500)]
    done = doneset.of(paths[::3])
    assert doneset.contains(done, paths).tolist() == [i % 3 == 0 for i in range(len(paths))]
    assert doneset.contains(doneset.of([]), paths[:5]).tolist() == [False] * 5


def test_paths_sharing_the_first_64_bits_are_told_apart():
    hi, lo = doneset.hashes(["s3://b/x.jpg"])
    h, low = hi[0], lo[0]
    side_by_side = {"hi": np.array([h, h, h], np.uint64), "lo": np.array([low - 2, low - 1, low], np.uint64)}
    assert doneset.contains(side_by_side, ["s3://b/x.jpg", "s3://b/y.jpg"]).tolist() == [True, False]
    others = {"hi": np.array([h, h], np.uint64), "lo": np.array([low - 1, low + 1], np.uint64)}
    assert doneset.contains(others, ["s3://b/x.jpg"]).tolist() == [False]
