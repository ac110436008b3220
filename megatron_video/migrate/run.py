"""One migration from upstream files to ours: translate, check every result with our own loaders, then write."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_video.migrate.data_json import translate_data
from megatron_video.migrate.launch import script_args, translate_flags
from megatron_video.migrate.model_json import translate_model
from megatron_video.migrate.report import Migration, MigrationError

FLAVOURS = ("mindspeed-mm", "osp-fork")


def _read_json(path: str | Path, what: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MigrationError(f"{what} {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise MigrationError(f"{what} {path}: not a JSON object")
    return data


def migrate(out: str | Path, mm_model: str | None = None, mm_data: str | None = None, script: str | None = None,
            flavour: str = "mindspeed-mm") -> Migration:
    """Translate the given upstream files into `out`/{model.yaml, data.yaml, vae.json, launch_flags.txt,
    MIGRATION.txt}. Raises MigrationError (nothing written) for a value we cannot reproduce."""
    if flavour not in FLAVOURS:
        raise MigrationError(f"unknown flavour {flavour!r}; one of {FLAVOURS}")
    if not (mm_model or mm_data or script):
        raise MigrationError("nothing to translate: give a model JSON, a data JSON and/or a launch script")
    out = Path(out)
    mig = Migration()
    if mm_model:
        translate_model(_read_json(mm_model, "model JSON"), mig)
    if mm_data:
        translate_data(_read_json(mm_data, "data JSON"), mig)
    if script:
        try:
            text = Path(script).read_text()
        except OSError as exc:
            raise MigrationError(f"launch script {script}: {exc}") from exc
        translate_flags(script_args(text), mig, flavour, str(out / "data.yaml") if mm_data else None,
                        str(out / "model.yaml") if mm_model else None,
                        str(out / "vae.json") if mig.vae is not None else None)
    check(mig)
    write(mig, out)
    return mig


def check(mig: Migration) -> None:
    """Every result must load with our own loaders and parser."""
    from megatron_video.arguments import build_parser
    from megatron_video.configfile import ConfigError
    from megatron_video.data.config import DataConfig
    from megatron_video.models.registry import model_config_from_mapping

    try:
        if mig.model:
            model_config_from_mapping(mig.model, source="translated model config")
        if mig.data:
            DataConfig.from_dict(mig.data).validate()
    except (ConfigError, ValueError) as exc:
        raise MigrationError(f"the translated settings are not valid here: {exc}") from exc
    _, unknown = build_parser().parse_known_args(mig.flags)
    if unknown:
        raise MigrationError(f"internal: translated flags our parser does not know: {unknown}")


def write(mig: Migration, out: Path) -> None:
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    header = "# Translated by tools/import_mindspeed.py; MIGRATION.txt lists every upstream setting.\n"
    if mig.model:
        (out / "model.yaml").write_text(header + yaml.safe_dump(mig.model, sort_keys=False))
    if mig.data:
        (out / "data.yaml").write_text(header + yaml.safe_dump(mig.data, sort_keys=False))
    if mig.vae is not None:
        (out / "vae.json").write_text(json.dumps(mig.vae, indent=2) + "\n")
    if mig.flags:
        (out / "launch_flags.txt").write_text(" ".join(mig.flags) + "\n")
    (out / "MIGRATION.txt").write_text(mig.report() + "\n")


__all__ = ["FLAVOURS", "check", "migrate", "write"]
