"""Parquet files of a Hugging Face dataset repository, downloaded once into the Hugging Face cache.

`huggingface_hub.snapshot_download(allow_patterns=...)` does the work: it lists the repository
once, downloads only the matching files that are not cached yet, and honours the cache
settings users already have (HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE, HF_TOKEN), or
data.cache_dir. The DataModule calls it in prepare_data, which Lightning runs on one process
per node; the other ranks then ask the cache only (local_files_only), with no network.

Patterns mean the same thing online and offline: the files of the local snapshot are
filtered with huggingface_hub's own matcher (fnmatch, where `*` crosses `/`), the one
snapshot_download applied to the repository's listing.
"""

from pathlib import Path

from fineweb_gpt.errors import ConfigError, one_line


def as_patterns(files) -> list[str]:
    return [files] if isinstance(files, str) else [str(f) for f in files]


def download_hub_files(repo: str, files, cache_dir: str | None = None, local_only: bool = False) -> list[Path]:
    """The local paths of the parquet files of dataset `repo` matching `files` (a pattern or a list)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import filter_repo_objects

    patterns = as_patterns(files)
    try:
        folder = Path(
            snapshot_download(
                repo,
                repo_type="dataset",
                allow_patterns=patterns,
                cache_dir=cache_dir,
                local_files_only=local_only,
            )
        )
    except Exception as err:  # no network and no cache, unknown repository, gated without a token: all end here
        where = "the Hugging Face cache" if local_only else "the Hugging Face Hub or its cache"
        raise ConfigError(
            f"cannot get {', '.join(patterns)} of dataset {repo} from {where} ({type(err).__name__}: "
            f"{one_line(err, limit=160)}); check the network, data.hf_repo and data.hf_files (HF_TOKEN for gated sets)"
        ) from err
    local = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    names = sorted(name for name in filter_repo_objects(local, allow_patterns=patterns) if name.endswith(".parquet"))
    if not names:
        raise ConfigError(
            f"no parquet files of dataset {repo} match {', '.join(patterns)}; check data.hf_files "
            "(e.g. 'sample/10BT/00[0-3]_00000.parquet')"
        )
    return [folder / name for name in names]
