"""The MMKD distillation trainer: the multi-level objective of mmkd_kernels on transformers.Trainer."""
