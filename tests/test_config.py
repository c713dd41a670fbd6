"""Configuration: options over environment over .env over defaults, one clear error line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from filepipe.config import load_settings, mask_url
from filepipe.errors import ConfigError


def test_seed_names_and_defaults() -> None:
    s = load_settings(
        environ={
            "CONSUMER_BATCH_SIZE": "50",
            "CONSUMER_BLOCK_MS": "1000",
            "STORAGE_MODE": "local",
            "DATABASE_URL": "postgresql://u:p@h/db",
            "CONSUMER_NAME": "fast_consumer",
        },
        dotenv_path=None,
    )
    assert (s.batch_size, s.block_ms, s.storage_mode, s.consumer_name) == (50, 1000, "local", "fast_consumer")
    assert s.pg_uri == "postgresql://u:p@h/db"
    assert (
        s.stream == "file_uploads" and s.group == "file_processors" and s.dead_stream == "file_uploads:dead"
    )


def test_precedence(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(
        "CONSUMER_BATCH_SIZE=7\nREDIS_URL=redis://from-dotenv:6379/0\nPG_URI=postgresql://dotenv/x\n"
    )
    s = load_settings(
        {"batch_size": None}, environ={"REDIS_URL": "redis://from-env:6379/0"}, dotenv_path=env_file
    )
    assert (
        s.batch_size == 7 and s.redis_url == "redis://from-env:6379/0" and s.pg_uri == "postgresql://dotenv/x"
    )
    s = load_settings({"batch_size": 9}, environ={"CONSUMER_BATCH_SIZE": "8"}, dotenv_path=env_file)
    assert s.batch_size == 9
    assert (
        load_settings(
            environ={"PG_URI": "postgresql://a/b", "DATABASE_URL": "postgresql://c/d"}, dotenv_path=None
        ).pg_uri
        == "postgresql://a/b"
    )


@pytest.mark.parametrize(
    ("environ", "needle"),
    [
        ({"CONSUMER_BATCH_SIZE": "lots"}, "CONSUMER_BATCH_SIZE"),
        ({"CONSUMER_BATCH_SIZE": "0"}, "CONSUMER_BATCH_SIZE"),
        ({"CONSUMER_BLOCK_MS": "-5"}, "CONSUMER_BLOCK_MS"),
        ({"STORAGE_MODE": "ftp"}, "STORAGE_MODE"),
        ({"STORAGE_MODE": "s3"}, "S3_BUCKET"),
        ({"REDIS_URL": "http://x"}, "REDIS_URL"),
        ({"PG_URI": "mysql://x"}, "PG_URI"),
        ({"FILEPIPE_TABLE": "x; drop table y"}, "FILEPIPE_TABLE"),
        ({"CONSUMER_NAME": "has space"}, "CONSUMER_NAME"),
        ({"FILEPIPE_COPY_FORMAT": "csv"}, "FILEPIPE_COPY_FORMAT"),
    ],
)
def test_bad_values_name_the_variable(environ: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(environ=environ, dotenv_path=None)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_secrets_are_masked() -> None:
    assert mask_url("redis://:s3cret@h:6379/0") == "redis://:***@h:6379/0"
    assert (
        mask_url("postgresql://user:s3cret@h/db?sslmode=require")
        == "postgresql://user:***@h/db?sslmode=require"
    )
    assert mask_url("postgresql://h/db?password=s3cret") == "postgresql://h/db?password=***"
    assert "s3cret" not in mask_url("host=h password=s3cret dbname=x")
    s = load_settings(
        environ={"REDIS_URL": "redis://:s3cret@h/0", "PG_URI": "postgresql://u:s3cret@h/d"}, dotenv_path=None
    )
    assert "s3cret" not in repr(s.public())


def configuration_table() -> str:
    """The README's configuration table, from the `Settings` fields' metadata."""
    from dataclasses import fields

    from filepipe.config import ENV_NAMES, Settings, option_name, shown_default

    def value(text: str) -> str:
        return text if " " in text or text in ("empty", "none") else f"`{text}`"

    def prose(text: str) -> str:  # `<stream>` is not an HTML tag
        return re.sub(r"(\S*<\S*)", r"`\1`", text)

    rows = ["| variable | option | default | what it sets |", "|---|---|---|---|"]
    for f in fields(Settings):
        first, *others = ENV_NAMES[f.name]
        variable = f"`{first}`" + "".join(f" (or `{other}`)" for other in others)
        flag = option_name(f.name)
        option = f"`{flag}`" if flag else ""
        default = value(shown_default(f.name))
        rows.append(f"| {variable} | {option} | {default} | {prose(f.metadata['help'])} |")
    return "\n".join(rows)


def test_the_readme_table_is_the_settings() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    start = readme.index("| variable | option | default |")
    end = readme.index("\n\n", start)
    assert readme[start:end] == configuration_table(), (
        "README.md's configuration table differs from Settings; it should read:\n\n" + configuration_table()
    )


def test_help_shows_the_defaults_of_the_code() -> None:
    from typer.testing import CliRunner

    from filepipe import constants as c
    from filepipe.cli import app

    result = CliRunner().invoke(app, ["consume", "--help"], env={"COLUMNS": "400"}, terminal_width=400)
    lines = {line.split()[1]: line for line in result.stdout.splitlines() if line.strip().startswith("│ --")}
    assert f"(env: CONSUMER_BLOCK_MS; default {c.DEFAULT_BLOCK_MS})" in lines["--block-ms"]
    assert f"default {c.DEFAULT_BATCH_SIZE})" in lines["--batch-size"]
    assert "<bool>" not in result.stdout
    assert "--no-redis-cluster" in lines["--redis-cluster"]
