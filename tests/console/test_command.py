"""`kernel-driver ui`: its tokens file, its refusals, and a start and a stop as an operator sees
them (a real process, a real request, SIGTERM)."""

from __future__ import annotations

import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from kernel_driver.console.auth import parse_tokens
from kernel_driver.errors import ExitCode


@pytest.mark.parametrize(("text", "says"), [
    ("", "holds no token"),
    ("# only a comment\n", "holds no token"),
    ("admin\n", "line 1: write `admin TOKEN` or `tenant TENANT_UUID TOKEN`"),
    ("admin short\n", "line 1: the token is shorter than 16 characters"),
    ("\ntenant not-a-uuid 0123456789abcdefgh\n", "line 2: 'not-a-uuid' is not a tenant uuid"),
    ("admin 0123456789abcdefgh\nadmin 0123456789abcdefgh\n", "a token appears twice"),
    ("root 0123456789abcdefgh\n", "line 1: write"),
])
def test_a_bad_tokens_file_is_refused_with_its_line(cli, tmp_path, text, says):
    tokens = tmp_path / "tokens"
    tokens.write_text(text)
    with pytest.raises(ValueError, match=says.replace("(", r"\(").replace("`", "`")):
        parse_tokens(tokens)
    result = cli("--dsn", "postgresql://127.0.0.1:1/none", "ui", "--tokens", str(tokens))
    assert result.exit_code == ExitCode.USAGE and says in result.output


def test_a_missing_tokens_file_and_a_bad_bind_are_usage_errors(cli, tmp_path):
    missing = cli("--dsn", "postgresql://127.0.0.1:1/none", "ui", "--tokens", str(tmp_path / "nope"))
    assert missing.exit_code == ExitCode.USAGE and "cannot read the tokens file" in missing.output
    for bind in ("8700", "localhost:", "127.0.0.1:99999", "127.0.0.1:http"):
        result = cli("--dsn", "postgresql://127.0.0.1:1/none", "ui", "--bind", bind)
        assert result.exit_code == ExitCode.USAGE and "is not HOST:PORT" in result.output, bind


def test_no_database_and_no_kernel(cli, empty_db_dsn):
    down = cli("--dsn", "postgresql://nobody@127.0.0.1:1/none?connect_timeout=2", "ui")
    assert down.exit_code == ExitCode.DATABASE_UNREACHABLE and down.output.startswith("error: cannot connect")
    bare = cli("--dsn", empty_db_dsn, "ui")
    assert bare.exit_code == ExitCode.DATABASE_ERROR and "run kernel-driver migrate first" in bare.output


def test_it_prints_where_to_sign_in_serves_and_stops_on_sigterm(db_dsn, kernel_schema):
    process = subprocess.Popen(
        [sys.executable, "-m", "kernel_driver", "--dsn", db_dsn, "--schema", kernel_schema, "ui", "--bind",
         "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert first.startswith("console: http://127.0.0.1:") and "(kernel " in first, first
        sign_in = process.stdout.readline().strip()
        assert sign_in.startswith("sign in with: http://127.0.0.1:") and "/login?token=" in sign_in
        url = sign_in.removeprefix("sign in with: ")
        browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
        with browser.open(url, timeout=10) as response:  # signs in, then follows the redirect to the runs
            assert response.status == 200 and "<h1>Runs</h1>" in response.read().decode()
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url.replace("token=", "token=x"), timeout=10)
        assert refused.value.code == 401
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
