# python -m pytest tests/test_toy_teachers.py -q
"""toy/teachers.py and the shipped toy teachers: the files load through the official loaders as the
"toy" presets, hold exactly the official key sets, and work (better than random weights, on
heldout-hand scenes); the training loops learn and reach every parameter; an interrupted training
resumes exactly; duplicate captions are positives of each other in the contrastive loss."""
import re
import signal
from dataclasses import replace

import numpy as np
import pytest
import torch

import clip
import heads
import vit_det
import weights
import zero_shot
import toy
from conftest import meta_state_dict
from toy import quality, scenes, teachers
from toy.drawing import CLASSES, connected_regions

SAM_PATH, CLIP_PATH = toy.SAM_WEIGHTS, toy.CLIP_WEIGHTS


@pytest.fixture(scope="module")
def toy_sam():
    sd = weights.read_state_dict(SAM_PATH)
    return vit_det.load_sam_encoder(sd, source=SAM_PATH), heads.load_sam_head(sd, source=SAM_PATH)


@pytest.fixture(scope="module")
def toy_clip():
    return clip.load_clip(CLIP_PATH)


# ----------------------------------------------------------------------------- the shipped files

def block_agnostic(keys):
    """Official keys with block indices replaced by '#': a 4-block and a 12-block file compare."""
    return {re.sub(r"((?:^|\.)(?:blocks|resblocks)\.)\d+\.", r"\1#.", k) for k in keys}


def test_shipped_files_have_the_official_key_sets_in_float16():
    sam = torch.load(SAM_PATH, map_location="cpu", weights_only=True)
    assert block_agnostic(sam) == block_agnostic(meta_state_dict("sam_vit_b_keys.tsv"))
    cl = torch.load(CLIP_PATH, map_location="cpu", weights_only=True)
    assert block_agnostic(cl) == block_agnostic(meta_state_dict("openclip_vit_l_14_keys.tsv"))
    assert {v.dtype for v in [*sam.values(), *cl.values()]} == {torch.float16}
    # untrained token rows are zero; the tokens of the class names are not
    rows = cl["token_embedding.weight"].float().abs().sum(1)
    assert 30 < int((rows > 0).sum()) < 2000                                   # shipped: 104 tokens
    for name in CLASSES:
        assert all(rows[t] > 0 for t in clip.get_tokenizer().encode(name)), name


def test_shipped_files_load_as_the_toy_presets(toy_sam, toy_clip):
    encoder, head = toy_sam
    assert weights.match_preset(encoder.cfg, vit_det.PRESETS) == "toy"
    assert weights.match_preset(head.cfg, heads.SAM_HEAD_PRESETS) == "toy"
    assert weights.match_preset(toy_clip.config, clip.PRESETS) == "toy"
    sd = weights.read_state_dict(CLIP_PATH)
    assert clip.clip_config_from_state_dict(sd)[1] == "toy"


def test_shipped_toy_sam_segments_heldout_boxes(toy_sam):
    scenes = quality.heldout_scenes(3, seed=123)
    shipped = quality.sam_scores(*toy_sam, scenes)
    torch.manual_seed(0)
    encoder, head = vit_det.build_vit_det("toy").eval(), heads.build_head_sam("toy").eval()
    random = quality.sam_scores(encoder, head, scenes)
    # shipped: 0.74 on 40 scenes (teachers.json)
    assert shipped["box_miou"] > 0.45 and random["box_miou"] < 0.3, (shipped, random)
    assert shipped["point_miou"] > random["point_miou"] + 0.2, (shipped, random)


def test_interior_distance_and_centre_point_by_hand():
    mask = np.zeros((10, 14), dtype=bool)
    mask[2:7, 3:8] = True  # a 5 x 5 square: rows 2-6, columns 3-7
    d = quality.interior_distance(mask)
    assert d[4, 5] == 3 and d[2, 3] == 1 and d[3, 4] == 2 and d[0, 0] == 0
    assert quality.centre_point(mask) == (5, 4)  # (x, y): the square's centre
    band = np.zeros((6, 5), dtype=bool)
    band[0:3] = True  # rows 0-2, full width: the image's border counts as outside
    assert quality.interior_distance(band)[:3, 2].tolist() == [1, 2, 1]


def test_interior_distance_matches_brute_force_on_random_blobs():
    rng = np.random.default_rng(0)
    for _ in range(4):
        H, W = 23, 31
        yy, xx = np.mgrid[:H, :W]
        mask = np.zeros((H, W), dtype=bool)
        for cy, cx, r in zip(rng.integers(0, H, 3), rng.integers(0, W, 3), rng.integers(2, 9, 3)):
            mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r  # discs, some cut by the border
        outside = np.argwhere(~np.pad(mask, 1)) - 1  # (N, 2) outside pixels, the ring included
        expected = np.zeros((H, W))
        for y, x in np.argwhere(mask):
            expected[y, x] = np.sqrt(((outside - [y, x]) ** 2).sum(1).min())
        np.testing.assert_allclose(quality.interior_distance(mask), expected, atol=1e-9)


def test_shipped_toy_clip_names_clear_crops(toy_clip):
    crops, labels = quality.dominated_crops(2, seed=123)                     # 16 crops, 2 per class
    with torch.no_grad():
        image = toy_clip.encode_image(quality.clip_input(crops, 64))
        image = torch.nn.functional.normalize(image, dim=-1)
        templates = ("a drawing of a {}.", "a picture of the {}.")
        text = zero_shot.class_embeddings(toy_clip, CLASSES, templates=templates)
    accuracy = ((image @ text.t()).argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.75, accuracy                   # shipped: 15 of 16; chance: 1/8


# ----------------------------------------------------------------------------- the training loops

# the shipped recipe (its scene augmentations on), at tiny sizes
TINY = replace(teachers.TeacherConfig(), sam_steps=2, sam_images=2, sam_prompts=4, sam_rounds=2,
               sam_pool=2, sam_fresh=1, sam_tune_steps=2, sam_frame_steps=2, clip_steps=2,
               clip_batch=8, clip_pool=2, clip_fresh=1, weight_decay=0.0, warmup=1)


@pytest.mark.parametrize("loss_settings", [{}, dict(focal_alpha=-1.0, frame_loss=True)])
def test_sam_recipe_learns_and_reaches_every_parameter(loss_settings):
    # a fixed batch of tiny scenes, a few steps: the loss falls, and one backward reaches every
    # parameter (box and point prompts, the 3 multimask tokens, positive and negative error points,
    # the mask prompt's convolutions)
    torch.manual_seed(0)
    encoder, head = vit_det.build_vit_det("tiny"), heads.build_head_sam("tiny")
    model = torch.nn.ModuleDict({"encoder": encoder, "head": head})
    prepare = lambda scene, rng: teachers.sam_scene(scene, 160)
    pool = teachers.ScenePool(3, prepare, np.random.default_rng(0))
    generator = torch.Generator().manual_seed(0)
    batch = teachers.sam_prompts(pool.sample(3), 16, generator)
    assert batch["is_box"].any() and not batch["is_box"].all()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    history, reached = [], set()
    for step in range(4):
        loss, parts = teachers.sam_round_losses(head, encoder(batch["image"]), batch, 3,
                                                torch.Generator().manual_seed(1),
                                                **loss_settings)
        opt.zero_grad()
        loss.backward()
        reached |= {n for n, p in model.named_parameters()
                    if p.grad is not None and p.grad.abs().sum() > 0}
        opt.step()
        history.append(loss.item())
    assert np.isfinite(history).all() and history[-1] < history[0], history
    # every parameter, except that a multimask output's hypernetwork learns only when its mask is
    # the best of the 3 (SAM's min-loss rule; here, at initialisation, one of them never wins)
    multimask = re.compile(r"output_hypernetworks_mlps\.[123]\.")
    assert {n for n, _ in model.named_parameters() if not multimask.search(n)} <= reached
    assert any(multimask.search(n) for n in reached)


def test_masks_on_the_frame_and_the_grid_sample_the_pixel_under_each_centre_by_hand():
    # an 8 x 4 original resized to 4 x 2 in a 4 x 4 frame: frame pixel (r, c) has its centre at
    # (r + 0.5, c + 0.5), over original pixel (floor((r + 0.5) * 2), floor((c + 0.5) * 2))
    masks = np.arange(32).reshape(1, 4, 8) % 3 == 0                  # (1, H=4, W=8)
    frame, inside = teachers.low_res_masks(masks, (4, 8), (2, 4), side=4, stride=1)
    assert frame.shape == (1, 4, 4) and inside[:2].all() and not inside[2:].any()
    expected = np.zeros((1, 4, 4), bool)
    expected[0, :2] = masks[0][[1, 3]][:, [1, 3, 5, 7]]
    assert np.array_equal(frame.numpy(), expected)
    # stride 2 (a 2 x 2 grid): cell centres at 1, 3 in the frame; only row 0 lies in the image
    grid, _ = teachers.low_res_masks(masks, (4, 8), (2, 4), side=4, stride=2)
    assert np.array_equal(grid.numpy()[0], [[masks[0, 2, 2], masks[0, 2, 6]], [False, False]])


def test_frame_loss_scores_the_logits_as_sam_thresholds_them():
    # with frame_loss, the IoU of round 0 is that of the logits upsampled as SAM's postprocessing
    # does (heads.postprocess_masks), against the masks on the frame's pixels
    torch.manual_seed(0)
    encoder, head = vit_det.build_vit_det("tiny").eval(), heads.build_head_sam("tiny").eval()
    prepare = lambda scene, rng: teachers.sam_scene(scene, 160)
    pool = teachers.ScenePool(2, prepare, np.random.default_rng(0))
    batch = teachers.sam_prompts(pool.sample(2), 4, torch.Generator().manual_seed(0))
    batch["is_box"][:] = True
    with torch.no_grad():
        emb = encoder(batch["image"])
        _, parts = teachers.sam_round_losses(head, emb, batch, 1, torch.Generator(),
                                             frame_loss=True)
        logits, _ = head(emb[batch["slot_image"]], boxes=batch["boxes"], multimask_output=False)
        pred = heads.postprocess_masks(logits, (160, 160), (160, 160), 160)[:, 0] > 0
    truth = batch["gt_frame"]                                                    # (n, 160, 160)
    iou = (pred & truth).flatten(1).sum(1) / (pred | truth).flatten(1).sum(1).clamp(min=1)
    assert truth.shape == (len(batch["gt"]), 160, 160)
    assert abs(parts["miou"] - iou.mean().item()) < 1e-6


def test_erode_removes_the_border_of_a_mask_by_hand():
    mask = np.zeros((5, 6), bool)
    mask[1:4, 1:5] = True                   # a 3 x 4 block: only its inner 1 x 2 row survives
    mask[0:2, 5] = True                     # touches the image's edge: all border, all removed
    inner = np.zeros_like(mask)
    inner[2, 2:4] = True
    assert np.array_equal(teachers.erode(mask), inner)


def test_restyle_moves_colours_region_by_region_and_keeps_the_labels():
    scene = scenes.draw_scene(5, "train")
    hsv = lambda image: np.asarray(image.convert("HSV")).astype(float)       # (H, W, 3)
    off = replace(TINY, sam_recolour=0.0, sam_outline=0.0, sam_posterize=0.0)
    same = teachers.restyle(scene, np.random.default_rng(0), off)
    assert np.array_equal(np.asarray(same.image), np.asarray(scene.image))
    # every region recoloured: one move per region, within RECOLOUR of each channel
    recoloured = teachers.restyle(scene, np.random.default_rng(0), replace(off, sam_recolour=1.0))
    assert recoloured.instances is scene.instances and recoloured.caption == scene.caption
    before, after = hsv(scene.image), hsv(recoloured.image)
    limit = np.array(teachers.RECOLOUR) * 255
    for inst in scene.instances:
        a, b = before[inst.mask], after[inst.mask]                            # (pixels, 3)
        hue = (b[:, 0] - a[:, 0] + 128) % 256 - 128                           # wrapped difference
        sv = b[:, 1:] - a[:, 1:]
        bright = (a[:, 1] > 60) & (a[:, 2] > 60)  # hue is noise where saturation or value is low
        if bright.any():
            assert np.abs(np.median(hue[bright])) <= limit[0] + 2
        assert (np.abs(np.median(sv, 0)) <= limit[1:] + 2).all()
    assert np.abs(after - before).mean() > 3                                  # it did move them
    # every object rimmed: its border ring at 45% brightness, the stuff untouched
    rimmed = teachers.restyle(scene, np.random.default_rng(0), replace(off, sam_outline=1.0))
    rimmed = hsv(rimmed.image)
    objects = [inst for inst in scene.instances if not inst.attrs.get("stuff")]
    assert objects
    for inst in objects:
        ring = inst.mask & ~teachers.erode(inst.mask)
        np.testing.assert_allclose(rimmed[ring, 2], 0.45 * before[ring, 2], atol=3)
    stuff = np.any([inst.mask for inst in scene.instances if inst.attrs.get("stuff")], 0)
    np.testing.assert_allclose(rimmed[stuff, 2], before[stuff, 2], atol=4)   # HSV round trip


def test_paste_shapes_adds_masks_that_cut_the_ones_under_them():
    scene = scenes.draw_scene(5, "train")
    unpasted = teachers.paste_shapes(scene, np.random.default_rng(0), replace(TINY, sam_paste=0.0))
    assert unpasted is scene
    pasted = teachers.paste_shapes(scene, np.random.default_rng(0), replace(TINY, sam_paste=1.0))
    new = [inst for inst in pasted.instances if inst.attrs.get("kind") == "pasted"]
    assert 1 <= len(new) <= teachers.PASTE_SHAPES
    masks = np.stack([inst.mask for inst in pasted.instances]).astype(int)        # (K, H, W)
    assert masks.sum(0).max() == 1 and all(inst.mask.any() for inst in pasted.instances)
    # every drawn pixel is still covered, by its own region or by the shape pasted over it
    assert np.array_equal(masks.sum(0) == 1, np.any([i.mask for i in scene.instances], 0))
    # the image changed under the shapes, and beyond their masks only at blended edges (a sharp
    # corner's tip, under half a pixel wide, blends without being in the mask)
    before, after = np.asarray(scene.image).astype(int), np.asarray(pasted.image).astype(int)
    under = np.any([inst.mask for inst in new], 0)
    # a random colour over a scene's: the mean change in 0..255 is large (43 here), not a few
    # levels of rounding
    assert np.abs(after - before)[under].mean() > 10
    near = under.copy()
    for _ in range(2):
        near = ~teachers.erode(~near)          # two pixels of blended edge around each shape
    assert (after[~near] != before[~near]).any(1).mean() < 0.005


def test_paste_bands_draws_a_band_behind_the_objects_that_cuts_the_stuff():
    scene = scenes.draw_scene(5, "train")
    assert teachers.paste_bands(scene, np.random.default_rng(0), 0.0) is scene
    banded = teachers.paste_bands(scene, np.random.default_rng(0), 1.0)
    bands = [inst for inst in banded.instances if inst.attrs.get("kind") == "band"]
    assert bands and all(inst.attrs["stuff"] for inst in bands)
    masks = np.stack([inst.mask for inst in banded.instances]).astype(int)        # (K, H, W)
    assert masks.sum(0).max() == 1                                                # disjoint
    # one mask per connected region, as the world's stuff masks are
    for inst in banded.instances:
        if inst.attrs.get("stuff"):
            assert len(connected_regions(inst.mask)) == 1
    # behind the objects: every object keeps its mask and its pixels
    objects = [inst for inst in scene.instances if not inst.attrs.get("stuff")]
    assert objects
    kept = [inst.mask for inst in banded.instances if not inst.attrs.get("stuff")]
    assert len(kept) == len(objects)
    assert all(np.array_equal(a.mask, b) for a, b in zip(objects, kept))
    front = np.any([inst.mask for inst in objects], 0)                            # (H, W)
    before, after = np.asarray(scene.image).astype(int), np.asarray(banded.image).astype(int)
    assert np.array_equal(after[front], before[front])
    # the band took its pixels from the stuff: covered before, it covers them now
    band = np.any([inst.mask for inst in bands], 0)
    stuff = np.any([inst.mask for inst in scene.instances if inst.attrs.get("stuff")], 0)
    assert not (band & ~stuff).any()
    assert not np.any([inst.mask & band for inst in banded.instances
                       if inst.attrs.get("kind") != "band"])
    # a shade of what it covers (BAND_SHADE moves each channel by 15% or more of it): the mean
    # change is far above the grain's few levels
    assert np.abs(after - before)[band].mean() > 10


def test_train_sam_and_train_clip_run_and_move_every_parameter():
    # the whole loops, two steps on tiny presets and no weight decay: a tensor moves only by a
    # gradient
    encoder, head, _ = teachers.train_sam(TINY, "tiny", "tiny", log=lambda _: None)
    torch.manual_seed(TINY.seed)
    start = dict(vit_det.build_vit_det("tiny").named_parameters())
    assert not encoder.training
    assert all(not torch.equal(p, start[n]) for n, p in encoder.named_parameters())
    model, seen, _ = teachers.train_clip(TINY, "tiny", log=lambda _: None)
    torch.manual_seed(TINY.seed)
    start = dict(clip.build_clip("tiny").named_parameters())
    assert all(not torch.equal(p, start[n]) for n, p in model.named_parameters())
    assert 10 < int(seen.sum()) < 200                                   # the captions' tokens only
    moved = (model.text.token_embedding.weight != start["text.token_embedding.weight"]).any(1)
    assert torch.equal(moved, seen)


def test_stage_3_trains_the_head_and_leaves_the_encoder_as_stage_2_left_it():
    quiet = lambda _: None
    two = teachers.train_sam(replace(TINY, sam_frame_steps=0), "tiny", "tiny", log=quiet)
    three = teachers.train_sam(TINY, "tiny", "tiny", log=quiet)
    for name, p in two[0].state_dict().items():
        assert torch.equal(p, three[0].state_dict()[name]), name
    decoder = ("mask_decoder.output_upscaling.0.weight", "mask_decoder.iou_prediction_head."
               "layers.0.weight", "prompt_encoder.point_embeddings.1.weight")
    for name in decoder:
        assert not torch.equal(two[1].state_dict()[name], three[1].state_dict()[name]), name


def test_interrupted_training_resumes_exactly_and_a_finished_phase_is_skipped(tmp_path):
    # one run straight through; one stopped after step 1 (checkpointed, as an interruption leaves
    # it) and rerun: the same weights, the same tokens seen; a third run finds the phase finished
    config = replace(TINY, sam_steps=3, sam_tune_steps=3, sam_frame_steps=3, clip_steps=3)
    quiet = lambda _: None
    straight = teachers.train_sam(config, "tiny", "tiny", log=quiet)
    # stopped in stage 1 at its step 1, then at its step 2; then in stages 2 and 3 at step 2
    read = lambda name: torch.load(tmp_path / f"ckpt_{name}.pt", weights_only=True)
    for stop_after, name in ((1, "SAM"), (2, "SAM"), (2, "SAM_tune"), (2, "SAM_frame")):
        stopped = teachers.train_sam(config, "tiny", "tiny", log=quiet, work=tmp_path,
                                     stop_after=stop_after)
        assert stopped is None
        assert read(name)["step"] == stop_after and not read(name)["done"]
    resumed = teachers.train_sam(config, "tiny", "tiny", log=quiet, work=tmp_path)
    messages = []
    again = teachers.train_sam(config, "tiny", "tiny", log=messages.append, work=tmp_path)
    assert messages == [f"toy SAM: already finished ({tmp_path / 'ckpt_SAM.pt'})",
                        f"toy SAM_tune: already finished ({tmp_path / 'ckpt_SAM_tune.pt'})",
                        f"toy SAM_frame: already finished ({tmp_path / 'ckpt_SAM_frame.pt'})"]
    for a, b, c in zip(straight[:2], resumed[:2], again[:2]):
        for name, p in a.state_dict().items():
            assert torch.equal(p, b.state_dict()[name]), name
            assert torch.equal(p, c.state_dict()[name]), name
    straight = teachers.train_clip(config, "tiny", log=quiet)
    assert teachers.train_clip(config, "tiny", log=quiet, work=tmp_path, stop_after=2) is None
    resumed = teachers.train_clip(config, "tiny", log=quiet, work=tmp_path)
    for name, p in straight[0].state_dict().items():
        assert torch.equal(p, resumed[0].state_dict()[name]), name
    assert torch.equal(straight[1], resumed[1])
    # another configuration does not continue this one's checkpoint
    with pytest.raises(SystemExit, match="other settings"):
        teachers.train_clip(replace(config, clip_lr=0.5), "tiny", log=quiet, work=tmp_path)


def test_a_signal_stops_training_after_the_step_checkpointed(tmp_path, monkeypatch):
    monkeypatch.setitem(teachers.STOP, "signal", signal.SIGTERM)     # as main's handler sets it
    assert teachers.train_clip(replace(TINY, clip_steps=3), "tiny", log=lambda _: None,
                               work=tmp_path) is None
    state = torch.load(tmp_path / "ckpt_CLIP.pt", weights_only=True)
    assert state["step"] == 1 and not state["done"]


def test_framed_captions_keep_the_words_of_the_caption():
    rng = np.random.default_rng(0)
    for text in ("a picture of a red house on the grass", "two trees under the sky", "the sky"):
        framed = teachers.framed_caption(text, rng)
        body = text.removeprefix("a picture of ").removeprefix("a ").removeprefix("the ")
        assert body in framed and framed != text, (text, framed)


def test_subject_crops_name_the_one_class_that_dominates_them():
    """Every subject crop's caption names exactly one class word, and that class holds the largest
    share of the crop's pixels (recounted here from the scene's class map)."""
    from toy import scenes

    rng = np.random.default_rng(0)
    seen = set()
    for i in range(12):
        scene = scenes.draw_scene([0, 99, i], "train")
        found = teachers.subject_crop(scene, rng)
        assert found is not None
        crop, text, (left, top, right, bottom) = found
        assert crop.size == (right - left, bottom - top)
        words = set(re.findall(r"[a-z]+", text))
        named = [k for k, name in enumerate(CLASSES) if name in words or name + "s" in words]
        assert len(named) == 1, text
        share = np.bincount(scene.class_map[top:bottom, left:right].ravel(), minlength=8)
        assert share.argmax() == named[0], (text, share)
        seen.add(named[0])
    assert len(seen) >= 4  # the classes come from the scene, not always the same one


def plain_infonce(image, text, scale):
    logits = scale.exp() * image @ text.t()
    labels = torch.arange(len(image))
    ce = torch.nn.functional.cross_entropy
    return 0.5 * (ce(logits, labels) + ce(logits.t(), labels))


def test_duplicate_captions_are_interchangeable_positives():
    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    scale = torch.tensor(2.0)
    captions = ["grass", "a red car", "grass", "the sky"]
    # two copies of a caption are positives of both images: swapping them changes nothing
    ours = teachers.contrastive_loss(image, text, scale, captions)
    swapped = text[[2, 1, 0, 3]]
    torch.testing.assert_close(teachers.contrastive_loss(image, swapped, scale, captions), ours)
    plain = plain_infonce(image, text, scale)
    assert not torch.allclose(plain_infonce(image, swapped, scale), plain)
    # the text tower embeds equal captions equally; then the loss is plain InfoNCE, value and
    # gradient
    text[2] = text[0]
    ours = teachers.contrastive_loss(image, text, scale, captions)
    torch.testing.assert_close(ours, plain_infonce(image, text, scale))
    torch.testing.assert_close(teachers.contrastive_loss(image, text, scale, ["a", "b", "c", "d"]),
                               plain_infonce(image, text, scale))


def test_saved_layouts_round_trip_through_the_loaders():
    torch.manual_seed(0)
    encoder, head = vit_det.build_vit_det("tiny").eval(), heads.build_head_sam("tiny").eval()
    sd = teachers.sam_state_dict(encoder, head)
    loaded = vit_det.load_sam_encoder(sd, verbose=False)
    assert weights.match_preset(loaded.cfg, vit_det.PRESETS) == "tiny"
    loaded = heads.load_sam_head(sd, verbose=False)
    for name, p in head.state_dict().items():                                     # float16 storage
        torch.testing.assert_close(loaded.state_dict()[name], p, atol=2e-3, rtol=1e-3)
    model = clip.build_clip("tiny").eval()
    seen = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    seen[[49406, 49407, 320]] = True
    back = clip.load_clip(teachers.clip_state_dict(model, seen))
    rows = back.text.token_embedding.weight.abs().sum(1)
    assert rows.nonzero().flatten().tolist() == [320, 49406, 49407]
    torch.testing.assert_close(back.visual.proj, model.visual.proj, atol=2e-3, rtol=1e-3)
