"""D_CLIP from WebDataset tar shards: the form the paper's 40.6M images (Sec. 4.1: CC3M, CC12M,
YFCC-15M, ImageNet-21k) take at scale, as img2dataset and OpenCLIP write and read them.

Its own concept, apart from data.py's folder reader and sampling.py's sampler: a shard is read
front to back as a stream (from disk or from a `pipe:` command that fetches it from object
storage), never by index. So the order cannot be a permutation of sample indices: each reader (a
rank's DataLoader worker) owns whole shards, and where a resumed run starts is a (shard, sample)
position that only the reader knows, carried by its batches into the checkpoint.

--clip-data forms (OpenCLIP's):
    /data/cc12m/{00000..01242}.tar                     a brace range (zero-padded) or list {a,b}
    /data/cc3m/{00000..00331}.tar::/data/cc12m/...     several specs joined with ::
    pipe:aws s3 cp s3://bucket/{00000..01242}.tar -    a command whose standard output is a tar
A shard holds samples as consecutive files sharing a key: `000001234.jpg` (or png, webp) with
`000001234.txt` / `.json` beside it (only the image is read). A sample's key is that WebDataset
key; when the spec joins several parts, the part's number comes first (`1:000001234`), because
img2dataset numbers every dataset from 0. The key seeds the sample's crop and indexes the teacher
cache (teacher_cache.py).

The plan, the same on every rank:
  - epoch length: the sample count N, from OpenCLIP's sizes.json ({"00000.tar": n, ...}) or
    img2dataset's <shard>_stats.json ({"successes": n}) beside the shards, or --clip-samples N
    (pipe: shards need it). Steps and their resolutions are sampling.VariableResolutionSampler's
    plan for N samples: constant pixels per batch, the step's resolution seeded by (seed, epoch).
  - readers: world x max(1, --workers); reader k = rank * workers + turn. Each epoch permutes the
    shards by (seed, epoch) and reader k takes every (readers)-th from k on, so readers never
    share a shard. Fewer shards than readers is refused (not split by sample).
  - reader k serves the steps s with s % workers == k % workers, its batch_size(r_s) samples each,
    read in stored order through its shards; one that runs out before the epoch's last step
    starts again at its first shard (its shards held less than its steps take, or one was cut).
  - resume: each batch carries (reader, shard number, samples of it read); the checkpoint holds
    the last one the loop took per reader, and a resumed reader opens that shard, passes over
    the samples it read (reading, not decoding) and goes on: the same batches in the same order.

Bad input, each one line naming the shard, the run going on with the other shards: a corrupt or
truncated tar (its samples before the damage are kept; a tar cut exactly between two members
reads as complete, as tar stores no count), a pipe: command that exits non-zero, a sample without
an image (a placeholder with ok=False, counted as unreadable by sampling.EpochTally, as is an image
PIL cannot decode). A spec part that matches no file is refused at start.

Shape legend: B batch, r the step's side, T the teacher's side.
"""

import hashlib
import io
import json
import os
import signal
import subprocess
import tarfile
import tempfile
import zlib

import torch
import torch.distributed as dist

import data
import sampling

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")  # a sample's image: the first of these it holds
# how tarfile and gzip report a damaged stream (a local file that vanished: OSError too)
READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)

# ----------------------------------------------------------------------------- specs


def is_shard_spec(source):
    """True when --clip-data names tar shards (a part is a pipe: command or ends in .tar, .tar.gz,
    .tgz) rather than a folder or a list file of images."""
    parts = source.split("::")
    return any(p.startswith("pipe:") or p.endswith(TAR_SUFFIXES) for p in parts)


def expand_spec(spec):
    """A shard spec -> [(url, part)]: each `::` part's names in order, `part` its number. A part
    of local files that matches none is refused (ValueError); one that misses some (img2dataset
    leaves no tar for a shard whose downloads all failed) says how many in one line and goes on.
    pipe: commands are run only when read."""
    urls = []
    for part, pattern in enumerate(spec.split("::")):
        names = data.expand_braces(pattern)  # bash's, as data.py reads SA-1B tar specs
        if pattern.startswith("pipe:"):
            urls += [(name, part) for name in names]
            continue
        found = [name for name in names if os.path.isfile(name)]
        if not found:
            raise ValueError(
                f"shard spec {pattern!r} matches no file ({len(names)} name(s) tried, e.g. "
                f"{names[0]}); expected tar shards such as /data/cc12m/{{00000..01242}}.tar"
            )
        if len(found) < len(names):
            missing = [name for name in names if not os.path.isfile(name)]
            print(
                f"[shards] {pattern}: {len(missing)} of {len(names)} shards missing (e.g. "
                f"{missing[0]}); reading the other {len(found)}",
                flush=True,
            )
        urls += [(name, part) for name in found]
    return urls


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None


def count_samples(urls):
    """The samples of shards `urls`, from what the writers leave beside them: OpenCLIP's
    sizes.json ({"00000.tar": n, ...}) in a shard's folder, else img2dataset's
    <name>_stats.json ({"successes": n, ...}). Raises ValueError naming a shard with neither
    (pipe: shards have none): the epoch's length is then --clip-samples'."""
    sizes = {}  # folder -> its sizes.json, read once
    total = 0
    for url in urls:
        if url.startswith("pipe:"):
            raise ValueError(
                f"{url}: a pipe: shard has no sizes.json or _stats.json to count its samples; "
                "pass --clip-samples N (the samples of one epoch)"
            )
        folder, name = os.path.split(url)
        if folder not in sizes:
            path = os.path.join(folder, "sizes.json")
            sizes[folder] = read_json(path) if os.path.isfile(path) else {}
        stem = name[: -len(next(s for s in TAR_SUFFIXES if name.endswith(s)))]
        stats = os.path.join(folder, f"{stem}_stats.json")
        if name in sizes[folder]:
            total += int(sizes[folder][name])
        elif os.path.isfile(stats):
            total += int(read_json(stats).get("successes", 0))
        else:
            raise ValueError(
                f"{url}: no sample count beside it (OpenCLIP's sizes.json or img2dataset's "
                f"{stem}_stats.json); pass --clip-samples N (the samples of one epoch)"
            )
    return total


def key_hash(key):
    """A sample key (str) -> a 63-bit int, the same on every machine and run (unlike hash()):
    the key's part of a crop seed and of the teacher cache's index."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ----------------------------------------------------------------------------- one shard


def split_name(name):
    """A tar member's name -> (sample key, field), WebDataset's rule: the key is the path up to the
    first dot of the file name, the field the rest, lower-cased ("a/0012.seg.png" -> ("a/0012",
    "seg.png")); field None for a name without a dot (not a sample's file)."""
    folder, slash, base = name.rpartition("/")
    stem, dot, field = base.partition(".")
    return folder + slash + stem, field.lower() if dot else None


def read_shard(url, skip=0):
    """The samples of shard `url` in stored order from its `skip`-th on: (key, {field: bytes}),
    consecutive files of one key forming a sample. The skipped samples' bytes are passed over,
    not copied. A damaged tar or a pipe: command that fails ends the shard with one line naming it
    and what happened, after the samples read before (see the module docstring)."""
    process = None
    errors = None
    if url.startswith("pipe:"):
        errors = tempfile.TemporaryFile()  # the command's own message, for the one line
        command = url[len("pipe:") :]
        process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=errors)
        stream = process.stdout
    else:
        try:
            stream = open(url, "rb")
        except OSError as e:
            print(f"[shards] {url}: cannot be opened ({e.strerror}); shard skipped", flush=True)
            return
    count = 0  # samples read or skipped so far
    problem = None
    try:
        try:
            tar = tarfile.open(fileobj=stream, mode="r|*")  # streaming: no seeks, any compression
            key = None
            fields = {}
            for member in tar:
                name_key, field = split_name(member.name)
                if not member.isfile() or field is None:
                    continue
                if name_key != key:
                    if key is not None:
                        if count >= skip:
                            yield key, fields
                        count += 1
                    key = name_key
                    fields = {}
                if count >= skip:
                    fields[field] = tar.extractfile(member).read()
            if key is not None:
                if count >= skip:
                    yield key, fields
                count += 1
            while stream.read(1 << 16):  # the end-of-archive padding, so a pipe's writer ends
                pass
        except READ_ERRORS as e:
            reason = str(e) or type(e).__name__
            problem = f"corrupt or truncated tar after {count} samples ({reason})"
        if process is not None:
            stream.close()  # a writer still writing into a tar we gave up on gets SIGPIPE
            status = process.wait()
            if status not in (0, -signal.SIGPIPE):
                errors.seek(0)
                said = errors.read().decode(errors="replace").split()  # the command's message
                problem = f"command exited with status {status} after {count} samples"
                problem += f" ({' '.join(said)[-200:]})" if said else ""
        if problem is not None:
            print(f"[shards] {url}: {problem}; the rest of this shard is skipped", flush=True)
    finally:
        stream.close()
        if process is not None:
            if process.poll() is None:  # the reader stopped early (an epoch's end)
                process.kill()
            process.wait()
            errors.close()


def reader_samples(urls, start):
    """Every sample a reader reads, over its shards `urls` in turn and round again, from
    start = (shard number, samples of it already read) on; shard number n is urls[n % len(urls)].
    Yields (shard number, samples of it read after this one, url, key, fields)."""
    shard, skip = start
    empty = 0  # shards in a row that held no sample
    while True:
        url = urls[shard % len(urls)]
        read = skip
        for key, fields in read_shard(url, skip):
            read += 1
            yield shard, read, url, key, fields
        empty = empty + 1 if read == 0 else 0
        if empty == len(urls):
            raise ValueError(
                f"none of this reader's {len(urls)} shards holds a readable sample "
                f"(e.g. {urls[0]}; each named above)"
            )
        shard += 1
        skip = 0


# ----------------------------------------------------------------------------- the dataset


class ShardImages(sampling.VariableResolutionSampler, torch.utils.data.IterableDataset):
    """D_CLIP read from tar shards: data.CLIPImages' samples (the same crop and two views,
    data.clip_views), in the order the module docstring plans. It is its own batch plan (the
    VariableResolutionSampler of its sample count: plan, set_epoch, len) and a DataLoader's
    IterableDataset of whole batches (use batch_size=None), so sampling.stream drives it as it
    drives a sampler. Each batch is data.collate's plus "shard_position" (3,) = (reader, shard
    number, samples of that shard read), for ReaderPositions.
    base_batch_size: per rank at the smallest side; workers: the DataLoader's num_workers."""

    def __init__(
        self,
        spec,
        base_batch_size,
        resolutions=(224, 448),
        num_samples=None,
        teacher_size=224,
        seed=0,
        scale=(0.5, 1.0),
        fixed_crops=False,
        native_size=None,
        num_replicas=1,
        rank=0,
        workers=0,
    ):
        self.spec = spec
        listed = expand_spec(spec)
        self.urls = [url for url, _ in listed]
        self.prefixes = {url: f"{part}:" if "::" in spec else "" for url, part in listed}
        num_samples = num_samples or count_samples(self.urls)
        super().__init__(num_samples, base_batch_size, resolutions, None, num_replicas, rank, seed)
        self.teacher_size = teacher_size
        self.scale = scale
        self.fixed_crops = fixed_crops  # every epoch's crop drawn as epoch 0's (teacher cache)
        self.native_size = native_size
        self.workers = max(1, workers)  # workers=0: the loop's own process reads, one reader
        self.readers = num_replicas * self.workers
        if self.readers > len(self.urls):
            raise ValueError(
                f"--clip-data {spec} holds {len(self.urls)} shards, fewer than the {self.readers} "
                f"readers (world size {num_replicas} x {self.workers} workers) that each need "
                "shards of their own: use fewer --workers, fewer ranks or more shards"
            )
        self.positions = [[0, 0]] * self.readers  # (shard number, samples read) per reader
        self.resumed = None  # ReaderPositions.state of the checkpoint resumed from

    def check_size(self, min_images):
        """Raise ValueError when an epoch holds fewer samples than one step takes."""
        if self.num_samples < min_images:
            raise ValueError(
                f"--clip-data {self.spec} holds {self.num_samples} samples; one training step "
                f"takes {min_images} (--clip-batch)"
            )

    def resume(self, state):
        """Start where a checkpoint's readers stood (ReaderPositions.state); set_epoch uses it."""
        if state["readers"] != self.readers:
            raise ValueError(
                f"--resume: the checkpoint's D_CLIP shards were read by {state['readers']} "
                f"readers (world size x workers), this run has {self.readers}; resume with the "
                "same world size and --workers"
            )
        self.resumed = state

    def set_epoch(self, epoch, start_step=0):
        """As the sampler's; a start_step past 0 needs the positions of resume() for `epoch`."""
        super().set_epoch(epoch, start_step)
        if start_step == 0:
            self.positions = [[0, 0]] * self.readers
        elif self.resumed is not None and self.resumed["epoch"] == epoch:
            self.positions = self.resumed["positions"]
        else:
            raise ValueError(
                f"--clip-data {self.spec}: where the shard readers stood at step {start_step} of "
                f"epoch {epoch} is unknown (no shard positions in the checkpoint)"
            )

    def epoch_shards(self, epoch):
        """The shards in epoch `epoch`'s order, the same on every rank."""
        g = torch.Generator().manual_seed(data.derive_seed(self.seed, epoch, 2))  # 0, 1: sampler
        return [self.urls[i] for i in torch.randperm(len(self.urls), generator=g).tolist()]

    def batches(self, epoch, start_step=0):
        """This DataLoader worker's batches of `epoch` from step `start_step` on. The DataLoader
        asks its workers in turn, worker 0 first, so worker w hosts the reader whose turn is
        (start_step + w) % workers and serves steps start_step + w, + workers, ..."""
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        workers = 1 if info is None else info.num_workers
        if workers != self.workers:
            raise ValueError(f"ShardImages planned for {self.workers} workers, read by {workers}")
        steps = self.plan(epoch)
        turn = (start_step + worker) % workers
        reader = self.rank * workers + turn
        mine = self.epoch_shards(epoch)[reader :: self.readers]
        samples = reader_samples(mine, self.positions[reader])
        try:
            for step in range(start_step + worker, len(steps), workers):
                resolution, _ = steps[step]
                picked = [next(samples) for _ in range(self.batch_size(resolution))]
                views = []
                for _, read, url, key, fields in picked:
                    views.append(self.decode(url, read - 1, key, fields, resolution, epoch))
                batch = data.collate(views)
                shard, read = picked[-1][:2]
                batch["shard_position"] = torch.tensor([reader, shard, read])
                yield batch
        finally:
            samples.close()  # ends a pipe: command still running

    def decode(self, url, position, key, fields, resolution, epoch):
        """One sample -> CLIPImages' sample dict, its crop seeded by (seed, epoch, key); a sample
        without an image, named in one line, or with one PIL cannot decode: zeros, ok=False."""
        key = self.prefixes[url] + key
        T = self.teacher_size
        sample = {
            "student": torch.zeros(3, resolution, resolution),
            "teacher": torch.zeros(3, T, T),
            "index": position,  # the sample's place in its shard
            "ok": False,
            "path": f"{url}:{key}",
            "key": key,
        }
        image = next((fields[f] for f in IMAGE_FIELDS if f in fields), None)
        if image is None:
            print(
                f"[shards] {url}: sample {key} has no image (fields {', '.join(sorted(fields))}; "
                f"expected {'/'.join(IMAGE_FIELDS)}); counted as unreadable",
                flush=True,
            )
            return sample
        try:
            img = data.load_image(io.BytesIO(image))
        except data.ImageError:
            return sample
        crop_epoch = 0 if self.fixed_crops else epoch
        g = torch.Generator().manual_seed(data.derive_seed(self.seed, crop_epoch, key_hash(key)))
        student, teacher = data.clip_views(img, resolution, g, T, self.native_size, self.scale)
        sample.update(student=student, teacher=teacher, ok=True)
        return sample


class ShardPass(torch.utils.data.IterableDataset):
    """Every sample of some shards once, each shard in stored order, at the teacher's side with
    its fixed crop: teacher_cache's pass over D_CLIP. chunks: numbers into images.urls; worker w
    of a DataLoader (batch_size=None) reads chunks[w::workers]. Yields data.collate batches of up
    to batch_size with "chunk" and "end" False, and {"chunk", "end": True} after a shard's last."""

    def __init__(self, images, chunks, batch_size):
        self.images = images
        self.chunks = chunks
        self.batch_size = batch_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        workers = 1 if info is None else info.num_workers
        T = self.images.teacher_size
        for chunk in self.chunks[worker::workers]:
            url = self.images.urls[chunk]
            pending = []
            for position, (key, fields) in enumerate(read_shard(url)):
                pending.append(self.images.decode(url, position, key, fields, T, epoch=0))
                if len(pending) == self.batch_size:
                    yield {**data.collate(pending), "chunk": chunk, "end": False}
                    pending = []
            if pending:
                yield {**data.collate(pending), "chunk": chunk, "end": False}
            yield {"chunk": chunk, "end": True}


# ----------------------------------------------------------------------------- resume


class ReaderPositions:
    """Where each reader stands in the current epoch, from the batches the loop took (not those
    the workers read ahead): reader -> (epoch, shard number, samples of it read). A resumed run
    starts from the checkpoint's `resumed` state: a reader stands there until its next batch."""

    def __init__(self, readers, resumed=None):
        self.readers = readers
        self.latest = {}
        if resumed is not None:
            for reader, (shard, read) in enumerate(resumed["positions"]):
                self.latest[reader] = (resumed["epoch"], shard, read)

    def update(self, epoch, batch):
        reader, shard, read = batch["shard_position"].tolist()
        self.latest[reader] = (epoch, shard, read)

    def state(self, epoch, world, device):
        """All ranks' readers in epoch `epoch`, for the checkpoint (call on every rank): {"epoch",
        "readers", "positions": [[shard number, samples read]] per reader, [0, 0] for a reader
        that took no batch yet in this epoch}."""
        table = torch.full((self.readers, 3), -1, dtype=torch.int64)  # (readers, 3), -1: unknown
        for reader, row in self.latest.items():
            table[reader] = torch.tensor(row)
        table = table.to(device)
        if world > 1:
            dist.all_reduce(table, op=dist.ReduceOp.MAX)  # each reader's row lives on one rank
        positions = []
        for row_epoch, shard, read in table.tolist():
            positions.append([shard, read] if row_epoch == epoch else [0, 0])
        return {"epoch": epoch, "readers": self.readers, "positions": positions}
