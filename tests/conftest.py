import os

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
MTD = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data", "magnetic_tile",
                                    "magnetic_tile"))


@pytest.fixture(scope="session")
def mtd_root():
    if not os.path.isdir(MTD):
        pytest.skip("../shared/data/magnetic_tile is not beside the checkout")
    return MTD


@pytest.fixture
def normals_dir(tmp_path):
    """A small folder of synthetic normal images (grey and colour, odd sizes, a subfolder)."""
    import cv2
    rng = np.random.default_rng(0)
    d = tmp_path / "normals"
    (d / "sub").mkdir(parents=True)
    for i in range(6):
        h, w = 40 + 7 * i, 60 + 5 * i
        base = cv2.GaussianBlur(rng.integers(0, 255, (h, w, 3)).astype(np.uint8), (0, 0), 2)
        target = d / ("sub" if i % 2 else "") / f"n{i}.png"
        cv2.imwrite(str(target), base)
    return str(d)
