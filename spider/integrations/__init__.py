"""Spiderscope's methods and run directory inside other people's training loops.

* :mod:`spider.integrations.hf` — ``SpiderCallback``, a ``transformers.TrainerCallback`` for
  the Hugging Face ``Trainer`` and the trainers built on it (TRL's ``SFTTrainer``).

Imported on demand (``from spider.integrations.hf import SpiderCallback``): importing
``spider`` never pays for ``transformers.Trainer``.
"""
