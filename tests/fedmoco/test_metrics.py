"""fedmoco.metrics: JSON-lines logs that survive a run killed mid-write."""

import logging


def test_a_record_after_a_line_cut_short_stays_whole(tmp_path, caplog):
    from fedmoco.metrics import JsonlLogger, read_jsonl

    path = tmp_path / "rounds.jsonl"
    logger = JsonlLogger(path)
    logger.log({"round": 1})
    with open(path, "a") as fh:
        fh.write('{"round": 2, "loss": 0.')  # the run was killed mid-write
    logger.log({"round": 3})
    logger.log({"round": 4})
    with caplog.at_level(logging.WARNING, logger="fedmoco.metrics"):
        assert [r["round"] for r in read_jsonl(path)] == [1, 3, 4]
    assert "rounds.jsonl:2: skipped a line that is not a JSON record" in caplog.text
