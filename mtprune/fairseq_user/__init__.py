"""Holds only ``mtprune_user_dir``, the folder fairseq-train's ``--user-dir`` loads (fairseq puts this folder
on ``sys.path`` to import it, so nothing else may live here)."""
