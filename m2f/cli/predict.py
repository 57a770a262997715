"""``m2f predict``: run a checkpoint on images (files, folders, glob patterns, video frames) and write overlays
plus machine-readable predictions.

Every input is checked before anything is written: each image (each selected video frame) is decoded in full, the
checkpoint is loaded, the output names are planned and checked. Then, per image, ``<stem>_overlay.png`` and the
task's files (panoptic: ``<stem>_panoptic.png`` (COCO ids) + ``<stem>_panoptic.json`` + ``<stem>_panoptic_color.png``
(for viewing); instance: ``<stem>_instances.json``; semantic: ``<stem>_semantic.png``), and at the end
``predictions.json``: one COCO-format file (``images`` with integer ids and their input files, ``categories``,
``annotations``) that also lists every file the run wrote, so that ``--force`` removes exactly the earlier run's
files this run did not write again. Each file is written atomically. A video's frames are named
``<video stem>_frame<index>``.

Images are resized as the official test-time pipeline does for the model's dataset (detectron2 ResizeShortestEdge to
the config's ``test_size``, e.g. 800 / 1333 for COCO) unless ``--resize-shortest`` / ``--max-size`` say otherwise
or ``--no-resize`` turns it off; results are always at the original image size. A run that would not fit in the
device's memory is refused before it starts. What m2f handled about an input (transparency, extra frames, a tiny
image, no segment found, ...) is printed as one ``m2f: note: ...`` line each on stderr; ``--quiet`` drops them.

Batching (``--batch-size``) only puts images with the same padded input size in one batch. The network has no
padding mask: its convolutions and attention see the zero padding, so an image padded to a larger size (as it
would be next to a larger image) gets different outputs. Grouping by padded size keeps each image's input tensor
exactly what it is at batch size 1.
"""
from __future__ import annotations

import argparse
import contextlib
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from m2f.cli.exported import add_exported_model_options, exported_model
from m2f.config import TASKS
from m2f.errors import BackendUnavailableError, InputError, M2FError

# decoded images are kept from validation to prediction up to this many bytes, then decoded again
_IMAGE_CACHE_BYTES = 1 << 30


VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")
INDEX_NAME = "predictions.json"


def register(sub: argparse._SubParsersAction) -> None:
    from m2f.cli.options import (add_checkpoint_option, add_device_option, add_out_option, add_quiet_option,
                                 add_threads_option, probability)

    p = sub.add_parser(
        "predict",
        help="segment images with a checkpoint (overlays + COCO-format predictions)",
        description="Segment images, folders of images, glob patterns or videos with a checkpoint; write overlays "
                    "and COCO-format predictions.",
    )
    p.add_argument("images", nargs="+", metavar="INPUT",
                   help="image files (PNG, JPEG, ...), folders of images, glob patterns ('photos/*.jpg', quoted) or "
                        f"video files ({', '.join(VIDEO_SUFFIXES)}; needs pip install 'm2f[video]')")
    p.add_argument("--every", type=int, default=1, metavar="N", help="videos: segment every N-th frame")
    source = p.add_mutually_exclusive_group()
    add_checkpoint_option(source, "model to run", default="the shipped default model")
    add_exported_model_options(source)
    p.add_argument("--preset", metavar="NAME", default=None,
                   help="architecture preset for checkpoints without a config (see `m2f presets`)")
    p.add_argument("--task", choices=TASKS, default=None, help="default: the model's own task")
    add_out_option(p, "output folder (created if missing)", required=True, old=("--output",))
    add_device_option(p)
    p.add_argument("--batch-size", type=int, default=1, metavar="N",
                   help="images per forward pass; only images with the same padded size share a batch")
    p.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto", help="kernel backend")
    p.add_argument("--resize-shortest", type=int, default=None, metavar="N",
                   help="resize the short edge to N pixels first (detectron2 ResizeShortestEdge); default: the "
                        "model's test size (its config's test_size, e.g. 800 for COCO models)")
    p.add_argument("--max-size", type=int, default=None, metavar="N",
                   help="cap the resized long edge at N pixels (default: the model's, unless --resize-shortest)")
    p.add_argument("--no-resize", action="store_true",
                   help="feed images at their own size (needs much more memory for large images)")
    p.add_argument("--min-score", type=probability, default=0.5, metavar="S",
                   help="instance task: draw instances scoring at least S (0..1) in the overlay (files keep all)")
    p.add_argument("--force", action="store_true",
                   help="overwrite existing outputs and remove the files of an earlier run in --out that this run "
                        "does not write again (only files its predictions.json lists)")
    add_threads_option(p)
    add_quiet_option(p, "progress bar, stage lines and `m2f: note:` lines")
    p.set_defaults(func=run)


@dataclass
class ImageEntry:
    """One input image: where it is, what its outputs are called, its size."""

    path: Path
    stem: str
    image_id: int | str
    height: int
    width: int
    cached: Any = None  # the decoded (H, W, 3) uint8 array, when it fits the cache
    outputs: dict[str, str] = field(default_factory=dict)
    frame: int | None = None  # a video's frame index; None for an image file

    def pixels(self) -> Any:
        """The (H, W, 3) uint8 image: the cached one, else decoded again."""
        if self.cached is not None:
            return self.cached
        if self.frame is not None:
            return next(image for index, image in video_frames(self.path, 1, start=self.frame))
        from m2f.preprocess import InputNote, load_image

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InputNote)  # an image decoded again: its notes were given
            return load_image(self.path)


@dataclass(frozen=True)
class Source:
    """One thing to segment: an image file, or one frame of a video."""

    path: Path
    frame: int | None = None

    @property
    def stem(self) -> str:
        return self.path.stem if self.frame is None else f"{self.path.stem}_frame{self.frame:06d}"


def _is_url(text: str) -> bool:
    return re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*://", text) is not None


def expand_inputs(specs: Sequence[str]) -> list[Path]:
    """Image / video paths from what the user typed: files as given, folders as their images and videos (sorted,
    not recursive), glob patterns as their matches (sorted). URLs and patterns matching nothing are refused."""
    import glob

    paths: list[Path] = []
    for spec in specs:
        if _is_url(spec):
            raise InputError(f"{spec} is a URL; m2f reads local files only: download it first (e.g. curl -O "
                             f"{spec}) and pass the file")
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.iterdir()
                           if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES)
            if not found:
                raise InputError(f"folder {path} holds no images or videos ({', '.join(IMAGE_SUFFIXES)}, "
                                 f"{', '.join(VIDEO_SUFFIXES)}); pass image files or another folder")
            paths.extend(found)
        elif not path.exists() and glob.has_magic(spec):
            found = sorted(Path(p) for p in glob.glob(spec) if Path(p).is_file())
            if not found:
                raise InputError(f"the pattern {spec} matches no file; check it (quote it so the shell does not "
                                 "expand it first)")
            paths.extend(found)
        else:
            paths.append(path)  # a missing file is reported by the decoder, with its name
    return paths


def _import_av() -> Any:
    try:
        import av
    except ImportError:
        raise BackendUnavailableError("reading videos needs PyAV: pip install 'm2f[video]' (or pip install av)"
                                      ) from None
    return av


def video_frames(path: Path, every: int, start: int = 0):
    """(frame index, (H, W, 3) uint8) for frames ``start``, ``start + every``, ... of a video file."""
    av = _import_av()
    try:
        with av.open(str(path)) as container:
            for index, frame in enumerate(container.decode(video=0)):
                if index >= start and (index - start) % every == 0:
                    yield index, frame.to_ndarray(format="rgb24")
    except av.FFmpegError as exc:
        raise InputError(f"video {path} cannot be read ({exc}); check that it is a complete video file") from None


def unique_stems(paths: Sequence[Path]) -> list[str]:
    """File stems, made unique: the first of equal stems keeps it, later ones get ``_2``, ``_3``, ... (skipping
    any name another input already has)."""
    all_stems = {p.stem for p in paths}
    taken: set[str] = set()
    out = []
    for path in paths:
        stem = path.stem
        if stem in taken:
            k = 2
            while f"{stem}_{k}" in taken or f"{stem}_{k}" in all_stems:
                k += 1
            stem = f"{stem}_{k}"
        taken.add(stem)
        out.append(stem)
    return out


def image_ids_for(stems: Sequence[str]) -> list[int]:
    """Integer COCO image ids: the file names' own numbers when every name is one and they are distinct
    (``000000000139`` -> 139, matching COCO's ground truth), else 1, 2, ... in input order."""
    if all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
        return [int(s) for s in stems]
    return list(range(1, len(stems) + 1))


def output_names(stem: str, task: str) -> dict[str, str]:
    names = {"overlay": f"{stem}_overlay.png"}
    if task == "panoptic":
        names.update(panoptic_png=f"{stem}_panoptic.png", panoptic_json=f"{stem}_panoptic.json",
                     panoptic_color=f"{stem}_panoptic_color.png")
    elif task == "instance":
        names.update(instances_json=f"{stem}_instances.json")
    else:
        names.update(semantic_png=f"{stem}_semantic.png")
    return names


def group_into_batches(padded_sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Indices grouped by equal padded size (groups in order of first appearance, input order inside), then cut
    into batches of at most ``batch_size``."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, size in enumerate(padded_sizes):
        groups.setdefault(tuple(size), []).append(index)
    batches = []
    for members in groups.values():
        for start in range(0, len(members), batch_size):
            batches.append(members[start : start + batch_size])
    return batches


def _validate_arguments(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.no_resize and (args.resize_shortest is not None or args.max_size is not None):
        raise InputError("--no-resize contradicts --resize-shortest / --max-size; pass one or the other")
    if args.resize_shortest is not None and args.resize_shortest < 1:
        raise InputError(f"--resize-shortest must be a positive number of pixels, got {args.resize_shortest}")
    if args.max_size is not None and args.max_size < 1:
        raise InputError(f"--max-size must be a positive number of pixels, got {args.max_size}")
    if args.every < 1:
        raise InputError(f"--every must be at least 1 (every frame), got {args.every}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a directory")


def _load_entries(specs: Sequence[str], every: int = 1) -> list[ImageEntry]:
    """Every input decoded in full (a corrupt or truncated file fails here, before any output); the pixels kept
    while they fit the cache."""
    from m2f.preprocess import load_image

    decoded: list[tuple[Source, tuple[int, int], Any]] = []
    cached_bytes = 0

    def keep(source: Source, image: Any) -> None:
        nonlocal cached_bytes
        fits = cached_bytes + image.nbytes <= _IMAGE_CACHE_BYTES
        cached_bytes += image.nbytes if fits else 0
        decoded.append((source, image.shape[:2], image if fits else None))

    for path in expand_inputs(specs):
        if path.suffix.lower() not in VIDEO_SUFFIXES:
            keep(Source(path), load_image(path))
            continue
        if not path.is_file():
            raise InputError(f"video {path} does not exist; check the path")
        before = len(decoded)
        for index, image in video_frames(path, every):
            keep(Source(path, index), image)
        if len(decoded) == before:
            raise InputError(f"video {path} has no frames; check that it is a complete video file")
    stems = unique_stems([Path(source.stem) for source, _, _ in decoded])
    return [ImageEntry(path=source.path, stem=stem, image_id=image_id, height=shape[0], width=shape[1],
                       cached=image, frame=source.frame)
            for (source, shape, image), stem, image_id in zip(decoded, stems, image_ids_for(stems))]


def _load_model(args: argparse.Namespace, device: str) -> Any:
    import m2f

    if args.checkpoint is None:
        from m2f.assets import default_checkpoint_path

        args.checkpoint = str(default_checkpoint_path())
    from m2f.checkpoints import resolve_checkpoint

    checkpoint = resolve_checkpoint(args.checkpoint)  # a hub id: its downloaded snapshot
    model = m2f.from_pretrained(str(checkpoint), preset=args.preset, backend=args.backend, device=device)
    return model.eval()


def effective_resize(test_size: tuple[int, int], resize_shortest: int | None, max_size: int | None,
                no_resize: bool) -> tuple[int | None, int | None]:
    """The (shortest edge, max size) to resize to: the options given, the rest from the model's ``test_size``
    (an explicit --resize-shortest alone has no cap, as detectron2's ResizeShortestEdge without max_size)."""
    if no_resize:
        return None, None
    if resize_shortest is not None:
        return resize_shortest, max_size
    return test_size[0], max_size if max_size is not None else test_size[1]


@contextlib.contextmanager
def notes_to_stderr(quiet: bool = False):
    """Print :class:`m2f.preprocess.InputNote` warnings as one ``m2f: note: ...`` line each (none if ``quiet``);
    other warnings as usual."""
    from m2f.preprocess import InputNote

    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if quiet else "always", InputNote)
        show_other = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, InputNote):
                print(f"m2f: note: {message}", file=sys.stderr)
            else:
                show_other(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def run(args: argparse.Namespace) -> int:
    from m2f import runtime

    runtime.set_quiet(args.quiet)
    with notes_to_stderr(args.quiet):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from m2f import runtime

    _validate_arguments(args)
    threads = runtime.use_threads(args.threads)
    entries = _load_entries(args.images, args.every)
    exported = exported_model(args)
    if exported:  # an exported model runs in its own runtime, fed from the host
        from m2f.cli.exported import exported_config
        from m2f.export.runner import RunnerModel, open_runner

        device = "cpu"
        model = RunnerModel(open_runner(exported, threads=threads), exported_config(exported))
    else:
        device = runtime.resolve_device(args.device)
        model = _load_model(args, device)
    config = model.config
    task = args.task or config.default_task
    resize_shortest, max_size = effective_resize(config.test_size, args.resize_shortest, args.max_size, args.no_resize)

    out_dir = Path(args.out)
    owned = [INDEX_NAME]  # what this run writes: its index lists them, so the next --force knows what is stale
    for entry in entries:
        entry.outputs = output_names(entry.stem, task)
        owned.extend(entry.outputs.values())
    if not args.force:
        existing = [str(out_dir / name) for name in owned if (out_dir / name).exists()]
        if existing:
            more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
            raise M2FError(f"{existing[0]}{more} already exist; pass --force to overwrite or choose another --out")

    annotations = predict_entries(model, entries, task, out_dir, batch_size=args.batch_size, device=device,
                                  resize_shortest=resize_shortest, max_size=max_size, min_score=args.min_score,
                                  progress=not args.quiet)
    from m2f.io import write_json_atomic
    from m2f.labels import labels_for_config
    from m2f.outputs import coco_categories, numbered_annotations, stale_owned_files

    index = {
        "info": {"checkpoint": str(exported or args.checkpoint), "model": config.name, "task": task, "device": device,
                 "backend": args.backend, "threads": threads, "resize_shortest": resize_shortest,
                 "max_size": max_size},
        # COCO: image id <-> input file; our per-image output files beside
        "images": [{"id": e.image_id, "file_name": e.path.name, "path": str(e.path), "height": e.height,
                    "width": e.width, **({"frame": e.frame} if e.frame is not None else {}), **e.outputs}
                   for e in entries],
        "categories": coco_categories(labels_for_config(config)),
        # panoptic: COCO panoptic results; instance: COCO annotations (COCO(...) loads this file as is); semantic:
        # one {image_id, file_name} per image
        "annotations": numbered_annotations(annotations) if task == "instance" else annotations,
        "files": sorted(owned),
    }
    stale = stale_owned_files(out_dir / INDEX_NAME, owned)  # read before the new index replaces the old one
    write_json_atomic(out_dir / INDEX_NAME, index)
    for path in stale:
        path.unlink(missing_ok=True)
    removed = f"; removed {len(stale)} file(s) of the earlier run" if stale else ""
    print(f"wrote predictions for {len(entries)} image(s) to {out_dir} ({INDEX_NAME}: COCO format){removed}")
    return 0


def predict_entries(
    model: Any,
    entries: Sequence[ImageEntry],
    task: str,
    out_dir: Path,
    *,
    batch_size: int = 1,
    device: str = "cpu",
    resize_shortest: int | None = None,
    max_size: int | None = None,
    min_score: float = 0.5,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run ``model`` on ``entries`` (batched by padded size) and write each image's files into ``out_dir``;
    return the COCO annotations (panoptic: one per image; instance: one per instance; semantic: one per image).

    Raises :class:`InputError` before writing anything if a batch would need more memory than ``device`` has.
    Notes (:class:`m2f.preprocess.InputNote`) for images with no segment found (panoptic) or no instance scoring
    ``min_score`` (instance)."""
    import torch

    from m2f import postprocess as post
    from m2f import runtime
    from m2f.labels import labels_for_config
    from m2f.outputs import write_instances, write_panoptic, write_png, write_semantic
    from m2f.preprocess import InputNote, padded_shape, preprocess, resized_shape
    from m2f.visualize import color_panoptic, draw_instances, draw_panoptic, draw_semantic

    config = model.config
    labels = labels_for_config(config)
    thresholds = config.postprocess

    def network_size(entry: ImageEntry) -> tuple[int, int]:
        if resize_shortest is None:
            return entry.height, entry.width
        return resized_shape(entry.height, entry.width, resize_shortest, max_size)

    padded = [padded_shape([network_size(e)], config.size_divisibility) for e in entries]
    batches = group_into_batches(padded, batch_size)
    _check_memory(config, task, entries, batches, padded, device, resize_shortest is not None)
    out_dir.mkdir(parents=True, exist_ok=True)
    annotations: list[dict[str, Any]] = []

    def step(what: str) -> Any:  # a single image: its steps, since a bar at 0/1 says nothing for minutes
        return runtime.stage(what) if progress and len(entries) == 1 else contextlib.nullcontext()

    with runtime.progress_bar(len(entries), "predict", quiet=not progress) as progress_bar:
        for batch_indices in batches:
            batch_entries = [entries[i] for i in batch_indices]
            images = [e.pixels() for e in batch_entries]
            batch = preprocess(images, config, resize_shortest=resize_shortest, max_size=max_size, device=device,
                               names=[f"image {e.path}" for e in batch_entries])
            pixel_values = batch.pixel_values
            if getattr(model, "fixed_size", None) is not None:  # an exported model of one input size
                from m2f.export.runner import pad_to

                pixel_values = pad_to(pixel_values, model.fixed_size)
            with torch.inference_mode(), step(f"network on {batch_entries[0].path.name} (input "
                                              f"{pixel_values.shape[-2]}x{pixel_values.shape[-1]})"):
                outputs = model(pixel_values)
                results = post.postprocess_task(task, outputs.pred_logits, outputs.pred_masks, batch.image_sizes,
                                                batch.original_sizes, tuple(pixel_values.shape[-2:]), config)

            for entry, image, result in zip(batch_entries, images, results):
                with step(f"writing the outputs of {entry.path.name}"):
                    names = entry.outputs or output_names(entry.stem, task)
                    if task == "panoptic":
                        if not result.segments:
                            warnings.warn(f"no segment found in image {entry.path}: no query passed the model's "
                                          f"object_mask_threshold {thresholds.object_mask_threshold} and overlap "
                                          "test; its outputs are empty", InputNote)
                        result.segmentation = result.segmentation.cpu()
                        overlay = draw_panoptic(image, result, labels)
                        annotations.append(write_panoptic(out_dir / names["panoptic_png"],
                                                          out_dir / names["panoptic_json"], result, labels,
                                                          entry.image_id))
                        write_png(out_dir / names["panoptic_color"], color_panoptic(result, labels))
                    elif task == "instance":
                        result = post.InstanceResult(**{k: v.cpu() for k, v in vars(result).items()})
                        if not bool((result.scores >= min_score).any()):
                            warnings.warn(f"no instance in image {entry.path} scores at least --min-score "
                                          f"{min_score}; the overlay shows none (its JSON keeps all {len(result)})",
                                          InputNote)
                        overlay = draw_instances(image, result, labels, min_score=min_score)
                        annotations.extend(write_instances(out_dir / names["instances_json"], result, labels,
                                                           entry.image_id))
                    else:
                        result = post.SemanticResult(probabilities=result.probabilities, labels=result.labels.cpu())
                        overlay = draw_semantic(image, result, labels)
                        write_semantic(out_dir / names["semantic_png"], result, labels)
                        annotations.append({"image_id": entry.image_id, "file_name": names["semantic_png"]})
                    write_png(out_dir / names["overlay"], overlay)
                    entry.cached = None  # done with the pixels
            progress_bar.update(len(batch_entries))
    return annotations


def _check_memory(config: Any, task: str, entries: Sequence[ImageEntry], batches: Sequence[Sequence[int]],
                  padded: Sequence[tuple[int, int]], device: str, resized: bool) -> None:
    """Refuse, before allocating anything, a batch that needs more than the device's available memory."""
    from m2f.preprocess import available_memory_bytes, inference_bytes

    available = available_memory_bytes(device)
    if available is None:
        return
    for batch in batches:
        need = sum(inference_bytes(config, padded[i], (entries[i].height, entries[i].width), task)
                   for i in batch)
        if need <= available:
            continue
        first = entries[batch[0]]
        fixes = ("a smaller --resize-shortest / --max-size" if resized
                 else f"drop --no-resize (the model's test size is {config.test_size[0]} / {config.test_size[1]})")
        if len(batch) > 1:
            fixes = f"a smaller --batch-size, {fixes}"
        raise InputError(
            f"image {first.path} ({first.height}x{first.width}, network input {padded[batch[0]][0]}x"
            f"{padded[batch[0]][1]}{f', batch of {len(batch)}' if len(batch) > 1 else ''}) needs about "
            f"{need / 1e9:.1f} GB, more than the {available / 1e9:.1f} GB available on {device}; use {fixes}, or "
            "downscale the image"
        )

