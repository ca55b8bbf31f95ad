import json
import os
import subprocess
import sys

import pytest

from chatglm_ft.cli import COMMANDS, build_parser, main


def run_cli(*args, input=None, env=None):
    return subprocess.run([sys.executable, "-m", "chatglm_ft", *args], capture_output=True, text=True, input=input,
                          env={**os.environ, **(env or {})}, timeout=600)


def registered_commands():
    return list(build_parser()._subparsers._group_actions[0].choices)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    if command not in registered_commands():
        pytest.fail(f"command {command} is not registered")
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: chatglm-ft " + command in capsys.readouterr().out


def test_generate_json_matches_golden_greedy(golden_dir, golden):
    case = golden["greedy"][0]
    result = run_cli("generate", "--model", str(golden_dir), "--prompt", case["text"], "--temperature", "0",
                     "--max-new-tokens", "16", "--json", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["token_ids"] == case["new_ids"]
    assert out["finish_reason"] == "length" and out["prompt_tokens"] == len(case["input_ids"])


def test_generate_reads_stdin_and_model_from_env(golden_dir, golden):
    case = golden["greedy"][1]
    result = run_cli("generate", "--temperature", "0", "--max-new-tokens", "4", "--json", input=case["text"],
                     env={"CHATGLM_FT_MODEL": str(golden_dir)})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["token_ids"] == case["new_ids"][:4]


@pytest.mark.parametrize("model_arg, message", [
    ("/nonexistent/dir", "no such directory"),
    (".", "no config.json"),
])
def test_bad_model_is_one_line_error(model_arg, message):
    result = run_cli("generate", "--model", model_arg, "--prompt", "hi")
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_chat_session_streams_and_keeps_history(golden_dir):
    script = "你好\nclear\nGive three tips for staying healthy.\nexit\n"
    result = run_cli("chat", "--model", str(golden_dir), "--temperature", "0", "--max-new-tokens", "8",
                     "--device", "cpu", input=script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ChatGLM-6B: ") == 2
    assert "(history cleared)" in result.stdout


def test_exit_codes_are_distinct_and_a_taken_port_is_not_out_of_memory(golden_dir):
    import socket

    from chatglm_ft.errors import AddressInUseError, ChatGLMError

    assert ChatGLMError("x").exit_code == 2 and AddressInUseError("x").exit_code == 4
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "chatglm_ft", "serve", "--model", str(golden_dir), "--port", str(port),
                                 "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 4, result.stderr
    assert f"error: cannot listen on 127.0.0.1:{port}" in result.stderr and "--port" in result.stderr
    assert "loaded in" not in result.stderr  # refused before loading the model


def test_one_data_format_flag_for_train_and_eval():
    from chatglm_ft.cli import build_parser

    parser = build_parser()
    for command in (["train"], ["eval", "--data", "d.json", "--out", "o"]):
        assert parser.parse_args(command + ["--data-format", "hc3"]).data_format == "hc3"
    assert parser.parse_args(["eval", "--data", "d.json", "--out", "o", "--format", "hc3"]).data_format == "hc3"  # old name
    assert "--format" not in parser._subparsers._group_actions[0].choices["eval"].format_help()


def test_train_threads_caps_torchs_cpu_threads(tmp_path):
    import torch

    from chatglm_ft.cli import main

    before = torch.get_num_threads()
    try:
        # the data is missing, so training stops with a user error right after the flag took effect
        assert main(["train", "--threads", "1", "--model", str(tmp_path / "none"), "--data", str(tmp_path / "x.json"),
                     "--output-dir", str(tmp_path / "run")]) == 2
        assert torch.get_num_threads() == 1
        assert main(["train", "--threads", "0"]) == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("flags, background", [([], True), (["--compile-at-start"], False)])
def test_serve_compiles_in_the_background_unless_told(golden_dir, monkeypatch, flags, background):
    """`serve` answers at once while the decode step compiles (the default), or compiles first with
    --compile-at-start: the flag reaches the engine."""
    pytest.importorskip("fastapi")
    from chatglm_ft import engine as engine_module
    from chatglm_ft.cli import main

    made = []

    class Recorded(Exception):
        pass

    def recording_engine(model, tokenizer, **kwargs):
        made.append(kwargs)
        raise Recorded

    monkeypatch.setattr(engine_module, "Engine", recording_engine)
    with pytest.raises(Recorded):
        main(["serve", "--model", str(golden_dir), "--device", "cpu", "--port", "0", *flags])
    assert made[0]["decode"] == "auto" and made[0]["compile_in_background"] is background
