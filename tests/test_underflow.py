"""accumlab.lab.underflow: what fp16 stores for a logit's gradient term p / N under a scale."""

import pytest
import torch

from accumlab.lab import underflow


def test_status_follows_fp16s_ranges():
    tiny = underflow.SMALLEST_SUBNORMAL
    assert tiny == 2.0**-24
    assert underflow.fp16_status(tiny / 2) == "zero"  # the tie rounds to the even 0
    assert underflow.fp16_status(tiny * 0.51) == "subnormal"
    assert underflow.fp16_status(2.0**-15) == "subnormal"
    assert underflow.fp16_status(2.0**-14) == "normal"
    assert underflow.fp16_status(65504.0) == "normal"
    assert underflow.fp16_status(70000.0) == "overflow"


def test_term_is_recovered_after_unscaling():
    t = underflow.fp16_term(1e-5, 8192)
    assert t["exact"] == pytest.approx(1.2207e-9, rel=1e-4) and t["stored"] == 0.0
    assert t["rel_error"] == 1.0
    t = underflow.fp16_term(1e-5, 8192, 2.0**16)
    assert t["scaled"] == pytest.approx(8e-5, rel=1e-3) and t["status"] == "normal"
    assert t["recovered"] == pytest.approx(t["exact"], rel=2**-11)
    t = underflow.fp16_term(1e-3, 8192, 1.0)  # 1.2e-7: subnormal, a few bits
    assert t["status"] == "subnormal" and 1e-4 < t["rel_error"] < 0.2
    with pytest.raises(ValueError, match="probability"):
        underflow.fp16_term(1.5, 10)
    with pytest.raises(ValueError, match="token count N"):
        underflow.fp16_term(0.1, 0)
    with pytest.raises(ValueError, match="loss scale"):
        underflow.fp16_term(0.1, 10, 0.0)


def test_sorted_shares_equal_the_cast():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(20_000, generator=g, dtype=torch.float64) ** 8
    shares = underflow.ZeroShares(probs)
    for n, s in ((100, 1.0), (8192, 1.0), (8192, 2.0**16), (524288, 256.0), (1, 1.0)):
        assert shares(n, s) == underflow.zero_share(probs, n, s)
    assert 0 < shares(8192) < 1 and shares(8192, 2.0**16) < shares(8192)
    with pytest.raises(ValueError, match="no positive"):
        underflow.ZeroShares(torch.zeros(3))
