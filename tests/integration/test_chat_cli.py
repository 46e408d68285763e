"""`llama2-align chat` driven through stdin (not a terminal): each line is a user turn, answers stream out."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_chat_reads_prompts_from_stdin(sft_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "llama2_align", "chat", str(sft_dir / "final"), "--system", "Be safe.",
         "--max-new-tokens", "8"],
        input="What is 3 plus 4?\nRepeat the word river.\n/exit\nnever read\n", capture_output=True, text=True,
        timeout=120, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("assistant> ")]
    assert len(lines) == 2  # two prompts answered, nothing after /exit
    assert all(len(line) > len("assistant> ") for line in lines)


def test_chat_missing_checkpoint(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "llama2_align", "chat", str(tmp_path / "nope")],
                          input="", capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "no such checkpoint" in proc.stderr


def test_chat_refuses_a_line_that_is_not_utf8(sft_dir):
    """Undecodable bytes on stdin: the line is named and the chat ends with exit 1."""
    proc = subprocess.run(
        [sys.executable, "-m", "llama2_align", "chat", str(sft_dir / "final"), "--max-new-tokens", "4"],
        input="What is 3 plus 4?\n".encode() + b"\xff\xfe river\nnever read\n", capture_output=True, timeout=120,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    stdout, stderr = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 1, stderr
    assert "standard input, line 2: not UTF-8 text" in stderr and "Traceback" not in stderr
    assert sum(line.startswith("assistant> ") for line in stdout.splitlines()) == 1  # line 1 answered, 3 not read
