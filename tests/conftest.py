"""Test set-up shared by both tiers: the pack imported the way ComfyUI imports it (see pack_alias.py)."""

from pack_alias import PACK, ROOT, import_pack  # noqa: F401  (PACK, ROOT: used by the tests)

import_pack()
