"""The pack in the ComfyUI web UI: the frontend ComfyUI pins (comfyui-frontend-package), served by the real
server (comfy_server.py), in headless Chromium driven by Playwright.

Each workflow file is opened as a user opens one (Workflow > Open: the page's file input) and must raise
no missing-node dialog and no invalid-workflow alert; its nodes must be registered and show their widgets,
holding the values of the file's API twin. Hovering each input and output of the Train node shows its tooltip.
One workflow is queued with the Run button and watched to the end on the page, where the loss curve and the
sample grid then show on their preview nodes and Save Residual shows the file's name (the pack's
web/save_residual.js).
Each node's help page (web/docs/<node id>.md) must render in the node library with its pictures, each
workflow's thumbnail (workflows/<name>.jpg) must show in the Templates browser, and the node search box
must find the nodes by what people call them.
Set PERSONALIZED_RESIDUALS_SCREENSHOT=docs/web-ui.png to keep the final screenshot, and
PERSONALIZED_RESIDUALS_PICTURES=1 to redraw the thumbnails, the help pages' node pictures, docs/help-page.png
and, from the run, docs/web-ui.png (the whole graph) and docs/train-samples.png (training, its loss curve and
sample grid).
"""

import io
import json
import os
import shutil
from pathlib import Path

import pytest
from comfy_server import PACK_FOLDER, TINY, declared_inputs, frontend_widgets
from PIL import Image

try:
    from playwright.sync_api import TimeoutError as PageTimeout
    from playwright.sync_api import sync_playwright
except ImportError:
    sync_playwright = None

CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or shutil.which("chromium-browser")
if sync_playwright is None or CHROMIUM is None:
    why = "the playwright package is missing (tests/run.sh installs it)" if sync_playwright is None else \
        "no chromium (apt-get install chromium, or set CHROMIUM_PATH)"
    pytest.skip(f"BROWSER TESTS SKIPPED: {why}", allow_module_level=True)

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "workflows"
UI_FILES = sorted(FOLDER.glob("*.json"))
HELP = ROOT / "web" / "docs"
PICTURES = bool(os.environ.get("PERSONALIZED_RESIDUALS_PICTURES"))
# Headless, and nothing that reaches outside the machine (Chromium's own update and sync calls included).
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
OURS = "PersonalizedResidual"

NODES_JS = """() => app.graph.nodes.map(n => ({
    id: n.id, type: n.type, registered: !!LiteGraph.registered_node_types[n.type],
    widgets: (n.widgets || []).map(w => [w.name, w.value]), fits: n.size[1] >= n.computeSize()[1]}))"""
# Alerts and dialogs on the page: the missing-node dialog, the invalid-workflow toast, any error toast.
NOTICES_JS = """() => Array.from(document.querySelectorAll('.p-dialog, .p-toast-message')).map(e => e.innerText)"""
PAGE_ERRORS = []  # uncaught exceptions in the page
COMMAND_JS = "id => app.extensionManager.command.execute(id)"
# The bounding box on the screen of the nodes `ids` (all when null), for a screenshot of them alone.
GRAPH_BOX_JS = """([ids, margin]) => {
    const nodes = ids ? ids.map(id => app.graph.getNodeById(id)) : app.graph.nodes;
    const rects = nodes.map(n => n.boundingRect), ds = app.canvas.ds;
    const box = app.canvas.canvas.getBoundingClientRect();
    const [x0, y0] = [Math.min(...rects.map(r => r[0])), Math.min(...rects.map(r => r[1]))];
    const [x1, y1] = [Math.max(...rects.map(r => r[0] + r[2])), Math.max(...rects.map(r => r[1] + r[3]))];
    const screen = (x, y) => [box.left + (x + ds.offset[0]) * ds.scale, box.top + (y + ds.offset[1]) * ds.scale];
    const [[left, top], [right, bottom]] = [screen(x0, y0), screen(x1, y1)];
    return {x: left - margin, y: top - margin, width: right - left + 2 * margin, height: bottom - top + 2 * margin};
}"""
# Where on the screen the mouse shows the tooltip of input or output `name` of node `id`: the middle of its widget, or
# its socket (an input without a widget, or an output); null for a text box, a DOM element the canvas has no tooltip for.
SPOT_JS = """([id, name, output]) => {
    const n = app.graph.getNodeById(id), ds = app.canvas.ds, box = app.canvas.canvas.getBoundingClientRect();
    const widget = output ? null : n.widgets?.find(w => w.name === name);
    if (widget?.element) return null;
    const [x, y] = widget ? [n.pos[0] + n.size[0] / 2, n.pos[1] + widget.y + LiteGraph.NODE_WIDGET_HEIGHT / 2]
        : n.getConnectionPos(!output, (output ? n.outputs : n.inputs).findIndex(s => s.name === name));
    return [box.left + (x + ds.offset[0]) * ds.scale, box.top + (y + ds.offset[1]) * ds.scale];
}"""
TOOLTIP_JS = "() => document.querySelector('.node-tooltip')?.textContent ?? null"
# The text box of input `name` of node `id`: shown, inside the node on the screen, and its text.
TEXT_BOX_JS = """([id, name]) => {
    const n = app.graph.getNodeById(id), el = n.widgets.find(w => w.name === name).element, r = el.getBoundingClientRect();
    const ds = app.canvas.ds, c = app.canvas.canvas.getBoundingClientRect();
    const [left, top] = [c.left + (n.pos[0] + ds.offset[0]) * ds.scale, c.top + (n.pos[1] + ds.offset[1]) * ds.scale];
    return {visible: el.checkVisibility(), inside: r.width > 0 && r.height > 0 && r.left >= left && r.top >= top
            && r.right <= left + n.size[0] * ds.scale && r.bottom <= top + n.size[1] * ds.scale, value: el.value};
}"""
# The picture a preview node shows: its file name and size.
SHOWN_IMAGE_JS = """id => { const img = app.graph.getNodeById(id).imgs[0];
    return {src: new URL(img.src).searchParams.get('filename'), size: [img.naturalWidth, img.naturalHeight]}; }"""


@pytest.fixture(scope="module")
def page(comfy_server, trained):
    assert trained.error is None, trained.error  # so Load Residual lists the file the workflows name
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1920, "height": 1000})
        page.on("pageerror", lambda error: PAGE_ERRORS.append(str(error)))
        page.goto(comfy_server.url)
        page.wait_for_function("window.app?.graph && window.LiteGraph", timeout=120_000)
        yield page
        browser.close()


def open_workflow(page, path: Path) -> list[str]:
    """Open a workflow file through the page's file input; the dialogs, alerts and uncaught errors it raised."""
    PAGE_ERRORS.clear()
    page.evaluate("() => app.graph.clear()")
    page.set_input_files("#comfy-file-input", str(path))
    page.wait_for_function("n => app.graph.nodes.length === n", arg=len(json.loads(path.read_text())["nodes"]))
    page.wait_for_timeout(1000)  # dialogs and toasts open on the next frames
    notices = page.evaluate(NOTICES_JS) + PAGE_ERRORS
    page.keyboard.press("Escape")
    page.locator(".p-toast-close-button").evaluate_all("buttons => buttons.forEach(b => b.click())")
    return notices


@pytest.fixture(scope="module")
def object_info(client):
    return client.object_info()


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_each_workflow_opens_with_every_node_and_widget(page, path, object_info):
    assert open_workflow(page, path) == []
    api = json.loads((FOLDER / "api" / path.name).read_text())
    shown = page.evaluate(NODES_JS)
    assert sorted(n["id"] for n in shown) == sorted(int(i) for i in api)
    for node in shown:
        where = f"{path.name} node {node['id']} ({node['type']})"
        assert node["registered"] and node["fits"], where
        widgets = dict(node["widgets"])
        if node["type"].startswith(OURS):
            assert [name for name, _ in node["widgets"]] == frontend_widgets(object_info[node["type"]]), where
        for name, value in api[str(node["id"])]["inputs"].items():
            if not isinstance(value, list):  # not a link: the widget holds the file's value
                assert widgets.get(name) == pytest.approx(value), f"{where}: {name}"
    if any(n["type"] == f"{OURS}LAGSampler" for n in shown):  # the multi-line prompt is a real text box
        prompts = page.locator("textarea").evaluate_all("boxes => boxes.map(b => b.value)")
        lag_prompts = [v["inputs"]["prompt"] for v in api.values() if v["class_type"] == f"{OURS}LAGSampler"]
        assert lag_prompts and set(lag_prompts) <= set(prompts)
    if PICTURES:
        draw_pictures(page, path, shown)


def draw_pictures(page, path: Path, shown: list[dict]) -> None:
    """workflows/<name>.jpg, the Templates browser's thumbnail (the graph fitted to a 512 px square), and
    web/docs/<node id>.png at 100% for each of our nodes that the workflows before this one lack."""
    page.evaluate(COMMAND_JS, "Comfy.Canvas.FitView")
    page.wait_for_timeout(500)
    graph = Image.open(io.BytesIO(page.screenshot(clip=page.evaluate(GRAPH_BOX_JS, [None, 24])))).convert("RGB")
    side = max(graph.size)
    square = Image.new("RGB", (side, side), graph.getpixel((2, 2)))  # the canvas's own background
    square.paste(graph, ((side - graph.width) // 2, (side - graph.height) // 2))
    square.resize((512, 512), Image.LANCZOS).save(FOLDER / f"{path.stem}.jpg", quality=80, optimize=True)
    earlier = {n["type"] for p in UI_FILES[:UI_FILES.index(path)] for n in json.loads(p.read_text())["nodes"]}
    for node in shown:
        if node["type"].startswith(OURS) and node["type"] not in earlier:
            earlier.add(node["type"])
            show_node(page, node["id"])
            box = page.evaluate(GRAPH_BOX_JS, [[node["id"]], 6])
            box.update(y=box["y"] - 22, height=box["height"] + 22)  # and the pack's badge above the title
            page.screenshot(path=str(HELP / f"{node['type']}.png"), clip=box)


def show_node(page, node_id: int) -> None:
    """The canvas at 100%, node `node_id`'s top left corner 200 px from the canvas's."""
    page.evaluate("""id => { const n = app.graph.getNodeById(id), ds = app.canvas.ds;
        ds.scale = 1; ds.offset = [200 - n.pos[0], 200 - n.pos[1]]; app.canvas.setDirty(true, true); }""", node_id)
    page.wait_for_timeout(300)


def node_ids(path: Path) -> dict[str, int]:
    """{title, or type for a node without one: id} of a workflow file's nodes."""
    return {n.get("title", n["type"]): n["id"] for n in json.loads(path.read_text())["nodes"]}


def test_the_train_node_shows_each_input_and_output_with_its_tooltip(page, object_info):
    """Hovering an input's widget or socket, or an output, shows the tooltip the schema declares (sample_prompts,
    on_cancel, resume_from and the rest). The frontend shows none for a text box (a DOM widget, such as
    sample_prompts): that one must be on the node, inside its bounds, holding the file's value."""
    path = FOLDER / "train_and_save.json"
    assert open_workflow(page, path) == []
    train = node_ids(path)[f"{OURS}Train"]
    info = object_info[f"{OURS}Train"]
    show_node(page, train)
    wanted = [(name, (spec[1] if len(spec) > 1 else {}).get("tooltip"), False) for name, spec in declared_inputs(info).items()]
    wanted += [(name, tip, True) for name, tip in zip(info["output_name"], info["output_tooltips"], strict=True)]
    assert {"sample_prompts", "sample_every", "sample_steps", "on_cancel", "resume_from", "samples"} <= {w[0] for w in wanted}
    text_boxes = []
    for name, tooltip, output in wanted:
        assert tooltip, f"{name}: no tooltip declared"
        spot = page.evaluate(SPOT_JS, [train, name, output])
        if spot is None:
            text_boxes.append(name)
            continue
        page.mouse.move(5, 500)  # off the node: the tooltip shown before goes away
        page.mouse.move(*spot)
        try:
            page.wait_for_function(f"t => ({TOOLTIP_JS})() === t", arg=tooltip, timeout=5000)
        except PageTimeout:
            pytest.fail(f"{name}: hovering it shows {page.evaluate(TOOLTIP_JS)!r}, not its tooltip {tooltip!r}")
    page.mouse.move(5, 500)
    assert "sample_prompts" in text_boxes
    api = json.loads((FOLDER / "api" / path.name).read_text())[str(train)]["inputs"]
    for name in text_boxes:
        box = page.evaluate(TEXT_BOX_JS, [train, name])
        assert box == {"visible": True, "inside": True, "value": api[name]}, name


def test_a_workflow_with_an_unknown_node_raises_the_missing_node_dialog(page, tmp_path):
    """The check above can fail: the same steps on a workflow naming a node nobody has show the dialog."""
    wf = json.loads((FOLDER / "train_and_save.json").read_text())
    wf["nodes"][0]["type"] = "NoSuchNodeAnywhere"
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(wf))
    notices = open_workflow(page, path)
    assert any("Some Nodes Are Missing" in n and "NoSuchNodeAnywhere" in n for n in notices), notices


# The sample grid in the run from the page: one prompt, a column for the base model and one per training step.
SAMPLES = {"sample_prompts": "a photo of a sks dog on the beach", "sample_every": 1}


def test_queue_from_the_page_and_watch_it_finish(page, client, comfy_server, tmp_path):
    path = FOLDER / "train_and_sample.json"
    assert open_workflow(page, path) == []
    # A new seed: it trains from the page.
    settings = {**TINY, f"{OURS}Train": {**TINY[f"{OURS}Train"], "seed": 2, **SAMPLES}}
    page.evaluate("""settings => {
        for (const node of app.graph.nodes)
            for (const [name, value] of Object.entries(settings[node.type] || {})) {
                const widget = node.widgets.find(w => w.name === name);
                widget.value = value;
                widget.callback?.(value);
            }
        window.seen = [];
        for (const type of ['progress', 'executed', 'execution_success', 'execution_error'])
            app.api.addEventListener(type, e => window.seen.push({type, ...e.detail}));
        // A live preview: the image goes to the node that sent it (its id in the metadata).
        app.api.addEventListener('b_preview_with_metadata',
            e => window.seen.push({type: 'preview', node: e.detail.nodeId, mime: e.detail.blob.type}));
    }""", settings)

    page.locator("[data-testid=queue-button]").click()
    page.wait_for_function("() => seen.some(e => e.type.startsWith('execution_'))", timeout=300_000)
    seen = page.evaluate("() => seen")
    ends = [e for e in seen if e["type"].startswith("execution_")]
    assert ends[0]["type"] == "execution_success", ends
    ids = node_ids(path)
    train_steps = [(e["value"], e["max"]) for e in seen if e["type"] == "progress" and e["node"] == str(ids[f"{OURS}Train"])]
    assert train_steps == [(1, 2), (2, 2)]  # the page got the training progress bar
    # and, while the node ran, the loss curve so far (a 2-step run shows one, after step 1)
    train_events = [(i, e) for i, e in enumerate(seen) if e.get("node") == str(ids[f"{OURS}Train"])]
    previews = [i for i, e in train_events if e["type"] == "preview"]
    last_step = next(i for i, e in train_events if e["type"] == "progress" and e["value"] == e["max"])
    assert previews and previews[0] < last_step, train_events
    assert seen[previews[0]]["mime"] == "image/png"
    shown = ["loss curve", "samples", "SaveImage", f"{OURS}LAGMaskPreview"]  # and the render, the mask preview
    page.wait_for_function("ids => ids.every(id => app.graph.getNodeById(id).imgs?.[0]?.complete)",
                           arg=[ids[t] for t in shown])

    history = client.history(ends[0]["prompt_id"])
    assert history["status"]["status_str"] == "success"
    # The sample grid on its node is the Train node's samples output: base, step 1, step 2 side by side.
    [grid] = history["outputs"][str(ids["samples"])]["images"]
    on_node = page.evaluate(SHOWN_IMAGE_JS, ids["samples"])
    pixels = Image.open(io.BytesIO(client.download(grid)))
    assert on_node == {"src": grid["filename"], "size": list(pixels.size)}
    columns = 1 + TINY[f"{OURS}Train"]["steps"] // SAMPLES["sample_every"]
    render = TINY[f"{OURS}Train"]["resolution"]  # the samples' size when training at under 256 px
    assert pixels.width >= columns * render and pixels.height > render, f"not a grid of {columns} samples: {pixels.size}"
    band = pixels.convert("L").crop((0, pixels.height - render, pixels.width, pixels.height))  # the images' row
    assert band.getextrema()[0] < 250, "the grid shows no images, only its white background"
    saved = history["outputs"][str(ids[f"{OURS}Save"])]["residual_name"][0]
    assert (comfy_server.loras / saved).is_file()
    shown_name = page.evaluate("id => app.graph.getNodeById(id).widgets.find(w => w.name === 'saved')?.value",
                               ids[f"{OURS}Save"])  # web/save_residual.js
    assert shown_name == f"saved models/loras/personalized_residuals/{saved}"

    page.evaluate(COMMAND_JS, "Comfy.Canvas.FitView")
    page.wait_for_timeout(1000)
    screenshot = tmp_path / "web-ui.png"
    page.screenshot(path=str(screenshot), clip=page.evaluate(GRAPH_BOX_JS, [None, 24]))
    if os.environ.get("PERSONALIZED_RESIDUALS_SCREENSHOT"):
        shutil.copy(screenshot, os.environ["PERSONALIZED_RESIDUALS_SCREENSHOT"])
    if PICTURES:
        page.set_viewport_size({"width": 1920, "height": 1400})  # the whole graph at 80%: a zoom that draws text
        page.wait_for_timeout(500)
        page.evaluate("""() => { const ds = app.canvas.ds, s = 0.8;
            const x = Math.min(...app.graph.nodes.map(n => n.pos[0])), y = Math.min(...app.graph.nodes.map(n => n.pos[1]));
            ds.scale = s; ds.offset = [40 / s - x, 60 / s - y]; app.canvas.setDirty(true, true); }""")
        page.wait_for_timeout(500)
        save_picture(page.screenshot(clip=page.evaluate(GRAPH_BOX_JS, [None, 24])), ROOT / "docs" / "web-ui.png")
        training = [ids[t] for t in ("CheckpointLoaderSimple", "concept photos (input/concept/)", f"{OURS}Train",
                                     f"{OURS}Save", "loss curve", "samples")]
        show_node(page, training[0])  # the top left one, at 100%
        box = page.evaluate(GRAPH_BOX_JS, [training, 12])
        box.update(y=box["y"] - 22, height=box["height"] + 22)  # and the pack's badges above the titles
        save_picture(page.screenshot(clip=box), ROOT / "docs" / "train-samples.png")
        page.set_viewport_size({"width": 1920, "height": 1000})


def save_picture(png: bytes, path: Path) -> None:
    """A screenshot as a PNG of 256 colours (a third of the size; the UI has few)."""
    Image.open(io.BytesIO(png)).convert("RGB").quantize(256).save(path, optimize=True)


# ---------------------------------------------------------------- help where the user is

# The help page the node library shows (NodeHelpPage): the pack's markdown, or the frontend's fallback, a
# table built from the description and tooltips, when web/docs/<node id>.md does not load.
HELP_JS = """() => {
    const page = document.querySelector('.node-help-content'), md = page?.querySelector('.markdown-content');
    if (!page || !(md || page.querySelector('.fallback-content'))) return null;
    return {header: page.parentElement.querySelector('.font-semibold')?.textContent, markdown: !!md,
            title: md?.querySelector('h1')?.textContent,
            names: Array.from(md?.querySelectorAll('li > code:first-child') || []).map(c => c.textContent),
            images: Array.from(md?.querySelectorAll('img') || []).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])};
}"""
# The search box's suggestions: [display name, category].
SEARCH_JS = """() => Array.from(document.querySelectorAll('.p-autocomplete-option')).map(o => [
    o.querySelector('.option-display-name > div')?.textContent.trim(),
    o.querySelector('.option-category')?.textContent.trim()])"""
# frontend 1.27.10 searches node ids and display names only (NodeSearchService: Fuse keys "name", "display_name");
# aliases came with ComfyUI's io.Schema(search_aliases=...) (Comfy-Org/ComfyUI#12010, ComfyUI_frontend#8223).
NO_ALIASES = pytest.mark.xfail(strict=True, reason="the frontend searches ids and display names, not descriptions")


@pytest.fixture(scope="module")
def ours(object_info):
    return {name: info for name, info in object_info.items() if info["python_module"] == f"custom_nodes.{PACK_FOLDER}"}


def test_each_node_has_a_help_page_in_the_node_library(page, ours):
    assert sorted(p.stem for p in HELP.glob("*.md")) == sorted(ours)
    page.keyboard.press("Escape")
    page.evaluate(COMMAND_JS, "Workspace.ToggleSidebarTab.node-library")
    page.get_by_text(next(iter(ours.values()))["category"], exact=True).click()  # open the pack's folder
    for name, info in ours.items():
        row = page.locator(".p-tree-node-content").filter(has=page.get_by_text(info["display_name"], exact=True))
        row.hover()
        row.locator(".help-button").click()
        page.wait_for_function(f"() => ({HELP_JS})()?.header === {json.dumps(info['display_name'])}")
        page.wait_for_function(f"() => ({HELP_JS})().images.every(([src, complete]) => complete)")
        shown = page.evaluate(HELP_JS)
        assert shown["markdown"], f"{name}: no help page, the frontend fell back to the description"
        assert shown["title"] == info["display_name"], name
        documented = set(declared_inputs(info)) | set(info["output_name"])
        assert documented <= set(shown["names"]), f"{name}: undocumented {documented - set(shown['names'])}"
        assert shown["images"], f"{name}: no picture"
        for src, _, width in shown["images"]:
            assert src.startswith(f"/extensions/{PACK_FOLDER}/docs/") and width > 0, f"{name}: {src} did not load"
        if PICTURES and name == f"{OURS}LAGSampler":
            gutter = page.locator(".p-splitter-gutter").first.bounding_box()  # widen the sidebar
            page.mouse.move(gutter["x"] + 2, gutter["y"] + 200)
            page.mouse.down()
            page.mouse.move(gutter["x"] + 200, gutter["y"] + 200, steps=5)
            page.mouse.up()
            page.wait_for_timeout(500)
            shot = page.locator(".node-help-content").locator("xpath=..").screenshot()
            Image.open(io.BytesIO(shot)).convert("RGB").quantize(128).save(ROOT / "docs" / "help-page.png", optimize=True)
        page.locator(".node-help-content").locator("xpath=..").locator("button").first.click()  # back to the library
    page.evaluate(COMMAND_JS, "Workspace.ToggleSidebarTab.node-library")


def test_each_workflow_has_a_thumbnail_in_the_templates_browser(page, comfy_server):
    served = {}

    def listen(response):
        served[response.url] = (response.status, response.headers.get("content-type"))

    page.on("response", listen)
    page.evaluate(COMMAND_JS, "Comfy.BrowseTemplates")
    page.get_by_text(PACK_FOLDER, exact=True).click()
    try:
        for path in UI_FILES:
            card = page.locator(f"[data-testid='template-workflow-{path.stem}']")
            card.scroll_into_view_if_needed()
            page.wait_for_function("card => card.querySelector('img')?.naturalWidth > 0 || card.querySelector('.pi-image')",
                                   arg=card.element_handle(), timeout=20_000)
            url = f"{comfy_server.url}/api/workflow_templates/{PACK_FOLDER}/{path.stem}.jpg"
            assert served.get(url) == (200, "image/jpeg"), f"{path.stem}: {served.get(url)}"
            assert card.locator("img").evaluate("img => img.naturalWidth") > 0, path.stem
    finally:
        page.remove_listener("response", listen)
        page.keyboard.press("Escape")


@pytest.mark.parametrize("query, expected", [
    ("lora", {"LAG LoRA"}),
    ("personalize", {"Train Personalized Residual", "Save Residual", "Load Residual", "LAG Sampler", "LAG LoRA",
                     "LAG Mask Preview"}),
    pytest.param("dreambooth", {"Train Personalized Residual"}, marks=NO_ALIASES),
    pytest.param("regional", {"LAG Sampler", "LAG LoRA"}, marks=NO_ALIASES),
])
def test_the_node_search_box_finds_our_nodes_by_what_people_call_them(page, ours, query, expected):
    page.keyboard.press("Escape")
    page.evaluate(COMMAND_JS, "Workspace.SearchBox.Toggle")
    box = page.locator(".comfy-vue-node-search-container input").first
    box.wait_for()
    page.keyboard.type(query)
    page.wait_for_function("([box, query]) => box.value === query", arg=[box.element_handle(), query])
    page.wait_for_timeout(500)
    found = {name for name, category in page.evaluate(SEARCH_JS) if category == next(iter(ours.values()))["category"]}
    page.keyboard.press("Escape")
    assert expected <= found, found
