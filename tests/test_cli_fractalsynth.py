import hashlib
import os

import h5py
import pytest
from click.testing import CliRunner

from fractalsynth.cli import main


def _mask_bytes(path):
    with h5py.File(path, "r") as f:
        return hashlib.sha256(f["masks"][()].tobytes()).hexdigest()


def test_masks_same_seed_same_bytes_any_workers(tmp_path):
    r = CliRunner()
    for w in (1, 2):
        res = r.invoke(main, ["masks", "--n", "60", "--size", "32", "--seed", "4", "--workers",
                              str(w), "--out", str(tmp_path / f"w{w}.h5")])
        assert res.exit_code == 0, res.output
    res = r.invoke(main, ["masks", "--n", "60", "--size", "32", "--seed", "5",
                          "--out", str(tmp_path / "s5.h5")])
    assert res.exit_code == 0
    assert _mask_bytes(tmp_path / "w1.h5") == _mask_bytes(tmp_path / "w2.h5")
    assert _mask_bytes(tmp_path / "w1.h5") != _mask_bytes(tmp_path / "s5.h5")


@pytest.mark.parametrize("args,needle", [
    (["--n", "0"], "count must be > 0"),
    (["--n", "-3"], "count"),
    (["--n", "1x"], "not a count"),
    (["--n", "10", "--size", "4"], "at least 8x8"),
    (["--n", "10", "--probabilities", "softmax"], "softmax"),
    (["--n", "10", "--maps", "3-2"], "lo <= hi"),
])
def test_masks_bad_arguments(tmp_path, args, needle):
    res = CliRunner().invoke(main, ["masks", *args, "--out", str(tmp_path / "m.h5")])
    assert res.exit_code != 0
    assert needle in res.output


def test_masks_unwritable_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = CliRunner().invoke(main, ["masks", "--n", "5", "--out", str(blocker / "m.h5")])
    assert res.exit_code == 2
    assert "error:" in res.output and str(blocker) in res.output
    assert not os.path.exists(str(blocker / "m.h5"))


def test_count_suffixes():
    from fractalsynth.paths import parse_count
    assert parse_count("10k") == 10000 and parse_count("1m") == 1000000
    assert parse_count("2.5k") == 2500 and parse_count(7) == 7


def test_runs_as_a_module():
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "-m", "fractalsynth", "generate", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "--holdout" in res.stdout


def test_command_lines_start_without_torch_or_scikit_image():
    # fractalsynth never needs torch; neither command line imports it (or scikit-image) until a
    # command runs, so --help and a mistyped option answer in about a second, not four
    import subprocess
    import sys
    code = ("import sys, fractalsynth, fractalsynth.generate, fractalsynth.cli, fractalad.cli; "
            "print(sorted(m for m in ('torch', 'skimage') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
    res = subprocess.run([sys.executable, "-m", "fractalad", "fit", "--backbone", "vgg", "x", "--out", "y"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "'vgg' is not one of 'efficientnet_lite0'" in res.stderr


@pytest.mark.parametrize("args,needle", [
    (["--mask-source", "fractl"], "'--mask-source': unknown mask source 'fractl'"),
    (["--mask-source", "fractal=nan"], "'--mask-source': mask source proportion of 'fractal'"),
    (["--mask-source", "fractal=0,perlin=0"], "'--mask-source': mask source proportions must not"),
    (["--content", "same=lots"], "'--content': bad content proportion 'same=lots'"),
    (["--content", "glitter"], "'--content': unknown content 'glitter'"),
    (["--opacity", "0.5-2"], "opacity must be a range within [0, 1], got (0.5, 2.0)"),
    (["--size", "20000"], "size must be at most 16384 pixels a side"),
])
def test_bad_mixes_name_their_flag_before_any_work(tmp_path, args, needle):
    # the normals folder does not exist: the option must be refused before it is read
    res = CliRunner().invoke(main, ["generate", "--normals", str(tmp_path / "none"),
                                    "--out", str(tmp_path / "sh"), "--n", "4", *args])
    assert res.exit_code == 2 and needle in res.output, res.output
    assert not os.path.exists(tmp_path / "sh")
