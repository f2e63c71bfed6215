# python -m pytest tests/test_clip.py -q
"""clip.py against OpenCLIP: outputs of the tiny official-layout fixture, the tokenizer's cases, the
key layout of the full-size ViT-B-16 / ViT-L-14 checkpoints, and the refusal of bad files."""

import json
import os
import shlex
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import clip  # noqa: E402
import weights  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"


@pytest.fixture(scope="module")
def tiny():
    return torch.load(FIXTURES / "clip_tiny.pt", weights_only=True)


def assert_matches_fixture(model, tiny, atol=1e-4, rtol=1e-4):
    with torch.no_grad():
        image_features = model.encode_image(tiny["inputs"]["image"])
        text_features = model.encode_text(tiny["inputs"]["tokens"])
    assert torch.allclose(image_features, tiny["outputs"]["image_features"], atol=atol, rtol=rtol)
    assert torch.allclose(text_features, tiny["outputs"]["text_features"], atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------- numerics

def test_parity_with_openclip(tiny, capsys):
    model = clip.load_clip(tiny["state_dict"])
    assert "<state dict> is tiny" in capsys.readouterr().out
    assert not model.training and model.config == clip.PRESETS["tiny"]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp16 file, fp32 module
    assert_matches_fixture(model, tiny)


def test_parity_from_path(tiny, tmp_path, capsys):
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(tiny["state_dict"], path)
    assert_matches_fixture(clip.load_clip(path), tiny)
    assert f"{path} is tiny" in capsys.readouterr().out


def test_forward_patch_tokens_and_resolution(tiny):
    model = clip.load_clip(tiny["state_dict"])
    image = tiny["inputs"]["image"]
    tokens = tiny["inputs"]["tokens"]
    with torch.no_grad():
        img, txt = model(image, tokens)
        assert torch.allclose(img.norm(dim=-1), torch.ones(2))
        assert torch.allclose(txt.norm(dim=-1), torch.ones(6))
        pooled, patches = model.visual(image, return_patch_tokens=True)
        assert torch.allclose(pooled, model.encode_image(image)) and patches.shape == (2, 16, 32)
        # the causal mask makes a shorter context give the same features (the longest text uses 77)
        short = tokens[:5, :32]
        assert torch.allclose(model.encode_text(short), model.encode_text(tokens[:5]), atol=1e-5)
        # other resolutions: the patch grid of the position table is resized, the class row kept
        pos = model.visual.position_embedding_for(6, 3)
        assert pos.shape == (1 + 18, 128)
        assert torch.equal(pos[0], model.visual.positional_embedding[0])
        assert model.visual.position_embedding_for(4, 4) is model.visual.positional_embedding
        wide = torch.nn.functional.interpolate(image, size=(96, 48), mode="bilinear")
        out = model.encode_image(wide)
        assert out.shape == (2, 32) and torch.isfinite(out).all()


def test_build_clip_fresh():
    torch.manual_seed(0)
    model = clip.build_clip("tiny")
    assert abs(model.logit_scale.exp().item() - 1 / 0.07) < 1e-4
    with torch.no_grad():
        img, txt = model(torch.randn(2, 3, 64, 64), clip.tokenize(["a dog", "a cat", "a bird"]))
    assert img.shape == (2, 32) and txt.shape == (3, 32)


# ----------------------------------------------------------------------------- safetensors

def write_safetensors(path, state_dict, dtype):
    """The format by hand (8-byte header length, JSON header, raw little-endian bytes), so the test
    does not trust the reader it checks."""
    name = {torch.float16: "F16", torch.bfloat16: "BF16"}[dtype]
    header = {"__metadata__": {"format": "pt"}}
    blobs = []
    offset = 0
    for key, value in state_dict.items():
        raw = value.to(dtype).reshape(-1).view(torch.int16).numpy().astype("<i2").tobytes()
        header[key] = {"dtype": name, "shape": list(value.shape),
                       "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    Path(path).write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def test_safetensors_fp16_and_bf16(tiny, tmp_path):
    fp16 = tmp_path / "open_clip_model.safetensors"
    write_safetensors(fp16, tiny["state_dict"], torch.float16)  # the fixture's own values: exact
    assert_matches_fixture(clip.load_clip(fp16), tiny)

    bf16 = tmp_path / "bf16.safetensors"
    write_safetensors(bf16, tiny["state_dict"], torch.bfloat16)  # rounded weights: close, not equal
    model = clip.load_clip(bf16)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(model.encode_image(tiny["inputs"]["image"]),
                                                    tiny["outputs"]["image_features"])
    assert (cos > 0.99).all()


# ----------------------------------------------------------------------------- full-size layouts

def layout_state_dict(name):
    """The keys and shapes of the official checkpoint, as meta tensors (ViT-L is 1.7 GB in fp32)."""
    state_dict = {}
    for line in (FIXTURES / f"{name}_keys.tsv").read_text().splitlines():
        key, shape, _ = line.split("\t")
        state_dict[key] = torch.empty(json.loads(shape), device="meta")
    return state_dict


@pytest.mark.parametrize("name", ["openclip_vit_b_16", "openclip_vit_l_14"])
def test_full_size_layouts(name):
    official = layout_state_dict(name)
    config, preset = clip.clip_config_from_state_dict(official, name)
    assert preset == name and config == clip.PRESETS[name]
    with torch.device("meta"):
        model = clip.build_clip(name)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    remapped = weights.remap(official, clip.CLIP_REMAP)
    assert ours == {k: tuple(v.shape) for k, v in remapped.items()}
    weights.check_keys(model, remapped, name, "CLIP")


def test_remap_anchors_the_text_keys():
    keys = {"visual.transformer.resblocks.0.ln_1.weight": 0,
            "transformer.resblocks.0.ln_1.weight": 0,
            "visual.positional_embedding": 0,
            "positional_embedding": 0}
    assert sorted(weights.remap(keys, clip.CLIP_REMAP)) == [
        "text.positional_embedding", "text.transformer.resblocks.0.ln_1.weight",
        "visual.positional_embedding", "visual.transformer.resblocks.0.ln_1.weight"]


def test_no_preset_is_said(tiny, capsys):
    second_block = "visual.transformer.resblocks.1."
    state_dict = {k: v for k, v in tiny["state_dict"].items() if not k.startswith(second_block)}
    model = clip.load_clip(state_dict)
    assert model.config.vision_layers == 1
    said = capsys.readouterr().out
    assert "matches no preset: embed 32, image 64 / patch 16, vision 128 x 1" in said


def test_openai_extra_keys_are_dropped(tiny):
    state_dict = dict(tiny["state_dict"], input_resolution=torch.tensor(64),
                      context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    assert_matches_fixture(clip.load_clip(state_dict), tiny)


# ----------------------------------------------------------------------------- bad input

def test_sam_checkpoint_is_refused(tmp_path):
    with pytest.raises(weights.CheckpointError, match="<state dict>.*not a CLIP"):
        clip.load_clip({"image_encoder.pos_embed": torch.zeros(1, 4, 4, 8)})
    path = str(FIXTURES / "sam_tiny.pt")
    with pytest.raises(weights.CheckpointError, match="image_encoder") as error:
        clip.load_clip(path)
    assert path in str(error.value)


@pytest.mark.parametrize("key", ["visual.ln_post.bias", "ln_final.weight"])
def test_missing_key_is_named(tiny, key):
    state_dict = {k: v for k, v in tiny["state_dict"].items() if k != key}
    with pytest.raises(weights.CheckpointError, match=key.replace(".", r"\.")):
        clip.load_clip(state_dict)


def test_truncated_file_is_refused(tiny, tmp_path):
    path = tmp_path / "truncated.pt"
    torch.save(tiny["state_dict"], path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(weights.CheckpointError) as error:
        clip.load_clip(path)
    assert str(path) in str(error.value)


class Payload:
    """Unpickling this object runs a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def test_malicious_pickle_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"visual.conv1.weight": Payload(marker)}, path)
    with pytest.raises(weights.CheckpointError) as error:
        clip.load_clip(path)
    assert str(path) in str(error.value) and not marker.exists()
    # the payload is really in the file: its pickle names os.system (checked without unpickling)
    import zipfile
    with zipfile.ZipFile(path) as z:
        pickled = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert b"system" in pickled


# ----------------------------------------------------------------------------- tokenizer

def test_tokenizer_cases():
    cases = json.loads((FIXTURES / "tokenizer_cases.json").read_text())
    for context_length in (77, 16):
        calls = [c for c in cases["batch_calls"] if c["context_length"] == context_length]
        tokens = clip.tokenize([c["text"] for c in calls], context_length=context_length)
        assert tokens.dtype == torch.int64 and tokens.shape == (len(calls), context_length)
        for row, call in zip(tokens.tolist(), calls):
            assert row == call["tokens"], call["text"]
    single = cases["single_string_call"]
    tokens = clip.tokenize(single["text"])
    assert tokens.shape == (1, 77) and tokens[0].tolist() == single["tokens"]


def test_tokenizer_on_fixture_texts(tiny):
    assert torch.equal(clip.tokenize(tiny["inputs"]["texts"]), tiny["inputs"]["tokens"])


def test_tokenizer_truncates_with_end_token():
    tokens = clip.tokenize("dog " * 100, context_length=8)
    assert tokens[0].tolist() == [49406] + [1929] * 6 + [49407]


def test_trim_padding_keeps_end_tokens_of_texts_with_id_zero(tiny):
    # "!" is BPE id 0, so counting non-zero ids undercounts this prompt and would cut its end token.
    tokens = clip.tokenize(['yes!"# sir', "a dog"])
    assert (tokens[0, 1:-1] == 0).any() and tokens[0].tolist().index(49407) == 5
    trimmed = clip.trim_padding(tokens)
    assert (tokens[0] != 0).sum() == 5  # the old count: one short of the end token
    assert trimmed.shape == (2, 6) and trimmed[0, -1] == 49407 and trimmed[1, 3] == 49407
    model = clip.load_clip(tiny["state_dict"])
    with torch.no_grad():
        assert torch.allclose(model.encode_text(trimmed), model.encode_text(tokens), atol=1e-5)


def test_encode_text_by_length_equals_one_trimmed_call_with_fewer_tokens(tiny):
    """Texts grouped by length, each group cut after its own end token, batches of 2: the rows come
    back in order with the numbers of one call on the whole trimmed batch, from fewer token rows."""
    model = clip.load_clip(tiny["state_dict"])
    texts = ["a dog", "a photo of a small red car on the road", "cat", "a dog", "the sky at night",
             "x y"]
    tokens = clip.tokenize(texts)
    seen = []

    def encode(t):
        seen.append(t.shape)
        return model.encode_text(t)
    with torch.no_grad():
        got = clip.encode_text_by_length(encode, tokens, batch_size=2)
        want = model.encode_text(clip.trim_padding(tokens))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    ends = tokens.argmax(-1)
    assert max(s[0] for s in seen) <= 2 and sum(s[0] for s in seen) == len(texts)
    token_rows = sum(s[0] * s[1] for s in seen)
    assert token_rows == int((ends + 1).sum()) < clip.trim_padding(tokens).numel()
