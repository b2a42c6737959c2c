"""helpers: the package behind the notebooks of the GSM8K knowledge-distillation toolkit.

Grouped by capability (see README's layout): the ground (settings: every setting's type, range and
meaning; data, models, prompts, extract, artifacts), the capabilities (backends/, kd/, assess,
plots, collm/, speculative/, fusion/) and on top the runner (pipeline) and the benchmark (bench/).
Importing the package is cheap; heavy libraries load in the modules.
"""

__version__ = "0.1.0"
