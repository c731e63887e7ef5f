"""The RESIDUAL socket type that links the pack's nodes."""

from comfy_api.latest import io

CATEGORY = "personalized_residuals"

# Holds a residual_core.ResidualSet: low-rank proj_out residuals plus the concept's metadata.
Residual = io.Custom("PERSONALIZED_RESIDUAL")
