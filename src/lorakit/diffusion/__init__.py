"""Multi-LoRA text-to-image composition on diffusers (issue 15).

- ``lora_files``: kohya and diffusers LoRA files ↔ lorakit AdapterStates (UNet and text encoder);
- lorakit adapters attach to ``UNet2DConditionModel`` Linears and Conv2d layers through the unified runtime
  (targets :data:`UNET_TARGETS`, :data:`UNET_CONV_TARGETS`); ``tiny``: tiny models from configs;
- ``scenes`` + ``testbed``: the synthetic text-to-image testbed (renderer, captions, detectors, the small
  text-conditioned UNet, base and concept-LoRA training, generation and scoring);
- ``composers``: the per-step ``Composer`` interface, the sampling loop and the baselines merge, switch,
  composite, lorahub; ``cmlora`` (+ ``unet_cache``), ``clora``, ``autolora_fusion``: the methods.

``diffusers`` is an optional extra (``pip install lorakit[diffusion]``); this package imports it lazily.
"""

from lorakit.diffusion.lora_files import (
    LoRAFileError,
    detect_layout,
    diffusers_to_states,
    kohya_to_states,
    load_lora_file,
    read_lora_file,
    save_lora_file,
    states_to_diffusers,
    states_to_kohya,
)

UNET_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
UNET_CONV_TARGETS: tuple[str, ...] = ("conv1", "conv2", "conv_shortcut", "proj_in", "proj_out")

__all__ = [
    "UNET_CONV_TARGETS", "UNET_TARGETS", "LoRAFileError", "detect_layout", "diffusers_to_states", "kohya_to_states",
    "load_lora_file", "read_lora_file", "save_lora_file", "states_to_diffusers", "states_to_kohya",
]
