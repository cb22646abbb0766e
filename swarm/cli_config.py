"""CLI options generated from a pydantic config model: one source of truth for flags, defaults and help.

:func:`command_from_model` builds a Typer command whose options are the model's fields (``--field-name``, the
field's description as help, its default, choices for ``Literal`` fields) and which calls ``run`` with the
validated model. A field can get another flag name (``flags``), a text parser (``parsers``) or be left out.
"""

from __future__ import annotations

import enum
import inspect
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import typer
from pydantic import BaseModel, ValidationError


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(get_args(annotation)) == 2:
            return args[0], True
    return annotation, False


def _option(name: str, field: Any, flag: str, parser: Parser | None, envvar: str | None) -> inspect.Parameter:
    annotation, optional = _unwrap_optional(field.annotation)
    help_text = field.description or ""
    default = field.default
    kind: Any
    if parser is not None:
        kind, extra = (parser[1], parser[2]) if isinstance(parser, tuple) else (str, {})
        text_default = "" if default is None or kind is not str else str(default)
        kind = kind | None if kind is not str else str
        option = typer.Option(text_default or None, flag, help=help_text, **extra)
    elif annotation is bool:
        decls = flag if "/" in flag else f"{flag}/--no-{flag.removeprefix('--')}"
        kind, option = (bool | None) if optional else bool, typer.Option(default, decls, help=help_text)
    elif get_origin(annotation) is tuple:
        kind, option = list[str], typer.Option(list(default), flag, help=help_text + " (repeatable)")
    elif get_origin(annotation) is Literal:
        kind = enum.Enum(f"{name}_choices", {str(c): str(c) for c in get_args(annotation)}, type=str)  # type: ignore[misc, no-redef]
        option = typer.Option(kind(default), flag, help=help_text, case_sensitive=False)
    elif annotation in (int, float, str, Path):
        kind = (annotation | None) if optional else annotation
        option = typer.Option(default, flag, help=help_text, envvar=envvar)
    else:
        raise TypeError(f"field {name}: no CLI mapping for {annotation!r}; give it a parser")
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)


#: A text parser for a field, or (parser, option type, extra typer.Option arguments), e.g. a Path that must exist.
Parser = Callable[[Any], Any] | tuple[Callable[[Any], Any], type, dict[str, Any]]


def command_from_model(
    model: type[BaseModel],
    run: Callable[[Any], None],
    *,
    doc: str,
    flags: dict[str, str] | None = None,
    parsers: dict[str, Parser] | None = None,
    converters: dict[str, Callable[[Any], Any]] | None = None,
    envvars: dict[str, str] | None = None,
    skip: tuple[str, ...] = (),
) -> Callable[..., None]:
    """A Typer command function with one option per field of ``model``; invalid values exit 2 naming the field."""
    flags, parsers, envvars, converters = flags or {}, parsers or {}, envvars or {}, converters or {}
    params = [
        _option(name, field, flags.get(name, "--" + name.replace("_", "-")), parsers.get(name), envvars.get(name))
        for name, field in model.model_fields.items()
        if name not in skip
    ]

    def command(**values: Any) -> None:
        for name, value in list(values.items()):
            if name in converters:
                values[name] = converters[name](value)
            elif name in parsers:
                entry = parsers[name]
                parse = entry[0] if isinstance(entry, tuple) else entry
                try:
                    values[name] = parse(value) if value else None
                except (ValueError, OSError) as exc:
                    typer.echo(f"error: {flags.get(name, '--' + name.replace('_', '-'))}: {exc}", err=True)
                    raise typer.Exit(2) from None
            elif isinstance(value, list):
                values[name] = tuple(value)
            elif isinstance(value, enum.Enum):
                values[name] = value.value
        try:
            config = model(**values)
        except ValidationError as exc:
            typer.echo(f"error: invalid {model.__name__}:\n{exc}", err=True)
            raise typer.Exit(2) from None
        run(config)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = doc
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


__all__ = ["command_from_model"]
