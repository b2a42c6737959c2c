"""helpers: the package behind the notebooks of the GSM8K knowledge-distillation toolkit.

One module per concern (see README): data, models, prompts, extract, assess, plots,
artifacts, pipeline. Importing the package is cheap; heavy libraries load in the modules.
"""

__version__ = "0.1.0"
