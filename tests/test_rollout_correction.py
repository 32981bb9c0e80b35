"""rollout_correction: IS weights on hand values, rejection, metrics against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lad_jax import rollout_correction as rc

jax.config.update("jax_numpy_rank_promotion", "raise")

# Two responses, three columns; column 2 of row 1 is padding.
OLD = np.log(np.array([[0.5, 0.2, 0.9], [0.3, 0.6, 0.1]], np.float32))
BEH = np.log(np.array([[0.25, 0.4, 0.9], [0.3, 0.1, 0.7]], np.float32))
MASK = np.array([[True, True, True], [True, True, False]])


def test_off_is_weight_one_and_mask_unchanged():
  c = rc.weights(BEH, OLD, MASK, level="off", mode="truncate", cap=2.0)
  np.testing.assert_array_equal(c.weights, MASK.astype(np.float32))
  np.testing.assert_array_equal(c.mask, MASK)


def test_token_truncate_caps_rho():
  c = rc.weights(BEH, OLD, MASK, level="token", mode="truncate", cap=2.0)
  # rho = old / beh: [2, 0.5, 1], [1, 6 -> capped 2, padding 0]
  np.testing.assert_allclose(c.weights, [[2.0, 0.5, 1.0], [1.0, 2.0, 0.0]], rtol=1e-6)
  np.testing.assert_array_equal(c.mask, MASK)


def test_token_mask_rejects_outside_range():
  c = rc.weights(BEH, OLD, MASK, level="token", mode="mask", cap=3.0)
  # rho 6 > 3 is rejected; 0.5 and 2 stay (inside [1/3, 3]).
  np.testing.assert_allclose(c.weights, [[2.0, 0.5, 1.0], [1.0, 0.0, 0.0]], rtol=1e-6)
  np.testing.assert_array_equal(c.mask, [[True, True, True], [True, False, False]])


def test_sequence_level_uses_the_product_over_the_masked_tokens():
  c = rc.weights(BEH, OLD, MASK, level="sequence", mode="truncate", cap=10.0)
  # row 0: 2 * 0.5 * 1 = 1; row 1: 1 * 6 = 6 (the padding column does not count).
  np.testing.assert_allclose(c.weights, [[1.0, 1.0, 1.0], [6.0, 6.0, 0.0]], rtol=1e-5)
  m = rc.weights(BEH, OLD, MASK, level="sequence", mode="mask", cap=5.0)
  np.testing.assert_array_equal(m.mask, [[True, True, True], [False, False, False]])


def test_weights_carry_no_gradient():
  def f(old):
    return jnp.sum(rc.weights(BEH, old, MASK, level="token", mode="truncate", cap=2.0).weights)
  np.testing.assert_array_equal(jax.grad(f)(jnp.asarray(OLD)), np.zeros_like(OLD))


def test_bad_arguments_raise_one_line():
  with pytest.raises(ValueError, match="level"):
    rc.weights(BEH, OLD, MASK, level="tokens", mode="truncate", cap=2.0)
  with pytest.raises(ValueError, match="cap"):
    rc.weights(BEH, OLD, MASK, level="token", mode="mask", cap=1.0)


def test_mismatch_metrics_match_numpy():
  m = {k: float(v) for k, v in rc.mismatch_metrics(BEH, OLD, MASK).items()}
  d = np.abs(OLD - BEH)[MASK]
  assert m["rollout/logp_diff_abs_mean"] == pytest.approx(d.mean(), rel=1e-5)
  assert m["rollout/logp_diff_max"] == pytest.approx(d.max(), rel=1e-5)
  want = np.corrcoef(np.exp(OLD)[MASK], np.exp(BEH)[MASK])[0, 1]
  assert m["rollout/probs_pearson"] == pytest.approx(want, rel=1e-5)
  same = rc.mismatch_metrics(OLD, OLD, MASK)
  assert float(same["rollout/logp_diff_max"]) == 0.0
  assert float(same["rollout/probs_pearson"]) == pytest.approx(1.0, abs=1e-6)


def test_weight_metrics():
  c = rc.weights(BEH, OLD, MASK, level="token", mode="mask", cap=3.0)
  m = rc.weight_metrics(c, MASK)
  assert float(m["rollout_corr/masked_fraction"]) == pytest.approx(1 / 5)
  assert float(m["rollout_corr/weight_mean"]) == pytest.approx((2 + 0.5 + 1 + 1) / 4, rel=1e-6)


def test_config_checks():
  from lad_jax import config_utils
  c = config_utils.base_config()
  config_utils.validate(c)  # off by default
  c.train.rollout_correction.level = "sequence"
  c.train.recompute_old_logp = False
  with pytest.raises(config_utils.ConfigError, match="recompute_old_logp=True"):
    config_utils.validate(c)
  c.train.recompute_old_logp = True
  config_utils.validate(c)
  c.train.rollout_correction.cap = 0.5
  with pytest.raises(config_utils.ConfigError, match="cap"):
    config_utils.validate(c)
  c.train.rollout_correction.cap = 2.0
  c.train.rollout_correction.mode = "clip"
  with pytest.raises(config_utils.ConfigError, match="mode"):
    config_utils.validate(c)
