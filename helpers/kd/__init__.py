"""Knowledge distillation on sparse teacher distributions: the teacher's stores (``teacher``,
``logit_store``), the losses on them (``losses``) and LoRA training of the student (``distill``,
also ``python -m helpers.kd.distill``)."""
