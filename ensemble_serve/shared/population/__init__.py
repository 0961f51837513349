"""The population directory: the only contract between trainer and server.

Layout::

    <population>/
      population.json        manifest (``Manifest``, in :mod:`.manifest`)
      members/<folder>/      standard PEFT LoRA adapter:
                               adapter_config.json + adapter_model.safetensors
      router/                optional
      history.jsonl          one JSON line per generation (append-only, :mod:`.history`)

The trainer writes populations with :func:`create_population` (new directory)
and :func:`commit_generation` (next generation of an existing one), both in
:mod:`.commit`; the server reads them with :func:`load_population`
(:mod:`.load`), which validates everything it will later hand to vLLM.
Pickle weights (``*.bin``/``*.pt``) are never loaded.

Concurrency model: one writer, any number of readers. Member folders are
immutable once written and ``population.json`` is replaced atomically, so a
reader that reads the manifest once always sees a complete generation.
"""

from ensemble_serve.shared.population.commit import (
    commit_generation,
    copy_with_base_path,
    create_population,
    prune_unreferenced,
    write_manifest,
)
from ensemble_serve.shared.population.history import append_history, read_history
from ensemble_serve.shared.population.load import (
    Population,
    PopulationError,
    fingerprint_model_dir,
    load_population,
    read_manifest,
)
from ensemble_serve.shared.population.manifest import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    FORMAT_VERSION,
    HISTORY_FILE,
    MANIFEST_FILE,
    MEMBER_NAME_RE,
    BaseModelRef,
    Manifest,
    Member,
)

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "FORMAT_VERSION",
    "HISTORY_FILE",
    "MANIFEST_FILE",
    "MEMBER_NAME_RE",
    "BaseModelRef",
    "Manifest",
    "Member",
    "Population",
    "PopulationError",
    "append_history",
    "commit_generation",
    "copy_with_base_path",
    "create_population",
    "fingerprint_model_dir",
    "load_population",
    "prune_unreferenced",
    "read_history",
    "read_manifest",
    "write_manifest",
]
