"""Opening embeddings datasets: footers checked, mixed dimensions and backbones refused."""

import numpy as np
import pytest
from synthetic import blobs, names, write

from raytl.errors import EmbeddingsError
from raytl.files.embeddings import check_same_backbone, matrix, open_embeddings


def test_open_reads_dim_and_metadata(tmp_path):
    x, y = blobs(30, 2, 8, seed=0)
    write(str(tmp_path / "e"), x, names(y))
    data = open_embeddings(str(tmp_path / "e"))
    assert data.dim == 8 and len(data.files) == 3 and data.rows == 30
    assert data.metadata["layer"] == "pool5" and data.metadata["dim"] == 8


def test_mixed_dimensions_are_refused(tmp_path):
    write(str(tmp_path / "e"), *_rows(8), prefix="a")
    write(str(tmp_path / "e"), *_rows(16), prefix="b")
    with pytest.raises(EmbeddingsError, match="mixes embedding dimensions: 8 in part-a-000.parquet but 16"):
        open_embeddings(str(tmp_path / "e"))


def test_mixed_backbones_are_refused(tmp_path):
    write(str(tmp_path / "e"), *_rows(8), prefix="a")
    write(str(tmp_path / "e"), *_rows(8), prefix="b", layer="fc7")
    with pytest.raises(EmbeddingsError, match="mixes embeddings made differently: layer is 'pool5'"):
        open_embeddings(str(tmp_path / "e"))
    write(str(tmp_path / "v"), *_rows(8), weights="imagenet-other")
    with pytest.raises(
        EmbeddingsError, match="has weights 'imagenet-other', but the model expects 'random:seed=0'"
    ):
        check_same_backbone(_meta(8), open_embeddings(str(tmp_path / "v")), "--val")


def test_missing_dataset(tmp_path):
    with pytest.raises(EmbeddingsError, match="does not exist"):
        open_embeddings(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmbeddingsError, match="holds no raytl embeddings"):
        open_embeddings(str(tmp_path / "empty"))


def test_matrix_is_zero_copy_shape():
    import pyarrow as pa

    values = np.arange(12, dtype=np.float32)
    column = pa.FixedSizeListArray.from_arrays(pa.array(values), 4)
    assert np.array_equal(matrix(column, 4), values.reshape(3, 4))


def _rows(dim):
    x, y = blobs(10, 2, dim, seed=1)
    return x, names(y)


def _meta(dim):
    from synthetic import BACKBONE

    return {**BACKBONE, "dim": dim}
