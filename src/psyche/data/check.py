"""Can a run config's data be used here? Checked before any training starts.

:func:`data_problems` is what ``psyche validate-config`` reports and what ``psyche
train``, the client or a ``psyche doctor`` can ask before they load a model: each
problem names the config field to change and what to run. Only local token folders
are checked (their ``meta.json`` and file sizes: no token is read, nothing is built);
an http(s):// or psyche:// location is not contacted. No torch is imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from psyche.config import ConfigProblem
from psyche.data.errors import DataError, DataMissingError
from psyche.data.provider import open_provider, provider_kind
from psyche.data.tokens import read_meta
from psyche.data.tokenize import DEFAULT_CORPUS_DIR, DEFAULT_OUT_DIR

if TYPE_CHECKING:
    from psyche.config import RunConfig


def builds_on_first_use(location: str | Path) -> bool:
    """True for the default token folder, ``data/fortunes`` in the current folder: ``psyche
    train``, ``psyche client`` and ``psyche demo`` build it from Debian's fortunes when it
    is missing. Any other folder must be built with ``psyche tokenize`` first."""
    return Path(location).absolute() == DEFAULT_OUT_DIR.absolute()


def not_built_yet(location: str | Path) -> bool:
    """True when ``location`` is the default token folder (:func:`builds_on_first_use`)
    and it is not there yet: the first ``psyche train``, ``client`` or ``demo`` builds it."""
    return builds_on_first_use(location) and not Path(location).exists()


def is_checked_offline(cfg: "RunConfig") -> bool:
    """Whether :func:`data_problems` looks at the data itself (a local folder) rather than
    leaving it to the client that opens it (an http(s):// or psyche:// location)."""
    return provider_kind(cfg.data_location(), cfg.data.provider) == "local"


def _where(cfg: "RunConfig", location: str) -> str:
    """``location``, and how it was found from what the config says, for a message."""
    written = cfg.data.location
    if location == written or Path(written).is_absolute():
        return location
    base = "its folder" if cfg.source_dir is not None else "the current folder"
    return f'{location} ("{written}" in the config, relative to {base})'


def data_problems(cfg: "RunConfig", *, location: str | None = None) -> list[ConfigProblem]:
    """Every reason the run's local token data cannot be trained on here, each with the
    field to change (``data.location`` or ``model.vocab_size``) and what to do.

    ``location`` replaces ``cfg.data_location()`` (a ``--data`` option; relative to the
    current folder). Returns ``[]`` when the folder opens with both splits holding a sample
    of ``seq_len + 1`` tokens and a vocabulary that fits ``model.vocab_size``; also when the
    default folder is missing but will be built on first use, and for a remote location,
    which is not checked (see :func:`is_checked_offline`).

    Example::

        for p in data_problems(load_config("run.toml")):
            print(p)   # data.location: no folder /runs/data/mine ...; build it with `psyche tokenize --out ...`
    """
    loc = location if location is not None else cfg.data_location()
    if provider_kind(loc, cfg.data.provider) != "local":
        return []
    folder = Path(loc)
    where = loc if location is not None else _where(cfg, loc)

    def problem(message: str, field: str = "data.location") -> list[ConfigProblem]:
        return [ConfigProblem(field, message)]

    if not_built_yet(folder):
        if DEFAULT_CORPUS_DIR.is_dir():
            return []
        return problem(f"{where} is not built yet and the Debian fortunes corpus it is built from "
                       f"({DEFAULT_CORPUS_DIR}) is missing; install the package fortunes, or build it "
                       f"from your own text with `psyche tokenize --corpus FILE_OR_FOLDER --out {loc}`")
    if not folder.exists():
        return problem(f"no folder {where}; build it with `psyche tokenize --out {loc}` "
                       "(add --corpus FILE_OR_FOLDER for your own text)")
    if not folder.is_dir():
        return problem(f"{where} is a file, not a token folder; point data.location at the folder `psyche tokenize --out` wrote")
    try:
        meta = read_meta(folder)
    except DataMissingError:
        if any(folder.iterdir()):
            return problem(f"{where} is not a token folder (no meta.json); point data.location at the folder "
                           "`psyche tokenize --out` wrote")
        return problem(f"{where} is an empty folder; build the token data there with `psyche tokenize --out {loc}`")
    except DataError as exc:
        return problem(str(exc))
    out: list[ConfigProblem] = []
    for split in ("train", "val"):
        try:
            open_provider(folder, split=split, seq_len=cfg.model.seq_len, provider="local")
        except DataError as exc:
            out += problem(f"{exc} (rebuild it with `psyche tokenize --out {loc}`)"
                           if not isinstance(exc, DataMissingError) else str(exc))
            break  # the other split shares the folder's meta.json: one report is enough
    vocab = meta.get("vocab_size")
    if isinstance(vocab, int) and vocab > cfg.model.vocab_size:
        out += problem(f"the token folder {loc} has a vocabulary of {vocab} (its meta.json) but "
                       f"model.vocab_size is {cfg.model.vocab_size}; set model.vocab_size = {vocab} or more, "
                       f"or rebuild the data with `psyche tokenize --vocab-size {cfg.model.vocab_size} --out {loc}` "
                       "(with the --corpus it was built from)",
                       field="model.vocab_size")
    return out
