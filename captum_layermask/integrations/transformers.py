"""Hugging Face ``transformers`` under layer masking: the encoder layers that are token blocks.

Imported the first time a model with a ``transformers`` submodule is converted (``captum_layermask`` registers
it with :func:`~captum_layermask.register_rule_set`). Hugging Face models are captured by ``torch.export``
(:mod:`~captum_layermask.core.capture`) and masked by the core rules; nothing here is a rule. The encoder layers
below read no token positions (layer norms, attention without a position bias, MLPs, layer scales), so chains
of them run on the visible tokens only (:mod:`~captum_layermask.core.gathering`). BEiT/Data2Vec (relative
position bias), DINOv3 and ViTDet (rotary or windowed positions) are left out: their layers read positions.
"""

from __future__ import annotations

import importlib

from ..core.gathering import register_token_block

TOKEN_BLOCK_CLASSES = {
    "vit": "ViTLayer",
    "deit": "DeiTLayer",
    "dinov2": "Dinov2Layer",
    "dinov2_with_registers": "Dinov2WithRegistersLayer",
    "vit_msn": "ViTMSNLayer",
    "ijepa": "IJepaLayer",
    "clip": "CLIPEncoderLayer",
    "siglip": "SiglipEncoderLayer",
}
"""``{transformers.models.<name>: encoder layer class}``: the layers declared token blocks."""

for _name, _layer in TOKEN_BLOCK_CLASSES.items():
    register_token_block(getattr(importlib.import_module(f"transformers.models.{_name}.modeling_{_name}"), _layer))
