"""`--help`: the config groups, then every key with its type, default, scope and docstring."""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

from omegaconf import OmegaConf

from replica_dist.config import coupling, fault_tolerance, model_data, run, training
from replica_dist.config.checks import CHOICES
from replica_dist.config.load import CONF_DIR
from replica_dist.config.overrides import APPLIES_TO, _schema

SCHEMA_MODULES = (model_data, coupling, training, fault_tolerance, run)
"""The modules whose dataclasses make up Config."""


def _field_docs() -> dict[str, dict[str, str]]:
    """Attribute docstrings (the string literal under a field) of every dataclass of the schema,
    read from its modules' source: class name -> field -> docstring, whitespace folded."""
    trees = [ast.parse(Path(m.__file__).read_text(encoding="utf-8")) for m in SCHEMA_MODULES]
    docs: dict[str, dict[str, str]] = {}
    for cls in (node for tree in trees for node in tree.body if isinstance(node, ast.ClassDef)):
        body = cls.body
        for stmt, after in zip(body, body[1:]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs.setdefault(cls.name, {})[stmt.target.id] = " ".join(after.value.value.split())
    return docs


def help_text() -> str:
    """The config groups with their options (conf/), then every key with its type (for a choice,
    its values), default, the choices it applies to (APPLIES_TO) and its docstring."""
    lines = ["Config groups (GROUP=OPTION; +experiment=OPTION adds a preset on top):"]
    defaults = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml"))["defaults"]
    chosen = {k: v for entry in defaults if isinstance(entry, dict) for k, v in entry.items()}
    for group in sorted(p for p in CONF_DIR.iterdir() if p.is_dir()):
        options = ", ".join(sorted(p.stem for p in group.glob("*.yaml")))
        default = f" (default {chosen[group.name]})" if group.name in chosen else ""
        lines.append(f"  {group.name}: {options}{default}")
    lines += ["", "Keys (KEY=VALUE; a group option may set other values than these defaults):"]
    docs = _field_docs()
    for key, (annotation, default, cls) in _schema().items():
        shown = "''" if default == "" else ("null" if default is None else default)
        if isinstance(shown, bool):
            shown = str(shown).lower()
        scope = ""
        if key in APPLIES_TO:
            selector, choices = APPLIES_TO[key]
            scope = f", {selector}={'|'.join(choices)} only"
        doc = docs.get(cls.__name__, {}).get(key.rsplit(".", 1)[-1], "")
        kind = "|".join(CHOICES[annotation]) if annotation in CHOICES else annotation
        # The head (key, type, default, the doc's first word) stays on one line however long, so
        # `KEY (TYPE, default` can be found with a grep: textwrap does not break at no-break spaces.
        first, _, rest = doc.partition(" ")
        head = f"{key} ({kind}, default {shown}{scope}): {first}".replace(" ", "\xa0")
        text = textwrap.fill(
            f"{head} {rest}",
            width=100,
            initial_indent="  ",
            subsequent_indent="      ",
            break_long_words=False,
        )
        lines.append(text.replace("\xa0", " "))
    return "\n".join(lines)
