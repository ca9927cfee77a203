"""Non-finite values stay with the token that carries them."""

import pytest

import jax_ccfuser as ccf
from hardening_cases import NON_FINITE, assert_non_finite_stays_in_its_rows, forward_and_grads
from moe_cases import Case


@pytest.mark.parametrize("where,value", NON_FINITE)
def test_non_finite_token_stays_in_its_rows(where, value):
  assert_non_finite_stays_in_its_rows(forward_and_grads(ccf.fused_moe, 4),
                                      Case(devices=4, tokens=16, k=2, skew=0.5, seed=51),
                                      where, value)
