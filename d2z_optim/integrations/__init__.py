"""d2z_optim in the training frameworks: one line each, no framework a dependency.

- :mod:`d2z_optim.integrations.hf`: ``use_d2z(Trainer(...))`` for HF transformers' Trainer.
- :mod:`d2z_optim.integrations.lightning`: ``total_steps(self.trainer)`` for
  ``configure_optimizers`` and the ``D2ZCallback`` (the applied LR logged, clipping under
  ``bf16-mixed``/``16-mixed``).
- :mod:`d2z_optim.integrations.accelerate`: ``total_steps(accelerator, dataloader, epochs)``.

Each module imports its framework lazily, only when a function of it is called: importing
``d2z_optim`` never imports transformers, lightning or accelerate. ``common`` holds what the
three share (finding our optimizer inside a framework's wrapper, the run-length check).
"""

__all__ = ["accelerate", "common", "hf", "lightning"]
