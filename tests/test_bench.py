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
    assert len(res["rows"]) == 6 and all(r["latency_s"] > 0 and r["params_M"] > 0 for r in res["rows"])
    assert all(r["peak_MB"] > 0 for r in res["rows"])
    saved = json.loads((tmp_path / "s.json").read_text())
    # the ratio is the sum of the SAM and CLIP rows over the SAM-CLIP row
    sam, tower, merged = saved["rows"][3:]
    assert saved["params_ratio_separate_over_samclip"] == pytest.approx(
        (sam["params_M"] + tower["params_M"]) / merged["params_M"])


def test_encoder_row_against_sams_official_attention(capsys):
    """The baseline row: the same weights with SAM's attention re-typed in bench.py. Our encoder
    agrees with it in fp32 (to rounding: the two sum in different orders); the speed ratio comes
    from alternating runs in one process, the peak ratio from the two rows."""
    res = bench.main(["speed", "--preset", "tiny", "--repeats", "1", "--in-process", "--encoder-only"])
    official, ours = res["rows"]
    assert "official attention" in official["name"] and "official" not in ours["name"]
    duel = res["encoder_head_to_head"]
    assert res["encoder_speedup_over_official"] == pytest.approx(duel["official_s"] / duel["ours_s"])
    assert res["encoder_peak_over_official"] == pytest.approx(ours["peak_MB"] / official["peak_MB"])
    assert 0 < duel["max_abs_difference_fp32"] < 1e-5 * max(1.0, duel["output_max_abs"])
    assert "x" in capsys.readouterr().out


def test_official_attention_is_the_textbook_formula():
    """official_attention by hand on a 2 x 3 grid: softmax(q.k / sqrt(hd) + q.Rh[i, k_row] + q.Rw[j, k_col]) v."""
    torch = bench.torch
    torch.manual_seed(0)
    attn = bench.vit_det.Attention(dim=8, num_heads=2, rel_pos_size=3)
    torch.nn.init.normal_(attn.rel_pos_h)
    torch.nn.init.normal_(attn.rel_pos_w)
    x = torch.randn(1, 2, 3, 8)
    with torch.no_grad():
        got = bench.official_attention(attn, x)
        q, k, v = attn.qkv(x.reshape(6, 8)).reshape(6, 3, 2, 4).unbind(1)   # (tokens, heads, hd)
        Rh = bench.vit_det.get_rel_pos(2, 2, attn.rel_pos_h)                   # (2, 2, hd)
        Rw = bench.vit_det.get_rel_pos(3, 3, attn.rel_pos_w)                   # (3, 3, hd)
        out = torch.zeros(6, 2, 4)
        for h in range(2):
            for i in range(6):
                s = torch.stack([q[i, h] @ k[j, h] / 2 + q[i, h] @ Rh[i // 3, j // 3] + q[i, h] @ Rw[i % 3, j % 3]
                                 for j in range(6)])
                out[i, h] = s.softmax(0) @ v[:, h]
        want = attn.proj(out.reshape(6, 8)).reshape(1, 2, 3, 8)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attn(x), want, rtol=1e-5, atol=1e-6)


def test_flop_count_by_hand():
    """count_tflop against hand counts: a (4, 8) x (8, 16) matmul is 2 * 4 * 8 * 16 FLOPs; CPU
    attention (registered here) 4 * B * heads * Nq * Nk * hd forward, 2.5x that backward."""
    torch = bench.torch
    a, b = torch.randn(4, 8), torch.randn(8, 16)
    assert bench.count_tflop(lambda: a @ b) * 1e12 == 2 * 4 * 8 * 16
    q = torch.randn(1, 2, 6, 4, requires_grad=True)
    k, v, mask = torch.randn(1, 2, 10, 4), torch.randn(1, 2, 10, 4), torch.randn(1, 2, 6, 10)
    sdpa = lambda: bench.torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert bench.count_tflop(sdpa) * 1e12 == 4 * 2 * 6 * 10 * 4
    assert bench.count_tflop(lambda: sdpa().sum().backward()) * 1e12 == 3.5 * 4 * 2 * 6 * 10 * 4


def test_train_speed_tiny_keeps_pixels_per_batch(capsys):
    res = bench.main(["train-speed", "--preset", "tiny", "--repeats", "1", "--clip-batch", "8", "--masks", "4",
                      "--in-process", "--peak-tflops", "2.0"])
    assert "D_CLIP img/s" in capsys.readouterr().out
    for row in res["rows"]:                                               # MFU against the given peak
        assert row["tflop"] > 0 and row["mfu"] == pytest.approx(row["tflop"] / row["latency_s"] / 2.0)
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
