"""`filepipe config`: the settings in effect, and where each came from."""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Annotated

import typer

from ..config import ENV_NAMES, Resolved, Settings, option_name
from .app import app
from .options import command

OPTIONS = tuple(f.name for f in fields(Settings) if option_name(f.name))


@command(app, "config", settings=OPTIONS)
def config_cmd(
    resolved: Resolved,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document for scripts.")] = False,
) -> None:
    """Print the settings in effect (URLs and passwords masked) and where each came from:
    an option, the environment, `.env`, or the default."""
    shown = resolved.settings.public()
    if as_json:
        doc = {
            "dotenv": str(resolved.dotenv) if resolved.dotenv else None,
            "settings": {
                ENV_NAMES[name][0]: {"value": shown[name], "from": resolved.sources[name]}
                for name in ENV_NAMES
            },
        }
        typer.echo(json.dumps(doc, indent=2))
        return
    where = f".env: {resolved.dotenv}" if resolved.dotenv else "no .env in the working directory or above it"
    typer.echo(f"Settings in effect ({where})")
    width = max(len(ENV_NAMES[name][0]) for name in ENV_NAMES)
    values = {name: _text(shown[name]) for name in ENV_NAMES}
    value_width = min(48, max(len(v) for v in values.values()))
    for name in ENV_NAMES:
        typer.echo(
            f"  {ENV_NAMES[name][0]:<{width}}  {values[name]:<{value_width}}  {resolved.sources[name]}"
        )


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value) if value != "" else "(empty)"
