"""Tier 2 fixtures: tiny models built through ComfyUI's own classes (see comfy_env.py)."""

from pathlib import Path

import pytest
from comfy_env import (
    SKIPPED,
    SDXLTextStandIn,
    build_clip,
    build_sd2_v,
    build_sd15,
    build_sdxl,
    build_vae,
)

if SKIPPED:  # every tier-2 module but test_comfyui_present.py, which says loudly that tier 2 did not run
    collect_ignore = [p.name for p in Path(__file__).parent.glob("test_*.py") if p.name != "test_comfyui_present.py"]


@pytest.fixture(scope="session")
def sd15():
    return build_sd15()


@pytest.fixture(scope="session")
def sd2_v():
    return build_sd2_v()


@pytest.fixture(scope="session")
def sdxl():
    return build_sdxl()


@pytest.fixture(scope="session")
def clip():
    return build_clip("sd1")


@pytest.fixture(scope="session")
def clip_sd2():
    return build_clip("sd2")


@pytest.fixture(scope="session")
def clip_sdxl():
    return SDXLTextStandIn()


@pytest.fixture(scope="session")
def vae():
    return build_vae()


@pytest.fixture
def loras_dir(tmp_path, monkeypatch):
    """ComfyUI's loras folder pointed at a fresh temporary folder."""
    import folder_paths

    folder = tmp_path / "loras"
    folder.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(folder)], folder_paths.supported_pt_extensions))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    return folder


# ---------------------------------------------------------------- the real server (end-to-end tests)

@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """ComfyUI's main.py on a free port with the pack in a temporary base directory (see comfy_server.py)."""
    from comfy_server import ComfyServer
    from sd15_checkpoint import random_sd15_checkpoint

    server = ComfyServer(tmp_path_factory.mktemp("comfyui"), random_sd15_checkpoint())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session", autouse=True)
def flux_files_writer(request, tmp_path_factory):
    """Flux's files for test_server_flux.py, written in the background from tier 2's first test on (None when
    none of its tests runs)."""
    if not any(item.path.name == "test_server_flux.py" for item in request.session.items):
        yield None
        return
    from flux_files import BackgroundWriter

    writer = BackgroundWriter(tmp_path_factory.mktemp("flux_files") / "writer.log")
    yield writer
    writer.stop()


@pytest.fixture(scope="session")
def client(comfy_server):
    from comfy_server import api_client

    with api_client().ComfyClient(comfy_server.url, timeout=600) as c:
        yield c


@pytest.fixture(scope="session")
def trained(client):
    """workflows/api/train_and_save.json run once over HTTP: the Run (its /ws events and /history entry)."""
    from comfy_server import api_workflow

    return client.run(api_workflow("train_and_save"))
