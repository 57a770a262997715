"""``m2f predict``: run a checkpoint on image files and write overlays plus machine-readable predictions.

Every input is checked before anything is written: each image is decoded in full, the checkpoint is loaded, the
output names are planned and checked. Then, per image, ``<stem>_overlay.png`` and the task's files
(panoptic: ``<stem>_panoptic.png`` + ``<stem>_panoptic.json``; instance: ``<stem>_instances.json``; semantic:
``<stem>_semantic.png``), and at the end one ``predictions.json`` index. Each file is written atomically.

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
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from m2f.cli.exported import add_exported_model_options, exported_model
from m2f.config import TASKS
from m2f.errors import BackendUnavailableError, CheckpointError, InputError, M2FError

# decoded images are kept from validation to prediction up to this many bytes, then decoded again
_IMAGE_CACHE_BYTES = 1 << 30


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="segment images with a checkpoint (overlays + COCO-format predictions)",
        description="Segment images with a checkpoint; write overlays and COCO-format predictions.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", default=None, metavar="PATH",
                        help="m2f / Hugging Face directory or an official checkpoint file (default: the shipped model)")
    add_exported_model_options(source)
    p.add_argument("--preset", metavar="NAME", default=None,
                   help="architecture preset for checkpoints without a config (see `m2f presets`)")
    p.add_argument("--task", choices=TASKS, default=None, help="default: the model's own task")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created if missing)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
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
    p.add_argument("--min-score", type=float, default=0.5, metavar="S",
                   help="instance task: draw instances scoring at least S in the overlay (files keep all)")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no `m2f: note:` lines")
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


def image_id_for(stem: str) -> int | str:
    """COCO-style numeric ids for numeric file names (``000000000139`` -> 139), else the stem."""
    return int(stem) if stem.isdigit() else stem


def output_names(stem: str, task: str) -> dict[str, str]:
    names = {"overlay": f"{stem}_overlay.png"}
    if task == "panoptic":
        names.update(panoptic_png=f"{stem}_panoptic.png", panoptic_json=f"{stem}_panoptic.json")
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
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a directory")


def _load_entries(paths: Sequence[str]) -> list[ImageEntry]:
    from m2f.preprocess import load_image

    files = [Path(p) for p in paths]
    entries, cached_bytes = [], 0
    for path, stem in zip(files, unique_stems(files)):
        image = load_image(path)  # full decode: a corrupt or truncated file fails here, before any output
        entry = ImageEntry(path=path, stem=stem, image_id=image_id_for(stem), height=image.shape[0],
                           width=image.shape[1])
        if cached_bytes + image.nbytes <= _IMAGE_CACHE_BYTES:
            entry.cached = image
            cached_bytes += image.nbytes
        entries.append(entry)
    return entries


def _resolve_device(requested: str | None) -> str:
    import torch

    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return requested


def _load_model(args: argparse.Namespace, device: str) -> Any:
    import m2f

    if args.checkpoint is None:
        from m2f.assets import default_checkpoint_path

        args.checkpoint = str(default_checkpoint_path())
    checkpoint = Path(args.checkpoint)
    if not checkpoint.exists():
        raise CheckpointError(f"checkpoint {checkpoint} does not exist; check the --checkpoint path")
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
    with notes_to_stderr(args.quiet):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    _validate_arguments(args)
    entries = _load_entries(args.images)
    exported = exported_model(args)
    if exported:  # an exported model runs in its own runtime, fed from the host
        from m2f.cli.exported import exported_config
        from m2f.export.runner import RunnerModel, open_runner

        device = "cpu"
        model = RunnerModel(open_runner(exported), exported_config(exported))
    else:
        device = _resolve_device(args.device)
        model = _load_model(args, device)
    config = model.config
    task = args.task or config.default_task
    resize_shortest, max_size = effective_resize(config.test_size, args.resize_shortest, args.max_size, args.no_resize)

    out_dir = Path(args.out)
    planned = [out_dir / "predictions.json"]
    for entry in entries:
        entry.outputs = output_names(entry.stem, task)
        planned.extend(out_dir / name for name in entry.outputs.values())
    if not args.force:
        existing = [str(p) for p in planned if p.exists()]
        if existing:
            more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
            raise M2FError(f"{existing[0]}{more} already exist; pass --force to overwrite or choose another --out")

    predict_entries(model, entries, task, out_dir, batch_size=args.batch_size, device=device,
                    resize_shortest=resize_shortest, max_size=max_size, min_score=args.min_score,
                    progress=not args.quiet)
    index = {
        "checkpoint": str(exported or args.checkpoint),
        "model": config.name,
        "task": task,
        "device": device,
        "backend": args.backend,
        "resize_shortest": resize_shortest,
        "max_size": max_size,
        "images": [
            {"image": str(e.path), "image_id": e.image_id, "height": e.height, "width": e.width, **e.outputs}
            for e in entries
        ],
    }
    from m2f.io import write_json_atomic

    write_json_atomic(out_dir / "predictions.json", index)
    print(f"wrote predictions for {len(entries)} image(s) to {out_dir}")
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
) -> None:
    """Run ``model`` on ``entries`` (batched by padded size) and write each image's files into ``out_dir``.

    Raises :class:`InputError` before writing anything if a batch would need more memory than ``device`` has.
    Notes (:class:`m2f.preprocess.InputNote`) for images with no segment found (panoptic) or no instance scoring
    ``min_score`` (instance)."""
    import torch
    from tqdm import tqdm

    from m2f import postprocess as post
    from m2f.labels import labels_for_config
    from m2f.outputs import write_instances, write_panoptic, write_png, write_semantic
    from m2f.preprocess import InputNote, load_image, padded_shape, preprocess, resized_shape
    from m2f.visualize import draw_instances, draw_panoptic, draw_semantic

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
    with tqdm(total=len(entries), unit="img", desc="predict", disable=None if progress else True) as progress_bar:
        for batch_indices in batches:
            batch_entries = [entries[i] for i in batch_indices]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", InputNote)  # an image decoded again: its notes were given
                images = [e.cached if e.cached is not None else load_image(e.path) for e in batch_entries]
            batch = preprocess(images, config, resize_shortest=resize_shortest, max_size=max_size, device=device,
                               names=[f"image {e.path}" for e in batch_entries])
            pixel_values = batch.pixel_values
            if getattr(model, "fixed_size", None) is not None:  # an exported model of one input size
                from m2f.export.runner import pad_to

                pixel_values = pad_to(pixel_values, model.fixed_size)
            with torch.inference_mode():
                outputs = model(pixel_values)
                results = post.postprocess_task(task, outputs.pred_logits, outputs.pred_masks, batch.image_sizes,
                                                batch.original_sizes, tuple(pixel_values.shape[-2:]), config)

            for entry, image, result in zip(batch_entries, images, results):
                names = entry.outputs or output_names(entry.stem, task)
                if task == "panoptic":
                    if not result.segments:
                        warnings.warn(f"no segment found in image {entry.path}: no query passed the model's "
                                      f"object_mask_threshold {thresholds.object_mask_threshold} and overlap test; "
                                      "its outputs are empty", InputNote)
                    result.segmentation = result.segmentation.cpu()
                    overlay = draw_panoptic(image, result, labels)
                    write_panoptic(out_dir / names["panoptic_png"], out_dir / names["panoptic_json"], result, labels,
                                   entry.image_id)
                elif task == "instance":
                    result = post.InstanceResult(**{k: v.cpu() for k, v in vars(result).items()})
                    if not bool((result.scores >= min_score).any()):
                        warnings.warn(f"no instance in image {entry.path} scores at least --min-score {min_score}; "
                                      f"the overlay shows none (its JSON keeps all {len(result)})", InputNote)
                    overlay = draw_instances(image, result, labels, min_score=min_score)
                    write_instances(out_dir / names["instances_json"], result, labels, entry.image_id)
                else:
                    result = post.SemanticResult(probabilities=result.probabilities, labels=result.labels.cpu())
                    overlay = draw_semantic(image, result, labels)
                    write_semantic(out_dir / names["semantic_png"], result, labels)
                write_png(out_dir / names["overlay"], overlay)
                entry.cached = None  # done with the pixels
            progress_bar.update(len(batch_entries))


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

