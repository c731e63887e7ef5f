"""The example workflows against ComfyUI's own node registry: every node known, every input real, every
link between matching types, UI widgets in the order the nodes declare them, and the API twin in step."""

import asyncio
import json
from pathlib import Path

import pytest

import nodes as comfy_nodes

FOLDER = Path(__file__).resolve().parents[2] / "workflows"
UI_FILES = sorted(FOLDER.glob("*.json"))
# Combos listing the user's own files: any value is fine here.
USER_FILES = {"ckpt_name", "folder", "residual_name", "lora_name", "image", "unet_name", "clip_name1", "clip_name2",
              "vae_name"}


@pytest.fixture(scope="module")
def registry():
    asyncio.run(comfy_nodes.init_extra_nodes(init_custom_nodes=False))
    asyncio.run(comfy_nodes.load_custom_node(str(FOLDER.parent)))
    return comfy_nodes.NODE_CLASS_MAPPINGS


def _inputs(node_cls):
    spec = node_cls.INPUT_TYPES()
    return {**spec.get("required", {}), **spec.get("optional", {})}


def _is_widget(spec):
    return isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def test_there_are_workflows_with_api_twins():
    assert {p.stem for p in UI_FILES} >= {"train_and_sample", "train_and_save", "load_and_sample"}
    assert {p.name for p in (FOLDER / "api").glob("*.json")} == {p.name for p in UI_FILES}


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_api_workflow_matches_the_node_definitions(path, registry):
    graph = json.loads((FOLDER / "api" / path.name).read_text())
    for node_id, node in graph.items():
        cls = registry[node["class_type"]]
        declared = _inputs(cls)
        required = cls.INPUT_TYPES().get("required", {})
        assert set(required) <= set(node["inputs"]), (node_id, set(required) - set(node["inputs"]))
        for name, value in node["inputs"].items():
            assert name in declared, (node_id, name)
            spec = declared[name]
            if isinstance(value, list):  # a link [source id, output slot]
                source = registry[graph[value[0]]["class_type"]]
                assert source.RETURN_TYPES[value[1]] == spec[0], (node_id, name)
            elif isinstance(spec[0], list) and name not in USER_FILES:
                assert value in spec[0], (node_id, name, value)


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_links_and_widgets_are_consistent(path, registry):
    wf = json.loads(path.read_text())
    nodes = {n["id"]: n for n in wf["nodes"]}
    for link_id, src, src_slot, dst, dst_slot, typ in wf["links"]:
        assert registry[nodes[src]["type"]].RETURN_TYPES[src_slot] == typ
        assert link_id in nodes[src]["outputs"][src_slot]["links"]
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id and nodes[dst]["inputs"][dst_slot]["type"] == typ
    api = json.loads((FOLDER / "api" / path.name).read_text())
    for node in wf["nodes"]:
        declared = _inputs(registry[node["type"]])
        widgets = [name for name, spec in declared.items() if _is_widget(spec)]
        values = [v for v in node["widgets_values"] if v not in ("fixed", "randomize")]
        assert len(values) == len(widgets), (node["type"], widgets)
        assert dict(zip(widgets, values, strict=True)) == {k: v for k, v in api[str(node["id"])]["inputs"].items()
                                                           if not isinstance(v, list)}
