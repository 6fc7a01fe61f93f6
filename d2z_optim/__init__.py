"""d2z_optim: a drop-in AdamW whose learning-rate schedule lives on the device.

>>> from d2z_optim import AdamW
>>> opt = AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, total_steps=10_000)

With ``total_steps`` the default schedule is the paper's recipe (Bergsma et al.,
2025, *Straight to Zero*): 10% linear warmup, then linear decay to zero.
"""

from . import dual, schedules
from .backends import available as available_backends
from .optimizer import AdamW
from .schedules import Schedule

__version__ = "0.1.0"

__all__ = ["AdamW", "Schedule", "__version__", "available_backends", "dual", "schedules"]
