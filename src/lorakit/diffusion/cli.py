"""``lorakit diffusion ...`` commands (the lead registers ``app.add_typer(diffusion_app, name="diffusion")``)."""

from __future__ import annotations

import typer

from lorakit.diffusion.testbed import train_base_cmd

diffusion_app = typer.Typer(add_completion=False, no_args_is_help=True,
                            help="Multi-LoRA text-to-image composition: the synthetic testbed and its models.")
diffusion_app.command("train-base")(train_base_cmd)

__all__ = ["diffusion_app", "train_base_cmd"]
