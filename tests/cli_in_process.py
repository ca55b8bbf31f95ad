"""The command line run in this process (a subprocess would spend seconds importing torch), and the one-line
error every refused command must print."""
from __future__ import annotations


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `chatglm-ft ARGS`; arguments may be paths or numbers."""
    from chatglm_ft.cli import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code: int, err: str, *needles: str) -> str:
    """A usage-error exit (2) with one line on stderr, no traceback, containing every needle; returns the line."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
