# python -m pytest tests/test_bench.py -q
"""bench.py: the speed table and one distill step on the tiny preset, in this process (the
fresh-process mode is the same code behind a spawn) and once in a fresh process.

No assertion depends on how fast this machine is: where a number derives from a time, bench's
clock is replaced by one that moves by a set amount (TickingClock, or forward hooks), so the
latencies, throughputs and ratios are numbers computed here by hand. Parameter and FLOP counts
are checked against hand counts of the tiny configs; printed rows are parsed back and compared
with the returned results."""

import itertools
import json
import os
import re
import types

import numpy as np
import pytest
import torch

import bench
import data


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models gain nothing from threads, and on a shared CPU extra threads only wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ticking_clock(monkeypatch, tick):
    """bench's time.perf_counter moves `tick` seconds a call: every timed run lasts one tick."""
    clock = itertools.count(step=tick)
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=clock.__next__))


# A row as measure() prints it: name, latency, params, peak, rise, TFLOP/s[, MFU].
ROW = re.compile(
    r"^  (?P<name>\S.*?) +(?P<latency>\d+\.\d{3}) s +(?P<params>\d+\.\d) M +(?P<peak>\d+) MB"
    r" +(?P<rise>[+-]\d+) MB +(?P<tflops>\d+\.\d{3})(  MFU (?P<mfu>\d+\.\d)%)?"
)


def printed_rows(text):
    return [m.groupdict() for m in map(ROW.match, text.splitlines()) if m]


def assert_printed(printed, row):
    """A printed row holds the JSON row's numbers, at the printed precision."""
    assert printed["name"] == row["name"]
    assert printed["latency"] == f"{row['latency_s']:.3f}"
    assert printed["params"] == f"{row['params_M']:.1f}"
    assert printed["peak"] == f"{row['peak_MB']:.0f}"
    assert printed["rise"] == f"{row['rise_MB']:+.0f}"
    assert printed["tflops"] == f"{row['tflops_per_s']:.3f}"
    if "mfu" in row:
        assert printed["mfu"] == f"{100 * row['mfu']:.1f}"


# Parameter counts of the tiny configs, by hand. A pre-LN transformer block of width C holds two
# LayerNorms (4C), qkv (3C^2 + 3C), the output projection (C^2 + C) and an MLP C -> 4C -> C
# (8C^2 + 5C): 12C^2 + 13C. SAM's blocks add two relative-position tables, (2 side - 1) x hd each.
def block_params(C, hd=None, rel_side=None):
    return 12 * C * C + 13 * C + (2 * (2 * rel_side - 1) * hd if rel_side else 0)


# vit_det tiny: C 64, 16 px patches, 10 x 10 grid, 4 heads (hd 16), windows of 4, blocks 1 and 3
# global, neck to 32 channels.
TINY_ENCODER = sum(
    [
        3 * 16 * 16 * 64 + 64,  # patch embedding conv, with bias
        10 * 10 * 64,  # absolute position embedding
        2 * block_params(64, 16, rel_side=4),  # windowed blocks 0, 2
        2 * block_params(64, 16, rel_side=10),  # global blocks 1, 3
        64 * 32 + 2 * 32,  # neck: 1x1 conv (no bias), LayerNorm2d
        9 * 32 * 32 + 2 * 32,  # neck: 3x3 conv (no bias), LayerNorm2d
    ]
)
# CLIP tiny image tower: C 128, 16 px patches on 64 px (4 x 4 grid + class token), 2 blocks, D 32.
TINY_CLIP_TOWER = sum(
    [
        3 * 16 * 16 * 128,  # patch conv, no bias
        128 + 17 * 128,  # class embedding, position embedding
        2 * 128,  # ln_pre
        2 * block_params(128),
        2 * 128,  # ln_post
        128 * 32,  # proj
    ]
)
# HeadCLIP of SAM-CLIP tiny: 3 global blocks of the encoder's width (rel. tables for the 10 x 10
# grid), a LayerNorm, an MLP 64 -> 64 -> 64 -> 32.
TINY_HEAD_CLIP = 3 * block_params(64, 16, rel_side=10) + 2 * 64 + 2 * (64 * 64 + 64) + 64 * 32 + 32


def test_speed_tiny_prints_a_table(capsys, tmp_path, monkeypatch):
    """Every timed run lasts 0.5 s: SAM + CLIP separately take 1.0 s against SAM-CLIP's 0.5 s."""
    ticking_clock(monkeypatch, 0.5)
    out = str(tmp_path / "s.json")
    res = bench.main(["speed", "--preset", "tiny", "--repeats", "1", "--in-process", "--out", out])
    text = capsys.readouterr().out
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved == json.loads(json.dumps(res))
    official, encoder, encoder_448, sam, tower, merged = saved["rows"]
    assert merged["name"] == "SAM-CLIP: encoder + HeadCLIP + HeadSAM @ 160 px"
    assert [r["latency_s"] for r in saved["rows"]] == [0.5] * 6
    assert all(r["peak_MB"] > 0 for r in saved["rows"])
    for printed, row in zip(printed_rows(text), saved["rows"]):
        assert_printed(printed, row)
    # parameters by hand; the merged model is SAM plus HeadCLIP
    for row in (official, encoder, encoder_448):
        assert round(row["params_M"] * 1e6) == TINY_ENCODER
    assert round(tower["params_M"] * 1e6) == TINY_CLIP_TOWER
    assert round((merged["params_M"] - sam["params_M"]) * 1e6) == TINY_HEAD_CLIP
    sam_params = round(sam["params_M"] * 1e6)
    params_ratio = (sam_params + TINY_CLIP_TOWER) / (sam_params + TINY_HEAD_CLIP)
    assert saved["params_ratio_separate_over_samclip"] == pytest.approx(params_ratio)
    assert saved["latency_ratio_separate_over_samclip"] == 2.0
    assert f"latency x2.00, parameters x{params_ratio:.2f}" in text


def test_encoder_row_against_sams_official_attention(capsys, monkeypatch):
    """The baseline row: the same weights with SAM's attention re-typed in bench.py. Our encoder
    agrees with it in fp32 (to rounding: the two sum in different orders). A forward hook sets
    the time and the memory each encoder takes: SAM's attention 0.5 s and 400 MB, ours 0.125 s
    and 100 MB, so ours is x4.00 faster (alternating runs in one process) at x0.25 the peak (the
    two rows)."""
    clock = types.SimpleNamespace(now=0.0)
    memory = {"MB": 0.0}
    real_random_encoder = bench.random_encoder

    def hooked_encoder(preset, device, official=False):
        def hook(module, inputs, output):
            clock.now += 0.5 if official else 0.125
            memory["MB"] = 400.0 if official else 100.0

        encoder = real_random_encoder(preset, device, official)
        encoder.register_forward_hook(hook)
        return encoder

    monkeypatch.setattr(bench, "random_encoder", hooked_encoder)
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))
    monkeypatch.setattr(bench, "peak_rss_mb", lambda: memory["MB"])
    res = bench.main(
        ["speed", "--preset", "tiny", "--repeats", "3", "--in-process", "--encoder-only"]
    )
    official, ours = res["rows"]
    assert official["name"] == "tiny encoder @ 160 px, SAM's official attention"
    assert ours["name"] == "tiny encoder @ 160 px"
    assert (official["latency_s"], ours["latency_s"]) == (0.5, 0.125)
    assert (official["peak_MB"], ours["peak_MB"]) == (400.0, 100.0)
    duel = res["encoder_head_to_head"]
    assert (duel["official_s"], duel["ours_s"]) == (0.5, 0.125)
    assert res["encoder_speedup_over_official"] == 4.0
    assert res["encoder_peak_over_official"] == 0.25
    # zero in exact arithmetic (the same formula summed in another order): bounded above only
    assert duel["max_abs_difference_fp32"] < 1e-5 * max(1.0, duel["output_max_abs"])
    # ours first, as the line names them
    assert "0.125 s vs 0.500 s, x4.00 faster; peak x0.25" in capsys.readouterr().out


def test_official_attention_is_the_textbook_formula():
    """official_attention by hand on a 2 x 3 grid:
    softmax(q.k / sqrt(hd) + q.Rh[i, k_row] + q.Rw[j, k_col]) v."""
    torch.manual_seed(0)
    attn = bench.vit_det.Attention(dim=8, num_heads=2, rel_pos_size=3)
    torch.nn.init.normal_(attn.rel_pos_h)
    torch.nn.init.normal_(attn.rel_pos_w)
    x = torch.randn(1, 2, 3, 8)
    with torch.no_grad():
        got = bench.official_attention(attn, x)
        q, k, v = attn.qkv(x.reshape(6, 8)).reshape(6, 3, 2, 4).unbind(1)  # (tokens, heads, hd)
        Rh = bench.vit_det.get_rel_pos(2, 2, attn.rel_pos_h)  # (2, 2, hd)
        Rw = bench.vit_det.get_rel_pos(3, 3, attn.rel_pos_w)  # (3, 3, hd)
        out = torch.zeros(6, 2, 4)
        for h in range(2):
            for i in range(6):
                scores = []
                for j in range(6):
                    content = q[i, h] @ k[j, h] / 2
                    rows = q[i, h] @ Rh[i // 3, j // 3]
                    cols = q[i, h] @ Rw[i % 3, j % 3]
                    scores.append(content + rows + cols)
                out[i, h] = torch.stack(scores).softmax(0) @ v[:, h]
        want = attn.proj(out.reshape(6, 8)).reshape(1, 2, 3, 8)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attn(x), want, rtol=1e-5, atol=1e-6)


def test_flop_count_by_hand():
    """count_tflop against hand counts: a (4, 8) x (8, 16) matmul is 2 * 4 * 8 * 16 FLOPs, and so
    is a Linear(8, 16) on 4 rows (the bias add is not counted); CPU attention (registered here)
    4 * B * heads * Nq * Nk * hd forward, 2.5x that backward."""
    a = torch.randn(4, 8)
    b = torch.randn(8, 16)
    assert bench.count_tflop(lambda: a @ b) * 1e12 == 2 * 4 * 8 * 16
    assert bench.count_tflop(lambda: torch.nn.Linear(8, 16)(a)) * 1e12 == 2 * 4 * 8 * 16
    q = torch.randn(1, 2, 6, 4, requires_grad=True)
    k = torch.randn(1, 2, 10, 4)
    v = torch.randn(1, 2, 10, 4)
    mask = torch.randn(1, 2, 6, 10)

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    assert bench.count_tflop(sdpa) * 1e12 == 4 * 2 * 6 * 10 * 4
    assert bench.count_tflop(lambda: sdpa().sum().backward()) * 1e12 == 3.5 * 4 * 2 * 6 * 10 * 4


def test_measure_a_linear_layer_by_hand(capsys, monkeypatch):
    """One Linear(64, 32) on 16 rows, each run 0.25 s: 64 * 32 + 32 = 2080 parameters,
    2 * 16 * 64 * 32 = 65536 FLOPs, 65536 / 0.25 = 262144 FLOP/s, an MFU of 0.262144 against a
    peak of 1 MFLOP/s; the printed row says the same."""
    ticking_clock(monkeypatch, 0.25)
    layer = torch.nn.Linear(64, 32)
    x = torch.randn(16, 64)

    def build(device):
        return "one linear layer", bench.count(layer), lambda: layer(x), False

    row = bench.measure(build, 3, torch.device("cpu"), "fp32", peak_tflops=1e-6)
    assert row["name"] == "one linear layer" and row["times_s"] == [0.25] * 3
    assert row["latency_s"] == 0.25
    assert round(row["params_M"] * 1e6) == 2080
    assert row["tflop"] * 1e12 == 65536
    assert row["tflops_per_s"] * 1e12 == pytest.approx(262144)
    assert row["mfu"] == pytest.approx(0.262144)
    assert_printed(printed_rows(capsys.readouterr().out)[0], row)


def test_train_speed_tiny_keeps_pixels_per_batch(capsys, monkeypatch):
    """Each step 0.5 s; one worker delivers (stubbed) 4 D_CLIP and 1 D_SAM images a second. The
    48 px step takes 8 D_CLIP images (16 img/s) and 1 D_SAM image (2 img/s): 16 / 4 = 4 workers
    keep it fed, more than the 2 / 1 that D_SAM needs."""
    ticking_clock(monkeypatch, 0.5)
    rates = {"clip": 4.0, "clip_shards": 5.0, "sam": 1.0}
    monkeypatch.setattr(bench, "data_speed", lambda preset: rates)
    args = "train-speed --preset tiny --repeats 1 --clip-batch 8 --masks 4 --in-process"
    res = bench.main(args.split() + ["--peak-tflops", "2.0"])
    text = capsys.readouterr().out
    rows = res["rows"]
    assert [r["resolution"] for r in rows] == [48, 80]  # 224 and 448 px scaled to 160 px
    assert [r["clip_images"] for r in rows] == [8, 3]  # round(8 * (48 / 80)^2) = 3
    assert [r["clip_img_per_s"] for r in rows] == [16.0, 6.0]
    assert [r["sam_img_per_s"] for r in rows] == [2.0, 2.0]
    assert res["workers_needed"] == 4.0
    assert all(r["tflop"] > 0 for r in rows)
    for printed, row in zip(printed_rows(text), rows):
        assert_printed(printed, row)
    assert "16.00 D_CLIP img/s, 2.00 D_SAM img/s" in text
    assert "4.0 D_CLIP img/s from a folder, 5.0 from a tar shard, 1.0 D_SAM img/s; the step" in text
    assert "the step needs about 4.00 workers" in text


def test_synthetic_data_reads_as_the_real_sets(tmp_path):
    """write_synthetic_data's folders load without a skip: every D_SAM sample has its 32 prompts,
    every annotation's box and area are those of its decoded mask, the D_CLIP sides lie in range;
    data_speed reports both rates."""
    clip_folder, sam_folder = bench.write_synthetic_data(
        str(tmp_path), 3, 2, clip_sides=(60, 90), sam_hw=(150, 225), masks=40
    )
    for name in os.listdir(clip_folder):
        width, height = data.load_image(os.path.join(clip_folder, name)).size
        assert 60 <= width <= 90 and 60 <= height <= 90
    sa1b = data.SA1B(sam_folder, 160, masks_per_image=32)
    samples = [sa1b[i] for i in range(len(sa1b))]
    assert len(samples) == 2 and sa1b.skipped == 0
    assert all(s["ok"] and s["num_prompts"] == 32 for s in samples)
    with open(os.path.join(sam_folder, "sa_1.json")) as f:
        doc = json.load(f)
    assert doc["image"] == {"image_id": 1, "width": 225, "height": 150, "file_name": "sa_1.jpg"}
    for ann in doc["annotations"]:
        mask = data.rle_decode(ann["segmentation"])
        rows = np.flatnonzero(mask.any(1))
        cols = np.flatnonzero(mask.any(0))
        extent = [cols[0], rows[0], cols[-1] + 1 - cols[0], rows[-1] + 1 - rows[0]]
        assert ann["bbox"] == extent and ann["area"] == mask.sum()
    rates = bench.data_speed("tiny", n=6, clip_sides=(60, 90), sam_hw=(150, 225), masks=40)
    assert sorted(rates) == ["clip", "clip_shards", "sam"] and all(r > 0 for r in rates.values())


def test_a_row_in_a_fresh_process():
    import argparse

    args = argparse.Namespace(device="cpu", in_process=False, repeats=1, dtype="fp32", threads=1)
    row = bench.run_row(bench.functools.partial(bench.build_clip_tower, "tiny"), args)
    assert row["name"] == "CLIP tiny image tower @ 64 px"
    assert round(row["params_M"] * 1e6) == TINY_CLIP_TOWER
    assert row["peak_MB"] > 50 and row["latency_s"] > 0  # torch alone takes more than 50 MB


def test_cuda_without_a_gpu_is_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit) as e:
        bench.main(["speed", "--preset", "tiny", "--device", "cuda"])
    assert e.value.code == 2 and "no CUDA device" in capsys.readouterr().err
