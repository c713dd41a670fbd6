"""How a command is declared: its own options in its signature, and the settings it
reads named once, their options derived from `Settings`' field metadata (`config.setting`)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from typing import Annotated, Any, TypeVar

import typer

from ..config import Resolved, Settings, describe_setting, option_name, resolve_settings
from .app import errors_as_lines, setup_logging

F = TypeVar("F", bound=Callable[..., Any])

# The settings commands share, by what they talk to.
REDIS = ("redis_url",)
POSTGRES = ("pg_uri",)
STORAGE = ("storage_mode", "local_storage_dir", "s3_bucket", "s3_prefix", "s3_endpoint_url")
PIPELINE = ("stream", "group", "table")
LAYOUT = ("partitions", "redis_cluster")

Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")]

_TYPES: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool}
_KINDS = {f.name: _TYPES[str(f.type)] for f in fields(Settings)}


def setting_option(name: str, help: str | None = None) -> Any:
    """The annotation of setting `name`'s option: unset (None) unless given; a flag pair
    (`--x/--no-x`) for a yes/no setting."""
    flag = option_name(name)
    if flag is None:
        raise ValueError(f"setting {name} has no command-line option")
    kind = _KINDS[name]
    decls = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag]
    option = typer.Option(*decls, help=describe_setting(name, help), show_default=False)
    return Annotated[kind | None, option]


def command(
    parent: typer.Typer,
    name: str,
    *,
    settings: Sequence[str] = (),
    helps: Mapping[str, str] | None = None,
) -> Callable[[F], F]:
    """Registers `fn` as command `name` of `parent`, with the options of `settings`
        (help from the metadata, or `helps[name]`) and `--debug` added after its own. A first
        parameter `s` gets the resolved `Settings`, `resolved` the `config.Resolved`; a
    parameter `debug`, whether `--debug` was given. A
        FilepipeError is one line on stderr (exit 2 for configuration, 1 otherwise)."""

    def register(fn: F) -> F:
        signature = inspect.signature(fn, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name not in ("s", "resolved", "debug")]
        passes_debug = "debug" in signature.parameters
        wants = next((p.name for p in signature.parameters.values() if p.name in ("s", "resolved")), None)
        added = [
            inspect.Parameter(
                n,
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=setting_option(n, (helps or {}).get(n)),
            )
            for n in settings
        ]
        debug = inspect.Parameter("debug", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Debug)

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            debug_on = bool(kwargs.pop("debug", False))
            overrides = {n: kwargs.pop(n) for n in settings}
            setup_logging(debug_on)
            if passes_debug:
                kwargs["debug"] = debug_on
            with errors_as_lines(debug_on):
                if wants is None:
                    return fn(**kwargs)
                resolved: Resolved = resolve_settings(overrides)
                setup_logging(debug_on, resolved.settings.log_format)
                return fn(resolved.settings if wants == "s" else resolved, **kwargs)

        public = signature.replace(parameters=[*own, *added, debug], return_annotation=None)
        wrapper.__signature__ = public  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in public.parameters.values()}
        parent.command(name)(wrapper)
        return fn

    return register
