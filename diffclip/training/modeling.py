"""The model a run trains: from a checkpoint (--init), a config (--config), or a training checkpoint (--resume)."""

from __future__ import annotations

import functools
import json
import os

import torch

from ..checkpoint import CheckpointError, check_keys
from ..config import DiffCLIPConfig
from ..model import DiffCLIP

CONFIGS = {"vit_b16": DiffCLIPConfig.vit_b16}


def config_from_arg(value: str) -> DiffCLIPConfig:
    """--config: a named config (vit_b16) or a JSON file of DiffCLIPConfig fields."""
    if value in CONFIGS:
        return CONFIGS[value]()
    if not value.endswith(".json"):
        raise ValueError(f"--config must be one of {', '.join(CONFIGS)} or a .json file of DiffCLIPConfig fields, "
                         f"got {value!r}")
    if not os.path.isfile(value):
        raise FileNotFoundError(f"--config file not found: {value}")
    with open(value, encoding="utf-8") as f:
        try:
            fields = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"--config {value}: not JSON ({e})") from None
    known = set(DiffCLIPConfig.__dataclass_fields__)
    if not isinstance(fields, dict) or set(fields) - known:
        raise ValueError(f"--config {value}: expected an object with DiffCLIPConfig fields "
                         f"({', '.join(sorted(known))})")
    return DiffCLIPConfig(**fields)


def requested(args):
    """(config, state dict or None) of --init / --config, without allocating the model's weights for --init."""
    if args.init is not None:
        from ..hub import resolve_source
        from ..loading import read_checked

        _, config, state_dict = read_checked(resolve_source(args.init), attn_backend="eager")
        return config, state_dict
    if args.config is not None:
        return config_from_arg(args.config), None
    return None, None


def build(args, resumed: dict | None):
    """The fp32 model in training mode. Resuming, the weights come from the checkpoint (restored later); if
    --init/--config are also given they must describe the same model."""
    config, state_dict = requested(args)
    if resumed is not None:
        if config is not None:
            with torch.device("meta"):
                wanted = DiffCLIP(config, attn_backend="eager")
            try:
                check_keys(wanted, resumed["model_state"])
            except CheckpointError as e:
                src = f"--init {args.init}" if args.init else f"--config {args.config}"
                raise CheckpointError(f"the checkpoint to resume does not fit the model of {src}: {e}") from None
            config = DiffCLIPConfig(**{**resumed["config"].to_dict(), "lambda_init": config.lambda_init,
                                       "lambda_depth_schedule": config.lambda_depth_schedule})
        else:  # λ_init is not in the weights: the run's saved config has it
            saved = resumed.get("diffclip_config") or {}
            config = DiffCLIPConfig(**{**resumed["config"].to_dict(),
                                       **{k: saved[k] for k in ("lambda_init", "lambda_depth_schedule") if k in saved}})
        state_dict = None
    torch.manual_seed(args.seed)  # the same random init on every rank (DDP also broadcasts rank 0's weights)
    model = DiffCLIP(config, attn_backend=args.attn_backend)
    if state_dict is not None:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()})
    return model.train(), config


def enable_grad_checkpointing(model: DiffCLIP) -> None:
    """Recompute each transformer block in the backward (torch.utils.checkpoint, non-reentrant) instead of storing
    its activations. Done by wrapping the blocks' forward on this instance, so the module tree and the state-dict
    keys (the official layout) stay unchanged; without gradient (validation) the blocks run directly."""
    from torch.utils.checkpoint import checkpoint

    def wrapped(forward, x, *args):  # (args: the block's λ, computed for the whole encoder outside the block)
        if torch.is_grad_enabled():
            return checkpoint(forward, x, *args, use_reentrant=False)
        return forward(x, *args)

    for block in [*model.visual.blocks, *model.transformer.resblocks]:
        block.forward = functools.partial(wrapped, block.forward)
