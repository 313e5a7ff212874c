"""The backbone tables of docs/backbones.md, generated from probe's registry.

    python docs/backbone_table.py            # print the tables
    python docs/backbone_table.py --write    # rewrite them in docs/backbones.md
    python docs/backbone_table.py --check    # exit 1 when docs/backbones.md differs

Every column but the parameter count comes from `probe.backbones` (no Keras needed); the
parameter count of each headless model (include_top=False) is counted by building it with
random weights in a `keras.StatelessScope`, which creates no backend variable (about a
second per model). The KerasHub table reads the presets' own metadata from keras-hub.
tests/test_docs.py checks the registry columns of the table in docs/backbones.md against
the registry, so the page can not drift from the code.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Callable

PAGE = Path(__file__).resolve().parent / "backbones.md"
START, END = "<!-- backbone-table:start -->", "<!-- backbone-table:end -->"
HUB_START, HUB_END = "<!-- hub-table:start -->", "<!-- hub-table:end -->"

# keras.applications submodule -> family, in the order the table lists them (oldest first)
FAMILIES = {
    "vgg16": "VGG", "vgg19": "VGG", "resnet": "ResNet", "resnet50": "ResNet",
    "resnet_v2": "ResNetV2", "densenet": "DenseNet", "inception_v3": "Inception",
    "inception_resnet_v2": "Inception", "xception": "Xception", "mobilenet": "MobileNet",
    "mobilenet_v2": "MobileNet", "mobilenet_v3": "MobileNet", "nasnet": "NASNet",
    "efficientnet": "EfficientNet", "efficientnet_v2": "EfficientNetV2", "convnext": "ConvNeXt",
}
ORDER = list(dict.fromkeys(FAMILIES.values()))
# what each `preprocess_input` mode does to RGB pixels in 0..255 (probe.backbones.PREPROCESSING)
EXPECTS = {
    "caffe": "`caffe`: BGR, ImageNet mean subtracted (by probe)",
    "tf": "`tf`: scaled to [-1, 1] (by probe)",
    "torch": "`torch`: [0, 1], ImageNet mean / std (by probe)",
    "none": "inside the model: pixels 0..255",
}
HEADER = ("| backbone | family | parameters | native size | min size | features "
          "| expects | fine-tuning blocks |\n|---|---|---|---|---|---|---|---|")
# KerasHub backbone classes listed in the hub table
HUB_CLASSES = ("DINOV2Backbone", "ViTBackbone", "CLIPBackbone", "SigLIPBackbone")


def family(spec) -> str:
    """The family of a registry entry (its keras.applications submodule's)."""
    return FAMILIES.get(spec.module, spec.module)


def count_parameters(name: str) -> int:
    """Weights of the headless model (include_top=False), built at its minimum size:
    a CNN's weight count does not depend on the input size."""
    from probe import backbones

    spec = backbones.get(name)
    keras = backbones._keras()
    with backbones._stateless_scope(keras):
        model = spec.build(weights="none", image_size=spec.min_size, pooling="avg", seed=None)
        return int(model.count_params())


def millions(count: int) -> str:
    return f"{count / 1e6:,.1f} M"


def registry_row(name: str, parameters: str) -> str:
    """One table row; every cell but `parameters` from the registry."""
    from probe import backbones

    spec = backbones.get(name)
    return (f"| `{spec.name}` | {family(spec)} | {parameters} | {spec.native_size} "
            f"| {spec.min_size} | {spec.feature_size} | {EXPECTS[spec.preprocessing]} "
            f"| {len(spec.top_blocks)} |")


def table(parameters: Callable[[str], str]) -> str:
    """The applications table, grouped by family, smallest model first in each."""
    from probe import backbones

    def key(name: str):
        spec = backbones.get(name)
        group = ORDER.index(family(spec)) if family(spec) in ORDER else len(ORDER)
        return group, float(parameters(name).split()[0].replace(",", "")), name

    names = sorted(backbones.list_backbones(), key=key)
    return "\n".join([HEADER, *(registry_row(name, parameters(name)) for name in names)])


def hub_table() -> str:
    """KerasHub's presets of the families probe's guide names, from their metadata."""
    import keras_hub

    lines = ["| KerasHub class | presets | parameters (whole preset) |",
             "|---|---|---|"]
    for class_name in HUB_CLASSES:
        presets = getattr(keras_hub.models, class_name).presets
        counts = [int(p["metadata"]["params"]) for p in presets.values()]
        names = ", ".join(f"`{name}`" for name in presets)
        lines.append(f"| `{class_name}` | {names} | {millions(min(counts))} to "
                     f"{millions(max(counts))} |")
    return "\n".join(lines)


def between(text: str, start: str, end: str) -> str:
    """The text between two marker lines (stripped)."""
    return text.split(start, 1)[1].split(end, 1)[0].strip()


def documented_parameters(text: str) -> dict[str, str]:
    """backbone -> its parameters cell, as docs/backbones.md has them."""
    cells = {}
    for line in between(text, START, END).splitlines()[2:]:
        parts = [part.strip() for part in line.strip("|").split("|")]
        cells[parts[0].strip("`")] = parts[2]
    return cells


def generated() -> tuple[str, str]:
    """Both tables, freshly computed (builds every model once: about a minute)."""
    applications = table(lambda name, cache={}: cache.setdefault(
        name, millions(count_parameters(name))))
    return applications, hub_table()


def replaced(text: str, start: str, end: str, body: str) -> str:
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    return pattern.sub(lambda _: f"{start}\n{body}\n{end}", text, count=1)


def main(argv: list[str]) -> int:
    applications, hub = generated()
    if not argv:
        print(applications + "\n\n" + hub)
        return 0
    text = PAGE.read_text(encoding="utf-8")
    new = replaced(replaced(text, START, END, applications), HUB_START, HUB_END, hub)
    if argv == ["--write"]:
        PAGE.write_text(new, encoding="utf-8")
        return 0
    if argv == ["--check"]:
        if new != text:
            print(f"{PAGE} differs from the registry: run python docs/backbone_table.py --write")
            return 1
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
