"""Diagnostics: notes from rank 0 only, warnings from every rank, library noise kept out."""

import io
import logging
import warnings

from robustmim.log import DeepSpeedNoise, PlainFormatter, RankFilter, quiet_libraries


def emitted(rank: int) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(PlainFormatter("%(message)s"))
    handler.addFilter(RankFilter(rank))
    logger = logging.getLogger(f"robustmim.test_log.rank{rank}")
    logger.propagate, logger.level = False, logging.INFO
    logger.addHandler(handler)
    logger.info("pretrain: initialized from x")
    logger.warning("checkpoint step_4 is damaged")
    logger.removeHandler(handler)
    return stream.getvalue()


def test_notes_come_from_rank_zero_and_warnings_from_every_rank():
    assert emitted(0) == "pretrain: initialized from x\nwarning: checkpoint step_4 is damaged\n"
    assert emitted(1) == "warning: checkpoint step_4 is damaged\n"


def test_deepspeeds_info_and_cpu_notice_are_dropped_but_its_warnings_pass():
    def record(level, message):
        return logging.LogRecord("DeepSpeed", level, __file__, 1, message, None, None)

    noise = DeepSpeedNoise()
    assert not noise.filter(record(logging.INFO, "Setting ds_accelerator to cuda (auto detect)"))
    assert not noise.filter(record(logging.WARNING, "Setting accelerator to CPU. If you have GPU ..."))
    assert noise.filter(record(logging.WARNING, "ZeRO stage 3 gathers..."))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_libraries()
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Use ...", FutureWarning)
        warnings.warn("something else", FutureWarning)
    assert [str(w.message) for w in caught] == ["something else"]
    assert any(isinstance(f, DeepSpeedNoise) for f in logging.getLogger("DeepSpeed").filters)
