"""Write the data of train.py's built-in presets, once, before training (nanoGPT's prepare.py).

    python -m toy.prepare          # data/toy: the README main job's D_CLIP and D_SAM
    python -m toy.prepare tiny     # data/tiny: the seconds-long tiny preset's

Both are toy-world scenes of the train hand (toy.layouts.write_training_set): data/<preset>/clip
(images, read by data.CLIPImages) and data/<preset>/sa1b (the SA-1B layout, read by data.SA1B),
the folders train.PRESETS names. Same seed, same bytes; a set already complete is kept, so running
it again costs nothing. train.py itself never writes data: it names this step when the folder is
missing.
"""

import argparse
import os
import time

from toy import layouts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# scenes per set: D_CLIP images and D_SAM images (each with its instance masks)
SIZES = {"toy": dict(clip_images=400, sam_images=100), "tiny": dict(clip_images=24, sam_images=6)}


def prepare(preset, seed=0, root=None):
    """Write data/<preset> (or `root`) -> (D_CLIP folder, D_SAM folder)."""
    root = root or os.path.join(ROOT, "data", preset)
    return layouts.write_training_set(root, **SIZES[preset], seed=seed)


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Write the toy-world data of train.py's built-in presets into data/<preset>."
    )
    p.add_argument(
        "preset",
        nargs="?",
        default="toy",
        choices=list(SIZES),
        help="which preset's data (default toy)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of every scene (default 0)")
    p.add_argument("--out", help="folder to write instead of data/<preset>")
    args = p.parse_args(argv)
    start = time.time()
    clip_folder, sam_folder = prepare(args.preset, args.seed, args.out)
    print(
        f"toy.prepare: {args.preset} data in {clip_folder} and {sam_folder} "
        f"({time.time() - start:.1f} s)"
    )


if __name__ == "__main__":
    main()
