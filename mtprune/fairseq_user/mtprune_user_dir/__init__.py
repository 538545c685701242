"""fairseq ``--user-dir`` for mtprune: registers the ``mtprune_ordered`` task of ``train.order``
(``mtprune.curriculum``) in fairseq-train and in each process it spawns per GPU."""

from mtprune.curriculum import register

register()
