"""Translation of MindSpeed-MM / Open-Sora Plan fork settings (model JSON, data JSON, launch flags) into ours.

Every upstream setting ends up in exactly one place of a `Migration`: carried over (`used`: where to), or left out
(`dropped`: why). A value that would change what is trained and has no counterpart is an error
(`MigrationError`), raised before anything is written.
"""

from megatron_video.migrate.report import Migration, MigrationError

__all__ = ["Migration", "MigrationError"]
