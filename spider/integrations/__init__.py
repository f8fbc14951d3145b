"""Spiderscope's methods and run directory inside other people's training loops.

* :mod:`spider.integrations.hf` — ``SpiderCallback``, a ``transformers.TrainerCallback`` for
  the Hugging Face ``Trainer`` and the trainers built on it (TRL's ``SFTTrainer``), on one
  process, under DDP or under FSDP2 (FSDP1 and DeepSpeed are refused at ``on_train_begin``).

Imported on demand (``from spider.integrations.hf import SpiderCallback``): importing
``spider`` never pays for ``transformers.Trainer``.
"""
