"""Recording which settings a piece of code reads: the basis of every stage's freshness."""

from __future__ import annotations

import threading

from mtprune.config import is_speed_only, load_config, lookup, recording_reads


def test_leaf_reads_are_recorded_with_their_dotted_key() -> None:
    cfg = load_config(None, ["download.direction=both"])
    with recording_reads() as reads:
        assert cfg.download.direction == "both"
        _ = cfg.launch.slurm.partition
        _ = cfg.evaluate.extra_test_sets
    assert reads == {"download.direction", "launch.slurm.partition", "evaluate.extra_test_sets"}


def test_section_dumps_record_every_key_they_touch() -> None:
    cfg = load_config(None)
    with recording_reads() as reads:
        cfg.section("model")
    assert "model.embed_dim" in reads and "model.extra_args" in reads
    assert not any(k.startswith("proxy.") for k in reads)


def test_reads_from_other_threads_and_replaced_configs_are_recorded() -> None:
    cfg = load_config(None)
    cfg2 = cfg.replace(train=cfg.train.replace(max_update=7))
    assert cfg2.train.max_update == 7 and cfg.train.max_update == 1500
    with recording_reads() as reads:
        t = threading.Thread(target=lambda: cfg2.train.max_update)
        t.start()
        t.join()
    assert reads == {"train.max_update"}


def test_nothing_is_recorded_outside_the_block_and_lookup_does_not_record() -> None:
    cfg = load_config(None)
    _ = cfg.prune.seed
    with recording_reads() as reads:
        assert lookup(cfg, "prune.sparsities") == [0.1, 0.3, 0.5]
    assert reads == set()


def test_speed_only_settings() -> None:
    for key in ("score.batch_tokens", "score.chunk_tokens", "score.device", "proxy.parallel",
                "train.parallel", "launch.slurm.partition", "launch.score_shards"):
        assert is_speed_only(key), key
    for key in ("score.precision", "proxy.max_tokens", "train.max_update", "download.direction"):
        assert not is_speed_only(key), key
