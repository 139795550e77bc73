"""The settings reference, generated from ``service.settings.Settings`` itself so it cannot drift.

Two uses:

* an MkDocs hook (``hooks:`` in mkdocs.yml): every docs page holding the marker line
  ``<!-- settings-reference -->`` gets the tables in its place at build time;
* a script: ``python scripts/settings_reference.py`` prints the same Markdown, and
  ``python scripts/settings_reference.py --missing`` lists the fields whose ``Field`` has no description.

Each row gives the environment variable (``SERVE_<NAME>``), the type, the default, the bounds and the field's
own description; a field without one is a warning, which fails the strict build.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import types
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = "<!-- settings-reference -->"
log = logging.getLogger("mkdocs.hooks.settings_reference")


def _settings_classes():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from pydantic import BaseModel

    from service import settings

    return settings.Settings, BaseModel


def _type_text(annotation) -> str:
    """A short, readable form of a field's type: ``int or unset``, ``"auto" or "cpu"``, ``list[str]``."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " or ".join(json.dumps(value) for value in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        parts = [_type_text(arg) for arg in args if arg is not type(None)]
        return " or ".join(parts) + (" or unset" if type(None) in args else "")
    if origin is typing.Annotated:
        return _type_text(typing.get_args(annotation)[0])
    if origin is not None:
        args = ", ".join(_type_text(arg) for arg in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if isinstance(annotation, type):
        return annotation.__name__
    return re.sub(r"\b(typing|pathlib|service\.settings)\.", "", str(annotation))


def _bytes_note(name: str, value) -> str:
    if not name.endswith("_bytes") or not isinstance(value, int) or value < 1024:
        return ""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value % size == 0:
            return f" ({value // size} {unit})"
    return ""


def _default_text(name: str, field, base_model) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, Path):
        try:
            return f"`{value.relative_to(ROOT).as_posix()}/` in the checkout"
        except ValueError:
            return f"`{value}`"
    if isinstance(value, base_model):
        value = value.model_dump()
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (dict, list)):
        return f"`{json.dumps(value)}`"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`" + _bytes_note(name, value)


def _bounds_text(field) -> str:
    signs = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    found = []
    for item in field.metadata:
        for attribute, sign in signs.items():
            bound = getattr(item, attribute, None)
            if bound is not None:
                found.append(f"{sign} {bound:,}" if isinstance(bound, int) else f"{sign} {bound}")
    return ", ".join(found)


def _cell(text: str) -> str:
    """Text safe inside one Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def _description(name: str, field) -> str:
    if field.description:
        return _cell(field.description)
    log.warning("the setting %s has no description in service/settings.py: give its Field one", name)
    return "*(no description yet)*"


def missing_descriptions() -> dict[str, list[str]]:
    """Fields with no description in the code, per class."""
    settings, base_model = _settings_classes()
    out = {settings.__name__: [name for name, field in settings.model_fields.items() if not field.description]}
    for model in _nested_models(settings, base_model):
        out[model.__name__] = [name for name, field in model.model_fields.items() if not field.description]
    return out


def _nested_models(settings, base_model) -> list[type]:
    """The pydantic models that settings fields hold (BatchPolicy), directly or as dict/list values."""
    seen: list[type] = []

    def visit(annotation):
        if isinstance(annotation, type) and issubclass(annotation, base_model):
            if annotation not in seen:
                seen.append(annotation)
            return
        for arg in typing.get_args(annotation):
            visit(arg)

    for field in settings.model_fields.values():
        visit(field.annotation)
    return seen


def _env_prefix(settings) -> tuple[str, str]:
    config = settings.model_config
    return config.get("env_prefix", ""), config.get("env_nested_delimiter") or ""


def render() -> str:
    """The Markdown tables: one for Settings, one per nested model."""
    settings, base_model = _settings_classes()
    prefix, nested = _env_prefix(settings)
    lines = [
        "| variable | type | default | bounds | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, field in settings.model_fields.items():
        env = f"{prefix}{name}".upper()
        lines.append(
            f"| `{env}` | {_cell(_type_text(field.annotation))} | {_default_text(name, field, base_model)} "
            f"| {_bounds_text(field)} | {_description(name, field)} |"
        )

    for model in _nested_models(settings, base_model):
        holders = [
            name for name, field in settings.model_fields.items() if model.__name__ in _type_text(field.annotation)
        ]
        doc = " ".join((model.__doc__ or "").split())
        lines += ["", f"## {model.__name__}", ""]
        if doc:
            lines += [doc, ""]
        where = ", ".join(f"`{prefix}{holder}`".upper() for holder in holders)
        lines += [f"The keys of a {model.__name__} object, as held by {where}.", ""]
        if nested and holders:
            first = f"{prefix}{holders[0]}".upper()
            lines += [
                f"One key of `{first}` can also be set alone as `{first}{nested}<KEY>`, "
                f"e.g. `{first}{nested}{next(iter(model.model_fields)).upper()}`.",
                "",
            ]
        lines += ["| key | type | default | bounds | meaning |", "| --- | --- | --- | --- | --- |"]
        for name, field in model.model_fields.items():
            lines.append(
                f"| `{name}` | {_cell(_type_text(field.annotation))} | "
                f"{_default_text(name, field, base_model)} | {_bounds_text(field)} | "
                f"{_description(name, field)} |"
            )
    return "\n".join(lines) + "\n"


# --- MkDocs hook -------------------------------------------------------------------------------------------


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    for model, names in missing_descriptions().items():
        if names:
            log.info("settings without a description in the code (%s): %s", model, ", ".join(names))
    return markdown.replace(MARKER, render())


if __name__ == "__main__":
    if "--missing" in sys.argv[1:]:
        for model, names in missing_descriptions().items():
            print(f"{model}: {', '.join(names) if names else '(none)'}")
    else:
        print(render(), end="")
