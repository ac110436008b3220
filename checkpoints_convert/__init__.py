"""Open-Sora Plan v1.5 SUV weights: released format <-> our checkpoints (dist and legacy), with TP/PP resharding.

Python API (the CLI in `cli.py` wraps it):
    open_released(path, prefix, nest)                      lazy reader of released weights
    import_released(source, out, cfg, fmt, tp, pp)         released -> our dist or legacy checkpoint
    open_checkpoint(path, cfg, iteration, weights)         lazy reader of our checkpoint (full tensors)
    export_checkpoint(reader, cfg, what, safetensors=..., pt=..., diffusers=...)
    reshard_legacy(path, out, cfg, tp, pp)                 legacy TP x PP -> TP' x PP'
    default_pipeline_split(num_blocks, pp)                 blocks per pipeline stage
"""

from checkpoints_convert.convert import export_checkpoint, import_released, open_checkpoint, reshard_legacy
from checkpoints_convert.layout import default_pipeline_split
from checkpoints_convert.schema import SchemaError, released_schema
from checkpoints_convert.sources import open_released

__all__ = ["SchemaError", "default_pipeline_split", "export_checkpoint", "import_released", "open_checkpoint",
           "open_released", "released_schema", "reshard_legacy"]
