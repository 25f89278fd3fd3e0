from . import qat_distillation  # noqa: F401
