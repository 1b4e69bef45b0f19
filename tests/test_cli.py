"""The `accumlab` command line."""

import pytest

from accumlab.cli import build_parser, config_from_args, main
from accumlab.cli.demo import format_demo, run_demo


def test_train_on_the_shipped_corpus_prints_a_summary(capsys, tmp_path):
    code = main(["train", "--max-steps", "2", "--micro-batch-size", "2", "--accum-steps", "2",
                 "--limit", "40", "--eval-limit", "8", "--no-progress",
                 "--run-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "optimizer steps    2" in out and "eval perplexity" in out
    assert len((tmp_path / "history.jsonl").read_text().splitlines()) == 2


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
    assert "accum_steps must be an integer >= 1" in capsys.readouterr().err


def test_unknown_toml_key_is_named(tmp_path):
    toml = tmp_path / "bad.toml"
    toml.write_text("[train]\naccum_step = 4\n")
    args = build_parser().parse_args(["train", "--config", str(toml)])
    with pytest.raises(ValueError, match="accum_step"):
        config_from_args(args)


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
