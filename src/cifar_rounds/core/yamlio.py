"""YAML in and out, for params.yaml and the files shaped like it (presets, sweep files): keys given twice are
refused, as DVC refuses them, and so are anchors and aliases (a few nested aliases make a small file enormous);
nested sections and dotted names convert both ways."""

from __future__ import annotations

from pathlib import Path

import yaml

from cifar_rounds.core.errors import ParamsError, short_repr


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def unflatten(flat: dict[str, object]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


class AliasRefused(yaml.YAMLError):
    """An anchor (&name) or alias (*name) at `line` (1-based), which our files do not accept."""

    def __init__(self, line: int) -> None:
        super().__init__(line)
        self.line = line


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (as DVC does), instead of keeping the last,
    and refusing anchors and aliases."""

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node:
        # an alias repeats a node without repeating its text: five nested ones turn 1.5 KB into 59,049 values,
        # nine into 387 million; no params file, preset or sweep file needs one
        event = self.peek_event()
        if event.anchor is not None:  # &name on a node, or *name (an alias event's anchor is the name it repeats)
            raise AliasRefused(event.start_mark.line + 1)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {short_repr(key)}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(text: str, source: Path) -> object:
    """Parsed YAML; invalid YAML, a duplicate key, an anchor or an alias is a one-line ParamsError naming
    `source`."""
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)
    except AliasRefused as error:
        raise ParamsError(
            f"{source}: line {error.line}: YAML aliases (*name) are not accepted, nor anchors (&name); "
            "write each value out in full"
        ) from None
    except RecursionError:  # PyYAML composes nested collections recursively: [[[... a thousand deep
        raise ParamsError(f"{source}: not valid YAML (nested too deeply)") from None
    except ValueError as error:  # a scalar its constructors cannot build: a date 2020-13-01, an int of 5,000 digits
        raise ParamsError(f"{source}: not valid YAML ({error})") from None
    except yaml.YAMLError as error:
        raise ParamsError(f"{source}: not valid YAML ({' '.join(str(error).split())})") from None


def write_yaml(tree: dict, path: Path, header: str = "") -> None:
    """A YAML file of plain values (a preset), with an optional comment header."""
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    Path(path).write_text(comment + yaml.safe_dump(tree, sort_keys=False, default_flow_style=None))
