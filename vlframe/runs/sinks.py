"""Which tracking sink serves a URI, and which URI a command tracks to. One rule for every command:

1. the URI named on the command line (``--tracking-uri``);
2. the run's config (``tracking.uri``), or the URI a run folder recorded;
3. the default sink's own default (the built-in MLflow sink's: ``$MLFLOW_TRACKING_URI``, else the
   embedded store ``sqlite:///<output folder>/mlflow.db``).

The URI's scheme (the part before ``:``; none for a plain path) chooses the sink
(:class:`registry.TrackingSinkConfig`'s ``schemes``): a sink for another tracker is a plugin
serving its own scheme, and everything vlframe tracks (runs, evaluations, sweeps) goes there.
"""

from __future__ import annotations

import re
from pathlib import Path

from registry import Catalog, Kind, Registry, VlframeError
from registry.catalog import Entry
from registry.protocols import TrackingSink

#: Where run folders (and the default sink's embedded store) go when the config says nothing.
DEFAULT_OUTPUT = Path("runs")

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):")


class TrackingError(VlframeError):
    """Tracking could not be done as asked: no sink serves a URI, or a journal cannot be delivered."""


def scheme(uri: str) -> str:
    """``"http"`` of ``http://host:5000``, ``"sqlite"`` of ``sqlite:///x.db``; ``""`` for a plain path."""
    found = _SCHEME.match(uri)
    return found.group(1).lower() if found else ""


def _catalog(catalog: Catalog | None) -> Catalog:
    return catalog if catalog is not None else Registry.discover().catalog


def sink_entry(uri: str, catalog: Catalog | None = None) -> Entry:
    """The registered sink serving ``uri``'s scheme; a :class:`TrackingError` naming the sinks there are."""
    catalog = _catalog(catalog)
    wanted = scheme(uri)
    found = [e for e in catalog.entries(Kind.TRACKING_SINK) if wanted in e.spec.config.schemes]
    if len(found) == 1:
        return found[0]
    offered = "; ".join(f"{e.spec.name} [{e.plugin}]: {', '.join(sorted(s or '(a path)' for s in e.spec.config.schemes))}"
                        for e in catalog.entries(Kind.TRACKING_SINK)) or "none (is plugin autoloading off?)"
    if not found:
        why = catalog.not_loaded(Kind.TRACKING_SINK)
        raise TrackingError(f"no tracking sink serves '{uri}' (scheme '{wanted or '(a path)'}'); sinks: {offered}"
                            f"{'; ' + why if why else ''}")
    raise TrackingError(f"{len(found)} tracking sinks serve '{uri}': {offered}; block one plugin")


def sink_for(uri: str, catalog: Catalog | None = None, *, timeout_s: float = 30.0) -> TrackingSink:
    """The sink that serves ``uri``, built; each of its requests ends within ``timeout_s``."""
    catalog = _catalog(catalog)
    entry = sink_entry(uri, catalog)
    config = catalog.validate(entry.spec.config, {"type": entry.spec.name})
    return catalog.build(Kind.TRACKING_SINK, config, path=f"tracking sink for {uri}", uri=uri, timeout_s=timeout_s)


def default_uri(output_dir: Path | None = None, catalog: Catalog | None = None) -> str:
    """Where a run that configures no URI is tracked: the default sink's choice."""
    catalog = _catalog(catalog)
    entry = catalog.default(Kind.TRACKING_SINK)
    uri = entry.spec.config.default_uri(Path(output_dir or DEFAULT_OUTPUT)) if entry is not None else None
    if not uri:
        why = catalog.not_loaded(Kind.TRACKING_SINK)
        raise TrackingError(f"no tracking URI is configured and no tracking sink offers a default{'; ' + why if why else ''}"
                            ": set tracking.uri (or tracking.enabled: false)")
    return uri


def store_uri(given: str | None = None, configured: str | None = None, output_dir: Path | None = None,
              catalog: Catalog | None = None) -> str:
    """The tracking URI by the rule above."""
    return given or configured or default_uri(output_dir, catalog)


__all__ = ["DEFAULT_OUTPUT", "TrackingError", "default_uri", "scheme", "sink_entry", "sink_for", "store_uri"]
