"""The user-facing half end to end: PaliGemma.generate/stream on images and strings, the `pali-jax`
command (its subcommand table, one-line errors, Ctrl-C, the installed wheel), run_generate.py, and
loading from the hub cache."""

from __future__ import annotations

import json
import shutil
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from pali_jax import PaliGemma, cli
from test_generate import agree

ROOT = Path(__file__).resolve().parent.parent


def hf_generate(checkpoint, image: Path, prompt: str, n: int):
    inputs = checkpoint["processor"](images=PIL.Image.open(image), text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = checkpoint["hf"].generate(
            **inputs, max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    return out.sequences[0, inputs["input_ids"].shape[1]:].numpy(), torch.stack(out.logits)[:, 0].numpy()


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, str(ROOT / "run_generate.py"), *map(str, args)],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=300,
    )


def json_args(checkpoint) -> tuple:
    return ("--model", checkpoint["converted"], "--image", *checkpoint["images"], "--prompt", "caption en",
            "--max-tokens", 12, "--json", "--no-compilation-cache")


@pytest.fixture(scope="module")
def json_run(checkpoint) -> subprocess.CompletedProcess:
    """run_generate.py --json on both images, one device: checked against transformers, and the
    reference of the --mesh run."""
    return run_cli(*json_args(checkpoint))


def test_json_token_ids_equal_transformers(checkpoint, json_run):
    proc = json_run
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["image"] for line in lines] == [str(p) for p in checkpoint["images"]]
    for line, image in zip(lines, checkpoint["images"]):
        assert agree(np.array(line["token_ids"]), *hf_generate(checkpoint, image, "caption en", 12)) == "equal"
        assert set(line) >= {"text", "token_ids", "boxes", "timings"}


def test_api_generate_and_stream(checkpoint):
    pg = PaliGemma.from_pretrained(checkpoint["hf_dir"])  # HF dir, converted in memory
    prompts = ["caption en", "answer en what is on the table?"]
    results = pg.generate(checkpoint["images"][1], prompts, max_new_tokens=10)
    for prompt, result in zip(prompts, results):
        hf_tokens, hf_logits = hf_generate(checkpoint, checkpoint["images"][1], prompt, 10)
        assert agree(np.array(result.token_ids), hf_tokens, hf_logits) == "equal"
        assert result.text == pg.tokenizer.decode(result.token_ids)
    streamed = "".join(pg.stream(checkpoint["images"][1], prompts[1], max_new_tokens=10))
    assert streamed == results[1].text
    batched = pg.generate(checkpoint["images"][1], prompts, max_new_tokens=10, batch_size=1)
    assert [r.token_ids for r in batched] == [r.token_ids for r in results]


def test_stream_flag_prints_the_same_text(checkpoint, capsys):
    """In this process (the command's output, not the process, is under test: run_generate.py runs
    in one in test_json_token_ids_equal_transformers)."""
    common = ["generate", "--model", str(checkpoint["converted"]), "--image", str(checkpoint["images"][0]),
              "--max-tokens", "8", "--no-compilation-cache"]
    outputs = []
    for extra in ([], ["--stream"]):
        code = cli.main([*common, *extra])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        outputs.append(captured.out)
    plain, streamed = outputs
    assert plain.strip() and plain == streamed


@pytest.mark.parametrize("args, message", [
    (["--image", "missing.png"], "does not exist"),
    (["--image", "{empty}"], "holds no image files"),
    (["--image", "{notimage}"], "notimage.png"),
    (["--model", "{empty}"], "neither a pali-jax directory"),
    (["--model", "no/such-model"], "cannot download no/such-model"),
    (["--beams", "0"], "--beams must be >= 1"),
    (["--greedy", "--temperature", "0.5"], "--greedy conflicts"),
    (["--sample", "--beams", "3"], "--beams=3 runs beam search, which is deterministic"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--dtype", "float16"], "invalid choice"),
    (["--attention-map", "{empty}/map.jpg"], "--attention-map {empty}/map.jpg: unknown image extension '.jpg'"),
    (["--attention-map", "nowhere/map.png"], "folder nowhere does not exist"),
    (["--attention-map", "{empty}/map.png", "--beams", "2"], "drop --stream / --beams"),
])
def test_bad_inputs(checkpoint, tmp_path, capsys, monkeypatch, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notimage.png").write_text("hello")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = [a.format(empty=tmp_path / "empty", notimage=tmp_path / "notimage.png") for a in args]
    message = message.format(empty=tmp_path / "empty")
    if "--model" not in args:
        args = ["--model", str(checkpoint["converted"]), *args]
    if "--image" not in args:
        args += ["--image", str(checkpoint["images"][0])]
    code = cli.main(["generate", *args, "--no-compilation-cache"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_attention_map_draws_each_word(checkpoint, tmp_path, capsys):
    out = tmp_path / "maps.png"
    code = cli.main(["generate", "--model", str(checkpoint["converted"]), "--image", *map(str, checkpoint["images"]),
                              "--max-tokens", "6", "--attention-map", str(out), "--no-compilation-cache"])
    assert code == 0, capsys.readouterr().err
    texts = capsys.readouterr().out.splitlines()
    plain = PaliGemma.from_pretrained(checkpoint["converted"]).generate(checkpoint["images"], "caption en",
                                                                         max_new_tokens=6)
    assert texts == [f"{p}: {r.text}" for p, r in zip(checkpoint["images"], plain)]  # recording changes no answer
    for image in checkpoint["images"]:  # one picture per image, a panel per word
        with PIL.Image.open(tmp_path / f"maps_{image.stem}.png") as picture:
            assert picture.format == "PNG" and picture.width > 100


def test_bad_input_in_a_real_process(checkpoint):
    proc = run_cli("--model", checkpoint["converted"], "--image", "nowhere.jpg")
    assert proc.returncode == 2
    assert proc.stderr == "error: image nowhere.jpg does not exist\n"


def _hub_cache(root: Path, repo: str, files: Path) -> Path:
    """A Hugging Face hub cache holding `repo` at one commit, as snapshot_download leaves it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(files, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return root / "hub"


def test_hub_id_offline(checkpoint, tmp_path):
    script = "from pali_jax import PaliGemma; import sys; pg = PaliGemma.from_pretrained(sys.argv[1]); print(pg.config.text.depth)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "home")}
    missing = subprocess.run([sys.executable, "-c", script, "google/paligemma2-3b-pt-224"], capture_output=True,
                             text=True, env={**env, "HF_HUB_CACHE": str(tmp_path / "empty")}, cwd=ROOT)
    assert missing.returncode != 0 and "cannot download google/paligemma2-3b-pt-224" in missing.stderr
    cache = _hub_cache(tmp_path, "someone/tiny-paligemma", checkpoint["hf_dir"])
    found = subprocess.run([sys.executable, "-c", script, "someone/tiny-paligemma"], capture_output=True, text=True,
                           env={**env, "HF_HUB_CACHE": str(cache)}, cwd=ROOT)
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "3"


def test_mesh_flag_gives_the_same_tokens(checkpoint, json_run):
    single = json_run
    two_devices = f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count=2"  # and conftest's flags
    meshed = run_cli(*json_args(checkpoint), "--mesh", "data=2", env={"XLA_FLAGS": two_devices})
    assert single.returncode == meshed.returncode == 0, single.stderr + meshed.stderr
    tokens = lambda out: [json.loads(line)["token_ids"] for line in out.splitlines()]  # noqa: E731
    assert tokens(meshed.stdout) == tokens(single.stdout)


# -- the pali-jax command ------------------------------------------------------------------------
def test_help_lists_every_subcommand(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in cli.COMMANDS), out


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_each_subcommand_has_its_help(capsys, name):
    assert cli.main([name, "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: pali-jax {name} ")


@pytest.mark.parametrize("argv, message", [
    ([], "no command given"),
    (["serv"], "unknown command 'serv'"),
    (["convert"], "the following arguments are required: src, dst"),
    (["convert-big-vision", "a.npz"], "the following arguments are required: dst"),
    (["export-big-vision", "a", "b", "--dtype", "float16"], "invalid choice: 'float16'"),
    (["verify"], "the following arguments are required: dir"),
    (["verify", "a", "--bogus"], "unrecognized arguments: --bogus"),
    (["generate", "--bogus"], "unrecognized arguments: --bogus"),
    (["generate", "--greedy", "--sample"], "not allowed with argument"),
    (["annotate", "--model", "m"], "the following arguments are required: --images, --out"),
    (["finetune"], "the following arguments are required"),
])
def test_bad_arguments_are_one_line_without_usage(capsys, argv, message):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert message in captured.err and "usage" not in captured.err, captured.err


def test_repository_wrappers_keep_one_line_errors():
    """`python -m convert.*` (missing or unknown arguments) and run_generate.py: no argparse usage."""
    commands = [["-m", "convert.verify"], ["-m", "convert.big_vision", "a.npz"], ["-m", "convert.to_big_vision"],
                ["-m", "convert.hf_to_flax", "a", "b", "--bogus"], [str(ROOT / "run_generate.py"), "--bogus"]]
    procs = [subprocess.Popen([sys.executable, *c], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in commands]
    for command, proc in zip(commands, procs):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and out == "", (command, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and "(see --help)" in err, (command, err)


def test_convert_then_verify(checkpoint, tmp_path, capsys):
    dst = tmp_path / "converted"
    assert cli.main(["convert", checkpoint["hf_dir"], dst]) == 0
    assert capsys.readouterr().out == f"wrote {dst}\n"
    assert cli.main(["verify", dst]) == 0
    assert capsys.readouterr().out.startswith(f"ok: {dst} (")


def test_ctrl_c_during_the_imports_is_one_line():
    """SIGINT while the command imports JAX (seen through -X importtime): exit 130, one line, no
    traceback."""
    proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "pali_jax", "generate"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:  # one line per imported module, as each import ends
        lines.append(line)
        if line.split("|")[-1].strip() == "numpy":  # imported by the command's module only: the handler is in place
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    proc.wait(timeout=60)
    assert proc.returncode == 130, rest[-2000:]
    assert rest.endswith("error: interrupted\n") and "Traceback" not in rest, rest[-2000:]


def _wheel(tmp_path: Path) -> Path:
    """The wheel `pip install .` would install, built from a copy of the sources (the checkout stays clean)."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("pali_jax", "convert"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    [wheel] = (tmp_path / "dist").glob("pali_jax-*.whl")
    return wheel


def test_wheel_installs_the_command_and_no_convert_package(tmp_path):
    with zipfile.ZipFile(_wheel(tmp_path)) as wheel:
        names = wheel.namelist()
        [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = wheel.read(entry_points).decode()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"pali_jax"}
    assert "[console_scripts]\npali-jax = pali_jax.cli:console" in scripts
    assert "pali_jax/assets/demo/model/pali_jax_config.json" in names
