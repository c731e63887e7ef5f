"""The real ComfyUI server for end-to-end tests: `main.py --cpu --listen 127.0.0.1` on a free port.

Everything it reads and writes lives in a temporary --base-directory (ComfyUI 0.3.64's folder_paths puts
models/, input/, output/, temp/, user/ and custom_nodes/ under it), with this pack linked into its
custom_nodes and a random SD1.5-layout checkpoint linked into models/checkpoints, so the user's own
ComfyUI folders are never touched. The database is in memory for the same reason (its default file is
inside the ComfyUI checkout).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from comfy_env import COMFY

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / "workflows"
PACK_FOLDER = "comfyui-personalized-residuals"  # as the README's install step names the clone
# Small enough for two CPU cores: 64 px photos and images (8x8 latents), two steps of each (the sample grid's too:
# its default 20 steps take two minutes on the full-size random checkpoint at 64 px).
TINY = {"PersonalizedResidualTrain": {"steps": 2, "batch_size": 2, "resolution": 64, "sample_steps": 2},
        "EmptyLatentImage": {"width": 64, "height": 64}, "KSampler": {"steps": 2}}
# Frontend settings of the test user: no first-run template browser, no minimap over the graph.
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}


def api_client():
    """scripts/api_client.py as a module (the tests drive the server with the client users get)."""
    if "api_client" not in sys.modules:
        spec = importlib.util.spec_from_file_location("api_client", ROOT / "scripts" / "api_client.py")
        sys.modules["api_client"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["api_client"])
    return sys.modules["api_client"]


def api_workflow(name: str, **tiny_overrides) -> dict:
    """workflows/api/NAME.json with the TINY settings (and `tiny_overrides`, {class_type: {input: value}})."""
    graph = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    for node in graph.values():
        node["inputs"].update({**TINY.get(node["class_type"], {}), **tiny_overrides.get(node["class_type"], {})})
    return graph


def workflow_checkpoint() -> str:
    """The checkpoint file name the shipped workflows load."""
    graph = json.loads((WORKFLOWS / "api" / "train_and_save.json").read_text())
    return next(n["inputs"]["ckpt_name"] for n in graph.values() if n["class_type"] == "CheckpointLoaderSimple")


# Where the files a workflow names live, by the loader input that names them (ComfyUI 0.3.64's folder names).
MODEL_FOLDERS = {"unet_name": "diffusion_models", "clip_name1": "text_encoders", "clip_name2": "text_encoders",
                 "vae_name": "vae", "lora_name": "loras"}


def write_named_files(models: Path) -> None:
    """Placeholder files under the names the Flux workflows load (Flux.1's three files and the users' LoRAs), so
    the server lists them for the checks against /object_info and the frontend: valid safetensors holding one
    zero. test_server_flux.py puts random-weight files of the real shapes in their place before it runs them."""
    import safetensors.torch
    import torch

    for path in sorted(WORKFLOWS.glob("api/flux_*.json")):
        for node in json.loads(path.read_text()).values():
            for name, value in node["inputs"].items():
                if name in MODEL_FOLDERS and isinstance(value, str):
                    target = models / MODEL_FOLDERS[name] / value
                    target.parent.mkdir(parents=True, exist_ok=True)
                    if not target.exists():
                        safetensors.torch.save_file({"placeholder": torch.zeros(1)}, str(target))


def write_photos(folder: Path, count: int = 3, size: int = 64, seed: int = 0) -> None:
    """Seeded 'concept photos': a coloured disc on a plain background, the same size (the stock folder
    loader needs that)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 255, 3)))
        x, y = (int(v) for v in rng.integers(size // 4, 3 * size // 4, 2))
        r = int(rng.integers(size // 8, size // 4))
        ImageDraw.Draw(image).ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        image.save(folder / f"photo_{i}.png")


def write_cut_outs(folder: Path, names: list[str], size: int = 64) -> None:
    """Seeded 'cut-out photos': an opaque coloured disc on a transparent background (RGBA PNG), as a background
    remover saves them; Load Image's MASK of each is 1 - alpha."""
    from PIL import Image, ImageDraw

    for i, name in enumerate(names):
        image = Image.new("RGBA", (size, size), (90, 90, 90, 0))
        r = size // 4 + 2 * i
        colour = (200, 60 + 40 * i, 40, 255)
        ImageDraw.Draw(image).ellipse([size // 2 - r, size // 2 - r, size // 2 + r, size // 2 + r], fill=colour)
        image.save(folder / name)


# ---------------------------------------------------------------- reading a run's results

def picture(client, ref):
    """An image that /history lists, as the RGB array [H, W, 3] /view serves."""
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(client.download(ref))).convert("RGB"))


def steps_reported(run, node_id) -> list[tuple[int, int]]:
    """(step, of) of each progress event the node sent over /ws."""
    return [(e["data"]["value"], e["data"]["max"]) for e in run.events
            if e["type"] == "progress" and e["data"]["node"] == node_id]


# ---------------------------------------------------------------- reading /object_info as the frontend does

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def declared_inputs(info: dict) -> dict:
    """{input name: [type or options, settings]} of one /object_info entry, required and optional."""
    return {**info["input"].get("required", {}), **info["input"].get("optional", {})}


def is_widget(spec) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def has_control_widget(name: str, spec) -> bool:
    """The frontend adds a 'control after generate' widget to an input whose schema asks for one, and to
    every INT named seed or noise_seed whose schema does not say otherwise."""
    settings = spec[1] if len(spec) > 1 else {}
    return bool(settings.get("control_after_generate", spec[0] == "INT" and name in ("seed", "noise_seed")))


def frontend_widgets(info: dict) -> list[str]:
    """The widgets the frontend makes for a node, in order (a control widget right after its input)."""
    inputs = declared_inputs(info)
    names = []
    for name in [*info["input_order"].get("required", []), *info["input_order"].get("optional", [])]:
        if is_widget(inputs[name]):
            names += [name, "control_after_generate"] if has_control_widget(name, inputs[name]) else [name]
    return names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A base directory laid out for the shipped workflows (the checkpoint under the name they load, the
    photos in input/concept/ and, for the second concept of two_concepts, input/concept_b/, placeholders for
    the Flux workflows' files), and the server process on it."""

    def __init__(self, base: Path, checkpoint: Path):
        self.base = base
        for folder in ("models/checkpoints", "models/loras", "input", "output", "custom_nodes", "user/default"):
            (base / folder).mkdir(parents=True, exist_ok=True)
        (base / "custom_nodes" / PACK_FOLDER).symlink_to(ROOT, target_is_directory=True)
        (base / "models" / "checkpoints" / workflow_checkpoint()).symlink_to(checkpoint)
        write_named_files(base / "models")
        write_photos(base / "input" / "concept")
        write_photos(base / "input" / "concept_b", seed=1)
        write_cut_outs(base / "input", ["sks_dog_1.png", "sks_dog_2.png"])  # for train_with_masks
        (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps(SETTINGS))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "server.log"
        self.process: subprocess.Popen | None = None

    @property
    def loras(self) -> Path:
        return self.base / "models" / "loras" / "personalized_residuals"

    def start(self, timeout: float = 300) -> None:
        command = [sys.executable, str(COMFY / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                   "--base-directory", str(self.base), "--database-url", "sqlite:///:memory:",
                   "--disable-auto-launch", "--disable-api-nodes"]  # the paid-API nodes: slow to import, unused
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, cwd=self.base, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode} while starting:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=5):
                    return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer on {self.url} within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])
