"""`pali-jax generate` (pali_jax.generate_command; `run_generate.py` in a checkout): bad models,
images, prompts and drawing targets in one line, pipes and read-only homes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hostile import (  # noqa: F401  (fixtures)
    BAD_IMAGES,
    LOAD_BAD,
    LONG_TEXT,
    READ_ONLY,
    ROOT,
    assert_one_line_error,
    cache_dir,
    call,
    converted,
    generate_main,
    images,
    listing,
)

from pali_jax import generate_command


@pytest.mark.parametrize("case", ["config a list", "params missing", "chunk truncated", "chunk missing, no manifest",
                                  "manifest entries not objects"])
def test_run_generate_refuses_a_damaged_model(converted, images, capsys, case):
    damage, message = LOAD_BAD[case]
    damage(converted)
    code, out, err = call(generate_main, ["--model", converted, "--image", images["good"], "--no-compilation-cache"], capsys)
    assert_one_line_error(code, err, message)
    assert out == ""


@pytest.mark.parametrize("name", sorted(BAD_IMAGES) + ["folder.png"])
def test_run_generate_stops_before_any_output_on_a_bad_image(checkpoint, images, tmp_path, capsys, name):
    draw_dir = tmp_path / "drawings"
    draw_dir.mkdir()
    message = BAD_IMAGES.get(name, "holds no image files")
    args = ["--model", checkpoint["converted"], "--image", images["good"], images[name], "--draw",
            draw_dir / "boxes.png", "--no-compilation-cache"]
    code, out, err = call(generate_main, args, capsys)
    assert_one_line_error(code, err, message)
    assert out == "" and listing(draw_dir) == []


@pytest.mark.parametrize("name", ["zero.png", "truncated.png", "bomb.png"])
def test_skip_bad_images_answers_the_good_ones(checkpoint, images, cache_dir, capsys, name):
    args = ["--model", checkpoint["converted"], "--image", images[name], images["good"], "--skip-bad-images",
            "--max-tokens", 3, "--compilation-cache", cache_dir]
    code, out, err = call(generate_main, args, capsys)
    assert code == 0, err
    assert len(out.splitlines()) == 1  # the good image's answer (alone, so without its path)
    assert err.count("warning: skipped") == 1 and BAD_IMAGES[name] in err and "Traceback" not in err


def test_skip_bad_images_with_nothing_left(checkpoint, images, capsys):
    args = ["--model", checkpoint["converted"], "--image", images["zero.png"], "--skip-bad-images",
            "--no-compilation-cache"]
    code, _, err = call(generate_main, args, capsys)
    assert code == 2 and err.endswith("error: no readable image left to answer\n") and "Traceback" not in err


@pytest.mark.parametrize("prompt, message", [
    (LONG_TEXT, "exceed the model's 8192 positions"),
    ("caption <image> en", "contains '<image>'"),
])
def test_run_generate_refuses_prompts(checkpoint, images, capsys, prompt, message):
    args = ["--model", checkpoint["converted"], "--image", images["good"], "--prompt", prompt, "--no-compilation-cache"]
    code, out, err = call(generate_main, args, capsys)
    assert_one_line_error(code, err, message)
    assert out == ""


@pytest.mark.parametrize("draw, message", [
    ("{tmp}/missing/boxes.png", "does not exist"),
    ("{tmp}/boxes.xyz", "unknown image extension '.xyz'"),
    ("{tmp}", "is a folder"),
])
def test_run_generate_refuses_draw_targets(checkpoint, images, tmp_path, capsys, draw, message):
    args = ["--model", checkpoint["converted"], "--image", images["good"], "--draw", draw.format(tmp=tmp_path),
            "--no-compilation-cache"]
    code, out, err = call(generate_main, args, capsys)
    assert_one_line_error(code, err, message)
    assert listing(tmp_path) == []


def test_drawings_of_same_named_images_do_not_collide(tmp_path):
    paths = generate_command.draw_paths(str(tmp_path / "out.png"), [Path("a/cat.jpg"), Path("b/cat.jpg"), Path("dog.png")])
    assert [p.name for p in paths] == ["out_cat.png", "out_cat_2.png", "out_dog.png"]
    assert generate_command.draw_paths(str(tmp_path / "one.jpg"), [Path("x.png")]) == [tmp_path / "one.jpg"]


def test_draw_without_boxes_says_so(checkpoint, images, cache_dir, tmp_path, capsys):
    args = ["--model", checkpoint["converted"], "--image", images["good"], "--draw", tmp_path / "boxes.png",
            "--max-tokens", 3, "--compilation-cache", cache_dir]
    code, out, err = call(generate_main, args, capsys)
    assert code == 0, err
    assert "no boxes in the answer" in err and not (tmp_path / "boxes.png").exists()


@pytest.mark.parametrize("mode, message", [
    (0o777, "writable by other users"),
    (0o770, "writable by other users"),
])
def test_compilation_cache_writable_by_others_is_refused(checkpoint, images, tmp_path, capsys, mode, message):
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(mode)
    args = ["--model", checkpoint["converted"], "--image", images["good"], "--compilation-cache", cache]
    code, out, err = call(generate_main, args, capsys)
    assert_one_line_error(code, err, message)


def test_explicit_compilation_cache_that_cannot_be_made(checkpoint, images, capsys):
    args = ["--model", checkpoint["converted"], "--image", images["good"], "--compilation-cache", READ_ONLY / "xla"]
    code, out, err = call(generate_main, args, capsys)
    assert_one_line_error(code, err, "cannot use the compilation cache directory")


def test_run_generate_into_a_closed_pipe(checkpoint, images, tmp_path):
    """`run_generate.py ... | head -1`: the reader goes away; no traceback, exit 141 (SIGPIPE's)."""
    script = (f"{sys.executable} {ROOT / 'run_generate.py'} --model {checkpoint['converted']} --image "
              f"{images['good']} {images['good']} --max-tokens 2 --compilation-cache {tmp_path / 'xla'} | head -c 0; "
              "exit ${PIPESTATUS[0]}")
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 141 and "Traceback" not in proc.stderr and "Error" not in proc.stderr, proc.stderr


def test_read_only_home_warns_once_and_runs(checkpoint, images):
    env = {**os.environ, "HOME": str(READ_ONLY / "nobody")}
    proc = subprocess.run([sys.executable, str(ROOT / "run_generate.py"), "--model", str(checkpoint["converted"]),
                           "--image", str(images["good"]), "--max-tokens", "3"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("warning: cannot use the compilation cache") == 1 and "Traceback" not in proc.stderr
    assert proc.stdout.strip() != ""
