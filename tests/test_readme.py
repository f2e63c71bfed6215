# python -m pytest tests/test_readme.py -q
"""The README's Python snippet runs as printed (on a tiny merged checkpoint instead of the toy
main job's) and writes one mask per prompt."""
import os

from PIL import Image

import model
from conftest import ROOT


def test_using_it_from_python_snippet_runs(tmp_path, monkeypatch):
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    section = readme[readme.index("### Using it from Python"):]
    start = section.index("```python") + len("```python")
    code = section[start:section.index("```", start)]
    checkpoint = str(tmp_path / "samclip.pt")
    model.build_samclip("tiny").save(checkpoint)
    code = code.replace('"runs/toy/samclip.pt"', repr(checkpoint))
    code = code.replace('"assets/example.jpg"', repr(os.path.join(ROOT, "assets", "example.jpg")))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    size = Image.open(os.path.join(ROOT, "assets", "example.jpg")).size
    for prompt in ("house", "tree", "sky"):
        mask = Image.open(tmp_path / f"mask_{prompt}.png")
        assert mask.size == size and mask.mode == "L"
