"""Every shipped workflow file against a running ComfyUI's /object_info: every node type known, every input
declared and of the right type, every value allowed (the server's own file lists included: it is laid out
as a user's would be after train_and_save), every link consistent; and the template browser's view of them."""

import json
import math
from pathlib import Path

import pytest
from comfy_server import PACK_FOLDER, declared_inputs, has_control_widget, is_widget

pytestmark = pytest.mark.server
FOLDER = Path(__file__).resolve().parents[2] / "workflows"
UI_FILES = sorted(FOLDER.glob("*.json"))
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}


@pytest.fixture(scope="module")
def object_info(client, trained):
    assert trained.error is None, trained.error  # so Load Residual and the LoRA loader list the file the workflows name
    return client.object_info()


def value_problem(spec, value) -> str | None:
    """Why `value` is not allowed for an input declared as `spec`, or None."""
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    choices = kind if isinstance(kind, list) else options.get("options") if kind == "COMBO" else None
    if choices is not None:
        return None if value in choices else f"{value!r} is not one of {choices[:8]}"
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {"INT": isinstance(value, int) and number, "FLOAT": number, "STRING": isinstance(value, str),
          "BOOLEAN": isinstance(value, bool)}.get(kind)
    if ok is None:
        return f"{kind} is not a widget type"
    if not ok:
        return f"{value!r} is not {kind}"
    if number and not options.get("min", -math.inf) <= value <= options.get("max", math.inf):
        return f"{value} is outside [{options.get('min')}, {options.get('max')}]"
    return None


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_api_twin_against_object_info(path, object_info):
    graph = json.loads((FOLDER / "api" / path.name).read_text())
    for node_id, node in graph.items():
        where = f"api/{path.name} node {node_id} ({node['class_type']})"
        assert node["class_type"] in object_info, f"{where}: the server has no such node"
        info = object_info[node["class_type"]]
        inputs = declared_inputs(info)
        assert set(info["input"].get("required", {})) <= set(node["inputs"]), f"{where}: required inputs missing"
        for name, value in node["inputs"].items():
            assert name in inputs, f"{where}: no input {name!r}"
            if isinstance(value, list):  # a link: [source node id, output slot]
                source = graph[value[0]]
                assert object_info[source["class_type"]]["output"][value[1]] == inputs[name][0], f"{where}: {name}"
            else:
                assert is_widget(inputs[name]), f"{where}: {name} takes a link, not a value"
                assert value_problem(inputs[name], value) is None, f"{where}: {name}: {value_problem(inputs[name], value)}"


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_against_object_info(path, object_info):
    wf = json.loads(path.read_text())
    api = json.loads((FOLDER / "api" / path.name).read_text())
    nodes = {n["id"]: n for n in wf["nodes"]}
    link_ids = {link[0] for link in wf["links"]}
    for link_id, src, src_slot, dst, dst_slot, typ in wf["links"]:
        assert object_info[nodes[src]["type"]]["output"][src_slot] == typ, f"link {link_id}"
        assert link_id in nodes[src]["outputs"][src_slot]["links"], f"link {link_id}"
        socket = nodes[dst]["inputs"][dst_slot]
        assert socket["link"] == link_id and socket["type"] == typ, f"link {link_id}"
        assert declared_inputs(object_info[nodes[dst]["type"]])[socket["name"]][0] == typ, f"link {link_id}"
    for node in wf["nodes"]:
        where = f"{path.name} node {node['id']} ({node['type']})"
        assert node["type"] in object_info, f"{where}: the server has no such node"
        info = object_info[node["type"]]
        inputs = declared_inputs(info)
        linked = {s["name"] for s in node["inputs"] if s["link"] is not None}
        assert all(s["link"] in link_ids for s in node["inputs"] if s["link"] is not None), where
        for slot, out in enumerate(node["outputs"]):
            assert out["type"] == info["output"][slot] and set(out["links"]) <= link_ids, f"{where}: output {slot}"
        sockets = {name for name in info["input"].get("required", {}) if not is_widget(inputs[name])}
        assert sockets <= linked, f"{where}: unconnected inputs {sockets - linked}"
        # widgets_values in the order the frontend builds the widgets, a control value after each seed
        order = [*info["input_order"].get("required", []), *info["input_order"].get("optional", [])]
        values = iter(node["widgets_values"])
        for name in order:
            if not is_widget(inputs[name]) or name in linked:
                continue
            value = next(values, "<missing>")
            assert value_problem(inputs[name], value) is None, f"{where}: {name}: {value_problem(inputs[name], value)}"
            assert api[str(node["id"])]["inputs"].get(name) == value, f"{where}: {name} differs from the API twin"
            if has_control_widget(name, inputs[name]):
                assert next(values, None) in CONTROL_VALUES, f"{where}: no control value after {name}"
        assert next(values, None) is None, f"{where}: more widgets_values than widgets"


def test_the_template_browser_lists_and_serves_the_ui_workflows(client):
    assert sorted(client.get_json("/api/workflow_templates")[PACK_FOLDER]) == [p.stem for p in UI_FILES]
    for path in UI_FILES:
        assert client.get_json(f"/api/workflow_templates/{PACK_FOLDER}/{path.name}") == json.loads(path.read_text())
