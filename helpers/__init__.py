"""helpers: the package behind the notebooks of the GSM8K knowledge-distillation toolkit.

One module per concern (see README): settings (every setting's type, range and meaning), data,
models, prompts, extract, teacher, logit_store, losses, distill, assess, collm, plots, artifacts,
bench, pipeline (the runner). Importing the package is cheap; heavy libraries load in the modules.
"""

__version__ = "0.1.0"
