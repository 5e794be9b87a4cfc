"""Every MLflow tag vlframe writes or reads, in one place."""

#: Hash of the config a run trains (``vlframe.config.files.config_hash``).
CONFIG_HASH = "vlframe.config_hash"
#: The run folder that wrote the run (read back only after checking the folder's own run id).
RUN_DIR = "vlframe.run_dir"
#: The plugins a run was built from: JSON ``{plugin: "distribution version, source sha256:..."}``.
PLUGINS = "vlframe.plugins"
#: Unusable samples skipped while training.
SKIPPED_SAMPLES = "vlframe.skipped_samples"
#: The checkpoint an evaluation-only run evaluated.
CHECKPOINT = "vlframe.checkpoint"
#: ``vlframe.eval.<task>``: one evaluation's info (counts, settings), as JSON.
EVAL_PREFIX = "vlframe.eval."
#: ``vlframe.eval_skipped.<task>``: why a sweep could not run a task on a variant.
EVAL_SKIPPED_PREFIX = "vlframe.eval_skipped."
#: Our own id of a run, so a run created by an attempt that died before recording it is found again.
LOCAL_ID = "vlframe.local_id"

#: Sweeps: the sweep's name (on the parent and every child), and the mark of its parent run.
SWEEP = "vlframe.sweep"
SWEEP_PARENT = "vlframe.sweep_parent"
#: A child run's variant name, the override keys (JSON list) and each override's value.
VARIANT = "vlframe.variant"
OVERRIDES = "vlframe.overrides"
OVERRIDE_PREFIX = "vlframe.override."
#: Seeded sweeps: every run of a sweep names the sweep's parent (its variant runs nest under a
#: variant run, marked as such, when the sweep has seeds); a seed run's seed.
SWEEP_ROOT = "vlframe.sweep_root"
VARIANT_GROUP = "vlframe.variant_group"
SEED = "vlframe.seed"
#: Set on a variant's run once it trained *and* was evaluated; and what it was evaluated with.
SWEEP_DONE = "vlframe.sweep_done"
EVAL_HASH = "vlframe.eval_hash"
#: ``vlframe.val_skipped.<task>``: why training's validation could not run a periodic task.
VAL_SKIPPED_PREFIX = "vlframe.val_skipped."
#: Why a run failed (the last lines of its output).
ERROR = "vlframe.error"

#: MLflow's own tags.
PARENT = "mlflow.parentRunId"
GIT_COMMIT = "mlflow.source.git.commit"
NOTE = "mlflow.note.content"


def fit_json(mapping: dict[str, str], limit: int = 5000) -> str:
    """``mapping`` as JSON within MLflow's tag length: whole entries are left out (and counted)."""
    import json

    kept = dict(mapping)
    text = json.dumps(kept)
    while len(text) > limit and kept:
        kept.pop(next(reversed(kept)))
        text = json.dumps({**kept, "...": f"{len(mapping) - len(kept)} more"})
    return text
