"""sftdist: distributed supervised fine-tuning of chat LLMs with Hydra configs and DeepSpeed ZeRO.

Importing the package is cheap: it never imports DeepSpeed or wandb.
"""

__version__ = "0.1.0"
