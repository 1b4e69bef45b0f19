"""The `accumlab` command line: commands, help, one-line usage errors and exit codes."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from accumlab.cli import build_parser, config_from_args, main
from accumlab.cli.demo import format_demo, run_demo
from accumlab.cli.options import MEANING
from accumlab.engine.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
PRETRAINED = ROOT / "data" / "pretrained"


def _python(code: str, timeout: int = 300, env: dict | None = None):
    """Run Python code in a fresh interpreter (nothing imported yet) from the repository root."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"accumlab {command}: error: "), err
    return lines[0]


def test_train_on_the_shipped_corpus_prints_a_summary(capsys, tmp_path):
    code = main(["train", "--max-steps", "2", "--micro-batch-size", "2", "--accum-steps", "2",
                 "--limit", "40", "--eval-limit", "8", "--no-progress",
                 "--run-dir", str(tmp_path), "--save", str(tmp_path / "model")])
    out = capsys.readouterr().out
    assert code == 0
    assert "optimizer steps    2" in out and "eval perplexity" in out
    assert len((tmp_path / "history.jsonl").read_text().splitlines()) == 2
    assert (tmp_path / "model" / "config.json").is_file()


def test_help_and_argument_errors_import_no_torch():
    code = """
import sys
from accumlab.cli.main import build_parser, main
build_parser().parse_args(["train", "--max-steps", "3", "--precision", "bf16"])
for argv in (["--help"], ["train", "--help"], ["compare", "--precision", "fp8"]):
    try:
        main(argv)
    except SystemExit:
        pass
heavy = sorted({"torch", "transformers", "accumlab.engine.trainer"} & set(sys.modules))
assert not heavy, heavy
"""
    run = _python(code)
    assert run.returncode == 0, run.stderr
    assert "exit codes" in run.stdout and "--schedule" in run.stdout


def test_import_accumlab_is_lazy_and_keeps_its_public_face():
    code = """
import sys
import accumlab
assert "torch" not in sys.modules
from accumlab import TrainConfig, check_loop, train
assert accumlab.train is train and "torch" in sys.modules
assert set(accumlab.__all__) <= set(dir(accumlab))
accumlab.engine.checkpoint, accumlab.lab.equivalence.compare_gradients  # as before: loaded
try:
    accumlab.no_such_name
except AttributeError:
    print("ok")
"""
    run = _python(code)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


def test_help_gives_meaning_default_and_allowed_values(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "1  a finding" in out and "2  a usage error" in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("--schedule {constant,linear,cosine} learning-rate schedule after warmup "
                 "(default: constant)",
                 "--precision {fp64,fp32,bf16,fp16}", "(default: fp32)",
                 "--optimizer {adamw,sgd} optimizer (default: adamw)",
                 "--max-steps N optimizer steps to run"):
        assert text in out, text


def test_every_trainconfig_field_is_a_documented_flag():
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    flags = {a.dest: a for a in train._actions}
    for f in dataclasses.fields(TrainConfig):
        assert f.name in flags, f"no --{f.name.replace('_', '-')} flag"
        assert f.name in MEANING, f"accumlab/cli/options.py: MEANING has no text for {f.name}"
        assert "(default: " in flags[f.name].help


@pytest.mark.parametrize("argv, flag", [
    (["compare", "--precision", "fp8"], "--precision"),
    (["compare", "--k", "0"], "--k"),
    (["plan", "--gpu-memory", "16GB", "--global-batch-tokens", "8", "--seq-len", "-5"],
     "--seq-len"),
    (["train", "--limit", "0"], "--limit"),
    (["train", "--schedule", "cosin"], "--schedule"),
    (["train", "--max-steps", "two"], "--max-steps"),
    (["train", "--eval-every", "often"], "'epoch'"),
])
def test_argument_errors_are_one_line_with_exit_code_2(capsys, argv, flag):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert flag in _one_error_line(capsys, argv[0])


@pytest.fixture
def bad_inputs(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "broken.toml").write_text("[train]\nmicro_batch_size = 2\naccum_steps =\n")
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "oov.jsonl").write_text('{"input_ids": [5, 6, 7]}\n{"input_ids": [1, 99999]}\n')
    (tmp_path / "model.bin").write_text("a file that must not be overwritten")
    return tmp_path


@pytest.mark.parametrize("argv, words", [
    (["--config", "{d}/folder"], "is a folder"),
    (["--config", "{d}/missing.toml"], "no such file"),
    (["--config", "{d}/broken.toml"], "broken.toml is not valid TOML: Invalid value (at line 3"),
    (["--data", "{d}/empty.jsonl"], "holds no examples"),
    (["--data", "{d}/folder"], "is a folder"),
    (["--data", "{d}/oov.jsonl"], "oov.jsonl line 2: input_ids holds 99999"),
    (["--device", "cuda"], "--device cuda: no CUDA GPU is visible"),
    (["--pretrained", "{d}/no_model_here"], "--pretrained"),
    (["--pretrained", "{d}/folder"], "--pretrained"),
    (["--save", "{d}/model.bin"], "--save"),
])
def test_user_errors_are_one_line_with_exit_code_2(capsys, monkeypatch, bad_inputs, argv, words):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a GPU machine
    argv = [a.format(d=bad_inputs) for a in argv]
    assert main(["train", "--max-steps", "1", "--no-progress", *argv]) == 2
    assert words in _one_error_line(capsys, "train")
    assert (bad_inputs / "model.bin").read_text() == "a file that must not be overwritten"


def test_a_diverged_run_is_one_line_with_exit_code_1(capsys):
    assert main(["train", "--max-steps", "4", "--limit", "32", "--micro-batch-size", "4",
                 "--lr", "1e30", "--no-progress"]) == 1
    assert "lower the learning rate" in _one_error_line(capsys, "train").lower()


def test_no_progress_hides_every_progress_bar():
    # A fresh interpreter without the test suite's HF_HUB_DISABLE_PROGRESS_BARS, loading a
    # pretrained model (transformers draws a "Loading weights" bar for that; seen with
    # --progress) and training (accumlab's "train" bar).
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_PROGRESS_BARS",
                                                            "TQDM_DISABLE")}
    argv = ["train", "--pretrained", str(PRETRAINED), "--max-steps", "2", "--limit", "8",
            "--micro-batch-size", "2", "--eval-limit", "2", "--no-progress"]
    run = _python(f"import sys; from accumlab.cli.main import main; sys.exit(main({argv!r}))",
                  env=env)
    assert run.returncode == 0, run.stderr
    assert run.stderr == "", run.stderr
    assert "optimizer steps    2" in run.stdout


def test_toml_config_and_flags_override_it(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[train]\nmicro_batch_size = 3\naccum_steps = 5\nmax_steps = 7\n'
                    'schedule = "cosine"\n')
    args = build_parser().parse_args(["train", "--config", str(toml), "--accum-steps", "2"])
    cfg = config_from_args(args)
    assert (cfg.micro_batch_size, cfg.accum_steps, cfg.max_steps, cfg.schedule) == (
        3, 2, 7, "cosine")


def test_bad_setting_exits_with_a_message(capsys):
    assert main(["train", "--accum-steps", "0", "--max-steps", "1"]) == 2
    assert "accum_steps must be an integer >= 1" in _one_error_line(capsys, "train")


def test_unknown_toml_key_is_named(tmp_path, capsys):
    toml = tmp_path / "bad.toml"
    toml.write_text("[train]\naccum_step = 4\n")
    assert main(["train", "--config", str(toml)]) == 2
    line = _one_error_line(capsys, "train")
    assert "accum_step" in line and "bad.toml" in line


def test_flags_apply_before_the_config_is_checked(tmp_path):
    toml = tmp_path / "run.toml"  # no max_steps, no epochs: valid only with the flag
    toml.write_text("[train]\nmicro_batch_size = 2\naccum_steps = 2\n")
    args = build_parser().parse_args(["train", "--config", str(toml), "--max-steps", "3"])
    assert config_from_args(args).max_steps == 3
    toml.write_text("[train]\nepochs = 2\nclip_grad_norm = 1.0\n")  # a flag replaces epochs
    args = build_parser().parse_args(["train", "--config", str(toml), "--max-steps", "4",
                                      "--clip-grad-norm", "none"])
    cfg = config_from_args(args)
    assert (cfg.max_steps, cfg.epochs, cfg.clip_grad_norm) == (4, None, None)
    args = build_parser().parse_args(["train", "--config", str(toml)])
    assert config_from_args(args).epochs == 2 and config_from_args(args).max_steps is None


def test_demo_with_no_steps_is_an_error_not_a_hang(capsys):
    with pytest.raises(ValueError, match="steps"):
        run_demo(steps=0)
    for steps in ("0", "-3"):
        with pytest.raises(SystemExit) as e:
            main(["demo", "--steps", steps])
        assert e.value.code == 2
        assert "--steps" in _one_error_line(capsys, "demo")


def test_demo_never_waits_on_a_dead_or_failed_worker():
    # In a fresh interpreter with a time limit, so that a hang fails the test.
    code = """
import multiprocessing as mp, os
from accumlab.cli.demo import _result_of, _run
ctx = mp.get_context("spawn")
for target, words in ((os._exit, "died (exit code 3)"), (_run, "max_steps")):
    queue = ctx.Queue()
    args = (3,) if target is os._exit else (4, 8, 0, 32, 0, "unused", queue)  # 0 steps
    proc = ctx.Process(target=target, args=args)
    proc.start()
    try:
        _result_of(proc, queue, "test")
    except RuntimeError as e:
        assert words in str(e), e
    else:
        raise SystemExit("no error raised")
print("ok")
"""
    run = _python(code, timeout=240)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


def test_demo_runs_both_splits_and_they_agree():
    report = run_demo(steps=3, max_length=64)
    a, b = report["runs"]["32x1"]["losses"], report["runs"]["4x8"]["losses"]
    assert len(a) == len(b) == 3
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4
    assert report["max_param_diff"] < 1e-4
    text = format_demo(report)
    assert "largest parameter difference" in text and "peak memory" in text


def test_compare_prints_a_table(capsys):
    assert main(["compare", "--k", "1", "2", "--precision", "fp64", "--examples", "8",
                 "--max-length", "32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["precision", "k"] and len(lines) == 3


def test_plan_prints_the_split_and_the_reasons(capsys):
    assert main(["plan", "--gpu-memory", "16GB", "--model", "gpt2-small", "--seq-len", "1024",
                 "--global-batch-tokens", "524288"]) == 0
    out = capsys.readouterr().out
    assert "plan: micro-batch 8 x 64 accumulation steps" in out
    assert "524,288 tokens per optimizer step" in out and "over the budget" in out


def test_plan_with_options_and_a_local_config(capsys, tmp_path):
    from accumlab.engine.models import gpt2_config

    gpt2_config("mini", max_positions=512).save_pretrained(tmp_path)
    assert main(["plan", "--gpu-memory", "80G", "--model", str(tmp_path), "--seq-len", "512",
                 "--global-batch-tokens", "65536", "--precision", "fp32", "--attention",
                 "eager", "--checkpointing", "on"]) == 0
    out = capsys.readouterr().out
    assert "x activation checkpointing" in out and "(80.00 GiB)" in out


@pytest.mark.parametrize("argv, message", [
    (["--gpu-memory", "16XB"], "cannot read a memory size"),
    (["--gpu-memory", "2GB"], "nothing fits"),
    (["--gpu-memory", "16GB", "--model", "gpt7"], "unknown model"),
])
def test_plan_errors_say_what_to_change(capsys, argv, message):
    base = ["plan", "--seq-len", "1024", "--global-batch-tokens", "524288"]
    assert main(base + argv) == 2
    assert message in capsys.readouterr().err
