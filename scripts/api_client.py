#!/usr/bin/env python3
"""Train a personalized residual from a folder of photos and render prompts with LAG, on a running ComfyUI.

    pip install websocket-client        # the one dependency besides Python itself
    python scripts/api_client.py --photos ~/photos/my_dog --class-word dog --identifier sks \\
        --prompt "a photo of a sks dog on the beach" --prompt "a sks dog in the snow" --out renders

It drives ComfyUI's HTTP API with the pack's own API-format workflows (workflows/api/*.json): it uploads
the photos to input/personalized_residuals/..., queues train_and_save, then load_and_sample once per
prompt, prints progress from the /ws websocket, and downloads the loss curve, the sample grid, the renders
and the LAG mask previews into --out. `--residual NAME` skips training and renders with a saved residual.

`ComfyClient` is the reusable part: queue an API-format graph, follow it on /ws, read /history, download
images. The pack's end-to-end tests drive the server with it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mimetypes
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"
PHOTO_TYPES = {".png", ".jpg", ".jpeg", ".webp"}  # what the stock folder loader reads
DONE = ("execution_success", "execution_error", "execution_interrupted")


class PromptRejected(RuntimeError):
    """The server refused the graph before running it (HTTP 400): `node_errors` says which input is wrong."""

    def __init__(self, body: dict):
        self.error, self.node_errors = body.get("error", {}), body.get("node_errors", {})
        lines = [f"{self.error.get('message', 'prompt rejected')}: {self.error.get('details', '')}".rstrip(": ")]
        for node_id, info in self.node_errors.items():
            lines += [f"  node {node_id} ({info.get('class_type')}): {e.get('message')}: {e.get('details')}"
                      for e in info.get("errors", [])]
        super().__init__("\n".join(lines))


@dataclass
class Run:
    """One executed prompt: the websocket events it produced (in order) and its /history entry."""

    prompt_id: str
    events: list[dict] = field(default_factory=list)
    history: dict = field(default_factory=dict)

    @property
    def error(self) -> dict | None:
        """The execution_error (or execution_interrupted) data, or None when the prompt succeeded."""
        return next((e["data"] for e in self.events if e["type"] in DONE[1:]), None)

    @property
    def outputs(self) -> dict:
        return self.history.get("outputs", {})

    def images(self, node_id: str) -> list[dict]:
        return self.outputs.get(str(node_id), {}).get("images", [])


class ComfyClient:
    """A ComfyUI server's HTTP + websocket API. Use as a context manager (it holds a websocket)."""

    def __init__(self, server: str = "http://127.0.0.1:8188", timeout: float = 3600.0):
        try:
            import websocket  # websocket-client
        except ImportError:
            sys.exit("scripts/api_client.py needs the websocket-client package: pip install websocket-client")
        self.base = server.rstrip("/")
        self.timeout = timeout
        self.client_id = uuid.uuid4().hex
        ws_url = self.base.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}"
        self.ws = websocket.create_connection(ws_url, timeout=30)
        self._timeout_error = websocket.WebSocketTimeoutException

    def __enter__(self) -> ComfyClient:
        return self

    def __exit__(self, *exc) -> None:
        self.ws.close()

    # ------------------------------------------------------------------ HTTP

    def _request(self, path: str, data: bytes | None = None, headers: dict | None = None) -> bytes:
        request = urllib.request.Request(self.base + path, data=data, headers=headers or {})
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.read()

    def get_json(self, path: str):
        return json.loads(self._request(path))

    def object_info(self) -> dict:
        return self.get_json("/object_info")

    def upload(self, path: Path, subfolder: str) -> str:
        """Upload a photo to input/<subfolder>/ (a file with the same name and content is kept, not doubled)."""
        boundary = uuid.uuid4().hex
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        parts = [(f'--{boundary}\r\nContent-Disposition: form-data; name="subfolder"\r\n\r\n{subfolder}\r\n').encode(),
                 (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{path.name}"\r\n'
                  f"Content-Type: {kind}\r\n\r\n").encode() + path.read_bytes() + b"\r\n",
                 f"--{boundary}--\r\n".encode()]
        reply = self._request("/upload/image", b"".join(parts), {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        return json.loads(reply)["name"]

    def queue(self, graph: dict) -> str:
        """POST an API-format graph to /prompt; its id. Raises PromptRejected when validation fails."""
        body = json.dumps({"prompt": graph, "client_id": self.client_id}).encode()
        try:
            reply = self._request("/prompt", body, {"Content-Type": "application/json"})
        except urllib.error.HTTPError as e:
            if e.code == 400:
                raise PromptRejected(json.loads(e.read())) from None
            raise
        return json.loads(reply)["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return self.get_json(f"/history/{prompt_id}").get(prompt_id)

    def download(self, image: dict) -> bytes:
        """The bytes of an image that /history lists ({filename, subfolder, type})."""
        query = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
        return self._request(f"/view?{query}")

    def free(self) -> None:
        """Ask the server to unload its models and drop its cached node outputs (POST /free); it does so once
        its queue is idle."""
        body = json.dumps({"unload_models": True, "free_memory": True}).encode()
        self._request("/free", body, {"Content-Type": "application/json"})

    # ------------------------------------------------------------------ running a graph

    def run(self, graph: dict, on_event=None) -> Run:
        """Queue `graph` and follow it on /ws to the end; `on_event(message)` sees each of its JSON events.
        Returns when /history has it, whether it succeeded or failed (see Run.error)."""
        run = Run(self.queue(graph))
        deadline = time.monotonic() + self.timeout
        finished = False
        while time.monotonic() < deadline:
            try:
                raw = self.ws.recv()
            except self._timeout_error:  # quiet for a while (a long step): /history has it once it is done
                run.history = self.history(run.prompt_id) or {}
                if run.history:
                    return run
                continue
            if isinstance(raw, bytes):  # binary frames are image previews
                continue
            message = json.loads(raw)
            if message.get("data", {}).get("prompt_id") != run.prompt_id:
                continue
            run.events.append(message)
            if on_event:
                on_event(message)
            finished = finished or message["type"] in DONE
            # The server stores the history entry, then sends 'executing' with node None.
            if finished and message["type"] == "executing" and message["data"].get("node") is None:
                break
        else:
            raise TimeoutError(f"prompt {run.prompt_id} did not finish within {self.timeout:.0f} s")
        run.history = self.history(run.prompt_id) or {}
        return run


# ---------------------------------------------------------------------- the command line tool

def workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())


def node_of(graph: dict, class_type: str, title: str | None = None) -> str:
    """The id of the one node of `class_type` (and, if given, of that title) in `graph`."""
    ids = [i for i, n in graph.items()
           if n["class_type"] == class_type and title in (None, n.get("_meta", {}).get("title"))]
    if len(ids) != 1:
        named = f" titled {title!r}" if title else ""
        raise ValueError(f"expected one {class_type} node{named} in the workflow, found {len(ids)}")
    return ids[0]


def set_inputs(graph: dict, class_type: str, **values) -> str:
    node_id = node_of(graph, class_type)
    graph[node_id]["inputs"].update(values)
    return node_id


class Progress:
    """Prints what the server reports for one graph: each node as it starts, and step counters."""

    def __init__(self, graph: dict, client: ComfyClient):
        def name(node):
            kind = node["class_type"]
            return node.get("_meta", {}).get("title") or client.get_json(f"/object_info/{kind}")[kind]["display_name"]

        self.names = {i: name(n) for i, n in graph.items()}

    def __call__(self, message: dict) -> None:
        kind, data = message["type"], message["data"]
        if kind == "execution_cached" and data.get("nodes"):
            print(f"  cached: {', '.join(self.names.get(n, n) for n in data['nodes'])}")
        elif kind == "executing" and data.get("node") is not None:
            print(f"  running {self.names.get(data['node'], data['node'])}", flush=True)
        elif kind == "progress":  # one line, rewritten in place on a terminal
            tty = sys.stdout.isatty()
            start, end = ("\r", "\n" if data["value"] >= data["max"] else "") if tty else ("", "\n")
            print(f"{start}    step {data['value']}/{data['max']}", end=end, flush=True)


def run_or_exit(client: ComfyClient, graph: dict, what: str) -> Run:
    print(f"{what}:")
    try:
        run = client.run(graph, Progress(graph, client))
    except PromptRejected as e:
        sys.exit(f"the server refused the {what} graph:\n{e}")
    if run.error:
        sys.exit(f"{what} failed in {run.error.get('node_type')}: {run.error.get('exception_message', 'interrupted')}")
    return run


def save_images(client: ComfyClient, run: Run, node_id: str, out: Path, stem: str) -> None:
    for i, image in enumerate(run.images(node_id)):
        path = out / f"{stem}{'' if i == 0 else f'_{i}'}.png"
        path.write_bytes(client.download(image))
        print(f"  wrote {path}")


def photos_of(folder: Path) -> list[Path]:
    photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in PHOTO_TYPES)
    if not photos:
        sys.exit(f"no photos ({', '.join(sorted(PHOTO_TYPES))}) in {folder}")
    return photos


def train(client: ComfyClient, args, out: Path) -> str:
    """Upload the photos, train and save; the saved residual's name as Load Residual lists it."""
    photos = photos_of(args.photos)
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in photos)).hexdigest()[:10]
    folder = f"personalized_residuals/{args.identifier}_{args.class_word}_{digest}".replace(" ", "_")
    for photo in photos:  # a folder named by the photos' content: the same photos, the same folder
        client.upload(photo, folder)
    print(f"uploaded {len(photos)} photos to input/{folder}/")
    graph = workflow("train_and_save")
    set_inputs(graph, "CheckpointLoaderSimple", ckpt_name=args.checkpoint)
    loader = set_inputs(graph, "LoadImageSetFromFolderNode", folder=folder, resize_method=args.resize)
    graph[loader]["_meta"] = {"title": f"photos (input/{folder}/)"}
    set_inputs(graph, "PersonalizedResidualTrain", class_word=args.class_word, identifier=args.identifier,
               steps=args.steps, resolution=args.resolution, batch_size=args.batch_size, seed=args.seed,
               sample_steps=args.train_sample_steps)
    run = run_or_exit(client, graph, "training")
    save_images(client, run, node_of(graph, "PreviewImage", "loss curve"), out, "loss_curve")
    if args.train_sample_steps:  # the sample grid: the training prompt by the base model and with the residual
        save_images(client, run, node_of(graph, "PreviewImage", "samples"), out, "samples")
    saved = run.outputs[node_of(graph, "PersonalizedResidualSave")]["residual_name"][0]
    print(f"  saved models/loras/personalized_residuals/{saved}")
    return saved


def render(client: ComfyClient, args, residual: str, out: Path) -> None:
    for i, prompt in enumerate(args.prompt):
        graph = workflow("load_and_sample")
        set_inputs(graph, "CheckpointLoaderSimple", ckpt_name=args.checkpoint)
        set_inputs(graph, "PersonalizedResidualLoad", residual_name=residual)
        set_inputs(graph, "PersonalizedResidualLAGSampler", prompt=prompt, strength=args.strength, mode=args.mode)
        set_inputs(graph, "EmptyLatentImage", width=args.width, height=args.height)
        set_inputs(graph, "KSampler", seed=args.seed + i, steps=args.sample_steps, cfg=args.cfg)
        run = run_or_exit(client, graph, f"render {i + 1}/{len(args.prompt)} ({prompt!r})")
        save_images(client, run, node_of(graph, "SaveImage"), out, f"render_{i:02}")
        if args.mode == "LAG":
            save_images(client, run, node_of(graph, "PersonalizedResidualLAGMaskPreview"), out, f"lag_mask_{i:02}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--server", default="http://127.0.0.1:8188", help="the running ComfyUI")
    p.add_argument("--checkpoint", default="v1-5-pruned-emaonly.safetensors", help="a file of models/checkpoints/")
    p.add_argument("--out", type=Path, default=Path("personalized_residuals_out"), help="where images are written")
    p.add_argument("--seed", type=int, default=0)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--photos", type=Path, help="a folder of 4-6 photos of the concept: train a residual")
    what.add_argument("--residual", help="skip training: a saved residual (models/loras/personalized_residuals/NAME)")
    t = p.add_argument_group("training")
    t.add_argument("--class-word", default="dog", help="the concept's class: dog, backpack, guitar amplifier")
    t.add_argument("--identifier", default="sks", help="the rare word that names the concept in prompts")
    t.add_argument("--steps", type=int, default=150)
    t.add_argument("--resolution", type=int, default=0,
                   help="0: the model's native one (512 for SD1.x, 768 for SD2.x-v, 1024 for SDXL)")
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--train-sample-steps", type=int, default=20,
                   help="steps per image of the sample grid saved as samples.png (0: no grid)")
    t.add_argument("--resize", default="None", choices=["None", "Stretch", "Crop", "Pad"],
                   help="how ComfyUI's folder loader treats photos of different sizes (None: they must match)")
    s = p.add_argument_group("rendering")
    s.add_argument("--prompt", action="append", default=[], help="a prompt with '{identifier} {class word}'; repeat")
    s.add_argument("--width", type=int, default=512)
    s.add_argument("--height", type=int, default=512)
    s.add_argument("--sample-steps", type=int, default=30)
    s.add_argument("--cfg", type=float, default=7.0)
    s.add_argument("--strength", type=float, default=1.0)
    s.add_argument("--mode", default="LAG", choices=["LAG", "global"])
    args = p.parse_args(argv)
    if args.residual and not args.prompt:
        p.error("--residual renders a saved residual: give at least one --prompt")

    args.out.mkdir(parents=True, exist_ok=True)
    with ComfyClient(args.server) as client:
        residual = args.residual or train(client, args, args.out)
        render(client, args, residual, args.out)
    print("done")


if __name__ == "__main__":
    main()
