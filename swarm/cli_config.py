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
from typing import Any, Literal, Union, get_args, get_origin

import typer
from pydantic import BaseModel, ValidationError


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(get_args(annotation)) == 2:
            return args[0], True
    return annotation, False


def _option(
    name: str, field: Any, flag: str, parser: Callable[[str], Any] | None, envvar: str | None
) -> inspect.Parameter:
    annotation, optional = _unwrap_optional(field.annotation)
    help_text = field.description or ""
    default = field.default
    kind: Any
    if parser is not None:
        kind, option = str, typer.Option("" if default is None else str(default), flag, help=help_text)
    elif annotation is bool:
        decls = flag if "/" in flag else f"{flag}/--no-{flag.removeprefix('--')}"
        kind, option = (bool | None) if optional else bool, typer.Option(default, decls, help=help_text)
    elif get_origin(annotation) is tuple:
        kind, option = list[str], typer.Option(list(default), flag, help=help_text + " (repeatable)")
    elif get_origin(annotation) is Literal:
        kind = enum.Enum(f"{name}_choices", {str(c): str(c) for c in get_args(annotation)}, type=str)  # type: ignore[misc]
        option = typer.Option(kind(default), flag, help=help_text, case_sensitive=False)
    elif annotation in (int, float, str):
        kind, option = annotation, typer.Option(default, flag, help=help_text, envvar=envvar)
    else:
        raise TypeError(f"field {name}: no CLI mapping for {annotation!r}; give it a parser")
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)


def command_from_model(
    model: type[BaseModel],
    run: Callable[[Any], None],
    *,
    doc: str,
    flags: dict[str, str] | None = None,
    parsers: dict[str, Callable[[str], Any]] | None = None,
    envvars: dict[str, str] | None = None,
    skip: tuple[str, ...] = (),
) -> Callable[..., None]:
    """A Typer command function with one option per field of ``model``; invalid values exit 2 naming the field."""
    flags, parsers, envvars = flags or {}, parsers or {}, envvars or {}
    params = [
        _option(name, field, flags.get(name, "--" + name.replace("_", "-")), parsers.get(name), envvars.get(name))
        for name, field in model.model_fields.items()
        if name not in skip
    ]

    def command(**values: Any) -> None:
        for name, value in list(values.items()):
            if name in parsers:
                values[name] = parsers[name](value) if value else None
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
