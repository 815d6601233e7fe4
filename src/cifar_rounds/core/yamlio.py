"""YAML in and out, for params.yaml and the files shaped like it (presets, sweep files): keys given twice are
refused, as DVC refuses them; nested sections and dotted names convert both ways."""

from __future__ import annotations

from pathlib import Path

import yaml

from cifar_rounds.core.errors import ParamsError


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


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (as DVC does), instead of keeping the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(text: str, source: Path) -> object:
    """Parsed YAML; invalid YAML or a duplicate key is a one-line ParamsError naming `source`."""
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)
    except yaml.YAMLError as error:
        raise ParamsError(f"{source}: not valid YAML ({' '.join(str(error).split())})") from None


def write_yaml(tree: dict, path: Path, header: str = "") -> None:
    """A YAML file of plain values (a preset), with an optional comment header."""
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    Path(path).write_text(comment + yaml.safe_dump(tree, sort_keys=False, default_flow_style=None))
