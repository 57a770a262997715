"""The first hour of a new user: thread counts, progress lines, overlays that scale, COCO files pycocotools reads,
``--force`` owning exactly its files, folders / globs / videos / URLs as inputs, and one set of CLI conventions."""
from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from m2f import runtime
from m2f.assets import sample_images
from m2f.cli import build_parser, main
from m2f.cli.options import subcommand_parsers
from m2f.errors import ConfigError, OutputError
from tests.utils import without_progress


def _one_line_error(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = without_progress(err)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("m2f: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------
# threads and timing
# ---------------------------------------------------------------------------------------------------------------


def test_default_threads_never_exceed_the_cores_this_process_may_use(monkeypatch):
    monkeypatch.delenv(runtime.THREADS_ENV, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert runtime.default_threads() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert 1 <= runtime.default_threads() <= runtime.MAX_DEFAULT_THREADS
    monkeypatch.setattr(os, "getloadavg", lambda: (200.0, 0.0, 0.0))  # a busy machine: one thread, not zero
    assert runtime.default_threads() == 1
    monkeypatch.setenv(runtime.THREADS_ENV, "3")
    assert runtime.default_threads() == 3
    monkeypatch.setenv(runtime.THREADS_ENV, "many")
    with pytest.raises(ConfigError, match=r"M2F_NUM_THREADS='many' is not a whole number; set it to a thread count"):
        runtime.default_threads()


def test_use_threads_sets_torch_and_onnxruntime(monkeypatch):
    pytest.importorskip("onnxruntime")
    before = torch.get_num_threads()
    try:
        assert runtime.use_threads(1) == 1 and torch.get_num_threads() == 1
        options = runtime.ort_session_options()
        assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1
        assert runtime.ort_session_options(2).intra_op_num_threads == 2
    finally:
        torch.set_num_threads(before)


def test_median_ms_warms_up_first():
    calls = []
    assert runtime.median_ms(lambda: calls.append(1), repeats=5, warmup=2) >= 0.0
    assert len(calls) == 7


@pytest.mark.parametrize("argv", [
    ["predict", "x.png", "--out", "o"], ["eval", "--data", "d"], ["train", "--data", "d", "--out", "o"],
    ["demo"], ["bench", "model"], ["bench", "kernels"], ["export", "onnx", "--checkpoint", "c", "--out", "o"],
    ["export", "check", "m.onnx"],
])
def test_every_computing_command_takes_threads_quiet_and_the_device_rule(argv):
    silent = argv != ["bench", "kernels"]  # the kernel suite prints no progress: nothing to silence
    args = build_parser().parse_args([*argv, "--threads", "2", *(["--quiet"] if silent else [])])
    assert args.threads == 2 and getattr(args, "quiet", False) is silent
    if "export" not in argv:
        assert args.device == "auto", "one device rule: auto = cuda when available"


def test_bad_thread_count_is_one_line(tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(image)
    code = main(["predict", str(image), "--out", str(tmp_path / "out"), "--threads", "0"])
    _one_line_error(capsys, code, "--threads must be at least 1 thread, got 0")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------------------------------------------


def test_progress_is_plain_lines_in_a_log_and_nothing_when_quiet(capsys):
    with runtime.progress_bar(20, "predict") as bar:
        for _ in range(20):
            bar.update(1)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 10, "one line per tenth of the work, not per item"
    assert re.fullmatch(r"m2f: predict: 20/20 img \([\d.]+ s\)", lines[-1]), lines
    with runtime.stage("exporting"):
        pass
    assert re.fullmatch(r"m2f: exporting \.\.\.\nm2f: exporting: done \([\d.]+ s\)\n", capsys.readouterr().err)
    runtime.set_quiet(True)
    try:
        with runtime.stage("exporting"), runtime.progress_bar(3, "predict") as bar:
            bar.update(3)
    finally:
        runtime.set_quiet(False)
    assert capsys.readouterr().err == ""


def test_progress_after_a_resume_counts_on_and_shows_the_postfix(capsys):
    with runtime.progress_bar(10, "train", unit="it", initial=4) as bar:
        bar.set_postfix(loss="0.500", lr="1.00e-04")
        for _ in range(6):
            bar.update(1)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(": ")[-1].split()[0] for line in lines] == ["5/10", "6/10", "7/10", "8/10", "9/10", "10/10"]
    assert re.fullmatch(r"m2f: train \(loss 0\.500, lr 1\.00e-04\): 10/10 it \([\d.]+ s\)", lines[-1]), lines
    assert without_progress("\n".join(lines)) == [], "the postfix keeps the line a progress line"


def _progress_lines(err: str, what: str) -> list[str]:
    """The `m2f: WHAT...: N/M UNIT (S s)` lines of ``err``; fails on any other line (warnings, a tqdm bar)."""
    assert without_progress(err) == [], err
    assert "\r" not in err and "%|" not in err, f"a terminal's bar in a log: {err!r}"
    return [line for line in err.splitlines() if re.fullmatch(rf"m2f: {what}.*: \d+/\d+ \S+ \([\d.]+ s\)", line)]


def test_synth_eval_and_train_print_plain_progress_lines_in_a_log_and_nothing_when_quiet(tmp_path, capsys, rng):
    """capsys's stderr is no terminal: each command prints plain progress lines there (counting on after a resume),
    and nothing at all under --quiet."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=rng))
    synth = ["data", "synth", "--num", "3", "--size", "64x64", "--seed", str(seed)]
    assert main([*synth, "--out", str(tmp_path / "quiet"), "--quiet"]) == 0
    assert capsys.readouterr().err == "", f"seed {seed}"
    assert main([*synth, "--out", str(tmp_path / "synth")]) == 0
    lines = _progress_lines(capsys.readouterr().err, "synth")
    assert [line.split()[2] for line in lines] == ["1/3", "2/3", "3/3"], f"seed {seed}: {lines}"

    evaluate = ["eval", "--data", str(tmp_path / "synth"), "--limit", "2", "--threads", "1"]
    assert main([*evaluate, "--quiet"]) == 0
    assert capsys.readouterr().err == "", f"seed {seed}"
    assert main(evaluate) == 0
    lines = _progress_lines(capsys.readouterr().err, "eval panoptic")
    assert lines[-1].startswith("m2f: eval panoptic: 2/2 img"), f"seed {seed}: {lines}"

    config = tmp_path / "six_classes.json"
    config.write_text(json.dumps({"num_classes": 6}))
    run = tmp_path / "run"
    train = ["train", "--data", str(tmp_path / "synth"), "--out", str(run), "--threads", "1"]
    assert main([*train, "--config", str(config), "--iters", "1", "--batch-size", "1", "--num-points", "64",
                 "--device", "cpu", "--log-every", "1", "--seed", str(seed), "--quiet"]) == 0
    assert capsys.readouterr().err == "", f"seed {seed}"
    assert main([*train, "--resume", "--iters", "3"]) == 0
    lines = _progress_lines(capsys.readouterr().err, "train")
    assert [line.split(": ")[-1].split()[0] for line in lines] == ["2/3", "3/3"], f"seed {seed}: {lines}"
    assert re.match(r"m2f: train \(loss [\d.]+, lr [\d.e+-]+\): 3/3 it", lines[-1]), f"seed {seed}: {lines}"


# ---------------------------------------------------------------------------------------------------------------
# overlays
# ---------------------------------------------------------------------------------------------------------------


def test_overlay_font_and_lines_scale_with_the_image():
    from m2f.visualize import overlay_scale

    small_font, small_line = overlay_scale(128, 128)
    big_font, big_line = overlay_scale(3000, 4000)
    assert small_font == 8 and small_line == 1, "legible but small on a 128-pixel image"
    assert big_font == 75 and big_line == 6, "about 2.5% of the short edge: visible on a 4000x3000 photo"


def test_crowded_labels_stay_inside_and_apart(rng):
    from m2f.visualize import place_labels

    width, height = 128, 96
    anchors = torch.randint(0, 128, (40, 2), generator=rng).tolist()
    texts = [((x, y % height), f"label {i} 0.87") for i, (x, y) in enumerate(anchors)]
    placed = place_labels((width, height), texts, font_px=8)
    assert placed, f"seed {rng.seed_value}"
    for k, (box, index, _) in enumerate(placed):
        x0, y0, x1, y1 = box
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, f"label {index} cut: {box}, seed {rng.seed_value}"
        for other, other_index, _ in placed[:k]:
            apart = x1 <= other[0] or other[2] <= x0 or y1 <= other[1] or other[3] <= y0
            assert apart, f"labels {index} and {other_index} overlap: {box} {other}, seed {rng.seed_value}"
    # a text wider than the image gets a smaller font rather than being cut
    ((box, _, px),) = place_labels((150, 40), [((75, 20), "a rather long class name")], font_px=20)
    assert px < 20 and box[2] <= 150


def test_coloured_panoptic_map_uses_the_overlay_colours():
    from m2f.labels import dataset_labels
    from m2f.postprocess import PanopticResult, Segment
    from m2f.visualize import color_panoptic

    labels = dataset_labels("coco-panoptic")
    segmentation = torch.zeros(6, 8, dtype=torch.int32)
    segmentation[:3] = 1
    segmentation[3:, :4] = 2
    result = PanopticResult(segmentation=segmentation, segments=[
        Segment(id=1, label=100, score=0.9, is_thing=False, area=24),
        Segment(id=2, label=0, score=0.8, is_thing=True, area=12)])
    colored = color_panoptic(result, labels)
    assert colored.shape == (6, 8, 3) and colored.dtype == np.uint8
    assert tuple(colored[0, 0]) == tuple(labels.colors[100]), "stuff: its class colour"
    assert colored[5, 0].any() and not colored[5, 7].any(), "a thing is coloured, void stays black"


# ---------------------------------------------------------------------------------------------------------------
# predict: inputs, COCO files, --force
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def samples() -> list[Path]:
    return sample_images()[:3]


def test_predictions_file_is_a_coco_dataset_pycocotools_reads(tmp_path, samples, capsys):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    out = tmp_path / "out"
    assert main(["predict", *map(str, samples), "--out", str(out), "--task", "instance", "--quiet"]) == 0
    path = out / "predictions.json"
    index = json.loads(path.read_text())
    assert [i["id"] for i in index["images"]] == [1, 2, 3]
    assert [i["file_name"] for i in index["images"]] == [p.name for p in samples]
    names = {c["id"]: c["name"] for c in index["categories"]}
    assert index["annotations"], "the default model finds instances in its samples"
    for ann in index["annotations"]:
        assert ann["category_name"] == names[ann["category_id"]] and isinstance(ann["image_id"], int)
    coco = COCO(str(path))  # the file as a dataset: images, categories, RLE annotations
    assert sorted(coco.getImgIds()) == [1, 2, 3] and len(coco.getAnnIds()) == len(index["annotations"])
    mask = coco.annToMask(coco.loadAnns(coco.getAnnIds())[0])
    assert mask.shape == (index["images"][0]["height"], index["images"][0]["width"])
    results = coco.loadRes(json.loads((out / index["images"][0]["instances_json"]).read_text()))
    evaluation = COCOeval(coco, results, "segm")
    evaluation.params.imgIds = [1]
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    # scored against themselves; not 1.0, since overlapping instances of one class compete for a match
    assert evaluation.stats[0] > 0.5, evaluation.stats
    capsys.readouterr()


def test_panoptic_predictions_have_names_and_a_coloured_map(tmp_path, samples, capsys):
    out = tmp_path / "out"
    assert main(["predict", str(samples[0]), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert re.search(r"m2f: network on \S+ \(input \d+x\d+\) \.\.\.", err), "one image: its steps are shown"
    stem = samples[0].stem
    index = json.loads((out / "predictions.json").read_text())
    (annotation,) = index["annotations"]
    assert annotation["file_name"] == f"{stem}_panoptic.png"
    assert all("category_name" in s for s in annotation["segments_info"]) and annotation["segments_info"]
    colored = np.asarray(Image.open(out / f"{stem}_panoptic_color.png"))
    assert colored.shape[2] == 3 and colored.max() > 100, "visible colours, not ids near black"


def test_force_removes_the_earlier_runs_files_and_nothing_else(tmp_path, samples, capsys):
    out = tmp_path / "out"
    assert main(["predict", *map(str, samples), "--out", str(out), "--quiet"]) == 0
    (out / "notes.txt").write_text("mine")
    (out / "x_overlay.png").write_bytes(b"a user's file with our naming scheme")
    assert main(["predict", str(samples[1]), "--out", str(out), "--quiet", "--force"]) == 0
    assert "removed 8 file(s) of the earlier run" in capsys.readouterr().out
    stem = samples[1].stem
    assert _files(out) == {"predictions.json", "notes.txt", "x_overlay.png", f"{stem}_overlay.png",
                           f"{stem}_panoptic.png", f"{stem}_panoptic.json", f"{stem}_panoptic_color.png"}


def test_folders_and_glob_patterns(tmp_path, samples, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in samples[:2]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "readme.txt").write_text("not an image")
    for i, spec in enumerate([str(folder), str(folder / "*.png")]):
        out = tmp_path / f"out{i}"
        assert main(["predict", spec, "--out", str(out), "--quiet"]) == 0
        index = json.loads((out / "predictions.json").read_text())
        assert [im["file_name"] for im in index["images"]] == sorted(p.name for p in samples[:2]), spec
    capsys.readouterr()


def _tiny_video(path: Path, rng: torch.Generator, frames: int) -> None:
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for _ in range(frames):
            pixels = torch.randint(0, 256, (48, 64, 3), generator=rng, dtype=torch.uint8).numpy()
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_video_frames_every_n(tmp_path, rng, capsys):
    video = tmp_path / "clip.mp4"
    _tiny_video(video, rng, frames=5)
    out = tmp_path / "out"
    assert main(["predict", str(video), "--every", "2", "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err
    index = json.loads((out / "predictions.json").read_text())
    assert [(im["frame"], im["file_name"]) for im in index["images"]] == [(0, "clip.mp4"), (2, "clip.mp4"),
                                                                           (4, "clip.mp4")]
    assert {f"clip_frame{i:06d}_overlay.png" for i in (0, 2, 4)} <= _files(out)
    assert np.asarray(Image.open(out / "clip_frame000002_overlay.png")).shape == (48, 64, 3)


def test_video_without_pyav_names_the_extra(tmp_path, rng, capsys, monkeypatch):
    import builtins

    video = tmp_path / "clip.mp4"
    _tiny_video(video, rng, frames=1)
    real_import = builtins.__import__

    def no_av(name, *args, **kwargs):
        if name == "av":
            raise ImportError("No module named 'av'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_av)
    code = main(["predict", str(video), "--out", str(tmp_path / "out")])
    _one_line_error(capsys, code, "reading videos needs PyAV: pip install 'm2f[video]'")
    assert not (tmp_path / "out").exists()


def test_min_score_is_range_checked(tmp_path, capsys):
    code = main(["predict", "a.png", "--out", str(tmp_path / "out"), "--min-score", "1.5"])
    _one_line_error(capsys, code, "--min-score", "expected a number from 0 to 1, got 1.5")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# commands that replace a folder, eval's json
# ---------------------------------------------------------------------------------------------------------------


def test_synth_and_demo_never_replace_a_folder_holding_foreign_files(tmp_path, capsys):
    from m2f.cli.demo import DEMO_OWNED
    from m2f.outputs import check_only_owned

    out = tmp_path / "synth"
    assert main(["data", "synth", "--out", str(out), "--num", "3", "--quiet"]) == 0
    assert main(["data", "synth", "--out", str(out), "--num", "2", "--force", "--quiet"]) == 0
    assert _files(out) == {"panoptic.json", "images/000000.png", "images/000001.png", "panoptic/000000.png",
                           "panoptic/000001.png"}, "no stale image of the first run"
    (out / "images" / "holiday.jpg").write_bytes(b"the user's")
    code = main(["data", "synth", "--out", str(out), "--num", "2", "--force", "--quiet"])
    _one_line_error(capsys, code, "holds images/holiday.jpg, which `m2f data synth` did not write")
    assert (out / "images" / "holiday.jpg").read_bytes() == b"the user's"

    demo = tmp_path / "demo_out"
    (demo / "predictions").mkdir(parents=True)
    (demo / "predictions" / "a_overlay.png").write_bytes(b"x")
    (demo / "demo.json").write_text("{}")
    check_only_owned(demo, DEMO_OWNED, "`m2f demo`")  # an earlier demo's folder may be replaced
    (demo / "thesis.tex").write_text("mine")
    with pytest.raises(OutputError, match=r"holds thesis.tex, which `m2f demo` did not write; .* choose another --out"):
        check_only_owned(demo, DEMO_OWNED, "`m2f demo`")
    code = main(["demo", "--out", str(demo), "--no-export"])
    _one_line_error(capsys, code, "thesis.tex")
    assert (demo / "thesis.tex").read_text() == "mine"


def test_eval_json_is_not_overwritten_without_force(tmp_path, capsys):
    metrics = tmp_path / "metrics.json"
    metrics.write_text('{"PQ": 1}')
    code = main(["eval", "--data", str(tmp_path / "nowhere"), "--json", str(metrics)])
    _one_line_error(capsys, code, "metrics.json already exists; pass --force")
    assert metrics.read_text() == '{"PQ": 1}'


# ---------------------------------------------------------------------------------------------------------------
# conventions: every subcommand's --help
# ---------------------------------------------------------------------------------------------------------------

_RST = re.compile(r"``|:(?:class|func|meth|data|mod|attr|ref):`")


def test_every_option_of_every_command_is_documented_and_consistent():
    commands = dict(subcommand_parsers(build_parser()))
    assert {"m2f predict", "m2f demo", "m2f export onnx", "m2f bench model", "m2f data synth"} <= set(commands)
    for command, parser in commands.items():
        text = parser.format_help()
        assert not _RST.search(text), f"{command} --help shows RST markup"
        visible = [a for a in parser._actions if a.help is not argparse.SUPPRESS]
        for action in visible:
            name = "/".join(action.option_strings) or action.dest
            assert action.help, f"{command} {name} has no help"
            assert not {"--output", "--workdir", "--no-progress", "-o"} & set(action.option_strings), \
                f"{command} {name}: output is --out, progress off is --quiet (old spellings hidden aliases)"
            if action.option_strings and action.default not in (None, False) and action.nargs != 0:
                help_text = parser._get_formatter()._expand_help(action) if "%" in action.help else action.help
                shown = parser.formatter_class("m2f")._get_help_string(action)
                assert "default" in shown, f"{command} {name}: default {action.default!r} not shown ({help_text})"
            if action.dest == "device":
                assert action.choices == runtime.DEVICES and action.default == "auto", f"{command} --device"


def test_every_checkpoint_argument_says_it_takes_hub_ids_too():
    """--checkpoint, --reference-checkpoint, train's --init and convert's SRC all read local folders / files and hub
    ids (through resolve_checkpoint); every command's --help says so in the same words."""
    from m2f.cli.options import CHECKPOINT_KINDS

    assert "facebook/mask2former-" in CHECKPOINT_KINDS and "hf://OWNER/NAME@REVISION" in CHECKPOINT_KINDS
    flat_kinds = "".join(CHECKPOINT_KINDS.split())  # --help wraps lines, at hyphens too
    seen = set()
    for command, parser in subcommand_parsers(build_parser()):
        arguments = [a for a in parser._actions if {"--checkpoint", "--reference-checkpoint", "--init"}
                     & set(a.option_strings) or (command, a.metavar) == ("m2f convert", "SRC")]
        for action in arguments:
            name = f"{command} {(action.option_strings or [action.metavar])[0]}"
            seen.add(name)
            assert CHECKPOINT_KINDS in action.help, f"{name}: {action.help}"
        assert "".join(parser.format_help().split()).count(flat_kinds) == len(arguments), f"{command} --help"
    assert seen == {"m2f predict --checkpoint", "m2f eval --checkpoint", "m2f eval --reference-checkpoint",
                    "m2f export onnx --checkpoint", "m2f export check --checkpoint", "m2f export pipeline --checkpoint",
                    "m2f export openvino --checkpoint", "m2f serve --checkpoint", "m2f bench model --checkpoint",
                    "m2f bench serve --checkpoint", "m2f train --init", "m2f convert SRC"}, seen


def test_old_spellings_still_work(tmp_path):
    parser = build_parser()
    assert parser.parse_args(["export", "onnx", "--checkpoint", "c", "--output", "m.onnx"]).output == "m.onnx"
    assert parser.parse_args(["export", "pipeline", "--checkpoint", "c", "--workdir", "w"]).workdir == "w"
    assert parser.parse_args(["bench", "model", "--no-progress"]).quiet is True
    assert parser.parse_args(["convert", "src", "-o", "dst"]).output == "dst"
    assert parser.parse_args(["predict", "a.png", "--output", "o"]).out == "o"


def test_bad_command_lines_are_one_line_errors(tmp_path, capsys):
    code = main(["export", "onnx", "--checkpoint", "c", "--out", str(tmp_path / "m.onnx"), "--msda", "fused"])
    # op modes come from the PluginSpec list, checked by the export itself (one line, before any work)
    assert code == 2 and capsys.readouterr().err == "m2f: error: --msda must be one of decomposed, plugin, got 'fused'\n"
    assert main(["export", "onnx", "--checkpoint", "c"]) == 2
    assert capsys.readouterr().err.startswith("m2f: error: the option --out is required")
    assert _files(tmp_path) == set()
