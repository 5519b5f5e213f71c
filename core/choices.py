"""The names a user chooses from (methods, allocations, xmin methods, ...) and the defaults of
those options, in a module that imports nothing: the command line builds its parsers and checks
a run spec from these without loading torch, transformers or pandas (``spectrascope --help``
and a refusal answer at once). Each list belongs to the module that implements it, which
re-exports it from here (``core.fit.XMIN_METHODS`` is ``XMIN_METHODS``)."""

#: How the power-law fits choose xmin (``core.fit``'s docstring); the one list the CLI and the pages offer.
XMIN_METHODS = ("full", "peak", "peak-compat", "mid")

#: Layer-wise allocation methods (``core.allocation.METHODS``) and how a matrix takes its metric.
#: ``sensitivity``: from the measured loss rise of each block alone pruned (``core.sensitivity``).
ALLOCATION_METHODS = ("uniform", "alpha", "owl", "sensitivity")
MAPPINGS = ("block", "matrix")

#: Pruning methods (``core.pruning.METHODS``: the registered methods, checked there to match).
PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")
#: The pruners an llm-compressor recipe can name (``core.recipes``: its Wanda and SparseGPT modifiers).
RECIPE_METHODS = ("wanda", "sparsegpt")
#: OWL: a Wanda score is an outlier above OWL_M times its block's mean.
OWL_M = 5.0

#: Calibration windows (``core.calibration``): defaults and where a beginning-of-sequence token goes.
DEFAULT_NSAMPLES = 128
DEFAULT_SEQLEN = 2048
DEFAULT_SEED = 0
#: The default upper bound of any allocated ratio (``core.allocation``): a target above it is unreachable.
DEFAULT_R_MAX = 0.99
BOS_MODES = ("auto", "paper", "none")

#: ``tune``'s grid (``core.sweeps``): epsilons and the metric columns scored.
DEFAULT_EPSILONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
DEFAULT_METRIC_COLUMNS = ("alpha", "alpha_hat")

#: A recorded run's status (``core.registry``).
STATUSES = ("running", "done", "failed", "cancelled", "interrupted")

#: ``compare --out STEM`` writes STEM-<table>.<format> for each of these tables and formats.
COMPARE_TABLES = ("long", "deltas", "missing")
TABLE_FORMATS = ("csv", "parquet")
