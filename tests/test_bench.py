# python -m pytest tests/test_bench.py -q
"""bench.py: the speed table and one distill step run on the tiny preset, in this process (the
fresh-process mode is the same code behind a spawn) and once in a fresh process."""

import json

import pytest

import bench


def test_speed_tiny_prints_a_table(capsys, tmp_path):
    res = bench.main(["speed", "--preset", "tiny", "--repeats", "1", "--in-process", "--out", str(tmp_path / "s.json")])
    text = capsys.readouterr().out
    assert "SAM-CLIP: encoder + HeadCLIP + HeadSAM" in text and "SAM + CLIP run separately" in text
    assert len(res["rows"]) == 5 and all(r["latency_s"] > 0 and r["params_M"] > 0 for r in res["rows"])
    assert all(r["peak_MB"] > 0 for r in res["rows"])
    saved = json.loads((tmp_path / "s.json").read_text())
    # the ratio is the sum of the SAM and CLIP rows over the SAM-CLIP row
    sam, tower, merged = saved["rows"][2:]
    assert saved["params_ratio_separate_over_samclip"] == pytest.approx(
        (sam["params_M"] + tower["params_M"]) / merged["params_M"])


def test_train_speed_tiny_keeps_pixels_per_batch(capsys):
    res = bench.main(["train-speed", "--preset", "tiny", "--repeats", "1", "--clip-batch", "8", "--masks", "4",
                      "--in-process"])
    assert "D_CLIP img/s" in capsys.readouterr().out
    assert [r["resolution"] for r in res["rows"]] == [48, 80]            # 224 and 448 px scaled to 160 px
    assert [r["clip_images"] for r in res["rows"]] == [8, 3]             # round(8 * (48 / 80)^2) = 3


def test_a_row_in_a_fresh_process(capsys):
    import argparse
    args = argparse.Namespace(device="cpu", in_process=False, repeats=1, dtype="fp32", threads=1)
    row = bench.run_row(bench.functools.partial(bench.build_clip_tower, "tiny"), args)
    assert row["name"].startswith("CLIP tiny image tower") and row["peak_MB"] > 50 and row["latency_s"] > 0


def test_cuda_without_a_gpu_is_one_line(capsys):
    if bench.torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit) as e:
        bench.main(["speed", "--preset", "tiny", "--device", "cuda"])
    assert e.value.code == 2 and "no CUDA device" in capsys.readouterr().err
